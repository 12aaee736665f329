"""``leaderboard.html``: the leaderboard as one self-contained page (no network access needed).

Inline CSS, the data as table cells, inline SVG charts and a few lines of plain JavaScript: a
sortable table (click a header; numeric columns sort by value, empty cells last) of every backbone ×
task × protocol × config × metric with its 95 % bootstrap interval and the reference values (the
paper's, :mod:`benchmarks.reference`, and the zoo's reported ImageNet fine-tune top-1 of a released
backbone), and one chart per task × metric of the paired MAE − CrossMAE difference with its
interval (each on its own axis, so APs and top-1s are never drawn against one scale).
"""
from __future__ import annotations

import html
import math
from pathlib import Path

#: (row key, header, numeric) of the table's columns, in order.
TABLE = [("backbone", "backbone", False), ("method", "method", False), ("arch", "arch", False),
         ("task", "task", False), ("protocol", "protocol", False), ("config", "config", False),
         ("metric", "metric", False), ("n_seeds", "seeds", True), ("mean", "mean", True),
         ("ci_low", "95% low", True), ("ci_high", "95% high", True), ("stderr", "s.e.", True),
         ("reference", "paper", True), ("diff_to_reference", "mean − paper", True),
         ("zoo_reported_ft_top1", "zoo reported FT top-1", True), ("checkpoint_sha256", "sha256", False)]

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
      var c = num ? x - y : String(x).localeCompare(String(y));
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
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 2px 6px; }
th { background: #eee; cursor: pointer; user-select: none; }
th[data-dir=asc]::after { content: ' \\25B2'; } th[data-dir=desc]::after { content: ' \\25BC'; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
.chart { border: 1px solid #ddd; padding: 4px; }
"""


def _num(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


def _show(v, numeric: bool) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def _table(rows: list[dict]) -> str:
    head = "".join(f'<th data-col="{k}" data-num="{int(n)}">{html.escape(h)}</th>' for k, h, n in TABLE)
    body = []
    for r in rows:
        cells = []
        for k, _, n in TABLE:
            v = r.get(k)
            if k == "checkpoint_sha256":
                shown = html.escape(str(v or "")[:12])
                cells.append(f'<td data-v="{html.escape(str(v or ""))}" title="{html.escape(str(v or ""))}">{shown}</td>')
            elif n:
                cells.append(f'<td class="num" data-v="{_num(v)}">{html.escape(_show(v, True))}</td>')
            else:
                cells.append(f'<td data-v="{html.escape(str(v or ""))}">{html.escape(str(v or ""))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table id="leaderboard"><thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(body)
            + "\n</tbody></table>")


def _chart(title: str, pairs: list[dict]) -> str:
    """Horizontal interval plot: one line per backbone pair, the difference as a dot, the 95 %
    interval as a whisker (± s.e. dashed when there is no interval), and the zero line."""
    w, left, right, rh, top = 460, 170, 20, 26, 34
    h = top + rh * len(pairs) + 30
    lo = [p["ci_low"] if _ok(p["ci_low"]) else p["diff_mean"] - (p["diff_stderr"] or 0.0) for p in pairs]
    hi = [p["ci_high"] if _ok(p["ci_high"]) else p["diff_mean"] + (p["diff_stderr"] or 0.0) for p in pairs]
    vals = [v for v in lo + hi + [0.0] if _ok(v)]
    a, b = min(vals), max(vals)
    pad = 0.1 * (b - a) if b > a else 1.0
    a, b = a - pad, b + pad

    def x(v):
        return left + (v - a) / (b - a) * (w - left - right)

    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}"><title>{html.escape(title)}</title>',
           f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="12">{html.escape(title)}</text>',
           f'<line x1="{x(0):.1f}" y1="{top - 6}" x2="{x(0):.1f}" y2="{h - 26}" stroke="#888" stroke-dasharray="3,3"/>']
    for i, p in enumerate(pairs):
        y = top + rh * i + rh / 2
        sig = p.get("excludes_zero") == "yes"
        color = "#c0392b" if sig else "#2c3e50"
        label = f"{p['mae_backbone']} − {p['crossmae_backbone']}"
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{html.escape(label[:32])}</text>')
        dash = "" if _ok(p["ci_low"]) else ' stroke-dasharray="4,2"'
        if _ok(lo[i]) and _ok(hi[i]):
            out.append(f'<line x1="{x(lo[i]):.1f}" y1="{y:.1f}" x2="{x(hi[i]):.1f}" y2="{y:.1f}" stroke="{color}" '
                       f'stroke-width="2"{dash}/>')
        if _ok(p["diff_mean"]):
            out.append(f'<circle class="diff" cx="{x(p["diff_mean"]):.1f}" cy="{y:.1f}" r="4" fill="{color}">'
                       f'<title>{p["diff_mean"]:.3f} [{_show(lo[i], True)}, {_show(hi[i], True)}]</title></circle>')
    for v in (a + pad, 0.0, b - pad):
        out.append(f'<text x="{x(v):.1f}" y="{h - 10}" text-anchor="middle" font-size="10">{v:.3g}</text>')
    out.append("</svg>")
    return "".join(out)


def _ok(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def render(rows: list[dict], pairs: list[dict], root: Path, resamples: int, headline=()) -> str:
    """The whole page as a string (see the module docstring)."""
    shown = [p for p in pairs if p["metric"] in headline] or pairs
    cells: dict[tuple, list[dict]] = {}
    for p in shown:
        cells.setdefault((p["task"], p["protocol"], p["config"], p["metric"]), []).append(p)
    charts = "".join(_chart(f"{t} · {m} ({pr}, {c}): MAE − CrossMAE", ps)
                     for (t, pr, c, m), ps in sorted(cells.items(), key=lambda kv: tuple(map(str, kv[0]))))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Leaderboard: MAE vs CrossMAE</title>"
        f"<style>{_STYLE}</style></head><body>\n<h1>Leaderboard: MAE vs CrossMAE</h1>\n"
        f"<p>Built from the finished tasks in <code>{html.escape(str(root))}</code>. 95 % intervals: "
        f"paired bootstrap over evaluation images and seeds ({resamples} resamples). Click a column "
        f"header to sort.</p>\n{_table(rows)}\n"
        f"<h2>Paired differences (MAE − CrossMAE)</h2>\n<p>Red: the 95 % interval excludes 0; dashed: "
        f"± s.e. over seeds (no per-sample predictions).</p>\n"
        f"<div class=\"charts\">{charts or '<p>No MAE/CrossMAE pair yet.</p>'}</div>\n"
        f"<script>{_SCRIPT}</script>\n</body></html>\n")
