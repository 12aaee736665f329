"""MAE / CrossMAE pretraining engine: ``python -m crossmae.pretrain --config <preset|file> --output-dir DIR``.

The loop follows the reference scripts (facebookresearch/mae ``main_pretrain.py`` +
``engine_pretrain.py``; TonyLianLong/CrossMAE ``main_pretrain.py`` + ``engine_pretrain.py``):
AdamW(β = 0.9, 0.95) with weight decay only on ≥2-D weights (timm ``param_groups_weight_decay``),
per-iteration warmup + cosine lr (:mod:`crossmae.lr_sched`), ``lr = blr · batch/256 · γ/p``,
RandomResizedCrop(0.2–1, bicubic) + flip (:mod:`crossmae.data`), gradient accumulation, DDP with a
``DistributedSampler``, autocast (bf16 by default) on CUDA. Presets live in ``configs/pretrain``.

Output directory (every file written atomically)::

    run.lock                the exclusive lock of a running run (holder: pid, host, start time)
    run.json                the run's identity and its hash (crossmae.runs.RunDir)
    config.py               the resolved config (flat ``key = value`` lines)
    log.txt                 human-readable log (rank 0)
    log.jsonl               one JSON object per finished epoch (loss, lr, images/s, time)
    tensorboard/            scalars ``train_loss``, ``lr`` (x = epoch·1000, as the reference) and ``epoch_loss``
    checkpoint-latest.pth   newest state, used to resume (every ``checkpoint_period`` epochs)
    checkpoint-<e>.pth      snapshots every ``snapshot_period`` epochs and the final one (e = 0-based
                            index of the last finished epoch, as the reference: 800 epochs → 799)
    snapshots.json          the complete snapshots with their cumulative compute (crossmae.compute),
                            written after each snapshot file and before checkpoint-latest.pth
    metrics.json            written last, only when the run finished (task protocol, docs/CONTRACTS.md)

Checkpoints hold the official layout ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}`` (``args`` an
``argparse.Namespace`` with the official argument names) plus ``config``, ``history``, ``rng`` and
``compute`` (cumulative images seen, wall time, device-hours, FLOPs: :mod:`crossmae.compute`).

Run lifecycle and driver: :class:`crossmae.runs.Run` (layout, device, folder, checkpoints, resume,
``metrics.json``), shared by every command (a finished folder is final;
another config never resumes in the same folder: extend a run with ``--resume FILE`` into a new one).

Resume semantics: epoch-granular. A restarted run continues after the last epoch in
``<output-dir>/checkpoint-latest.pth`` (``--resume FILE`` is used only when the folder has none). Every
epoch's randomness (sampler order, augmentation, mask noise, worker seeds) is a pure function of
``(seed, epoch, rank)``, so an interrupted + resumed run reproduces the uninterrupted losses and
weights bit for bit on the same hardware and software. Work done inside an unfinished epoch is
redone.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import engine
from .checkpoint import CheckpointManager, TrainingDivergedError, unwrap  # noqa: F401  (re-exported)
from .runs import Run, batch_layout, code_version, provenance, resolve_device  # noqa: F401  (re-exported)
from .utils import (REPO_ROOT, UserError, atomic_write_text, cli_entry, config_hash,
                    is_main_process, load_config, resolve_data_root, safe_torch_load_hashed,
                    check_compile_option, maybe_compile, seed_everything, seed_worker, sha256_file)
from .zoo import resolve_backbone

PRESET_DIR = REPO_ROOT / "configs" / "pretrain"
DEFAULT_CONFIG = "paper_crossmae_vit_base"
AMP_MODES = ("bf16", "fp16", "none")
log = logging.getLogger("crossmae.pretrain")


# --------------------------------------------------------------------------------------------------
# command line and config
# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The command's options (task protocol, docs/CONTRACTS.md)."""
    p = argparse.ArgumentParser(prog="python -m crossmae.pretrain",
                                description="MAE / CrossMAE pretraining on an ImageNet-style ImageFolder.")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"preset name in configs/pretrain or a .py config path (default {DEFAULT_CONFIG})")
    p.add_argument("--data-root", default=None,
                   help="datasets root; images are read from <root>/<data_subdir> (default imagenet/train); "
                        "default $CROSSMAE_DATA_ROOT or ../shared/data")
    p.add_argument("--output-dir", required=True, help="run folder; a rerun resumes from its checkpoint-latest.pth")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--resume", default="", help="checkpoint to resume from when --output-dir has none")
    p.add_argument("--backbone", default=None,
                   help="initialise the model from this pretraining checkpoint (official or ours; strict) "
                        "when starting fresh")
    p.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda:LOCAL_RANK if available)")
    return p


