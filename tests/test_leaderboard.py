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
from crossmae.utils import UserError, sha256_file


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
            "task": task, "protocol": protocol, "metrics": metrics, "backbone": str(ckpt), "backbone_sha256": sha256_file(ckpt),
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
        # the paper's fine-tune top-1 is MAE's "Max accuracy": compared with the runs' best epoch
        _task(root, "mae", mae, "finetune", "paper_vit_base", seed, {"top1_best": a})
        _task(root, "cmae", cmae, "finetune", "paper_vit_base", seed, {"top1_best": c})
    _task(root, "cmae", cmae, "finetune", "paper_vit_base", 3, None)  # still running: no metrics
    paths = build(root)
    rows = {r["backbone"]: r for r in _rows(paths["csv"])}
    assert set(rows) == {"mae", "cmae"}
    m = rows["mae"]
    assert (m["method"], m["arch"], m["pretrain_epochs"], m["mask_ratio"], m["prediction_ratio"], m["decoder_depth"]) \
        == ("mae", "vit_base_patch16", "800", "0.75", "0.75", "8")
    assert (m["task"], m["protocol"], m["metric"], m["n_seeds"], m["seeds"]) == ("finetune", "finetune", "top1_best", "3", "0 1 2")
    assert float(m["mean"]) == pytest.approx(83.4)
    assert float(m["stderr"]) == pytest.approx(0.4 / math.sqrt(3), rel=1e-5)
    assert float(m["reference"]) == 83.3 and float(m["diff_to_reference"]) == pytest.approx(0.1)
    c = rows["cmae"]
    assert c["method"] == "crossmae" and float(c["reference"]) == 83.5  # the gamma = 0.25 row
    assert float(m["wall_time_s"]) == 3 * 3600.0 and float(m["gpu_hours"]) == 3 * 8.0
    assert m["gpu_type"] == "NVIDIA A100" and m["checkpoint_sha256"] == sha256_file(mae) and m["code_version"] == "v1"
    assert c["checkpoint_sha256"] == sha256_file(cmae)
    pair = _rows(paths["paired"])
    assert len(pair) == 1 and pair[0]["n_pairs"] == "3"
    assert float(pair[0]["diff_mean"]) == pytest.approx((-0.6 + 0.0 - 0.4) / 3)
    assert float(pair[0]["reference_diff"]) == pytest.approx(83.3 - 83.5)
    md = paths["md"].read_text()
    assert "| finetune | finetune | paper\\_vit\\_base | top1\\_best |" in md and "MAE − CrossMAE" in md
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
    assert reference.lookup("inat", "linprobe_mae", "top1_best", "vit_base_patch16", "mae") is None
    assert reference.lookup("inat", "finetune", "top1_best", "vit_base_patch16", "mae")["value"] == 79.8
    assert reference.lookup("linprobe", "linprobe_mae", "top1_best", "vit_base_patch16", "crossmae", 0.25)["value"] == 65.4


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        lb_main([str(tmp_path / "missing")])
    assert e.value.code == 2 and "output folder does not exist" in capsys.readouterr().err
    (tmp_path / "t").mkdir()
    with pytest.raises(SystemExit) as e:
        lb_main([str(tmp_path / "t"), "--out", str(tmp_path / "x.txt")])
    assert e.value.code == 2 and "must end in .csv" in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists() and list((tmp_path / "t").iterdir()) == []


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["parent_is_a_file", "read_only_folder", "output_is_a_folder"])
def test_unwritable_out_is_one_line_exit_2_and_writes_nothing(tmp_path, ckpts, capsys, case):
    mae, _ = ckpts
    root = tmp_path / "out"
    _task(root, "mae", mae, "finetune", "smoke", 0, {"top1": 50.0})
    if case == "parent_is_a_file":
        (tmp_path / "afile").write_text("x")
        out, what = tmp_path / "afile" / "lb.csv", "is not a folder"
    elif case == "read_only_folder":
        out, what = Path("/sys/lb.csv"), "leaderboard output is not writable (/sys: "  # read-only even for root
    else:
        (tmp_path / "res").mkdir()
        (tmp_path / "res" / "lb.md").mkdir()  # the Markdown would land on a folder
        out, what = tmp_path / "res" / "lb.csv", "lb.md: leaderboard output is a folder"
    before_root, before_tmp = _snapshot(root), sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as e:
        lb_main([str(root), "--out", str(out), "--resamples", "10"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: --out {out}: ") and what in err
    assert len(err.strip().splitlines()) == 1
    assert _snapshot(root) == before_root and sorted(str(p) for p in tmp_path.rglob("*")) == before_tmp


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]", '{"task": "finetune"}', '{"task": 3, "metrics": {}}'])
def test_malformed_metrics_file_is_skipped_with_a_warning(tmp_path, ckpts, capsys, bad):
    mae, cmae = ckpts
    root = tmp_path / "out"
    _task(root, "mae", mae, "finetune", "smoke", 0, {"top1": 50.0})
    broken = _task(root, "cmae", cmae, "finetune", "smoke", 0, {"top1": 60.0}) / "metrics.json"
    broken.write_text(bad)
    paths = build(root, resamples=10)
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and str(broken) in warnings[0] and "skipped" in warnings[0]
    rows = _rows(paths["csv"])
    assert [(r["backbone"], r["mean"]) for r in rows] == [("mae", "50")]
    assert all(Path(p).is_file() for p in paths.values())


def test_backbones_are_identified_by_sha256_never_by_file_name(tmp_path):
    root = tmp_path / "out"
    # two different checkpoints, both called checkpoint-3.pth, evaluated as "seeds" 0 and 1, no task.json
    a = _ckpt(_mk(tmp_path / "runA") / "checkpoint-3.pth", model="mae_vit_base_patch16", epochs=4, mask_ratio=0.75,
              decoder_depth=8)
    b = _ckpt(_mk(tmp_path / "runB") / "checkpoint-3.pth", model="mae_vit_base_patch16", epochs=4, mask_ratio=0.75,
              kept_mask_ratio=0.25, decoder_depth=2, cross_mae=True)
    # the same bytes as a under another name and folder: one backbone
    a2 = tmp_path / "copy-of-a.pth"
    a2.write_bytes(a.read_bytes())
    _task(root, "x", a, "finetune", "smoke", 0, {"top1": 10.0}, with_spec=False)
    _task(root, "y", b, "finetune", "smoke", 1, {"top1": 20.0}, with_spec=False)
    _task(root, "z", a2, "finetune", "smoke", 2, {"top1": 30.0}, with_spec=False)
    rows = _rows(build(root, resamples=10)["csv"])
    by_sha = {r["checkpoint_sha256"]: r for r in rows}
    assert set(by_sha) == {sha256_file(a), sha256_file(b)}
    ra, rb = by_sha[sha256_file(a)], by_sha[sha256_file(b)]
    assert (ra["n_seeds"], ra["seeds"], float(ra["mean"])) == ("2", "0 2", 20.0)
    assert (rb["n_seeds"], rb["seeds"], float(rb["mean"])) == ("1", "1", 20.0)
    assert (ra["method"], rb["method"]) == ("mae", "crossmae")
    # derived names: method, arch, epochs, p, γ, decoder depth and the sha prefix
    assert ra["backbone"] == f"mae-vit_base_patch16-ep4-p0.75-d8-{sha256_file(a)[:8]}"
    assert rb["backbone"] == f"crossmae-vit_base_patch16-ep4-p0.75-γ0.25-d2-{sha256_file(b)[:8]}"


def test_one_suite_name_for_two_checkpoints_is_never_merged(tmp_path, ckpts):
    mae, cmae = ckpts
    root = tmp_path / "out"
    _task(root / "s1", "mae", mae, "finetune", "smoke", 0, {"top1": 10.0})
    _task(root / "s2", "mae", cmae, "finetune", "smoke", 0, {"top1": 20.0})  # same NAME, other checkpoint
    rows = _rows(build(root, resamples=10)["csv"])
    names = sorted(r["backbone"] for r in rows)
    assert names == sorted([f"mae@{sha256_file(mae)[:8]}", f"mae@{sha256_file(cmae)[:8]}"])
    assert all(r["n_seeds"] == "1" for r in rows)


def test_a_second_result_for_one_seed_is_reported_not_averaged(tmp_path, ckpts, capsys):
    mae, _ = ckpts
    root = tmp_path / "out"
    _task(root / "s1", "mae", mae, "finetune", "smoke", 0, {"top1": 10.0, "top5": 50.0})
    again = _task(root / "s2", "mae", mae, "finetune", "smoke", 0, {"top1": 30.0, "top5": 70.0})
    rows = _rows(build(root, resamples=10)["csv"])
    assert [(r["metric"], r["n_seeds"], r["mean"]) for r in rows] == [("top1", "1", "10"), ("top5", "1", "50")]
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and str(again / "metrics.json") in warnings[0] and "seed 0" in warnings[0]


def test_one_checkpoint_under_two_suite_names_stays_two_rows(tmp_path, ckpts):
    mae, _ = ckpts
    root = tmp_path / "out"
    _task(root, "a", mae, "finetune", "smoke", 0, {"top1": 10.0})
    _task(root, "b", mae, "finetune", "smoke", 0, {"top1": 20.0})
    rows = _rows(build(root, resamples=10)["csv"])
    assert [(r["backbone"], r["n_seeds"], r["mean"], r["checkpoint_sha256"]) for r in rows] == [
        ("a", "1", "10", sha256_file(mae)), ("b", "1", "20", sha256_file(mae))]


def _mk(d: Path) -> Path:
    d.mkdir(parents=True)
    return d
