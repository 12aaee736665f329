"""leaderboard.html in a real headless browser (Debian's chromium): the table rows, sorting by a
column header click, the per-task difference charts, and that the page needs no network."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from benchmarks.leaderboard import build
from browser import PageDom, dump_dom, needs_chromium

pytestmark = needs_chromium


def _dump_dom(page: Path, tmp: Path, script: str = "") -> PageDom:
    return PageDom(dump_dom(page, tmp, script))


class _Dom:
    """table#leaderboard's body rows (cell texts) and the charts of a dumped page."""

    def __init__(self, page: PageDom):
        self.page, self.rows = page, page.tables["leaderboard"]["rows"]
        self.charts, self.dots = page.charts, page.dots


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
    dom = _Dom(_dump_dom(page, tmp))
    # every backbone × task × metric of the CSV, in the CSV's order, with its interval
    cols = ["backbone", "method", "arch", "task", "protocol", "config", "metric"]
    assert [r[:7] for r in dom.rows] == [[r[c] for c in cols] for r in rows]
    assert len(dom.rows) == 3 * 2 * 2
    assert all(r[9] and r[10] for r in dom.rows)  # 95 % low / high present for every row
    zoo = [z for b, z in zip(dom.page.column("leaderboard", "backbone"),
                             dom.page.column("leaderboard", "zoo reported FT top-1")) if b == "cmae"]
    assert zoo and set(zoo) == {"83.60"}
    # one chart per task × headline metric, one dot per MAE/CrossMAE pair in it
    top1_pairs = [p for p in pairs if p["metric"] == "top1"]
    assert dom.charts == 2 and dom.dots == len(top1_pairs) == 4

    mean = [float(r[8]) for r in dom.rows]
    up = _Dom(_dump_dom(_with_clicks(page, ["mean"], "asc.html"), tmp))
    asc = [float(r[8]) for r in up.rows]
    assert asc == sorted(mean) and asc != mean
    assert sorted(map(tuple, up.rows)) == sorted(map(tuple, dom.rows))  # reordered, nothing lost
    down = _Dom(_dump_dom(_with_clicks(page, ["mean", "mean"], "desc.html"), tmp))
    assert [float(r[8]) for r in down.rows] == sorted(mean, reverse=True)
    by_name = _Dom(_dump_dom(_with_clicks(page, ["backbone"], "name.html"), tmp))
    names = [r[0] for r in by_name.rows]
    assert names == sorted(names) and names[:4] == ["cmae"] * 4