@dataclass
class Plan:
    """Everything validated before any work starts."""
    method: str          # "mae" | "crossmae"
    arch: str            # e.g. "vit_base_patch16"
    model_kwargs: dict
    kept_mask_ratio: float | None   # γ passed to the model (None for MAE)


def plan_from_config(cfg) -> Plan:
    """Check the config's model / ratio / size / optimisation values and return the model plan.

    Raises:
        UserError: unknown architecture, γ > p or γ ≤ 0, p outside (0, 1), image size not divisible
            by the patch size, a MAE with γ ≠ p, bad epochs / batch / amp values.
    """
    from .models import ARCHS, check_ratios, parse_model_name

    try:
        method, arch = parse_model_name(str(cfg.model))
    except ValueError as exc:
        raise UserError(f"config model {cfg.model!r}: {exc}") from None
    size, patch = cfg.input_size, ARCHS[arch].patch_size
    if not isinstance(size, int) or size <= 0 or size % patch:
        raise UserError(f"config input_size: {size} is not a positive multiple of the patch size {patch} of {arch}")
    gamma = cfg.kept_mask_ratio
    try:
        check_ratios(float(cfg.mask_ratio), None if gamma is None else float(gamma))
    except (ValueError, TypeError) as exc:
        raise UserError(f"config mask_ratio/kept_mask_ratio: {exc}") from None
    if method == "mae" and gamma is not None and abs(gamma - cfg.mask_ratio) > 1e-9:
        raise UserError(f"config kept_mask_ratio: MAE predicts every masked patch; set it to None or "
                        f"mask_ratio ({cfg.mask_ratio}), got {gamma}")
    if method == "crossmae" and gamma is None:
        gamma = float(cfg.mask_ratio)
    for key in ("epochs", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise UserError(f"config {key}: must be a positive integer, got {cfg[key]!r}")
    if not 0 <= cfg.warmup_epochs <= cfg.epochs:
        raise UserError(f"config warmup_epochs: must be in [0, epochs={cfg.epochs}], got {cfg.warmup_epochs}")
    if cfg.amp not in AMP_MODES:
        raise UserError(f"config amp: {cfg.amp!r} is not one of {AMP_MODES}")
    check_compile_option(cfg.get("compile", False))
    kw: dict[str, Any] = dict(img_size=size, decoder_depth=cfg.decoder_depth, norm_pix_loss=cfg.norm_pix_loss,
                              attn_impl=cfg.attn_impl, masking=cfg.masking)
    if method == "crossmae":
        kw.update(weight_fm=cfg.weight_fm, use_fm=list(cfg.use_fm), use_input=cfg.use_input,
                  fm_mode=cfg.fm_mode, self_attn=cfg.self_attn,
                  inter_block_init=cfg.get("inter_block_init", "xavier_uniform"))
    return Plan(method, arch, kw, None if method == "mae" else float(gamma))


def build_model(cfg, plan: Plan):
    """``crossmae.models.create_model(cfg.model, **plan.model_kwargs)``; ValueError → UserError."""
    from .models import create_model
    try:
        return create_model(str(cfg.model), **plan.model_kwargs)
    except ValueError as exc:
        raise UserError(f"config model {cfg.model}: {exc}") from None


def official_args(cfg, plan: Plan, *, lr: float, accum_iter: int, world: int, data_path: str,
                  output_dir: str, device: str, config_name: str) -> argparse.Namespace:
    """The ``args`` entry of a checkpoint: the official ``main_pretrain.py`` argument names (``model``,
    ``input_size``, ``mask_ratio``, ``kept_mask_ratio``, ``decoder_depth``, ``weight_fm``, ``use_fm``,
    ``use_input``, ``norm_pix_loss``, ``epochs``, ``batch_size`` (per GPU), ``accum_iter``, ``blr``, ``lr``
    (absolute), …) plus ``method``, ``arch``, ``total_batch_size`` (effective), ``amp``, ``config``.
    ``kept_mask_ratio`` is None for MAE. Only plain values (loadable with ``weights_only=True``)."""
    return argparse.Namespace(
        model=str(cfg.model), method=plan.method, arch=plan.arch, cross_mae=plan.method == "crossmae",
        input_size=cfg.input_size, mask_ratio=float(cfg.mask_ratio), kept_mask_ratio=plan.kept_mask_ratio,
        decoder_depth=cfg.decoder_depth, norm_pix_loss=bool(cfg.norm_pix_loss),
        weight_fm=bool(plan.model_kwargs.get("weight_fm", False)), use_fm=list(cfg.use_fm),
        use_input=bool(plan.model_kwargs.get("use_input", False)), self_attn=bool(cfg.self_attn),
        fm_mode=cfg.fm_mode, masking=cfg.masking, attn_impl=cfg.attn_impl,
        epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, batch_size=cfg.batch_size, accum_iter=accum_iter,
        total_batch_size=cfg.batch_size * accum_iter * world, world_size=world,
        blr=float(cfg.blr), lr=float(lr), min_lr=float(cfg.min_lr), weight_decay=float(cfg.weight_decay),
        no_lr_scale=not cfg.lr_scale_by_ratio, inverse_lr=False, amp=cfg.amp,
        data_path=data_path, output_dir=output_dir, log_dir=output_dir, device=device, seed=cfg.seed,
        num_workers=cfg.num_workers, pin_mem=bool(cfg.pin_mem), config=config_name)


def accumulation(cfg, world: int) -> int:
    """Gradient-accumulation steps of the config on ``world`` processes
    (:func:`crossmae.runs.batch_layout`: ``total_batch_size / (batch_size · world)``, or
    ``accum_iter`` (default 1) when ``total_batch_size`` is None).

    Raises:
        UserError: the effective batch is not a multiple of ``batch_size · world``, or contradicts
            ``accum_iter``.
    """
    return batch_layout(cfg, world)[1]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one (epoch, rank): independent streams via NumPy's ``SeedSequence``."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def config_text(cfg_dict: dict) -> str:
    """A flat config as loadable ``key = repr(value)`` lines."""
    return "".join(f"{k} = {v!r}\n" for k, v in cfg_dict.items())


def plain(obj: Any) -> Any:
    """mmengine ConfigDict / nested containers → plain dicts, lists, tuples and scalars."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------------
class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "console", True)


@contextlib.contextmanager
def run_logging(output_dir: Path, main: bool):
    """Route ``crossmae.pretrain`` log records to stdout and ``log.txt`` on rank 0 (nothing elsewhere)."""
    handlers: list[logging.Handler] = []
    if main:
        fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
        fh = logging.FileHandler(output_dir / "log.txt", encoding="utf-8")
        sh = logging.StreamHandler(sys.stdout)
        sh.addFilter(_ConsoleFilter())
        for h in (fh, sh):
            h.setFormatter(fmt)
            log.addHandler(h)
            handlers.append(h)
    old_level, old_prop = log.level, log.propagate
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        log.setLevel(old_level)
        log.propagate = old_prop


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# --------------------------------------------------------------------------------------------------
# one epoch
# --------------------------------------------------------------------------------------------------
@dataclass
class EpochContext:
    model: torch.nn.Module
    loader: Any
    optimizer: torch.optim.Optimizer
    scaler: Any
    device: torch.device
    autocast_dtype: torch.dtype | None
    steps_per_epoch: int
    accum_iter: int
    world: int
    mask_ratio: float
    kept_mask_ratio: float | None
    lr: float
    min_lr: float
    warmup_epochs: float
    epochs: int
    log_period: int
    writer: Any
    ckpts: CheckpointManager


def train_one_epoch(ctx: EpochContext, epoch: int) -> dict:
    """Run ``steps_per_epoch`` optimizer steps of ``accum_iter`` micro-batches each.

    The lr is set before every optimizer step at fractional epoch ``epoch + step/steps_per_epoch``.
    Each micro-batch loss is all-reduced (under DDP) and checked before backward.

    Returns:
        ``{'epoch', 'loss' (mean over micro-batches and ranks), 'lr' (last), 'images', 'time_s',
        'images_per_s'}``.

    Raises:
        TrainingDivergedError: a non-finite loss (all ranks raise together).
        CorruptImageError: an image could not be decoded (one line naming the file).
    """
    from tqdm import tqdm

    from .data import CorruptImageError, clean_loader_error
    from .lr_sched import adjust_learning_rate

    model, opt, scaler = ctx.model, ctx.optimizer, ctx.scaler
    main = is_main_process()
    model.train(True)
    opt.zero_grad(set_to_none=True)
    batch_global = None
    loss_sum, n_micro, images = 0.0, 0, 0
    show_bar = main and sys.stderr.isatty()
    bar = tqdm(total=ctx.steps_per_epoch, desc=f"epoch {epoch}", unit="it", disable=not show_bar, leave=False,
               dynamic_ncols=True)
    t0 = time.time()
    it = iter(ctx.loader)
    lr = 0.0
    try:
        for step in range(ctx.steps_per_epoch):
            lr = adjust_learning_rate(opt, epoch + step / ctx.steps_per_epoch, ctx.lr, ctx.min_lr,
                                      ctx.warmup_epochs, ctx.epochs)
            for micro in range(ctx.accum_iter):
                try:
                    imgs, _ = next(it)
                except CorruptImageError as exc:
                    raise clean_loader_error(exc) from None
                imgs = imgs.to(ctx.device, non_blocking=True)
                batch_global = imgs.shape[0] * ctx.world
                with engine.no_sync(model, micro == ctx.accum_iter - 1):
                    with engine.autocast(ctx.device, ctx.autocast_dtype):
                        loss, _, _ = model(imgs, mask_ratio=ctx.mask_ratio, kept_mask_ratio=ctx.kept_mask_ratio)
                    loss_value = engine.loss_value(loss, ctx.ckpts, f"epoch {epoch} step {step}", ctx.world,
                                                   lambda: f"lr {lr:.3g}")
                    engine.backward(loss, ctx.accum_iter, scaler)
                loss_sum += loss_value
                n_micro += 1
                images += batch_global
            engine.optimizer_step(opt, scaler)

            elapsed = time.time() - t0
            ips = images / max(elapsed, 1e-9)
            eta_epoch = elapsed / (step + 1) * (ctx.steps_per_epoch - step - 1)
            eta_total = eta_epoch + elapsed / (step + 1) * ctx.steps_per_epoch * (ctx.epochs - epoch - 1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
            bar.update(1)
            if main and ((step + 1) % ctx.log_period == 0 or step + 1 == ctx.steps_per_epoch):
                log.info(f"epoch {epoch}/{ctx.epochs} step {step + 1}/{ctx.steps_per_epoch} loss {loss_value:.4f} "
                         f"lr {lr:.3e} {ips:.1f} img/s eta epoch {_fmt_time(eta_epoch)} total {_fmt_time(eta_total)}",
                         extra={"console": not show_bar})
            engine.log_scalars(ctx.writer, {"train_loss": loss_value, "lr": lr},
                               int((epoch + (step + 1) / ctx.steps_per_epoch) * 1000))
    finally:
        bar.close()
        del it
    elapsed = time.time() - t0
    return {"epoch": epoch, "loss": loss_sum / max(n_micro, 1), "lr": lr, "steps": ctx.steps_per_epoch,
            "images": images,
            "time_s": elapsed, "images_per_s": images / max(elapsed, 1e-9)}


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
@cli_entry
def main(argv: list[str] | None = None) -> dict:
    """Run or resume pretraining in ``--output-dir``; returns the ``metrics.json`` dict.

    Raises:
        UserError: bad config / data / device (before any work), a corrupt image, a diverged loss.
    """
    from .checkpoint import rng_state, set_rng_state

    # main() may run inside a larger process (tests, an in-process Slurm "debug" executor): leave the
    # global RNGs and determinism flags as they were found.
    saved_rng, saved_bench = rng_state(), torch.backends.cudnn.benchmark
    saved_det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        return _main(argv)
    finally:
        set_rng_state(saved_rng)
        torch.use_deterministic_algorithms(saved_det[0], warn_only=saved_det[1])
        torch.backends.cudnn.benchmark = saved_bench


def _main(argv: list[str] | None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.cfg_options, PRESET_DIR)
    if args.seed is not None:
        cfg.seed = args.seed
    config_name = Path(args.config).stem
    plan = plan_from_config(cfg)
    data_root = resolve_data_root(args.data_root)
    cfg_dict = plain(cfg.to_dict())
    run = Run(args.output_dir, "pretrain", {"config": cfg_dict, "config_name": config_name,
                                             "data_root": str(data_root.resolve()), "backbone": args.backbone},
              config_text(cfg_dict), resume=args.resume or None, device=args.device)
    if run.finished is not None:
        return run.finished

    # --- everything below until the output dir is created only validates ------------------------
    layout = run.setup()
    world = layout.world_size
    accum = accumulation(cfg, world)
    seed_everything(int(cfg.seed), bool(cfg.deterministic))
    model = build_model(cfg, plan)

    from .data import build_pretrain_dataset
    folder = data_root / cfg.data_subdir
    dataset = build_pretrain_dataset(folder, cfg.input_size, subset=cfg.data_subset, verify=cfg.verify_images,
                                     pipeline=cfg.get("data_pipeline", "cpu"), decoder=cfg.get("decoder", "pil"),
                                     device=run.device)
    per_rank = math.ceil(len(dataset) / world)
    steps_per_epoch = per_rank // cfg.batch_size // accum
    if steps_per_epoch < 1:
        raise UserError(f"{folder}: {len(dataset)} images are fewer than one effective batch "
                        f"({cfg.batch_size} x {accum} accumulation x {world} processes)")
    effective = cfg.batch_size * accum * world
    from .lr_sched import scaled_lr
    lr = float(cfg.lr) if cfg.lr is not None else scaled_lr(
        cfg.blr, effective, cfg.mask_ratio, plan.kept_mask_ratio, cfg.lr_scale_by_ratio)
    if args.backbone:
        # a path, or zoo: / hf:// / timm: / http(s):// (downloaded once into the cache), resolved like
        # every command's --backbone; read and checked before anything is written
        args.backbone_sha256 = _init_from_backbone(resolve_backbone(args.backbone), model, plan.arch)

    job = Job(cfg, plan, config_name, args.backbone, model, dataset, folder, accum, steps_per_epoch, lr,
              getattr(args, "backbone_sha256", None))
    with run.start(), run_logging(run.out, run.main):
        return train(run, job)


@dataclass
class Job:
    """The validated pretraining job :func:`train` runs (everything read before the folder was taken)."""
    cfg: Any
    plan: Plan
    config_name: str
    backbone: str | None
    model: torch.nn.Module
    dataset: Any
    folder: Path
    accum: int
    steps_per_epoch: int
    lr: float
    backbone_sha256: str | None = None   # SHA-256 of the bytes --backbone was loaded from


def train(run: Run, job: Job) -> dict:
    """The training part of :func:`main` (inputs validated, output dir locked, logging routed): the
    MAE ``main_pretrain.py`` sequence (model to device, DDP, AdamW, resume, loader, epochs,
    checkpoints, ``metrics.json``) on the driver ``run``."""
    import timm.optim

    from .data import loader_generator, pretrain_batches

    cfg, plan, model, dataset, accum, lr = job.cfg, job.plan, job.model, job.dataset, job.accum, job.lr
    device, rank, world = run.device, run.rank, run.world
    output_dir = run.out
    cfg_dict = plain(cfg.to_dict())
    model.to(device)
    from .compute import ComputeMeter, flops_per_image
    fpi = flops_per_image(model, float(cfg.mask_ratio), plan.kept_mask_ratio, device)  # before compile / DDP
    maybe_compile(model, cfg.get("compile", False))  # in place: state-dict keys unchanged
    ddp_model = run.wrap_ddp(model, find_unused_parameters=bool(cfg.find_unused_parameters))
    groups = timm.optim.param_groups_weight_decay(model, float(cfg.weight_decay))
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))
    use_amp = device.type == "cuda" and cfg.amp != "none"
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if use_amp else None
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and cfg.amp == "fp16")

    ns = official_args(cfg, plan, lr=lr, accum_iter=accum, world=world, data_path=str(job.folder.parent),
                       output_dir=str(output_dir), device=str(device), config_name=job.config_name)
    ckpts = run.checkpoints()

    # --- resume (epoch-granular: every epoch's randomness is a function of (seed, epoch, rank)) -------
    state = run.resume(model=model, optimizer=optimizer, scaler=scaler, required=("model", "optimizer", "epoch"),
                       restore_rng=False, label=lambda st: f"epoch {int(st['epoch'])}")
    history: list[dict] = []
    start_epoch = 0
    if state is not None:
        start_epoch = int(state["epoch"]) + 1
        history = [h for h in state.get("history", []) if h["epoch"] < start_epoch]
        changed = sorted(k for k in set(cfg_dict) | set(state.get("config", {}))
                         if cfg_dict.get(k) != state.get("config", {}).get(k))
        log.info(f"resumed from {run.resume_from} (epoch {start_epoch - 1} finished)"
                 + (f"; config keys changed since: {', '.join(changed)}" if changed else ""))
    elif job.backbone:
        log.info(f"initialised all {len(model.state_dict())} tensors from --backbone {job.backbone}")

    log.info(f"{cfg.model} ({plan.method}, {plan.arch}) {cfg.input_size}px p={cfg.mask_ratio} "
             f"γ={plan.kept_mask_ratio if plan.kept_mask_ratio is not None else cfg.mask_ratio} on {device} "
             f"x{world}; {len(dataset)} images in {job.folder}; batch {cfg.batch_size} x accum {accum} x {world} "
             f"= {cfg.batch_size * accum * world}; lr {lr:.4g} (blr {cfg.blr}); {job.steps_per_epoch} steps/epoch; "
             f"epochs {start_epoch}..{cfg.epochs - 1}; amp {cfg.amp if use_amp else 'off (fp32)'}")

    meter = ComputeMeter.start(state, fpi, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    writer = run.tensorboard(bool(cfg.tensorboard) and start_epoch < cfg.epochs)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=int(cfg.seed))
    generator = loader_generator(0)
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        pin_memory=bool(cfg.pin_mem) and device.type == "cuda", drop_last=True,
        worker_init_fn=seed_worker, generator=generator, persistent_workers=False,
        collate_fn=getattr(dataset, "collate_fn", None))
    loader = pretrain_batches(loader, device)  # GPU pipeline: decode + augment on the device

    ctx = EpochContext(ddp_model, loader, optimizer, scaler, device, autocast_dtype, job.steps_per_epoch, accum,
                       world, float(cfg.mask_ratio), plan.kept_mask_ratio, lr, float(cfg.min_lr),
                       float(cfg.warmup_epochs), int(cfg.epochs), max(int(cfg.log_period), 1), writer, ckpts)
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        seed = epoch_seed(int(cfg.seed), epoch, rank)
        seed_everything(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed_all(seed)
        generator.manual_seed(seed)
        stats = train_one_epoch(ctx, epoch)
        history.append(stats)
        meter.add_epoch(epoch, stats["images"], stats["time_s"], world)
        if writer is not None:
            writer.add_scalar("epoch_loss", stats["loss"], epoch)
            writer.flush()
        log.info(f"epoch {epoch} done: loss {stats['loss']:.5f} lr {stats['lr']:.3e} "
                 f"{stats['images_per_s']:.1f} img/s {stats['time_s']:.1f}s")
        final = epoch + 1 == cfg.epochs
        if final or (epoch + 1) % max(int(cfg.checkpoint_period), 1) == 0:
            snapshot = final or (cfg.snapshot_period and (epoch + 1) % int(cfg.snapshot_period) == 0)
            state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                     "scaler": scaler_entry(scaler), "args": ns, "config": cfg_dict, "history": history,
                     "compute": meter.record()}
            # every rank checks (unhealthy weights stop all of them); the main process writes
            ckpts.save(state, step=epoch, periodic=bool(snapshot), label=f"epoch {epoch}", write=run.main,
                       record=meter.record())
        if run.main:
            atomic_write_text("".join(_json_line(h) for h in history), output_dir / "log.jsonl")
        run.barrier()

    metrics = _metrics(cfg, plan, job.config_name, job.backbone, job.backbone_sha256, history, ns, output_dir)
    metrics["compute"] = meter.record()
    metrics.update(provenance(run.identity["data_root"], (), num_train=len(dataset), num_eval=0), predictions=None)
    metrics = run.finish(metrics)
    if run.main:
        log.info(f"done: final loss {metrics['metrics']['loss']:.5f}; {output_dir / 'metrics.json'}")
    return metrics


def _json_line(obj: dict) -> str:
    return json.dumps(obj) + "\n"


def scaler_entry(scaler: torch.amp.GradScaler) -> dict:
    """The checkpoint's ``scaler`` entry: a loss-scaler state the official resume accepts.

    The official ``util/misc.load_model`` (facebookresearch/mae and TonyLianLong/CrossMAE) calls
    ``loss_scaler.load_state_dict(checkpoint['scaler'])`` on an enabled ``torch.cuda.amp.GradScaler``
    (``NativeScalerWithGradNormCount``), which raises "The source state dict is empty" for the ``{}``
    a disabled scaler (bf16 / fp32 runs) returns. So: an enabled scaler's own ``state_dict()`` (fp16
    runs), else the state of a fresh default ``GradScaler`` (scale 2^16, growth 2.0, backoff 0.5,
    interval 2000, tracker 0; the five fields of ``GradScaler.state_dict``), written out explicitly
    because a CUDA scaler built on a machine without CUDA is disabled and would give ``{}`` again.
    Resuming such a run continues as a fresh fp16 run would.
    """
    if scaler.is_enabled():
        return scaler.state_dict()
    return {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
            "_growth_tracker": 0}


def _init_from_backbone(path: Path, model, arch: str) -> str:
    """Strictly load a pretraining checkpoint's ``model`` weights (or a bare state dict) into ``model``.

    The file is read once and hashed while read; it goes through the backbone checks of every other
    command (:func:`crossmae.backbone.check_encoder_tensors`: floating-point weights of ``arch``'s
    shapes, finite values; a cached download must match its pin). Returns the hex SHA-256 of the
    bytes loaded (for ``metrics.json``).

    Raises:
        UserError: unreadable file, integer / non-finite weights, tensors not fitting the model.
    """
    from .backbone import check_encoder_tensors
    from .zoo import check_loaded_sha256
    state, sha = safe_torch_load_hashed(path, verify=check_loaded_sha256)
    sd = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        raise UserError(f"{path}: no model state dict inside")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    check_encoder_tensors(path, tensors, arch)
    for k, v in tensors.items():
        if not torch.isfinite(v).all():
            raise UserError(f"{path}: non-finite values (nan/inf) in {k}")
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or shape:
        raise UserError(f"--backbone {path}: does not fit the model: {len(missing)} missing (e.g. {missing[:3]}), "
                        f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(shape)} shape mismatches "
                        f"(e.g. {shape[:3]})")
    model.load_state_dict(sd, strict=True)
    return sha


def _metrics(cfg, plan, config_name, backbone, backbone_sha256, history, ns, output_dir) -> dict:
    final = output_dir / f"checkpoint-{cfg.epochs - 1}.pth"
    total_time = sum(h["time_s"] for h in history)
    total_images = sum(h["images"] for h in history)
    last = history[-1] if history else {"loss": float("nan"), "lr": float("nan")}
    return {
        "task": "pretrain",
        "protocol": config_name,
        "metrics": {"loss": float(last["loss"]), "images_per_s": total_images / max(total_time, 1e-9)},
        "method": plan.method, "arch": plan.arch, "model": str(cfg.model), "input_size": cfg.input_size,
        "mask_ratio": float(cfg.mask_ratio), "kept_mask_ratio": plan.kept_mask_ratio,
        "lr": ns.lr, "blr": ns.blr, "total_batch_size": ns.total_batch_size,
        "checkpoint": str(final), "checkpoint_sha256": sha256_file(final) if final.is_file() else None,
        "backbone": backbone, "backbone_sha256": backbone_sha256 if backbone else None,
        "backbone_report": None,
        "config_hash": config_hash(plain(cfg.to_dict())), "seed": int(cfg.seed),
        "epochs": int(cfg.epochs), "iters": int(sum(h["steps"] for h in history)),
        "wall_time_s": total_time, "images_per_s": total_images / max(total_time, 1e-9),
        "code_version": code_version(),
    }


if __name__ == "__main__":
    main()
