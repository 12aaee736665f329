"""UperNet semantic segmentation on ADE20K: ``python -m transfer.ade20k --backbone ckpt.pth``.

The mmsegmentation 1.2.2 MAE recipe (``configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py``)
re-implemented natively (model: :mod:`transfer.seg.model`, data: :mod:`transfer.seg.data`, metrics:
:mod:`transfer.seg.metrics`, optimiser: :mod:`transfer.seg.optim`); presets in ``configs/ade20k/``
(``paper_vit_base``, ``paper_vit_large``, ``smoke``). Docs: ``docs/ade20k.md``.

Examples::

    python -m transfer.ade20k --backbone mae_pretrain_vit_base.pth --config paper_vit_base \\
        --output-dir runs/ade20k_mae_b                       # torchrun --nproc_per_node 8 … for DDP
    python -m transfer.ade20k --backbone ckpt.pth --config smoke --output-dir /tmp/ade_smoke

A run resumes from ``<output-dir>/checkpoint-latest.pth``; ``metrics.json`` (mIoU, mAcc, aAcc,
per-class IoU/Acc) is written last and only for a finished run.
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from crossmae import engine
from crossmae.checkpoint import unwrap
from crossmae.utils import (REPO_ROOT, UserError, atomic_write_bytes, atomic_write_json, cli_entry, config_hash,
                            resolve_data_root, seed_everything, seed_worker)
from crossmae.runs import (Run, batch_layout, build_parser as _common_parser, code_version,
                           provenance, report_dict, resolve_config)
from transfer.seg.data import (IGNORE_INDEX, PositionBatchSampler, SegTestDataset, SegTrainDataset, load_pair,
                               overlay, read_class_names, resize_pair, to_tensor)
from transfer.seg.metrics import ConfusionMatrix
from transfer.seg.model import UperNet
from crossmae.lr_sched import set_group_lrs
from transfer.seg.optim import lr_factor, param_groups_layer_decay

TASK = "ade20k"
PRESET_DIR = REPO_ROOT / "configs" / "ade20k"
#: Backbone parameters that MAE / CrossMAE checkpoints never hold (mmseg's BEiT-style additions).
REL_POS_KEYS = r"blocks\.\d+\.attn\.relative_position_bias_table"
LAYER_SCALE_KEYS = r"blocks\.\d+\.ls[12]\.gamma"


def build_parser():
    """The task-protocol command line (CONTRACTS.md, shared with the classification commands) plus
    ``--stop-after``. The default ``--config`` is the ``smoke`` preset, as for the other tasks."""
    p = _common_parser("python -m transfer.ade20k", "UperNet on ADE20K (mmseg MAE recipe), native implementation")
    p.add_argument("--stop-after", type=int, default=None, metavar="ITERS",
                   help="stop after this many iterations in total, leaving a checkpoint to resume from "
                        "(simulates preemption; no evaluation, no metrics.json)")
    for a in p._actions:
        if a.dest == "backbone":
            a.help = "pretrained checkpoint (MAE / CrossMAE / timm / ours), or 'none' for random init"
    return p


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------
def build_model(cfg) -> UperNet:
    """The UperNet of ``cfg.model`` (see ``configs/ade20k/paper_vit_base.py``)."""
    m = dict(cfg.model)
    return UperNet(**m)


def load_backbone_weights(model: UperNet, path: str, cfg):
    """Load a MAE / CrossMAE / timm encoder into ``model.backbone`` through the backbone API.

    ``pos_embed`` is resized bicubically to the crop's grid (14→32 at 512 px); the final ``norm``
    (and any fine-tuning ``fc_norm`` / ``head``) is dropped on purpose (mmseg ``final_norm=False``).
    With ``model.rel_pos_bias`` / ``model.layer_scale_init`` the relative position tables and
    layer-scale gammas are the only weights allowed to keep their init (zeros / the init value).

    Returns the ``LoadReport``. Raises ``UserError`` / ``BackboneLoadError`` for a bad checkpoint.
    """
    from crossmae.backbone import load_encoder_state_dict, load_into
    from crossmae.zoo import resolve_backbone
    resolve_backbone(path)  # a path or a URI (zoo:, hf://, timm:, http(s)://); one-line error
    sd, report = load_encoder_state_dict(path, img_size=int(cfg.model.img_size))
    allowed = []
    if cfg.model.get("rel_pos_bias"):
        allowed.append(REL_POS_KEYS)
    if cfg.model.get("layer_scale_init") is not None:
        allowed.append(LAYER_SCALE_KEYS)

    def key_map(k: str):
        return None if k.startswith(("norm.", "fc_norm.", "head.")) else k

    return load_into(model.backbone, sd, report, key_map=key_map, allowed_missing=allowed)


def build_optimizer(model: UperNet, cfg) -> torch.optim.AdamW:
    """AdamW with mmseg's layer-wise lr decay groups (:func:`transfer.seg.optim.param_groups_layer_decay`)."""
    o = cfg.optimizer
    groups = param_groups_layer_decay(model, o.lr, o.weight_decay, o.layer_decay, cfg.model.depth)
    for g in groups:
        g.pop("param_names")
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def _clean_loader_error(exc: BaseException) -> UserError:
    """A UserError raised in a DataLoader worker arrives with a traceback in its message; keep the
    one line that names the file."""
    msg = str(exc)
    for line in reversed(msg.splitlines()):
        if "UserError:" in line:
            return UserError(line.split("UserError:", 1)[1].strip())
    return UserError(msg.splitlines()[-1] if msg else type(exc).__name__)


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------
def _test_scales(cfg) -> list[tuple[int, int]]:
    base = tuple(cfg.data.scale)
    ratios = list(cfg.test.get("aug_ratios") or [])
    return [base] if not ratios else [(int(base[0] * r), int(base[1] * r)) for r in ratios]


