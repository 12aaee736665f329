"""``python -m benchmarks.leaderboard OUTPUT_DIR [--out leaderboard.csv]``: the MAE-vs-CrossMAE table.

Built only from the finished tasks' ``metrics.json`` files under ``OUTPUT_DIR`` (never appended to
by running jobs), so it is idempotent and safe while jobs still run. Writes, next to ``--out``
(default ``OUTPUT_DIR/leaderboard.csv``)::

    leaderboard.csv         one row per backbone × task × protocol × config × metric (columns below)
    leaderboard_paired.csv  paired MAE − CrossMAE differences per task × metric (common seeds)
    leaderboard.md          the same as Markdown tables
    leaderboard.png         bar chart, MAE vs CrossMAE per task (headline metrics, mean ± standard error)

Columns of ``leaderboard.csv``: backbone, method, arch, pretrain_epochs, mask_ratio,
prediction_ratio, decoder_depth, task, protocol, config, metric, n_seeds, seeds, mean, stderr
(sample std / sqrt(n); empty for n = 1), reference, diff_to_reference (mean − reference),
reference_source, wall_time_s (sum over seeds), gpu_hours (sum of wall time × GPUs), gpu_type,
checkpoint_sha256, config_hash, code_version (values joined by ``;`` when seeds differ).

Pretraining metadata (method, arch, epochs, mask ratio, prediction ratio, decoder depth) comes from
the backbone checkpoint's ``args`` (``argparse.Namespace`` as written by MAE / CrossMAE's
``main_pretrain.py``): recorded at task time by the dispatcher in ``task_state.json``
(``backbone_meta``), else read from the checkpoint now. The reference column is filled only for
paper-protocol runs (config preset containing ``paper``, or unknown config when the task was not
dispatched by ``slurm.submit``); smoke-suite numbers are never compared to the paper.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

from crossmae.utils import UserError, atomic_write_text, cli_entry

from . import reference

COLUMNS = ["backbone", "method", "arch", "pretrain_epochs", "mask_ratio", "prediction_ratio", "decoder_depth",
           "task", "protocol", "config", "metric", "n_seeds", "seeds", "mean", "stderr", "reference",
           "diff_to_reference", "reference_source", "wall_time_s", "gpu_hours", "gpu_type", "checkpoint_sha256",
           "config_hash", "code_version"]
PAIRED_COLUMNS = ["arch", "task", "protocol", "config", "metric", "mae_backbone", "crossmae_backbone", "n_pairs",
                  "seeds", "mae_mean", "crossmae_mean", "diff_mean", "diff_stderr", "reference_diff"]


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
def _read_json(path: Path) -> dict:
    import json
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable metrics/task file ({exc})")


def collect(root: str | os.PathLike) -> list[dict]:
    """One record per finished transfer task under ``root``: its metrics plus task / backbone info.

    Raises:
        UserError: ``root`` missing, or a metrics file without ``task`` / ``metrics``.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: output folder does not exist")
    meta_cache: dict[str, dict] = {}
    out = []
    for mpath in sorted(root.rglob("metrics.json")):
        rel = mpath.parent.relative_to(root)
        if rel.parts[:1] in (("jobs",), ("pretrain",)) or any(".old-" in p for p in rel.parts):
            continue
        m = _read_json(mpath)
        if "metrics" not in m or "task" not in m:
            raise UserError(f"{mpath}: not a task metrics file (needs 'task' and 'metrics')")
        if m["task"] == "pretrain":
            continue
        spec = _read_json(mpath.parent / "task.json").get("spec", {}) if (mpath.parent / "task.json").is_file() else {}
        state = _read_json(mpath.parent / "task_state.json") if (mpath.parent / "task_state.json").is_file() else {}
        meta = state.get("backbone_meta")
        bb = m.get("backbone")
        if not meta or "error" in meta:
            if bb and bb not in meta_cache:
                try:
                    meta_cache[bb] = pretrain_meta(bb) if Path(bb).is_file() else {}
                except UserError:
                    meta_cache[bb] = {}
            meta = meta_cache.get(bb, {}) if bb else {}
        name = spec.get("backbone_name") or (Path(bb).stem if bb else "unknown")
        out.append({"metrics": m, "spec": spec, "meta": meta or {}, "backbone": name,
                    "task": m["task"], "protocol": m.get("protocol") or spec.get("protocol"),
                    "config": spec.get("config") or m.get("config") or "", "seed": m.get("seed", spec.get("seed")),
                    "path": str(mpath)})
    return out


