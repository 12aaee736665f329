"""iNaturalist 2019 classification transfer (fine-tuning, or ``--protocol linprobe``).

Data: the official layout (``train2019.json``, ``val2019.json``, ``train_val2019/…``; class index =
rank of the category id, see ``transfer.classification.data.load_inat2019``). Recipe: the MAE fine-tuning recipe
(REFERENCE.md section 3: MAE publishes no iNat-specific recipe), 1010 classes.

Usage::

    python -m transfer.inat --backbone ckpt.pth --config paper_vit_base --output-dir out/inat
    python -m transfer.inat --backbone ckpt.pth --config paper_vit_base --protocol linprobe --output-dir out/inat_lp
"""
from __future__ import annotations

from transfer.classification.commands import dataset_command

build_parser, main = dataset_command("inat", "iNaturalist 2019 classification transfer.")

if __name__ == "__main__":
    main()
