"""Pretraining engine on the real ImageNet subset: layout, exact resume, divergence, corrupt images."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crossmae import pretrain
from crossmae.checkpoint import LATEST
from crossmae.models import create_model
from crossmae.utils import REPO_ROOT, safe_torch_load, sha256_file

# 16 images, 4 per micro-batch, 2 micro-batches per step: 2 optimizer steps per epoch.
FAST = ["data_subset=16", "batch_size=4", "total_batch_size=8", "num_workers=0", "tensorboard=False",
        "verify_images=False", "log_period=1", "warmup_epochs=1"]




def run(out: Path, data_root: Path, *opts: str, config: str = "smoke_crossmae", extra=()) -> dict:
    return pretrain.main(["--config", config, "--data-root", str(data_root), "--output-dir", str(out),
                          *extra, "--cfg-options", *FAST, *opts])


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_root):
    """An uninterrupted 3-epoch CrossMAE run (TensorBoard on, snapshot every 2 epochs)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("straight")
    metrics = run(out, data_root, "epochs=3", "tensorboard=True", "snapshot_period=2", "deterministic=True")
    return out, metrics


def test_run_writes_official_checkpoint_and_contract_files(straight):
    out, metrics = straight
    names = {p.name for p in out.iterdir()}
    assert {"config.py", "log.txt", "log.jsonl", "metrics.json", LATEST, "checkpoint-1.pth",
            "checkpoint-2.pth"} <= names
    assert "checkpoint-0.pth" not in names  # snapshot_period=2: epochs 1 (2nd) and 2 (final)
    ckpt = safe_torch_load(out / "checkpoint-2.pth")  # weights_only=True must accept it
    assert {"model", "optimizer", "epoch", "scaler", "args"} <= set(ckpt)
    assert ckpt["epoch"] == 2
    a = ckpt["args"]
    assert isinstance(a, argparse.Namespace)
    assert (a.model, a.method, a.arch, a.cross_mae) == ("crossmae_vit_tiny_patch16", "crossmae", "vit_tiny_patch16",
                                                        True)
    assert (a.input_size, a.mask_ratio, a.kept_mask_ratio, a.decoder_depth) == (64, 0.75, 0.25, 2)
    assert a.weight_fm and a.use_input and a.norm_pix_loss and a.use_fm == [-1]
    assert (a.epochs, a.batch_size, a.accum_iter, a.total_batch_size) == (3, 4, 2, 8)
    # lr = blr * 8 / 256 * γ/p
    assert a.lr == pytest.approx(a.blr * 8 / 256 * 0.25 / 0.75, rel=1e-12)
    # the checkpoint's model loads strictly into the architecture its args describe
    model = create_model(a.model, img_size=a.input_size, decoder_depth=a.decoder_depth, use_input=a.use_input,
                         weight_fm=a.weight_fm)
    model.load_state_dict(ckpt["model"], strict=True)
    # 2 optimizer steps per epoch x 3 epochs (accumulation: 16 images / (4 x 2))
    steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {6}

    m = json.loads((out / "metrics.json").read_text())
    assert m == json.loads(json.dumps(metrics))
    for key in ("task", "protocol", "metrics", "backbone", "config_hash", "seed", "epochs", "wall_time_s",
                "device", "num_gpus", "code_version", "images_per_s"):
        assert key in m
    assert (m["task"], m["protocol"], m["epochs"], m["iters"]) == ("pretrain", "smoke_crossmae", 3, 6)
    assert m["checkpoint_sha256"] == sha256_file(out / "checkpoint-2.pth")
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2]
    assert all(x["images"] == 16 for x in lines)
    assert m["metrics"]["loss"] == lines[-1]["loss"]
    log_txt = (out / "log.txt").read_text()
    assert "img/s" in log_txt and "eta" in log_txt
    cfg_txt = (out / "config.py").read_text()
    assert "kept_mask_ratio = 0.25" in cfg_txt and "data_subset = 16" in cfg_txt


