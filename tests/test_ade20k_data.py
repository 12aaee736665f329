"""ADE20K data: loader, reduce_zero_label and bad input, on the real ADEChallengeData2016 pairs."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from crossmae.utils import UserError
from transfer.seg import data as D
from transfer.seg.testing import ADE_SUBDIR, COCO_SEMSEG_SUBDIR, require_dir



@pytest.fixture(scope="module")
def ade_root(data_root):
    return require_dir(data_root / ADE_SUBDIR)


def test_reduce_zero_label_values():
    raw = np.array([[0, 1, 2], [150, 255, 7]], dtype=np.uint8)
    assert D.reduce_zero_label(raw).tolist() == [[255, 0, 1], [149, 255, 6]]


def test_scan_and_load_real_pairs(ade_root):
    train = D.scan_split(ade_root, "training")
    val = D.scan_split(ade_root, "validation")
    assert [s.image.name for s in train] == ["ADE_train_00000001.jpg"]
    assert len(val) == 3
    for s in train + val:
        img, label = D.load_pair(s, 150)
        raw = np.array(Image.open(s.annotation))
        assert img.shape == raw.shape + (3,) and img.dtype == np.uint8
        assert s.size == raw.shape
        # reduce_zero_label: 0 -> 255 (ignored), v -> v - 1
        assert np.array_equal(label == 255, raw == 0)
        assert np.array_equal(label[raw > 0].astype(int), raw[raw > 0].astype(int) - 1)
        assert label[label != 255].max() < 150
    names = D.read_class_names(ade_root, 150)
    assert names[0] == "wall" and len(names) == 150


def test_train_sample_shapes_and_determinism(ade_root):
    ds = D.SegTrainDataset(ade_root, "training", 150, seed=3, crop_size=(128, 128), scale=(512, 128))
    x, y = ds[5]
    assert x.shape == (3, 128, 128) and x.dtype == torch.float32
    assert y.shape == (128, 128) and y.dtype == torch.int64
    vals = set(torch.unique(y).tolist())
    assert vals <= set(range(150)) | {255}
    x2, y2 = ds[5]
    assert torch.equal(x, x2) and torch.equal(y, y2)          # position -> same sample, same augmentation
    x3, _ = ds[6]
    assert not torch.equal(x, x3)


def test_test_sample_keeps_label_size(ade_root):
    ds = D.SegTestDataset(ade_root, "validation", 150, scale=(2048, 512))
    x, y, i = ds[1]  # 500x364 image: short side -> 512
    h, w = ds.samples[1].size
    assert y.shape == (h, w)
    assert min(x.shape[1:]) == 512 and x.shape[1:] == D.rescale_size(h, w, (2048, 512))


def test_rescale_size_matches_mmcv_rule():
    # factor = min(2048 / long, 512 / short); int(x * f + 0.5)
    assert D.rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert D.rescale_size(300, 400, (2048, 512)) == (512, 683)
    assert D.rescale_size(100, 1000, (2048, 512)) == (205, 2048)


def test_random_crop_cat_max_ratio():
    # class 1 on columns 50..99; a 60-wide crop starting at x in 0..40 mixes both classes, and meets
    # the 0.75 ratio only for x in 6..34 (71% of the draws). mmseg retries up to 10 times.
    label = np.zeros((100, 100), np.uint8)
    label[:, 50:] = 1
    img = np.zeros((100, 100, 3), np.uint8)

    def ok_fraction(ratio, seed):
        rng = np.random.default_rng(seed)
        ok = 0
        for _ in range(50):
            _, lab = D.random_crop(img, label, (100, 60), ratio, rng)
            assert lab.shape == (100, 60)
            _, c = np.unique(lab, return_counts=True)
            ok += int(len(c) > 1 and c.max() / c.sum() < 0.75)
        return ok / 50

    assert ok_fraction(0.75, 0) == 1.0
    assert ok_fraction(1.0, 0) < 0.9  # no retries without the constraint


def _copy_tree(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_label_value(ade_root, tmp_path):
    root = _copy_tree(ade_root, tmp_path / "ade")
    ann = root / "annotations" / "validation" / "ADE_val_00000002.png"
    a = np.array(Image.open(ann))
    a[0, 0] = 200  # > 150 classes and not 255
    Image.fromarray(a).save(ann)
    s = [x for x in D.scan_split(root, "validation") if x.annotation == ann][0]
    with pytest.raises(UserError, match=r"ADE_val_00000002\.png: label value 200 is outside the 150 classes"):
        D.load_pair(s, 150)
    a[0, 0] = 255  # the ignore value is accepted
    Image.fromarray(a).save(ann)
    D.load_pair(s, 150)


def test_count_mismatch(ade_root, tmp_path):
    root = _copy_tree(ade_root, tmp_path / "ade")
    (root / "annotations" / "validation" / "ADE_val_00000003.png").unlink()
    with pytest.raises(UserError, match=r"ADE_val_00000003\.jpg: has no matching annotation \(3 images vs 2"):
        D.scan_split(root, "validation")


def test_size_mismatch(ade_root, tmp_path):
    root = _copy_tree(ade_root, tmp_path / "ade")
    ann = root / "annotations" / "validation" / "ADE_val_00000001.png"
    Image.open(ann).resize((100, 80), Image.NEAREST).save(ann)
    with pytest.raises(UserError, match=r"ADE_val_00000001\.png: annotation size 100x80 differs from image size 683x512"):
        D.scan_split(root, "validation")


def test_missing_folder(ade_root, tmp_path):
    root = _copy_tree(ade_root, tmp_path / "ade")
    shutil.rmtree(root / "images" / "training")
    with pytest.raises(UserError, match=r"images/training: folder not found"):
        D.scan_split(root, "training")


def test_class_count_mismatch(data_root):
    root = require_dir(data_root / COCO_SEMSEG_SUBDIR)
    assert len(D.read_class_names(root, 80)) == 80
    with pytest.raises(UserError, match=r"objectInfo80\.txt: lists 80 classes but the config says num_classes=150"):
        D.read_class_names(root, 150)
