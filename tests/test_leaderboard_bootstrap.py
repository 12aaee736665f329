"""The leaderboard's confidence intervals: the paired bootstrap over evaluation images and seeds,
checked against a direct computation (a naive loop over the same resamples) on hand-built
prediction files in the formats of docs/CONTRACTS.md."""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bootstrap
from benchmarks.leaderboard import build
from transfer.vitdet.evaluate import coco_evaluate

B = 40  # resamples: enough to compare whole distributions, cheap enough for a naive COCOeval loop


def _run(root: Path, name: str, sha: str, method: str, task: str, seed: int, metrics: dict, preds, extra=None,
         protocol="finetune", pred_rel="predictions.json") -> Path:
    d = root / name / f"{task}-smoke" / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "task.json").write_text(json.dumps({"spec": {"backbone_name": name, "task": task, "config": "smoke",
                                                      "seed": seed}}))
    (d / pred_rel).parent.mkdir(parents=True, exist_ok=True)
    (d / pred_rel).write_text(json.dumps(preds))
    m = {"task": task, "protocol": protocol, "metrics": metrics, "backbone": f"/ckpt/{name}.pth",
         "backbone_sha256": sha, "seed": seed, "predictions": pred_rel,
         "backbone_report": {"sha256": sha, "arch": "vit_tiny_patch16", "meta": {"method": method, "mask_ratio": 0.75,
                                                                                   "kept_mask_ratio": 0.25}}}
    m.update(extra or {})
    (d / "metrics.json").write_text(json.dumps(m))
    return d


def _rows(p):
    return list(csv.DictReader(Path(p).open()))


def _indices(w_row):
    return np.repeat(np.arange(len(w_row)), w_row)


def _all_weights(n, resamples, seed=bootstrap.SEED):
    return np.concatenate(list(bootstrap.resample_weights(n, resamples, seed)))


def _q(values):
    return tuple(np.quantile(np.asarray(values, float), [0.025, 0.975]))


# --------------------------------------------------------------------------------------------------
def test_classification_intervals_equal_a_naive_loop_over_images_and_seeds(tmp_path):
    rng = np.random.default_rng(1)
    n, seeds = 30, (0, 1, 2)
    labels = rng.integers(0, 5, n).tolist()
    images = [f"cls{i % 5}/img{i}.jpg" for i in range(n)]
    correct = {}  # (backbone, seed) -> per-image top-1 correctness
    root = tmp_path / "out"
    for name, sha, method, p_ok in (("mae", "a" * 64, "mae", 0.55), ("cmae", "c" * 64, "crossmae", 0.75)):
        for s in seeds:
            ok = rng.random(n) < p_ok
            first = [lab if ok[i] else (lab + 1) % 5 for i, lab in enumerate(labels)]
            top5 = [[f] + [c for c in range(5) if c != f] for f in first]  # the label is always in the top 5
            correct[name, s] = ok
            preds = {"format": "classification/v1", "images": images, "labels": labels, "top5": top5,
                     "scores": [[0.5, 0.2, 0.1, 0.1, 0.1]] * n}
            _run(root, name, sha, method, "finetune", s, {"top1": 100.0 * ok.mean(), "top5": 100.0}, preds)
    paths = build(root, resamples=B)
    rows = {(r["backbone"], r["metric"]): r for r in _rows(paths["csv"])}
    pair = [p for p in _rows(paths["paired"]) if p["metric"] == "top1"][0]

    # naive: the same resamples (images, then seeds), each scored by a plain loop
    W = _all_weights(n, B)
    draws = bootstrap.seed_draws(len(seeds), B, bootstrap.SEED)
    naive = {"mae": [], "cmae": []}
    for b in range(B):
        idx = _indices(W[b])
        for name in naive:
            per_seed = [sum(bool(correct[name, seeds[j]][i]) for i in idx) / len(idx) * 100 for j in draws[b]]
            naive[name].append(sum(per_seed) / len(per_seed))
    for name in naive:
        lo, hi = _q(naive[name])
        assert float(rows[name, "top1"]["ci_low"]) == pytest.approx(lo, rel=1e-5)
        assert float(rows[name, "top1"]["ci_high"]) == pytest.approx(hi, rel=1e-5)
    lo, hi = _q(np.subtract(naive["mae"], naive["cmae"]))
    assert (float(pair["ci_low"]), float(pair["ci_high"])) == pytest.approx((lo, hi), rel=1e-5)
    assert pair["excludes_zero"] == ("yes" if lo > 0 or hi < 0 else "no")
    # every top-5 is correct: a degenerate interval
    assert (rows["mae", "top5"]["ci_low"], rows["mae", "top5"]["ci_high"]) == ("100", "100")


