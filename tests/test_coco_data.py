"""COCO loader on the real mini COCO 2017 json: category ids, polygons, crowd RLE, empty images, LSJ,
and the bad-input cases of docs/coco.md."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from crossmae.utils import UserError
from transfer.vitdet.data import LSJ, CocoInstances, ResizeShortestEdge, TrainingStream, boxes_from_masks
from transfer.vitdet.masks import polygon_boxes, unpack_polygons


@pytest.fixture(scope="module")
def coco(data_root):
    return data_root / "coco"


@pytest.fixture(scope="module")
def train_raw(coco):
    return json.loads((coco / "annotations/instances_train2017.json").read_text())


def test_category_ids_map_both_ways(coco, train_raw):
    ds = CocoInstances(coco / "annotations/instances_train2017.json", coco / "train2017", train=False)
    official = sorted(c["id"] for c in train_raw["categories"])
    assert len(ds.cat_ids) == 80 and max(ds.cat_ids) == 90 and ds.cat_ids == official  # non-contiguous 1..90
    for cid in official:
        assert ds.label_to_cat_id(ds.cat_to_label[cid]) == cid
    assert sorted(ds.cat_to_label.values()) == list(range(1, 81))


def test_polygons_and_crowd_rle(coco, train_raw):
    """Polygon and crowd-RLE masks decode to their annotated areas; crowd instances are kept for
    evaluation-style loading but are never training targets (detectron2 DatasetMapper)."""
    crowd = [a for a in train_raw["annotations"] if a["iscrowd"]]
    assert crowd, "the mini COCO has crowd RLE annotations"
    img_id = crowd[0]["image_id"]
    anns = [a for a in train_raw["annotations"] if a["image_id"] == img_id]
    full = CocoInstances(coco / "annotations/instances_train2017.json", coco / "train2017", train=False)
    i = [im["id"] for im in full.images].index(img_id)
    _, t = full.load(i)
    assert t["masks"].shape[0] == len(anns)
    from pycocotools.coco import COCO
    oracle = COCO(str(coco / "annotations/instances_train2017.json"))  # the official API as the oracle
    for a, m in zip(full.anns[i], t["masks"]):
        assert torch.equal(m, torch.from_numpy(oracle.annToMask(oracle.anns[a["id"]]))), a["id"]
        if not a["iscrowd"]:  # polygon areas match the json; crowd 'area' values in COCO do not
            assert abs(m.sum().item() - a["area"]) <= 0.05 * a["area"] + 20
    train = CocoInstances(coco / "annotations/instances_train2017.json", coco / "train2017", train=True)
    j = [im["id"] for im in train.images].index(img_id)
    _, tt = train.load(j)
    assert tt["masks"].shape[0] == sum(1 for a in anns if not a["iscrowd"])
    # boxes are the json XYWH converted to XYXY
    nc = [a for a in anns if not a["iscrowd"]]
    x, y, w, h = nc[0]["bbox"]
    assert torch.allclose(tt["boxes"][0], torch.tensor([x, y, x + w, y + h]), atol=1e-3)


def test_images_without_annotations(coco, train_raw):
    ids_with = {a["image_id"] for a in train_raw["annotations"]}
    empty = [im["id"] for im in train_raw["images"] if im["id"] not in ids_with]
    assert empty, "the mini COCO has an image without annotations"
    train = CocoInstances(coco / "annotations/instances_train2017.json", coco / "train2017", train=True)
    full = CocoInstances(coco / "annotations/instances_train2017.json", coco / "train2017", train=False)
    assert len(full) == 80 and len(train) == 79  # detectron2 filter_empty drops it for training only
    assert empty[0] not in [im["id"] for im in train.images]
    i = [im["id"] for im in full.images].index(empty[0])
    _, t = full.load(i)
    assert t["boxes"].shape == (0, 4) and t["masks"].shape[0] == 0


def test_lsj_consistent_and_deterministic(coco):
    ds = CocoInstances(coco / "annotations/instances_val2017.json", coco / "val2017", train=True,
                       transform=LSJ(128, (0.1, 2.0), 0.5))
    for k in range(6):
        a, b = ds[(k % len(ds), 1000 + k)], ds[(k % len(ds), 1000 + k)]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"]["masks"], b["target"]["masks"])
        t = a["target"]
        assert max(a["image"].shape[-2:]) <= 128
        assert t["masks"].shape[-2:] == a["image"].shape[-2:]
        # boxes are recomputed from the transformed polygons (the val split has no crowd in training)
        polys = unpack_polygons(t, len(t["labels"]))
        assert all(len(p) for p in polys)
        assert torch.equal(t["boxes"], polygon_boxes(polys))
        # the rasterised masks fit their float boxes (within the rasteriser's pixel rounding; a tiny
        # instance may rasterise to nothing and is kept, as detectron2 keeps its polygon)
        mb, nz = boxes_from_masks(t["masks"]), t["masks"].flatten(1).bool().any(1)
        assert bool(((mb - t["boxes"])[nz].abs() <= 2.0).all())
        assert t["labels"].shape[0] == t["boxes"].shape[0]


def test_test_resize_and_stream(coco):
    ds = CocoInstances(coco / "annotations/instances_val2017.json", coco / "val2017", train=False,
                       transform=ResizeShortestEdge(1024, 1024))
    item = ds[0]
    h0, w0 = item["orig_size"]
    assert max(item["image"].shape[-2:]) == 1024
    assert item["image"].shape[-2] == int(h0 * 1024 / max(h0, w0) + 0.5)
    s = iter(TrainingStream(5, seed=3))
    first = [next(s) for _ in range(12)]
    resumed = iter(TrainingStream(5, seed=3, start=7))
    assert [next(resumed) for _ in range(5)] == first[7:]
    assert sorted(i for i, _ in first[:5]) == list(range(5))  # one permutation per pass


# ---------------------------------------------------------------------------------------------- bad input
def _mini_json(tmp_path, coco, images, annotations):
    raw = json.loads((coco / "annotations/instances_val2017.json").read_text())
    raw["images"], raw["annotations"] = images, annotations
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(raw))
    return p, raw


def test_missing_annotation_file(tmp_path, coco):
    with pytest.raises(UserError, match="annotation file not found") as e:
        CocoInstances(tmp_path / "nope.json", coco / "val2017", train=True)
    assert "nope.json" in str(e.value) and "\n" not in str(e.value)


def test_malformed_json(tmp_path, coco):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        CocoInstances(p, coco / "val2017", train=False)
    p.write_text(json.dumps({"images": []}))
    with pytest.raises(UserError, match="no 'annotations' list"):
        CocoInstances(p, coco / "val2017", train=False)


def test_missing_and_corrupt_image(tmp_path, coco):
    raw = json.loads((coco / "annotations/instances_val2017.json").read_text())
    im = dict(raw["images"][0])
    anns = [a for a in raw["annotations"] if a["image_id"] == im["id"]]
    missing = dict(im, file_name="does_not_exist.jpg")
    p, _ = _mini_json(tmp_path, coco, [missing], anns)
    with pytest.raises(UserError, match="does_not_exist.jpg: image file not found"):
        CocoInstances(p, coco / "val2017", train=False)
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    (img_dir / im["file_name"]).write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    p, _ = _mini_json(tmp_path, coco, [im], anns)
    ds = CocoInstances(p, img_dir, train=False)
    item = ds[0]
    assert item["error"] and im["file_name"] in item["error"] and "cannot decode image" in item["error"]
    with pytest.raises(UserError, match="cannot decode image"):
        ds.load(0)
    # size mismatch between json and file (detectron2 SizeMismatchError)
    shutil.copy(coco / "val2017" / raw["images"][1]["file_name"], img_dir / im["file_name"])
    if (raw["images"][1]["height"], raw["images"][1]["width"]) != (im["height"], im["width"]):
        with pytest.raises(UserError, match="says"):
            CocoInstances(p, img_dir, train=False).load(0)


def test_degenerate_boxes_and_invalid_polygons(tmp_path, coco):
    raw = json.loads((coco / "annotations/instances_val2017.json").read_text())
    im = raw["images"][0]
    good = [a for a in raw["annotations"] if a["image_id"] == im["id"]]
    degenerate = dict(good[0], id=10**9, bbox=[50.0, 60.0, 0.0, 0.0],
                      segmentation=[[50.0, 60.0, 50.0, 60.0, 50.0, 60.0]])   # zero-area box and polygon
    two_points = dict(good[0], id=10**9 + 1, segmentation=[[1.0, 1.0, 5.0, 5.0]])  # < 3 points: dropped
    p, _ = _mini_json(tmp_path, coco, [im], good + [degenerate, two_points])
    ds = CocoInstances(p, coco / "val2017", train=True, transform=LSJ(128, (1.0, 1.0), 0.0))
    assert ds.num_dropped_annotations == 1          # detectron2 load_coco_json drops invalid polygons
    item = ds[(0, 0)]
    # the degenerate instance has an empty mask: removed by filter_empty_instances after LSJ
    assert item["target"]["boxes"].shape[0] <= len(good)
    assert bool(((item["target"]["boxes"][:, 2:] - item["target"]["boxes"][:, :2]) > 0).all())


def test_empty_dataset(tmp_path, coco):
    p, _ = _mini_json(tmp_path, coco, [], [])
    with pytest.raises(UserError, match="no usable images"):
        CocoInstances(p, coco / "val2017", train=False)
    raw = json.loads((coco / "annotations/instances_val2017.json").read_text())
    p, _ = _mini_json(tmp_path, coco, raw["images"][:2], [])   # images but no instances: nothing to train on
    with pytest.raises(UserError, match="no image has a non-crowd annotation"):
        CocoInstances(p, coco / "val2017", train=True)
    assert len(CocoInstances(p, coco / "val2017", train=False)) == 2


def test_unknown_category(tmp_path, coco):
    raw = json.loads((coco / "annotations/instances_val2017.json").read_text())
    a = dict(raw["annotations"][0], category_id=12)   # 12 is one of COCO's unused ids
    p, _ = _mini_json(tmp_path, coco, raw["images"], [a])
    with pytest.raises(UserError, match="unknown category_id 12"):
        CocoInstances(p, coco / "val2017", train=False)
