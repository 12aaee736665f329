"""ViTDet Mask R-CNN on COCO 2017: ``python -m transfer.coco --backbone ckpt.pth``.

Protocol: detectron2 ``projects/ViTDet/configs/COCO/mask_rcnn_vitdet_{b,l}_100ep.py`` /
``mask_rcnn_vitdet_h_75ep.py`` (presets ``configs/coco/paper_vit_{base,large,huge}.py``), built
from torchvision detection components (``transfer/vitdet``). The recipe table, the differences from
detectron2 and the bad-input cases are in ``docs/coco.md``.

Examples::

    python -m transfer.coco --backbone mae_pretrain_vit_base.pth --output-dir out/coco_b      # paper ViT-B
    torchrun --nproc_per_node 8 -m transfer.coco --config paper_vit_large --backbone L.pth --output-dir out/l
    python -m transfer.coco --config smoke --backbone tiny.pth --output-dir out/smoke          # CPU, minutes
    python -m transfer.coco --eval-only --weights out/coco_b/model_final.pth --output-dir out/eval

The run resumes from ``<output-dir>/checkpoint-latest.pth`` when it exists (requeue-safe); it writes
``config.py``, ``log.txt``, TensorBoard events (``tensorboard/``), ``checkpoint-*.pth``, ``model_final.pth``,
``inference/coco_instances_results.json`` and, last, ``metrics.json``.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crossmae import engine
from crossmae.checkpoint import unwrap
from crossmae.utils import (REPO_ROOT, UserError, atomic_save, atomic_write_json, cli_entry,
                            config_hash, load_config, resolve_data_root,
                            safe_torch_load_hashed, seed_everything, seed_worker)
from crossmae.runs import Run, batch_layout, default_preset, provenance

TASK = "coco"
PRESET_DIR = REPO_ROOT / "configs" / "coco"
LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (task protocol of docs/CONTRACTS.md plus ``--eval-only``/``--weights``)."""
    p = argparse.ArgumentParser(prog="python -m transfer.coco", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default=None,
                   help="pretrained encoder checkpoint (MAE / CrossMAE / timm); 'none' = random init")
    p.add_argument("--config", default=None,
                   help="preset name in configs/coco (paper_vit_base, paper_vit_large, paper_vit_huge, smoke) "
                        "or a .py config path; default: the paper preset of the backbone's architecture")
    p.add_argument("--data-root", default=None, help="datasets root holding coco/ (default $CROSSMAE_DATA_ROOT "
                                                     "or ../shared/data)")
    p.add_argument("--output-dir", default="output/coco", help="run folder (resumed when it has a checkpoint)")
    p.add_argument("--cfg-options", nargs="+", default=None, metavar="KEY=VALUE",
                   help="override config values, e.g. train.max_iter=100 optim.lr=2e-4")
    p.add_argument("--resume", default=None,
                   help="resume from this training checkpoint instead of <output-dir>/checkpoint-latest.pth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-only", action="store_true", help="evaluate --weights on the val split, no training")
    p.add_argument("--weights", default=None, help="detector weights for --eval-only (model_final.pth or a "
                                                   "training checkpoint)")
    p.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda:LOCAL_RANK when available)")
    return p


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _check_batch(batch: list[dict]) -> None:
    for item in batch:
        if item.get("error"):
            raise UserError(item["error"])


def _to_device(item: dict, device: torch.device) -> tuple[torch.Tensor, dict | None]:
    t = item.get("target")
    if t is not None:
        t = {k: v.to(device, non_blocking=True) for k, v in t.items()}
    return item["image"].to(device, non_blocking=True), t


def _amp(device: torch.device, tcfg: dict):
    """The autocast context of ``tcfg`` (``amp``, ``amp_dtype``): CUDA only, else none."""
    dtype = None
    if device.type == "cuda" and tcfg.get("amp", False):
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[tcfg.get("amp_dtype", "bfloat16")]
    return engine.autocast(device, dtype)


