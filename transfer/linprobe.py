"""Linear probing of a frozen pretrained ViT: ``--protocol mae|fast|blocks|knn``.

Protocols: ``transfer/classification/linprobe.py`` (facebookresearch/mae ``main_linprobe.py``, plus the
fast cached multi-head probe, the per-block probe and kNN).

Usage::

    python -m transfer.linprobe --backbone ckpt.pth --config paper_vit_base --protocol fast --output-dir out/lp
"""
from __future__ import annotations

from transfer.classification.commands import linprobe_command

build_parser, main = linprobe_command()

if __name__ == "__main__":
    main()
