"""Probe curves of pretraining runs: a probe's value per snapshot, against epochs and against compute.

``slurm.watch`` probes each snapshot of a pretraining while it runs and keeps its state in
``<pretraining>/watch/watch_state.json``; the snapshots' cumulative compute is in
``<pretraining>/snapshots.json`` (:mod:`crossmae.compute`). From these, :func:`build` (called by
``benchmarks.leaderboard``) writes next to the leaderboard::

    probe_curves.csv   one row per pretraining run × snapshot × probe × metric (columns :data:`COLUMNS`);
                       a probe that failed after its retries is one row with status ``failed``
                       and its error; snapshots without compute records (older runs) have the
                       compute columns empty and are placed by epoch only
    probe_curves.png   per probe × headline metric: value vs epoch and vs pretraining FLOPs, one
                       line per pretraining run (MAE blue, CrossMAE orange)

and adds :func:`html_section` (inline SVG, self-contained) to ``leaderboard.html``. The value is the
probe's own ``metrics.json`` value; the interval is the 95 % percentile bootstrap over the probe's
evaluation images (:mod:`benchmarks.bootstrap`) where it wrote per-sample predictions. The x axis
"pretraining FLOPs" is images seen × forward+backward FLOPs per image, the compute measure of the
CrossMAE paper's "same compute" comparison (Sections 1, 5.2).
"""
from __future__ import annotations

import html
import math
import os
from collections import defaultdict
from pathlib import Path

from crossmae.utils import UserError, atomic_write_figure, atomic_write_text

#: the watcher's folder inside a pretraining folder and its state file (written by slurm.watch)
WATCH_DIR = "watch"
STATE_NAME = "watch_state.json"
COLUMNS = ["backbone", "method", "arch", "epoch", "images_seen", "wall_time_s", "device_hours", "device_type", "flops",
           "probe", "metric", "value", "ci_low", "ci_high", "status", "attempts", "error", "metrics_path",
           "pretrain_dir"]
#: metrics drawn (all are in the CSV); the probes' headline is ``top1``
DRAWN = ("top1",)


