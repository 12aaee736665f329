"""Training-state checkpoints shared by the pretraining engine and every transfer task.

Layout of an output directory (every file written atomically, temp file + rename)::

    checkpoint-latest.pth      the newest training state, used to resume (requeue-safe)
    checkpoint-<step>.pth      periodic snapshots (``keep`` newest kept, or all when keep=0)
    snapshots.json             (when the writer passes a ``record``) the complete periodic
                               snapshots, in order, each with that record (e.g. the pretraining's
                               compute totals); a file is listed only once fully written, so a
                               reader (``slurm.watch``) that trusts only this list never sees a
                               partial or temporary file

A state is a dict with at least ``model`` (state dict), ``optimizer``, ``epoch`` and, for
bit-exact resume, ``rng`` (Python, NumPy, torch CPU and CUDA generator states). The official
MAE / CrossMAE layout ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}`` is a subset: our
pretraining checkpoints load in the reference repositories and theirs load here.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .utils import UserError, atomic_save, atomic_write_json, safe_torch_load

LATEST = "checkpoint-latest.pth"
SNAPSHOTS = "snapshots.json"


def rng_state() -> dict:
    """Snapshot of every RNG a training step can consume (Python, NumPy, torch CPU, CUDA).

    NumPy's state is stored as plain lists/ints so that ``weights_only=True`` loading accepts it.
    """
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore a :func:`rng_state` snapshot."""
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingDivergedError(UserError):
    """The loss or the weights became NaN/inf. The run stops (exit 2); the message names the last
    good checkpoint, which is left untouched."""


#: Largest magnitude a healthy WEIGHT may have: sqrt of the float32 maximum (~1.8e19). A larger
#: weight cannot be squared in float32/bfloat16 (Adam's second moment, weight decay and LARS norms,
#: every matmul with inputs of the same order overflow), so a run whose weights got there has
#: diverged even while its numbers are still finite (lr=1e36 gives |w| ~ 1e36 after one step).
WEIGHT_LIMIT = float(torch.finfo(torch.float32).max) ** 0.5


def nonfinite_tensors(obj: Any, prefix: str = "", limit: float | None = None) -> list[str]:
    """Names of the floating-point tensors inside ``obj`` (nested dicts / lists, e.g. a model or
    optimizer state dict) that hold a NaN or ±inf, or (with ``limit``) a value with
    ``|x| >= limit``."""
    bad: list[str] = []
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            ok = bool(torch.isfinite(obj).all())
            if ok and limit is not None and obj.numel():
                ok = float(obj.detach().abs().max()) < limit
            if not ok:
                bad.append(prefix or "tensor")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            bad += nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k), limit)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad += nonfinite_tensors(v, f"{prefix}[{i}]", limit)
    return bad


