"""End-to-end fine-tuning of a pretrained ViT for classification (MAE protocol).

Source: facebookresearch/mae ``main_finetune.py``, ``engine_finetune.py``, ``util/lr_decay.py``,
``util/lr_sched.py``; recipe values in REFERENCE.md §3. Components from timm where they give the
reference behaviour: ``create_optimizer_v2(..., layer_decay=…)`` (AdamW, layer ids = MAE's, checked
in tests), ``create_transform`` (RandAugment + RandomErasing), ``Mixup`` / ``SoftTargetCrossEntropy`` /
``LabelSmoothingCrossEntropy``, drop path and ``fc_norm`` global pooling of ``VisionTransformer``.

The command is ``python -m transfer.finetune`` (``transfer/finetune.py``); this module is the protocol.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from crossmae import engine
from crossmae.checkpoint import unwrap
from crossmae.lr_sched import vit_layer_id
from crossmae.runs import Run
from crossmae.utils import UserError, maybe_compile, resolve_data_root, seed_everything

from . import common as C
from .data import ImageDataset, eval_transform, finetune_train_transform, load_train_val

PRESET_DIR = C.CONFIG_ROOT / "finetune"
#: Called as ``hook(epoch)`` after each epoch's checkpoint is written (tests simulate preemption).
EPOCH_END_HOOK = None


def build_finetune_model(backbone: str, cfg, num_classes: int):
    """The fine-tuning model: timm ViT (``global_pool`` ``'avg'`` → mean of patch tokens + ``fc_norm``,
    MAE ``models_vit.py``), drop path ``cfg.drop_path``, encoder from ``backbone``, head weight
    ``trunc_normal_(std=cfg.head_init_std)`` (MAE: 2e-5), bias 0.

    Returns ``(model, report)``.

    Raises:
        UserError: the load left encoder keys missing (only ``head.*``, ``fc_norm.*`` and, for a
            checkpoint without final norm with token pooling, ``norm.*`` may be missing — MAE's rule).
    """
    from timm.layers import trunc_normal_
    model, report = C.load_cls_backbone(backbone, cfg, num_classes=num_classes, global_pool=cfg.global_pool,
                                        drop_path_rate=cfg.drop_path)
    allowed = r"^(head|fc_norm|norm)\."
    bad = [k for k in getattr(report, "missing", []) if not re.match(allowed, k)]
    if bad:
        raise UserError(f"{backbone}: encoder keys missing after load: {', '.join(bad[:5])}"
                        f"{' …' if len(bad) > 5 else ''}")
    trunc_normal_(model.head.weight, std=cfg.head_init_std)
    nn.init.zeros_(model.head.bias)
    return model, report


def param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float,
                     no_weight_decay_list=()) -> list[dict]:
    """MAE ``util/lr_decay.param_groups_lrd``: one group per (layer id from
    :func:`crossmae.lr_sched.vit_layer_id`, decay/no-decay) with
    ``lr_scale = layer_decay ** (num_layers - layer_id)``, ``num_layers = depth + 1``; weight decay 0 for
    1-D parameters and names in ``no_weight_decay_list``. Frozen parameters are skipped.

    (timm's ``param_groups_layer_decay`` equals this with ``global_pool='avg'`` but gives the final
    ``norm`` of a cls-token model its own layer below the head, so MAE's rule is stated here and passed
    to timm's optimizer factory as ``param_group_fn``; tests compare with an independent re-statement.)
    """
    num_layers = len(model.blocks) + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or n in no_weight_decay_list:
            g_decay, this_decay = "no_decay", 0.0
        else:
            g_decay, this_decay = "decay", weight_decay
        lid = vit_layer_id(n, len(model.blocks))
        key = f"layer_{lid}_{g_decay}"
        if key not in groups:
            groups[key] = {"lr_scale": scales[lid], "weight_decay": this_decay, "params": []}
        groups[key]["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.Optimizer:
    """AdamW from timm's ``create_optimizer_v2`` (betas 0.9/0.999 as MAE's ``torch.optim.AdamW``
    default) over MAE's layer-decay groups (:func:`param_groups_lrd`, ``cfg.layer_decay``,
    ``cfg.weight_decay``, ``model.no_weight_decay()``)."""
    from timm.optim import create_optimizer_v2
    nwd = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=0.0,
                               param_group_fn=lambda m: param_groups_lrd(m, cfg.weight_decay, cfg.layer_decay, nwd))


def build_mixup(cfg, num_classes: int):
    """timm ``Mixup`` with MAE's arguments, or ``None`` when mixup, cutmix and cutmix_minmax are off."""
    from timm.data import Mixup
    if cfg.mixup > 0 or cfg.cutmix > 0 or cfg.get("cutmix_minmax") is not None:
        return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.get("cutmix_minmax"),
                     prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                     label_smoothing=cfg.smoothing, num_classes=num_classes)
    return None


