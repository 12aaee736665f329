"""benchmarks.loader_speed (decode paths' throughput) and the new benchmark options' bad-input errors."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import loader_speed, pretrain_speed


def test_loader_speed_measures_each_path_and_checks_pixels(data_root, tmp_path):
    out = tmp_path / "ls.json"
    doc = loader_speed.main(["--data-root", str(data_root), "--paths", "cpu-pil,cpu-torchvision", "--workers", "0",
                             "--images", "16", "--batch-size", "8", "--per-worker-images", "10",
                             "--input-size", "32", "--check-pixels", "--out", str(out)])
    assert json.loads(out.read_text())["paths"].keys() == {"cpu-pil", "cpu-torchvision"}
    for p in ("cpu-pil", "cpu-torchvision"):
        r = doc["paths"][p]
        assert r["per_worker_img_s"] > 0 and r["cpu_img_s"] > 0 and r["total_img_s"]["0"] > 0
        assert len(r["img_s_rounds"]) == 5
    assert doc["paths"]["cpu-pil"]["vs_pil"] == 1.0
    px = doc["pixels_vs_pil"]["cpu-torchvision"]
    assert px["images"] == 200 and px["max_abs"] == 0 and px["identical_images"] == 200


@pytest.mark.parametrize("args,msg", [
    (["--paths", "cpu-pil,nvjpeg"], "--paths 'nvjpeg': expected one of cpu-pil"),
    (["--workers", "two"], "--workers 'two': expected a comma list of integers"),
    (["--images", "10", "--batch-size", "8"], "--images 10: needs at least two batches of --batch-size 8"),
    (["--workers", "-1"], "--workers must be ≥ 0"),
] + ([(["--paths", "gpu"], "--paths gpu: CUDA is not available on this machine")]
     if not torch.cuda.is_available() else []))
def test_loader_speed_bad_options(data_root, tmp_path, capsys, args, msg):
    out = tmp_path / "ls.json"
    with pytest.raises(SystemExit) as exc:
        loader_speed.main(["--data-root", str(data_root), *args, "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {msg}") and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("args,msg", [
    (["--compile", "maybe"], "--compile: expected True, False or a torch.compile backend name"),
    (["--peak-tflops", "0"], "--peak-tflops must be > 0, got 0.0"),
] + ([(["--measure-peak"], "--measure-peak: times a bf16 matmul on CUDA; the device is cpu")]
     if not torch.cuda.is_available() else []))
def test_pretrain_speed_bad_new_options(tmp_path, capsys, args, msg):
    out = tmp_path / "ps.json"
    with pytest.raises(SystemExit) as exc:
        pretrain_speed.main(["--device", "cpu", *args, "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {msg}") and err.count("\n") == 1
    assert not out.exists()


def test_pretrain_speed_reports_mfu_from_counted_flops(tmp_path):
    """MFU = counted fwd+bwd FLOPs per image x measured img/s / the given peak, per variant."""
    out = tmp_path / "ps.json"
    doc = pretrain_speed.main(["--device", "cpu", "--sizes", "vit_tiny_patch16@32", "--batch-size", "2",
                               "--steps", "1", "--warmup", "0", "--variants", "mae,crossmae-0.25", "--no-memory",
                               "--peak-tflops", "0.5", "--out", str(out)])
    assert doc["peak_tflops"] == {"spec": 0.5} and json.loads(out.read_text())["complete"] is True
    rows = doc["results"][0]["rows"]
    assert [r["variant"] for r in rows] == ["mae", "crossmae-0.25"]
    for r in rows:
        achieved = r["gflops_total_fwdbwd"] * 1e9 * r["img_per_s"] / 1e12
        assert r["model_tflops_s"] == pytest.approx(achieved)
        assert r["mfu_vs_spec"] == pytest.approx(achieved / 0.5)
    assert rows[0]["gflops_total_fwdbwd"] > rows[1]["gflops_total_fwdbwd"] > 0
