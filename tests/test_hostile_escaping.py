"""Hostile files, cause "escaping" (issue 18, security defect 3): every value the leaderboard reads
back from a run folder and places in leaderboard.html / leaderboard.md is escaped for where it lands,
whatever its type, and a number column shows only numbers.

Cases (each fails on the main before this change):
  1. HTML attribute: a string as ``backbone_report.zoo.reported_ft_top1`` breaks out of ``data-v="…"``
  2. HTML attribute: the same with a JSON ``true`` (a bool is not a number; was shown as ``True``)
  3. HTML text and attribute: names (backbone, task, config, metric, sha256, the runs folder) with
     ``"><img …>``: no element or event handler appears, the cell text is the name as written
  4. inline JSON: a name holding ``</script>``, ``<!--`` and U+2028 cannot end the data element and
     reads back exactly (``JSON.parse`` in the browser)
  5. the real browser: no injected element, no handler ran, the table shows the names as written
  6. Markdown: ``|``, backticks, emphasis, links, ``<tags>`` and line breaks in names render (by a
     CommonMark + GFM-table renderer) as the literal text in the right cell
"""
from __future__ import annotations

import json
import re
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest

from benchmarks.leaderboard import build
from benchmarks.render import html_attr, html_text, md_text, script_json
from browser import PageDom, dump_dom, needs_chromium

BREAK_ATTR = '"><img src=x onerror="document.title=\'pwned\'">'
BREAK_SCRIPT = '</script><script>document.title="pwned"</script><!--'
MD = 'a|b `c` *d* _e_ [f](javascript:x) <b>g</b> &amp; \\h\nrow'
SEP = "line\u2028sep\u2029end"
#: the tags leaderboard.html is made of: anything else in the page came from a file
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "code", "table", "thead", "tbody",
             "tr", "th", "td", "span", "br", "div", "svg", "text", "line", "circle", "script"}


def _run(root: Path, name: str, sha: str, method: str, task: str, config: str, metrics: dict, zoo=None) -> None:
    d = root / "runs" / sha[:4] / f"{len(list(root.rglob('metrics.json')))}"
    d.mkdir(parents=True)
    (d / "task.json").write_text(json.dumps({"spec": {"backbone_name": name, "config": config}}))
    report = {"sha256": sha, "arch": "vit_base_patch16",
              "meta": {"method": method, "mask_ratio": 0.75, "kept_mask_ratio": 0.75}}
    if zoo is not None:
        report["zoo"] = {"reported_ft_top1": zoo}
    (d / "metrics.json").write_text(json.dumps({"task": task, "protocol": "finetune", "metrics": metrics,
                                                "backbone_sha256": sha, "seed": 0, "backbone_report": report}))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile") / "out<img src=x onerror=alert(1)>"
    mae_sha = "a" * 16 + BREAK_ATTR
    _run(root, BREAK_ATTR, mae_sha, "mae", "inat", MD, {"top1": 50.0, BREAK_ATTR: 1.0}, zoo=BREAK_ATTR)
    _run(root, BREAK_SCRIPT + SEP, "c" * 64, "crossmae", "inat", MD, {"top1": 55.0, BREAK_ATTR: 2.0}, zoo=True)
    _run(root, MD, "d" * 64, "crossmae", BREAK_ATTR, "smoke", {"top1": 1.0})
    paths = build(root, resamples=10)
    return root, paths


def test_helpers_escape_for_their_context():
    assert "<" not in html_text(BREAK_ATTR) and '"' not in html_attr(BREAK_ATTR) and "\n" not in html_attr("a\nb")
    s = script_json({"x": BREAK_SCRIPT + SEP, "n": float("nan"), "i": float("-inf")})
    assert not re.search(r"[<>&\u2028\u2029]", s) and json.loads(s) == {"x": BREAK_SCRIPT + SEP, "n": "nan", "i": "-inf"}
    assert not re.search(r"(?<!\\)[|`*_\[\]<>\n]", md_text(MD))


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_html_places_every_value_escaped(hostile):
    root, paths = hostile
    text = paths["html"].read_text()
    p = _Tags()
    p.feed(text)
    assert {t for t, _ in p.tags} <= PAGE_TAGS, {t for t, _ in p.tags} - PAGE_TAGS
    assert not [(t, a) for t, a in p.tags if any(k.startswith("on") for k in a)]
    assert [t for t, _ in p.tags].count("script") == 2 and "<img" not in text
    dom = PageDom(text)
    # the names read back as written (text and attribute context)
    names = dom.column("leaderboard", "backbone")
    assert set(names) == {BREAK_ATTR, BREAK_SCRIPT + SEP, MD}
    assert set(dom.column("leaderboard", "metric")) == {"top1", BREAK_ATTR}
    cells = [a.get("data-v") for t, a in dom.elements if t == "td"]
    assert BREAK_ATTR in cells and MD in cells and "a" * 16 + BREAK_ATTR in cells
    assert f"<code>{html_text(root)}</code>" in text  # the runs folder's name too
    # a number column shows numbers only: the zoo's string and bool are not shown (a warning each)
    assert set(dom.column("leaderboard", "zoo reported FT top-1")) == {""}
    # the inline JSON reads back exactly and holds no character that could end its element
    data = dom.by_id["leaderboard-data"]
    assert not re.search(r"[<>&\u2028\u2029]", data)
    assert {r["backbone"] for r in json.loads(data)["rows"]} == {BREAK_ATTR, BREAK_SCRIPT + SEP, MD}