def build_criterion(cfg, mixup) -> nn.Module:
    """MAE: SoftTargetCrossEntropy with mixup; else LabelSmoothingCrossEntropy when smoothing > 0;
    else CrossEntropyLoss."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()


def run_finetune(args, cfg, task: str = "finetune") -> dict:
    """Run (or resume) the fine-tuning protocol described by ``cfg`` in ``args.output_dir``, on the
    run driver :class:`crossmae.runs.Run` (a finished run with the same config returns its metrics
    and writes nothing).

    Returns the metrics dict (also written to ``metrics.json``). Metrics: ``top1``, ``top5`` (%, final
    epoch, val split, Resize+CenterCrop), ``top1_best`` (best evaluated epoch, MAE's "Max accuracy").
    """
    data_root = resolve_data_root(args.data_root)
    run = C.prepare_run(cfg, args.output_dir, args.resume, task,
                        {"protocol": "finetune", "backbone": args.backbone, "data_root": str(data_root.resolve())})
    if run.finished is not None:
        return run.finished
    layout = run.setup()
    # every input is read before anything is written
    seed_everything(cfg.seed + layout.rank, cfg.get("deterministic", False))
    train_data, val_data = load_train_val(cfg.data, data_root)
    model, report = build_finetune_model(args.backbone, cfg, train_data.num_classes)
    per_gpu, accum, total, lr = C.batch_and_lr(cfg, layout.world_size)
    job = Job(cfg, task, args.backbone, data_root, train_data, val_data, model, report, per_gpu, accum, total, lr)
    with run.start():
        run.open_log(task)
        return train(run, job)


@dataclass
class Job:
    """The validated fine-tuning job (everything read before the run folder was taken)."""
    cfg: Any
    task: str
    backbone: str
    data_root: Path
    train_data: Any             # ClassificationData of the train split
    val_data: Any
    model: nn.Module
    report: Any                 # LoadReport
    per_gpu: int                # batch per device
    accum: int                  # micro-batches per optimizer step
    total: int                  # effective batch per optimizer step
    lr: float                   # absolute peak lr = blr * total / 256


def train(run: Run, job: Job) -> dict:
    """MAE ``main_finetune.py`` on the driver ``run``: model to device, optimizer, mixup, DDP, loaders,
    resume, epochs (``engine_finetune.train_one_epoch``, evaluation every ``eval_period`` epochs and
    after the last), predictions and ``metrics.json``."""
    cfg, task, device, model = job.cfg, job.task, run.device, job.model
    num_classes = job.train_data.num_classes
    train_ds = ImageDataset(job.train_data, finetune_train_transform(dict(cfg.aug, input_size=cfg.input_size)))
    val_ds = ImageDataset(job.val_data, eval_transform(cfg.input_size))
    model.to(device)
    maybe_compile(model, cfg.get("compile", False))  # in place: state-dict keys unchanged
    optimizer = build_optimizer(model, cfg, job.lr)
    mixup = build_mixup(cfg, num_classes)
    criterion = build_criterion(cfg, mixup)
    amp = C.amp_dtype_for(device, cfg)
    sha = C.backbone_sha(job.backbone, job.report)
    log = run.log
    log.info(f"{task}: {len(train_ds)} train / {len(val_ds)} val images, {num_classes} classes, lr {job.lr:.3g} "
             f"(blr {cfg.blr}, batch {job.total} = {job.per_gpu} x {run.world} x accum {job.accum}), "
             f"backbone {job.backbone} sha256 {sha[:12]}")
    if hasattr(job.report, "summary"):
        log.info(job.report.summary())
    ddp_model = run.wrap_ddp(model)
    sampler, train_loader, val_loader = C.make_loaders(cfg, train_ds, val_ds, job.per_gpu, run.rank, run.world)

    run.checkpoints(keep=cfg.get("keep_checkpoints", 1))
    start_epoch, history, prev_time, _ = C.resume_state(run, model, optimizer)
    timer = C.Timer(prev_time)

    def loss_fn(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mixup is not None:
            x, y = mixup(x, y)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return criterion(ddp_model(x), y)

    rows: list = []
    predicted = False
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        ddp_model.train()
        rec = C.train_one_epoch(epoch, cfg=cfg, loader=train_loader, optimizer=optimizer, lr=job.lr,
                                loss_fn=loss_fn, params=model.parameters(), ckpt=run.ckpt, accum_iter=job.accum)
        if C.eval_due(cfg, epoch):
            last = epoch + 1 == cfg.epochs
            rec.update(C.evaluate(model, val_loader, device, amp, collect=rows if last else None))
            predicted = predicted or last
        history.append(rec)
        C.epoch_end(run, rec, task=task, history=history, timer=timer, hook=EPOCH_END_HOOK,
                    state={"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict()},
                    periodic=engine.due(epoch + 1, cfg.get("snapshot_period")))
    if not predicted:  # resumed after the last epoch's checkpoint: predict once more with the final weights
        C.evaluate(model, val_loader, device, amp, collect=rows)
    metrics = C.final_metrics(history)
    log.info(f"final: top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f}")
    pred = C.write_predictions(run, rows, job.val_data, job.data_root)
    return C.finish_run(run, task=task, protocol="finetune", metrics=metrics, cfg=cfg, backbone=job.backbone,
                        sha=sha, report=job.report, epochs=cfg.epochs, wall_time_s=timer.elapsed,
                        extra={"history": history, "selection_split": "none (final epoch on val)",
                               "num_classes": num_classes, "dataset": dict(cfg.data),
                               **C.data_provenance(cfg, job.data_root, job.train_data, job.val_data),
                               "predictions": pred})
