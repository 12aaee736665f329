"""The CrossMAE paper's downstream numbers as data (REFERENCE.md §4-6), for the leaderboard's
reference column.

Each entry: ``task`` (the modules' ``metrics.json`` task), ``protocol`` (family: finetune / linprobe /
vitdet / upernet), ``metric``, ``arch`` (timm name), ``method`` (``mae`` / ``crossmae``),
``prediction_ratio`` (CrossMAE's γ; None = the paper does not say / any), ``value``, ``source``,
``statistic``: which evaluation of the run the number is, ``best`` (the maximum over the evaluated
epochs: the classification numbers come from MAE's ``main_finetune.py`` / ``main_linprobe.py``,
which print and report "Max accuracy") or ``final`` (the model at the end of the schedule: the
ViTDet detectron2 and UperNet mmsegmentation evaluations). ImageNet numbers are for 800-epoch
pretraining. Only paper-protocol runs (config preset starting with ``paper``) are compared to these;
the smoke suite's numbers are not comparable.

Like with like (:func:`statistic_of`): a run's ``top1`` is its final epoch and ``top1_best`` its
best epoch (``transfer.classification.common.final_metrics``), so a paper ``best`` number is the
reference of the run's ``top1_best`` row only, never of its ``top1`` row.
"""
from __future__ import annotations

S, B, L, H = "vit_small_patch16", "vit_base_patch16", "vit_large_patch16", "vit_huge_patch14"


#: how each statistic is named in the leaderboard's outputs.
STATISTIC_LABEL = {"final": "final epoch", "best": "best epoch"}
#: the paper's statistic per protocol family (see the module doc).
PAPER_STATISTIC = {"finetune": "best", "linprobe": "best", "vitdet": "final", "upernet": "final"}

FAMILY = {"finetune": "finetune", "linprobe": "linprobe", "inat": "finetune", "places": "finetune",
          "coco": "vitdet", "ade20k": "upernet"}


def protocol_family(task: str, protocol: str | None) -> str:
    """The reference protocol a run belongs to: ``linprobe`` when its protocol says so (e.g. the
    modules' ``linprobe_mae``), else the task's paper protocol (finetune / vitdet / upernet)."""
    if protocol and ("linprobe" in protocol or protocol in ("knn", "fast", "blocks")):
        return "linprobe"
    return FAMILY.get(task, protocol or "")


def statistic_of(metric: str) -> tuple[str, str]:
    """``(paper metric, statistic)`` a run's metric is comparable with: ``top1_best`` ->
    ``("top1", "best")``, any other ``m_best`` -> ``(m, "best")``, every other metric -> ``(metric,
    "final")`` (the task modules write the final evaluation under the plain name)."""
    m = str(metric)
    return (m[:-5], "best") if m.endswith("_best") and len(m) > 5 else (m, "final")


def _e(task, metric, arch, method, gamma, value, source):
    protocol = "linprobe" if task == "linprobe" else FAMILY[task]
    return {"task": task, "protocol": protocol, "metric": metric, "arch": arch, "method": method,
            "prediction_ratio": gamma, "value": value, "source": source, "statistic": PAPER_STATISTIC[protocol]}


REFERENCE: list[dict] = []
# ImageNet-1k fine-tune top-1 (paper Table 1): MAE, CrossMAE(0.25), CrossMAE(0.75).
for arch, (mae, c25, c75) in {S: (78.9, 79.2, 79.3), B: (83.3, 83.5, 83.7), L: (85.4, 85.4, 85.4),
                              H: (85.8, 86.3, 86.4)}.items():
    REFERENCE += [_e("finetune", "top1", arch, "mae", None, mae, "CrossMAE Table 1"),
                  _e("finetune", "top1", arch, "crossmae", 0.25, c25, "CrossMAE Table 1"),
                  _e("finetune", "top1", arch, "crossmae", 0.75, c75, "CrossMAE Table 1")]
# Linear probe top-1.
REFERENCE += [_e("linprobe", "top1", S, "mae", None, 49.7, "CrossMAE linear probing"),
              _e("linprobe", "top1", S, "crossmae", None, 51.5, "CrossMAE linear probing"),
              _e("linprobe", "top1", B, "mae", None, 65.1, "CrossMAE linear probing"),
              _e("linprobe", "top1", B, "crossmae", None, 65.4, "CrossMAE linear probing")]
# iNaturalist 2019 and Places365 top-1 (ViT-B).
for task, (mae, c25, c75) in {"inat": (79.8, 79.4, 80.1), "places": (57.9, 57.9, 57.8)}.items():
    REFERENCE += [_e(task, "top1", B, "mae", None, mae, "CrossMAE transfer table"),
                  _e(task, "top1", B, "crossmae", 0.25, c25, "CrossMAE transfer table"),
                  _e(task, "top1", B, "crossmae", 0.75, c75, "CrossMAE transfer table")]
# COCO ViTDet Mask R-CNN (the CrossMAE paper's table; its MAE row, not ViTDet's 51.6 / 45.9).
for arch, (mb, mm, cb, cm) in {B: (51.2, 45.5, 52.1, 46.3), L: (54.6, 48.6, 54.9, 48.8)}.items():
    REFERENCE += [_e("coco", "APbox", arch, "mae", None, mb, "CrossMAE COCO table"),
                  _e("coco", "APmask", arch, "mae", None, mm, "CrossMAE COCO table"),
                  _e("coco", "APbox", arch, "crossmae", None, cb, "CrossMAE COCO table"),
                  _e("coco", "APmask", arch, "crossmae", None, cm, "CrossMAE COCO table")]
# ADE20K UperNet mIoU (paper Table 17).
REFERENCE += [_e("ade20k", "mIoU", B, "mae", None, 47.7, "CrossMAE Table 17"),
              _e("ade20k", "mIoU", B, "crossmae", 0.25, 47.7, "CrossMAE Table 17"),
              _e("ade20k", "mIoU", B, "crossmae", 0.75, 48.1, "CrossMAE Table 17")]


def lookup(task: str, protocol: str | None, metric: str, arch: str | None, method: str | None,
           prediction_ratio: float | None = None) -> dict | None:
    """The paper entry for a cell, or None. ``protocol`` is the run's protocol (mapped through
    :func:`protocol_family`, so an iNat linear probe never gets the iNat fine-tune number);
    ``metric`` the run's metric name, matched with the entry's metric and statistic through
    :func:`statistic_of` (a run's final-epoch ``top1`` never gets a best-epoch paper number). An
    entry with a γ matches only that γ (±1e-6); one without matches any γ, but a γ-specific entry
    wins."""
    best = None
    fam = protocol_family(task, protocol)
    base, stat = statistic_of(metric)
    for e in REFERENCE:
        if (e["task"], e["protocol"], e["metric"], e["statistic"], e["arch"], e["method"]) \
                != (task, fam, base, stat, arch, method):
            continue
        if e["prediction_ratio"] is None:
            best = best or e
        elif prediction_ratio is not None and abs(e["prediction_ratio"] - prediction_ratio) < 1e-6:
            return e
    return best