def _stats(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _join(values) -> str:
    vals = sorted({str(v) for v in values if v not in (None, "")})
    return ";".join(vals)


def rows_from(records: list[dict]) -> list[dict]:
    """Aggregate records into leaderboard rows (see the module doc), sorted."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        for metric, value in (r["metrics"].get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                groups[(r["backbone"], r["task"], r["protocol"] or "", r["config"], metric)].append(
                    dict(r, metric=metric, value=float(value)))
    rows = []
    for (bb, task, protocol, config, metric), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: (r["seed"] is None, r["seed"]))
        meta = rs[0]["meta"]
        mean, se = _stats([r["value"] for r in rs])
        ref = None
        if "paper" in str(config) or not config:
            ref = reference.lookup(task, protocol, metric, meta.get("arch"), meta.get("method"),
                                   meta.get("prediction_ratio"))
        wall = sum(float(r["metrics"].get("wall_time_s") or 0.0) for r in rs)
        gpuh = sum(float(r["metrics"].get("wall_time_s") or 0.0) * float(r["metrics"].get("num_gpus") or 0)
                   for r in rs) / 3600.0
        rows.append({
            "backbone": bb, "method": meta.get("method", ""), "arch": meta.get("arch", ""),
            "pretrain_epochs": meta.get("pretrain_epochs", ""), "mask_ratio": meta.get("mask_ratio", ""),
            "prediction_ratio": meta.get("prediction_ratio", ""), "decoder_depth": meta.get("decoder_depth", ""),
            "task": task, "protocol": protocol, "config": config, "metric": metric, "n_seeds": len(rs),
            "seeds": " ".join(str(r["seed"]) for r in rs), "mean": mean, "stderr": se,
            "reference": ref["value"] if ref else None, "diff_to_reference": mean - ref["value"] if ref else None,
            "reference_source": ref["source"] if ref else "", "wall_time_s": wall, "gpu_hours": gpuh,
            "gpu_type": _join(r["metrics"].get("device") for r in rs),
            "checkpoint_sha256": _join(r["metrics"].get("backbone_sha256") for r in rs),
            "config_hash": _join(r["metrics"].get("config_hash") for r in rs),
            "code_version": _join(r["metrics"].get("code_version") for r in rs),
            "_values": {r["seed"]: r["value"] for r in rs},
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
                out.append(dict(zip(PAIRED_COLUMNS, [*key, a["backbone"], c["backbone"], len(seeds),
                                                     " ".join(map(str, seeds)),
                                                     _stats([a["_values"][s] for s in seeds])[0],
                                                     _stats([c["_values"][s] for s in seeds])[0], dm, dse, rd])))
    return out


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(r.get(c)) for c in columns])
    return buf.getvalue()


def _pm(mean, se, n=None) -> str:
    s = f"{mean:.2f}" + (f" ± {se:.2f}" if se is not None else "")
    return s + (f" (n={n})" if n else "")


def to_markdown(rows: list[dict], pairs: list[dict], root: Path) -> str:
    lines = [f"# Leaderboard: MAE vs CrossMAE", "", f"Built from the finished tasks in `{root}` "
             f"({sum(r['n_seeds'] for r in rows)} task-metric results). Mean ± standard error over seeds.", ""]
    backbones = sorted({r["backbone"] for r in rows})
    if not rows:
        return "\n".join(lines + ["No finished task yet.", ""])
    label = {r["backbone"]: f"{r['backbone']} ({r['method'] or '?'}, γ={_fmt(r['prediction_ratio'])})" for r in rows}
    lines += ["| task | protocol | config | metric | " + " | ".join(label[b] for b in backbones) + " | reference |",
              "|" + "---|" * (5 + len(backbones))]
    cells = defaultdict(dict)
    for r in rows:
        cells[(r["task"], r["protocol"], r["config"], r["metric"])][r["backbone"]] = r
    for key, by_bb in sorted(cells.items(), key=lambda kv: tuple(map(str, kv[0]))):
        vals = [(_pm(by_bb[b]["mean"], by_bb[b]["stderr"], by_bb[b]["n_seeds"]) if b in by_bb else "–") for b in backbones]
        refs = "; ".join(f"{b}: {_fmt(r['reference'])}" for b, r in by_bb.items() if r["reference"] is not None)
        lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(vals) + f" | {refs or '–'} |")
    if pairs:
        lines += ["", "## Paired differences (MAE − CrossMAE, common seeds)", "",
                  "| task | protocol | config | metric | MAE | CrossMAE | n | MAE − CrossMAE | paper diff |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in pairs:
            lines.append(f"| {p['task']} | {p['protocol']} | {p['config']} | {p['metric']} | {p['mae_backbone']} | "
                         f"{p['crossmae_backbone']} | {p['n_pairs']} | {_pm(p['diff_mean'], p['diff_stderr'])} | "
                         f"{_fmt(p['reference_diff']) or '–'} |")
    return "\n".join(lines) + "\n"


#: the metrics drawn in the chart (every metric is in the CSV / Markdown).
HEADLINE = ("top1", "APbox", "APmask", "mIoU")


def plot(rows: list[dict], path: Path) -> Path:
    """Bar chart: one group per task × protocol × headline metric (:data:`HEADLINE`; all metrics
    when none is present), one bar per backbone (mean ± stderr; NaN drawn as missing). Atomic write."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [r for r in rows if r["metric"] in HEADLINE] or rows
    cells = sorted({(r["task"], r["protocol"], r["metric"]) for r in shown}, key=lambda c: tuple(map(str, c)))
    backbones = sorted({r["backbone"] for r in shown})
    fig, ax = plt.subplots(figsize=(min(24.0, max(6.0, 0.9 * len(cells) + 2)), 4.5))
    width = 0.8 / max(1, len(backbones))
    for i, b in enumerate(backbones):
        xs, ys, es = [], [], []
        for j, cell in enumerate(cells):
            r = next((r for r in shown if r["backbone"] == b and (r["task"], r["protocol"], r["metric"]) == cell), None)
            if r and not math.isnan(r["mean"]):
                xs.append(j + i * width)
                ys.append(r["mean"])
                es.append(r["stderr"] or 0.0)
        meth = next((r["method"] for r in shown if r["backbone"] == b), "")
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=f"{b} ({meth})")
    ax.set_xticks([j + (len(backbones) - 1) * width / 2 for j in range(len(cells))])
    ax.set_xticklabels([f"{t} · {m}\n{p}" for t, p, m in cells], fontsize=7, rotation=25, ha="right")
    ax.set_ylabel("metric value")
    ax.set_title("MAE vs CrossMAE per task (mean ± s.e. over seeds)")
    if backbones:
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def build(root: str | os.PathLike, out: str | os.PathLike | None = None) -> dict[str, Path]:
    """Collect, aggregate and write the CSV, paired CSV, Markdown and PNG. Returns their paths.

    Raises:
        UserError: ``root`` missing, an unreadable metrics file, or ``out`` not ending in ``.csv``.
    """
    root = Path(root)
    out = Path(out) if out else root / "leaderboard.csv"
    if out.suffix != ".csv":
        raise UserError(f"--out {out}: must end in .csv")
    rows = rows_from(collect(root))
    pairs = paired(rows)
    paths = {"csv": out, "paired": out.with_name(out.stem + "_paired.csv"), "md": out.with_suffix(".md"),
             "png": out.with_suffix(".png")}
    atomic_write_text(to_csv(rows, COLUMNS), paths["csv"])
    atomic_write_text(to_csv(pairs, PAIRED_COLUMNS), paths["paired"])
    atomic_write_text(to_markdown(rows, pairs, root), paths["md"])
    plot(rows, paths["png"])
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.leaderboard", description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir")
    p.add_argument("--out", default=None, help="CSV path (default OUTPUT_DIR/leaderboard.csv); .md/.png next to it")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    paths = build(args.output_dir, args.out)
    for k, v in paths.items():
        print(f"{k:7s} {v}")
    return paths


if __name__ == "__main__":
    main()
    sys.exit(0)
