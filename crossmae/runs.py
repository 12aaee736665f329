"""Run plumbing shared by every command (pretraining and each transfer task).

The run lifecycle (docs/CONTRACTS.md "Run lifecycle") is ONE implementation, :class:`RunDir`, used by
``crossmae.pretrain``, ``transfer.coco`` (training and ``--eval-only``), ``transfer.ade20k``,
``transfer.finetune`` / ``inat`` / ``places`` and ``transfer.linprobe``: read-only checks of the output
folder (a finished ``metrics.json`` is final: same identity → its result, other identity → exit 2),
validation of every input before anything is written, an exclusive ``fcntl`` lock on ``run.lock``
for the whole run, resume only with the same identity, removal of stale temporary files,
``config.py`` + ``run.json``, and ``metrics.json`` written last (:meth:`RunDir.finish`) with the
provenance of :func:`provenance`. Training steps shared by the loops are :mod:`crossmae.engine`;
healthy checkpoints are :class:`crossmae.checkpoint.CheckpointManager`'s.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from .index import index_mark, loaded_since
from .utils import (check_writable, REPO_ROOT, UserError, atomic_write_json, atomic_write_text, config_hash, is_main_process,
                    load_config, safe_torch_load, sha256_file)


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


# --------------------------------------------------------------------------------------------------
# the run lifecycle (one implementation for every command; docs/CONTRACTS.md "Run lifecycle")
# --------------------------------------------------------------------------------------------------
LOCK_NAME = "run.lock"
RUN_RECORD = "run.json"
#: Temporary files of :func:`crossmae.utils._atomic_write` (``.<name>.<random>.tmp``) and of the
#: ADE20K overlays (``.<name>.tmp.png``): left behind only by a killed process.
_STALE_TMP = re.compile(r"^\..+\.tmp(\.png)?$")


def identity_hash(identity: dict) -> str:
    """SHA-256 (16 hex chars) of a run's identity (task, resolved config, inputs): two runs are the
    same run exactly when their hashes agree."""
    return config_hash(identity)


def check_output_dir(output_dir: str | Path) -> Path:
    """Refuse an ``--output-dir`` that cannot hold a run, WITHOUT creating it
    (:func:`crossmae.utils.check_writable` with ``folder=True``).

    Raises:
        UserError: the path is a file, lies under a file, or is not writable.
    """
    return check_writable(output_dir, "--output-dir", folder=True)


def _identity_diff(old: dict, new: dict) -> str:
    """The fields in which two run identities differ, e.g. ``config.seed, config.optim.lr, eval_only``."""
    def flat(d, prefix=""):
        res = {}
        for k, v in d.items():
            if isinstance(v, dict):
                res.update(flat(v, f"{prefix}{k}."))
            else:
                res[f"{prefix}{k}"] = v
        return res
    a, b = flat(json.loads(json.dumps(old, default=str))), flat(json.loads(json.dumps(new, default=str)))
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    if not keys:
        return "unknown fields"
    return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")


class RunDir:
    """One run in its output folder, from the first check to the final ``metrics.json``.

    Every command (``crossmae.pretrain``, ``transfer.coco`` incl. ``--eval-only``, ``transfer.ade20k``,
    ``transfer.finetune``/``inat``/``places``, ``transfer.linprobe``) goes through these steps::

        run = RunDir(args.output_dir, task, identity, config_text, resume=args.resume)
        if run.finished is not None:        # same run already done: nothing is written
            return run.finished
        ... validate every input (nothing written) ...
        run.start()                         # lock, clean stale temp files, resume check, config.py
        try: ... train, write predictions ...; return run.finish(result)
        finally: run.close()

    ``identity`` is what makes two runs the same run: the resolved config and the command-level
    inputs (backbone, data root, ``--eval-only``/``--weights``, …); its hash is stored in
    ``run.json`` and in ``metrics.json`` (``run_hash``).

    Raises (``UserError``, one line, exit 2):
        at construction: the folder is a file / not writable; it holds a finished ``metrics.json`` of
        another identity (or an unreadable one); ``--resume PATH`` does not exist.
        in :meth:`start`: another live process holds ``run.lock`` (the message names its pid, host
        and start time); the folder holds a checkpoint of a run with another identity.
    """

    def __init__(self, output_dir: str | Path, task: str, identity: dict, config_text: str,
                 resume: str | None = None, main_process: bool | None = None):
        self.out = check_output_dir(output_dir)
        self.task = task
        self.identity = {"task": task, **identity}
        self.hash = identity_hash(self.identity)
        self.config_text = config_text
        if main_process is None:  # also right before init_distributed(): torchrun sets RANK
            main_process = is_main_process() and int(os.environ.get("RANK", "0")) == 0
        self.main = main_process
        self._lock_fd: int | None = None
        self._state = None
        self.resume_from: Path | None = None
        self.explicit_resume = None
        if resume not in (None, "", "auto"):
            self.explicit_resume = Path(resume)
            if not self.explicit_resume.is_file():
                raise UserError(f"--resume {self.explicit_resume}: checkpoint file not found")
        self._index_mark = index_mark()   # the dataset indexes loaded from here on are this run's
        self.data_index: dict[str, str] = {}
        self.finished = self._check_finished()

    # --- phase 1: read-only checks -------------------------------------------------------------
    def _check_finished(self) -> dict | None:
        path = self.out / "metrics.json"
        if not path.exists():
            return None
        try:
            old = json.loads(path.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: output dir holds an unreadable metrics.json ({str(exc).splitlines()[0][:80]}); "
                            f"results are never overwritten: choose a new --output-dir") from None
        if old.get("run_hash") != self.hash:
            rec = self._read_record()
            what = _identity_diff(rec["identity"], self.identity) if rec else f"unknown, no {RUN_RECORD}"
            raise UserError(f"{path}: output dir holds a finished run with another config (differs in: {what}); "
                            f"results are never overwritten: choose a new --output-dir")
        if self.main:
            print(f"finished run: the result is in {path} (same config; nothing to do)", file=sys.stderr)
        return old

    def _read_record(self) -> dict | None:
        try:
            rec = json.loads((self.out / RUN_RECORD).read_text())
            return rec if isinstance(rec, dict) and isinstance(rec.get("identity"), dict) else None
        except (OSError, ValueError):
            return None

    # --- phase 2: take the folder ----------------------------------------------------------------
    def start(self, required=("model",)) -> "RunDir":
        """Create the folder, take its lock, re-check that no run finished meanwhile, remove stale
        temporary files, decide what to resume from (and read it: a checkpoint without every key of
        ``required`` is refused before anything is written) and write ``config.py`` + ``run.json``.
        Call only after every input was validated. Returns ``self``."""
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            if self.main:
                self._lock()   # only acquired: the holder is written once every check passed
                if self._check_finished() is not None:
                    raise UserError(f"{self.out / 'metrics.json'}: the same run finished in another process "
                                    f"while this one was validating its inputs; nothing to do")
            self.data_index = loaded_since(self._index_mark)
            self._check_resume()
            self._state = self._read_state(required)
        except UserError:
            self.close()
            raise
        if self.main:
            self._write_holder()
            self._clean_stale()
            atomic_write_text(self.config_text, self.out / "config.py")
            atomic_write_json({"hash": self.hash, "identity": self.identity, "data_index": self.data_index},
                              self.out / RUN_RECORD)
        return self

    def _check_resume(self) -> None:
        latest = self.out / "checkpoint-latest.pth"
        if latest.exists():
            rec = self._read_record()
            if rec is not None and rec.get("hash") != self.hash:
                raise UserError(f"{latest}: the run being resumed used another config (differs in: "
                                f"{_identity_diff(rec['identity'], self.identity)}); use the same config or a "
                                f"new --output-dir")
            old = (rec or {}).get("data_index")
            for src, fp in (old.items() if isinstance(old, dict) else ()):
                if src in self.data_index and self.data_index[src] != fp:
                    raise UserError(f"{src}: the data split changed since the run being resumed started (index "
                                    f"fingerprint {fp[:12]} -> {self.data_index[src][:12]}); restore it or use a "
                                    f"new --output-dir")
            if rec is None and (self.out / "config.py").exists() and \
                    (self.out / "config.py").read_text() != self.config_text:
                raise UserError(f"{self.out / 'config.py'}: the run being resumed used a different config; "
                                f"use the same config or a new --output-dir")
            self.resume_from = latest
        elif self.explicit_resume is not None:
            self.resume_from = self.explicit_resume

    def _lock(self) -> None:
        import fcntl
        path = self.out / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                holder = {}
            os.close(fd)
            raise UserError(f"{self.out}: output dir is in use by another run (pid {holder.get('pid', '?')} on "
                            f"host {holder.get('host', '?')}, started {holder.get('started', '?')}); wait for it "
                            f"or choose another --output-dir") from None
        self._lock_fd = fd

    def _write_holder(self) -> None:
        import socket
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "task": self.task}) + "\n"
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, info.encode(), 0)

    def _clean_stale(self) -> None:
        for p in self.out.rglob(".*"):
            if p.is_file() and _STALE_TMP.match(p.name):
                p.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the lock (the kernel also releases it when the process dies)."""
        if self._lock_fd is not None:
            import fcntl
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- resume ------------------------------------------------------------------------------
    def load_resume(self, required=("model",)) -> dict | None:
        """The training state to resume from (read once by :meth:`start`), or ``None`` for a fresh run.

        Raises:
            UserError: the file is not a dict holding every key of ``required``.
        """
        state, self._state = self._state, None
        if state is None:
            return self._read_state(required)
        return self._check_state(state, required)

    def _read_state(self, required) -> dict | None:
        if self.resume_from is None:
            return None
        return self._check_state(safe_torch_load(self.resume_from), required)

    def _check_state(self, state, required) -> dict:
        if not isinstance(state, dict):
            raise UserError(f"{self.resume_from}: not a training checkpoint (not a dict)")
        for key in required:
            if key not in state:
                raise UserError(f"{self.resume_from}: not a training checkpoint (no {key!r} entry)")
        return state

    # --- end -----------------------------------------------------------------------------------
    def rel(self, path: str | Path) -> str:
        """``path`` relative to the run folder (for ``predictions``)."""
        return str(Path(path).resolve().relative_to(self.out.resolve()))

    def finish(self, result: dict) -> dict:
        """Add ``run_hash`` (and ``code_version`` when absent) to ``result`` and write it as
        ``metrics.json``, atomically and last (main process). A ``predictions`` entry must name a file
        inside the run folder that exists. Returns the dict."""
        result = dict(result)
        result["run_hash"] = self.hash
        result.setdefault("code_version", code_version())
        result.setdefault("data_index", self.data_index)
        pred = result.get("predictions")
        if self.main and pred is not None and not (self.out / pred).is_file():
            raise RuntimeError(f"predictions file {self.out / pred} was not written")
        if self.main:
            atomic_write_json(result, self.out / "metrics.json")
        return result


