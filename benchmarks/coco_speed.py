"""Training-iteration time, peak memory and inference throughput of the ViTDet Mask R-CNN.

``python -m benchmarks.coco_speed [--config paper_vit_base] [--device cuda|cpu] [--batch-sizes 1 2]``

Measures, for the detector of a ``configs/coco`` preset at its full input size (1024² for the paper
presets) on synthetic inputs (random pixels, 7 random instances per image, COCO's mean):

- one optimiser iteration (forward with the five losses, backward, AdamW step with the recipe's
  parameter groups) per device batch size: seconds/iteration and peak memory;
- inference (eval mode, batch 1, score threshold and top-100 of the recipe, mask pasting to a
  640×480 original): images/second.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` (and reserved), AMP bf16 as in training;
on CPU the process's peak resident set (``ru_maxrss``; monotonic, so batch sizes are run in
increasing order and each value is the peak so far) and the allocation peak seen by torch's CPU
profiler (``profile_memory``) for the measured iteration. Reference: detectron2 reports ~10.9 GB
training memory per GPU for ViT-B Mask R-CNN at 1 image per GPU (ViTDet model zoo, fp16 AMP).

Writes a JSON report (``--output``) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from crossmae.utils import REPO_ROOT, atomic_write_json, load_config

DETECTRON2_TRAIN_MEM_GB = 10.9  # ViT-B, 1 image/GPU (brief / ViTDet model zoo)


def synthetic_batch(n: int, size: int, num_instances: int = 7, seed: int = 0):
    """``n`` random images (3, size, size) in 0..255 and targets with ``num_instances`` random
    box-shaped masks each (labels 1..80)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, size, size, generator=g) * 255)
        xy = torch.rand(num_instances, 2, generator=g) * size * 0.7
        wh = 16 + torch.rand(num_instances, 2, generator=g) * size * 0.3
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1).floor()
        masks = torch.zeros(num_instances, size, size, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, 81, (num_instances,), generator=g),
                        "masks": masks})
    return images, targets


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_gb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 ** 3 if sys.platform == "darwin" else 1024 ** 2)


