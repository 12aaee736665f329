"""Run plumbing shared by every command (pretraining and each transfer task).

The run lifecycle (docs/CONTRACTS.md "Run lifecycle") is ONE implementation, :class:`RunDir`, used by
``crossmae.pretrain``, ``transfer.coco`` (training and ``--eval-only``), ``transfer.ade20k``,
``transfer.finetune`` / ``inat`` / ``places`` and ``transfer.linprobe``: read-only checks of the output
folder (a finished ``metrics.json`` is final: same identity → its result, other identity → exit 2),
validation of every input before anything is written, an exclusive ``fcntl`` lock on ``run.lock``
for the whole run, resume only with the same identity, removal of stale temporary files,
``config.py`` + ``run.json``, and ``metrics.json`` written last (:meth:`RunDir.finish`) with the
provenance of :func:`provenance`. Every command drives it through :class:`Run`, the run driver (a
``RunDir`` that also holds the distributed layout, device, log, TensorBoard writer, checkpoints,
resume and DDP wrapping; docs/CONTRACTS.md "Run driver"); :func:`batch_layout` is the one batch
vocabulary ("Run vocabulary"). Training steps shared by the loops are :mod:`crossmae.engine`;
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

from .safeio import check_schema, load_json, open_in_dir, read_regular, real_dir
from .index import index_mark, loaded_since
from .utils import (check_writable, flatten, REPO_ROOT, UserError, atomic_write_json, atomic_write_text, config_hash, is_main_process,
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
#: ADE20K overlays of older versions (``.<name>.tmp.png``): left behind only by a killed process.
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
    a, b = flatten(json.loads(json.dumps(old, default=str))), flatten(json.loads(json.dumps(new, default=str)))
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
                 resume: str | None = None, main_process: bool | None = None,
                 remedy: str = "choose a new --output-dir"):
        self.out = check_output_dir(output_dir)
        self.remedy = remedy  # what a refused finished folder tells the user to do
        self.task = task
        self.identity = {"task": task, **identity}
        self.hash = identity_hash(self.identity)
        self.config_text = config_text
        if main_process is None:  # also right before init_distributed(): the launcher's rank (RANK, SLURM_PROCID)
            from .distributed import layout_from_env
            main_process = is_main_process() and layout_from_env().is_main
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
        if not os.path.lexists(path):
            return None
        try:  # a regular file of the expected shape only (never a symlink / FIFO: crossmae.safeio)
            old = load_json(path, "metrics", self.out)
        except UserError as exc:
            why = str(exc).removeprefix(f"{path}: ")[:200]
            raise UserError(f"{path}: output dir holds an unreadable metrics.json ({why}); results are never "
                            f"overwritten: {self.remedy}") from None
        if old.get("run_hash") != self.hash:
            rec = self._read_record()
            what = _identity_diff(rec["identity"], self.identity) if rec else f"unknown, no {RUN_RECORD}"
            raise UserError(f"{path}: output dir holds a finished run with another config (differs in: {what}); "
                            f"results are never overwritten: {self.remedy}")
        if self.main:
            print(f"finished run: the result is in {path} (same config; nothing to do)", file=sys.stderr)
        return old

    def _read_record(self) -> dict | None:
        try:
            return load_json(self.out / RUN_RECORD, "run", self.out, missing_ok=True)
        except UserError:
            return None

    # --- phase 2: take the folder ----------------------------------------------------------------
    def start(self, required=("model",)) -> "RunDir":
        """Create the folder, take its lock, re-check that no run finished meanwhile, remove stale
        temporary files, decide what to resume from (and read it: a checkpoint without every key of
        ``required`` is refused before anything is written) and write ``config.py`` + ``run.json``.
        Call only after every input was validated. Returns ``self``."""
        real_dir(self.out, "--output-dir", create=True)
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
        if os.path.lexists(latest):
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
            if rec is None and os.path.lexists(self.out / "config.py") and \
                    read_regular(self.out / "config.py", self.out).decode(errors="replace") != self.config_text:
                raise UserError(f"{self.out / 'config.py'}: the run being resumed used a different config; "
                                f"use the same config or a new --output-dir")
            self.resume_from = latest
        elif self.explicit_resume is not None:
            self.resume_from = self.explicit_resume

    def _lock(self) -> None:
        import fcntl
        path = self.out / LOCK_NAME
        fd = open_in_dir(path, os.O_RDWR | os.O_CREAT)  # never through a planted symlink / folder / FIFO
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = check_schema(json.loads(os.pread(fd, 4096, 0).decode() or "{}"), "lock", path)
            except (ValueError, RecursionError, UserError):
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
        """Remove stale temporary files of this run; a nested run's folder (one holding its own
        ``run.lock``, e.g. the probes ``slurm.watch`` runs inside a pretraining folder) is its own."""
        for p in self.out.rglob(".*"):
            if p.is_file() and _STALE_TMP.match(p.name) and not any(
                    (d / LOCK_NAME).exists() for d in p.parents if d != self.out and self.out in d.parents):
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
        own = self.resume_from == self.out / "checkpoint-latest.pth"  # a run-folder file: no link followed
        return self._check_state(safe_torch_load(self.resume_from, root=self.out if own else None), required)

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
        for k, v in layout_record(result.get("device")).items():  # world_size, num_nodes, devices_per_node, ...
            result.setdefault(k, v)
        result.setdefault("data_index", self.data_index)
        pred = result.get("predictions")
        if self.main and pred is not None and not (self.out / pred).is_file():
            raise RuntimeError(f"predictions file {self.out / pred} was not written")
        if self.main:
            atomic_write_json(result, self.out / "metrics.json")
        return result


class Run(RunDir):
    """The run driver every training / evaluation command starts from: the :class:`RunDir`
    lifecycle (lock, identity, finished-run finality, validation before writes) plus the run's
    distributed layout, device, log, TensorBoard writer, checkpoints, resume, DDP wrapping and the
    common ``metrics.json`` provenance. Each task keeps its protocol (model, data, loop) in its own
    module, in the order of the MAE reference ``main_pretrain.py``::

        run = Run(args.output_dir, TASK, identity, config_text, resume=args.resume, device=args.device)
        if run.finished is not None:          # same run already done: nothing is written
            return run.finished
        layout = run.setup()                  # process group (world > 1) + run.device = cuda:<local rank> | cpu
        ... validate every input (nothing written) ...
        with run.start():                     # lock, resume check, config.py / run.json; closes everything
            log = run.open_log()              # <out>/log.txt (main process) + stderr
            ckpt = run.checkpoints(keep)      # crossmae.checkpoint.CheckpointManager of <out>
            state = run.resume(model=..., optimizer=..., required=(...), label=lambda s: f"epoch {s['epoch']}")
            ddp_model = run.wrap_ddp(model)
            tb = run.tensorboard()            # <out>/tensorboard on the main process, else None
            ... the task's loop ...
            return run.finish(result)         # + run_hash, code_version, layout, device; metrics.json last

    Attributes (after :meth:`setup`): ``layout`` (:class:`crossmae.distributed.Layout`: rank, world
    size, local rank, node rank, number of nodes, master address, launcher), ``device``
    (``cuda:<local rank>`` or ``--device``; never the global rank), ``rank``, ``world``, ``main``.

    Raises (``UserError``): everything :class:`RunDir` raises; in :meth:`setup` a ``--device`` that
    is unparsable, not cpu/cuda, or cuda on a machine without it.
    """

    def __init__(self, output_dir: str | Path, task: str, identity: dict, config_text: str,
                 resume: str | None = None, device: str | None = None):
        from . import distributed
        self.layout = distributed.layout_from_env()   # ranks from the environment; no process group yet
        super().__init__(output_dir, task, identity, config_text, resume=resume,
                         main_process=None if self.layout.world_size == 1 else self.layout.is_main)
        self.device_arg = device
        self.device = self.layout.device
        self.log: logging.Logger | None = None
        self.tb = None
        self.ckpt = None
        self.t_start = time.time()

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def world(self) -> int:
        return self.layout.world_size

    def setup(self, timeout_s: float | None = None):
        """Initialise the process group when the job has more than one process
        (:func:`crossmae.distributed.setup`) and choose the device (:func:`resolve_device`: ``--device``,
        else ``cuda:<local rank>`` when CUDA is available, else CPU). Returns the layout."""
        from . import distributed
        self.layout = distributed.setup(timeout_s=timeout_s)
        self.main = self.layout.is_main
        self.device = resolve_device(self.device_arg, self.layout.local_rank)
        return self.layout

    def start(self, required=("model",)) -> "Run":
        """:meth:`RunDir.start`; use as ``with run.start():`` so that :meth:`close` runs at the end.
        ``t_start`` (the session's wall-clock start) is reset here."""
        super().start(required)
        self.t_start = time.time()
        return self

    def open_log(self, name: str | None = None) -> logging.Logger:
        """The run's logger (:func:`get_logger`: ``<out>/log.txt`` and stderr on the main process,
        warnings only elsewhere); closed by :meth:`close`."""
        self.log = get_logger(self.out, name or self.task)
        return self.log

    def tensorboard(self, enabled: bool = True):
        """A TensorBoard writer in ``<out>/tensorboard`` on the main process (``None`` elsewhere or when
        not ``enabled``); flushed and closed by :meth:`close`."""
        if enabled and self.main and self.tb is None:
            self.tb = tb_writer(self.out)
        return self.tb if enabled else None

    def checkpoints(self, keep: int = 0):
        """The run's :class:`crossmae.checkpoint.CheckpointManager` (``keep`` newest periodic
        snapshots, 0 = all)."""
        from .checkpoint import CheckpointManager
        self.ckpt = CheckpointManager(self.out, keep=keep)
        return self.ckpt

    def resume(self, *, model=None, optimizer=None, scaler=None, required=("model", "optimizer", "epoch"),
               label=None, restore_rng: bool = True, strict: bool = True) -> dict | None:
        """Load the state to resume from (:meth:`RunDir.load_resume`), or return ``None`` for a fresh run.

        ``state['model']`` goes into ``model`` (DDP / compile wrappers stripped), ``state['optimizer']``
        into ``optimizer``, a non-empty ``state['scaler']`` into ``scaler``; with ``restore_rng`` the
        RNG states it holds are restored (:func:`crossmae.checkpoint.set_rng_state`). The checkpoint
        manager (:meth:`checkpoints`, created first) records it as the last good checkpoint under
        ``label(state)`` (e.g. "epoch 3").

        Raises:
            UserError: the checkpoint lacks a ``required`` key, or its tensors do not fit the model /
                optimizer (one line naming the file).
        """
        from .checkpoint import load_state, set_rng_state, unwrap
        state = self.load_resume(required=required)
        if state is None:
            return None
        try:
            if model is not None:
                unwrap(model).load_state_dict(state["model"], strict=strict)
            load_state(optimizer, state.get("optimizer"))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"{self.resume_from}: does not match this config "
                            f"({' '.join(str(exc).split())[:200]})") from None
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if restore_rng and "rng" in state:
            set_rng_state(state["rng"])
        if self.ckpt is not None:
            self.ckpt.resumed(self.resume_from, label(state) if label else "resumed")
        return state

    def wrap_ddp(self, model: torch.nn.Module, **kwargs) -> torch.nn.Module:
        """``DistributedDataParallel(model, device_ids=[local device] on CUDA, **kwargs)`` when the
        job has more than one process, else ``model`` itself."""
        if self.world <= 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None, **kwargs)

    def barrier(self) -> None:
        """Wait for every rank (:func:`crossmae.distributed.barrier`, with its timeout)."""
        from . import distributed
        distributed.barrier()

    def provenance_common(self) -> dict:
        """What every ``metrics.json`` records about where it ran: the layout
        (``world_size``, ``num_nodes``, ``devices_per_node``, ``device_type``, ``launcher``), the
        ``device`` name and ``num_gpus`` (world size on CUDA, else 0)."""
        return {**self.layout.as_metrics(), "device_type": self.device.type, "device": device_name(self.device),
                "num_gpus": self.world if self.device.type == "cuda" else 0}

    def finish(self, result: dict) -> dict:
        """:meth:`RunDir.finish` with :meth:`provenance_common` added (keys the task set win)."""
        return super().finish({**self.provenance_common(), **result})

    def close(self) -> None:
        """Close the TensorBoard writer and the log, release the lock."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.log is not None:
            close_logger(self.log)
            self.log = None
        super().close()


def resolve_device(arg: str | None, local_rank: int) -> torch.device:
    """``--device`` (``cpu``, ``cuda`` = ``cuda:<local rank>``, ``cuda:N``), else ``cuda:<local rank>``
    when CUDA is available, else CPU. The local rank, never the global one, indexes the GPUs of a node.

    Raises:
        UserError: an unparsable name, a type other than cpu / cuda, or cuda without CUDA.
    """
    if arg is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(arg)
    except RuntimeError as exc:
        raise UserError(f"--device {arg!r}: {str(exc).splitlines()[0]}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {arg}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    elif dev.type != "cpu":
        raise UserError(f"--device {arg}: only cpu and cuda are supported")
    return dev


def batch_layout(section, world: int, where: str = "config") -> tuple[int, int, int]:
    """``(batch_size, accum_iter, total_batch_size)`` of a config section: the one batch vocabulary
    of every command (docs/CONTRACTS.md "Run vocabulary").

    ``batch_size`` is the micro-batch of ONE device (process) per forward pass (MAE's per-GPU
    ``--batch_size``, mmseg's ``train_dataloader.batch_size``); ``total_batch_size`` is the
    effective batch of one optimizer step over all devices and accumulation steps (detectron2's
    ``dataloader.train.total_batch_size``; MAE's ``eff_batch_size`` from which ``lr = blr · total / 256``);
    ``accum_iter`` the micro-batches per optimizer step. ``total = batch_size · accum_iter · world``;
    any value left None is derived from the others (``accum_iter`` defaults to 1 when it cannot be
    derived), so a preset giving ``total_batch_size`` keeps its effective batch on any number of devices.

    Raises:
        UserError: the given values do not satisfy the product, or none of batch_size / total is given.
    """
    per, accum, total = section.get("batch_size"), section.get("accum_iter"), section.get("total_batch_size")
    if per is None and total is None:
        raise UserError(f"{where}: set batch_size (per device) or total_batch_size (per optimizer step)")
    if per is None:
        accum = accum or 1
        if total % (world * accum):
            raise UserError(f"{where} total_batch_size {total} is not a multiple of {world} processes x "
                            f"accum_iter {accum}")
        per = total // (world * accum)
    elif total is None:
        accum = accum or 1
        total = per * accum * world
    else:
        if total % (per * world):
            raise UserError(f"{where} total_batch_size {total} is not a multiple of batch_size {per} x "
                            f"{world} processes")
        derived = total // (per * world)
        if accum is not None and accum != derived:
            raise UserError(f"{where} accum_iter {accum} contradicts total_batch_size {total} = batch_size "
                            f"{per} x {world} processes x {derived}; set one of them")
        accum = derived
    if not isinstance(accum, int) or accum < 1:
        raise UserError(f"{where} accum_iter: must be a positive integer, got {accum!r}")
    return int(per), int(accum), int(total)


def layout_record(device: str | None = None) -> dict:
    """The distributed layout the run ran with, for ``metrics.json``
    (:meth:`crossmae.distributed.Layout.as_metrics`: ``world_size``, ``num_nodes``,
    ``devices_per_node``, ``device_type``, ``launcher``). ``device`` is the result's ``device``
    entry (``"cpu"`` or a GPU model name, :func:`device_name`): it decides ``device_type`` when a
    run chose the CPU although CUDA is present."""
    from .distributed import layout_from_env
    rec = layout_from_env().as_metrics()
    if device is not None:
        rec["device_type"] = str(device) if str(device) in ("cpu", "mps") else "cuda"
    return rec


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
                identity: dict | None = None, device: str | None = None) -> "Run":
    """The driver :class:`Run` for an mmengine ``cfg`` (identity = its resolved dict + ``identity``),
    config text ``cfg.pretty_text``. The caller returns ``run.finished`` when it is not None, else
    calls ``run.setup()``, validates its inputs and then ``run.start()``."""
    ident = {"config": cfg.to_dict(), **(identity or {})}
    return Run(output_dir, task, ident, cfg.pretty_text, resume=resume, device=device)


class _NoFollowFileHandler(logging.FileHandler):
    """``logging.FileHandler`` whose file is opened for append through :func:`crossmae.safeio.open_in_dir`
    (``O_NOFOLLOW``): a planted ``log.txt`` symlink is refused, its target never appended to."""

    def _open(self):
        fd = open_in_dir(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)


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
        fh = _NoFollowFileHandler(out / "log.txt")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    return log


def close_logger(log: logging.Logger) -> None:
    """Detach and close every handler of ``log`` (releases ``log.txt``)."""
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()


#: The TensorBoard folder of every command's run (``<output-dir>/tensorboard``). Runs made before
#: the driver unified it wrote the transfer tasks' events to ``tb/``; nothing reads either folder
#: back, so an old run folder keeps its ``tb/`` untouched and a resumed run continues in ``tensorboard/``.
TENSORBOARD_DIR = "tensorboard"


def tb_writer(out: Path):
    """A TensorBoard ``SummaryWriter`` in ``<out>/tensorboard`` on the main process, else ``None``."""
    if not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(real_dir(out / TENSORBOARD_DIR, "TensorBoard folder", create=True)))


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


def finish_run(run: "Run", *, task: str, protocol: str, metrics: dict, cfg, backbone: str, sha: str,
               report, epochs: int, wall_time_s: float, extra: dict | None = None) -> dict:
    """Assemble the metrics dict of CONTRACTS.md for a backbone-evaluation run and write
    ``metrics.json`` through :meth:`Run.finish` (atomically, last, main process; the driver adds the
    layout, device and ``run_hash``). ``extra`` carries the provenance keys (:func:`provenance`) and
    ``predictions``. Returns the dict."""
    res = {
        "task": task, "protocol": protocol,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "backbone": str(backbone), "backbone_sha256": sha, "backbone_report": report_dict(report),
        "config_hash": config_hash(cfg.to_dict()), "seed": int(cfg.seed), "epochs": int(epochs),
        "wall_time_s": float(wall_time_s), "code_version": code_version(),
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
