"""Hostile files, cause "non-finite values" (issue 18): a metric that is NaN or ±Infinity in a
``metrics.json`` (JSON as Python writes it), and names that matplotlib would parse as mathtext.

The board is still built (exit 0) and every output written; the value is shown as ``nan`` / ``inf`` /
``-inf`` (CSV, Markdown, HTML), never drawn on an axis, and has no interval: the runs' per-image
predictions do not reproduce it, and no interval is ever made of it. The other backbones keep theirs.

Cases (each fails on the main before this change):
  1-3. a headline metric +inf / -inf / NaN (with per-image predictions for both backbones): built, PNG
       written, value shown, its row and pair without an interval, the other row with one
  4.   one seed NaN among finite seeds: the mean is NaN, no s.e., no interval
  5.   a non-finite zoo reported top-1: ignored with a warning
  6-8. display names (and a task name) ``$x^$``, ``$\\frac{a}{$``, ``run$_$1``: PNG written, names drawn
       as plain text
  9.   the HTML table sorts ±inf as numbers and NaN last, in the real browser
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.leaderboard import main as lb_main
from browser import PageDom, dump_dom, needs_chromium

N = 60
LABELS = np.random.default_rng(0).integers(0, 4, N).tolist()


def _run(root: Path, name: str, sha: str, method: str, metrics: dict, *, task: str = "inat", seed: int = 0,
         hits: int | None = None, zoo=None) -> None:
    d = root / name / f"{task}-smoke" / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "task.json").write_text(json.dumps({"spec": {"backbone_name": name, "config": "smoke", "seed": seed}}))
    m = {"task": task, "protocol": "finetune", "metrics": metrics, "backbone_sha256": sha, "seed": seed,
         "backbone_report": {"sha256": sha, "arch": "vit_base_patch16",
                             "meta": {"method": method, "mask_ratio": 0.75, "kept_mask_ratio": 0.75},
                             **({"zoo": {"reported_ft_top1": zoo}} if zoo is not None else {})}}
    if hits is not None:  # per-image predictions: the first `hits` images right
        first = [lab if i < hits else (lab + 1) % 4 for i, lab in enumerate(LABELS)]
        (d / "predictions.json").write_text(json.dumps({
            "format": "classification/v1", "images": [f"{i}.jpg" for i in range(N)], "labels": LABELS,
            "top5": [[f] + [c for c in range(4) if c != f] + [0] for f in first], "scores": [[1, 0, 0, 0, 0]] * N}))
        m["predictions"] = "predictions.json"
    (d / "metrics.json").write_text(json.dumps(m))  # json writes NaN / Infinity / -Infinity


def _build(root: Path, capsys) -> tuple[dict, dict, str]:
    paths = lb_main([str(root), "--resamples", "200"])  # returns (no SystemExit) when it succeeds
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for k in ("csv", "paired", "md", "png", "html"):
        assert paths[k].is_file(), k
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return paths, {(r["backbone"], r["metric"]): r for r in csv.DictReader(paths["csv"].open())}, err


@pytest.mark.parametrize("value,shown", [(math.inf, "inf"), (-math.inf, "-inf"), (math.nan, "nan")])
def test_nonfinite_metric_is_shown_and_has_no_interval(tmp_path, capsys, value, shown):
    _run(tmp_path, "mae", "a" * 64, "mae", {"top1": value, "APs": math.nan}, hits=30)
    _run(tmp_path, "cmae", "c" * 64, "crossmae", {"top1": 100.0 * 40 / N}, hits=40)
    paths, rows, err = _build(tmp_path, capsys)
    bad, good = rows[("mae", "top1")], rows[("cmae", "top1")]
    assert (bad["mean"], bad["stderr"], bad["ci_low"], bad["ci_high"]) == (shown, "", "", "")
    assert rows[("mae", "APs")]["mean"] == "nan"
    assert good["ci_low"] and good["ci_high"] and float(good["ci_low"]) <= float(good["mean"]) <= float(good["ci_high"])
    assert "no interval" in err  # the predictions (50.00) do not reproduce the file's value
    pair = next(csv.DictReader(paths["paired"].open()))
    want = {"inf": "inf", "-inf": "-inf", "nan": "nan"}[shown]
    assert (pair["diff_mean"], pair["ci_low"], pair["ci_high"], pair["excludes_zero"]) == (want, "", "", "")
    md = paths["md"].read_text()
    assert f"| {shown} (n=1) |" in md and f"| {want} | – |" in md
    dom = PageDom(paths["html"].read_text())
    assert dom.column("comparison", "MAE") == [f"mae {shown} "]
    assert dom.column("comparison", "MAE − CrossMAE") == [want] and dom.column("comparison", "95% interval") == ["–"]
    means = dict(zip(zip(dom.column("leaderboard", "backbone"), dom.column("leaderboard", "metric")),
                     dom.column("leaderboard", "mean")))
    assert means[("mae", "top1")] == shown and means[("mae", "APs")] == "nan"
    data = json.loads(dom.by_id["leaderboard-data"])  # strict JSON: the non-finite value by name
    assert {r["metric"]: r["mean"] for r in data["rows"] if r["backbone"] == "mae"}["top1"] == shown


def test_one_nonfinite_seed_makes_the_mean_nonfinite_without_error_bars(tmp_path, capsys):
    _run(tmp_path, "mae", "a" * 64, "mae", {"top1": 50.0}, seed=0, hits=30)
    _run(tmp_path, "mae", "a" * 64, "mae", {"top1": math.nan}, seed=1, hits=30)
    _run(tmp_path, "cmae", "c" * 64, "crossmae", {"top1": 40.0}, seed=0)
    _run(tmp_path, "cmae", "c" * 64, "crossmae", {"top1": 41.0}, seed=1)
    _, rows, _ = _build(tmp_path, capsys)
    r = rows[("mae", "top1")]
    assert (r["n_seeds"], r["mean"], r["stderr"], r["ci_low"]) == ("2", "nan", "", "")
    assert float(rows[("cmae", "top1")]["stderr"]) == pytest.approx(0.5)


@pytest.mark.parametrize("zoo", [math.nan, math.inf])
def test_nonfinite_zoo_top1_is_ignored(tmp_path, capsys, zoo):
    _run(tmp_path, "cmae", "c" * 64, "crossmae", {"top1": 50.0}, zoo=zoo)
    _, rows, err = _build(tmp_path, capsys)
    assert rows[("cmae", "top1")]["zoo_reported_ft_top1"] == ""
    assert "reported_ft_top1 is not a finite number; ignored" in err


@pytest.mark.parametrize("name", ["$x^$", "$\\frac{a}{$", "run$_$1"])
def test_mathtext_names_are_drawn_as_plain_text(tmp_path, capsys, name):
    _run(tmp_path, name, "a" * 64, "mae", {"top1": 50.0})
    _run(tmp_path, "cmae", "c" * 64, "crossmae", {"top1": 40.0}, task=name)
    _, rows, _ = _build(tmp_path, capsys)
    assert set(rows) == {(name, "top1"), ("cmae", "top1")}


def test_plot_draws_names_without_mathtext(tmp_path):
    """The panel's tick labels, title and the non-finite value's label: plain text (math parsing
    and TeX off), and the axis limits finite."""
    import matplotlib.pyplot as plt
    from benchmarks.leaderboard import plot_figure
    rows = [{"task": "$t$", "protocol": "p", "config": "c", "metric": "top1", "backbone": b, "method": m, "mean": v,
             "stderr": None, "ci_low": None, "ci_high": None}
            for b, m, v in (("$x^$", "mae", 1.0), ("y", "crossmae", math.inf))]
    fig = plot_figure(rows)
    try:
        fig.savefig(tmp_path / "p.png")
        ax = fig.axes[0]
        texts = [t for t in (*ax.get_xticklabels(), ax.title, *ax.texts) if t.get_text()]
        assert {t.get_text() for t in texts} >= {"$x^$", "y", "inf", "$t$ · top1\np · c"}
        assert all(not t.get_usetex() and not t.get_parse_math() for t in texts)
        assert all(math.isfinite(v) for v in ax.get_ylim()) and ax.get_ylim()[1] < 2.0
    finally:
        plt.close(fig)


@needs_chromium
def test_nonfinite_values_sort_as_numbers_in_chromium(tmp_path, capsys):
    for i, (name, v) in enumerate((("a", 5.0), ("b", math.inf), ("c", -math.inf), ("d", math.nan), ("e", 1.0))):
        _run(tmp_path, name, f"{i}" * 64, "mae", {"top1": v})
    paths, _, _ = _build(tmp_path, capsys)
    click = "document.querySelector('th[data-col=mean]').click();"
    dom = PageDom(dump_dom(paths["html"], tmp_path, click))
    assert dom.column("leaderboard", "mean") == ["-inf", "1.00", "5.00", "inf", "nan"]
