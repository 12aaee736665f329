"""The leaderboard: built only from finished metrics files, aggregated over seeds, paired, referenced."""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import reference
from benchmarks.leaderboard import build, main as lb_main, meta_from_args, pretrain_meta
from crossmae.utils import UserError


def _ckpt(path: Path, **args) -> Path:
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(**args)}, path)
    return path


@pytest.fixture
def ckpts(tmp_path):
    # official-CrossMAE style args: model name without "cross", the --cross_mae flag decides
    mae = _ckpt(tmp_path / "mae.pth", model="mae_vit_base_patch16", epochs=800, mask_ratio=0.75,
                kept_mask_ratio=0.75, decoder_depth=8, cross_mae=False)
    cmae = _ckpt(tmp_path / "cmae.pth", model="mae_vit_base_patch16", epochs=800, mask_ratio=0.75,
                 kept_mask_ratio=0.25, decoder_depth=12, cross_mae=True, weight_fm=True)
    return mae, cmae


def _task(root: Path, backbone: str, ckpt: Path, task: str, config: str, seed: int, metrics: dict | None,
          protocol: str = "finetune", with_spec: bool = True) -> Path:
    d = root / backbone / f"{task}-{config}" / f"seed{seed}"
    d.mkdir(parents=True)
    if with_spec:
        (d / "task.json").write_text(json.dumps({"spec": {"id": str(d.relative_to(root)), "backbone_name": backbone,
                                                          "task": task, "config": config, "seed": seed}}))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps({
            "task": task, "protocol": protocol, "metrics": metrics, "backbone": str(ckpt), "backbone_sha256": "ab" * 32,
            "config_hash": "c0ffee", "seed": seed, "epochs": 100, "wall_time_s": 3600.0, "device": "NVIDIA A100",
            "num_gpus": 8, "code_version": "v1"}))
    return d


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_meta_from_official_and_project_args():
    m = meta_from_args(argparse.Namespace(model="mae_vit_base_patch16", cross_mae=True, kept_mask_ratio=0.25,
                                          mask_ratio=0.75, decoder_depth=12, epochs=800))
    assert (m["method"], m["arch"], m["prediction_ratio"], m["decoder_depth"]) == ("crossmae", "vit_base_patch16", 0.25, 12)
    m = meta_from_args(argparse.Namespace(model="mae_vit_large_patch16", mask_ratio=0.75, kept_mask_ratio=0.75))
    assert (m["method"], m["arch"], m["prediction_ratio"]) == ("mae", "vit_large_patch16", 0.75)
    m = meta_from_args(argparse.Namespace(model="crossmae_vit_tiny_patch16", mask_ratio=0.75, kept_mask_ratio=0.25))
    assert (m["method"], m["arch"]) == ("crossmae", "vit_tiny_patch16")


def test_pretrain_meta_refuses_a_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        pretrain_meta(tmp_path / "none.pth")