def bench_train(model, optimizer, bs, size, device, amp, iters, warmup, cpu_profile):
    images, targets = synthetic_batch(bs, size)
    images = [i.to(device) for i in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    model.train()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with (torch.autocast("cuda", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)):
            losses = model(images, targets)
        loss = sum(losses.values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for i in range(warmup + iters):
        _sync(device)
        t0 = time.perf_counter()
        if cpu_profile and device.type == "cpu" and i == warmup + iters - 1:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
            peak_alloc = _profiler_peak(prof)
        else:
            step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    out = {"batch_per_device": bs, "iters_measured": iters, "warmup": warmup,
           "s_per_iter": sum(times[warmup:]) / max(1, iters), "all_iter_s": [round(t, 3) for t in times]}
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1024 ** 3
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1024 ** 3
    else:
        out["peak_rss_gb_so_far"] = _rss_gb()
        if cpu_profile:
            out["profiler_peak_alloc_gb"] = peak_alloc
    return out


def _profiler_peak(prof) -> float:
    """Peak of the running sum of CPU allocations/frees recorded by the profiler (GB)."""
    events = []
    for e in prof.events():
        if e.cpu_memory_usage:
            events.append((e.time_range.start, e.cpu_memory_usage))
    events.sort()
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak / 1024 ** 3


@torch.no_grad()
def bench_infer(model, size, device, amp, iters, warmup):
    images, _ = synthetic_batch(1, size, seed=1)
    img = images[0].to(device)
    model.eval()
    times = []
    for _ in range(warmup + iters):
        _sync(device)
        t0 = time.perf_counter()
        with (torch.autocast("cuda", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)):
            model([img], orig_sizes=[(480, 640)])
        _sync(device)
        times.append(time.perf_counter() - t0)
    t = sum(times[warmup:]) / max(1, iters)
    return {"images_per_s": 1.0 / t, "s_per_image": t, "iters_measured": iters, "warmup": warmup}


def main(argv=None) -> dict:
    """Run the benchmark; returns the report dict (also written to ``--output``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.coco_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="paper_vit_base")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--iters", type=int, default=None, help="measured iterations (default 10 CUDA, 1 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 3 CUDA, 1 CPU)")
    p.add_argument("--infer-iters", type=int, default=None, help="default 20 CUDA, 2 CPU")
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA")
    p.add_argument("--cpu-profile", action="store_true", help="CPU: torch profiler allocation peak (slow)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--max-vm-gb", type=float, default=None,
                   help="CPU safety on shared machines: cap the address space (RLIMIT_AS); an iteration that "
                        "needs more is reported as out of memory instead of invoking the OOM killer")
    p.add_argument("--cfg-options", nargs="+", default=None)
    p.add_argument("--output", default=None, help="JSON report path (default output/benchmarks/coco_speed_<device>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_vm_gb:
        lim = int(args.max_vm_gb * 1024 ** 3)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    iters = args.iters if args.iters is not None else (10 if cuda else 1)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    infer_iters = args.infer_iters if args.infer_iters is not None else (20 if cuda else 2)
    amp = cuda and not args.no_amp

    from transfer.vitdet.model import build_model
    from transfer.vitdet.optim import build_optimizer
    cfg = load_config(args.config, args.cfg_options, preset_dir=REPO_ROOT / "configs" / "coco")
    torch.manual_seed(0)
    model = build_model(cfg.model.to_dict()).to(device)
    optimizer = build_optimizer(model, cfg.optim.to_dict(), cfg.model.depth)
    size = cfg.model.img_size
    report = {"config": args.config, "protocol": cfg.protocol, "device": torch.cuda.get_device_name(device) if cuda
              else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "input": f"{size}x{size}", "amp": "bf16" if amp else "fp32",
              "params_m": sum(q.numel() for q in model.parameters()) / 1e6,
              "torch": torch.__version__, "train": [], "detectron2_train_mem_gb_bs1": DETECTRON2_TRAIN_MEM_GB}
    for bs in sorted(args.batch_sizes):
        try:
            r = bench_train(model, optimizer, bs, size, device, amp, iters, warmup, args.cpu_profile)
        except (MemoryError, RuntimeError) as exc:   # CUDA OOM / RLIMIT_AS allocation failure
            if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
                raise
            optimizer.zero_grad(set_to_none=True)
            r = {"batch_per_device": bs, "error": f"out of memory: {str(exc).splitlines()[0][:200]}",
                 "peak_rss_gb_so_far": _rss_gb()}
            if cuda:
                torch.cuda.empty_cache()
        report["train"].append(r)
        print(json.dumps(r), flush=True)
    report["inference"] = bench_infer(model, size, device, amp, infer_iters, 1 if not cuda else 5)
    print(json.dumps(report["inference"]), flush=True)
    out = Path(args.output) if args.output else Path("output/benchmarks") / f"coco_speed_{device.type}.json"
    atomic_write_json(report, out)
    print(f"\n{report['protocol']} on {report['device']}, {report['input']}, {report['amp']}, "
          f"{report['params_m']:.1f}M params")
    for r in report["train"]:
        if "error" in r:
            print(f"  train batch {r['batch_per_device']}/device: {r['error']}")
            continue
        mem = (f"peak {r['peak_mem_gb']:.2f} GB allocated ({r['peak_reserved_gb']:.2f} reserved)" if cuda else
               f"peak RSS so far {r['peak_rss_gb_so_far']:.2f} GB"
               + (f", profiler alloc peak {r['profiler_peak_alloc_gb']:.2f} GB" if "profiler_peak_alloc_gb" in r else ""))
        print(f"  train batch {r['batch_per_device']}/device: {r['s_per_iter']:.3f} s/iter, {mem}")
    print(f"  inference: {report['inference']['images_per_s']:.3f} images/s")
    print(f"  detectron2 reference: ~{DETECTRON2_TRAIN_MEM_GB} GB training memory/GPU at batch 1 (fp16 AMP)")
    return report


if __name__ == "__main__":
    main()
