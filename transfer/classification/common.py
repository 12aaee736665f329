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
from crossmae.runs import (Timer, amp_dtype_for, backbone_sha, build_parser, close_logger, code_version,  # noqa: F401
                           default_preset, device_name, finish_run, get_logger, prepare_run, provenance, report_dict,
                           resolve_config, tb_writer)
from crossmae.utils import REPO_ROOT, UserError, atomic_write_json, default_device, seed_worker

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
    """Top-1 / top-5 accuracy (%) and mean CE loss of ``model`` over ``loader`` (summed over DDP
    ranks when distributed: each rank sees a disjoint shard). Returns ``{'top1','top5','loss'}``.

    With ``collect`` (a list), the per-sample rows ``(dataset index, label, top-5 classes, top-5
    softmax probabilities)`` of every rank are appended to it (the loader's sampler must expose the
    indices it yields as ``.idx``, as :class:`ShardSampler` does)."""
    import torch.distributed as dist
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
    distributed = dist.is_available() and dist.is_initialized()
    if collect is not None:
        if distributed:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, rows)
            rows = [r for part in parts for r in part]
        collect += rows
    if distributed:
        dist.all_reduce(stats)
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


def get_device() -> torch.device:
    return default_device()


# --------------------------------------------------------------------------------------------------
# training loop shared by fine-tuning and the MAE linear probe (MAE engine_finetune.train_one_epoch)
# --------------------------------------------------------------------------------------------------
def resume_state(run, ckpt, modules: dict, optimizer, log) -> tuple[int, list, float, dict | None]:
    """Load the run's checkpoint (:meth:`crossmae.runs.RunDir.load_resume`): ``state['model']`` into
    the one module of ``modules`` (DDP unwrapped), the optimizer state, the RNG states. Returns
    ``(start_epoch, history, previous_wall_time, state)``, or ``(0, [], 0.0, None)`` without one.

    Raises:
        UserError: the checkpoint lacks ``model`` / ``optimizer`` / ``epoch`` or does not fit.
    """
    from crossmae.checkpoint import load_state, set_rng_state, unwrap
    state = run.load_resume(required=("model", "optimizer", "epoch"))
    if state is None:
        return 0, [], 0.0, None
    try:
        for module in modules.values():
            unwrap(module).load_state_dict(state["model"])
        load_state(optimizer, state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"{run.resume_from}: does not match this config ({str(exc).splitlines()[0][:200]})")
    if "rng" in state:
        set_rng_state(state["rng"])
    ckpt.resumed(run.resume_from, f"epoch {state['epoch']}")
    log.info(f"resumed from {run.resume_from} after epoch {state['epoch']}")
    return state["epoch"] + 1, list(state.get("history", [])), float(state.get("wall_time", 0.0)), state


def epoch_end(rec: dict, *, log, tb, task: str, ckpt, state: dict | None, history: list, timer: Timer,
              hook=None, periodic: bool = False) -> None:
    """Log an epoch record (text + TensorBoard), save ``state`` (+ epoch, history, wall time) through
    the CheckpointManager when given, then call ``hook(epoch)`` (tests simulate preemption there)."""
    epoch = rec["epoch"]
    log.info(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
    if tb is not None:
        from crossmae import engine
        engine.log_scalars(tb, {k: v for k, v in rec.items() if k != "epoch"}, epoch, f"{task}/")
        tb.flush()
    if state is not None:
        ckpt.save(dict(state, epoch=epoch, history=history, wall_time=timer.elapsed), step=epoch, periodic=periodic,
                  label=f"epoch {epoch}")
    if hook is not None:
        hook(epoch)


def train_one_epoch(epoch: int, *, cfg, loader, optimizer, lr: float, loss_fn, ckpt, params=None) -> dict:
    """One epoch of MAE's ``engine_finetune.train_one_epoch``: per-iteration lr (warmup + cosine,
    :func:`adjust_learning_rate` at fractional epochs, updated every ``accum_iter`` steps), gradient
    accumulation, optional ``clip_grad`` over ``params``. ``loss_fn(x, y) -> scalar loss``; ``ckpt``
    the run's :class:`crossmae.checkpoint.CheckpointManager` (named in the divergence error). The
    steps are :mod:`crossmae.engine`'s.

    Returns ``{'epoch', 'train_loss', 'lr'}``.

    Raises:
        TrainingDivergedError: a non-finite loss (the message names ``ckpt``'s last good checkpoint).
    """
    from crossmae import engine
    params = None if params is None else list(params)  # a generator would be used up by the first clip
    steps = len(loader)
    total, n, cur = 0.0, 0, 0.0
    optimizer.zero_grad()
    for it, (x, y) in enumerate(loader):
        if it % cfg.accum_iter == 0:
            cur = adjust_learning_rate(optimizer, it / steps + epoch, lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
        loss = loss_fn(x, y)
        value = engine.loss_value(loss, ckpt, f"epoch {epoch} iteration {it}", detail=lambda: f"lr {cur:.3g}")
        engine.backward(loss, cfg.accum_iter)
        if (it + 1) % cfg.accum_iter == 0:
            engine.optimizer_step(optimizer, None, cfg.get("clip_grad"), params)
        total, n = total + value, n + 1
    return {"epoch": epoch, "train_loss": total / max(n, 1), "lr": cur}


def eval_due(cfg, epoch: int) -> bool:
    """Evaluate every ``eval_interval`` epochs and after the last one."""
    return (epoch + 1) % cfg.eval_interval == 0 or epoch + 1 == cfg.epochs


def final_metrics(history: list) -> dict:
    """``top1``/``top5`` of the last evaluated epoch and ``top1_best`` (MAE's max accuracy)."""
    ev = [h for h in history if "top1" in h]
    if not ev:
        raise RuntimeError("no evaluation was run")
    return {"top1": ev[-1]["top1"], "top5": ev[-1]["top5"], "top1_best": max(h["top1"] for h in ev)}


def effective_lr(cfg, world: int) -> tuple[int, float]:
    """``(per_gpu_batch, lr)`` with ``lr = blr * batch / 256`` (MAE), ``batch`` the total effective
    batch (``cfg.batch_size``, = per-GPU × accum_iter × GPUs). ``cfg.lr`` when set wins.

    Raises:
        UserError: ``batch_size`` not divisible by GPUs × accum_iter.
    """
    denom = world * cfg.accum_iter
    if cfg.batch_size % denom:
        raise UserError(f"config batch_size={cfg.batch_size}: not divisible by {world} GPU(s) x accum_iter "
                        f"{cfg.accum_iter}")
    lr = cfg.lr if cfg.get("lr") is not None else cfg.blr * cfg.batch_size / 256
    return cfg.batch_size // denom, lr


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
        raise UserError(f"config batch_size={cfg.batch_size}: larger than the {len(train_ds)} train images per GPU "
                        f"(drop_last); lower it")
    return sampler, train, val
