"""Places365-Standard classification transfer (fine-tuning, or ``--protocol linprobe``).

Data: the official Places365-Standard layout (``places365_train_standard.txt``, ``places365_val.txt``,
``data_256/``, ``val_256/``, ``categories_places365.txt``; class index = official id, see
``transfer.classification.data.load_places365``). Recipe: the MAE fine-tuning recipe (REFERENCE.md section 3), 365
classes.

Usage::

    python -m transfer.places --backbone ckpt.pth --config paper_vit_base --output-dir out/places
    python -m transfer.places --backbone ckpt.pth --config paper_vit_base --protocol linprobe --output-dir out/places_lp
"""
from __future__ import annotations

from transfer.classification.commands import dataset_command

build_parser, main = dataset_command("places", "Places365-Standard classification transfer.")

if __name__ == "__main__":
    main()