@torch.no_grad()
def predict(model: UperNet, imgs: list[torch.Tensor], out_size: tuple[int, int], cfg,
            amp_dtype=None) -> torch.Tensor:
    """Class map ``(H, W)`` int64 for one image given as normalised tensors ``(3, H_s, W_s)`` at each
    test scale. Single scale, no flip: argmax of the (slide) logits resized bilinearly to
    ``out_size`` (mmseg ``EncoderDecoder.postprocess_result``). Multi-scale / flip: argmax of the
    mean softmax over all scales and flips (mmseg ``SegTTAModel.merge_preds``)."""
    t = cfg.test
    flips = [False, True] if t.get("flip") else [False]
    dev = next(model.parameters()).device
    acc = None
    n = 0
    for img in imgs:
        x = img.unsqueeze(0).to(dev)
        for flip in flips:
            xi = x.flip(-1) if flip else x
            with engine.autocast(dev, amp_dtype):
                logits = model.inference(xi, t.mode, tuple(t.crop_size), tuple(t.stride))
            logits = logits.float()
            if flip:
                logits = logits.flip(-1)
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
            if len(imgs) == 1 and len(flips) == 1:
                return logits[0].argmax(0)
            p = logits.softmax(1)
            acc = p if acc is None else acc + p
            n += 1
    return (acc / n)[0].argmax(0)


def image_counts(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                 ignore_index: int = IGNORE_INDEX) -> tuple[list[int], list[int], list[int]]:
    """Per-class pixel counts of one image (mmseg ``intersect_and_union``): ``(intersect, union,
    label)``, each a list of ``num_classes`` ints; pixels labelled ``ignore_index`` are dropped.
    ``pred``/``label``: integer tensors of the same shape (H, W)."""
    keep = label != ignore_index
    p, t = pred[keep].long().cpu(), label[keep].long().cpu()
    inter = torch.bincount(t[p == t], minlength=num_classes)
    area_p = torch.bincount(p, minlength=num_classes)
    area_t = torch.bincount(t, minlength=num_classes)
    return inter.tolist(), (area_p + area_t - inter).tolist(), area_t.tolist()


