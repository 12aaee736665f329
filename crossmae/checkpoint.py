"""Training-state checkpoints shared by the pretraining engine and every transfer task.

Layout of an output directory (every file written atomically, temp file + rename)::

    checkpoint-latest.pth      the newest training state, used to resume (requeue-safe)
    checkpoint-<step>.pth      periodic snapshots (``keep`` newest kept, or all when keep=0)

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

from .utils import UserError, atomic_save, safe_torch_load

LATEST = "checkpoint-latest.pth"


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


class CheckpointManager:
    """Atomic save / resume of training state in one output directory.

    Args:
        output_dir: the run's folder (created if absent).
        keep: how many periodic ``checkpoint-<step>.pth`` files to keep (0 keeps all).
    """

    def __init__(self, output_dir: str | Path, keep: int = 0):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    @property
    def latest_path(self) -> Path:
        return self.dir / LATEST

    def save(self, state: dict, step: int | None = None, periodic: bool = False) -> Path:
        """Write ``state`` (plus the RNG snapshot) as ``checkpoint-latest.pth``; with ``periodic``
        also as ``checkpoint-<step>.pth``. Returns the latest path."""
        state = dict(state)
        state.setdefault("rng", rng_state())
        if periodic and step is not None:
            atomic_save(state, self.dir / f"checkpoint-{step}.pth")
            self._prune()
        return atomic_save(state, self.latest_path)

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        snaps = sorted(self.dir.glob("checkpoint-*.pth"), key=_step_of)
        snaps = [p for p in snaps if _step_of(p) >= 0]
        for p in snaps[:-self.keep]:
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