def test_tensorboard_scalars(straight):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = straight
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train_loss", "lr", "epoch_loss"} <= tags
    assert len(acc.Scalars("train_loss")) == 6
    lrs = [e.value for e in acc.Scalars("lr")]
    assert lrs[0] == 0.0 and max(lrs) > 0  # warmup starts at 0


def test_parameter_groups_follow_mae(straight):
    """No weight decay on biases and 1-D (norm) parameters; 0.05 on everything else -- cls_token,
    mask_token and wfm.linear.weight included, as both official codes (timm ``add_weight_decay`` with
    no skip list); frozen sin-cos position embeddings are not optimised."""
    out, _ = straight
    ckpt = safe_torch_load(out / LATEST)
    model = create_model("crossmae_vit_tiny_patch16", img_size=64, decoder_depth=2, use_input=True)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = [(n, p) for n, p in params if p.ndim > 1 and not n.endswith(".bias")]
    assert {"cls_token", "mask_token", "wfm.linear.weight"} <= {n for n, _ in decayed}
    groups = {g["weight_decay"]: len(g["params"]) for g in ckpt["optimizer"]["param_groups"]}
    assert groups == {0.0: len(params) - len(decayed), 0.05: len(decayed)}
    # which tensors the decayed group holds: its Adam moments, in model order, have exactly the shapes of
    # the expected list (the (1, 1, 64) tokens and the (2, 5) inter-block weight among them)
    group = next(g for g in ckpt["optimizer"]["param_groups"] if g["weight_decay"] == 0.05)
    shapes = [tuple(ckpt["optimizer"]["state"][i]["exp_avg"].shape) for i in sorted(group["params"])]
    assert shapes == [tuple(p.shape) for _, p in decayed]
    assert ckpt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)


