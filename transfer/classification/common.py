"""Plumbing shared by the classification protocols (fine-tuning, linear probes; ImageNet, iNat, Places).

The run life cycle (parser, config, run folder, logs, metrics file) is ``crossmae.runs``, shared by
every command; this module adds what only classification needs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from crossmae import engine
from crossmae.lr_sched import adjust_learning_rate, lr_at  # noqa: F401  (MAE util/lr_sched.py)
from crossmae.runs import (Timer, amp_dtype_for, backbone_sha, batch_layout, build_parser, code_version,  # noqa: F401
                           default_preset, finish_run, prepare_run, provenance, report_dict, resolve_config)
from crossmae.utils import REPO_ROOT, UserError, atomic_write_json, seed_worker

from .data import ShardSampler

CONFIG_ROOT = REPO_ROOT / "configs"


def load_cls_backbone(path: str, cfg, *, num_classes: int, global_pool: str, drop_path_rate: float = 0.0):
    """A timm ViT with the encoder of checkpoint ``path`` loaded through the backbone API
    (``crossmae.load_backbone``; pos_embed interpolated bicubically to ``cfg.input_size``).

    Returns ``(model, LoadReport)``. Raises ``UserError`` (``BackboneLoadError``) for a bad checkpoint.
    """
    from crossmae import load_backbone  # the lead's backbone API (CONTRACTS.md)
    return load_backbone(path, arch=cfg.get("arch"), img_size=cfg.input_size, num_classes=num_classes,
                         global_pool=global_pool, drop_path_rate=drop_path_rate)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at C).

    logits: (B, C); target: (B,) int64. Returns a list of ints, one per k.
    """
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hit = pred.eq(target[:, None])
    return [int(hit[:, :min(k, maxk)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp_dtype=None,
             collect: list | None = None) -> dict:
    """Top-1 / top-5 accuracy (%) and mean CE loss of ``model`` over ``loader``. Under DDP each rank
    sees a disjoint, unpadded shard (:class:`ShardSampler`: every image counted once) and the counts
    are summed over the process group (:func:`crossmae.engine.reduce_sum`, float64: the integer
    counts add up exactly). Returns ``{'top1','top5','loss'}``.

    With ``collect`` (a list), the per-sample rows ``(dataset index, label, top-5 classes, top-5
    softmax probabilities)`` of every rank are appended to it on rank 0, in dataset order
    (:func:`crossmae.engine.gather_to_main`, through the process group; nothing on other ranks). The
    loader's sampler must expose the indices it yields as ``.idx``, as :class:`ShardSampler` does."""
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1, top5, loss sum
    order = list(getattr(loader.sampler, "idx", range(len(loader.dataset))))
    rows, pos = [], 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with engine.autocast(device, amp_dtype):
            out = model(x)
        out = out.float()
        c1, c5 = topk_correct(out, y)
        stats += torch.tensor([len(y), c1, c5, float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))],
                              dtype=torch.float64, device=device)
        if collect is not None:
            rows += top5_rows(out, y, order[pos:pos + len(y)])
        pos += len(y)
    if collect is not None:
        collect += engine.gather_to_main(rows, key=lambda r: r[0])
    engine.reduce_sum(stats)
    n = max(stats[0].item(), 1.0)
    return {"top1": 100.0 * stats[1].item() / n, "top5": 100.0 * stats[2].item() / n,
            "loss": stats[3].item() / n}


def top5_rows(scores: torch.Tensor, labels: torch.Tensor, indices) -> list[tuple]:
    """Per-sample prediction rows ``(index, label, [top-k classes], [their probabilities])`` with
    k = min(5, C); ``scores`` (B, C) are logits (softmaxed here) or, with ``probs=True`` semantics,
    already-normalised votes (a softmax of log-probabilities is the identity)."""
    p = scores.float().softmax(1)
    v, i = p.topk(min(5, p.shape[1]), dim=1)
    return [(int(n), int(y), i[r].tolist(), v[r].tolist()) for r, (n, y) in enumerate(zip(indices, labels.tolist()))]


