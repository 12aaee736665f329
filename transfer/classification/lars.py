"""LARS optimizer of the MAE linear probe (timm has none).

Source: facebookresearch/mae ``util/lars.py`` (itself from MoCo v3): SGD with momentum where every
parameter with more than one dimension has its update ``g + wd * p`` rescaled by the trust ratio
``trust_coefficient * ||p|| / ||g + wd * p||`` (1 when either norm is 0); 1-D parameters (biases,
norms) get plain momentum SGD without weight decay.
"""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    """LARS (MAE ``util/lars.py``), bit-for-bit the reference update.

    Args:
        params: parameters or param groups (``lr_scale`` in a group is honoured by the scheduler).
        lr: learning rate (MAE probe: blr 0.1 × batch / 256).
        weight_decay: applied to >1-D parameters only (MAE probe: 0).
        momentum: 0.9.
        trust_coefficient: 0.001.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:  # if not normalization gamma/beta or bias
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, (g["trust_coefficient"] * param_norm / update_norm), one),
                                    one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


class StackedLARS(torch.optim.Optimizer):
    """H independent MAE-LARS optimizers over stacked heads, in one vectorised update.

    Parameters are stacks along dim 0: a weight (H, C, D) is H matrices, each with its own trust ratio
    ``trust * ||W_h|| / ||g_h + wd W_h||`` (norms over dims 1..); a bias (H, C) is H 1-D parameters
    (plain momentum SGD, no weight decay) — exactly :class:`LARS` applied to each head separately.
    Each group carries ``lr_vec`` (H,), the learning rate of each head (set by the scheduler).
    """

    def __init__(self, params, lr_vec: torch.Tensor, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr_vec=lr_vec, lr=0.0, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                shape = (-1,) + (1,) * (p.ndim - 1)
                if p.ndim > 2:  # stacked matrices: per-head trust ratio
                    dp = dp.add(p, alpha=g["weight_decay"])
                    dims = tuple(range(1, p.ndim))
                    pn = torch.linalg.vector_norm(p, dim=dims)
                    un = torch.linalg.vector_norm(dp, dim=dims)
                    one = torch.ones_like(pn)
                    q = torch.where(pn > 0.0, torch.where(un > 0, g["trust_coefficient"] * pn / un, one), one)
                    dp = dp * q.view(shape)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.sub_(mu * g["lr_vec"].to(p).view(shape))
        return None