def evaluate(model: UperNet, dataset: SegTestDataset, cfg, class_names: list[str], amp_dtype=None,
             overlay_dir: Path | None = None, log=None) -> dict:
    """mIoU / mAcc / aAcc over ``dataset`` and coloured overlays of its first ``test.num_overlays``
    images in ``overlay_dir``.

    Each image is predicted on one rank (:func:`crossmae.engine.shard`, no padding); the confusion
    matrices (integer pixel counts) are summed over the process group, and the per-image rows and the
    overlay PNGs travel to rank 0 through it (:func:`crossmae.engine.gather_to_main`), which writes
    the overlays: no folder has to be shared between nodes, and the result equals a one-process
    evaluation of the same weights. The result also holds ``per_image``: the ``segmentation/v1``
    predictions of CONTRACTS.md (file names and per-image per-class intersect / union / label pixel
    counts, in dataset order; complete on rank 0, empty elsewhere)."""
    from PIL import Image
    model.eval()
    num = len(dataset) if cfg.test.get("max_images") is None else min(len(dataset), int(cfg.test.max_images))
    cm = ConfusionMatrix(cfg.model.num_classes, IGNORE_INDEX)
    scales = _test_scales(cfg)
    n_over = int(cfg.test.get("num_overlays", 0) or 0) if overlay_dir is not None else 0
    t0 = time.time()
    rows, overlays = [], []
    for i in engine.shard(num):
        s = dataset.samples[i]
        img, label = load_pair(s, dataset.num_classes, dataset.reduce_zero_label)
        imgs = [to_tensor(resize_pair(img, None, sc)[0]) for sc in scales]
        pred = predict(model, imgs, label.shape, cfg, amp_dtype)
        lab = torch.from_numpy(label)
        cm.update(pred.cpu(), lab)
        rows.append((i, s.image.name, *image_counts(pred.cpu(), lab, cfg.model.num_classes)))
        if i < n_over:
            buf = io.BytesIO()
            Image.fromarray(overlay(img, pred.cpu().numpy(), cfg.model.num_classes)).save(buf, format="png")
            overlays.append((i, f"{s.image.stem}.png", buf.getvalue()))
    cm.all_reduce()
    rows = engine.gather_to_main(rows, key=lambda r: r[0])
    for _, name, png in engine.gather_to_main(overlays, key=lambda r: r[0]):
        atomic_write_bytes(png, overlay_dir / name)  # through crossmae.safeio: no planted link followed
    res = cm.compute()
    res["per_image"] = {"format": "segmentation/v1", "num_classes": int(cfg.model.num_classes),
                        "images": [r[1] for r in rows], "intersect": [r[2] for r in rows],
                        "union": [r[3] for r in rows], "label": [r[4] for r in rows]}
    if log is not None:
        log.info(f"eval: {num} images, {len(scales)} scale(s){' + flip' if cfg.test.get('flip') else ''}, "
                 f"{time.time() - t0:.1f}s: mIoU {res['mIoU']:.2f} mAcc {res['mAcc']:.2f} aAcc {res['aAcc']:.2f}")
    res["per_class"] = {"IoU": dict(zip(class_names, res.pop("IoU"))), "Acc": dict(zip(class_names, res.pop("Acc")))}
    return res


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------
@cli_entry
def main(argv: list[str] | None = None) -> dict:
    """Train (or resume) UperNet on an ADEChallengeData2016-layout dataset and evaluate it.

    Returns the metrics dict written to ``metrics.json`` (``{'stopped_at': N}`` with ``--stop-after``).

    Raises:
        UserError: bad config / option, missing or inconsistent data (folder, image/annotation pairing,
            sizes, label values), bad checkpoint, finished output dir.
    """
    args = build_parser().parse_args(argv)
    if args.stop_after is not None and args.stop_after < 1:
        raise UserError(f"--stop-after {args.stop_after}: expected a positive number of iterations")
    cfg = resolve_config(args, PRESET_DIR)
    _check_config(cfg)
    data_root = resolve_data_root(args.data_root)
    run = Run(args.output_dir, TASK, {"config": cfg.to_dict(), "backbone": args.backbone,
                                      "data_root": str(data_root.resolve())}, cfg.pretty_text, resume=args.resume)
    if run.finished is not None:
        return run.finished
    layout = run.setup()
    per_device, accum, _ = batch_layout(cfg.train, layout.world_size, "config train")
    if accum != 1:
        raise UserError(f"config train: total_batch_size {cfg.train.total_batch_size} needs {accum} accumulation "
                        f"steps of batch_size {per_device} on {layout.world_size} processes; the mmseg schedule "
                        f"does not accumulate: set train.batch_size=None or total = batch_size x processes")
    seed_everything(int(cfg.seed) + layout.rank)
    root = data_root / cfg.data.dataset
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found (data root {data_root}, config data.dataset)")
    class_names = read_class_names(root, cfg.model.num_classes)
    d = cfg.data
    train_ds = SegTrainDataset(root, d.train_split, cfg.model.num_classes, cfg.seed, tuple(d.crop_size),
                               tuple(d.scale), tuple(d.ratio_range), d.cat_max_ratio, d.flip_prob, d.photometric,
                               d.reduce_zero_label)
    val_ds = SegTestDataset(root, d.val_split, cfg.model.num_classes, tuple(d.scale), d.reduce_zero_label)
    model, report = build_model(cfg), None  # the backbone is read before anything is written
    if str(args.backbone).lower() != "none":
        report = load_backbone_weights(model, args.backbone, cfg)
    job = Job(cfg, args.backbone, args.stop_after, model, report, train_ds, val_ds, class_names, data_root, root,
              per_device)
    with run.start():
        run.open_log(TASK)
        return train(run, job)


