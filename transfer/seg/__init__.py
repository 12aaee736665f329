"""Semantic segmentation components of the ADE20K task (``transfer.ade20k``): UperNet model, ADE20K
data pipeline, mIoU metrics, layer-decay optimiser groups. See ``docs/ade20k.md``."""