def write_predictions(run, rows: list[tuple], data, data_root) -> str:
    """Write the ``classification/v1`` predictions of CONTRACTS.md to ``<run>/predictions.json``
    (main process) and return its path relative to the run folder. ``rows``: :func:`top5_rows` of
    the evaluation split ``data`` (a ``ClassificationData``), in any order; image paths are written
    relative to ``data_root`` when below it."""
    rows = sorted(rows, key=lambda r: r[0])
    root = Path(data_root).resolve()

    def rel(p):
        p = Path(p).resolve()
        return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)
    obj = {"format": "classification/v1", "images": [rel(data.samples[r[0]][0]) for r in rows],
           "labels": [r[1] for r in rows], "top5": [r[2] for r in rows], "scores": [r[3] for r in rows]}
    if run.main:
        atomic_write_json(obj, run.out / "predictions.json")
    return "predictions.json"


def data_provenance(cfg, data_root, train, val) -> dict:
    """The provenance keys of ``metrics.json`` for a classification run: the list / json files the
    splits were read from (and Places365's category file), image counts."""
    files = [train.source, val.source]
    if cfg.data.get("type") == "places365":
        from .data import PLACES_CATEGORIES
        files.append(Path(data_root) / cfg.data["root"] / PLACES_CATEGORIES)
    return provenance(data_root, files, num_train=len(train.samples), num_eval=len(val.samples))


def json_dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


# --------------------------------------------------------------------------------------------------
# training loop shared by fine-tuning and the MAE linear probe (MAE engine_finetune.train_one_epoch)
# --------------------------------------------------------------------------------------------------
def resume_state(run, module, optimizer) -> tuple[int, list, float, dict | None]:
    """Resume through the driver (:meth:`crossmae.runs.Run.resume`): ``state['model']`` into ``module``
    (DDP unwrapped), the optimizer state, the RNG states. Returns ``(start_epoch, history,
    previous_wall_time, state)``, or ``(0, [], 0.0, None)`` without a checkpoint.

    Raises:
        UserError: the checkpoint lacks ``model`` / ``optimizer`` / ``epoch`` or does not fit.
    """
    state = run.resume(model=module, optimizer=optimizer, required=("model", "optimizer", "epoch"),
                       label=lambda st: f"epoch {st['epoch']}")
    if state is None:
        return 0, [], 0.0, None
    run.log.info(f"resumed from {run.resume_from} after epoch {state['epoch']}")
    return state["epoch"] + 1, list(state.get("history", [])), float(state.get("wall_time", 0.0)), state