@dataclass
class Job:
    """The validated ADE20K job (everything read before the run folder was taken)."""
    cfg: Any
    backbone: str
    stop_after: int | None
    model: UperNet
    report: Any                 # LoadReport, or None for --backbone none
    train_ds: SegTrainDataset
    val_ds: SegTestDataset
    class_names: list
    data_root: Path
    root: Path                  # the dataset folder
    per_device: int             # images per device per iteration


def _check_config(cfg) -> None:
    if int(cfg.model.img_size) != int(cfg.data.crop_size[0]) or cfg.data.crop_size[0] != cfg.data.crop_size[1]:
        raise UserError(f"config: model.img_size ({cfg.model.img_size}) must equal the square data.crop_size "
                        f"({tuple(cfg.data.crop_size)})")
    if tuple(cfg.test.crop_size) != tuple(cfg.data.crop_size) and cfg.model.get("rel_pos_bias"):
        raise UserError("config: test.crop_size must equal data.crop_size when model.rel_pos_bias is on")
    if cfg.test.mode not in ("slide", "whole"):
        raise UserError(f"config: test.mode {cfg.test.mode!r}: expected 'slide' or 'whole'")
    if cfg.test.mode == "whole" and cfg.model.get("rel_pos_bias"):
        raise UserError("config: test.mode='whole' needs model.rel_pos_bias=False (the relative position "
                        "table covers crop-size windows only; mmseg uses 'slide')")
    if int(cfg.schedule.max_iters) < 1:
        raise UserError("config: schedule.max_iters must be >= 1")


