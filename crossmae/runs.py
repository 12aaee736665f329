"""Run plumbing shared by every command (pretraining and each transfer task).

Run directory life cycle (task protocol of ``docs/CONTRACTS.md``): :func:`prepare_run` refuses an
output dir that already holds a finished ``metrics.json`` (never overwritten silently), refuses to
resume a run whose resolved config differs, and writes ``config.py``; a command trains with a
:class:`crossmae.checkpoint.CheckpointManager`; :func:`finish_run` writes ``metrics.json`` last, so a
failed run never leaves one.
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import time
from pathlib import Path

import torch

from .utils import (REPO_ROOT, UserError, atomic_write_json, atomic_write_text, config_hash, is_main_process,
                    load_config, sha256_file)


def build_parser(prog: str, description: str, protocols: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The common command line of every task command (task protocol of docs/CONTRACTS.md)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--backbone", required=True, help="pretrained checkpoint (MAE / CrossMAE / timm / ours)")
    p.add_argument("--config", default=None,
                   help="config file or preset name (paper_vit_base, smoke, …); default: the paper preset of the "
                        "backbone's architecture")
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


def default_preset(args, preset_dir: str | Path, prefix: str = "") -> str:
    """``args.config`` when given, else the paper preset matching the backbone's architecture:
    ``vit_base_patch16`` → ``<prefix>paper_vit_base`` (looked up in ``preset_dir``).

    Raises:
        UserError: no ``--config`` and no usable ``--backbone``, or no paper preset for its architecture.
    """
    if args.config:
        return args.config
    backbone = getattr(args, "backbone", None)
    if not backbone or backbone == "none":
        raise UserError("--config: required when no --backbone checkpoint is given")
    from .backbone import load_encoder_state_dict
    _, report = load_encoder_state_dict(backbone)
    name = prefix + "paper_" + report.arch.rsplit("_patch", 1)[0]
    if not (Path(preset_dir) / f"{name}.py").is_file():
        raise UserError(f"{backbone}: no paper preset for {report.arch} in {preset_dir}; pass --config "
                        f"(e.g. smoke, or a config file)")
    return name


def resolve_config(args, preset_dir: str | Path):
    """Load ``--config`` (a path or a preset of ``preset_dir``) with ``--cfg-options``, ``--seed``
    and ``--protocol`` applied. Returns an ``mmengine.Config``."""
    cfg = load_config(default_preset(args, preset_dir), args.cfg_options, preset_dir)
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
    """Detach and close every handler of ``log`` (releases ``log.txt``)."""
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()


def tb_writer(out: Path):
    """A TensorBoard ``SummaryWriter`` in ``<out>/tb`` on the main process, else ``None``."""
    if not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(out / "tb"))


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


def code_version() -> str:
    """``git describe --always --dirty`` of the repository, or ``"unknown"``."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def device_name(device: torch.device) -> str:
    """The GPU model name for a CUDA device (e.g. "NVIDIA A100-SXM4-80GB"), else "cpu"."""
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
