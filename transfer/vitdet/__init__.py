"""ViTDet Mask R-CNN for ``transfer.coco``: backbone (ViT + simple feature pyramid), detector,
COCO data, evaluation and optimiser groups, configured like detectron2 ``projects/ViTDet``."""
