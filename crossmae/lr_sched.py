"""Learning-rate rules of MAE / CrossMAE pretraining.

- :func:`scaled_lr`: absolute lr from the base lr (linear scaling rule, Goyal et al. 2017) and, for
  CrossMAE, the prediction-ratio factor γ/p (CrossMAE paper §3.4 and Appendix A.6:
  ``lr = γ · blr · batch / (256 · p)``; CrossMAE ``main_pretrain.py`` ``base_ratio``). For MAE γ = p.
- :func:`lr_at` / :func:`adjust_learning_rate`: linear warmup then half-cycle cosine, evaluated per
  iteration at a fractional epoch (MAE ``util/lr_sched.adjust_learning_rate``).
"""
from __future__ import annotations

import math

import torch


def scaled_lr(blr: float, effective_batch: int, mask_ratio: float, kept_mask_ratio: float | None,
              scale_by_ratio: bool = True) -> float:
    """``blr · effective_batch / 256 · (γ/p if scale_by_ratio else 1)``; γ None means γ = p (MAE).

    Args:
        blr: base lr per 256 images. effective_batch: batch per GPU × accumulation × world size.
        mask_ratio: p. kept_mask_ratio: γ (fraction of ALL patches that are predicted).
        scale_by_ratio: apply γ/p (official ``--no_lr_scale`` turns it off).
    """
    ratio = 1.0 if (kept_mask_ratio is None or not scale_by_ratio) else kept_mask_ratio / mask_ratio
    return blr * effective_batch / 256 * ratio


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """lr at fractional ``epoch`` (0 ≤ epoch < epochs): ``lr · epoch / warmup`` during warmup, then
    ``min_lr + (lr − min_lr) · ½ (1 + cos(π (epoch − warmup) / (epochs − warmup)))``."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, lr: float, min_lr: float,
                         warmup_epochs: float, epochs: float) -> float:
    """Set every param group's lr to :func:`lr_at` (times its ``lr_scale`` when present). Returns it."""
    value = lr_at(epoch, lr, min_lr, warmup_epochs, epochs)
    for group in optimizer.param_groups:
        group["lr"] = value * group.get("lr_scale", 1.0)
    return value