def train(run: Run, job: Job) -> dict:
    """mmseg's ``IterBasedTrainLoop`` on the driver ``run``: optimizer, resume, DDP (SyncBN on CUDA),
    iterations with the poly schedule, checkpoints every ``train.checkpoint_period``, optional
    evaluation every ``train.eval_period``, then the final evaluation, ``predictions.json`` and
    ``metrics.json`` (``{'stopped_at': N}`` with ``--stop-after``)."""
    cfg, device, rank, world, log, out = job.cfg, run.device, run.rank, run.world, run.log, run.out
    train_ds, val_ds, class_names, bs = job.train_ds, job.val_ds, job.class_names, job.per_device
    model, report = job.model, job.report
    log.info("backbone: none (random initialisation)" if report is None else report.summary())
    model.to(device)
    optimizer = build_optimizer(model, cfg)
    ckpt = run.checkpoints(keep=int(cfg.train.get("keep_checkpoints", 0) or 0))
    # the checkpoint holds rank 0's RNG: restored only on one process
    state = run.resume(model=model, optimizer=optimizer, required=("model", "optimizer", "iter"),
                       restore_rng=world == 1, label=lambda st: f"iteration {int(st['iter'])}")
    start_iter, prev_wall = 0, 0.0
    if state is not None:
        start_iter = int(state["iter"])
        prev_wall = float(state.get("wall_time_s", 0.0))
        log.info(f"resumed from {run.resume_from} at iteration {start_iter}")
    if world > 1 and device.type == "cuda":  # BN -> SyncBN as mmseg's SyncBN (torch's SyncBN has no CPU kernel)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = run.wrap_ddp(model)
    amp_dtype = torch.bfloat16 if device.type == "cuda" and cfg.train.get("amp") == "bf16" else None

    max_iters = int(cfg.schedule.max_iters)
    stop = max_iters if job.stop_after is None else min(int(job.stop_after), max_iters)
    tb = run.tensorboard()
    base_lr = float(cfg.optimizer.lr)
    s = cfg.schedule
    if start_iter < stop:
        loader = torch.utils.data.DataLoader(
            train_ds, batch_sampler=PositionBatchSampler(bs, start_iter, stop, rank, world),
            num_workers=int(cfg.data.num_workers), worker_init_fn=seed_worker,
            pin_memory=device.type == "cuda", persistent_workers=False,
            generator=torch.Generator().manual_seed(int(cfg.seed) * 1000 + start_iter))  # keeps the global RNG
        log.info(f"training iterations {start_iter}..{stop - 1} of {max_iters}, {world} process(es) x {bs} "
                 f"images, crop {tuple(cfg.data.crop_size)}, {len(train_ds)} training images")
        model.train()
        it = start_iter
        t_log, it_log = time.time(), start_iter
        it_iter = iter(loader)
        while it < stop:
            try:
                x, y = next(it_iter)
            except UserError as exc:
                raise _clean_loader_error(exc) from None
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            factor = lr_factor(it, int(s.warmup_iters), float(s.warmup_start_factor), max_iters, float(s.power))
            set_group_lrs(optimizer, base_lr, factor)
            with engine.autocast(device, amp_dtype):
                losses = model(x, y)
            engine.loss_value(losses["loss"], ckpt, f"iteration {it}", world, lambda: f"lr {base_lr * factor:.3g}")
            engine.backward(losses["loss"])
            clip = cfg.train.get("grad_clip")
            engine.optimizer_step(optimizer, None, float(clip) if clip else None, model.parameters())
            it += 1
            if it % int(cfg.train.log_period) == 0 or it == stop:
                dt = (time.time() - t_log) / max(it - it_log, 1)
                t_log, it_log = time.time(), it
                vals = {k: float(v.detach()) for k, v in losses.items()}
                log.info(f"iter {it}/{max_iters} loss {vals['loss']:.4f} (ce {vals['loss_ce']:.4f}, aux "
                         f"{vals['aux.loss_ce']:.4f}) lr {base_lr * factor:.3e} {dt:.2f}s/it")
                engine.log_scalars(tb, {**vals, "lr": base_lr * factor}, it, "train/")
            if engine.due(it, int(cfg.train.checkpoint_period), it == stop):
                state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                         "iter": it, "epoch": 0, "wall_time_s": prev_wall + time.time() - run.t_start,
                         "config_hash": config_hash(cfg.to_dict())}
                # every rank checks (all stop together); the main process writes
                ckpt.save(state, step=it, periodic=it % int(cfg.train.checkpoint_period) == 0,
                          label=f"iteration {it}", write=run.main)
                run.barrier()
            vi = int(cfg.train.get("eval_period") or 0)
            if vi and it % vi == 0 and it < max_iters:
                r = evaluate(unwrap(model), val_ds, cfg, class_names, amp_dtype, None, log)
                if tb is not None:
                    for k in ("mIoU", "mAcc", "aAcc"):
                        tb.add_scalar(f"val/{k}", r[k], it)
                model.train()
    if tb is not None:
        tb.flush()
    if stop < max_iters:
        log.info(f"stopped after iteration {stop} (--stop-after); resume with the same command")
        return {"stopped_at": stop}

    ckpt.check_finite({"model": unwrap(model).state_dict()}, f"iteration {max_iters}")
    res = evaluate(unwrap(model), val_ds, cfg, class_names, amp_dtype, out / "overlays", log)
    per_image = res.pop("per_image")
    if run.main:
        atomic_write_json(per_image, out / "predictions.json")
    if tb is not None:
        for k in ("mIoU", "mAcc", "aAcc"):
            tb.add_scalar(f"val/{k}", res[k], max_iters)
    result = {
        "task": TASK, "protocol": cfg.protocol,
        "metrics": {k: float(res[k]) for k in ("mIoU", "mAcc", "aAcc")},
        "per_class": res["per_class"],
        "backbone": None if report is None else str(job.backbone),
        "backbone_sha256": None if report is None else report.sha256,
        "backbone_report": None if report is None else report_dict(report),
        "config_hash": config_hash(cfg.to_dict()), "seed": int(cfg.seed), "iters": max_iters,
        "num_val_images": len(per_image["images"]),
        "wall_time_s": prev_wall + time.time() - run.t_start, "code_version": code_version(),
        **provenance(job.data_root, sorted(job.root.glob("objectInfo*.txt")), num_train=len(train_ds),
                     num_eval=len(per_image["images"])),
        "predictions": "predictions.json",
    }
    result = run.finish(_json_safe(result))
    log.info(f"metrics: mIoU {res['mIoU']:.2f} mAcc {res['mAcc']:.2f} aAcc {res['aAcc']:.2f} -> {out / 'metrics.json'}")
    return result


def _json_safe(obj):
    """NaN → None recursively (metrics.json must be valid JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


if __name__ == "__main__":
    main()
