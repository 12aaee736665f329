"""COCO bbox / segm evaluation with the official evaluator (pycocotools ``COCOeval``).

Protocol source: detectron2 ``evaluation/coco_evaluation.py`` (``instances_to_coco_json``: boxes as
XYWH in original-image pixels, masks as compressed RLE of the thresholded pasted masks, category ids
mapped back to COCO's non-contiguous ids; ``_derive_coco_results``: AP, AP50, AP75, APs, APm, APl ×100
and the per-category AP at IoU .50:.95, area all, maxDets 100; "no predictions" gives NaN metrics).
Crowd ground truth is handled by COCOeval itself (crowd regions are "ignore" regions: detections
matched to them are neither TP nor FP); predictions are never crowd.
"""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import torch

METRIC_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def instances_to_coco_json(det: dict, image_id: int, label_to_cat_id) -> list[dict]:
    """One image's detections -> COCO results entries.

    Args:
        det: ``{"boxes": (n, 4) XYXY original pixels, "scores": (n,), "labels": (n,) 1..K,
            "masks": (n, H0, W0) bool}`` (masks optional).
        label_to_cat_id: callable contiguous label -> COCO category id.
    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score", "segmentation": RLE}]``.
    """
    from pycocotools import mask as mask_util

    boxes = det["boxes"].detach().cpu().double()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    scores = det["scores"].detach().cpu().tolist()
    labels = det["labels"].detach().cpu().tolist()
    rles = None
    if "masks" in det:
        masks = det["masks"].detach().cpu().numpy().astype(np.uint8)
        rles = [mask_util.encode(np.asfortranarray(m[:, :, None]))[0] for m in masks]
        for r in rles:
            r["counts"] = r["counts"].decode("utf-8")
    out = []
    for i in range(len(scores)):
        d = {"image_id": int(image_id), "category_id": int(label_to_cat_id(labels[i])),
             "bbox": [float(v) for v in xywh[i]], "score": float(scores[i])}
        if rles is not None:
            d["segmentation"] = rles[i]
        out.append(d)
    return out


def cocoeval_matched(gt, results: list[dict], iou_type: str, img_ids=None, log: io.StringIO | None = None):
    """A ``pycocotools`` ``COCOeval`` of ``results`` against ``gt`` after ``evaluate()`` (the per-image,
    per-category matching; ``accumulate()`` not yet run), with COCOeval's prints sent to ``log``.

    The one place a COCO evaluation is set up: the task's metrics (:func:`coco_evaluate`) and the
    leaderboard's bootstrap (``benchmarks.bootstrap.CocoScorer``) both start from it.

    Args:
        gt: a ``pycocotools.coco.COCO``. results: COCO results entries (:func:`instances_to_coco_json`);
            for ``bbox`` their segmentations are dropped first (``loadRes`` would derive the boxes from
            the masks otherwise, as detectron2 drops them). iou_type: ``"bbox"`` / ``"segm"``.
        img_ids: the images to evaluate (COCOeval sorts and de-duplicates them); default all of ``gt``.
    Returns:
        the ``COCOeval`` object (``evalImgs``, ``params`` filled).
    """
    from pycocotools.cocoeval import COCOeval

    res = [dict(r) for r in results]
    if iou_type == "bbox":
        for r in res:
            r.pop("segmentation", None)
    with contextlib.redirect_stdout(log if log is not None else io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(res), iou_type)
        if img_ids is not None:
            ev.params.imgIds = list(img_ids)
        ev.evaluate()
    return ev


def coco_evaluate(ann_file: str | Path, results: list[dict], iou_types=("bbox", "segm"),
                  img_ids: list[int] | None = None) -> tuple[dict, dict, str]:
    """Run COCOeval for each IoU type.

    Args:
        ann_file: the ground-truth json. results: COCO results entries (see
            :func:`instances_to_coco_json`). img_ids: restrict to these images (default: all in the json).
    Returns:
        ``(metrics, per_category, log)``: ``metrics`` maps ``"bbox/AP"`` … ``"segm/APl"`` (×100) plus
        the aliases ``APbox`` and ``APmask``; ``per_category[iou_type][category name]`` = AP ×100;
        ``log`` is COCOeval's printed summary. Without any result every metric is NaN (detectron2).
    """
    from pycocotools.coco import COCO

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        gt = COCO(str(ann_file))
    metrics: dict[str, float] = {}
    per_cat: dict[str, dict[str, float]] = {}
    for t in iou_types:
        if not results:
            metrics.update({f"{t}/{n}": float("nan") for n in METRIC_NAMES})
            per_cat[t] = {}
            continue
        ev = cocoeval_matched(gt, results, t, img_ids, log=buf)
        with contextlib.redirect_stdout(buf):
            ev.accumulate()
            ev.summarize()
        for i, n in enumerate(METRIC_NAMES):
            v = float(ev.stats[i])
            metrics[f"{t}/{n}"] = v * 100 if v >= 0 else float("nan")
        prec = ev.eval["precision"]  # (T, R, K, A, M)
        table = {}
        for k, cid in enumerate(ev.params.catIds):
            p = prec[:, :, k, 0, -1]
            p = p[p > -1]
            table[gt.cats[cid]["name"]] = float(np.mean(p) * 100) if p.size else float("nan")
        per_cat[t] = table
    if "bbox" in iou_types:
        metrics["APbox"] = metrics["bbox/AP"]
    if "segm" in iou_types:
        metrics["APmask"] = metrics["segm/AP"]
    return metrics, per_cat, buf.getvalue()


def is_nan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)