def epoch_end(run, rec: dict, *, task: str, state: dict | None, history: list, timer: Timer,
              hook=None, periodic: bool = False) -> None:
    """Log an epoch record (``run.log`` + the run's TensorBoard writer), save ``state`` (+ epoch,
    history, wall time) through the run's CheckpointManager when given (every rank checks it, the
    main process writes), then call ``hook(epoch)`` (tests simulate preemption there)."""
    epoch = rec["epoch"]
    run.log.info(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
    tb = run.tensorboard()
    if tb is not None:
        engine.log_scalars(tb, {k: v for k, v in rec.items() if k != "epoch"}, epoch, f"{task}/")
        tb.flush()
    if state is not None:
        run.ckpt.save(dict(state, epoch=epoch, history=history, wall_time=timer.elapsed), step=epoch,
                      periodic=periodic, label=f"epoch {epoch}", write=run.main)
    if hook is not None:
        hook(epoch)


def train_one_epoch(epoch: int, *, cfg, loader, optimizer, lr: float, loss_fn, ckpt, params=None,
                    accum_iter: int | None = None) -> dict:
    """One epoch of MAE's ``engine_finetune.train_one_epoch``: per-iteration lr (warmup + cosine,
    :func:`adjust_learning_rate` at fractional epochs, updated every ``accum_iter`` steps; default
    ``cfg.accum_iter``), gradient accumulation, optional ``clip_grad`` over ``params``. ``loss_fn(x, y) -> scalar loss``; ``ckpt``
    the run's :class:`crossmae.checkpoint.CheckpointManager` (named in the divergence error). The
    steps are :mod:`crossmae.engine`'s.

    Returns ``{'epoch', 'train_loss', 'lr'}``.

    Raises:
        TrainingDivergedError: a non-finite loss (the message names ``ckpt``'s last good checkpoint).
    """
    from crossmae import engine
    params = None if params is None else list(params)  # a generator would be used up by the first clip
    steps = len(loader)
    accum = int(accum_iter or cfg.accum_iter or 1)
    total, n, cur = 0.0, 0, 0.0
    optimizer.zero_grad()
    for it, (x, y) in enumerate(loader):
        if it % accum == 0:
            cur = adjust_learning_rate(optimizer, it / steps + epoch, lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
        loss = loss_fn(x, y)
        value = engine.loss_value(loss, ckpt, f"epoch {epoch} iteration {it}", detail=lambda: f"lr {cur:.3g}")
        engine.backward(loss, accum)
        if (it + 1) % accum == 0:
            engine.optimizer_step(optimizer, None, cfg.get("clip_grad"), params)
        total, n = total + value, n + 1
    return {"epoch": epoch, "train_loss": total / max(n, 1), "lr": cur}


def eval_due(cfg, epoch: int) -> bool:
    """Evaluate every ``eval_period`` epochs (0: only after the last one) and after the last one."""
    return engine.due(epoch + 1, cfg.get("eval_period"), epoch + 1 == cfg.epochs)


def final_metrics(history: list) -> dict:
    """``top1``/``top5`` of the last evaluated epoch and ``top1_best`` (MAE's max accuracy)."""
    ev = [h for h in history if "top1" in h]
    if not ev:
        raise RuntimeError("no evaluation was run")
    return {"top1": ev[-1]["top1"], "top5": ev[-1]["top5"], "top1_best": max(h["top1"] for h in ev)}


def batch_and_lr(cfg, world: int) -> tuple[int, int, int, float]:
    """``(per_device_batch, accum_iter, total_batch, lr)`` on ``world`` processes: the batch vocabulary
    of :func:`crossmae.runs.batch_layout` (``batch_size`` per device, ``total_batch_size`` per
    optimizer step, ``accum_iter``) and MAE's ``lr = blr * total_batch / 256``; ``cfg.lr`` when set wins.

    Raises:
        UserError: the batch values do not fit the number of processes.
    """
    per, accum, total = batch_layout(cfg, world)
    lr = cfg.lr if cfg.get("lr") is not None else cfg.blr * total / 256
    return per, accum, total, lr


def make_loaders(cfg, train_ds, val_ds, per_gpu_batch: int, rank: int, world: int):
    """Train loader (DistributedSampler shuffle seeded by ``cfg.seed``, ``set_epoch`` per epoch,
    drop_last as MAE) and a sharded, unpadded eval loader."""
    from torch.utils.data import DataLoader, DistributedSampler
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    train = DataLoader(train_ds, batch_size=per_gpu_batch, sampler=sampler, num_workers=cfg.num_workers,
                       pin_memory=torch.cuda.is_available(), drop_last=True, worker_init_fn=seed_worker,
                       persistent_workers=False)
    val = DataLoader(val_ds, batch_size=cfg.get("eval_batch_size", per_gpu_batch),
                     sampler=ShardSampler(len(val_ds), rank, world), num_workers=cfg.num_workers, drop_last=False)
    if len(train) == 0:
        raise UserError(f"config batch: {per_gpu_batch} images per device is more than the "
                        f"{len(sampler)} train images per device (drop_last); lower "
                        f"total_batch_size / batch_size")
    return sampler, train, val
