"""Layer-wise lr decay parameter groups and the warmup + poly schedule of mmseg's MAE UperNet recipe.

Sources: ``mmseg/engine/optimizers/layer_decay_optimizer_constructor.py``
(``LearningRateDecayOptimizerConstructor`` with ``decay_type='layer_wise_vit'``) and the config's
``param_scheduler`` (mmengine ``LinearLR`` then ``PolyLR``).

The layer ids are the shared rule (:func:`crossmae.lr_sched.vit_layer_id`); the groups are built
here rather than with MAE's ``param_groups_lrd`` because mmseg's weight-decay rule differs in one place: its no-weight-decay test compares the FULL parameter
name with ``'pos_embed'`` / ``'cls_token'``, which never matches ``backbone.pos_embed``, so
``pos_embed`` and ``cls_token`` (3-D tensors) DO get weight decay in mmseg. We reproduce that.
"""
from __future__ import annotations

import torch.nn as nn

from crossmae.lr_sched import vit_layer_id


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """mmseg ``get_layer_id_for_vit`` with ``max_layer_id = num_layers + 2``: ``backbone.cls_token``,
    ``backbone.pos_embed``, ``backbone.patch_embed.*`` → 0; ``backbone.blocks.i.*`` → i + 1;
    everything else (neck, heads) → ``num_layers + 1``."""
    return vit_layer_id(name, num_layers, prefix="backbone.")


def param_groups_layer_decay(model: nn.Module, base_lr: float, weight_decay: float, decay_rate: float,
                             num_layers: int) -> list[dict]:
    """AdamW parameter groups: ``lr_scale = decay_rate ** (num_layers + 1 − layer_id)``; weight decay
    0 for 1-D parameters and ``*.bias`` (mmseg's rule, see the module docstring), else
    ``weight_decay``. Each group carries ``lr_scale``, ``lr`` (= base_lr · scale) and ``group_name``.
    """
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith(".bias")
        lid = layer_id_for_vit(name, num_layers)
        key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            scale = decay_rate ** (num_layers + 1 - lid)
            groups[key] = {"params": [], "param_names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": scale, "lr": base_lr * scale, "group_name": key}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def lr_factor(it: int, warmup_iters: int, warmup_start_factor: float, max_iters: int,
              power: float = 1.0, eta_min_factor: float = 0.0) -> float:
    """Multiplier of each group's base lr at iteration ``it`` (0-based, before the step).

    ``[0, warmup)``: mmengine ``LinearLR(start_factor, end_factor=1)`` —
    ``start + (1 − start) · it / warmup``; ``[warmup, max)``: ``PolyLR(power, eta_min=0)`` —
    ``(1 − (it − warmup) / (max − warmup)) ** power``.
    """
    if it < warmup_iters:
        return warmup_start_factor + (1.0 - warmup_start_factor) * it / warmup_iters
    span = max(max_iters - warmup_iters, 1)
    frac = min(max(it - warmup_iters, 0) / span, 1.0)
    return (1.0 - eta_min_factor) * (1.0 - frac) ** power + eta_min_factor

