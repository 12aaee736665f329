"""Helpers for the ADE20K tests and benchmark: tiny real checkpoints and data locations.

Nothing here is used by the command itself.
"""
from __future__ import annotations

from pathlib import Path

import torch


ADE_SUBDIR = "ade20k/ADEChallengeData2016"          # 4 real ADE20K pairs, 150 classes
COCO_SEMSEG_SUBDIR = "coco_semseg/ADEChallengeData2016"  # 80 + 20 real pairs, 80 classes


def require_dir(root: Path) -> Path:
    """``root``, or skip the calling test (pytest) when the real data folder is absent."""
    import pytest
    if not Path(root).is_dir():
        pytest.skip(f"real data not found at {root}")
    return Path(root)


def tiny_checkpoint(path: str | Path, kind: str = "mae", seed: int = 0) -> Path:
    """Save an official-layout pretraining checkpoint ``{'model': state_dict}`` of the suite's tiny
    ViT (64 wide, 4 deep) built by ``crossmae.models.create_model('<kind>_vit_tiny_patch16')``."""
    from crossmae.models import create_model
    torch.manual_seed(seed)
    m = create_model(f"{kind}_vit_tiny_patch16")
    path = Path(path)
    torch.save({"model": m.state_dict()}, path)
    return path


#: ``--cfg-options`` that shrink the ``smoke`` preset further for unit tests (2 images per step,
#: 2 validation images, no overlays).
FAST_OPTIONS = ["train.total_batch_size=2", "train.log_period=1", "test.max_images=2", "test.num_overlays=1"]