def test_degenerate_pairs_have_known_intervals_and_markdown_marks_them(tmp_path):
    n = 25
    labels = [i % 3 for i in range(n)]
    right = [[l, 0, 0, 0, 0] for l in labels]
    wrong = [[(l + 1) % 3, 0, 0, 0, 0] for l in labels]
    root = tmp_path / "out"
    for task in ("inat", "places"):
        mine = wrong if task == "inat" else right
        _run(root, "mae", "a" * 64, "mae", task, 0, {"top1": 100.0 if task == "places" else 0.0},
             {"format": "classification/v1", "images": list(map(str, range(n))), "labels": labels,
              "top5": mine, "scores": [[1, 0, 0, 0, 0]] * n})
        _run(root, "cmae", "c" * 64, "crossmae", task, 0, {"top1": 100.0},
             {"format": "classification/v1", "images": list(map(str, range(n))), "labels": labels,
              "top5": right, "scores": [[1, 0, 0, 0, 0]] * n})
    paths = build(root, resamples=200)
    pairs = {p["task"]: p for p in _rows(paths["paired"]) if p["metric"] == "top1"}
    # all wrong vs all right: every resample differs by exactly -100; identical predictions: 0
    assert (pairs["inat"]["ci_low"], pairs["inat"]["ci_high"], pairs["inat"]["excludes_zero"]) == ("-100", "-100", "yes")
    assert (pairs["places"]["ci_low"], pairs["places"]["ci_high"], pairs["places"]["excludes_zero"]) == ("0", "0", "no")
    md = paths["md"].read_text()
    inat = [l for l in md.splitlines() if l.startswith("| inat |") and "| mae | cmae |" in l]
    assert inat and "✱" in inat[-1] and "[-100.00, -100.00]" in inat[-1]
    places = [l for l in md.splitlines() if l.startswith("| places |") and "| mae | cmae |" in l]
    assert places and "✱" not in places[-1]


def _seg_miou(I, U):
    iou = [i / u for i, u in zip(I, U) if u > 0]
    return 100.0 * sum(iou) / len(iou)


