"""leaderboard.html in a real headless browser (Debian's chromium): the table rows, sorting by a
column header click, the per-task difference charts, and that the page needs no network."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from benchmarks.leaderboard import build

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; "
                                                          "`make test` tries it)")


class _Dom(HTMLParser):
    """Rows of table#leaderboard's body (cell texts), and the chart SVGs with their dots."""

    def __init__(self):
        super().__init__()
        self.rows, self.charts, self.dots = [], 0, 0
        self._in_table = self._in_body = False
        self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "leaderboard":
            self._in_table = True
        elif tag == "tbody" and self._in_table:
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = ""
        elif tag == "svg" and "chart" in (a.get("class") or ""):
            self.charts += 1
        elif tag == "circle" and "diff" in (a.get("class") or ""):
            self.dots += 1

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._in_table = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _dump_dom(page: Path, tmp: Path) -> _Dom:
    profile = tmp / f"chromium-profile-{page.stem}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", "--dump-dom", page.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "<table" in out.stdout, out.stderr[-2000:]
    dom = _Dom()
    dom.feed(out.stdout)
    return dom


def _with_clicks(page: Path, headers: list[str], name: str) -> Path:
    """A copy of the page that clicks the given column headers once loaded (as a user would)."""
    clicks = "".join(f"document.querySelector('th[data-col={h}]').click();" for h in headers)
    copy = page.with_name(name)
    copy.write_text(page.read_text().replace("</body>", f"<script>{clicks}</script></body>"))
    return copy


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lbhtml")
    root = tmp / "out"
    rng = np.random.default_rng(0)
    n = 40
    labels = rng.integers(0, 4, n).tolist()
    for name, sha, method, p_ok in (("mae", "a" * 64, "mae", 0.5), ("cmae", "c" * 64, "crossmae", 0.8),
                                    ("cmae2", "d" * 64, "crossmae", 0.3)):
        for task in ("inat", "places"):
            ok = rng.random(n) < p_ok
            first = [l if ok[i] else (l + 1) % 4 for i, l in enumerate(labels)]
            d = root / name / f"{task}-smoke" / "seed0"
            d.mkdir(parents=True)
            (d / "task.json").write_text(json.dumps({"spec": {"backbone_name": name, "config": "smoke"}}))
            (d / "predictions.json").write_text(json.dumps({
                "format": "classification/v1", "images": [f"{i}.jpg" for i in range(n)], "labels": labels,
                "top5": [[f] + [c for c in range(4) if c != f] + [0] for f in first], "scores": [[1, 0, 0, 0, 0]] * n}))
            (d / "metrics.json").write_text(json.dumps({
                "task": task, "protocol": "finetune", "metrics": {"top1": 100.0 * ok.mean(), "top5": 100.0},
                "backbone": f"/c/{name}.pth", "backbone_sha256": sha, "seed": 0, "predictions": "predictions.json",
                "backbone_report": {"sha256": sha, "arch": "vit_base_patch16", "source": f"zoo:{name}",
                                    "meta": {"method": method, "mask_ratio": 0.75, "kept_mask_ratio": 0.75},
                                    **({"zoo": {"reported_ft_top1": 83.6}} if name == "cmae" else {})}}))
    paths = build(root, resamples=300)
    rows = list(csv.DictReader(paths["csv"].open()))
    pairs = list(csv.DictReader(paths["paired"].open()))
    return tmp, paths["html"], rows, pairs


def test_page_is_self_contained(board):
    _, page, _, _ = board
    text = page.read_text()
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|\bhref=|@import|url\(", text)
    assert [u for u in re.findall(r"https?://[^\s\"'<>]+", text) if u != "http://www.w3.org/2000/svg"] == []


def test_table_rows_charts_and_sorting_in_chromium(board):
    tmp, page, rows, pairs = board
    dom = _dump_dom(page, tmp)
    # every backbone × task × metric of the CSV, in the CSV's order, with its interval
    cols = ["backbone", "method", "arch", "task", "protocol", "config", "metric"]
    assert [r[:7] for r in dom.rows] == [[r[c] for c in cols] for r in rows]
    assert len(dom.rows) == 3 * 2 * 2
    assert all(r[9] and r[10] for r in dom.rows)  # 95 % low / high present for every row
    zoo = [r[14] for r in dom.rows if r[0] == "cmae"]
    assert zoo and set(zoo) == {"83.60"}
    # one chart per task × headline metric, one dot per MAE/CrossMAE pair in it
    top1_pairs = [p for p in pairs if p["metric"] == "top1"]
    assert dom.charts == 2 and dom.dots == len(top1_pairs) == 4

    mean = [float(r[8]) for r in dom.rows]
    up = _dump_dom(_with_clicks(page, ["mean"], "asc.html"), tmp)
    asc = [float(r[8]) for r in up.rows]
    assert asc == sorted(mean) and asc != mean
    assert sorted(map(tuple, up.rows)) == sorted(map(tuple, dom.rows))  # reordered, nothing lost
    down = _dump_dom(_with_clicks(page, ["mean", "mean"], "desc.html"), tmp)
    assert [float(r[8]) for r in down.rows] == sorted(mean, reverse=True)
    by_name = _dump_dom(_with_clicks(page, ["backbone"], "name.html"), tmp)
    names = [r[0] for r in by_name.rows]
    assert names == sorted(names) and names[:4] == ["cmae"] * 4
