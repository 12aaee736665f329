"""The leaderboard's paper column says which statistic each reference value is (final or best epoch)
and compares like with like (issue 19): the paper's classification numbers are the best evaluated
epoch (MAE's main_finetune.py / main_linprobe.py "Max accuracy"), the runs' ``top1`` is the final
epoch and ``top1_best`` the best, so only ``top1_best`` gets them; COCO and ADE20K numbers are the
final model's."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmarks import reference
from benchmarks.leaderboard import build
from transfer.classification.common import final_metrics

B = "vit_base_patch16"


def test_every_reference_value_names_its_statistic():
    assert {e["statistic"] for e in reference.REFERENCE} == {"final", "best"}
    for e in reference.REFERENCE:
        assert e["statistic"] == ("best" if e["protocol"] in ("finetune", "linprobe") else "final"), e


def test_lookup_compares_like_with_like():
    assert reference.statistic_of("top1_best") == ("top1", "best")
    assert reference.statistic_of("top1") == ("top1", "final") and reference.statistic_of("APbox") == ("APbox", "final")
    assert reference.lookup("finetune", "finetune", "top1", B, "mae") is None  # final epoch vs best: not compared
    assert reference.lookup("finetune", "finetune", "top1_best", B, "mae")["value"] == 83.3
    assert reference.lookup("linprobe", "linprobe_mae", "top1_best", B, "mae")["value"] == 65.1
    assert reference.lookup("coco", "vitdet", "APbox", B, "mae")["value"] == 51.2
    assert reference.lookup("coco", "vitdet", "APbox_best", B, "mae") is None
    assert reference.lookup("ade20k", "upernet", "mIoU", B, "crossmae", 0.75)["value"] == 48.1


def test_classification_metrics_record_final_and_best_epoch():
    hist = [{"epoch": 0, "top1": 50.0, "top5": 80.0}, {"epoch": 1, "train_loss": 1.0},
            {"epoch": 2, "top1": 61.0, "top5": 85.0}, {"epoch": 3, "top1": 58.5, "top5": 84.0}]
    assert final_metrics(hist) == {"top1": 58.5, "top5": 84.0, "top1_best": 61.0}


def _run(root: Path, name: str, method: str, gamma: float, task: str, protocol: str, metrics: dict) -> None:
    d = root / name / task
    d.mkdir(parents=True)
    (d / "task.json").write_text(json.dumps({"spec": {"backbone_name": name, "config": "paper_vit_base"}}))
    sha = (name[0] * 64)
    (d / "metrics.json").write_text(json.dumps({
        "task": task, "protocol": protocol, "metrics": metrics, "backbone_sha256": sha, "seed": 0,
        "backbone_report": {"sha256": sha, "arch": B, "meta": {"method": method, "mask_ratio": 0.75,
                                                               "kept_mask_ratio": gamma}}}))


def test_paper_column_is_labelled_and_like_with_like(tmp_path):
    for name, method, gamma, (top1, best, box) in (("mae", "mae", 0.75, (83.0, 83.2, 50.0)),
                                                   ("cmae", "crossmae", 0.25, (83.1, 83.6, 51.0))):
        _run(tmp_path, name, method, gamma, "finetune", "finetune", {"top1": top1, "top1_best": best})
        _run(tmp_path, name, method, gamma, "coco", "vitdet", {"APbox": box})
    paths = build(tmp_path, resamples=10)
    rows = {(r["backbone"], r["metric"]): r for r in csv.DictReader(paths["csv"].open())}
    assert (rows["mae", "top1"]["reference"], rows["mae", "top1"]["reference_statistic"]) == ("", "")
    assert (rows["mae", "top1_best"]["reference"], rows["mae", "top1_best"]["reference_statistic"]) \
        == ("83.3", "best epoch")
    assert float(rows["mae", "top1_best"]["diff_to_reference"]) == pytest.approx(83.2 - 83.3)
    assert (rows["cmae", "top1_best"]["reference"], rows["cmae", "APbox"]["reference"]) == ("83.5", "52.1")
    assert rows["cmae", "APbox"]["reference_statistic"] == "final epoch"
    pairs = {p["metric"]: p for p in csv.DictReader(paths["paired"].open())}
    assert (pairs["top1"]["reference_diff"], pairs["top1"]["reference_statistic"]) == ("", "")
    assert float(pairs["top1_best"]["reference_diff"]) == pytest.approx(83.3 - 83.5)
    assert pairs["top1_best"]["reference_statistic"] == "best epoch"
    assert float(pairs["APbox"]["reference_diff"]) == pytest.approx(51.2 - 52.1)
    md = paths["md"].read_text()
    assert "paper (statistic)" in md and "mae: 83.30 (best epoch)" in md and "mae: 51.20 (final epoch)" in md
    assert "| -0.20 (best epoch) |" in md and "| -0.90 (final epoch) |" in md
    html = paths["html"].read_text()
    assert "<th>paper MAE − CrossMAE</th>" in html and "-0.20 (best epoch)" in html
