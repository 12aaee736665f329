"""Shared by the leaderboard page tests: the page loaded in a real headless browser (Debian's
chromium, ``--dump-dom``: the DOM after the page's scripts ran) and a parse of the result (tables by
id, every element and attribute, the difference charts)."""
from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y "
                                                              "chromium; `make test` tries it)")


class PageDom(HTMLParser):
    """``tables[id] = {"head": [header texts], "rows": [[cell texts]]}`` in document order
    (``order``), ``elements`` = every ``(tag, {attribute: value})``, ``charts`` / ``dots`` = the
    difference charts' SVGs and dots, ``by_id[id]`` = the text inside the element with that id."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, dict] = {}
        self.order: list[str] = []
        self.elements: list[tuple[str, dict]] = []
        self.charts = self.dots = 0
        self.by_id: dict[str, str] = {}
        self._table = None
        self._section = None
        self._row = self._cell = None
        self._ids: list[tuple[str, str]] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        self.elements.append((tag, a))
        if a.get("id"):
            self._ids.append((tag, a["id"]))
            self.by_id[a["id"]] = ""
        if tag == "table" and a.get("id"):
            self._table = a["id"]
            self.order.append(self._table)
            self.tables[self._table] = {"head": [], "rows": []}
        elif tag in ("thead", "tbody") and self._table:
            self._section = tag
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "br" and self._cell is not None:
            self._cell += "\n"
        elif tag == "svg" and "chart" in a.get("class", ""):
            self.charts += 1
        elif tag == "circle" and "diff" in a.get("class", ""):
            self.dots += 1

    def handle_endtag(self, tag):
        if self._ids and self._ids[-1][0] == tag:
            self._ids.pop()
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            t = self.tables[self._table]
            (t["head"].extend(self._row) if self._section == "thead" else t["rows"].append(self._row))
            self._row = None
        elif tag == "table":
            self._table = self._section = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        for _, i in self._ids:
            self.by_id[i] += data

    def column(self, table: str, header: str) -> list[str]:
        """The cell texts of one column of a table, by its header text."""
        t = self.tables[table]
        k = t["head"].index(header)
        return [r[k] for r in t["rows"]]


def dump_dom(page: Path, tmp: Path, script: str = "") -> str:
    """The page's DOM after loading it in headless chromium (no network, fresh profile), with
    ``script`` (JavaScript, run after the page's own) added before ``</body>`` of a copy first."""
    if script:
        copy = page.with_name(f"{page.stem}-{abs(hash(script)) % 10**8}.html")
        copy.write_text(page.read_text().replace("</body>", f"<script>{script}</script></body>"))
        page = copy
    profile = tmp / f"chromium-profile-{page.stem}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", "--dump-dom", page.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "<table" in out.stdout, out.stderr[-2000:]
    return out.stdout
