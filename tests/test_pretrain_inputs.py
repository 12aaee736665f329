"""Pretraining: bad input fails with one line before any work; lr rules; data pipeline; configs."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from crossmae import pretrain
from crossmae.data import IMAGENET_MEAN, build_pretrain_dataset
from crossmae.lr_sched import adjust_learning_rate, lr_at, scaled_lr
from crossmae.utils import load_config


def fail(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        pretrain.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("opts, expected", [
    (["model=crossmae_vit_gigantic_patch16"],
     "model 'crossmae_vit_gigantic_patch16': unknown architecture 'vit_gigantic_patch16'"),
    (["kept_mask_ratio=0.9"], "0 < γ ≤ mask ratio"),
    (["kept_mask_ratio=0.0"], "0 < γ ≤ mask ratio"),
    (["mask_ratio=1.0"], "mask ratio must be in (0, 1)"),
    (["input_size=60"], "input_size: 60 is not a positive multiple of the patch size 16"),
    (["model=mae_vit_tiny_patch16", "kept_mask_ratio=0.25"], "MAE predicts every masked patch"),
    (["total_batch_size=20", "batch_size=8"], "not a multiple of batch_size 8"),
    (["amp='fp8'"], "config amp"),
    (["no_such_key=1"], "unknown key 'no_such_key'"),
    (["data_subset=4", "batch_size=8", "total_batch_size=8"], "fewer than one effective batch"),
])
def test_bad_config_fails_before_any_work(tmp_path, data_root, capsys, opts, expected):
    out = tmp_path / "out"
    msg = fail(["--config", "smoke_crossmae", "--data-root", str(data_root), "--output-dir", str(out),
                "--cfg-options", *opts], capsys)
    assert expected in msg
    assert not out.exists()


def test_unknown_preset_lists_presets(tmp_path, capsys):
    msg = fail(["--config", "paper_nope", "--output-dir", str(tmp_path / "o")], capsys)
    assert "config not found" in msg and "paper_crossmae_vit_base" in msg and "smoke_mae" in msg


def _data(tmp_path: Path, data_root: Path, n: int = 3) -> Path:
    folder = tmp_path / "data" / "imagenet" / "train"
    for src in sorted((data_root / "imagenet" / "train").glob("*/*.JPEG"))[:n]:
        (folder / src.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / src.parent.name / src.name)
    return folder


@pytest.mark.parametrize("case", ["missing_root", "missing_train", "no_classes", "class_without_images",
                                  "corrupt_verified"])
def test_bad_data_fails_before_any_work(tmp_path, data_root, capsys, case):
    root = tmp_path / "data"
    train = root / "imagenet" / "train"
    expected = {"missing_root": "data root does not exist", "missing_train": "folder does not exist",
                "no_classes": "no class sub-folders", "class_without_images": "no usable images",
                "corrupt_verified": "cannot decode image"}[case]
    if case == "missing_train":
        root.mkdir()
    elif case == "no_classes":
        train.mkdir(parents=True)
        (train / "README.txt").write_text("no classes")
    elif case == "class_without_images":
        (train / "n000").mkdir(parents=True)
        (train / "n000" / "notes.txt").write_text("x")
    elif case == "corrupt_verified":
        _data(tmp_path, data_root)
        bad = train / "n01440764" / "broken.JPEG"
        bad.write_bytes(b"definitely not a jpeg")
        expected = f"{bad}: cannot decode image"
    out = tmp_path / "out"
    msg = fail(["--config", "smoke_crossmae", "--data-root", str(root), "--output-dir", str(out),
                "--cfg-options", "verify_images=True"], capsys)
    assert expected in msg
    assert not out.exists()


def test_cuda_requested_without_cuda(tmp_path, data_root, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    msg = fail(["--config", "smoke_crossmae", "--data-root", str(data_root), "--output-dir", str(tmp_path / "o"),
                "--device", "cuda"], capsys)
    assert "CUDA is not available" in msg


def test_lr_rule_paper_values():
    # App. A.6: lr = γ · blr · batch / (256 · p)
    assert scaled_lr(1.5e-4, 4096, 0.75, 0.25) == pytest.approx(8e-4)
    assert scaled_lr(1.5e-4, 4096, 0.75, 0.75) == pytest.approx(2.4e-3)
    assert scaled_lr(1.5e-4, 4096, 0.75, None) == pytest.approx(2.4e-3)  # MAE
    assert scaled_lr(1.5e-4, 4096, 0.75, 0.25, scale_by_ratio=False) == pytest.approx(2.4e-3)


def test_warmup_cosine_schedule():
    lr, warm, total = 1.0, 40, 800
    assert lr_at(0, lr, 0.0, warm, total) == 0.0
    assert lr_at(20, lr, 0.0, warm, total) == pytest.approx(0.5)
    assert lr_at(40, lr, 0.0, warm, total) == pytest.approx(1.0)
    assert lr_at(420, lr, 0.1, warm, total) == pytest.approx(0.55)
    assert lr_at(800, lr, 0.1, warm, total) == pytest.approx(0.1)
    vals = [lr_at(e / 10, lr, 0.0, warm, total) for e in range(400, 8000)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone decay after warmup
    opt = torch.optim.SGD([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)], "lr_scale": 0.5}], lr=9.0)
    got = adjust_learning_rate(opt, 20, lr, 0.0, warm, total)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(got), pytest.approx(got / 2)]


def test_dataset_transform_and_greyscale(data_root):
    ds = build_pretrain_dataset(data_root / "imagenet" / "train", 32, subset=10)
    assert len(ds) == 10 and len({c for _, c in ds.samples}) == 10
    x, _ = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # a greyscale photo becomes 3 identical channels before normalisation
    from PIL import Image
    full = build_pretrain_dataset(data_root / "imagenet" / "train", 32)
    grey = [i for i, (p, _) in enumerate(full.samples) if Image.open(p).mode == "L"]
    assert len(grey) == 3
    g, _ = full[grey[0]]
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    raw = g * std + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)


@pytest.mark.parametrize("name, model, gamma, depth, lr_factor", [
    ("paper_crossmae_vit_base", "crossmae_vit_base_patch16", 0.75, 12, 1.0),
    ("paper_crossmae_vit_base_pr025", "crossmae_vit_base_patch16", 0.25, 12, 1 / 3),
    ("paper_mae_vit_base", "mae_vit_base_patch16", None, 8, 1.0),
    ("paper_crossmae_vit_large", "crossmae_vit_large_patch16", 0.75, 12, 1.0),
])
def test_paper_presets_hold_the_recipe(name, model, gamma, depth, lr_factor):
    cfg = load_config(name, None, pretrain.PRESET_DIR)
    assert (cfg.model, cfg.kept_mask_ratio, cfg.decoder_depth) == (model, gamma, depth)
    assert (cfg.total_batch_size, cfg.epochs, cfg.warmup_epochs, cfg.blr) == (4096, 800, 40, 1.5e-4)
    assert (cfg.weight_decay, tuple(cfg.betas), cfg.norm_pix_loss, cfg.input_size) == (0.05, (0.9, 0.95), True, 224)
    plan = pretrain.plan_from_config(cfg)
    lr = scaled_lr(cfg.blr, cfg.total_batch_size, cfg.mask_ratio, plan.kept_mask_ratio)
    assert lr == pytest.approx(1.5e-4 * 16 * lr_factor)
    assert pretrain.accumulation(cfg, world=1) * cfg.batch_size == 4096
    assert not math.isnan(lr)


@pytest.mark.parametrize("flag", ["--resume", "--backbone"])
def test_missing_checkpoint_file_fails_before_any_work(tmp_path, data_root, capsys, flag):
    out = tmp_path / "out"
    msg = fail(["--config", "smoke_crossmae", "--data-root", str(data_root), "--output-dir", str(out),
                flag, str(tmp_path / "nope.pth")], capsys)
    expected = {"--resume": f"--resume {tmp_path / 'nope.pth'}: checkpoint file not found",
                "--backbone": f"{tmp_path / 'nope.pth'}: --backbone checkpoint not found"}[flag]  # as every command
    assert expected in msg
    assert not out.exists()
