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
``config.py``, ``log.txt``, TensorBoard events (``tb/``), ``checkpoint-*.pth``, ``model_final.pth``,
``inference/coco_instances_results.json`` and, last, ``metrics.json``.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch

from crossmae import engine
from crossmae.checkpoint import CheckpointManager, unwrap
from crossmae.utils import (REPO_ROOT, UserError, atomic_save, atomic_write_json, cli_entry,
                            config_hash, init_distributed, load_config, resolve_data_root,
                            safe_torch_load_hashed, seed_everything, seed_worker)
from crossmae.runs import RunDir, close_logger, code_version, default_preset, get_logger, provenance

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
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
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
    """Run the detector on every image of ``dataset`` (sharded over ranks), save the COCO results
    json (``<out>/inference/coco_instances_results{tag}.json``) and evaluate bbox and segm with
    pycocotools. Returns ``(metrics, per_category)`` on rank 0 (empty dicts elsewhere)."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from transfer.vitdet.data import collate
    from transfer.vitdet.evaluate import coco_evaluate, instances_to_coco_json

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    idx = list(range(rank, len(dataset), world))
    loader = DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=cfg.test.batch_size, shuffle=False,
                        num_workers=cfg.data.num_workers, collate_fn=collate)
    net = unwrap(model)
    was_training = net.training
    net.eval()
    results: list[dict] = []
    t0 = time.time()
    for batch in loader:
        _check_batch(batch)
        images = [b["image"].to(device) for b in batch]
        # fp32 by default, as detectron2's evaluation; test.amp=True runs it under train.amp_dtype
        with _amp(device, {"amp": cfg.test.get("amp", False), "amp_dtype": cfg.train.get("amp_dtype", "bfloat16")}):
            dets = net(images, orig_sizes=[b["orig_size"] for b in batch])
        for b, d in zip(batch, dets):
            results += instances_to_coco_json(d, b["image_id"], dataset.label_to_cat_id)
    net.train(was_training)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    if rank != 0:
        return {}, {}
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
    tc = cfg.train
    rank, world, local_rank = init_distributed()
    if args.device:
        device = torch.device(args.device if args.device != "cuda" else f"cuda:{local_rank}")
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    per_device = int(tc.batch_size_per_device)
    if tc.total_batch_size % (world * per_device):
        raise UserError(f"train.total_batch_size={tc.total_batch_size} is not a multiple of "
                        f"{world} devices x train.batch_size_per_device={per_device}")
    accum = tc.total_batch_size // (world * per_device)

    data_root = resolve_data_root(args.data_root)
    identity = {"config": cfg.to_dict(), "seed": args.seed, "eval_only": bool(args.eval_only),
                "weights": args.weights if args.eval_only else None,
                "backbone": None if args.eval_only else args.backbone, "data_root": str(data_root.resolve())}
    run = RunDir(args.output_dir, TASK, identity, cfg.pretty_text, resume=args.resume)
    if run.finished is not None:
        return run.finished

    # data first: bad input fails before anything is written
    from transfer.vitdet.data import TrainingStream, build_dataset, collate
    val_set = build_dataset(data_root, cfg.data.to_dict(), "val")
    train_set = None if args.eval_only else build_dataset(data_root, cfg.data.to_dict(), "train")
    if args.backbone not in (None, "none") and not args.eval_only:
        from crossmae.zoo import resolve_backbone
        resolve_backbone(args.backbone)
    # the detector and its pretrained backbone are built before anything is written (bad checkpoint:
    # one line, empty folder); a resumed run overwrites the weights from its checkpoint
    from transfer.vitdet.backbone import load_pretrained_backbone
    from transfer.vitdet.model import build_model
    seed_everything(args.seed + rank)
    mc = cfg.model.to_dict()
    run.model, run.report = build_model(mc), None
    if args.eval_only:
        run.weights_sha256 = load_detector_weights(run.model, args.weights)
    elif args.backbone != "none":
        run.report = load_pretrained_backbone(run.model.backbone.net, args.backbone, mc["pretrain_img_size"],
                                              mc["arch"])

    run.start()
    out = run.out
    log = get_logger(out, TASK)
    try:
        return _run(args, cfg, out, log, device, world, accum, per_device, train_set, val_set, TrainingStream,
                    collate, rank, run, data_root)
    finally:
        close_logger(log)
        run.close()


def _run(args, cfg, out, log, device, world, accum, per_device, train_set, val_set, TrainingStream, collate, rank,
         run, data_root):
    from torch.utils.data import BatchSampler, DataLoader

    from crossmae.lr_sched import set_group_lrs
    from transfer.vitdet.optim import build_optimizer, lr_factor

    tc, mc = cfg.train, cfg.model.to_dict()
    t_start = time.time()
    model = run.model.to(device)
    log.info(f"ViTDet Mask R-CNN ({cfg.protocol}): {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
             f"parameters, device {device}, {world} process(es), accumulation {accum}")
    metrics_common = {"task": TASK, "protocol": cfg.protocol, "seed": args.seed, "config_hash": config_hash(cfg.to_dict()),
                      "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "num_gpus": world if device.type == "cuda" else 0, "code_version": code_version()}

    files = [val_set.ann_file] + ([] if train_set is None else [train_set.ann_file])
    metrics_common.update(provenance(data_root, files, num_train=0 if train_set is None else len(train_set),
                                     num_eval=len(val_set)),
                          eval_image_ids=[int(im["id"]) for im in val_set.images],
                          predictions="inference/coco_instances_results.json")
    if args.eval_only:
        metrics, per_cat = evaluate(model, val_set, device, cfg, out, "", log)
        result = {**metrics_common, "metrics": metrics, "per_category": per_cat, "backbone": args.backbone,
                  "backbone_sha256": None, "backbone_report": None, "weights": str(args.weights),
                  "weights_sha256": run.weights_sha256, "iters": 0,
                  "wall_time_s": round(time.time() - t_start, 2)}
        return run.finish(result)

    ckpt = CheckpointManager(out, keep=tc.keep_checkpoints)
    state = run.load_resume(required=("model", "optimizer", "iter"))
    if state is not None and "rng" in state:
        from crossmae.checkpoint import set_rng_state
        set_rng_state(state["rng"])

    optimizer = build_optimizer(model, cfg.optim.to_dict(), num_layers=mc["depth"])
    start_iter, elapsed_prev = 0, 0.0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"{run.resume_from}: does not match this config "
                            f"({str(exc).splitlines()[0][:200]})")
        start_iter = int(state["iter"])
        ckpt.resumed(run.resume_from, f"iteration {start_iter}")
        elapsed_prev = float(state.get("wall_time_s", 0.0))
        report_dict = state.get("backbone_report")
        log.info(f"resumed from iteration {start_iter}")
    elif args.backbone == "none":
        report_dict = None
        log.info("backbone: random initialisation (--backbone none)")
    else:
        report = run.report
        report_dict = report.to_dict()
        log.info(report.summary())

    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  broadcast_buffers=False, find_unused_parameters=False)
        if tc.get("ddp_fp16_compression", False) and device.type == "cuda":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        train_model = ddp
    else:
        train_model = model

    max_iter = int(tc.max_iter)
    stream = TrainingStream(len(train_set), args.seed, start=start_iter * tc.total_batch_size, rank=rank,
                            world_size=world)
    loader = DataLoader(train_set, batch_sampler=BatchSampler(stream, per_device, drop_last=True),
                        collate_fn=collate, num_workers=cfg.data.num_workers, worker_init_fn=seed_worker,
                        pin_memory=device.type == "cuda",
                        # own generator: creating the iterator must not draw from the global RNG that
                        # the checkpoint restores (resume equality); augmentation is seeded per sample
                        generator=torch.Generator().manual_seed(args.seed * 1000 + rank))
    tb = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(str(out / "tb"))
    scaler = torch.amp.GradScaler("cuda") if (device.type == "cuda" and tc.amp and tc.amp_dtype == "float16") else None
    if scaler is not None and state is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    history: list[dict] = []
    last_metrics, last_per_cat = {}, {}
    it = start_iter
    data_iter = iter(loader)
    train_model.train()
    t_iter = time.time()
    try:
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
                         "backbone_report": report_dict, "config_hash": metrics_common["config_hash"],
                         "wall_time_s": elapsed_prev + time.time() - t_start}
                # every rank checks (all stop together); rank 0 writes
                ckpt.save(state, step=it, periodic=it % tc.checkpoint_period == 0, label=f"iteration {it}",
                          write=rank == 0)
            if tc.eval_period and it % tc.eval_period == 0 and it != max_iter:
                m, _ = evaluate(train_model, val_set, device, cfg, out, f"_{it}", log)
                if rank == 0:
                    for k, v in m.items():
                        if not math.isnan(v):
                            tb.add_scalar(f"val/{k}", v, it)
    finally:
        if tb is not None:
            tb.close()
    final = {"model": unwrap(model).state_dict(), "iter": it}
    ckpt.check_finite(final, f"iteration {it}")
    if rank == 0:
        atomic_save(final, out / "model_final.pth")
    last_metrics, last_per_cat = evaluate(train_model, val_set, device, cfg, out, "", log)
    result = {**metrics_common, "metrics": last_metrics, "per_category": last_per_cat,
              "backbone": None if args.backbone == "none" else str(args.backbone),
              "backbone_sha256": (report_dict or {}).get("sha256"), "backbone_report": report_dict,
              "iters": it, "wall_time_s": round(elapsed_prev + time.time() - t_start, 2),
              "train_losses": history[-1] if history else None}
    return run.finish(result)


if __name__ == "__main__":
    main()