def test_segmentation_intervals_equal_a_naive_loop_and_a_wrong_file_gets_none(tmp_path, capsys):
    rng = np.random.default_rng(2)
    n, C = 20, 6
    root = tmp_path / "out"
    counts = {}
    for name, sha, method in (("mae", "a" * 64, "mae"), ("cmae", "c" * 64, "crossmae")):
        lab = rng.integers(0, 200, (n, C))
        lab[:, 5] = 0  # class 5 is absent from every image: no IoU unless predicted
        pred = rng.integers(0, 200, (n, C))
        pred[:, 5] = np.where(np.arange(n) < 2, 7, 0)  # predicted in two images only
        inter = np.minimum(lab, pred) * rng.uniform(0.3, 1.0, (n, C))
        inter = inter.astype(int)
        union = lab + pred - inter
        counts[name] = (inter, union)
        miou = _seg_miou(inter.sum(0), union.sum(0))
        _run(root, name, sha, method, "ade20k", 0, {"mIoU": miou}, {
            "format": "segmentation/v1", "num_classes": C, "images": [f"{i}.png" for i in range(n)],
            "intersect": inter.tolist(), "union": union.tolist(), "label": lab.tolist()}, protocol="upernet")
    # a third backbone whose prediction file does not reproduce its metrics.json
    _run(root, "other", "e" * 64, "mae", "ade20k", 0, {"mIoU": 1.0}, {
        "format": "segmentation/v1", "num_classes": C, "images": [f"{i}.png" for i in range(n)],
        "intersect": counts["mae"][0].tolist(), "union": counts["mae"][1].tolist(), "label": counts["mae"][1].tolist()},
        protocol="upernet")
    paths = build(root, resamples=B)
    err = capsys.readouterr().err
    rows = {r["backbone"]: r for r in _rows(paths["csv"]) if r["metric"] == "mIoU"}
    W = _all_weights(n, B)
    naive = {k: [] for k in counts}
    for b in range(B):
        idx = _indices(W[b])
        for k, (inter, union) in counts.items():
            I = [sum(int(inter[i, c]) for i in idx) for c in range(C)]
            U = [sum(int(union[i, c]) for i in idx) for c in range(C)]
            naive[k].append(_seg_miou(I, U))
    for k in counts:
        assert (float(rows[k]["ci_low"]), float(rows[k]["ci_high"])) == pytest.approx(_q(naive[k]), rel=1e-5)
    pair = [p for p in _rows(paths["paired"]) if p["mae_backbone"] == "mae"][0]
    assert (float(pair["ci_low"]), float(pair["ci_high"])) == pytest.approx(
        _q(np.subtract(naive["mae"], naive["cmae"])), rel=1e-5)
    assert rows["other"]["ci_low"] == "" and rows["other"]["mean"] == "1"
    line = [l for l in err.splitlines() if "other" in l]
    assert len(line) == 1 and line[0].startswith("warning: ") and "metrics.json says 1" in line[0]


