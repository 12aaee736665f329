"""The COCO evaluator: ground truth fed back as predictions scores AP 100 (bbox and segm), crowd
regions are ignore regions, results use the official non-contiguous category ids."""
from __future__ import annotations

import math

import pytest
import torch

from transfer.vitdet.data import CocoInstances
from transfer.vitdet.evaluate import METRIC_NAMES, coco_evaluate, instances_to_coco_json


def _gt_as_predictions(ds: CocoInstances) -> list[dict]:
    res = []
    for i, im in enumerate(ds.images):
        anns = [a for a in ds.anns[i] if not a.get("iscrowd", 0)]
        _, t = ds.load(i)
        keep = [k for k, a in enumerate(ds.anns[i]) if not a.get("iscrowd", 0)]
        if not keep:
            continue
        det = {"boxes": t["boxes"][keep], "scores": torch.ones(len(keep)), "labels": t["labels"][keep],
               "masks": t["masks"][keep].bool()}
        assert len(anns) == len(keep)
        res += instances_to_coco_json(det, im["id"], ds.label_to_cat_id)
    return res


@pytest.mark.parametrize("split", ["val", "train"])
def test_ground_truth_scores_ap_100(data_root, split):
    coco = data_root / "coco"
    ann = coco / f"annotations/instances_{split}2017.json"
    ds = CocoInstances(ann, coco / f"{split}2017", train=False)
    results = _gt_as_predictions(ds)
    assert {r["category_id"] for r in results} <= set(ds.cat_ids)
    metrics, per_cat, log = coco_evaluate(ann, results)
    for t in ("bbox", "segm"):
        assert metrics[f"{t}/AP"] == pytest.approx(100.0, abs=1e-6)
        assert metrics[f"{t}/AP50"] == pytest.approx(100.0, abs=1e-6)
        present = {ds.cat_names[ds.label_to_cat_id(lab)] for i in range(len(ds))
                   for lab in [ds.cat_to_label[a["category_id"]] for a in ds.anns[i] if not a.get("iscrowd", 0)]}
        assert {k for k, v in per_cat[t].items() if not math.isnan(v)} == present
        assert all(v == pytest.approx(100.0) for k, v in per_cat[t].items() if k in present)
    assert metrics["APbox"] == metrics["bbox/AP"] and metrics["APmask"] == metrics["segm/AP"]
    assert "Average Precision" in log


def test_degraded_predictions_score_lower(data_root):
    coco = data_root / "coco"
    ann = coco / "annotations/instances_val2017.json"
    ds = CocoInstances(ann, coco / "val2017", train=False)
    results = _gt_as_predictions(ds)
    for r in results[::2]:
        r["bbox"][0] += r["bbox"][2] * 0.6   # shifted: IoU < 0.5
    metrics, _, _ = coco_evaluate(ann, results, iou_types=("bbox",))
    assert 20 < metrics["bbox/AP"] < 80


def test_no_predictions_gives_nan(data_root):
    ann = data_root / "coco/annotations/instances_val2017.json"
    metrics, per_cat, _ = coco_evaluate(ann, [])
    assert all(math.isnan(metrics[f"{t}/{n}"]) for t in ("bbox", "segm") for n in METRIC_NAMES)
