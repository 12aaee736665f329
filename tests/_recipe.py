"""Helpers of the recipe tests: a preset's values compared one by one with its reference file.

:class:`RecipeCheck` records every comparison ``(name, ours, reference)``; a difference fails the
test unless it is declared as a deliberate exception (with the values both sides must have and
the reason, which is also a row of the task's docs table), and a declared exception that no
comparison used fails too, so the list of exceptions cannot go stale.
"""
from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest


def _norm(v):
    """Lists and tuples compare as tuples, ints and floats by value (1 == 1.0), recursively."""
    if isinstance(v, (list, tuple, Sequence)) and not isinstance(v, str):  # also omegaconf's ListConfig
        return tuple(_norm(x) for x in v)
    if isinstance(v, (dict, Mapping)):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    return v


def _same(a, b) -> bool:
    """Equal after :func:`_norm`; floats (also inside sequences and dicts) to 1e-12 relative."""
    a, b = _norm(a), _norm(b)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


class RecipeCheck:
    """Compares recipe values and counts them.

    ``exceptions``: ``{name: (ours, reference)}``, the deliberate differences (each commented at the
    place it is declared). :meth:`eq` asserts nothing by itself; :meth:`done` fails with the full
    list of mismatches and returns the number of compared values.
    """

    def __init__(self, exceptions: dict | None = None):
        self.exceptions = dict(exceptions or {})
        self.used: set[str] = set()
        self.mismatches: list[str] = []
        self.names: list[str] = []

    def eq(self, name: str, ours, reference) -> None:
        if name in self.names:
            raise AssertionError(f"{name} compared twice")
        self.names.append(name)
        if name in self.exceptions:
            self.used.add(name)
            want_ours, want_ref = self.exceptions[name]
            if not (_same(ours, want_ours) and _same(reference, want_ref)):
                self.mismatches.append(f"{name}: declared exception ours={want_ours!r} reference={want_ref!r}, "
                                       f"found ours={ours!r} reference={reference!r}")
            return
        if not _same(ours, reference):
            self.mismatches.append(f"{name}: ours={ours!r} reference={reference!r}")

    def done(self) -> int:
        unused = sorted(set(self.exceptions) - self.used)
        problems = self.mismatches + [f"{n}: declared exception never compared" for n in unused]
        assert not problems, "recipe differs from its reference file:\n  " + "\n  ".join(problems)
        return len(self.names)


def mmseg_config_dir() -> Path:
    """``configs/`` of the INSTALLED mmsegmentation (shipped in the wheel as ``mmseg/.mim/configs``),
    found without importing mmseg. Skips (or, under CI, fails) when mmseg is not installed."""
    spec = importlib.util.find_spec("mmseg")
    if spec is None or spec.origin is None:
        msg = ("mmsegmentation is not installed (the `test` extra installs mmsegmentation==1.2.2 and "
               "mmcv-lite==2.1.0: pip install -e '.[test]')")
        if os.environ.get("CI"):
            raise RuntimeError(msg + "; CI must run the mmseg oracle")
        pytest.skip(msg)
    d = Path(spec.origin).parent / ".mim" / "configs"
    assert d.is_dir(), f"{d}: the installed mmsegmentation ships no configs"
    return d


def detectron2_src() -> Path:
    """``$DETECTRON2_SRC`` made importable (a detectron2 checkout; never installed or compiled: the
    ViTDet configs and modules need only its Python files and ``fvcore iopath omegaconf hydra-core``).
    Skips with the reason when it is not set or does not import."""
    import sys
    import types
    src = os.environ.get("DETECTRON2_SRC")
    if not src or not (Path(src) / "detectron2" / "__init__.py").is_file():
        pytest.skip("DETECTRON2_SRC is not set to a detectron2 source checkout: the COCO presets are not "
                    "compared with detectron2's ViTDet configs (setup: docs/coco.md)")
    try:
        import pkg_resources  # noqa: F401  (detectron2.model_zoo imports it; gone from recent setuptools)
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, rel: str(Path(src) / rel)  # model_zoo: "configs/<file>"
        sys.modules["pkg_resources"] = shim
    if src not in sys.path:
        sys.path.insert(0, src)
    try:
        import detectron2.config  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: no oracle here
        pytest.skip(f"detectron2 from {src} not importable ({type(exc).__name__}: {exc}); install fvcore iopath "
                    f"omegaconf hydra-core")
    return Path(src)


def env_checkout(var: str, marker: str, what: str) -> Path:
    """The checkout named by ``$var`` (must hold ``marker``), or skip with the reason."""
    src = os.environ.get(var)
    if not src or not (Path(src) / marker).is_file():
        pytest.skip(f"{var} is not set to a checkout holding {marker}: {what} not compared")
    return Path(src)
