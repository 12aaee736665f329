"""Learning-rate rules of MAE / CrossMAE pretraining.

- :func:`scaled_lr`: absolute lr from the base lr (linear scaling rule, Goyal et al. 2017) and, for
  CrossMAE, the prediction-ratio factor γ/p (CrossMAE paper §3.4 and Appendix A.6:
  ``lr = γ · blr · batch / (256 · p)``; CrossMAE ``main_pretrain.py`` ``base_ratio``). For MAE γ = p.
- :func:`lr_at` / :func:`adjust_learning_rate`: linear warmup then half-cycle cosine, evaluated per
  iteration at a fractional epoch (MAE ``util/lr_sched.adjust_learning_rate``).
- :func:`vit_layer_id` / :func:`set_group_lrs`: the layer-wise lr decay rule every transfer task
  uses (each task keeps its own reference's weight-decay rule).
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


def vit_layer_id(name: str, depth: int, prefix: str = "") -> int:
    """Layer id of a parameter for layer-wise lr decay — BEiT's rule, as in MAE
    ``util/lr_decay.get_layer_id_for_vit``, mmseg ``get_layer_id_for_vit`` and detectron2
    ``get_vit_lr_decay_rate``.

    With ``prefix`` the ViT's parameter prefix inside the task model (``""``, ``"backbone."``,
    ``"backbone.net."``): ``cls_token`` / ``mask_token`` / ``pos_embed`` / ``patch_embed.*`` → 0,
    ``blocks.i.*`` → i + 1, everything else (final norm, head, neck, decoders) → ``depth + 1``.
    The lr scale of a parameter is then ``decay ** (depth + 1 − id)``.
    """
    rest = name[len(prefix):] if name.startswith(prefix) else None
    if rest is None:
        return depth + 1
    if rest in ("cls_token", "mask_token", "pos_embed") or rest.startswith("patch_embed"):
        return 0
    if rest.startswith("blocks."):
        return int(rest.split(".")[1]) + 1
    return depth + 1


def set_group_lrs(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    """Set every param group's lr to ``base_lr · lr_scale · factor`` (``lr_scale`` 1 when absent)."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr * g.get("lr_scale", 1.0) * factor
