"""``python -m benchmarks.leaderboard OUTPUT_DIR [--out leaderboard.csv] [--resamples N] [--seed S]``:
the MAE-vs-CrossMAE table, with how sure it is.

Built only from the finished tasks' ``metrics.json`` files under ``OUTPUT_DIR`` (never appended to
by running jobs), so it is idempotent and safe while jobs still run. A malformed ``metrics.json`` is
skipped with a one-line warning naming it. Writes, next to ``--out`` (default
``OUTPUT_DIR/leaderboard.csv``, checked before any work)::

    leaderboard.csv         one row per backbone × task × protocol × config × metric (columns below)
    leaderboard_paired.csv  paired MAE − CrossMAE differences per task × metric (common seeds)
    leaderboard.md          the same as Markdown tables (differences whose interval excludes 0 marked)
    leaderboard.png         one panel per task × headline metric: mean and 95 % interval per backbone
    leaderboard.html        self-contained page opening on the MAE-vs-CrossMAE comparison (one row per
                            task × headline metric), then the sortable table and difference charts
    probe_curves.{csv,png}  probes of pretraining snapshots vs epoch / FLOPs (:mod:`benchmarks.curves`;
                            only when a pretraining under OUTPUT_DIR was watched by ``slurm.watch``)

Columns of ``leaderboard.csv``: backbone, method, arch, pretrain_epochs, mask_ratio,
prediction_ratio, decoder_depth, task, protocol, config, metric, n_seeds, seeds, mean, stderr
(sample std / sqrt(n); empty for n = 1), ci_low, ci_high (95 % bootstrap interval over evaluation
images and seeds, :mod:`benchmarks.bootstrap`), reference, diff_to_reference (mean − reference),
reference_source, reference_statistic (``best epoch`` / ``final epoch``: which evaluation the paper
number is; only a run metric of that statistic gets it, :func:`benchmarks.reference.statistic_of`),
zoo_reported_ft_top1 (a finite number, else ignored with a warning), backbone_source, wall_time_s (sum over seeds), gpu_hours
(sum of wall time × GPUs), gpu_type, checkpoint_sha256, config_hash, code_version (values joined by
``;`` when seeds differ). The paired CSV adds ci_low, ci_high and excludes_zero for the difference.
A non-finite value (NaN, ±inf in a metrics.json) is written as ``nan`` / ``inf`` / ``-inf`` and has
no s.e. and no interval. Every value placed in the Markdown, PNG and HTML goes through
:mod:`benchmarks.render` (escaping for its context, per-metric number formats).

Identity: a backbone is its checkpoint's sha256 (:func:`backbone_key`), never its file name; its
display name is the suite's ``--backbone NAME=...`` (``task.json``), else derived from the
pretraining args and the sha prefix (:func:`derived_name`). Pretraining metadata (method, arch,
epochs, mask ratio, prediction ratio, decoder depth) comes from the backbone checkpoint's ``args``
(``argparse.Namespace`` as written by MAE / CrossMAE's ``main_pretrain.py``): recorded at task time
by the dispatcher in ``task_state.json`` (``backbone_meta``), else the load report's ``meta``, else
read from the checkpoint now. The reference column is filled only for paper-protocol runs (config
preset containing ``paper``, or unknown config when the task was not dispatched by
``slurm.submit``); smoke-suite numbers are never compared to the paper.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

from crossmae.utils import UserError, atomic_write_figure, atomic_write_text, check_writable, cli_entry, sha256_file

from . import bootstrap, curves, reference
from .render import csv_text, fmt_metric, fmt_number, is_finite, is_number, md_text

COLUMNS = ["backbone", "method", "arch", "pretrain_epochs", "mask_ratio", "prediction_ratio", "decoder_depth",
           "task", "protocol", "config", "metric", "n_seeds", "seeds", "mean", "stderr", "ci_low", "ci_high",
           "reference", "diff_to_reference", "reference_source", "reference_statistic", "zoo_reported_ft_top1",
           "backbone_source",
           "wall_time_s", "gpu_hours", "gpu_type", "checkpoint_sha256", "config_hash", "code_version"]
PAIRED_COLUMNS = ["arch", "task", "protocol", "config", "metric", "mae_backbone", "crossmae_backbone", "n_pairs",
                  "seeds", "mae_mean", "crossmae_mean", "diff_mean", "diff_stderr", "ci_low", "ci_high", "excludes_zero",
                  "reference_diff", "reference_statistic"]


# --------------------------------------------------------------------------------------------------
# pretraining metadata
# --------------------------------------------------------------------------------------------------
def meta_from_args(args) -> dict:
    """Leaderboard metadata from a pretraining ``args`` namespace (or dict).

    ``method``: ``crossmae`` when ``args.cross_mae`` (official CrossMAE flag) or ``args.method`` says so
    or the model name contains "cross", else ``mae``. ``prediction_ratio``: ``kept_mask_ratio`` (γ)
    for CrossMAE, ``mask_ratio`` for MAE (it predicts every masked patch).
    """
    a = vars(args) if hasattr(args, "__dict__") else dict(args or {})
    model = str(a.get("model", "") or "")
    method = a.get("method")
    if method not in ("mae", "crossmae"):
        method = "crossmae" if a.get("cross_mae") or "cross" in model.lower() else "mae"
    arch = a.get("arch") or model
    for prefix in ("cross_mae_", "crossmae_", "mae_"):
        if arch.startswith(prefix):
            arch = arch[len(prefix):]
    mask = a.get("mask_ratio")
    pred = a.get("kept_mask_ratio") if method == "crossmae" else mask
    return {"method": method, "arch": arch or None, "model": model or None, "pretrain_epochs": a.get("epochs"),
            "mask_ratio": mask, "prediction_ratio": pred, "decoder_depth": a.get("decoder_depth"),
            "inter_block": a.get("weight_fm")}


def pretrain_meta(path: str | os.PathLike) -> dict:
    """:func:`meta_from_args` of the checkpoint at ``path`` (``{}`` when it has no ``args``).

    Raises:
        UserError: the file is missing or not a readable checkpoint.
    """
    from crossmae.utils import safe_torch_load
    ck = safe_torch_load(path)
    args = ck.get("args") if isinstance(ck, dict) else None
    if args is None and isinstance(ck, dict) and isinstance(ck.get("config"), dict):
        args = ck["config"]
    return meta_from_args(args) if args is not None else {}


# --------------------------------------------------------------------------------------------------
# collecting
# --------------------------------------------------------------------------------------------------
def warn(msg: str) -> None:
    """One ``warning: ...`` line on stderr (a skipped input; the leaderboard is built without it)."""
    print(f"warning: {' '.join(str(msg).split())}", file=sys.stderr)


def read_result(path: str | os.PathLike, root: str | os.PathLike | None = None, kind: str = "metrics") -> dict:
    """One result / task file of a runs folder, as the leaderboard may trust it: a regular file inside
    ``root`` (never a symlink, FIFO or device; nothing outside the folder given is opened), at most
    64 MiB, nested at most 64 levels, of the shape of ``kind`` (``metrics``, ``task``, ``task_state``:
    :data:`crossmae.safeio.SCHEMAS`; e.g. ``wall_time_s`` a number, ``metrics`` an object).

    Raises:
        UserError: one line naming the file and the problem (the caller warns and skips it).
    """
    from crossmae.safeio import load_json
    return load_json(path, kind, root)


def _read_json(path: Path, root: Path | None = None, kind: str = "metrics") -> dict:
    return read_result(path, root, kind)


def _side_json(path: Path, root: Path | None = None) -> dict:
    """A task's ``task.json`` / ``task_state.json``: ``{}`` when absent; a malformed, non-regular or
    outside one is ignored with a warning (the metrics stand on their own)."""
    if not os.path.lexists(path):
        return {}
    try:
        return _read_json(path, root, {"task.json": "task", "task_state.json": "task_state"}.get(path.name, "object"))
    except UserError as exc:
        warn(f"{exc}; ignored")
        return {}


def _nested_suite_root(d: Path, root: Path, cache: dict) -> Path | None:
    """The folder between ``root`` (exclusive) and ``d`` (inclusive) that is another suite's root
    (``suite.json``), else None: one suite's leaderboard never collects another's results."""
    for a in [d, *d.parents]:
        if a == root or root not in a.parents:
            return None
        if a not in cache:
            cache[a] = os.path.lexists(a / "suite.json")
        if cache[a]:
            return a
    return None


def _metrics_problem(m: dict) -> str | None:
    if "metrics" not in m or "task" not in m:
        return "not a task metrics file (needs 'task' and 'metrics')"
    if not isinstance(m["metrics"], dict):
        return "'metrics' is not an object"
    if not isinstance(m["task"], str):
        return "'task' is not a string"
    return None


def _meta_of(state: dict, report: dict, bb: str | None, cache: dict) -> dict:
    """Pretraining metadata: the dispatcher's ``backbone_meta``, else the load report's ``meta``
    (the checkpoint's ``args``, read by the backbone API), else the checkpoint file read now."""
    meta = state.get("backbone_meta")
    if isinstance(meta, dict) and meta and "error" not in meta:
        return meta
    rmeta = report.get("meta") if isinstance(report, dict) else None
    if isinstance(rmeta, dict) and rmeta:
        meta = meta_from_args(rmeta)
        if not meta.get("arch") and report.get("arch"):
            meta["arch"] = report["arch"]
        return meta
    if bb and bb not in cache:
        try:
            cache[bb] = pretrain_meta(bb) if Path(bb).is_file() else {}
        except UserError:
            cache[bb] = {}
    meta = dict(cache.get(bb, {})) if bb else {}
    if not meta.get("arch") and isinstance(report, dict) and report.get("arch"):
        meta["arch"] = report["arch"]
    return meta


def backbone_key(m: dict, cache: dict) -> str:
    """A backbone's identity: ``backbone_sha256`` of the metrics (else the report's ``sha256``,
    else the sha256 of the checkpoint file if it still exists, else ``path:<value>``). File names
    never identify a backbone; two different checkpoints are never merged."""
    report = m.get("backbone_report") if isinstance(m.get("backbone_report"), dict) else {}
    sha = m.get("backbone_sha256") or report.get("sha256")
    if sha:
        return str(sha)
    bb = m.get("backbone")
    if bb and Path(str(bb)).is_file():
        if ("sha", bb) not in cache:
            cache[("sha", bb)] = sha256_file(bb)
        return cache[("sha", bb)]
    return f"path:{bb}"


def _fmt_ratio(v) -> str:
    return "?" if v in (None, "") else f"{float(v):g}"


def derived_name(meta: dict, key: str) -> str:
    """Display name from the pretraining args and the sha prefix, e.g.
    ``crossmae-vit_base_patch16-ep800-p0.75-γ0.25-d12-1a2b3c4d``."""
    parts = [meta.get("method") or "backbone"]
    if meta.get("arch"):
        parts.append(str(meta["arch"]))
    if meta.get("pretrain_epochs") not in (None, ""):
        parts.append(f"ep{meta['pretrain_epochs']}")
    if meta.get("mask_ratio") not in (None, ""):
        parts.append(f"p{_fmt_ratio(meta['mask_ratio'])}")
    if meta.get("method") == "crossmae" and meta.get("prediction_ratio") not in (None, ""):
        parts.append(f"γ{_fmt_ratio(meta['prediction_ratio'])}")
    if meta.get("decoder_depth") not in (None, ""):
        parts.append(f"d{meta['decoder_depth']}")
    parts.append(key[5:][:16] if key.startswith("path:") else key[:8])
    return "-".join(parts)


def collect(root: str | os.PathLike) -> list[dict]:
    """One record per finished transfer task under ``root``: its metrics plus task / backbone info.

    A malformed ``metrics.json`` (not JSON, not an object, no ``task`` / ``metrics``) is skipped
    with a one-line warning on stderr naming it; the rest is collected.

    Each record's ``backbone_key`` is the checkpoint identity (:func:`backbone_key`), ``identity``
    that key with the suite's ``NAME`` (one checkpoint given two names in a suite stays two rows;
    two checkpoints are never one), and ``backbone`` its display name: the ``NAME`` of the suite's
    ``--backbone NAME=...`` (``task.json`` ``spec.backbone_name``), else :func:`derived_name`; when
    one name would cover several checkpoints, each gets its sha prefix appended (``name@1a2b3c4d``).

    Raises:
        UserError: ``root`` missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: output folder does not exist")
    cache: dict = {}
    out = []
    nested: dict = {}
    warned_nested: set = set()
    for mpath in sorted(root.rglob("metrics.json")):
        rel = mpath.parent.relative_to(root)
        if rel.parts[:1] in (("jobs",), ("pretrain",)) or any(".old-" in p for p in rel.parts) \
                or curves.in_watch(mpath, root):  # probes of pretraining snapshots: curves, not rows
            continue
        inner = _nested_suite_root(mpath.parent, root, nested)
        if inner is not None:
            if inner not in warned_nested:
                warned_nested.add(inner)
                warn(f"{inner}: another suite's output folder (suite.json) inside {root}; its results skipped")
            continue
        try:
            m = _read_json(mpath, root)
        except UserError as exc:
            warn(f"{exc}; skipped")
            continue
        problem = _metrics_problem(m)
        if problem:
            warn(f"{mpath}: {problem}; skipped")
            continue
        if m["task"] == "pretrain":
            continue
        spec = _side_json(mpath.parent / "task.json", root).get("spec", {})
        spec = spec if isinstance(spec, dict) else {}
        state = _side_json(mpath.parent / "task_state.json", root)
        report = m.get("backbone_report") if isinstance(m.get("backbone_report"), dict) else {}
        bb = m.get("backbone")
        key = backbone_key(m, cache)
        meta = _meta_of(state, report, str(bb) if bb else None, cache)
        zoo = report.get("zoo") if isinstance(report.get("zoo"), dict) else {}
        out.append({"metrics": m, "spec": spec, "meta": meta or {}, "backbone_key": key,
                    "given_name": spec.get("backbone_name"), "source": report.get("source") or (str(bb) if bb else ""),
                    "zoo_top1": zoo.get("reported_ft_top1"),
                    "task": m["task"], "protocol": m.get("protocol") or spec.get("protocol"),
                    "config": spec.get("config") or m.get("config") or "", "seed": m.get("seed", spec.get("seed")),
                    "path": str(mpath)})
    _name_backbones(out)
    return out


def _name_backbones(records: list[dict]) -> None:
    """Set each record's ``identity`` (sha256 key, suite NAME or "") and display ``backbone`` name."""
    by_id: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        r["identity"] = (r["backbone_key"], r["given_name"] or "")
        by_id[r["identity"]].append(r)
    names = {ident: ident[1] or derived_name(rs[0]["meta"], ident[0]) for ident, rs in by_id.items()}
    shas: dict[str, set] = defaultdict(set)
    for ident, n in names.items():
        shas[n].add(ident[0])
    for ident, rs in by_id.items():
        n = names[ident]
        if len(shas[n]) > 1:  # one name, several checkpoints: never merged, told apart by sha
            key = ident[0]
            n = f"{n}@{key[5:][:16] if key.startswith('path:') else key[:8]}"
        for r in rs:
            r["backbone"] = n


def _stats(values: list[float]) -> tuple[float, float | None]:
    """``(mean, standard error)``; the error is None for one value or when any value is not finite
    (the mean is then NaN or ±inf, shown as such)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2 or not math.isfinite(mean):
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _join(values) -> str:
    vals = sorted({str(v) for v in values if v not in (None, "")})
    return ";".join(vals)


def rows_from(records: list[dict]) -> list[dict]:
    """Aggregate records into leaderboard rows (see the module doc), sorted. One row per backbone
    identity (never per file name) × task × protocol × config × metric."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        for metric, value in (r["metrics"].get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                groups[(r["backbone"], r["backbone_key"], r["task"], r["protocol"] or "", r["config"], metric)].append(
                    dict(r, metric=metric, value=float(value)))
    rows, warned = [], set()
    for (bb, key, task, protocol, config, metric), rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        rs = sorted(rs, key=lambda r: (r["seed"] is None, str(r["seed"]), r["path"]))
        seen, kept = set(), []
        for r in rs:  # one result per seed: a second run of the same seed is reported, not averaged
            if r["seed"] in seen:
                if r["path"] not in warned:
                    warned.add(r["path"])
                    warn(f"{r['path']}: a second result for backbone {bb}, {task}/{config}, seed {r['seed']}; skipped")
                continue
            seen.add(r["seed"])
            kept.append(r)
        rs = kept
        meta = rs[0]["meta"]
        mean, se = _stats([r["value"] for r in rs])
        ref, zoo = None, None
        for r in rs:  # a number only (a string here would be placed in the outputs as if it were one)
            z = r["zoo_top1"]
            if z is not None and not is_finite(z) and ("zoo", r["path"]) not in warned:
                warned.add(("zoo", r["path"]))
                warn(f"{r['path']}: backbone_report.zoo.reported_ft_top1 is not a finite number; ignored")
            zoo = z if zoo is None and is_finite(z) else zoo
        if "paper" in str(config) or not config:
            ref = reference.lookup(task, protocol, metric, meta.get("arch"), meta.get("method"),
                                   meta.get("prediction_ratio"))
        wall = sum(float(r["metrics"].get("wall_time_s") or 0.0) for r in rs)
        gpuh = sum(float(r["metrics"].get("wall_time_s") or 0.0) * float(r["metrics"].get("num_gpus") or 0)
                   for r in rs) / 3600.0
        rows.append({
            "backbone": bb, "backbone_key": key, "method": meta.get("method", ""), "arch": meta.get("arch", ""),
            "pretrain_epochs": meta.get("pretrain_epochs", ""), "mask_ratio": meta.get("mask_ratio", ""),
            "prediction_ratio": meta.get("prediction_ratio", ""), "decoder_depth": meta.get("decoder_depth", ""),
            "task": task, "protocol": protocol, "config": config, "metric": metric, "n_seeds": len(rs),
            "seeds": " ".join(str(r["seed"]) for r in rs), "mean": mean, "stderr": se, "ci_low": None, "ci_high": None,
            "reference": ref["value"] if ref else None, "diff_to_reference": mean - ref["value"] if ref else None,
            "reference_source": ref["source"] if ref else "",
            "reference_statistic": reference.STATISTIC_LABEL[ref["statistic"]] if ref else "",
            "zoo_reported_ft_top1": zoo,
            "backbone_source": _join(r["source"] for r in rs),
            "wall_time_s": wall, "gpu_hours": gpuh,
            "gpu_type": _join(r["metrics"].get("device") for r in rs),
            "checkpoint_sha256": "" if key.startswith("path:") else key,
            "config_hash": _join(r["metrics"].get("config_hash") for r in rs),
            "code_version": _join(r["metrics"].get("code_version") for r in rs),
            "_values": {r["seed"]: r["value"] for r in rs}, "_records": {r["seed"]: r for r in rs},
        })
    return rows


