"""Plumbing shared by the classification commands (finetune, linprobe, inat, places).

Run directory life cycle (task protocol of ``docs/CONTRACTS.md``): :func:`prepare_run` refuses an
output dir that already holds a finished ``metrics.json`` (never overwritten silently), refuses to
resume a run whose resolved config differs, writes ``config.py``; the command trains with a
:class:`crossmae.checkpoint.CheckpointManager`; :func:`finish_run` writes ``metrics.json`` last.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from crossmae.lr_sched import adjust_learning_rate, lr_at  # noqa: F401  (MAE util/lr_sched.py)
from crossmae.utils import (REPO_ROOT, UserError, atomic_write_json, atomic_write_text, config_hash,
                            default_device, is_main_process, load_config, sha256_file)

CONFIG_ROOT = REPO_ROOT / "configs"


def build_parser(prog: str, description: str, protocols: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The common command line of every classification command (task protocol of CONTRACTS.md)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--backbone", required=True, help="pretrained checkpoint (MAE / CrossMAE / timm / ours)")
    p.add_argument("--config", default="smoke", help="config file or preset name (paper_vit_base, smoke, …)")
    p.add_argument("--data-root", default=None, help="datasets root (default $CROSSMAE_DATA_ROOT or ../shared/data)")
    p.add_argument("--output-dir", required=True, help="run folder (resumed when it holds a checkpoint)")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from this checkpoint (default: <output-dir>/checkpoint-latest.pth, "
                        "which is also used without the flag)")
    p.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    if protocols:
        p.add_argument("--protocol", choices=protocols, default=None, help="overrides the config's protocol")
    return p


def resolve_config(args, preset_dir: str | Path):
    """Load ``--config`` (a path or a preset of ``preset_dir``) with ``--cfg-options``, ``--seed``
    and ``--protocol`` applied. Returns an ``mmengine.Config``."""
    cfg = load_config(args.config, args.cfg_options, preset_dir)
    if getattr(args, "seed", None) is not None:
        cfg.seed = args.seed
    if getattr(args, "protocol", None) is not None:
        cfg.protocol = args.protocol
    return cfg


def prepare_run(cfg, output_dir: str | Path, resume: str | None) -> tuple[Path, Path | None]:
    """Check and create the run folder; write the resolved ``config.py``.

    Returns ``(output_dir, checkpoint_to_resume_or_None)``.

    Raises:
        UserError: ``metrics.json`` already exists (a finished run); the folder holds a checkpoint of
            a run with a different resolved config; ``--resume PATH`` does not exist.
    """
    out = Path(output_dir)
    if (out / "metrics.json").exists():
        raise UserError(f"{out / 'metrics.json'}: output dir holds a finished run; "
                        f"choose a new --output-dir (results are never overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    text = cfg.pretty_text
    ckpt = None
    if resume not in (None, "auto"):
        ckpt = Path(resume)
        if not ckpt.is_file():
            raise UserError(f"{ckpt}: --resume checkpoint not found")
    elif (out / "checkpoint-latest.pth").exists():
        ckpt = out / "checkpoint-latest.pth"
    if ckpt is not None and (out / "config.py").exists():
        old = (out / "config.py").read_text()
        if old != text:
            raise UserError(f"{out / 'config.py'}: the run being resumed used a different config; "
                            f"use the same config or a new --output-dir")
    if is_main_process():
        atomic_write_text(text, out / "config.py")
    return out, ckpt


def get_logger(out: Path, name: str) -> logging.Logger:
    """A logger writing to stderr and ``<out>/log.txt``; other DDP ranks only log warnings, no file."""
    log = logging.getLogger(f"transfer.{name}.{out}")
    log.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    sh = logging.StreamHandler()
    sh.setFormatter(fmt)
    log.addHandler(sh)
    if is_main_process():
        fh = logging.FileHandler(out / "log.txt")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    return log


def close_logger(log: logging.Logger) -> None:
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()


def tb_writer(out: Path):
    """A TensorBoard ``SummaryWriter`` in ``<out>/tb`` on the main process, else ``None``."""
    if not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(out / "tb"))


def load_cls_backbone(path: str, cfg, *, num_classes: int, global_pool: str, drop_path_rate: float = 0.0):
    """A timm ViT with the encoder of checkpoint ``path`` loaded through the backbone API
    (``crossmae.load_backbone``; pos_embed interpolated bicubically to ``cfg.input_size``).

    Returns ``(model, LoadReport)``. Raises ``UserError`` (``BackboneLoadError``) for a bad checkpoint.
    """
    from crossmae import load_backbone  # the lead's backbone API (CONTRACTS.md)
    if not Path(path).is_file():
        raise UserError(f"{path}: --backbone checkpoint not found")
    return load_backbone(path, arch=cfg.get("arch"), img_size=cfg.input_size, num_classes=num_classes,
                         global_pool=global_pool, drop_path_rate=drop_path_rate)


def report_dict(report) -> dict:
    """``LoadReport.to_dict()`` (or a minimal dict for report-like objects without it)."""
    if hasattr(report, "to_dict"):
        return report.to_dict()
    return {k: getattr(report, k, None) for k in ("path", "sha256", "format", "arch", "has_final_norm")}


def backbone_sha(path: str, report=None) -> str:
    """The checkpoint's SHA-256 (from the report when it carries one)."""
    sha = getattr(report, "sha256", None)
    return sha or sha256_file(path)


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------
def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at C).

    logits: (B, C); target: (B,) int64. Returns a list of ints, one per k.
    """
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hit = pred.eq(target[:, None])
    return [int(hit[:, :min(k, maxk)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp_dtype=None) -> dict:
    """Top-1 / top-5 accuracy (%) and mean CE loss of ``model`` over ``loader`` (summed over DDP
    ranks when distributed: each rank sees a disjoint shard). Returns ``{'top1','top5','loss'}``."""
    import torch.distributed as dist
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1, top5, loss sum
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        out = out.float()
        c1, c5 = topk_correct(out, y)
        stats += torch.tensor([len(y), c1, c5, float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))],
                              dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    n = max(stats[0].item(), 1.0)
    return {"top1": 100.0 * stats[1].item() / n, "top5": 100.0 * stats[2].item() / n,
            "loss": stats[3].item() / n}


def code_version() -> str:
    """``git describe --always --dirty`` of the repository, or ``"unknown"``."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def finish_run(out: Path, *, task: str, protocol: str, metrics: dict, cfg, backbone: str, sha: str,
               report, epochs: int, wall_time_s: float, device: torch.device, extra: dict | None = None) -> dict:
    """Assemble the metrics dict of CONTRACTS.md and write ``metrics.json`` atomically (main process).
    Returns the dict."""
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    res = {
        "task": task, "protocol": protocol,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "backbone": str(backbone), "backbone_sha256": sha, "backbone_report": report_dict(report),
        "config_hash": config_hash(cfg.to_dict()), "seed": int(cfg.seed), "epochs": int(epochs),
        "wall_time_s": float(wall_time_s), "device": device_name(device), "num_gpus": world if device.type == "cuda" else 0, "world_size": world,
        "code_version": code_version(),
    }
    if extra:
        res.update(extra)
    if is_main_process():
        atomic_write_json(res, out / "metrics.json")
    return res


