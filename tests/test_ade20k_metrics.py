"""mIoU / mAcc / aAcc on hand-checkable predictions (mmseg IoUMetric definition)."""
from __future__ import annotations

import math

import pytest
import torch

from transfer.seg.metrics import ConfusionMatrix


def _metrics(pred, label, k, ignore=255):
    cm = ConfusionMatrix(k, ignore)
    cm.update(torch.tensor(pred), torch.tensor(label))
    return cm.compute()


def test_perfect_prediction_is_100():
    label = [[0, 0, 1, 1], [2, 2, 255, 255]]
    pred = [[0, 0, 1, 1], [2, 2, 0, 1]]  # ignored pixels do not count
    m = _metrics(pred, label, 4)
    assert m["mIoU"] == 100 and m["mAcc"] == 100 and m["aAcc"] == 100
    assert m["IoU"][3] is None and m["Acc"][3] is None  # class 3 absent from both: excluded


def test_one_class_swapped_exact_value():
    # 3 classes, 2 pixels each; the 2 pixels of class 1 predicted as class 2.
    label = [[0, 0, 1, 1, 2, 2]]
    pred = [[0, 0, 2, 2, 2, 2]]
    m = _metrics(pred, label, 3)
    # IoU: c0 2/2 = 1; c1 0/(0+2-0) = 0; c2 2/(4+2-2) = 0.5  -> mIoU = 1.5/3
    assert m["IoU"] == pytest.approx([100.0, 0.0, 50.0])
    assert m["mIoU"] == pytest.approx(50.0)
    # Acc: c0 1, c1 0, c2 1 -> 2/3; aAcc = 4/6
    assert m["mAcc"] == pytest.approx(200 / 3)
    assert m["aAcc"] == pytest.approx(400 / 6)


def test_predicted_but_absent_class_counts_in_iou_not_acc():
    label = [[0, 0, 0, 0]]
    pred = [[0, 0, 0, 1]]
    m = _metrics(pred, label, 3)
    # c0 IoU 3/4, c1 IoU 0/1 (predicted, not in GT: counted), c2 absent from both: excluded
    assert m["IoU"][:2] == pytest.approx([75.0, 0.0])
    assert m["IoU"][2] is None
    assert m["mIoU"] == pytest.approx(37.5)
    assert m["Acc"][1] is None and m["mAcc"] == pytest.approx(75.0)


def test_accumulates_over_images_not_per_image_mean():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[0, 0, 0, 1]]), torch.tensor([[0, 0, 0, 0]]))   # c0 3/4
    cm.update(torch.tensor([[1, 1]]), torch.tensor([[1, 1]]))               # c1 perfect
    m = cm.compute()
    # totals: c0 inter 3, union 4; c1 inter 2, union 3
    assert m["IoU"] == pytest.approx([75.0, 200 / 3])


def test_bad_shapes_and_values():
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="label value 5"):
        cm.update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 5]]))


def test_empty_is_nan():
    m = ConfusionMatrix(2).compute()
    assert math.isnan(m["mIoU"]) and math.isnan(m["aAcc"])