def paired(rows: list[dict]) -> list[dict]:
    """MAE − CrossMAE per (arch, task, protocol, config, metric) and backbone pair, over common seeds."""
    by_cell: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["method"] in ("mae", "crossmae"):
            by_cell[(r["arch"], r["task"], r["protocol"], r["config"], r["metric"])][r["method"]].append(r)
    out = []
    for key, methods in sorted(by_cell.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        for a in methods.get("mae", []):
            for c in methods.get("crossmae", []):
                seeds = sorted(set(a["_values"]) & set(c["_values"]), key=str)
                if not seeds:
                    continue
                diffs = [a["_values"][s] - c["_values"][s] for s in seeds]
                dm, dse = _stats(diffs)
                rd = (a["reference"] - c["reference"]) if a["reference"] is not None and c["reference"] is not None else None
                p = dict(zip(PAIRED_COLUMNS, [*key, a["backbone"], c["backbone"], len(seeds),
                                              " ".join(map(str, seeds)),
                                              _stats([a["_values"][s] for s in seeds])[0],
                                              _stats([c["_values"][s] for s in seeds])[0], dm, dse, None, None,
                                              "", rd, a["reference_statistic"] if rd is not None else ""]))
                p["_rows"], p["_seeds"] = (a, c), seeds
                out.append(p)
    return out


# --------------------------------------------------------------------------------------------------
# confidence intervals: the paired bootstrap over evaluation images and seeds
# --------------------------------------------------------------------------------------------------
def attach_intervals(rows: list[dict], pairs: list[dict], resamples: int = bootstrap.RESAMPLES,
                     seed: int = bootstrap.SEED, say=None) -> None:
    """Fill ``ci_low`` / ``ci_high`` of rows and pairs from the runs' per-sample predictions.

    Runs of one task × protocol × config evaluated on the same images share the same image
    resamples (:func:`benchmarks.bootstrap.bootstrap_values`), so a pair's difference is a paired
    bootstrap; seeds are resampled with :func:`benchmarks.bootstrap.seed_draws` (the same draw for
    both sides of a pair). A run whose prediction file is missing, unreadable or does not reproduce
    its metrics.json value (|Δ| > 1e-4) gets no interval, with a one-line warning; so does a row or
    pair with any such seed. Intervals: 95 % percentile (:func:`benchmarks.bootstrap.percentile_interval`).
    """
    records = {}
    for r in rows:
        for s, rec in r["_records"].items():
            records[rec["path"]] = rec
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for rec in records.values():
        groups[(rec["task"], rec["protocol"] or "", rec["config"])].append(rec)
    boot: dict[str, dict] = {}  # record path -> {"group": id, "values": {metric: (B,)}}
    for gkey, recs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        scorers = {}
        for rec in recs:
            try:
                sc = bootstrap.scorer_for_run(rec["metrics"], Path(rec["path"]).parent)
            except UserError as exc:
                warn(f"{exc}; no interval for {rec['path']}")
                continue
            if sc is not None:
                scorers[rec["path"]] = sc
        by_images: dict[tuple, dict] = defaultdict(dict)
        for path, sc in scorers.items():
            by_images[tuple(map(str, sc.images))][path] = sc
        for gid, (imgs, scs) in enumerate(sorted(by_images.items())):
            if say:
                say(f"bootstrap {'/'.join(map(str, gkey))}: {len(scs)} runs x {len(imgs)} images x {resamples}")
            vals = bootstrap.bootstrap_values(scs, resamples, seed)
            for path, sc in scs.items():
                full = bootstrap.full_values(sc)
                reported = records[path]["metrics"].get("metrics") or {}
                ok = {}
                for mname, v in vals[path].items():
                    rep = reported.get(mname)
                    if not isinstance(rep, (int, float)) or isinstance(rep, bool):
                        continue
                    if not (abs(full[mname] - rep) <= 1e-4 or (math.isnan(full[mname]) and math.isnan(rep))):
                        warn(f"{path}: predictions give {mname} {full[mname]:.6g}, metrics.json says {rep:.6g}; "
                             f"no interval")
                        continue
                    ok[mname] = v
                boot[path] = {"group": (gkey, gid), "values": ok}

    def per_seed(row, seeds):
        arrs, group = [], None
        for s in seeds:
            b = boot.get(row["_records"][s]["path"])
            if b is None or row["metric"] not in b["values"] or (group is not None and b["group"] != group):
                return None, None
            group = b["group"]
            arrs.append(b["values"][row["metric"]])
        return arrs, group

    for r in rows:
        seeds = list(r["_records"])
        arrs, _ = per_seed(r, seeds)
        if arrs is not None and math.isfinite(r["mean"]):
            r["_boot"] = bootstrap.seed_mean(arrs, bootstrap.seed_draws(len(seeds), resamples, seed))
            r["ci_low"], r["ci_high"] = _interval(r["_boot"])
    for p in pairs:
        a, c = p["_rows"]
        if not math.isfinite(p["diff_mean"]):  # a non-finite value has no interval
            continue
        aa, ga = per_seed(a, p["_seeds"])
        cc, gc = per_seed(c, p["_seeds"])
        if aa is None or cc is None or ga != gc:
            continue
        draws = bootstrap.seed_draws(len(p["_seeds"]), resamples, seed)
        diff = bootstrap.seed_mean(aa, draws) - bootstrap.seed_mean(cc, draws)
        p["_boot"] = diff
        p["ci_low"], p["ci_high"] = _interval(diff)
        if p["ci_low"] is not None:
            p["excludes_zero"] = "yes" if p["ci_low"] > 0 or p["ci_high"] < 0 else "no"


def _interval(values) -> tuple[float | None, float | None]:
    """:func:`benchmarks.bootstrap.percentile_interval`, ``(None, None)`` when it has none (too few
    finite resamples): an interval is two finite numbers or absent, never NaN."""
    lo, hi = bootstrap.percentile_interval(values)
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else (None, None)


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    """A CSV cell: ``""`` for None, ``nan`` / ``inf`` / ``-inf`` for a non-finite float, a float
    with 6 significant digits, anything else as ``str``."""
    if v is None:
        return ""
    if isinstance(v, float):
        return fmt_number(v) if not math.isfinite(v) else f"{v:.6g}"
    return str(v)


def to_csv(rows: list[dict], columns: list[str]) -> str:
    """``rows`` as CSV text with ``columns`` (:func:`benchmarks.render.csv_text`)."""
    return csv_text(rows, columns, _fmt)


def _has_ci(r) -> bool:
    return is_finite(r.get("ci_low")) and is_finite(r.get("ci_high"))


def _pm(metric, mean, se, n=None, lo=None, hi=None) -> str:
    """``mean ± se [lo, hi] (n=…)`` in ``metric``'s format (:func:`benchmarks.render.fmt_metric`)."""
    s = fmt_metric(mean, metric) + (f" ± {fmt_metric(se, metric)}" if is_number(se) else "")
    if is_finite(lo) and is_finite(hi):
        s += f" [{fmt_metric(lo, metric)}, {fmt_metric(hi, metric)}]"
    return s + (f" (n={n})" if n else "")


def to_markdown(rows: list[dict], pairs: list[dict], root: Path, resamples: int = bootstrap.RESAMPLES) -> str:
    """``leaderboard.md``: every row as a table (one column per backbone), then the paired
    differences. Every name from the runs' files is escaped (:func:`benchmarks.render.md_text`: no
    ``|`` splits a cell, no backtick, emphasis, link or HTML tag forms); numbers in their metric's
    format; a non-finite value shown as ``nan`` / ``inf``; the paper column names its statistic
    (final / best epoch)."""
    lines = ["# Leaderboard: MAE vs CrossMAE", "", f"Built from the finished tasks in {md_text(root)} "
             f"({sum(r['n_seeds'] for r in rows)} task-metric results). Mean ± standard error over seeds, "
             f"[95 % interval] of a bootstrap over evaluation images and seeds ({resamples} resamples).", ""]
    backbones = sorted({r["backbone"] for r in rows})
    if not rows:
        return "\n".join(lines + ["No finished task yet.", ""])
    label = {r["backbone"]: md_text(f"{r['backbone']} ({r['method'] or '?'}, γ={_fmt(r['prediction_ratio'])})")
             for r in rows}
    lines += ["| task | protocol | config | metric | " + " | ".join(label[b] for b in backbones)
              + " | paper (statistic) |", "|" + "---|" * (5 + len(backbones))]
    cells = defaultdict(dict)
    for r in rows:
        cells[(r["task"], r["protocol"], r["config"], r["metric"])][r["backbone"]] = r
    for key, by_bb in sorted(cells.items(), key=lambda kv: tuple(map(str, kv[0]))):
        metric = key[3]
        vals = [(_pm(metric, by_bb[b]["mean"], by_bb[b]["stderr"], by_bb[b]["n_seeds"], by_bb[b]["ci_low"],
                     by_bb[b]["ci_high"]) if b in by_bb else "–") for b in backbones]
        refs = "; ".join(f"{md_text(b)}: {fmt_metric(r['reference'], metric)} ({r['reference_statistic']})"
                         for b, r in by_bb.items() if r["reference"] is not None)
        lines.append("| " + " | ".join(md_text("" if k is None else k) for k in key) + " | " + " | ".join(vals)
                     + f" | {refs or '–'} |")
    if pairs:
        lines += ["", "## Paired differences (MAE − CrossMAE, common seeds)", "",
                  "**bold ✱**: the 95 % paired-bootstrap interval excludes 0.", "",
                  "| task | protocol | config | metric | MAE | CrossMAE | n | MAE − CrossMAE | 95 % interval | "
                  "paper diff (statistic) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for p in pairs:
            metric = p["metric"]
            diff = _pm(metric, p["diff_mean"], p["diff_stderr"])
            ci = f"[{fmt_metric(p['ci_low'], metric)}, {fmt_metric(p['ci_high'], metric)}]" if _has_ci(p) else "–"
            if p["excludes_zero"] == "yes":
                diff, ci = f"**{diff}** ✱", f"**{ci}**"
            ref = (f"{fmt_metric(p['reference_diff'], metric)} ({p['reference_statistic']})"
                   if p["reference_diff"] is not None else "–")
            names = " | ".join(md_text("" if p[k] is None else p[k]) for k in
                               ("task", "protocol", "config", "metric", "mae_backbone", "crossmae_backbone"))
            lines.append(f"| {names} | {p['n_pairs']} | {diff} | {ci} | {ref} |")
    return "\n".join(lines) + "\n"


#: the metrics drawn in the charts (every metric is in the CSV / Markdown / HTML table).
HEADLINE = ("top1", "APbox", "APmask", "mIoU")


def _panels(rows):
    shown = [r for r in rows if r["metric"] in HEADLINE] or rows
    return shown, sorted({(r["task"], r["protocol"], r["config"], r["metric"]) for r in shown},
                         key=lambda c: tuple(map(str, c)))


def plot_figure(rows: list[dict]):
    """The leaderboard's figure (a matplotlib ``Figure``; the caller closes it): one panel per task ×
    protocol × config × headline metric (:data:`HEADLINE`; all metrics when none is present), each
    on its own axis: one bar per backbone (mean), error bar = the 95 % bootstrap interval where
    known, else ± standard error. A non-finite mean gets no bar (its value, ``nan`` / ``inf``, is
    written at its place) and no part in the axis limits; every name from the runs' files is drawn
    as plain text (``usetex`` and ``parse_math`` off: a ``$`` is a dollar sign, never mathtext)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plain = {"usetex": False, "parse_math": False}
    shown, cells = _panels(rows)
    n = max(1, len(cells))
    ncol = min(4, n)
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.0 * nrow), squeeze=False)
    for ax in axes.ravel()[len(cells):]:
        ax.axis("off")
    for ax, cell in zip(axes.ravel(), cells):
        rs = sorted((r for r in shown if (r["task"], r["protocol"], r["config"], r["metric"]) == cell),
                    key=lambda r: r["backbone"])
        xs = list(range(len(rs)))
        ys = [r["mean"] for r in rs]
        lo = [(r["mean"] - r["ci_low"]) if _has_ci(r) else (r["stderr"] or 0.0) for r in rs]
        hi = [(r["ci_high"] - r["mean"]) if _has_ci(r) else (r["stderr"] or 0.0) for r in rs]
        lo = [max(0.0, v) if math.isfinite(v) else 0.0 for v in lo]
        hi = [max(0.0, v) if math.isfinite(v) else 0.0 for v in hi]
        colors = ["tab:blue" if r["method"] == "mae" else "tab:orange" if r["method"] == "crossmae" else "tab:gray"
                  for r in rs]
        ok = [i for i, y in enumerate(ys) if math.isfinite(y)]
        ax.bar([xs[i] for i in ok], [ys[i] for i in ok], 0.7, color=[colors[i] for i in ok],
               yerr=[[lo[i] for i in ok], [hi[i] for i in ok]], capsize=3)
        ax.set_xticks(xs)
        ax.set_xlim(-0.6, len(xs) - 0.4)
        ax.set_xticklabels([str(r["backbone"]) for r in rs], fontsize=7, rotation=20, ha="right", **plain)
        ax.set_title(f"{cell[0]} · {cell[3]}\n{cell[1]} · {cell[2]}", fontsize=8, **plain)
        if ok:
            top = max(ys[i] + hi[i] for i in ok)
            bot = min(ys[i] - lo[i] for i in ok)
            pad = 0.15 * (top - bot) if top > bot else max(abs(top) * 0.05, 1e-3)
            ax.set_ylim(min(0.0, bot - pad), top + pad)  # bars start at 0
        for i in set(xs) - set(ok):  # the value itself where there is no bar
            ax.text(xs[i], 0.0, fmt_number(ys[i]), ha="center", va="bottom", fontsize=8, color="tab:red",
                    transform=ax.get_xaxis_transform(), **plain)
    fig.suptitle("MAE (blue) vs CrossMAE (orange): mean,\n95 % bootstrap interval (else ± s.e.)"
                 if ncol == 1 else "MAE (blue) vs CrossMAE (orange): mean, 95 % bootstrap interval (else ± s.e.)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def plot(rows: list[dict], path: Path) -> Path:
    """:func:`plot_figure` written to ``path`` as PNG (:func:`crossmae.utils.atomic_write_figure`)."""
    return atomic_write_figure(plot_figure(rows), path, dpi=100)


def check_out(out: Path) -> dict[str, Path]:
    """The output paths for ``--out`` (CSV; paired CSV, Markdown, PNG and HTML beside it), checked
    before any work: ``.csv`` suffix, an existing folder (or one that can be created) that this
    process can create files in (probed with a temporary file, removed at once), and no output path
    that is a folder.

    Raises:
        UserError: one line naming ``--out`` and the problem.
    """
    if out.suffix != ".csv":
        raise UserError(f"--out {out}: must end in .csv")
    paths = {"csv": out, "paired": out.with_name(out.stem + "_paired.csv"), "md": out.with_suffix(".md"),
             "png": out.with_suffix(".png"), "html": out.with_suffix(".html")}
    for p in paths.values():
        try:
            check_writable(p, "leaderboard output", folder=False)
        except UserError as exc:
            raise UserError(f"--out {out}: {exc}") from None
    return paths


def build(root: str | os.PathLike, out: str | os.PathLike | None = None, resamples: int = bootstrap.RESAMPLES,
          seed: int = bootstrap.SEED, say=None) -> dict[str, Path]:
    """Collect, aggregate, bootstrap and write the CSV, paired CSV, Markdown, PNG and HTML.
    Returns their paths. Nothing is written unless ``root`` and ``out`` pass the checks.

    Raises:
        UserError: ``root`` missing, ``out`` not ending in ``.csv`` or not writable (see
            :func:`check_out`), ``resamples`` < 1.
    """
    from . import leaderboard_html
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: output folder does not exist")
    paths = check_out(Path(out) if out else root / "leaderboard.csv")
    if resamples < 1:
        raise UserError(f"--resamples {resamples}: must be at least 1")
    rows = rows_from(collect(root))
    pairs = paired(rows)
    attach_intervals(rows, pairs, resamples, seed, say)
    atomic_write_text(to_csv(rows, COLUMNS), paths["csv"])
    atomic_write_text(to_csv(pairs, PAIRED_COLUMNS), paths["paired"])
    atomic_write_text(to_markdown(rows, pairs, root, resamples), paths["md"])
    plot(rows, paths["png"])
    curve_paths, curves_html = curves.build(root, paths["csv"].parent, min(resamples, 1000), seed, warn=warn)
    atomic_write_text(leaderboard_html.render(rows, pairs, root, resamples, HEADLINE, curves=curves_html or None),
                      paths["html"])
    paths.update(curve_paths)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.leaderboard", description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir")
    p.add_argument("--out", default=None,
                   help="CSV path (default OUTPUT_DIR/leaderboard.csv); _paired.csv/.md/.png/.html next to it")
    p.add_argument("--resamples", type=int, default=bootstrap.RESAMPLES,
                   help=f"bootstrap resamples for the 95%% intervals (default {bootstrap.RESAMPLES})")
    p.add_argument("--seed", type=int, default=bootstrap.SEED, help="bootstrap seed (default %(default)s)")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    paths = build(args.output_dir, args.out, args.resamples, args.seed)
    for k, v in paths.items():
        print(f"{k:7s} {v}")
    return paths


if __name__ == "__main__":
    main()
    sys.exit(0)