def provenance(data_root: str | Path, files=(), *, num_train: int, num_eval: int) -> dict:
    """The provenance keys of ``metrics.json`` (CONTRACTS.md): ``data_root`` (absolute),
    ``data_files`` ``{absolute path: sha256}`` of each annotation / list file read (folders and
    missing paths are skipped), ``num_train_images``, ``num_eval_images``."""
    out = {}
    for f in files:
        p = Path(f).resolve()
        if p.is_file() and str(p) not in out:
            out[str(p)] = sha256_file(p)
    return {"data_root": str(Path(data_root).resolve()), "data_files": out,
            "num_train_images": int(num_train), "num_eval_images": int(num_eval)}


def prepare_run(cfg, output_dir: str | Path, resume: str | None, task: str = "run",
                identity: dict | None = None) -> RunDir:
    """A :class:`RunDir` for an mmengine ``cfg`` (identity = its resolved dict + ``identity``),
    config text ``cfg.pretty_text``. The caller returns ``run.finished`` when it is not None, else
    calls ``run.start()`` once its inputs are validated."""
    ident = {"config": cfg.to_dict(), **(identity or {})}
    return RunDir(output_dir, task, ident, cfg.pretty_text, resume=resume)


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


def finish_run(run: "RunDir", *, task: str, protocol: str, metrics: dict, cfg, backbone: str, sha: str,
               report, epochs: int, wall_time_s: float, device: torch.device, extra: dict | None = None) -> dict:
    """Assemble the metrics dict of CONTRACTS.md and write ``metrics.json`` through
    :meth:`RunDir.finish` (atomically, last, main process). ``extra`` carries the provenance keys
    (:func:`provenance`) and ``predictions``. Returns the dict."""
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
    return run.finish(res)


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
