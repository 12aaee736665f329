"""Training on the real coco_semseg copy (ADE20K layout, 80 classes): loss goes down, resume is exact,
the command writes its outputs, and bad input ends with a one-line error and no metrics.json."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from crossmae.utils import load_config
from transfer import ade20k
from transfer.seg.data import SegTrainDataset
from transfer.seg.testing import COCO_SEMSEG_SUBDIR, FAST_OPTIONS, require_dir, tiny_checkpoint



@pytest.fixture(scope="module")
def coco_root(data_root):
    return require_dir(data_root / COCO_SEMSEG_SUBDIR)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "mae_tiny.pth", "mae")


def test_few_iterations_reduce_the_loss(coco_root, ckpt):
    torch.manual_seed(0)
    cfg = load_config("smoke", None, ade20k.PRESET_DIR)
    model = ade20k.build_model(cfg)
    ade20k.load_backbone_weights(model, str(ckpt), cfg)
    ds = SegTrainDataset(coco_root, "training", 80, seed=0, crop_size=(64, 64), scale=(256, 64))
    batch = [ds[i] for i in range(4)]
    x = torch.stack([b[0] for b in batch])
    y = torch.stack([b[1] for b in batch])
    opt = ade20k.build_optimizer(model, cfg)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return float(model.loss(x, y)["loss"])

    before = eval_loss()
    model.train()
    for _ in range(8):
        loss = model.loss(x, y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


def _run(out, ckpt, *extra, opts=()):
    argv = ["--backbone", str(ckpt), "--config", "smoke", "--output-dir", str(out),
            "--cfg-options", *FAST_OPTIONS, "schedule.max_iters=4", "schedule.warmup_iters=2",
            "train.checkpoint_period=2", *opts, *extra]
    return ade20k.main(argv)


def test_run_writes_outputs_and_resume_is_exact(coco_root, ckpt, tmp_path, optimizer_steps):
    optimizer_steps.reset()
    full = _run(tmp_path / "full", ckpt)
    assert optimizer_steps.n == 4  # one optimizer step per iteration
    assert set(full["metrics"]) == {"mIoU", "mAcc", "aAcc"}
    saved = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert saved["task"] == "ade20k" and saved["iters"] == 4
    assert len(saved["per_class"]["IoU"]) == 80 and "person" in saved["per_class"]["IoU"]
    assert saved["backbone_report"]["n_loaded"] == 4 * 12 + 4
    for f in ("config.py", "log.txt", "checkpoint-latest.pth"):
        assert (tmp_path / "full" / f).is_file()
    assert len(list((tmp_path / "full" / "overlays").glob("*.png"))) == 1

    part = _run(tmp_path / "part", ckpt, "--stop-after", "2")
    assert part == {"stopped_at": 2} and not (tmp_path / "part" / "metrics.json").exists()
    assert torch.load(tmp_path / "part" / "checkpoint-latest.pth")["iter"] == 2
    optimizer_steps.reset()
    resumed = _run(tmp_path / "part", ckpt)
    # the resumed process started at the checkpoint's iteration 2 and did only iterations 2..3
    # (a restart would do 4 and, deterministic, reach the same weights)
    assert optimizer_steps.n == 2
    assert torch.load(tmp_path / "part" / "checkpoint-latest.pth")["iter"] == 4
    a = torch.load(tmp_path / "full" / "checkpoint-latest.pth")["model"]
    b = torch.load(tmp_path / "part" / "checkpoint-latest.pth")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["metrics"] == full["metrics"]


def _expect_user_error(capsys, argv, pattern):
    with pytest.raises(SystemExit) as e:
        ade20k.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()  # (log lines go to stderr too)
    errors = [ln for ln in err if ln.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert pattern in errors[0], errors[0]


def test_bad_input_from_the_command_line(coco_root, ckpt, tmp_path, capsys):
    root = tmp_path / "data" / COCO_SEMSEG_SUBDIR
    shutil.copytree(coco_root, root)
    ann = sorted((root / "annotations" / "validation").glob("*.png"))[1]
    a = np.array(Image.open(ann))
    a[:4, :4] = 81
    Image.fromarray(a).save(ann)
    base = ["--backbone", str(ckpt), "--config", "smoke", "--data-root", str(tmp_path / "data"),
            "--cfg-options", *FAST_OPTIONS, "schedule.max_iters=1"]
    out = tmp_path / "out"
    _expect_user_error(capsys, base + ["--output-dir", str(out)], f"{ann.name}: label value 81 is outside the 80 classes")
    assert not (out / "metrics.json").exists()
    first = sorted((root / "images" / "validation").glob("*.jpg"))[0]
    first.unlink()
    _expect_user_error(capsys, base + ["--output-dir", str(tmp_path / "o2")],
                       f"{first.stem}.png: has no matching image")
    shutil.rmtree(root / "annotations" / "validation")
    _expect_user_error(capsys, base + ["--output-dir", str(tmp_path / "o3")], "annotations/validation: folder not found")
    _expect_user_error(capsys, base[:2] + ["--config", "smoke", "--output-dir", str(tmp_path / "o4"),
                                           "--data-root", str(tmp_path / "nowhere")], "data root does not exist")
    _expect_user_error(capsys, ["--backbone", str(tmp_path / "missing.pth"), "--config", "smoke",
                                "--output-dir", str(tmp_path / "o5")], "missing.pth: --backbone checkpoint not found")


def test_bad_training_label_in_a_loader_worker(coco_root, ckpt, tmp_path, capsys):
    # 2 training + 2 validation real pairs; both training annotations get an out-of-range value and
    # are read in a DataLoader worker process: the error still reaches the user as one line.
    root = tmp_path / "data" / COCO_SEMSEG_SUBDIR
    for split in ("training", "validation"):
        for sub, ext in (("images", ".jpg"), ("annotations", ".png")):
            (root / sub / split).mkdir(parents=True)
        for ann in sorted((coco_root / "annotations" / split).glob("*.png"))[:2]:
            shutil.copy(coco_root / "images" / split / f"{ann.stem}.jpg", root / "images" / split)
            a = np.array(Image.open(ann))
            if split == "training":
                a[-1, -1] = 90
            Image.fromarray(a).save(root / "annotations" / split / ann.name)
    shutil.copy(coco_root / "objectInfo80.txt", root)
    argv = ["--backbone", str(ckpt), "--config", "smoke", "--data-root", str(tmp_path / "data"),
            "--output-dir", str(tmp_path / "out"), "--cfg-options", *FAST_OPTIONS, "data.num_workers=1"]
    _expect_user_error(capsys, argv, "label value 90 is outside the 80 classes")
    assert not (tmp_path / "out" / "metrics.json").exists()
