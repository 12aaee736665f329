"""``leaderboard.html``: the leaderboard as one self-contained page (no network access needed).

Inline CSS, the data as table cells, inline SVG charts and a few lines of plain JavaScript. In order:

1. **The comparison** (``table#comparison``): one row per task × protocol × config × headline metric
   (top-1, its best epoch ``top1_best`` where the runs record it, APbox, APmask, mIoU) and MAE/CrossMAE
   backbone pair: each method's value (mean over the common seeds, with its 95 % interval), the paired
   difference MAE − CrossMAE with its 95 % paired-bootstrap interval (marked ✱ when it excludes 0), and
   the paper's difference where the paper has both numbers, labelled with the statistic it is
   (final or best epoch; :func:`benchmarks.reference.statistic_of`: a final-epoch row is never given a
   best-epoch paper number). A cell with only one method's runs is one row with a value and no
   difference.
2. **The probe curves** (``curves=``, the section made by the probe-curves module), when given.
3. **The full table** (``table#leaderboard``), sortable by clicking a header (numeric columns by
   value, empty cells last): every backbone × task × protocol × config × metric with its interval
   and the references (the paper's, :mod:`benchmarks.reference`, with its statistic; the zoo's
   reported ImageNet fine-tune top-1 of a released backbone). Numbers in their metric's format
   (:func:`benchmarks.render.fmt_metric`: percentages 2 decimals, losses scientific, times 1 decimal).
4. **The difference charts**: one per task × headline metric, each on its own axis.
5. The data as JSON (``script#leaderboard-data``, ``{"rows": [...], "pairs": [...]}``, the CSVs'
   columns; non-finite numbers as ``"nan"`` / ``"inf"``), for scripts reading the page.

Every value from the runs' files is escaped for where it lands (:mod:`benchmarks.render`): text,
double-quoted attribute, inline JSON. A numeric place shows only a real number (a string or a bool
there is shown as empty), a non-finite one as ``nan`` / ``inf`` (never drawn on an axis).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from . import reference
from .render import fmt_metric, fmt_number, html_attr, html_text, is_finite, script_json, sort_key

#: (row key, header, numeric) of the full table's columns, in order.
TABLE = [("backbone", "backbone", False), ("method", "method", False), ("arch", "arch", False),
         ("task", "task", False), ("protocol", "protocol", False), ("config", "config", False),
         ("metric", "metric", False), ("n_seeds", "seeds", True), ("mean", "mean", True),
         ("ci_low", "95% low", True), ("ci_high", "95% high", True), ("stderr", "s.e.", True),
         ("reference", "paper", True), ("reference_statistic", "paper statistic", False),
         ("diff_to_reference", "mean − paper", True), ("zoo_reported_ft_top1", "zoo reported FT top-1", True),
         ("checkpoint_sha256", "sha256", False)]
#: full-table columns in the row's metric format (the others: n_seeds a count, the zoo top-1 a percentage).
_METRIC_COLUMNS = {"mean", "ci_low", "ci_high", "stderr", "reference", "diff_to_reference"}
#: (header, class) of the comparison's columns, in order.
COMPARISON = [("task", ""), ("protocol", ""), ("config", ""), ("metric", ""), ("statistic", ""), ("MAE", "num"),
              ("CrossMAE", "num"), ("seeds", "num"), ("MAE − CrossMAE", "num"), ("95% interval", "num"),
              ("paper MAE − CrossMAE", "num")]

_SCRIPT = """
(function () {
  var table = document.getElementById('leaderboard');
  var heads = table.tHead.rows[0].cells;
  function key(td, num) {
    var v = td.getAttribute('data-v');
    if (num) { return v === '' ? null : parseFloat(v); }
    return v;
  }
  function sortBy(col) {
    var th = heads[col], num = th.getAttribute('data-num') === '1';
    var dir = th.getAttribute('data-dir') === 'asc' ? 'desc' : 'asc';
    for (var i = 0; i < heads.length; i++) { heads[i].removeAttribute('data-dir'); }
    th.setAttribute('data-dir', dir);
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[col], num), y = key(b.cells[col], num);
      if (x === null || y === null) { return (x === null) - (y === null); }
      var c = num ? (x === y ? 0 : x - y) : String(x).localeCompare(String(y));
      return dir === 'asc' ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  for (var i = 0; i < heads.length; i++) {
    heads[i].addEventListener('click', (function (c) { return function () { sortBy(c); }; })(i));
  }
})();
"""

_STYLE = """
body { font-family: sans-serif; font-size: 13px; margin: 1.5em; }
table { border-collapse: collapse; margin-bottom: 1em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; }
th { background: #eee; }
#leaderboard th { cursor: pointer; user-select: none; }
th[data-dir=asc]::after { content: ' \\25B2'; } th[data-dir=desc]::after { content: ' \\25BC'; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.sig { color: #c0392b; font-weight: bold; }
.bb { color: #555; font-size: 11px; } .ci { color: #555; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
.chart { border: 1px solid #ddd; padding: 4px; }
"""


# --------------------------------------------------------------------------------------------------
# the comparison
# --------------------------------------------------------------------------------------------------
def comparison_metrics(headline) -> list[str]:
    """The comparison's metrics in order: each headline metric followed by its best-epoch statistic
    (``top1`` then ``top1_best``), which the paper's classification numbers are compared with."""
    out = []
    for m in headline:
        out += [m, f"{m}_best"]
    return out


def comparison(rows: list[dict], pairs: list[dict], headline) -> list[dict]:
    """The comparison's rows (see the module doc), in task / protocol / config / metric order.

    Each: ``task``, ``protocol``, ``config``, ``metric``, ``statistic`` (label), ``mae`` and
    ``crossmae`` (lists of ``(backbone, value, ci_low, ci_high)``), ``n`` (common seeds, None when
    unpaired), ``diff``, ``ci_low``, ``ci_high``, ``excludes_zero``, ``paper_diff``,
    ``paper_statistic``. Only MAE/CrossMAE rows take part (other methods are in the full table)."""
    metrics = comparison_metrics(headline)
    order = {m: i for i, m in enumerate(metrics)}
    cells: dict[tuple, dict] = defaultdict(lambda: {"rows": [], "pairs": []})
    for r in rows:
        if r["metric"] in order and r["method"] in ("mae", "crossmae"):
            cells[(r["task"], r["protocol"], r["config"], r["metric"])]["rows"].append(r)
    for p in pairs:
        if p["metric"] in order:
            cells[(p["task"], p["protocol"], p["config"], p["metric"])]["pairs"].append(p)

    def side(name, value, row, n):
        if row is not None and row["n_seeds"] == n and is_finite(row.get("ci_low")):
            return name, value, row["ci_low"], row["ci_high"]
        return name, value, None, None

    out = []
    for key in sorted(cells, key=lambda k: (str(k[0]), str(k[1]), str(k[2]), order[k[3]])):
        c = cells[key]
        base = dict(zip(("task", "protocol", "config", "metric"), key),
                    statistic=reference.STATISTIC_LABEL[reference.statistic_of(key[3])[1]])
        shown = set()
        for p in c["pairs"]:
            a, b = p.get("_rows") or (None, None)
            shown.update(id(x) for x in (a, b) if x is not None)
            out.append(dict(base, mae=[side(p["mae_backbone"], p["mae_mean"], a, p["n_pairs"])],
                            crossmae=[side(p["crossmae_backbone"], p["crossmae_mean"], b, p["n_pairs"])],
                            n=p["n_pairs"], diff=p["diff_mean"], ci_low=p["ci_low"], ci_high=p["ci_high"],
                            excludes_zero=p["excludes_zero"] == "yes", paper_diff=p["reference_diff"],
                            paper_statistic=p.get("reference_statistic", "")))
        rest = [r for r in c["rows"] if id(r) not in shown]
        if rest:
            mae = [r for r in rest if r["method"] == "mae"]
            cmae = [r for r in rest if r["method"] == "crossmae"]
            pd, ps = None, ""
            if len(mae) == 1 and len(cmae) == 1 and mae[0]["reference"] is not None \
                    and cmae[0]["reference"] is not None:
                pd, ps = mae[0]["reference"] - cmae[0]["reference"], mae[0]["reference_statistic"]
            out.append(dict(base, mae=[side(r["backbone"], r["mean"], r, r["n_seeds"]) for r in mae],
                            crossmae=[side(r["backbone"], r["mean"], r, r["n_seeds"]) for r in cmae],
                            n=None, diff=None, ci_low=None, ci_high=None, excludes_zero=False,
                            paper_diff=pd, paper_statistic=ps))
    return out


def _interval(lo, hi, metric) -> str:
    return f"[{fmt_metric(lo, metric)}, {fmt_metric(hi, metric)}]" if is_finite(lo) and is_finite(hi) else ""


def _comparison_table(entries: list[dict]) -> str:
    head = "".join(f"<th>{html_text(h)}</th>" for h, _ in COMPARISON)
    body = []
    for e in entries:
        m = e["metric"]

        def values(side):
            return "<br>".join(f'<span class="bb">{html_text(name)}</span> <span class="val">'
                               f'{html_text(fmt_metric(v, m))}</span> <span class="ci">{html_text(_interval(lo, hi, m))}'
                               f'</span>' for name, v, lo, hi in side) or "–"

        sig = ' sig' if e["excludes_zero"] else ""
        diff = fmt_metric(e["diff"], m) + (" ✱" if e["excludes_zero"] else "") if e["diff"] is not None else "–"
        paper = (f"{fmt_metric(e['paper_diff'], m)} ({e['paper_statistic']})" if e["paper_diff"] is not None
                 else "–")
        cells = [html_text("" if e[k] is None else e[k]) for k in ("task", "protocol", "config", "metric", "statistic")]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells)
                    + f'<td class="num">{values(e["mae"])}</td><td class="num">{values(e["crossmae"])}</td>'
                    + f'<td class="num">{html_text(fmt_number(e["n"]) or "–")}</td>'
                    + f'<td class="num{sig}">{html_text(diff)}</td>'
                    + f'<td class="num{sig}">{html_text(_interval(e["ci_low"], e["ci_high"], m) or "–")}</td>'
                    + f'<td class="num">{html_text(paper)}</td></tr>')
    if not body:
        return "<p>No MAE or CrossMAE result for a headline metric yet.</p>"
    return (f'<table id="comparison"><thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(body)
            + "\n</tbody></table>")


# --------------------------------------------------------------------------------------------------
# the full table
# --------------------------------------------------------------------------------------------------
def _table(rows: list[dict]) -> str:
    head = "".join(f'<th data-col="{html_attr(k)}" data-num="{int(n)}">{html_text(h)}</th>' for k, h, n in TABLE)
    body = []
    for r in rows:
        cells = []
        for k, _, n in TABLE:
            v = r.get(k)
            if k == "checkpoint_sha256":
                full = "" if v is None else str(v)
                cells.append(f'<td data-v="{html_attr(full)}" title="{html_attr(full)}">{html_text(full[:12])}</td>')
            elif n:
                shown = (fmt_metric(v, r["metric"]) if k in _METRIC_COLUMNS
                         else fmt_number(v, "percent") if k == "zoo_reported_ft_top1" else fmt_number(v))
                cells.append(f'<td class="num" data-v="{html_attr(sort_key(v))}">{html_text(shown)}</td>')
            else:
                text = "" if v is None else str(v)
                cells.append(f'<td data-v="{html_attr(text)}">{html_text(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table id="leaderboard"><thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(body)
            + "\n</tbody></table>")


# --------------------------------------------------------------------------------------------------
# the difference charts
# --------------------------------------------------------------------------------------------------
def _chart(title: str, metric: str, pairs: list[dict]) -> str:
    """Horizontal interval plot: one line per backbone pair, the difference as a dot, the 95 %
    interval as a whisker (± s.e. dashed when there is no interval), and the zero line. A
    non-finite difference gets no dot and takes no part in the axis."""
    w, left, right, rh, top = 460, 170, 20, 26, 34
    h = top + rh * len(pairs) + 30

    def end(p, k, sign):
        if is_finite(p[k]):
            return p[k]
        se = p["diff_stderr"] if is_finite(p["diff_stderr"]) else 0.0
        return p["diff_mean"] + sign * se if is_finite(p["diff_mean"]) else None

    lo = [end(p, "ci_low", -1) for p in pairs]
    hi = [end(p, "ci_high", 1) for p in pairs]
    vals = [v for v in lo + hi + [0.0] if is_finite(v)]
    a, b = min(vals), max(vals)
    pad = 0.1 * (b - a) if b > a else 1.0
    a, b = a - pad, b + pad

    def x(v):
        return left + (v - a) / (b - a) * (w - left - right)

    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}"><title>{html_text(title)}</title>',
           f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="12">{html_text(title)}</text>',
           f'<line x1="{x(0):.1f}" y1="{top - 6}" x2="{x(0):.1f}" y2="{h - 26}" stroke="#888" stroke-dasharray="3,3"/>']
    for i, p in enumerate(pairs):
        y = top + rh * i + rh / 2
        sig = p.get("excludes_zero") == "yes"
        color = "#c0392b" if sig else "#2c3e50"
        label = f"{p['mae_backbone']} − {p['crossmae_backbone']}"
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{html_text(label[:32])}</text>')
        dash = "" if is_finite(p["ci_low"]) else ' stroke-dasharray="4,2"'
        if is_finite(lo[i]) and is_finite(hi[i]):
            out.append(f'<line x1="{x(lo[i]):.1f}" y1="{y:.1f}" x2="{x(hi[i]):.1f}" y2="{y:.1f}" stroke="{color}" '
                       f'stroke-width="2"{dash}/>')
        if is_finite(p["diff_mean"]):
            out.append(f'<circle class="diff" cx="{x(p["diff_mean"]):.1f}" cy="{y:.1f}" r="4" fill="{color}">'
                       f'<title>{html_text(fmt_metric(p["diff_mean"], metric))} '
                       f'{html_text(_interval(lo[i], hi[i], metric))}</title></circle>')
        else:
            out.append(f'<text x="{left + 4}" y="{y + 4:.1f}" font-size="11" fill="#c0392b">'
                       f'{html_text(fmt_metric(p["diff_mean"], metric))}</text>')
    for v in (a + pad, 0.0, b - pad):
        out.append(f'<text x="{x(v):.1f}" y="{h - 10}" text-anchor="middle" font-size="10">{v:.3g}</text>')
    out.append("</svg>")
    return "".join(out)


def _public(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_") and k != "backbone_key"}


def render(rows: list[dict], pairs: list[dict], root: Path, resamples: int, headline=(),
           curves: str | None = None) -> str:
    """The whole page as a string (see the module docstring).

    Args:
        rows, pairs: the leaderboard's rows and MAE − CrossMAE pairs (``benchmarks.leaderboard``).
        root: the runs folder the page was built from (shown). resamples: bootstrap resamples (shown).
        headline: the comparison's and charts' metrics (``benchmarks.leaderboard.HEADLINE``).
        curves: HOOK for the probe-curves section: ready HTML (a ``<section>``) placed after the
            comparison and before the full table; None leaves it out. Whoever makes it escapes
            every value in it with :mod:`benchmarks.render` (this function inserts it as given).
    """
    shown = [p for p in pairs if p["metric"] in headline] or pairs
    cells: dict[tuple, list[dict]] = {}
    for p in shown:
        cells.setdefault((p["task"], p["protocol"], p["config"], p["metric"]), []).append(p)
    charts = "".join(_chart(f"{t} · {m} ({pr}, {c}): MAE − CrossMAE", m, ps)
                     for (t, pr, c, m), ps in sorted(cells.items(), key=lambda kv: tuple(map(str, kv[0]))))
    data = script_json({"rows": [_public(r) for r in rows], "pairs": [_public(p) for p in pairs]})
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Leaderboard: MAE vs CrossMAE</title>"
        f"<style>{_STYLE}</style></head><body>\n<h1>Leaderboard: MAE vs CrossMAE</h1>\n"
        f"<p>Built from the finished tasks in <code>{html_text(root)}</code>. 95 % intervals: "
        f"paired bootstrap over evaluation images and seeds ({resamples} resamples).</p>\n"
        f"<h2>MAE vs CrossMAE</h2>\n<p>One row per task × headline metric and MAE/CrossMAE pair: each "
        f"method's mean over the common seeds [95 % interval], the paired difference MAE − CrossMAE (red ✱: "
        f"its interval excludes 0) and the paper's difference, labelled with the statistic it is (final or "
        f"best epoch; top1 is the final epoch, top1_best the best one).</p>\n"
        f"{_comparison_table(comparison(rows, pairs, headline))}\n"
        # HOOK(curves): the probe-curves section (benchmarks.curves) goes here, see `curves` above.
        f"{curves or ''}\n"
        f"<h2>Every result</h2>\n<p>Click a column header to sort.</p>\n{_table(rows)}\n"
        f"<h2>Paired differences (MAE − CrossMAE)</h2>\n<p>Red: the 95 % interval excludes 0; dashed: "
        f"± s.e. over seeds (no per-sample predictions).</p>\n"
        f"<div class=\"charts\">{charts or '<p>No MAE/CrossMAE pair yet.</p>'}</div>\n"
        f"<script type=\"application/json\" id=\"leaderboard-data\">{data}</script>\n"
        f"<script>{_SCRIPT}</script>\n</body></html>\n")