class CheckpointManager:
    """Atomic save / resume of training state in one output directory.

    A state is saved only when every tensor of its ``model`` and ``optimizer`` entries is finite, so
    the folder's checkpoints are always "good"; :attr:`last_good` describes the newest one for the
    divergence message (:meth:`diverged`).

    Args:
        output_dir: the run's folder (created if absent).
        keep: how many periodic ``checkpoint-<step>.pth`` files to keep (0 keeps all).
    """

    def __init__(self, output_dir: str | Path, keep: int = 0):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.last_good = (f"{self.latest_path}" if self.latest_path.exists()
                          else f"none written yet in {self.dir}")

    def resumed(self, source: str | Path, label: str) -> None:
        """Record that training continues from ``source`` (``label`` e.g. "epoch 3", "iteration 40")."""
        source = Path(source)
        if source.resolve() == self.latest_path.resolve():
            self.last_good = f"{source} ({label})"
        else:
            self.last_good = f"none written yet in {self.dir} (resumed from {source}, {label})"

    def diverged(self, what: str) -> TrainingDivergedError:
        """The one-line error ending a run whose loss / weights became non-finite (``what`` says
        where, e.g. "iteration 7: loss is nan"); raise it."""
        return TrainingDivergedError(f"{what}; training stopped, last good checkpoint kept: {self.last_good}")

    def check_finite(self, state: dict, label: str) -> None:
        """Raise :meth:`diverged` when a ``model`` tensor of ``state`` is NaN/inf or has a value of
        magnitude >= :data:`WEIGHT_LIMIT`, or an ``optimizer`` tensor is NaN/inf."""
        bad = nonfinite_tensors(state.get("model"), "model", WEIGHT_LIMIT) + \
            nonfinite_tensors(state.get("optimizer"), "optimizer")
        if bad:
            raise self.diverged(f"{label}: {len(bad)} non-finite or overflowing (|w| >= {WEIGHT_LIMIT:.2g}) "
                                f"weight/optimizer tensors (e.g. {bad[0]}), checkpoint not written")

    @property
    def latest_path(self) -> Path:
        return self.dir / LATEST

    def save(self, state: dict, step: int | None = None, periodic: bool = False, label: str | None = None,
             write: bool = True, record: dict | None = None) -> Path:
        """Write ``state`` (plus the RNG snapshot) as ``checkpoint-latest.pth``; with ``periodic``
        also as ``checkpoint-<step>.pth``, then, when ``record`` is given (the pretraining's
        compute totals), list it in ``snapshots.json`` before the latest file is replaced (a run
        killed in between redoes the step and lists it again). Returns the latest path.

        Under DDP every rank calls it with the same state and ``write=is_main_process()``: every rank
        checks the state (so an unhealthy one stops all of them together) and records the checkpoint
        as its last good one, and only the main rank writes the file.

        Raises:
            TrainingDivergedError: a model / optimizer tensor is NaN/inf (nothing is written).
        """
        label = label or (f"step {step}" if step is not None else "checkpoint")
        self.check_finite(state, label)
        if not write:
            self.last_good = f"{self.latest_path} ({label}, written by the main process)"
            return self.latest_path
        state = dict(state)
        state.setdefault("rng", rng_state())
        if periodic and step is not None:
            atomic_save(state, self.dir / f"checkpoint-{step}.pth")
            if record is not None:
                self._list_snapshot(step, record)
            self._prune()
        path = atomic_save(state, self.latest_path)
        self.last_good = f"{path} ({label})"
        return path

    def _list_snapshot(self, step: int, record: dict | None) -> None:
        entries = [e for e in read_snapshots(self.dir) if e["step"] != int(step)]
        entries.append({"step": int(step), "file": f"checkpoint-{int(step)}.pth", **(record or {})})
        atomic_write_json({"snapshots": sorted(entries, key=lambda e: e["step"])}, self.dir / SNAPSHOTS)

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        snaps = sorted(self.dir.glob("checkpoint-*.pth"), key=_step_of)
        snaps = [p for p in snaps if _step_of(p) >= 0]
        gone = snaps[:-self.keep]
        if gone and (self.dir / SNAPSHOTS).is_file():  # unlisted first: a listed snapshot always exists
            names = {p.name for p in gone}
            entries = [e for e in read_snapshots(self.dir) if e["file"] not in names]
            atomic_write_json({"snapshots": entries}, self.dir / SNAPSHOTS)
        for p in gone:
            p.unlink(missing_ok=True)

    def load_latest(self, restore_rng: bool = True) -> dict | None:
        """The latest state, or ``None`` when the folder holds none. Restores RNGs when asked.

        Raises:
            UserError: the latest checkpoint exists but cannot be read.
        """
        if not self.latest_path.exists():
            return None
        state = safe_torch_load(self.latest_path)
        if not isinstance(state, dict) or "model" not in state:
            raise UserError(f"{self.latest_path}: not a training checkpoint (no 'model' entry)")
        if restore_rng and "rng" in state:
            set_rng_state(state["rng"])
        return state


def read_snapshots(folder: str | Path) -> list[dict]:
    """The entries of ``<folder>/snapshots.json`` (``[]`` when absent), sorted by step. Each is a
    dict with ``step`` (int >= 0), ``file`` (``checkpoint-<step>.pth``, inside ``folder``) and the
    writer's record. The file is untrusted: read through :func:`crossmae.safeio.load_json` (a regular
    file inside ``folder``, never a symlink or FIFO, bounded); entries without a valid step / file
    name are dropped.

    Raises:
        UserError: the file exists but is not a regular JSON file holding an object with a
            ``snapshots`` list.
    """
    from .safeio import load_json
    path = Path(folder) / SNAPSHOTS
    doc = load_json(path, "object", folder, missing_ok=True)
    if doc is None:
        return []
    if not isinstance(doc.get("snapshots"), list):
        raise UserError(f"{path}: not a snapshot list (expected {{\"snapshots\": [...]}})")
    out = []
    for e in doc["snapshots"]:
        if isinstance(e, dict) and isinstance(e.get("step"), int) and not isinstance(e["step"], bool) \
                and e["step"] >= 0 and e.get("file") == f"checkpoint-{e['step']}.pth":
            out.append(e)
    return sorted(out, key=lambda e: e["step"])


def _step_of(p: Path) -> int:
    m = re.fullmatch(r"checkpoint-(\d+)\.pth", p.name)
    return int(m.group(1)) if m else -1


def state_dict_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` without DDP / torch.compile wrappers' prefixes."""
    return unwrap(model).state_dict()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP / torch.compile wrappers."""
    m = model
    while hasattr(m, "module") or hasattr(m, "_orig_mod"):
        m = getattr(m, "module", None) or getattr(m, "_orig_mod")
    return m


def load_state(obj: Any, state: Any) -> None:
    """``obj.load_state_dict(state)`` when both exist (optimizer, scaler, scheduler)."""
    if obj is not None and state is not None:
        obj.load_state_dict(state)