def test_zoo_value_that_is_not_a_number_is_ignored_with_a_warning(tmp_path, capsys):
    _run(tmp_path, "x", "a" * 64, "mae", "inat", "smoke", {"top1": 50.0}, zoo=BREAK_ATTR)
    _run(tmp_path, "y", "b" * 64, "mae", "inat", "smoke", {"top1": 50.0}, zoo=True)
    paths = build(tmp_path, resamples=10)
    err = capsys.readouterr().err
    assert err.count("reported_ft_top1 is not a finite number; ignored") == 2
    assert "img" not in paths["csv"].read_text() and ",True," not in paths["csv"].read_text()


@needs_chromium
def test_hostile_page_in_chromium(hostile, tmp_path):
    _, paths = hostile
    read = ("var d = JSON.parse(document.getElementById('leaderboard-data').textContent);"
            "var o = document.createElement('pre'); o.id = 'readback';"
            "o.textContent = JSON.stringify(d.rows.map(function (r) { return r.backbone; }).sort());"
            "document.body.appendChild(o);")
    text = dump_dom(paths["html"], tmp_path, read)
    dom = PageDom(text)
    # the page's own scripts ran to the end (the readback is there) and read the names back exactly
    assert set(json.loads(dom.by_id["readback"])) == {BREAK_ATTR, BREAK_SCRIPT + SEP, MD}
    # nothing from the files became an element or ran (the payloads would retitle the page)
    assert {t for t, _ in dom.elements} <= PAGE_TAGS | {"pre"}
    assert re.search(r"<title>Leaderboard: MAE vs CrossMAE</title>", text) and "pwned" not in text.split("<body")[0]
    assert set(dom.column("leaderboard", "backbone")) == {BREAK_ATTR, BREAK_SCRIPT + SEP, MD}
    assert set(dom.column("comparison", "task")) == {"inat", BREAK_ATTR}


def test_markdown_renders_names_as_literal_text(hostile):
    markdown_it = pytest.importorskip("markdown_it", reason="markdown-it-py (a dependency of rich) not installed")
    _, paths = hostile
    md = paths["md"].read_text()
    rendered = markdown_it.MarkdownIt("commonmark").enable("table").render(md)
    tags = _Tags()
    tags.feed(rendered)
    assert {t for t, _ in tags.tags} <= {"h1", "h2", "p", "table", "thead", "tbody", "tr", "th", "td", "strong"}
    dom = PageDom(rendered.replace("<table>", '<table id="t">', 1).replace("<table>", '<table id="p">', 1))
    main, pairs = dom.tables["t"], dom.tables["p"]
    assert all(len(r) == len(main["head"]) for r in main["rows"])
    assert all(len(r) == len(pairs["head"]) for r in pairs["rows"])
    flat = MD.replace("\n", " ")
    assert {r[2] for r in main["rows"]} == {flat, "smoke"} and {r[0] for r in main["rows"]} == {"inat", BREAK_ATTR}
    assert {r[3] for r in main["rows"]} == {"top1", BREAK_ATTR}
    assert any(h.startswith(BREAK_ATTR) for h in main["head"]) and any(h.startswith(flat) for h in main["head"])
    sep = (BREAK_SCRIPT + SEP).replace("\u2028", " ").replace("\u2029", " ")  # line separators as spaces
    assert [(r[0], r[2], r[3], r[4], r[5]) for r in pairs["rows"]] == [
        ("inat", flat, m, BREAK_ATTR, sep) for m in sorted(["top1", BREAK_ATTR])]
    assert f"Built from the finished tasks in {paths['md'].parent} (" in unescape(rendered)  # folder name too
