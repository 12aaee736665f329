"""``python -m benchmarks.bootstrap_speed [--images 5000] [--resamples 10000] [--out output/benchmarks/bootstrap_speed.json]``

How long the leaderboard's paired COCO bootstrap (:mod:`benchmarks.bootstrap`) takes at COCO val2017
size. Synthetic but realistic predictions: ``--images`` images of 640×480 with Poisson(7.3) ground
truth boxes each (COCO val2017 has 36,781 boxes on 5,000 images) over 80 categories with a skewed,
person-heavy frequency, 1 % crowd; two "backbones" whose detectors differ in localisation noise,
each with 100 detections per image (jittered copies of the ground truth with quality-dependent
scores, the rest background boxes with low scores), as a Mask R-CNN's ``maxDets=100`` output.

Prints a table (pycocotools ``evaluate`` once per backbone, the per-image weighted accumulation of
all resamples for both backbones: wall and CPU seconds, total) and writes it as JSON, with the
1-minute load average (the figure is only as good as the machine was idle). Box AP only: the mask AP bootstrap runs the same
accumulation on the segm ``evaluate`` (whose own cost is pycocotools', paid once per run anyway).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import time
from pathlib import Path

import numpy as np

from crossmae.utils import atomic_write_json, check_writable, cli_entry


#: where the JSON goes by default (with the other benchmarks' results; ``/output*/`` is git-ignored)
DEFAULT_OUT = Path("output/benchmarks/bootstrap_speed.json")


def synthetic(n_images: int, seed: int = 0, noise=(0.08, 0.10)):
    """``(gt dataset dict, [results list per backbone])`` with the statistics in the module doc."""
    rng = np.random.default_rng(seed)
    cats = [{"id": c, "name": f"cat{c}"} for c in range(1, 81)]
    freq = 1.0 / np.arange(1, 81) ** 1.1
    freq /= freq.sum()
    images, anns = [], []
    results = [[] for _ in noise]
    aid = 1
    W, H = 640, 480
    for i in range(n_images):
        iid = i + 1
        images.append({"id": iid, "width": W, "height": H, "file_name": f"{iid:012d}.jpg"})
        n_gt = rng.poisson(7.3)
        boxes = []
        for _ in range(n_gt):
            w, h = np.exp(rng.uniform(np.log(8), np.log(400), 2))
            x, y = rng.uniform(0, W - min(w, W - 1)), rng.uniform(0, H - min(h, H - 1))
            c = int(rng.choice(80, p=freq)) + 1
            anns.append({"id": aid, "image_id": iid, "category_id": c, "bbox": [x, y, w, h], "area": w * h,
                         "iscrowd": int(rng.random() < 0.01)})
            boxes.append((x, y, w, h, c))
            aid += 1
        for b, s in enumerate(noise):
            dets = []
            for (x, y, w, h, c) in boxes:
                for _ in range(rng.integers(1, 4)):
                    j = rng.normal(0, s * 2.5 if rng.random() < 0.3 else s, 4)
                    q = float(np.exp(-np.abs(j).sum() * 4))
                    cc = c if rng.random() < 0.9 else int(rng.choice(80, p=freq)) + 1
                    dets.append({"image_id": iid, "category_id": cc,
                                 "bbox": [x + j[0] * w, y + j[1] * h, w * np.exp(j[2]), h * np.exp(j[3])],
                                 "score": float(np.clip(0.3 + 0.7 * q * rng.uniform(0.6, 1.0), 0, 1))})
            while len(dets) < 100:
                w, h = np.exp(rng.uniform(np.log(8), np.log(300), 2))
                dets.append({"image_id": iid, "category_id": int(rng.choice(80, p=freq)) + 1,
                             "bbox": [rng.uniform(0, W - w), rng.uniform(0, H - h), w, h],
                             "score": float(rng.uniform(0.0, 0.35))})
            results[b] += sorted(dets, key=lambda d: -d["score"])[:100]
    return {"images": images, "annotations": anns, "categories": cats}, results


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the bootstrap's workers)."""
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@cli_entry
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bootstrap_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--resamples", type=int, default=10_000)
    p.add_argument("--chunk", type=int, default=250)
    p.add_argument("--workers", type=int, default=None, help="processes (default: bootstrap_values' choice)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON results path (default {DEFAULT_OUT})")
    a = p.parse_args(argv)
    check_writable(a.out, "--out", folder=False)  # before any work
    from pycocotools.coco import COCO

    from benchmarks.bootstrap import CocoScorer, bootstrap_values, percentile_interval
    t0 = time.perf_counter()
    ds, results = synthetic(a.images)
    t_gen = time.perf_counter() - t0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ds
        gt.createIndex()
    t0 = time.perf_counter()
    scorers = {f"backbone{b}": CocoScorer(gt, r, "bbox") for b, r in enumerate(results)}
    t_eval = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), _cpu()
    vals = bootstrap_values(scorers, a.resamples, seed=0, chunk=a.chunk, workers=a.workers)
    t_boot, c_boot = time.perf_counter() - t0, _cpu() - c0
    full = {k: float(s.score(np.ones((1, s.n_images), np.int64))["APbox"][0]) for k, s in scorers.items()}
    diff = vals["backbone0"]["APbox"] - vals["backbone1"]["APbox"]
    rec = {"images": a.images, "detections_per_backbone": [len(r) for r in results],
           "ground_truth_boxes": len(ds["annotations"]), "resamples": a.resamples, "chunk": a.chunk,
           "backbones": len(results), "APbox": full, "diff_ci95": percentile_interval(diff),
           "generate_s": round(t_gen, 2), "cocoeval_evaluate_s": round(t_eval, 2),
           "bootstrap_s": round(t_boot, 2), "bootstrap_cpu_s": round(c_boot, 2), "total_s": round(t_eval + t_boot, 2),
           "load_average_1min": round(os.getloadavg()[0], 2),
           "cpu": platform.processor() or platform.machine(), "cpus_visible": os.cpu_count(),
           "threads": os.environ.get("OMP_NUM_THREADS", "default")}
    print(f"{'images':>8} {'dets/backbone':>14} {'resamples':>10} {'evaluate s':>11} {'bootstrap s':>12} "
          f"{'bootstrap cpu s':>16} {'total s':>8}")
    print(f"{a.images:>8} {rec['detections_per_backbone'][0]:>14} {a.resamples:>10} {t_eval:>11.1f} "
          f"{t_boot:>12.1f} {c_boot:>16.1f} {t_eval + t_boot:>8.1f}")
    print(f"APbox {full}; paired diff 95% CI {rec['diff_ci95']}")
    atomic_write_json(rec, a.out)
    print(f"wrote {a.out}")
    return rec


if __name__ == "__main__":
    main()
