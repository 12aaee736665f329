"""Dependency direction of the four packages: crossmae <- transfer <- benchmarks <- slurm.

A module of a package never imports a package to its right (docs/CONTRACTS.md, COMMON rules). The
imports are read with :mod:`ast` from every ``.py`` file of the tree (no import is executed), so the
check costs milliseconds: ``import x.y``, ``from x import y``, relative imports (resolved against
the module's own package), imports inside functions, and ``importlib.import_module("x")`` /
``__import__("x")`` with a literal name all count.
"""
from __future__ import annotations

import ast
from pathlib import Path

from crossmae.utils import REPO_ROOT

ORDER = ("crossmae", "transfer", "benchmarks", "slurm")


def _imported_packages(source: str, module: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in ``source``; ``module`` is the dotted name of the
    file (``transfer.vitdet.model``), used to resolve relative imports."""
    out = []
    tree = ast.parse(source)
    pkg_parts = module.split(".")[:-1]  # the package the module lives in
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: level 1 = own package, 2 = its parent, ...
                base = pkg_parts[:len(pkg_parts) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name.split(".")[0]))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if fname in ("import_module", "__import__"):
                out.append((node.lineno, node.args[0].value.split(".")[0]))
    return out


def _violations(root: Path) -> list[str]:
    bad = []
    for i, pkg in enumerate(ORDER):
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root)
            module = ".".join(rel.with_suffix("").parts)
            for line, imported in _imported_packages(path.read_text(), module):
                if imported in ORDER[i + 1:]:
                    bad.append(f"{rel}:{line} imports {imported}")
    return bad


def test_no_package_imports_a_package_to_its_right():
    assert all((REPO_ROOT / p / "__init__.py").is_file() for p in ORDER)
    assert _violations(REPO_ROOT) == []


def test_the_check_sees_every_kind_of_import(tmp_path):
    """The checker itself: each way of importing is caught, allowed directions are not reported."""
    files = {
        "crossmae/a.py": "import transfer.coco\n",
        "crossmae/b.py": "def f():\n    from benchmarks import leaderboard\n",
        "transfer/c.py": "import importlib\nimportlib.import_module('slurm.submit')\n",
        "transfer/sub/d.py": "from ...slurm import tasks\n",  # relative, climbing above the package
        "benchmarks/e.py": "x = __import__('slurm')\nfrom crossmae import utils\nfrom . import e\n",
        "slurm/f.py": "import benchmarks, transfer, crossmae\nfrom .tasks import TaskSpec\n",
    }
    for rel, src in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(src)
    assert _violations(tmp_path) == ["crossmae/a.py:1 imports transfer", "crossmae/b.py:2 imports benchmarks",
                                     "transfer/c.py:2 imports slurm", "transfer/sub/d.py:1 imports slurm",
                                     "benchmarks/e.py:1 imports slurm"]