class Timer:
    """Wall time that survives resume: ``elapsed`` = time stored in the checkpoint + this session."""

    def __init__(self, previous: float = 0.0):
        self.previous = previous
        self.start = time.time()

    @property
    def elapsed(self) -> float:
        return self.previous + time.time() - self.start


def amp_dtype_for(device: torch.device, cfg) -> torch.dtype | None:
    """bf16 autocast on CUDA when ``cfg.amp`` (the default), none on CPU."""
    return torch.bfloat16 if device.type == "cuda" and cfg.get("amp", True) else None


def json_dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


def get_device() -> torch.device:
    return default_device()


# --------------------------------------------------------------------------------------------------
# dataset commands (transfer.inat, transfer.places)
# --------------------------------------------------------------------------------------------------
DATASET_PROTOCOLS = ("finetune", "linprobe")


def dataset_parser(task: str, description: str) -> argparse.ArgumentParser:
    """Parser of ``python -m transfer.<task>``: the common options + ``--protocol finetune|linprobe``."""
    p = build_parser(f"python -m transfer.{task}", description)
    p.add_argument("--protocol", choices=DATASET_PROTOCOLS, default="finetune",
                   help="finetune (default; configs/<task>/<preset>.py) or linprobe "
                        "(configs/<task>/linprobe_<preset>.py; its sub-protocol via protocol=mae|fast|blocks|knn)")
    return p


def dataset_command(task: str, description: str):
    """``(build_parser, main)`` of the command ``python -m transfer.<task>`` for a dataset preset folder
    (``transfer.inat``, ``transfer.places``); ``main`` is wrapped by ``cli_entry``."""
    from crossmae.utils import cli_entry

    def build() -> argparse.ArgumentParser:
        return dataset_parser(task, description)

    @cli_entry
    def main(argv: list[str] | None = None) -> dict:
        """Entry point (task protocol of CONTRACTS.md). Returns the metrics dict."""
        return dataset_task_main(task, argv, description)

    build.__doc__ = f"Command line of ``python -m transfer.{task}``."
    return build, main


