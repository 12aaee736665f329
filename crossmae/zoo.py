"""Where a ``--backbone`` value points: the one place every command resolves it.

``resolve_backbone(spec)`` turns the value of ``--backbone`` into a local checkpoint file. Today it
accepts a local path; the released-checkpoint registry and remote URIs (``zoo:NAME``, ``hf://…``,
``timm:…``, ``http(s)://…``) are resolved here too (issue: released checkpoints by name), so no
command checks a backbone path on its own.
"""
from __future__ import annotations

from pathlib import Path

from .utils import UserError


def resolve_backbone(spec: str | Path) -> Path:
    """The local checkpoint file that ``spec`` (a ``--backbone`` value) names.

    Args:
        spec: a path to a ``.pth`` / ``.pt`` / ``.safetensors`` file.

    Returns:
        the file's ``Path``.

    Raises:
        UserError: the file does not exist (one line naming it).
    """
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"{spec}: --backbone checkpoint not found")
    return path
