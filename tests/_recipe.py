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
from pathlib import Path

import pytest


def _norm(v):
    """Lists and tuples compare as tuples, ints and floats by value (1 == 1.0), recursively."""
    if isinstance(v, (list, tuple)):
        return tuple(_norm(x) for x in v)
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    return v


def _same(a, b) -> bool:
    a, b = _norm(a), _norm(b)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
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