# --------------------------------------------------------------------------------------------------
# the page opens on the comparison (issue 17): one row per task × headline metric, then the full
# table with numbers formatted per metric
# --------------------------------------------------------------------------------------------------
def _run(root: Path, name: str, sha: str, method: str, task: str, protocol: str, config: str, seed: int,
         metrics: dict, predictions: dict | None = None) -> None:
    d = root / name / f"{task}-{config}" / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "task.json").write_text(json.dumps({"spec": {"backbone_name": name, "config": config, "seed": seed}}))
    m = {"task": task, "protocol": protocol, "metrics": metrics, "backbone_sha256": sha, "seed": seed,
         "backbone_report": {"sha256": sha, "arch": "vit_base_patch16",
                             "meta": {"method": method, "mask_ratio": 0.75, "kept_mask_ratio": 0.75}}}
    if predictions is not None:
        (d / "predictions.json").write_text(json.dumps(predictions))
        m["predictions"] = "predictions.json"
    (d / "metrics.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def compare_board(tmp_path_factory):
    """MAE and CrossMAE on: iNat (2 seeds, per-image predictions: intervals; MAE top-1 29.4 and 29.6,
    s.e. 0.1, and a loss of ~0.0006), the paper fine-tune (top1 = final epoch, top1_best = best
    epoch: only the latter has a paper number), COCO (APbox, APmask) and ADE20K (MAE only)."""
    tmp = tmp_path_factory.mktemp("lbcompare")
    root = tmp / "out"
    n, rng = 500, np.random.default_rng(1)
    labels = rng.integers(0, 4, n).tolist()
    for name, sha, method, hits in (("mae", "a" * 64, "mae", 147), ("cmae", "c" * 64, "crossmae", 160)):
        for seed in (0, 1):
            ok = np.zeros(n, bool)
            ok[rng.permutation(n)[:hits + seed]] = True  # top-1 29.4 / 29.6 (MAE): s.e. 0.1
            first = [l if ok[i] else (l + 1) % 4 for i, l in enumerate(labels)]
            top1 = 100.0 * ok.mean()
            pred = {"format": "classification/v1", "images": [f"{i}.jpg" for i in range(n)], "labels": labels,
                    "top5": [[f] + [c for c in range(4) if c != f] + [0] for f in first], "scores": [[1, 0, 0, 0, 0]] * n}
            _run(root, name, sha, method, "inat", "finetune", "smoke", seed,
                 {"top1": top1, "top5": 100.0, "loss": 0.0006062 + 1e-7 * seed}, pred)
        _run(root, name, sha, method, "finetune", "finetune", "paper_vit_base", 0,
             {"top1": 83.0 if method == "mae" else 83.1, "top1_best": 83.2 if method == "mae" else 83.6})
        _run(root, name, sha, method, "coco", "vitdet", "smoke", 0,
             {"APbox": 10.0 if method == "mae" else 10.5, "APmask": 9.0 if method == "mae" else 9.25,
              "bbox/AP50": 20.0})
    _run(root, "mae", "a" * 64, "mae", "ade20k", "upernet", "smoke", 0, {"mIoU": 40.125, "aAcc": 70.0})
    paths = build(root, resamples=200)
    rows = list(csv.DictReader(paths["csv"].open()))
    pairs = list(csv.DictReader(paths["paired"].open()))
    return tmp, paths["html"], rows, pairs


def test_page_opens_on_the_comparison_in_chromium(compare_board):
    tmp, page, rows, pairs = compare_board
    dom = _dump_dom(page, tmp)
    assert dom.order[:2] == ["comparison", "leaderboard"]  # the comparison comes first
    comp = dom.tables["comparison"]
    assert comp["head"][:5] == ["task", "protocol", "config", "metric", "statistic"]
    col = {h: dom.column("comparison", h) for h in comp["head"]}
    # one row per task × headline metric (top1 with its best epoch, APbox, APmask, mIoU), in order
    assert list(zip(col["task"], col["metric"])) == [
        ("ade20k", "mIoU"), ("coco", "APbox"), ("coco", "APmask"), ("finetune", "top1"), ("finetune", "top1_best"),
        ("inat", "top1")]
    assert col["statistic"] == ["final epoch"] * 4 + ["best epoch", "final epoch"]
    by = {(t, m): i for i, (t, m) in enumerate(zip(col["task"], col["metric"]))}
    for p in pairs:
        if p["metric"] not in ("top1", "top1_best", "APbox", "APmask", "mIoU"):
            continue
        i = by[(p["task"], p["metric"])]
        # each method's value (backbone name and mean), the paired difference and its interval
        assert col["MAE"][i].startswith(f"mae {float(p['mae_mean']):.2f}")
        assert col["CrossMAE"][i].startswith(f"cmae {float(p['crossmae_mean']):.2f}")
        assert col["seeds"][i] == p["n_pairs"]
        assert col["MAE − CrossMAE"][i].rstrip(" ✱") == f"{float(p['diff_mean']):.2f}"
        want_ci = f"[{float(p['ci_low']):.2f}, {float(p['ci_high']):.2f}]" if p["ci_low"] else "–"
        assert col["95% interval"][i] == want_ci
        assert col["MAE − CrossMAE"][i].endswith("✱") == (p["excludes_zero"] == "yes")
    inat = by[("inat", "top1")]
    assert re.fullmatch(r"mae \d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\]", col["MAE"][inat])  # with its own interval
    assert col["95% interval"][inat] != "–"
    # the paper's difference only where the paper has the statistic: MAE 83.3 − CrossMAE(γ 0.75) 83.7,
    # a best-epoch number, on the best-epoch row; never on the final-epoch top1 row
    assert col["paper MAE − CrossMAE"][by[("finetune", "top1_best")]] == "-0.40 (best epoch)"
    assert col["paper MAE − CrossMAE"][by[("finetune", "top1")]] == "–"
    # a task with one method only: its value, no difference
    ade = by[("ade20k", "mIoU")]
    assert col["MAE"][ade].startswith("mae 40.12") and col["CrossMAE"][ade] == "–" and col["MAE − CrossMAE"][ade] == "–"


def test_full_table_numbers_formatted_per_metric_in_chromium(compare_board):
    tmp, page, rows, _ = compare_board
    dom = _dump_dom(page, tmp)
    assert len(dom.tables["leaderboard"]["rows"]) == len(rows)
    metric = dom.column("leaderboard", "metric")
    numeric = ["mean", "95% low", "95% high", "s.e.", "paper", "mean − paper"]
    cols = {h: dom.column("leaderboard", h) for h in numeric}
    percent = re.compile(r"-?\d+\.\d\d")
    seen = set()
    for i, m in enumerate(metric):
        cells = [cols[h][i] for h in numeric if cols[h][i]]
        if m == "loss":  # a loss in its own format, never beside percentages in theirs
            assert cells and all(re.fullmatch(r"\d\.\d{3}e-\d\d", c) for c in cells), cells
        else:  # every percentage (top-1, AP, mIoU, aAcc) with 2 decimals, s.e. and interval included
            assert cells and all(percent.fullmatch(c) for c in cells), (m, cells)
        seen.add(m)
    assert {"loss", "top1", "top5", "APbox", "bbox/AP50", "mIoU", "aAcc"} <= seen
    inat_se = [s for s, m, t in zip(cols["s.e."], metric, dom.column("leaderboard", "task"))
               if (t, m) == ("inat", "top1")]
    assert inat_se == ["0.10", "0.10"]  # not "0.1" beside "29.50"
    assert dom.column("leaderboard", "paper statistic")[metric.index("top1_best")] == "best epoch"
