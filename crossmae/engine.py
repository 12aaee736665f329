"""The training steps every task's loop shares, one explicit implementation each.

In the style of the MAE reference engine (facebookresearch/mae ``engine_pretrain.py`` /
``engine_finetune.py`` and ``util/misc.NativeScalerWithGradNormCount``): each task keeps its loop
readable top to bottom in its own module (``crossmae.pretrain.train_one_epoch``,
``transfer.coco.train``, ``transfer.ade20k.train``, ``transfer.classification.common.train_one_epoch``)
and calls these steps for the parts that are the same everywhere:

* the per-iteration learning rate: :func:`crossmae.lr_sched.adjust_learning_rate` (MAE's
  warmup + cosine at fractional epochs) or :func:`crossmae.lr_sched.set_group_lrs` (a factor times
  the base lr, times each group's ``lr_scale``);
* :func:`autocast` (bf16 / fp16 on CUDA, off on CPU), :func:`no_sync` (DDP gradient all-reduce only
  on the last micro-batch of an accumulation), :func:`loss_value` (the loss averaged over ranks,
  checked for NaN/inf: :class:`crossmae.checkpoint.TrainingDivergedError` naming the last good
  checkpoint), :func:`backward` (``loss / accum_iter``, through the GradScaler when one is used),
  :func:`optimizer_step` (unscale → optional gradient clipping → step → scaler update → zero grads);
* :func:`log_scalars` (TensorBoard), :func:`due` (periodic checkpoint / evaluation);
* checkpoints through :class:`crossmae.checkpoint.CheckpointManager` (healthy states only);
* evaluation across ranks: :func:`shard` (each item once), :func:`gather_to_main` (per-sample
  results to rank 0, in dataset order), :func:`reduce_sum` (metric sums over the process group).
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device`` with ``dtype``; a no-op context when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def no_sync(model: torch.nn.Module, last_micro_batch: bool):
    """DDP's ``no_sync()`` for every micro-batch but the last of an accumulation (gradients are
    all-reduced once per optimizer step); a no-op for a model that is not DDP-wrapped."""
    if last_micro_batch or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def loss_value(loss: torch.Tensor, ckpts, where: str, world: int = 1, detail=None) -> float:
    """The loss as a Python float, averaged over the ``world`` DDP ranks when ``world > 1`` (every
    rank then sees the same value and they stop together).

    Raises:
        TrainingDivergedError: the value is NaN/inf; the message starts with ``where`` (e.g.
            ``"epoch 3 step 7"``) and names ``ckpts``' last good checkpoint.
    """
    import math
    value = loss.detach().float()
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(value)
        value = value / world
    v = value.item()
    if not math.isfinite(v):
        raise ckpts.diverged(f"{where}: loss is {v}" + (f" ({detail()})" if detail is not None else ""))
    return v


def backward(loss: torch.Tensor, accum_iter: int = 1, scaler=None) -> None:
    """``(loss / accum_iter).backward()``, scaled by the GradScaler when one is given (fp16)."""
    loss = loss / accum_iter
    (scaler.scale(loss) if scaler is not None else loss).backward()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler=None, clip_grad: float | None = None,
                   params: Iterable[torch.nn.Parameter] | None = None) -> None:
    """One optimizer step after the accumulated backward passes: unscale (GradScaler), clip the
    gradient norm of ``params`` to ``clip_grad`` when set, step, update the scaler, zero the grads
    (set to None). MAE ``NativeScalerWithGradNormCount.__call__`` without the norm bookkeeping."""
    if clip_grad is not None and params is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def log_scalars(writer, values: dict, step: int, prefix: str = "") -> None:
    """``writer.add_scalar(prefix + name, value, step)`` for every number of ``values`` (no-op
    without a writer, i.e. on ranks other than 0)."""
    if writer is None:
        return
    for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            writer.add_scalar(f"{prefix}{k}", v, step)


def due(step: int, interval: int | None, last: bool = False) -> bool:
    """True every ``interval`` steps (counted from 1) and at the ``last`` one."""
    return last or bool(interval) and step % int(interval) == 0


# --------------------------------------------------------------------------------------------------
# evaluation across ranks: through the process group, never through a shared folder
# --------------------------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int) -> range:
    """The indices ``rank, rank + world, …`` of ``n`` evaluation items this rank handles: every item
    exactly once over the ranks, none padded or repeated (unlike ``DistributedSampler``, which pads
    the last round with repeats and would count them twice)."""
    rank, world = _world()
    return range(rank, n, world)


def gather_to_main(rows: list, key=None) -> list:
    """Every rank's ``rows`` (picklable per-sample results) concatenated on rank 0 through
    ``torch.distributed.gather_object`` and sorted by ``key`` when given (e.g. the dataset index, so
    the list equals a single-process evaluation's); ``[]`` on the other ranks. Without a process
    group: ``rows`` (sorted by ``key``)."""
    import torch.distributed as dist
    rank, world = _world()
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(rows, parts, dst=0)
        if rank != 0:
            return []
        rows = [r for part in parts for r in part]
    return sorted(rows, key=key) if key is not None else list(rows)


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks in place (``all_reduce``; every rank gets the total) and return
    it; unchanged without a process group. Integer / float64 counts add up exactly."""
    import torch.distributed as dist
    if _world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor


def is_main() -> bool:
    """True on rank 0 of the process group, or without one."""
    return _world()[0] == 0
