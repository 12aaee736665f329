"""Speed / memory of the ADE20K UperNet (``python -m benchmarks.ade20k_speed``).

Measures, for the ``paper_vit_base`` model (ViT-B/16 + UperNet, 512×512 crops, random weights):

* training iteration time (forward + backward + AdamW step with layer-decay groups) at
  ``--batch-size`` images (default 2 = mmseg's 8×2 setting per GPU), median over ``--iters``;
* peak memory of the training step: ``torch.cuda.max_memory_allocated`` on CUDA (what mmengine
  logs as ``memory``; mmseg reports 9.96 GB for this config at 2 images per GPU), peak resident set
  size growth of the process on CPU (not comparable to a GPU figure, reported for completeness);
* sliding-window inference time per image (512 crops, stride 341) on a real ADE20K validation image
  resized to the test scale (2048, 512) — 512×683, i.e. 2 windows — median over ``--infer-images``.

Results are printed and, with ``--json PATH``, written atomically. Timings on a shared CPU are
indicative only.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from crossmae.utils import atomic_write_json, default_device, load_config, resolve_data_root

MMSEG_TRAIN_MEMORY_GB = 9.96  # mmseg configs/mae/metafile.yaml, mae-base_upernet_8xb2-amp-160k_ade20k-512x512


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB -> GiB


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(config: str = "paper_vit_base", batch_size: int = 2, iters: int = 3, warmup: int = 1,
        infer_images: int = 2, device: str | None = None, threads: int | None = None) -> dict:
    """Run the benchmark and return the results dict (see the module docstring)."""
    from transfer.ade20k import PRESET_DIR, build_model, build_optimizer
    from transfer.seg.data import SegTestDataset

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device) if device else default_device()
    cfg = load_config(config, None, PRESET_DIR)
    torch.manual_seed(0)
    model = build_model(cfg).to(dev)
    opt = build_optimizer(model, cfg)
    amp = torch.bfloat16 if dev.type == "cuda" and cfg.train.get("amp") == "bf16" else None
    c = tuple(cfg.data.crop_size)
    x = torch.randn(batch_size, 3, *c, device=dev)
    y = torch.randint(0, cfg.model.num_classes, (batch_size, *c), device=dev)
    y[:, :32] = 255
    rss0 = _rss_gb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.train()
    times = []
    for i in range(warmup + iters):
        _sync(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = model(x, y)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 1024 ** 3
        mem_kind = "torch.cuda.max_memory_allocated"
    else:
        peak = _rss_gb() - rss0
        mem_kind = "peak RSS growth of the process (CPU)"
    del opt, loss
    # sliding-window inference on a real validation image
    root = resolve_data_root(None) / "ade20k/ADEChallengeData2016"
    ds = SegTestDataset(root, "validation", 150, tuple(cfg.data.scale))
    img = ds[0][0].unsqueeze(0).to(dev)
    model.eval()
    t = cfg.test
    inf = []
    for i in range(infer_images + 1):
        _sync(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            model.inference(img, t.mode, tuple(t.crop_size), tuple(t.stride))
        _sync(dev)
        if i:
            inf.append(time.perf_counter() - t0)
    res = {
        "config": config, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "amp": str(amp), "batch_size": batch_size,
        "crop": list(c), "train_iter_s_median": statistics.median(times), "train_iter_s_all": times,
        "train_peak_memory_gb": peak, "memory_kind": mem_kind,
        "mmseg_train_memory_gb": MMSEG_TRAIN_MEMORY_GB,
        "infer_image_hw": list(img.shape[2:]), "infer_windows": _windows(img.shape[2:], t),
        "infer_s_per_image_median": statistics.median(inf), "infer_s_all": inf,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }
    return res


def _windows(hw, t) -> int:
    (h, w), (hc, wc), (hs, ws) = hw, t.crop_size, t.stride
    return (max(h - hc + hs - 1, 0) // hs + 1) * (max(w - wc + ws - 1, 0) // ws + 1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ade20k_speed", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="paper_vit_base")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--infer-images", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    res = run(a.config, a.batch_size, a.iters, a.warmup, a.infer_images, a.device, a.threads)
    print(f"ADE20K UperNet {a.config} on {res['device']} ({res['torch_threads']} threads, amp {res['amp']}), "
          f"{res['params_m']:.1f}M params")
    print(f"  training iteration, batch {a.batch_size} at {res['crop'][0]}x{res['crop'][1]}: "
          f"{res['train_iter_s_median']:.3f} s (median of {len(res['train_iter_s_all'])})")
    print(f"  training peak memory: {res['train_peak_memory_gb']:.2f} GB ({res['memory_kind']}); "
          f"mmseg reports {MMSEG_TRAIN_MEMORY_GB} GB (GPU, 2 images per GPU)")
    print(f"  sliding-window inference: {res['infer_s_per_image_median']:.3f} s per image "
          f"({res['infer_image_hw'][0]}x{res['infer_image_hw'][1]}, {res['infer_windows']} windows)")
    if a.json:
        atomic_write_json(res, a.json)
    return res


if __name__ == "__main__":
    main()
