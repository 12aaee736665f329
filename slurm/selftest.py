"""A synthetic task that follows the task protocol, to check a cluster's dispatch in seconds.

``python -m slurm.selftest --output-dir DIR [--config default|mae|crossmae]
[--cfg-options steps=20 step_seconds=0.2 fail_at_step=-1]`` fits a least-squares model by SGD on fixed synthetic data, one minibatch per step drawn
from torch's RNG. It saves ``checkpoint-latest.pth`` (weights, step, RNG states) after every step
and resumes from it, so an interrupted-and-requeued run ends with exactly the same metrics as an
uninterrupted one — which is what the Slurm tests check. With ``fail_at_step=k`` it raises at step
k (a failing task) unless the run resumed from a checkpoint: a transient fault, so the same task
submitted again (same inputs) resumes past it. Under DDP (``WORLD_SIZE`` > 1) each rank takes a slice of the minibatch and the
gradients are all-reduced (gloo). As a "pretraining" (no ``--backbone``) it also writes an
official-format ``{'model', 'args'}`` checkpoint whose ``args`` mimics MAE / CrossMAE's
``main_pretrain.py`` (``--config mae|crossmae``), so the leaderboard's metadata path is exercised.

Writes ``log.txt`` (one line per attempt: the step it started from) and, at the end,
``metrics.json`` (``mse``, ``w_err``) atomically.
"""
from __future__ import annotations

from crossmae.utils import check_writable
from crossmae.zoo import resolve_backbone

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from crossmae.checkpoint import CheckpointManager
from crossmae.runs import layout_record
from crossmae.utils import (UserError, atomic_save, atomic_write_json, cli_entry, config_hash, init_distributed,
                            parse_cfg_options, seed_everything, sha256_file)

DEFAULTS = {"steps": 20, "step_seconds": 0.0, "fail_at_step": -1, "dim": 8, "batch": 16, "lr": 0.05}
#: presets: ``default`` (a transfer task), ``mae`` / ``crossmae`` (a "pretraining" of that method).
PRESETS = ("default", "mae", "crossmae")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slurm.selftest", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default=None, help="any existing file; only its SHA-256 is recorded")
    p.add_argument("--config", default="default", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--data-root", default=None, help="unused (synthetic data)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--cfg-options", nargs="*", default=[], help=f"key=value among {sorted(DEFAULTS)}")
    p.add_argument("--resume", default=None, help="unused: always resumes from OUTPUT_DIR/checkpoint-latest.pth")
    p.add_argument("--seed", type=int, default=0)
    return p


def _config(args) -> dict:
    if args.config not in PRESETS:
        raise UserError(f"--config {args.config}: slurm.selftest presets are {', '.join(PRESETS)}")
    cfg = dict(DEFAULTS)
    for k, v in parse_cfg_options(args.cfg_options).items():
        if k not in DEFAULTS:
            raise UserError(f"--cfg-options {k}: unknown key (known: {', '.join(sorted(DEFAULTS))})")
        typ = type(DEFAULTS[k])
        try:
            cfg[k] = typ(v)
        except (TypeError, ValueError):
            raise UserError(f"--cfg-options {k}={v}: expected {typ.__name__}")
        low = _LOW.get(k)
        if low is not None and not low <= cfg[k] < float("inf"):
            raise UserError(f"--cfg-options {k}={v}: must be >= {low}")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed {args.seed}: must be an integer in [0, 4294967295]")
    return cfg


#: lower bounds of the numeric settings (``fail_at_step`` may be any integer; < 0 = never)
_LOW = {"steps": 1, "step_seconds": 0.0, "dim": 1, "batch": 1, "lr": 0.0}


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    """Run or resume the task in ``--output-dir``; returns the metrics dict.

    Raises:
        UserError: bad config / options or a missing ``--backbone`` file.
        RuntimeError: at step ``fail_at_step`` of a run that did not resume (deliberate failure).
    """
    args = build_parser().parse_args(argv)
    check_writable(args.output_dir, "--output-dir", folder=True)  # before any work
    cfg = _config(args)
    backbone_file = resolve_backbone(args.backbone) if args.backbone else None  # as every task resolves it
    out = Path(args.output_dir)
    rank, world, _ = init_distributed("gloo")
    t0 = time.time()
    seed_everything(args.seed)
    g = torch.Generator().manual_seed(1234 + args.seed)  # the fixed dataset
    x = torch.randn(256, cfg["dim"], generator=g, dtype=torch.float64)
    w_true = torch.randn(cfg["dim"], generator=g, dtype=torch.float64)
    y = x @ w_true + 0.01 * torch.randn(256, generator=g, dtype=torch.float64)
    w = torch.zeros(cfg["dim"], dtype=torch.float64)
    ckpt = CheckpointManager(out)
    state = ckpt.load_latest()  # restores the RNG states too
    start = 0
    prev_wall = 0.0
    if state is not None:
        w, start, prev_wall = state["model"]["w"], int(state["epoch"]), float(state.get("wall_time_s", 0.0))
    if rank == 0:
        with open(out / "log.txt", "a") as f:
            f.write(f"attempt start_step={start} world_size={world} pid={os.getpid()}\n")
    for step in range(start, cfg["steps"]):
        if step == cfg["fail_at_step"] and state is None:
            raise RuntimeError(f"selftest: injected failure at step {step}")
        idx = torch.randint(0, x.shape[0], (cfg["batch"],))
        idx = idx.chunk(world)[rank] if world > 1 else idx
        grad = 2 * x[idx].T @ (x[idx] @ w - y[idx]) / cfg["batch"]
        if world > 1:
            import torch.distributed as dist
            dist.all_reduce(grad)
        w = w - cfg["lr"] * grad
        if rank == 0:
            ckpt.save({"model": {"w": w}, "optimizer": None, "epoch": step + 1,
                       "wall_time_s": prev_wall + time.time() - t0})
        if cfg["step_seconds"]:
            time.sleep(cfg["step_seconds"])
    metrics = {"mse": float(((x @ w - y) ** 2).mean()), "w_err": float((w - w_true).norm())}
    result = {
        "task": "selftest" if args.backbone else "pretrain", "protocol": "lstsq", "metrics": metrics,
        "backbone": args.backbone, "backbone_sha256": sha256_file(backbone_file) if backbone_file else None, "backbone_report": None,
        "config_hash": config_hash(cfg), "seed": args.seed, "iters": cfg["steps"],
        "wall_time_s": prev_wall + time.time() - t0, "device": "cpu", "num_gpus": 0,
        "world_size": world, "code_version": "unknown", "host": platform.node(),
        **layout_record("cpu"),
    }
    if rank == 0:
        if not args.backbone:  # a "pretraining": an official-format checkpoint with args
            cross = args.config == "crossmae"
            ns = argparse.Namespace(model="mae_vit_tiny_patch16", epochs=cfg["steps"], mask_ratio=0.75,
                                    kept_mask_ratio=0.25 if cross else 0.75, decoder_depth=2,
                                    cross_mae=cross, weight_fm=cross, input_size=32)
            atomic_save({"model": {"w": w}, "epoch": cfg["steps"], "args": ns}, out / "checkpoint-final.pth")
            result["checkpoint"] = str(out / "checkpoint-final.pth")
        atomic_write_json(result, out / "metrics.json")
    return result


if __name__ == "__main__":
    main()
