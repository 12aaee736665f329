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


#: fvcore ``ParamScheduler.WHERE_EPSILON``: added to the training fraction before the warmup /
#: schedule switch and before a step schedule's iteration is rounded down.
WHERE_EPSILON = 1e-6


def _multistep(where: float, o: dict, max_iter: int) -> float:
    """fvcore ``MultiStepParamScheduler(values=[gamma**k], milestones, num_updates=max_iter)`` at
    ``where`` (fraction of training): ``gamma ** (#milestones <= floor((where + 1e-6) * max_iter))``."""
    step = int((where + WHERE_EPSILON) * max_iter)
    return o["gamma"] ** bisect.bisect_right(list(o["milestones"]), step)


def lr_factor(it: int, o: dict, max_iter: int) -> float:
    """Multiplier of the base lr at iteration ``it`` (0-based), as detectron2 computes it.

    detectron2 (``solver/lr_scheduler.py``: ``LRMultiplier`` over ``WarmupParamScheduler``, on
    fvcore's ``CompositeParamScheduler``, ``LinearParamScheduler`` and ``MultiStepParamScheduler``)
    evaluates its schedule at the fraction ``where = it / max_iter``; ``warmup_length`` is a
    fraction of the schedule, not a number of iterations. While ``where + 1e-6 <= warmup_length``
    the factor is linear from ``warmup_factor * multistep(0)`` to ``multistep(warmup_length)`` in
    ``where / warmup_length``; afterwards it is ``multistep(where)``, ``gamma ** k`` after ``k``
    milestones (absolute iterations). So ViTDet-B's ``warmup_length = 250 / 184375`` warms up for
    iterations 0..249, and ViTDet-H, which keeps that fraction over its 138,281-iteration
    schedule, for 187.5 iterations (factor 0.001 + 0.999 * it / 187.4997 for it <= 187).

    Args:
        it: iteration, 0 <= it < max_iter; o: the ``optim`` section (``warmup_length`` in [0, 1],
            ``warmup_factor``, ``milestones``, ``gamma``); max_iter: training length in iterations.
    Returns:
        the factor (float); the lr of a group is ``lr * lr_scale * factor``.
    """
    where = it / max_iter
    length = o["warmup_length"]
    if where + WHERE_EPSILON > length:
        return _multistep(where, o, max_iter)
    start = o["warmup_factor"] * _multistep(0.0, o, max_iter)
    end = _multistep(length, o, max_iter)
    alpha = where / length
    return end * alpha + start * (1 - alpha)


def build_optimizer(model: nn.Module, o: dict, num_layers: int) -> torch.optim.AdamW:
    """AdamW(lr, betas, weight decay per group) over :func:`param_groups`."""
    groups = param_groups(model, o, num_layers)
    opt_groups = [{"params": g["params"], "lr": o["lr"] * g["lr_scale"], "weight_decay": g["weight_decay"],
                   "lr_scale": g["lr_scale"]} for g in groups]
    return torch.optim.AdamW(opt_groups, lr=o["lr"], betas=tuple(o["betas"]))