def load_detector_weights(model: torch.nn.Module, path: str) -> str:
    """Load detector weights from ``model_final.pth`` (``{'model': sd}``), a training checkpoint or a
    bare state dict, strictly. Returns the hex SHA-256 of the bytes loaded (read once:
    :func:`crossmae.utils.safe_torch_load_hashed`), the ``weights_sha256`` of ``metrics.json``.

    Raises:
        UserError: unreadable file, or keys / shapes that do not match this config's detector.
    """
    obj, sha = safe_torch_load_hashed(path)
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a detector state dict")
    try:
        unwrap(model).load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][:2]
        raise UserError(f"{path}: weights do not match the {unwrap(model).__class__.__name__} of this config: "
                        f"{' '.join(first)[:300]}")
    return sha


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, dataset, device, cfg, out: Path, tag: str, log: logging.Logger) -> tuple[dict, dict]:
    """Run the detector on every image of ``dataset`` (each image on one rank, :func:`crossmae.engine.shard`),
    gather the per-image detections to rank 0 in dataset order (:func:`crossmae.engine.gather_to_main`,
    through the process group: no shared folder), save the COCO results json
    (``<out>/inference/coco_instances_results{tag}.json``, identical to a one-process evaluation) and
    evaluate bbox and segm with pycocotools. Returns ``(metrics, per_category)`` on rank 0 (empty dicts
    elsewhere)."""
    from torch.utils.data import DataLoader

    from transfer.vitdet.data import collate
    from transfer.vitdet.evaluate import coco_evaluate, instances_to_coco_json

    idx = list(engine.shard(len(dataset)))
    loader = DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=cfg.test.batch_size, shuffle=False,
                        num_workers=cfg.data.num_workers, collate_fn=collate)
    net = unwrap(model)
    was_training = net.training
    net.eval()
    per_image: list[tuple[int, list[dict]]] = []
    pos = 0
    t0 = time.time()
    for batch in loader:
        _check_batch(batch)
        images = [b["image"].to(device) for b in batch]
        # fp32 by default, as detectron2's evaluation; test.amp=True runs it under train.amp_dtype
        with _amp(device, {"amp": cfg.test.get("amp", False), "amp_dtype": cfg.train.get("amp_dtype", "bfloat16")}):
            dets = net(images, orig_sizes=[b["orig_size"] for b in batch])
        for b, d in zip(batch, dets):
            per_image.append((idx[pos], instances_to_coco_json(d, b["image_id"], dataset.label_to_cat_id)))
            pos += 1
    net.train(was_training)
    gathered = engine.gather_to_main(per_image, key=lambda r: r[0])
    if not engine.is_main():
        return {}, {}
    results = [r for _, dets in gathered for r in dets]
    atomic_write_json(results, out / "inference" / f"coco_instances_results{tag}.json")
    metrics, per_cat, summary = coco_evaluate(dataset.ann_file, results,
                                              img_ids=[int(im["id"]) for im in dataset.images])
    log.info(f"evaluation{tag}: {len(dataset)} images, {len(results)} detections, {time.time() - t0:.1f}s")
    log.info(summary.strip())
    log.info("  ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
    return metrics, per_cat


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
@cli_entry
def main(argv: list[str] | None = None) -> dict:
    """Train (or resume) and evaluate ViTDet Mask R-CNN, or evaluate ``--weights`` with ``--eval-only``.

    Returns:
        the metrics.json dict (rank 0; other ranks return it without writing).
    Raises:
        UserError: bad config / option / backbone / data (one line); nothing is written to metrics.json.
    """
    args = build_parser().parse_args(argv)
    if args.eval_only and not args.weights:
        raise UserError("--eval-only needs --weights (a model_final.pth or training checkpoint)")
    if not args.eval_only and args.backbone is None:
        raise UserError("--backbone is required (a MAE / CrossMAE checkpoint, or 'none' for random init)")
    cfg = load_config(default_preset(args, PRESET_DIR), args.cfg_options, preset_dir=PRESET_DIR)
    data_root = resolve_data_root(args.data_root)
    identity = {"config": cfg.to_dict(), "seed": args.seed, "eval_only": bool(args.eval_only),
                "weights": args.weights if args.eval_only else None,
                "backbone": None if args.eval_only else args.backbone, "data_root": str(data_root.resolve())}
    run = Run(args.output_dir, TASK, identity, cfg.pretty_text, resume=args.resume, device=args.device)
    if run.finished is not None:
        return run.finished
    layout = run.setup()
    per_device, accum = 0, 0   # the training batch is checked only for training (--eval-only runs on any world)
    if not args.eval_only:
        per_device, accum, _ = batch_layout(cfg.train, layout.world_size, "config train")

    # data first: bad input fails before anything is written
    from transfer.vitdet.data import build_dataset
    val_set = build_dataset(data_root, cfg.data.to_dict(), "val")
    train_set = None if args.eval_only else build_dataset(data_root, cfg.data.to_dict(), "train")
    if args.backbone not in (None, "none") and not args.eval_only:
        from crossmae.zoo import resolve_backbone
        resolve_backbone(args.backbone)
    # the detector and its pretrained backbone are built before anything is written (bad checkpoint:
    # one line, empty folder); a resumed run overwrites the weights from its checkpoint
    from transfer.vitdet.backbone import load_pretrained_backbone
    from transfer.vitdet.model import build_model
    seed_everything(args.seed + layout.rank)
    mc = cfg.model.to_dict()
    model, report, weights_sha256 = build_model(mc), None, None
    if args.eval_only:
        weights_sha256 = load_detector_weights(model, args.weights)
    elif args.backbone != "none":
        report = load_pretrained_backbone(model.backbone.net, args.backbone, mc["pretrain_img_size"], mc["arch"])

    job = Job(cfg, args.seed, args.backbone, args.weights, model, report, train_set, val_set, data_root,
              per_device, accum, weights_sha256)
    with run.start():
        run.open_log(TASK)
        return evaluate_only(run, job) if args.eval_only else train(run, job)


@dataclass
class Job:
    """The validated COCO job (everything read before the run folder was taken)."""
    cfg: Any
    seed: int
    backbone: str | None
    weights: str | None
    model: torch.nn.Module
    report: Any                 # LoadReport of the pretrained backbone, or None
    train_set: Any              # None with --eval-only
    val_set: Any
    data_root: Path
    per_device: int             # images per device per micro-batch (config train.batch_size)
    accum: int                  # micro-batches per optimizer step
    weights_sha256: str | None = None   # --eval-only: SHA-256 of the bytes --weights was loaded from


def _common_metrics(run: Run, job: Job) -> dict:
    cfg, train_set, val_set = job.cfg, job.train_set, job.val_set
    files = [val_set.ann_file] + ([] if train_set is None else [train_set.ann_file])
    return {"task": TASK, "protocol": cfg.protocol, "seed": job.seed, "config_hash": config_hash(cfg.to_dict()),
            **provenance(job.data_root, files, num_train=0 if train_set is None else len(train_set),
                         num_eval=len(val_set)),
            "eval_image_ids": [int(im["id"]) for im in val_set.images],
            "predictions": "inference/coco_instances_results.json"}


def evaluate_only(run: Run, job: Job) -> dict:
    """``--eval-only``: evaluate ``--weights`` on the val split and write ``metrics.json``."""
    model = job.model.to(run.device)
    metrics, per_cat = evaluate(model, job.val_set, run.device, job.cfg, run.out, "", run.log)
    return run.finish({**_common_metrics(run, job), "metrics": metrics, "per_category": per_cat,
                       "backbone": job.backbone, "backbone_sha256": None, "backbone_report": None,
                       "weights": str(job.weights), "weights_sha256": job.weights_sha256, "iters": 0,
                       "wall_time_s": round(time.time() - run.t_start, 2)})


def train(run: Run, job: Job) -> dict:
    """detectron2's ``tools/lazyconfig_train_net.py`` ``do_train`` on the driver ``run``: optimizer,
    resume, DDP, the iteration loop (lr schedule, accumulation, checkpoints every
    ``train.checkpoint_period``, evaluation every ``train.eval_period``), ``model_final.pth``, the
    final evaluation and ``metrics.json``."""
    from torch.utils.data import BatchSampler, DataLoader

    from crossmae.lr_sched import set_group_lrs
    from transfer.vitdet.data import TrainingStream, collate
    from transfer.vitdet.optim import build_optimizer, lr_factor

    cfg, device, rank, world, log = job.cfg, run.device, run.rank, run.world, run.log
    tc, mc = cfg.train, cfg.model.to_dict()
    per_device, accum, train_set, val_set, out = job.per_device, job.accum, job.train_set, job.val_set, run.out
    model = job.model.to(device)
    log.info(f"ViTDet Mask R-CNN ({cfg.protocol}): {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
             f"parameters, device {device}, {world} process(es), accumulation {accum}")
    common = _common_metrics(run, job)

    ckpt = run.checkpoints(keep=tc.keep_checkpoints)
    optimizer = build_optimizer(model, cfg.optim.to_dict(), num_layers=mc["depth"])
    scaler = torch.amp.GradScaler("cuda") if (device.type == "cuda" and tc.amp and tc.amp_dtype == "float16") else None
    state = run.resume(model=model, optimizer=optimizer, scaler=scaler, required=("model", "optimizer", "iter"),
                       label=lambda st: f"iteration {int(st['iter'])}")
    start_iter, elapsed_prev = 0, 0.0
    if state is not None:
        start_iter = int(state["iter"])
        elapsed_prev = float(state.get("wall_time_s", 0.0))
        report_dict = state.get("backbone_report")
        log.info(f"resumed from iteration {start_iter}")
    elif job.backbone == "none":
        report_dict = None
        log.info("backbone: random initialisation (--backbone none)")
    else:
        report_dict = job.report.to_dict()
        log.info(job.report.summary())

    train_model = run.wrap_ddp(model, broadcast_buffers=False, find_unused_parameters=False)
    if train_model is not model and tc.get("ddp_fp16_compression", False) and device.type == "cuda":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        train_model.register_comm_hook(None, default_hooks.fp16_compress_hook)

    max_iter = int(tc.max_iter)
    stream = TrainingStream(len(train_set), job.seed, start=start_iter * tc.total_batch_size, rank=rank,
                            world_size=world)
    loader = DataLoader(train_set, batch_sampler=BatchSampler(stream, per_device, drop_last=True),
                        collate_fn=collate, num_workers=cfg.data.num_workers, worker_init_fn=seed_worker,
                        pin_memory=device.type == "cuda",
                        # own generator: creating the iterator must not draw from the global RNG that
                        # the checkpoint restores (resume equality); augmentation is seeded per sample
                        generator=torch.Generator().manual_seed(job.seed * 1000 + rank))
    tb = run.tensorboard()
    history: list[dict] = []
    it = start_iter
    data_iter = iter(loader)
    train_model.train()
    t_iter = time.time()
    while it < max_iter:
        factor = lr_factor(it, cfg.optim, max_iter)
        set_group_lrs(optimizer, cfg.optim.lr, factor)
        sums = {k: 0.0 for k in LOSS_NAMES}
        for a in range(accum):
            batch = next(data_iter)
            _check_batch(batch)
            images, targets = zip(*[_to_device(b, device) for b in batch])
            with engine.no_sync(train_model, a == accum - 1):
                with _amp(device, tc):
                    losses = train_model(list(images), list(targets))
                loss = sum(losses.values())
                engine.loss_value(loss, ckpt, f"iteration {it}", world, detail=lambda: ", ".join(
                    f"{k}={v.item():.3g}" for k, v in losses.items()))
                engine.backward(loss, accum, scaler)
            for k, v in losses.items():
                sums[k] += v.item() / accum
        engine.optimizer_step(optimizer, scaler)
        it += 1
        sums["total_loss"] = sum(sums[k] for k in LOSS_NAMES)
        history.append({"iter": it, **sums, "lr": cfg.optim.lr * factor})
        if rank == 0 and (it % tc.log_period == 0 or it == max_iter or it == start_iter + 1):
            dt = (time.time() - t_iter) / max(1, len(history))
            log.info(f"iter {it}/{max_iter}  " + "  ".join(f"{k}={v:.4f}" for k, v in sums.items())
                     + f"  lr={cfg.optim.lr * factor:.3e}  {dt:.2f}s/it")
            engine.log_scalars(tb, {**sums, "lr": cfg.optim.lr * factor}, it, "train/")
        if engine.due(it, tc.checkpoint_period, it == max_iter):
            state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler else None, "iter": it, "epoch": it,
                     "backbone_report": report_dict, "config_hash": common["config_hash"],
                     "wall_time_s": elapsed_prev + time.time() - run.t_start}
            # every rank checks (all stop together); rank 0 writes
            ckpt.save(state, step=it, periodic=it % tc.checkpoint_period == 0, label=f"iteration {it}",
                      write=run.main)
        if tc.eval_period and it % tc.eval_period == 0 and it != max_iter:
            m, _ = evaluate(train_model, val_set, device, cfg, out, f"_{it}", log)
            if tb is not None:
                for k, v in m.items():
                    if not math.isnan(v):
                        tb.add_scalar(f"val/{k}", v, it)
    final = {"model": unwrap(model).state_dict(), "iter": it}
    ckpt.check_finite(final, f"iteration {it}")
    if run.main:
        atomic_save(final, out / "model_final.pth")
    last_metrics, last_per_cat = evaluate(train_model, val_set, device, cfg, out, "", log)
    return run.finish({**common, "metrics": last_metrics, "per_category": last_per_cat,
                       "backbone": None if job.backbone == "none" else str(job.backbone),
                       "backbone_sha256": (report_dict or {}).get("sha256"), "backbone_report": report_dict,
                       "iters": it, "wall_time_s": round(elapsed_prev + time.time() - run.t_start, 2),
                       "train_losses": history[-1] if history else None})


if __name__ == "__main__":
    main()