def dataset_task_main(task: str, argv: list[str] | None, description: str) -> dict:
    """Run the fine-tuning or linear-probe protocol on a dataset preset folder ``configs/<task>/``.

    A preset name ``X`` means ``configs/<task>/X.py`` for fine-tuning and ``configs/<task>/linprobe_X.py``
    for linear probing; a path is used as given. The config's ``family`` must match ``--protocol``.

    Raises:
        UserError: the config's family disagrees with ``--protocol``.
    """
    args = dataset_parser(task, description).parse_args(argv)
    preset_dir = CONFIG_ROOT / task
    config = args.config
    if args.protocol == "linprobe" and not Path(config).suffix and not config.startswith("linprobe_"):
        config = "linprobe_" + config
    cfg = load_config(config, args.cfg_options, preset_dir)
    if args.seed is not None:
        cfg.seed = args.seed
    if cfg.get("family") != args.protocol:
        raise UserError(f"{args.config}: config is for protocol {cfg.get('family')!r}, --protocol is {args.protocol!r}")
    if args.protocol == "finetune":
        from .finetune import run_finetune
        return run_finetune(args, cfg, task)
    from .linprobe import run_linprobe
    return run_linprobe(args, cfg, task)


# --------------------------------------------------------------------------------------------------
# training loop shared by fine-tuning and the MAE linear probe (MAE engine_finetune.train_one_epoch)
# --------------------------------------------------------------------------------------------------
def resume_state(ckpt_path: Path | None, modules: dict, optimizer, log) -> tuple[int, list, float]:
    """Load a run's checkpoint: ``state['model']`` into the one module of ``modules`` (DDP unwrapped),
    the optimizer state, the RNG states. Returns ``(start_epoch, history, previous_wall_time)``, or
    ``(0, [], 0.0)`` without a checkpoint."""
    from crossmae.checkpoint import load_state, set_rng_state, unwrap
    from crossmae.utils import safe_torch_load
    if ckpt_path is None:
        return 0, [], 0.0
    state = safe_torch_load(ckpt_path)
    for module in modules.values():
        unwrap(module).load_state_dict(state["model"])
    load_state(optimizer, state["optimizer"])
    if "rng" in state:
        set_rng_state(state["rng"])
    log.info(f"resumed from {ckpt_path} after epoch {state['epoch']}")
    return state["epoch"] + 1, list(state.get("history", [])), float(state.get("wall_time", 0.0))


def epoch_end(rec: dict, *, log, tb, task: str, ckpt, state: dict | None, history: list, timer: Timer,
              hook=None, periodic: bool = False) -> None:
    """Log an epoch record (text + TensorBoard), save ``state`` (+ epoch, history, wall time) through
    the CheckpointManager when given, then call ``hook(epoch)`` (tests simulate preemption there)."""
    epoch = rec["epoch"]
    log.info(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
    if tb is not None:
        for k, v in rec.items():
            if k != "epoch" and isinstance(v, (int, float)):
                tb.add_scalar(f"{task}/{k}", v, epoch)
        tb.flush()
    if state is not None:
        ckpt.save(dict(state, epoch=epoch, history=history, wall_time=timer.elapsed), step=epoch, periodic=periodic)
    if hook is not None:
        hook(epoch)


def train_one_epoch(epoch: int, *, cfg, loader, optimizer, lr: float, loss_fn, params=None) -> dict:
    """One epoch of MAE's ``engine_finetune.train_one_epoch``: per-iteration lr (warmup + cosine,
    :func:`adjust_learning_rate` at fractional epochs, updated every ``accum_iter`` steps), gradient
    accumulation, optional ``clip_grad`` over ``params``. ``loss_fn(x, y) -> scalar loss``.

    Returns ``{'epoch', 'train_loss', 'lr'}``. Raises RuntimeError on a non-finite loss.
    """
    steps = len(loader)
    total, n, cur = 0.0, 0, 0.0
    optimizer.zero_grad()
    for it, (x, y) in enumerate(loader):
        if it % cfg.accum_iter == 0:
            cur = adjust_learning_rate(optimizer, it / steps + epoch, lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
        loss = loss_fn(x, y)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()} at epoch {epoch} iteration {it}")
        (loss / cfg.accum_iter).backward()
        if (it + 1) % cfg.accum_iter == 0:
            if cfg.get("clip_grad") is not None and params is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad()
        total, n = total + loss.item(), n + 1
    return {"epoch": epoch, "train_loss": total / max(n, 1), "lr": cur}


def eval_due(cfg, epoch: int) -> bool:
    """Evaluate every ``eval_interval`` epochs and after the last one."""
    return (epoch + 1) % cfg.eval_interval == 0 or epoch + 1 == cfg.epochs


def final_metrics(history: list) -> dict:
    """``top1``/``top5`` of the last evaluated epoch and ``top1_best`` (MAE's max accuracy)."""
    ev = [h for h in history if "top1" in h]
    if not ev:
        raise RuntimeError("no evaluation was run")
    return {"top1": ev[-1]["top1"], "top5": ev[-1]["top5"], "top1_best": max(h["top1"] for h in ev)}
