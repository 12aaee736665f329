"""Paired bootstrap over evaluation images (and seeds) from the saved per-sample predictions.

The leaderboard asks of every number "how sure is it?" and of every MAE − CrossMAE difference "is it
real?". Both are answered by resampling the evaluation images with replacement (Efron's
nonparametric bootstrap; percentile interval): one resample is a vector of per-image multiplicities
``w`` (``w_i`` = how often image ``i`` was drawn, Σ w = n), and every backbone evaluated on the same
images is scored on the SAME ``w`` (the paired bootstrap: image difficulty cancels in the
difference). With several seeds the seeds are resampled too (with replacement, the same seed draw
for both backbones of a pair) and a resample's value is the mean over its drawn seeds.

Per-task scorers read the prediction files of ``docs/CONTRACTS.md`` ("Provenance and per-sample
predictions") and compute the task's metric under a batch of multiplicity vectors ``W`` (b, n):

- :class:`ClassificationScorer`: ``top1`` / ``top5`` = 100 · Σ w_i c_i / Σ w_i from per-image
  correctness ``c_i``.
- :class:`SegmentationScorer`: ``mIoU`` / ``mAcc`` = 100 · NaN-mean over classes of
  ``(W @ intersect) / (W @ union)`` (resp. ``/ (W @ label)``), ``aAcc`` = 100 · Σ intersect / Σ label
  (the mmseg definitions, as :mod:`transfer.seg.metrics`).
- :class:`CocoScorer`: COCO AP (IoU .50:.95), AP50, AP75 at area "all", 100 detections, exactly as
  pycocotools' ``COCOeval.accumulate`` computes them, but for a multiset of images: pycocotools'
  ``evaluate`` matches detections to ground truth per image and category ONCE; each resample then
  re-accumulates with per-image weights (a detection of an image drawn k times counts k times, as do
  that image's ground-truth boxes). Running COCOeval on resampled image ids directly would be wrong
  as well as slow: ``COCOeval.evaluate`` de-duplicates ``params.imgIds``.

The weighted accumulation (source of the definition: pycocotools ``cocoeval.py``, ``accumulate``):
per category, detections of all images are sorted by score (stable, images in id order); for IoU
threshold t, ``tp``/``fp`` are the running weighted counts of matched / unmatched non-ignored
detections, precision ``tp / (tp + fp + eps)`` is made monotone from the right and read at the 101
recall thresholds (first position where ``tp / npig ≥ r``, 0 beyond the last), ``npig`` = weighted
count of non-ignored ground truth; categories without ground truth in the resample are left out.
Only positions right after a true positive can be read (precision only rises at a TP), and along a
run of TPs with no false positive between them (for any weights) the monotone envelope is the same,
so each resample evaluates one point per such run and threshold. Detections that are false
positives at every threshold enter only through their weighted count before each matched
detection: one sparse (matched × images) product per chunk of resamples. Cost per resample ~
(matched detections × thresholds + sparse non-zeros), independent of pycocotools' own cost, which
is paid once per run.

Speed on COCO val2017 size: ``python -m benchmarks.bootstrap_speed`` (figures in docs/benchmarks.md).
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from crossmae.utils import UserError

#: number of bootstrap resamples, confidence level and the default seed of the leaderboard.
RESAMPLES = 10_000
CONFIDENCE = 0.95
SEED = 0


# --------------------------------------------------------------------------------------------------
# resampling
# --------------------------------------------------------------------------------------------------
def resample_weights(n: int, resamples: int, seed: int, chunk: int = 250) -> Iterator[np.ndarray]:
    """Per-image multiplicities of ``resamples`` bootstrap resamples of ``n`` images, in chunks.

    Resample ``b`` draws ``n`` indices uniformly with replacement (``numpy.random.default_rng(seed)``,
    ``integers(0, n, size=(chunk, n))`` per chunk, rows in order); its multiplicity vector counts them.

    Yields:
        int64 arrays of shape ``(b, n)`` with ``b ≤ chunk`` and every row summing to ``n``.
    """
    if n <= 0:
        raise UserError("bootstrap: no evaluation images")
    rng = np.random.default_rng(seed)
    done = 0
    while done < resamples:
        b = min(chunk, resamples - done)
        idx = rng.integers(0, n, size=(b, n))
        flat = (idx + np.arange(b)[:, None] * n).ravel()
        yield np.bincount(flat, minlength=b * n).reshape(b, n)
        done += b


def seed_draws(n_seeds: int, resamples: int, seed: int) -> np.ndarray:
    """Seed indices drawn with replacement per resample: int array ``(resamples, n_seeds)``
    (``default_rng(seed + 1)``; all zeros for one seed)."""
    if n_seeds == 1:
        return np.zeros((resamples, 1), dtype=np.int64)
    return np.random.default_rng(seed + 1).integers(0, n_seeds, size=(resamples, n_seeds))


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """``(low, high)``: the (1 − c)/2 and (1 + c)/2 quantiles (numpy's linear interpolation) of the
    finite bootstrap values; NaNs when fewer than half are finite."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0 or v.size < 0.5 * np.asarray(values).size:
        return float("nan"), float("nan")
    a = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(v, [a, 1.0 - a])
    return float(lo), float(hi)


# --------------------------------------------------------------------------------------------------
# scorers
# --------------------------------------------------------------------------------------------------
class ClassificationScorer:
    """top-1 / top-5 under image multiplicities, from a ``classification/v1`` prediction file.

    Args:
        labels: (n,) int ground-truth classes. top5: (n, k≥1) int predicted classes, best first.
        images: (n,) image names (the pairing key).
    """

    def __init__(self, labels, top5, images):
        labels = np.asarray(labels, dtype=np.int64)
        top5 = np.asarray(top5, dtype=np.int64).reshape(len(labels), -1)
        self.images = list(images)
        self.correct = {"top1": (top5[:, 0] == labels).astype(np.float64),
                        "top5": (top5 == labels[:, None]).any(1).astype(np.float64)}

    @property
    def n_images(self) -> int:
        return len(self.images)

    def score(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """``w`` (b, n) multiplicities -> ``{"top1": (b,), "top5": (b,)}`` in percent."""
        w = np.asarray(w, dtype=np.float64)
        tot = w.sum(1)
        return {k: 100.0 * (w @ c) / tot for k, c in self.correct.items()}


class SegmentationScorer:
    """mIoU / mAcc / aAcc under image multiplicities from ``segmentation/v1`` per-image pixel counts.

    Args:
        intersect, union, label: (n, C) int pixel counts per image and class. images: (n,) names.
    """

    def __init__(self, intersect, union, label, images):
        self.i = np.asarray(intersect, dtype=np.float64)
        self.u = np.asarray(union, dtype=np.float64)
        self.l = np.asarray(label, dtype=np.float64)
        self.images = list(images)
        if not (self.i.shape == self.u.shape == self.l.shape and self.i.shape[0] == len(self.images)):
            raise UserError("segmentation predictions: intersect/union/label/images shapes differ")

    @property
    def n_images(self) -> int:
        return len(self.images)

    def score(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """``w`` (b, n) multiplicities -> ``{"mIoU", "mAcc", "aAcc"}`` each (b,) in percent."""
        w = np.asarray(w, dtype=np.float64)
        i, u, l = w @ self.i, w @ self.u, w @ self.l
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(u > 0, i / np.where(u > 0, u, 1), np.nan)
            acc = np.where(l > 0, i / np.where(l > 0, l, 1), np.nan)
            ltot = l.sum(1)
            aacc = np.where(ltot > 0, i.sum(1) / np.where(ltot > 0, ltot, 1), np.nan)
        return {"mIoU": 100.0 * _nanmean_rows(iou), "mAcc": 100.0 * _nanmean_rows(acc), "aAcc": 100.0 * aacc}


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x)
    cnt = ok.sum(1)
    s = np.where(ok, x, 0.0).sum(1)
    return np.where(cnt > 0, s / np.maximum(cnt, 1), np.nan)


class _CocoCategory:
    """One category's detections (sorted as COCOeval sorts them) reduced to what a resample needs."""

    def __init__(self, img, scores, tp, fp, npig_img, n_img):
        # img: (D,) image index; tp/fp: (T, D) bool; npig_img: (n_img,) non-ignored gt per image
        order = np.argsort(-scores, kind="mergesort")
        img, tp, fp = img[order], tp[:, order], fp[:, order]
        always_fp = fp.all(0)
        never = ~(tp | fp).any(0)  # ignored at every threshold: never counted
        special = ~always_fp & ~never
        pos_s = np.flatnonzero(special)
        if pos_s.size:  # A detections after the last special one can never be read
            keep_a = always_fp & (np.arange(len(img)) < pos_s[-1])
        else:
            keep_a = np.zeros(len(img), bool)
        self.img_a = img[keep_a]
        # number of always-FP detections ranked before each special one
        self.a_before = np.cumsum(keep_a)[pos_s] if pos_s.size else np.zeros(0, np.int64)
        self.img_s = img[pos_s]
        self.tp_s = tp[:, pos_s]
        self.ig_s = ~(tp | fp)[:, pos_s]
        self.has_ig = bool(self.ig_s.any())
        self.tp_pos = [np.flatnonzero(self.tp_s[t]) for t in range(tp.shape[0])]
        self.npig_img = np.asarray(npig_img, dtype=np.float64)

    def a_matrix(self):
        """Sparse ``(S, n_img)`` counts: entry (s, i) = always-false-positive detections of image i
        ranked between special detection s − 1 and s, so ``cumsum(A @ w)`` over s is the weighted
        number of them ranked before each special detection (one sparse product per chunk instead
        of gathering every detection's weight)."""
        m = self.__dict__.get("_a_matrix")
        if m is None:
            from scipy.sparse import csr_matrix
            seg = np.searchsorted(self.a_before, np.arange(self.img_a.size), side="right")
            m = csr_matrix((np.ones(self.img_a.size, np.int32), (seg, self.img_a)),
                           shape=(self.img_s.size, self.npig_img.size), dtype=np.int32)
            m.sum_duplicates()
            self.__dict__["_a_matrix"] = m
        return m

    def runs(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """TP positions at threshold ``t`` grouped into runs with no false positive between them
        (in the full ranking, for any weights): ``(starts into tp_pos[t], S index of each run's
        last TP)``. Precision only rises along a run, so its monotone envelope is the same at
        every member and only the run's end needs evaluating."""
        cache = self.__dict__.setdefault("_runs", {})
        if t not in cache:
            pos = self.tp_pos[t]
            fp_t = ~self.tp_s[t] & ~self.ig_s[t]
            cfp = np.cumsum(fp_t) + self.a_before  # false positives ranked up to each S detection
            brk = np.flatnonzero(np.diff(cfp[pos]) > 0)  # a false positive between two TPs ends a run
            starts = np.concatenate([[0], brk + 1]).astype(np.int64)
            ends = np.concatenate([brk, [pos.size - 1]]).astype(np.int64)
            cache[t] = (starts, pos[ends])
        return cache[t]


class CocoScorer:
    """COCO AP / AP50 / AP75 (×100, area all, maxDets 100) under image multiplicities.

    Args:
        gt: a ``pycocotools.coco.COCO`` ground truth. results: COCO results entries (the
            ``coco_instances_results.json`` list; for ``bbox`` the segmentations are dropped first,
            as :func:`transfer.vitdet.evaluate.coco_evaluate` does). iou_type: ``"bbox"`` / ``"segm"``.
        img_ids: the evaluated image ids (default: every image of ``gt``).
    Raises:
        UserError: no results, or results without the fields the IoU type needs.
    """

    REC_THRS = np.linspace(0.0, 1.0, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)  # as COCOeval

    def __init__(self, gt, results: list[dict], iou_type: str, img_ids=None):
        from transfer.vitdet.evaluate import cocoeval_matched
        if not results:
            raise UserError("COCO predictions: empty results list")
        try:
            ev = cocoeval_matched(gt, results, iou_type, None if img_ids is None else [int(i) for i in img_ids])
        except (KeyError, TypeError, ValueError, IndexError, AssertionError) as exc:
            raise UserError(f"COCO predictions: cannot evaluate ({type(exc).__name__}: {exc})")
        p = ev.params
        self.iou_type = iou_type
        self.images = list(p.imgIds)
        self.iou_thrs = p.iouThrs
        n_img, n_area, max_det = len(p.imgIds), len(p.areaRng), p.maxDets[-1]
        self.cats = []
        for k in range(len(p.catIds)):
            imgs, scores, tps, fps = [], [], [], []
            npig = np.zeros(n_img)
            for i in range(n_img):
                e = ev.evalImgs[k * n_area * n_img + i]  # area index 0 = "all"
                if e is None:
                    continue
                npig[i] = int(np.count_nonzero(e["gtIgnore"] == 0))
                d = len(e["dtScores"][:max_det])
                if d == 0:
                    continue
                m = e["dtMatches"][:, :max_det] > 0
                ig = e["dtIgnore"][:, :max_det].astype(bool)
                imgs.append(np.full(d, i, np.int64))
                scores.append(np.asarray(e["dtScores"][:max_det], np.float64))
                tps.append(m & ~ig)
                fps.append(~m & ~ig)
            if npig.sum() == 0 and not imgs:
                continue
            t = len(p.iouThrs)
            cat = _CocoCategory(np.concatenate(imgs) if imgs else np.zeros(0, np.int64),
                                np.concatenate(scores) if imgs else np.zeros(0),
                                np.concatenate(tps, 1) if imgs else np.zeros((t, 0), bool),
                                np.concatenate(fps, 1) if imgs else np.zeros((t, 0), bool), npig, n_img)
            self.cats.append(cat)
        self._eps = np.spacing(1)
        names = {"bbox": "APbox", "segm": "APmask"}
        self.alias = names.get(iou_type)

    @property
    def n_images(self) -> int:
        return len(self.images)

    def precision_sums(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per resample and category, the sum of COCOeval's interpolated precision
        (``eval["precision"][t, :, k, 0, -1]`` summed over the 101 recall thresholds), ``(b, T, K)``,
        and the category validity ``(b, K)`` (non-ignored ground truth in the resample), for
        multiplicities ``w`` (b, n)."""
        w = np.asarray(w, dtype=np.int32)  # counts ≤ n: int32 halves the memory traffic
        b, T, R = w.shape[0], len(self.iou_thrs), len(self.REC_THRS)
        sums = np.zeros((b, T, len(self.cats)))
        valid = np.zeros((b, len(self.cats)), bool)
        if self.__dict__.get("_npig") is None:
            self.__dict__["_npig"] = np.stack([c.npig_img for c in self.cats], 1)  # (n, K)
        npig_all = w.astype(np.float64) @ self._npig  # (b, K) weighted non-ignored ground truth
        wt = None
        rows = np.arange(b)
        for k, c in enumerate(self.cats):
            npig = npig_all[:, k]
            valid[:, k] = npig > 0
            if c.img_s.size == 0:
                continue
            ws = w[:, c.img_s]  # (b, S)
            if c.img_a.size:
                if wt is None:
                    wt = np.ascontiguousarray(w.T)  # (n, b)
                ca = np.cumsum(c.a_matrix() @ wt, axis=0, dtype=np.int32)  # (S, b)
                cum_all = ca.T + np.cumsum(ws, axis=1, dtype=np.int32)
            else:
                cum_all = np.cumsum(ws, axis=1, dtype=np.int32)
            # smallest weighted TP count whose recall reaches each threshold (COCOeval compares floats)
            safe = np.where(npig > 0, npig, 1.0)
            lev = np.ceil(self.REC_THRS[None, :] * safe[:, None]).astype(np.int64)  # (b, R)
            lev = np.where((lev - 1) / safe[:, None] >= self.REC_THRS[None, :], lev - 1, lev)
            lev = np.where(lev / safe[:, None] < self.REC_THRS[None, :], lev + 1, lev)
            for t in range(T):
                pos = c.tp_pos[t]
                if pos.size == 0:
                    continue
                starts, ends = c.runs(t)
                P = ends.size
                # weighted TP count at the end of each run
                tpc = np.add.reduceat(ws[:, pos], starts, axis=1, dtype=np.int64)
                np.cumsum(tpc, axis=1, out=tpc)
                den = cum_all[:, ends]  # weighted count of every detection ranked up to here
                if c.has_ig:  # ... less those ignored at this threshold: tp + fp
                    den = den - np.cumsum(ws * c.ig_s[t], axis=1, dtype=np.int32)[:, ends]
                # precision at each run end, made monotone from the right (written reversed into
                # env); the column of 0 past the end stands for "recall never reached"
                env = np.empty((b, P + 1))
                env[:, P] = 0.0
                np.maximum.accumulate((tpc / (den + self._eps))[:, ::-1], axis=1, out=env[:, P - 1::-1])
                big = int(max(tpc[:, -1].max(), lev.max())) + 2  # row offset: rows never interleave
                tpc += rows[:, None] * big
                idx = np.searchsorted(tpc.ravel(), (lev + rows[:, None] * big).ravel(), side="left")
                idx += np.repeat(rows, R)  # flat index into env (one extra column per row)
                sums[:, t, k] = env.ravel()[idx].reshape(b, R).sum(1)
        return sums, valid

    def score(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """``w`` (b, n) -> ``{"<iou_type>/AP", "/AP50", "/AP75", alias}`` each (b,) ×100 (NaN when
        no category has ground truth)."""
        sums, valid = self.precision_sums(w)
        R = len(self.REC_THRS)
        nv = valid.sum(1)
        out = {}
        for name, ts in (("AP", slice(None)), ("AP50", slice(0, 1)), ("AP75", slice(5, 6))):
            p = sums[:, ts].sum(1) / (R * sums[:, ts].shape[1])  # (b, K) mean precision
            s = np.where(valid, p, 0.0).sum(1)
            out[f"{self.iou_type}/{name}"] = np.where(nv > 0, 100.0 * s / np.maximum(nv, 1), np.nan)
        if self.alias:
            out[self.alias] = out[f"{self.iou_type}/AP"]
        return out


class MultiScorer:
    """Several scorers over the same images (COCO bbox + segm), scored together."""

    def __init__(self, scorers: list):
        self.scorers = scorers
        self.images = scorers[0].images

    @property
    def n_images(self) -> int:
        return len(self.images)

    def score(self, w):
        out = {}
        for s in self.scorers:
            out.update(s.score(w))
        return out


# --------------------------------------------------------------------------------------------------
# prediction files -> scorers
# --------------------------------------------------------------------------------------------------
def _load_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable prediction file ({exc})")


def _coco_ann_file(metrics: dict, run_dir: Path) -> Path:
    files = [Path(p) for p in (metrics.get("data_files") or {}) if str(p).endswith(".json")]
    val = [p for p in files if "val" in p.name]
    cands = val if len(val) == 1 else files if len(files) == 1 else []
    if not cands:
        raise UserError(f"{run_dir}/metrics.json: cannot tell the COCO annotation file from data_files")
    return cands[0]


def scorer_for_run(metrics: dict, run_dir: str | Path, iou_types=("bbox", "segm")):
    """The scorer of one finished run from its ``metrics.json`` dict (``predictions`` relative to
    ``run_dir``), or None when it has no prediction file.

    Raises:
        UserError: the prediction file is missing, unreadable or not in a known format.
    """
    run_dir = Path(run_dir)
    rel = metrics.get("predictions")
    if not rel:
        return None
    path = Path(rel) if Path(rel).is_absolute() else run_dir / rel
    if not path.is_file():
        raise UserError(f"{path}: prediction file named in metrics.json is missing")
    data = _load_json(path)
    if isinstance(data, dict) and data.get("format") == "classification/v1":
        try:
            return ClassificationScorer(data["labels"], data["top5"], data["images"])
        except (KeyError, ValueError, TypeError) as exc:
            raise UserError(f"{path}: malformed classification/v1 predictions ({exc})")
    if isinstance(data, dict) and data.get("format") == "segmentation/v1":
        try:
            return SegmentationScorer(data["intersect"], data["union"], data["label"], data["images"])
        except (KeyError, ValueError, TypeError) as exc:
            raise UserError(f"{path}: malformed segmentation/v1 predictions ({exc})")
    if isinstance(data, list):  # COCO results list
        from pycocotools.coco import COCO
        ann = _coco_ann_file(metrics, run_dir)
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                gt = COCO(str(ann))
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{ann}: unreadable COCO annotation file ({exc})")
        has_segm = bool(data) and all("segmentation" in r for r in data)
        types = [t for t in iou_types if t == "bbox" or has_segm]
        return MultiScorer([CocoScorer(gt, data, t, metrics.get("eval_image_ids")) for t in types])
    raise UserError(f"{path}: unknown prediction format")


# --------------------------------------------------------------------------------------------------
# the bootstrap over a group of runs on the same images
# --------------------------------------------------------------------------------------------------
_WORK: tuple | None = None  # (keys, scorers) of the running bootstrap, inherited by forked workers


def _score_chunks(job: tuple) -> dict:
    worker, workers, n, resamples, seed, chunk = job
    keys, scorers = _WORK
    out = {}
    for ci, w in enumerate(resample_weights(n, resamples, seed, chunk)):
        if ci % workers == worker:
            out[ci] = {k: scorers[k].score(w) for k in keys}
    return out


def bootstrap_values(scorers: dict, resamples: int = RESAMPLES, seed: int = SEED,
                     chunk: int = 250, workers: int | None = None) -> dict:
    """Score every run of a group on the same image resamples.

    Args:
        scorers: ``{run key: scorer}``; every scorer must have the same ``images`` (the pairing).
        workers: processes (forked; each regenerates the resample stream and scores every
            ``workers``-th chunk, so the result does not depend on it). Default: 1 for small jobs
            (< 2·10⁷ image-resamples), else ``min(2, os.cpu_count())``.
    Returns:
        ``{run key: {metric: (resamples,) float64}}`` (row b of every run uses the same images).
    Raises:
        UserError: the scorers were evaluated on different images.
    """
    import multiprocessing
    import os
    global _WORK
    keys = list(scorers)
    ref = scorers[keys[0]].images
    for k in keys[1:]:
        if list(scorers[k].images) != list(ref):
            raise UserError(f"bootstrap: runs {keys[0]} and {k} were evaluated on different images")
    n = len(ref)
    n_chunks = -(-resamples // chunk)
    if workers is None:
        workers = 1 if n * resamples < 2e7 else min(2, os.cpu_count() or 1)
    workers = max(1, min(workers, n_chunks))
    _WORK = (keys, scorers)
    try:
        if workers == 1:
            parts = _score_chunks((0, 1, n, resamples, seed, chunk))
        else:
            parts = {}
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for got in pool.map(_score_chunks, [(j, workers, n, resamples, seed, chunk) for j in range(workers)]):
                    parts.update(got)
    finally:
        _WORK = None
    out = {}
    for k in keys:
        metrics = parts[0][k].keys()
        out[k] = {m: np.concatenate([parts[ci][k][m] for ci in range(n_chunks)]) for m in metrics}
    return out


def full_values(scorer) -> dict[str, float]:
    """The metrics of the whole evaluation set (every multiplicity 1)."""
    return {m: float(v[0]) for m, v in scorer.score(np.ones((1, scorer.n_images), np.int64)).items()}


def seed_mean(per_seed: list[np.ndarray], draws: np.ndarray) -> np.ndarray:
    """Resampled value over seeds: row b = mean over j of ``per_seed[draws[b, j]][b]``.

    Args:
        per_seed: one (B,) array per seed (the image bootstrap of that seed's run).
        draws: (B, m) seed indices from :func:`seed_draws`.
    """
    m = np.stack(per_seed)  # (S, B)
    return m[draws, np.arange(m.shape[1])[:, None]].mean(1)