def test_scaler_entry_is_accepted_by_an_enabled_grad_scaler(straight):
    """The official resume (``util/misc.load_model``) feeds ``checkpoint['scaler']`` to an enabled
    GradScaler, which refuses the empty state of a disabled one; our fp32/bf16 checkpoints carry a
    fresh scaler's state instead."""
    out, _ = straight
    entry = safe_torch_load(out / LATEST)["scaler"]
    assert set(entry) == {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        with pytest.raises(RuntimeError, match="The source state dict is empty"):
            torch.amp.GradScaler(device).load_state_dict({})  # what the official resume did with ours
        scaler = torch.amp.GradScaler(device, init_scale=2.0, growth_interval=7)
        scaler.load_state_dict(entry)
        assert scaler.state_dict() == torch.amp.GradScaler(device).state_dict()  # a fresh default scaler
    # an enabled (fp16) scaler's own state is stored as it is
    live = torch.amp.GradScaler("cpu", init_scale=8.0)
    assert pretrain.scaler_entry(live) == live.state_dict() and live.state_dict()["scale"] == 8.0


def test_interrupted_run_resumes_to_identical_losses_and_weights(straight, tmp_path, data_root, monkeypatch,
                                                                 optimizer_steps):
    out_ref, _ = straight
    out = tmp_path / "run"
    real = pretrain.train_one_epoch

    def crash_at_epoch_2(ctx, epoch):
        if epoch == 2:
            raise KeyboardInterrupt("simulated preemption")
        return real(ctx, epoch)

    monkeypatch.setattr(pretrain, "train_one_epoch", crash_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(out, data_root, "epochs=3", "tensorboard=True", "snapshot_period=2", "deterministic=True")
    assert safe_torch_load(out / LATEST)["epoch"] == 1
    first = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in first] == [0, 1]
    assert not (out / "metrics.json").exists()
    # between the two processes' worth of work, disturb every global RNG: resume must not depend on them
    torch.manual_seed(12345)
    torch.rand(7)
    monkeypatch.setattr(pretrain, "train_one_epoch", real)
    optimizer_steps.reset()
    run(out, data_root, "epochs=3", "tensorboard=True", "snapshot_period=2", "deterministic=True")
    # the resumed process started after epoch 1 (its checkpoint) and did only epoch 2: 2 optimizer steps
    # (a restart would redo all 3 epochs, 6 steps, and -- deterministic -- reach the same numbers)
    assert optimizer_steps.n == 2
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2]
    assert lines[:2] == first  # epochs 0-1 are the first process's records, carried over, not redone

    ref = [json.loads(x)["loss"] for x in (out_ref / "log.jsonl").read_text().splitlines()]
    got = [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert got == ref  # exact float equality
    a, b = safe_torch_load(out_ref / "checkpoint-2.pth"), safe_torch_load(out / "checkpoint-2.pth")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert "resumed from" in (out / "log.txt").read_text()
    # the cumulative compute survives the resume: the same totals as the uninterrupted run
    ca, cb = a["compute"], b["compute"]
    assert (cb["epoch"], cb["images_seen"], cb["flops"]) == (ca["epoch"], ca["images_seen"], ca["flops"])
    assert cb["wall_time_s"] == pytest.approx(sum(x["time_s"] for x in lines))


def test_snapshots_record_cumulative_compute(straight):
    """Each snapshot (checkpoint and snapshots.json) carries images seen, wall time, device-hours and
    FLOPs, cumulative and monotone, FLOPs = images x the counted forward+backward FLOPs per image."""
    from crossmae.checkpoint import read_snapshots
    from crossmae.compute import flops_per_image
    out, metrics = straight
    listed = read_snapshots(out)
    assert [e["step"] for e in listed] == [1, 2] and [e["file"] for e in listed] == ["checkpoint-1.pth",
                                                                                   "checkpoint-2.pth"]
    hist = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    model = create_model("crossmae_vit_tiny_patch16", img_size=64, decoder_depth=2, weight_fm=True, use_fm=[-1],
                         use_input=True)
    fpi = flops_per_image(model, 0.75, 0.25)
    assert fpi > 0
    prev = None
    for e in listed:
        c = safe_torch_load(out / e["file"])["compute"]
        assert {k: e[k] for k in c} == c  # the list holds the checkpoint's own record
        done = hist[:e["step"] + 1]
        assert c["images_seen"] == sum(h["images"] for h in done) == 16 // 8 * 8 * (e["step"] + 1)
        assert c["wall_time_s"] == pytest.approx(sum(h["time_s"] for h in done))
        assert c["device_hours"] == pytest.approx(c["wall_time_s"] / 3600) and c["device_type"] == "cpu"
        assert c["flops_per_image"] == fpi and c["flops"] == c["images_seen"] * fpi
        if prev:
            assert all(c[k] > prev[k] for k in ("images_seen", "wall_time_s", "device_hours", "flops"))
        prev = c
    assert metrics["compute"] == prev


def test_explicit_resume_file_continues_in_a_new_directory(straight, tmp_path, data_root, optimizer_steps):
    """--resume FILE (used when the new folder has no checkpoint) continues after that file's epoch and
    lands on the same weights as the uninterrupted run."""
    src, _ = straight
    assert safe_torch_load(src / "checkpoint-1.pth")["epoch"] == 1
    out = tmp_path / "continued"
    optimizer_steps.reset()
    run(out, data_root, "epochs=3", "snapshot_period=2", "deterministic=True",
        extra=["--resume", str(src / "checkpoint-1.pth")])
    assert optimizer_steps.n == 2  # only epoch 2 was trained here
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2]  # history carried over from the file
    ref = [json.loads(x) for x in (src / "log.jsonl").read_text().splitlines()]
    assert lines[:2] == ref[:2]
    a, b = safe_torch_load(src / "checkpoint-2.pth")["model"], safe_torch_load(out / "checkpoint-2.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finished_run_is_not_retrained(straight, data_root):
    out, metrics = straight
    before = sha256_file(out / LATEST)
    again = run(out, data_root, "epochs=3", "tensorboard=True", "snapshot_period=2", "deterministic=True")
    assert sha256_file(out / LATEST) == before
    assert again["metrics"]["loss"] == metrics["metrics"]["loss"]
    assert again["iters"] == metrics["iters"]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    run(out, data_root, "epochs=1")
    good = sha256_file(out / LATEST)
    finished = (out / "metrics.json").read_bytes()
    ext = tmp_path / "extended"
    with pytest.raises(SystemExit) as exc:
        # extending the run (in a new folder, from its checkpoint) with an absurd lr: epoch 1's first
        # step blows the weights up
        run(ext, data_root, "epochs=2", "lr=1e30", "warmup_epochs=0", extra=["--resume", str(out / LATEST)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: epoch 1 step 1: loss is ")
    assert "last good checkpoint kept" in err[0] and "epoch 0" in err[0] and str(out / LATEST) in err[0]
    assert sha256_file(out / LATEST) == good and (out / "metrics.json").read_bytes() == finished
    assert safe_torch_load(out / LATEST)["epoch"] == 0
    assert not (ext / LATEST).exists() and not (ext / "metrics.json").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_mid_run_names_the_file(tmp_path, data_root, capsys, workers):
    folder = tmp_path / "data" / "imagenet" / "train"
    reals = sorted((data_root / "imagenet" / "train").glob("*/*.JPEG"))[:5]
    for i, src in enumerate(reals):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / f"c{i % 2}" / src.name)
    bad = folder / "c1" / "zz_truncated.JPEG"
    bad.write_bytes(reals[0].read_bytes()[:600])  # a real JPEG header, data cut off
    with pytest.raises(SystemExit) as exc:
        pretrain.main(["--config", "smoke_crossmae", "--data-root", str(tmp_path / "data"),
                       "--output-dir", str(tmp_path / "out"), "--cfg-options", "batch_size=6",
                       "total_batch_size=6", "verify_images=False", f"num_workers={workers}", "tensorboard=False"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: cannot decode image")
    assert not (tmp_path / "out" / LATEST).exists() and not (tmp_path / "out" / "metrics.json").exists()


def test_backbone_initialises_weights(straight, tmp_path, data_root):
    """With lr = 0 training leaves the weights alone, so the result must equal the --backbone weights."""
    src, _ = straight
    out = tmp_path / "init"
    run(out, data_root, "epochs=1", "lr=0.0", extra=["--backbone", str(src / "checkpoint-2.pth")])
    a, b = safe_torch_load(src / "checkpoint-2.pth")["model"], safe_torch_load(out / "checkpoint-0.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mae_run_and_ddp_two_processes(tmp_path, data_root):
    """Two CPU processes (gloo) under torchrun: each rank sees half the images per step, the effective
    batch and lr count both, and rank 0 writes one checkpoint; MAE keeps kept_mask_ratio None."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "crossmae.pretrain", "--config", "smoke_mae", "--data-root", str(data_root),
           "--output-dir", str(out), "--cfg-options", "epochs=1", "data_subset=16", "batch_size=4",
           "total_batch_size=8", "num_workers=0", "tensorboard=False", "verify_images=False"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        output, _ = proc.communicate()
    assert proc.returncode == 0, output[-3000:]
    ckpt = safe_torch_load(out / "checkpoint-0.pth")
    a = ckpt["args"]
    assert (a.world_size, a.batch_size, a.accum_iter, a.total_batch_size) == (2, 4, 1, 8)
    assert a.method == "mae" and a.kept_mask_ratio is None and not a.cross_mae
    assert a.lr == pytest.approx(a.blr * 8 / 256)  # γ = p: no prediction-ratio factor
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {2}  # 16 / (4 x 2 ranks)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["images"] == 16
    assert "norm.weight" in ckpt["model"]  # MAE's final encoder norm


def test_backbone_that_does_not_fit_is_refused(tmp_path, data_root, capsys, tiny_mae_official):
    with pytest.raises(SystemExit) as exc:
        run(tmp_path / "o", data_root, "epochs=1", extra=["--backbone", str(tiny_mae_official)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit the model" in err[0] and "missing" in err[0]
    assert not (tmp_path / "o" / LATEST).exists()