def in_watch(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` (a file under ``root``) belongs to a watcher's folder (its probes or its own
    ``metrics.json``): such results are curves, never leaderboard rows."""
    root = Path(root).resolve()
    for d in Path(path).resolve().parents:
        if (d / STATE_NAME).is_file() and d.name == WATCH_DIR:
            return True
        if d == root:
            break
    return False


def find_watches(root: str | os.PathLike) -> list[Path]:
    """The watcher folders (``.../watch`` holding ``watch_state.json``) under ``root``, sorted."""
    root = Path(root)
    found = {p.parent for p in root.rglob(STATE_NAME) if p.parent.name == WATCH_DIR}
    return sorted(d for d in found if not any(".old-" in part for part in d.parts))


def _read(path: Path, root: Path, kind: str = "object") -> dict:
    """A JSON file of a watched run through :func:`crossmae.safeio.load_json`: a regular file inside
    ``root`` (the folder given; never a symlink or FIFO), bounded, of ``kind``'s schema.

    Raises:
        UserError: one line naming the file and the problem.
    """
    from crossmae.safeio import load_json
    return load_json(path, kind, root)


def _run_meta(pre: Path, root: Path) -> dict:
    """Name, method and arch of a pretraining folder (``task.json``'s suite name, else the folder
    name; method / arch from ``run.json``'s config model)."""
    meta = {"backbone": pre.name, "method": "", "arch": ""}
    try:
        spec = _read(pre / "task.json", root, "task").get("spec") if (pre / "task.json").is_file() else None
        if isinstance(spec, dict) and spec.get("backbone_name"):
            meta["backbone"] = str(spec["backbone_name"])
        ident = _read(pre / "run.json", root, "run").get("identity") if (pre / "run.json").is_file() else None
        model = str(((ident or {}).get("config") or {}).get("model", ""))
        if model:
            from crossmae.models import parse_model_name
            meta["method"], meta["arch"] = parse_model_name(model)
    except (UserError, ValueError, AttributeError):
        pass
    return meta


def _interval(metrics: dict, run_dir: Path, metric_names, resamples: int, seed: int) -> dict:
    """``{metric: (low, high)}``: the percentile bootstrap of one probe run over its images (empty
    when it wrote no per-sample predictions or they do not reproduce its metrics)."""
    from . import bootstrap
    try:
        sc = bootstrap.scorer_for_run(metrics, run_dir)
    except UserError:
        return {}
    if sc is None:
        return {}
    vals = bootstrap.bootstrap_values({"run": sc}, resamples, seed)["run"]
    full = bootstrap.full_values(sc)
    rep = metrics.get("metrics") or {}
    out = {}
    for m in metric_names:
        if m in vals and isinstance(rep.get(m), (int, float)) and abs(full[m] - rep[m]) <= 1e-4:
            out[m] = bootstrap.percentile_interval(vals[m])
    return out


def collect(root: str | os.PathLike, resamples: int = 1000, seed: int = 0, warn=None) -> list[dict]:
    """The curve rows of every watched pretraining under ``root`` (see the module doc), sorted by
    run, probe, metric, epoch. A malformed state or metrics file is skipped with ``warn(msg)``."""
    rows = []
    root = Path(root)
    for wd in find_watches(root):
        pre = wd.parent
        try:
            state = _read(wd / STATE_NAME, root)
        except UserError as exc:
            if warn:
                warn(f"{exc}; skipped")
            continue
        from crossmae.checkpoint import read_snapshots
        try:
            snaps = {e["step"]: e for e in read_snapshots(pre)}
        except UserError as exc:
            if warn:
                warn(f"{exc}; snapshots placed by epoch only")
            snaps = {}
        meta = _run_meta(pre, root)
        entries = state.get("entries") if isinstance(state.get("entries"), dict) else {}
        for e in entries.values():
            if not isinstance(e, dict) or not isinstance(e.get("epoch"), int):
                continue
            comp = snaps.get(e["epoch"], {})
            attempts = e.get("attempts") if isinstance(e.get("attempts"), list) else []
            base = {**meta, "epoch": e["epoch"], "probe": str(e.get("probe", "")), "status": str(e.get("state", "")),
                    "attempts": len(attempts), "error": e.get("error") or "", "pretrain_dir": str(pre)}
            for k in ("images_seen", "wall_time_s", "device_hours", "device_type", "flops"):
                base[k] = comp.get(k)
            last = attempts[-1] if attempts and isinstance(attempts[-1], dict) else {}
            mpath = Path(str(last.get("dir", ""))) / "metrics.json"
            if base["status"] != "done" or not mpath.is_file():
                rows.append({**base, "metric": "", "value": None, "ci_low": None, "ci_high": None, "metrics_path": ""})
                continue
            try:
                m = _read(mpath, root, "metrics")   # the state names the folder: it must lie under root
            except UserError as exc:
                if warn:
                    warn(f"{exc}; skipped")
                continue
            vals = {k: float(v) for k, v in (m.get("metrics") or {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
            ci = _interval(m, mpath.parent, vals, resamples, seed)
            for k, v in vals.items():
                lo, hi = ci.get(k, (None, None))
                rows.append({**base, "metric": k, "value": v, "ci_low": lo, "ci_high": hi, "metrics_path": str(mpath)})
    rows.sort(key=lambda r: (r["backbone"], r["pretrain_dir"], r["probe"], r["metric"], r["epoch"]))
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


def to_csv(rows: list[dict]) -> str:
    """``probe_curves.csv``'s text (:data:`COLUMNS`)."""
    from .render import csv_text
    return csv_text(rows, COLUMNS, _fmt)


def _series(rows: list[dict], drawn=DRAWN) -> dict[tuple, dict[tuple, list[dict]]]:
    """``{(probe, metric): {(backbone, method, pretrain_dir): [done rows by epoch]}}`` of the drawn metrics."""
    done = [r for r in rows if r["status"] == "done" and r["value"] is not None]
    shown = [r for r in done if r["metric"] in drawn] or done
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in shown:
        out[(r["probe"], r["metric"])][(r["backbone"], r["method"], r["pretrain_dir"])].append(r)
    return out


COLORS = {"mae": "#1f77b4", "crossmae": "#ff7f0e"}


def plot(rows: list[dict], path: Path) -> Path:
    """Per drawn (probe, metric): value vs epoch and vs pretraining FLOPs, one line per run, the
    bootstrap interval as a band where known; failed probes as red x at the epoch axis. Atomic."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = _series(rows)
    cells = sorted(series) or [("", "")]
    fig, axes = plt.subplots(len(cells), 2, figsize=(9, 3.2 * len(cells)), squeeze=False)
    for (ax_e, ax_f), cell in zip(axes, cells):
        for (bb, method, _), rs in sorted(series.get(cell, {}).items()):
            rs = sorted(rs, key=lambda r: r["epoch"])
            color = COLORS.get(method, "tab:gray")
            for ax, key in ((ax_e, "epoch"), (ax_f, "flops")):
                pts = [r for r in rs if r.get(key) is not None]
                if not pts:
                    continue
                xs = [float(r[key]) for r in pts]
                ax.plot(xs, [r["value"] for r in pts], "o-", color=color, label=f"{bb} ({method or '?'})")
                band = [r for r in pts if r["ci_low"] is not None]
                if band:
                    ax.fill_between([float(r[key]) for r in band], [r["ci_low"] for r in band],
                                    [r["ci_high"] for r in band], color=color, alpha=0.15)
        failed = [r for r in rows if r["status"] == "failed" and r["probe"] == cell[0]]
        if failed:
            ax_e.plot([r["epoch"] for r in failed], [0.0] * len(failed), "x", color="red", label="failed probe")
        ax_e.set_xlabel("pretraining epoch")
        ax_f.set_xlabel("pretraining FLOPs (fwd+bwd)")
        for ax in (ax_e, ax_f):
            ax.set_title(f"{cell[0]} · {cell[1]}", fontsize=9)
            ax.grid(alpha=0.3)
        if ax_e.get_legend_handles_labels()[0]:
            ax_e.legend(fontsize=7)
    fig.suptitle("Probe per snapshot during pretraining: MAE (blue) vs CrossMAE (orange)", fontsize=9)
    fig.tight_layout()
    return atomic_write_figure(fig, path, dpi=100)


def _svg(title: str, lines: dict, key: str, xlabel: str) -> str:
    """One inline SVG line chart: ``lines`` maps (backbone, method, dir) → rows; x = ``key``."""
    w, h, left, right, top, bottom = 420, 260, 48, 12, 26, 40
    pts = [(float(r[key]), r["value"]) for rs in lines.values() for r in rs if r.get(key) is not None]
    if not pts:
        return ""
    xa, xb = min(p[0] for p in pts), max(p[0] for p in pts)
    ya, yb = min(p[1] for p in pts), max(p[1] for p in pts)
    xb, yb = (xb if xb > xa else xa + 1.0), (yb if yb > ya else ya + 1.0)

    def X(v):
        return left + (v - xa) / (xb - xa) * (w - left - right)

    def Y(v):
        return h - bottom - (v - ya) / (yb - ya) * (h - top - bottom)

    out = [f'<svg class="chart curve" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}"><title>{html.escape(title)}</title>',
           f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="12">{html.escape(title)}</text>',
           f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="#888"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="#888"/>']
    for v, anchor in ((xa, "start"), (xb, "end")):  # inside the chart: a long FLOPs label is never clipped
        out.append(f'<text x="{X(v):.1f}" y="{h - bottom + 14}" text-anchor="{anchor}" font-size="10">{v:.3g}</text>')
    for v in (ya, yb):
        out.append(f'<text x="{left - 4}" y="{Y(v) + 4:.1f}" text-anchor="end" font-size="10">{v:.3g}</text>')
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 8}" text-anchor="middle" font-size="11">'
               f'{html.escape(xlabel)}</text>')
    for i, ((bb, method, _), rs) in enumerate(sorted(lines.items())):
        rs = sorted((r for r in rs if r.get(key) is not None), key=lambda r: float(r[key]))
        color = COLORS.get(method, "#777")
        poly = " ".join(f"{X(float(r[key])):.1f},{Y(r['value']):.1f}" for r in rs)
        out.append(f'<polyline points="{poly}" fill="none" stroke="{color}" stroke-width="2"/>')
        for r in rs:
            out.append(f'<circle cx="{X(float(r[key])):.1f}" cy="{Y(r["value"]):.1f}" r="3" fill="{color}">'
                       f'<title>{html.escape(bb)} epoch {r["epoch"]}: {r["value"]:.4g}</title></circle>')
        label = html.escape(f"{bb} ({method or '?'})")
        out.append(f'<text x="{left + 6}" y="{top + 12 + 13 * i}" font-size="10" fill="{color}">{label}</text>')
    out.append("</svg>")
    return "".join(out)


def html_section(rows: list[dict]) -> str:
    """The curves as an HTML fragment (``<section id="probe-curves">`` with inline SVG charts: per
    drawn probe × metric, value vs epoch and vs pretraining FLOPs, one line per pretraining run;
    then failed probes). Self-contained, no script; ``""`` when there are no rows. For the page of
    ``benchmarks.leaderboard_html``."""
    if not rows:
        return ""
    charts = []
    for (probe, metric), lines in sorted(_series(rows).items()):
        charts.append(_svg(f"{probe} · {metric} vs epoch", lines, "epoch", "pretraining epoch"))
        charts.append(_svg(f"{probe} · {metric} vs FLOPs", lines, "flops", "pretraining FLOPs (fwd+bwd)"))
    failed = [r for r in rows if r["status"] == "failed"]
    fail = "".join(f"<li>{html.escape(r['backbone'])} epoch {r['epoch']} {html.escape(r['probe'])}: failed after "
                   f"{r['attempts']} attempt(s): {html.escape(r['error'])}</li>" for r in failed)
    return ('<section id="probe-curves"><h2>Probes during pretraining (per snapshot)</h2>\n'
            "<p>Each snapshot's probe value (its own metrics.json) against the pretraining epoch and against "
            "the pretraining FLOPs (images seen × forward+backward FLOPs per image). MAE blue, CrossMAE "
            "orange.</p>\n"
            f'<div class="charts">{"".join(c for c in charts if c) or "<p>No finished probe yet.</p>"}</div>\n'
            + (f'<ul class="failed-probes">{fail}</ul>\n' if fail else "") + "</section>\n")


def build(root: str | os.PathLike, out_dir: str | os.PathLike, resamples: int = 1000, seed: int = 0,
          warn=None) -> tuple[dict[str, Path], str]:
    """Write ``probe_curves.csv`` and ``probe_curves.png`` into ``out_dir`` when any pretraining under
    ``root`` was watched. Returns ``(written paths, HTML section)`` — ``({}, "")`` when none was; the
    section goes into ``leaderboard.html`` through ``benchmarks.leaderboard_html.render(curves=...)``."""
    rows = collect(root, resamples, seed, warn)
    if not find_watches(root):
        return {}, ""
    out_dir = Path(out_dir)
    paths = {"curves_csv": out_dir / "probe_curves.csv", "curves_png": out_dir / "probe_curves.png"}
    atomic_write_text(to_csv(rows), paths["curves_csv"])
    plot(rows, paths["curves_png"])
    return paths, html_section(rows)
