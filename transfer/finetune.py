"""End-to-end fine-tuning of a pretrained ViT for classification (MAE protocol).

Protocol: ``transfer/classification/finetune.py`` (facebookresearch/mae ``main_finetune.py``).

Usage::

    python -m transfer.finetune --backbone ckpt.pth --config paper_vit_base --output-dir out/ft
"""
from __future__ import annotations

from transfer.classification.commands import finetune_command

build_parser, main = finetune_command()

if __name__ == "__main__":
    main()