# --------------------------------------------------------------------------------------------------
# COCO: the weighted accumulation against COCOeval on physically duplicated images
# --------------------------------------------------------------------------------------------------
def _coco_case(seed, n_img=14, n_cat=3, jitter=6.0):
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], [[], []]
    aid = 1
    for i in range(n_img):
        iid = 100 + i
        images.append({"id": iid, "width": 200, "height": 200, "file_name": f"{iid}.jpg"})
        for _ in range(rng.integers(0, 5)):
            x, y = rng.uniform(0, 150, 2)
            w, h = rng.uniform(10, 50, 2)
            c = int(rng.integers(1, n_cat + 1)) if i else n_cat + 1  # category 4 only in the first image
            anns.append({"id": aid, "image_id": iid, "category_id": c, "bbox": [x, y, w, h], "area": w * h,
                         "iscrowd": int(rng.random() < 0.1)})
            aid += 1
            for b, jit in enumerate((jitter, 2 * jitter)):
                for _ in range(rng.integers(0, 3)):
                    j = rng.normal(0, jit, 4)
                    dets[b].append({"image_id": iid, "category_id": c, "score": float(rng.random()),
                                    "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])]})
        for b in range(2):
            for _ in range(rng.integers(0, 4)):
                dets[b].append({"image_id": iid, "category_id": int(rng.integers(1, n_cat + 2)),
                                "score": float(rng.random()),
                                "bbox": [*rng.uniform(0, 150, 2).tolist(), *rng.uniform(5, 40, 2).tolist()]})
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, n_cat + 2)]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def _ap_of_multiset(ds, dets, idx):
    """COCOeval on a dataset in which image idx[k] appears once per draw (fresh ids)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    by_img, d_by = {}, {}
    for a in ds["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    for d in dets:
        d_by.setdefault(d["image_id"], []).append(d)
    images, anns, res, aid = [], [], [], 1
    for k, i in enumerate(idx):
        im = ds["images"][i]
        images.append(dict(im, id=10_000 + k))
        for a in by_img.get(im["id"], []):
            anns.append(dict(a, id=aid, image_id=10_000 + k))
            aid += 1
        res += [dict(d, image_id=10_000 + k) for d in d_by.get(im["id"], [])]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy({"images": images, "annotations": anns, "categories": ds["categories"]})
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(res)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [100 * s if s >= 0 else float("nan") for s in ev.stats[:3]]


def test_coco_weighted_accumulation_equals_cocoeval_on_duplicated_images():
    from pycocotools.coco import COCO
    ds, dets = _coco_case(3)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(ds)
        gt.createIndex()
    sc = bootstrap.CocoScorer(gt, dets[0], "bbox")
    W = _all_weights(sc.n_images, 25, seed=7)
    assert (W > 1).any() and (W == 0).any()  # duplicates and dropped images both occur
    got = sc.score(np.vstack([np.ones(sc.n_images, np.int64), W]))
    ref = [_ap_of_multiset(ds, dets[0], list(range(sc.n_images)))] + [_ap_of_multiset(ds, dets[0], _indices(w)) for w in W]
    for name, col in (("bbox/AP", 0), ("bbox/AP50", 1), ("bbox/AP75", 2)):
        np.testing.assert_allclose(got[name], [r[col] for r in ref], rtol=0, atol=1e-9)


def test_coco_leaderboard_paired_interval_equals_the_naive_cocoeval_loop(tmp_path):
    ds, dets = _coco_case(4)
    ann = tmp_path / "instances_val2017.json"
    ann.write_text(json.dumps(ds))
    root = tmp_path / "out"
    ids = [im["id"] for im in ds["images"]]
    for b, (name, sha, method) in enumerate((("mae", "a" * 64, "mae"), ("cmae", "c" * 64, "crossmae"))):
        metrics, _, _ = coco_evaluate(ann, dets[b], iou_types=("bbox",), img_ids=ids)
        _run(root, name, sha, method, "coco", 0, {"APbox": metrics["APbox"], "bbox/AP50": metrics["bbox/AP50"]},
             dets[b], extra={"data_files": {str(ann): "0" * 64, str(tmp_path / "instances_train2017.json"): "1" * 64},
                             "eval_image_ids": ids}, protocol="vitdet", pred_rel="inference/coco_instances_results.json")
    n_res = 20
    paths = build(root, resamples=n_res)
    rows = {(r["backbone"], r["metric"]): r for r in _rows(paths["csv"])}
    W = _all_weights(len(ids), n_res)
    naive = {k: [_ap_of_multiset(ds, dets[b], _indices(w))[0] for w in W] for b, k in enumerate(("mae", "cmae"))}
    for k in naive:
        assert (float(rows[k, "APbox"]["ci_low"]), float(rows[k, "APbox"]["ci_high"])) == pytest.approx(
            _q(naive[k]), rel=1e-5)
        assert rows[k, "bbox/AP50"]["ci_low"] != ""
    pair = [p for p in _rows(paths["paired"]) if p["metric"] == "APbox"][0]
    assert (float(pair["ci_low"]), float(pair["ci_high"])) == pytest.approx(
        _q(np.subtract(naive["mae"], naive["cmae"])), rel=1e-5)


def test_cocoeval_on_resampled_ids_would_drop_duplicates():
    """Why the bootstrap re-accumulates with weights instead of passing resampled ids to COCOeval."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    ds, dets = _coco_case(5)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(ds)
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(dets[0])), "bbox")
        ev.params.imgIds = [100, 100, 100, 101]
        ev.evaluate()
    assert len(ev.params.imgIds) == 2


def test_bootstrap_speed_writes_its_json_under_output_benchmarks(tmp_path, monkeypatch, capsys):
    """``python -m benchmarks.bootstrap_speed`` without ``--out`` writes where the other benchmarks
    do (``output/benchmarks/``, git-ignored), never a stray file in the working directory."""
    from benchmarks.bootstrap_speed import main
    monkeypatch.chdir(tmp_path)
    rec = main(["--images", "12", "--resamples", "8", "--workers", "1"])
    out = tmp_path / "output" / "benchmarks" / "bootstrap_speed.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output"]
    assert json.loads(out.read_text())["resamples"] == rec["resamples"] == 8
    assert "wrote output/benchmarks/bootstrap_speed.json" in capsys.readouterr().out