def test_rows_seeds_reference_and_paired(tmp_path, ckpts):
    mae, cmae = ckpts
    root = tmp_path / "out"
    for seed, (a, c) in enumerate([(83.0, 83.6), (83.4, 83.4), (83.8, 84.2)]):
        _task(root, "mae", mae, "finetune", "paper_vit_base", seed, {"top1": a})
        _task(root, "cmae", cmae, "finetune", "paper_vit_base", seed, {"top1": c})
    _task(root, "cmae", cmae, "finetune", "paper_vit_base", 3, None)  # still running: no metrics
    paths = build(root)
    rows = {r["backbone"]: r for r in _rows(paths["csv"])}
    assert set(rows) == {"mae", "cmae"}
    m = rows["mae"]
    assert (m["method"], m["arch"], m["pretrain_epochs"], m["mask_ratio"], m["prediction_ratio"], m["decoder_depth"]) \
        == ("mae", "vit_base_patch16", "800", "0.75", "0.75", "8")
    assert (m["task"], m["protocol"], m["metric"], m["n_seeds"], m["seeds"]) == ("finetune", "finetune", "top1", "3", "0 1 2")
    assert float(m["mean"]) == pytest.approx(83.4)
    assert float(m["stderr"]) == pytest.approx(0.4 / math.sqrt(3), rel=1e-5)
    assert float(m["reference"]) == 83.3 and float(m["diff_to_reference"]) == pytest.approx(0.1)
    c = rows["cmae"]
    assert c["method"] == "crossmae" and float(c["reference"]) == 83.5  # the gamma = 0.25 row
    assert float(m["wall_time_s"]) == 3 * 3600.0 and float(m["gpu_hours"]) == 3 * 8.0
    assert m["gpu_type"] == "NVIDIA A100" and m["checkpoint_sha256"] == "ab" * 32 and m["code_version"] == "v1"
    pair = _rows(paths["paired"])
    assert len(pair) == 1 and pair[0]["n_pairs"] == "3"
    assert float(pair[0]["diff_mean"]) == pytest.approx((-0.6 + 0.0 - 0.4) / 3)
    assert float(pair[0]["reference_diff"]) == pytest.approx(83.3 - 83.5)
    md = paths["md"].read_text()
    assert "| finetune | finetune | paper_vit_base | top1 |" in md and "MAE − CrossMAE" in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_rebuild_is_idempotent_and_ignores_unfinished_old_and_pretrain(tmp_path, ckpts):
    mae, cmae = ckpts
    root = tmp_path / "out"
    _task(root, "mae", mae, "coco", "smoke", 0, {"APbox": 1.0, "APmask": 0.5}, protocol="vitdet")
    old = _task(root, "mae", mae, "coco", "smoke", 1, {"APbox": 99.0})
    old.rename(old.with_name("seed1.old-20260101T000000"))
    (root / "pretrain" / "mae").mkdir(parents=True)
    (root / "pretrain" / "mae" / "metrics.json").write_text(json.dumps({"task": "pretrain", "metrics": {"loss": 1}}))
    p1 = build(root)
    first = {k: Path(v).read_bytes() for k, v in p1.items() if k != "png"}
    p2 = build(root)
    assert {k: Path(v).read_bytes() for k, v in p2.items() if k != "png"} == first
    rows = _rows(p1["csv"])
    assert sorted(r["metric"] for r in rows) == ["APbox", "APmask"]
    assert all(r["reference"] == "" for r in rows)  # smoke runs are never compared to the paper
    assert rows[0]["stderr"] == "" and rows[0]["n_seeds"] == "1"


def test_metadata_read_from_the_checkpoint_without_task_files(tmp_path, ckpts):
    _, cmae = ckpts
    root = tmp_path / "out"
    _task(root, "x", cmae, "ade20k", "paper_vit_base", 0, {"mIoU": 47.0}, protocol="upernet_ade20k_160k",
          with_spec=False)
    rows = _rows(build(root)["csv"])
    assert rows[0]["method"] == "crossmae" and rows[0]["prediction_ratio"] == "0.25"
    assert float(rows[0]["reference"]) == 47.7  # no config known: compared by task / protocol / arch


def test_reference_never_crosses_protocols():
    assert reference.lookup("inat", "linprobe_mae", "top1", "vit_base_patch16", "mae") is None
    assert reference.lookup("inat", "finetune", "top1", "vit_base_patch16", "mae")["value"] == 79.8
    assert reference.lookup("linprobe", "linprobe_mae", "top1", "vit_base_patch16", "crossmae", 0.25)["value"] == 65.4


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        lb_main([str(tmp_path / "missing")])
    assert e.value.code == 2 and "output folder does not exist" in capsys.readouterr().err
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "metrics.json").write_text("{not json")
    with pytest.raises(UserError, match=r"t/metrics.json: unreadable"):
        build(tmp_path)
    with pytest.raises(UserError, match="must end in .csv"):
        build(tmp_path / "t", tmp_path / "x.txt")
    assert not (tmp_path / "x.txt").exists()
