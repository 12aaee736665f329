"""Semantic-segmentation metrics: mIoU, mAcc, aAcc (mmseg ``evaluation/metrics/iou_metric.py``).

Definition (mmseg ``IoUMetric.intersect_and_union`` + ``total_area_to_metrics``): pixels whose
label is the ignore index (255) are dropped; over the WHOLE split, per class c,
``intersect_c`` = pixels predicted c with label c, ``union_c = pred_c + label_c − intersect_c``;
``IoU_c = intersect_c / union_c`` and ``Acc_c = intersect_c / label_c`` (NaN when the denominator is
0: a class absent from both prediction and ground truth has no IoU, a class absent from the ground
truth has no Acc). ``mIoU`` / ``mAcc`` = NaN-mean × 100, ``aAcc = Σ intersect / Σ label × 100``.
mmseg rounds the summaries to 2 decimals; we keep full precision (round to compare).
"""
from __future__ import annotations

import math

import torch


class ConfusionMatrix:
    """Accumulates a ``(K, K)`` int64 confusion matrix (rows = ground truth, cols = prediction)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.k = int(num_classes)
        self.ignore_index = ignore_index
        self.mat = torch.zeros(self.k, self.k, dtype=torch.int64)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """``pred``, ``label``: integer tensors of the same shape (e.g. ``(H, W)``).

        Raises:
            ValueError: shapes differ, or a non-ignored label / a prediction is outside ``0..K-1``.
        """
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
        keep = label != self.ignore_index
        p, t = pred[keep].long().cpu(), label[keep].long().cpu()
        if t.numel() and (t.min() < 0 or t.max() >= self.k):
            raise ValueError(f"label value {int(t.max())} outside 0..{self.k - 1}")
        if p.numel() and (p.min() < 0 or p.max() >= self.k):
            raise ValueError(f"prediction value {int(p.max())} outside 0..{self.k - 1}")
        self.mat += torch.bincount(t * self.k + p, minlength=self.k * self.k).view(self.k, self.k)

    def all_reduce(self) -> None:
        """Sum the matrix over DDP ranks (no-op when not distributed)."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dev = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
            m = self.mat.to(dev)
            dist.all_reduce(m)
            self.mat = m.cpu()

    def compute(self) -> dict:
        """``{'mIoU', 'mAcc', 'aAcc'}`` (percent, floats) plus ``'IoU'`` and ``'Acc'`` (per-class lists,
        percent, ``None`` where undefined)."""
        return metrics_from_confusion(self.mat)


def metrics_from_confusion(mat: torch.Tensor) -> dict:
    """mIoU / mAcc / aAcc from a confusion matrix; see the module docstring for the definition."""
    mat = mat.double()
    inter = mat.diag()
    area_label = mat.sum(1)
    area_pred = mat.sum(0)
    union = area_pred + area_label - inter
    iou = inter / union  # 0/0 -> nan
    acc = inter / area_label
    total = area_label.sum()
    return {
        "mIoU": _nanmean(iou) * 100,
        "mAcc": _nanmean(acc) * 100,
        "aAcc": float(inter.sum() / total * 100) if total > 0 else float("nan"),
        "IoU": [None if math.isnan(v) else v * 100 for v in iou.tolist()],
        "Acc": [None if math.isnan(v) else v * 100 for v in acc.tolist()],
    }


def _nanmean(x: torch.Tensor) -> float:
    valid = ~torch.isnan(x)
    return float(x[valid].mean()) if valid.any() else float("nan")
