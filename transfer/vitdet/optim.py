"""ViTDet optimiser parameter groups and learning-rate schedule.

Protocol sources (detectron2): ``solver/build.py: get_default_optimizer_params`` (weight decay of
``torch.nn`` norm layers = ``weight_decay_norm``; biases = ``weight_decay_bias`` (None → the base
weight decay); ``overrides`` by parameter name; lr × ``lr_factor_func(full name)``),
``modeling/backbone/vit.py: get_vit_lr_decay_rate`` (layer-wise decay), ``configs/common/optim.py``
(AdamW) and ``solver/lr_scheduler.py: WarmupParamScheduler`` + fvcore ``MultiStepParamScheduler``.
"""
from __future__ import annotations

import bisect

import torch
import torch.nn as nn

from crossmae.lr_sched import vit_layer_id

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm)


def vit_lr_decay_rate(name: str, lr_decay_rate: float, num_layers: int) -> float:
    """detectron2 ``get_vit_lr_decay_rate``: for ``backbone.*`` parameters, ``.pos_embed`` /
    ``.patch_embed`` are layer 0 and ``.blocks.i.`` layer i+1; everything else (the pyramid, RPN,
    RoI heads) is layer ``num_layers + 1``. Returns ``lr_decay_rate ** (num_layers + 1 - layer)``."""
    return lr_decay_rate ** (num_layers + 1 - vit_layer_id(name, num_layers, prefix="backbone.net."))


def param_groups(model: nn.Module, o: dict, num_layers: int) -> list[dict]:
    """One AdamW group per (lr scale, weight decay) as detectron2 builds them.

    Args:
        model: the detector (names must start with ``backbone.`` for the ViT, as in detectron2).
        o: the ``optim`` config section (``weight_decay``, ``weight_decay_norm``,
            ``weight_decay_bias``, ``weight_decay_overrides`` {param short name: wd}, ``layer_decay``).
    Returns:
        groups with ``params``, ``lr_scale``, ``weight_decay`` and ``names`` (for inspection);
        the absolute lr is set each step as ``lr * lr_scale * schedule(it)``.
    """
    wd = o["weight_decay"]
    wd_norm = o.get("weight_decay_norm")
    wd_bias = o.get("weight_decay_bias")
    overrides = dict(o.get("weight_decay_overrides") or {})
    groups: dict[tuple[float, float], dict] = {}
    seen = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            w = wd
            if isinstance(module, _NORM_TYPES) and wd_norm is not None:
                w = wd_norm
            if pname == "bias" and wd_bias is not None:  # detectron2 puts it in ``overrides``
                w = wd_bias
            if pname in overrides:
                w = overrides[pname]
            scale = vit_lr_decay_rate(full, o["layer_decay"], num_layers)
            g = groups.setdefault((scale, w), {"params": [], "names": [], "lr_scale": scale, "weight_decay": w})
            g["params"].append(p)
            g["names"].append(full)
    return list(groups.values())


def lr_factor(it: int, o: dict, max_iter: int) -> float:
    """Multiplier of the base lr at iteration ``it`` (0-based): MultiStep values ``gamma**k`` after
    ``k`` milestones, times a linear warmup from ``warmup_factor`` over ``warmup_iters``
    (detectron2 ``WarmupParamScheduler(warmup_length=warmup_iters/max_iter, warmup_method='linear')``)."""
    value = o["gamma"] ** bisect.bisect_right(list(o["milestones"]), it)
    w = o["warmup_iters"]
    if it < w:
        alpha = it / w
        value *= o["warmup_factor"] * (1 - alpha) + alpha
    return value


def build_optimizer(model: nn.Module, o: dict, num_layers: int) -> torch.optim.AdamW:
    """AdamW(lr, betas, weight decay per group) over :func:`param_groups`."""
    groups = param_groups(model, o, num_layers)
    opt_groups = [{"params": g["params"], "lr": o["lr"] * g["lr_scale"], "weight_decay": g["weight_decay"],
                   "lr_scale": g["lr_scale"]} for g in groups]
    return torch.optim.AdamW(opt_groups, lr=o["lr"], betas=tuple(o["betas"]))

