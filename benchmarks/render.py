"""How the leaderboard's outputs show a value: number checks and per-metric formats, and escaping for
every place a value lands (HTML text, HTML attribute, inline JSON in a ``<script>``, Markdown,
matplotlib text). One implementation for ``leaderboard.md``, ``leaderboard.png`` and
``leaderboard.html`` (and any section added to them, e.g. the probe curves).

Everything placed in an output comes from files read back from disk (``metrics.json``,
``task.json``), so it is untrusted: any string, any JSON type, ``NaN`` / ``±Infinity``. The rules:

- a value shown as a number must be a real number: ``int`` or ``float``, never ``bool`` (JSON
  ``true`` is not 1), never a string that looks like one (:func:`is_number`); anything else in a
  numeric place is shown as empty;
- a non-finite number is shown as such (``nan``, ``inf``, ``-inf``), is never drawn on an axis and
  never enters an interval;
- numbers of one metric share one format whatever their size (:func:`metric_kind`): percentages
  (top-1, AP, mIoU, ...) with 2 decimals, losses and errors in scientific notation with 4
  significant digits, times and rates with 1 decimal, so an s.e. of ``0.0006`` is ``0.00`` beside
  a mean of ``29.40``, not ``0.0006062``;
- a string is escaped for its context: :func:`html_text`, :func:`html_attr` (always inside double
  quotes), :func:`script_json` (``<``, ``>``, ``&``, U+2028 and U+2029 as ``\\u`` escapes, so
  ``</script>`` and ``<!--`` cannot end or change the script element), :func:`md_text` (Markdown
  punctuation backslash-escaped, HTML special characters as entities, line breaks as spaces).

Sources: the HTML Living Standard, "Restrictions for contents of script elements" (§4.12.1.3) and
"Escaping a string" (§13.3); the GitHub Flavored Markdown spec, "Backslash escapes" (§2.4) and
"Tables" (§4.10, ``\\|`` inside a cell).
"""
from __future__ import annotations

import html
import json
import math
import re

_PERCENT = re.compile(r"^(top\d+(_best)?|.*_top\d+|holdout_top\d+|ap.*|miou|macc|aacc|acc.*)$", re.I)
_LOSS = re.compile(r"(loss|mse|nll|err)", re.I)
_TIME = re.compile(r"(^|_)(time|wall|seconds|s)$|_time_|_s$", re.I)
_RATE = re.compile(r"(per_s|_per_|/s$|throughput)", re.I)


def is_number(v) -> bool:
    """True for an ``int`` or ``float`` (``bool`` excluded; finite or not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_finite(v) -> bool:
    """True for a number (:func:`is_number`) that is neither NaN nor ±infinity."""
    return is_number(v) and math.isfinite(v)


def metric_kind(metric: str) -> str:
    """``percent`` | ``loss`` | ``rate`` | ``time`` | ``other`` for a metric name as the task modules
    write it (``top1``, ``top1_best``, ``knn_token_top5``, ``APbox``, ``bbox/AP50``, ``mIoU``,
    ``loss``, ``mse``, ``images_per_s``, ``wall_time_s``). The part after the last ``/`` decides."""
    base = str(metric).rsplit("/", 1)[-1]
    if _RATE.search(base):
        return "rate"
    if _LOSS.search(base):
        return "loss"
    if _PERCENT.match(base):
        return "percent"
    if _TIME.search(base):
        return "time"
    return "other"


_FORMATS = {"percent": "{:.2f}", "loss": "{:.3e}", "rate": "{:.1f}", "time": "{:.1f}", "other": "{:.4g}"}


def fmt_number(v, kind: str = "other") -> str:
    """``v`` in the format of ``kind`` (:func:`metric_kind`): ``""`` for ``None`` or a non-number,
    ``nan`` / ``inf`` / ``-inf`` for a non-finite number, the integer itself for an ``int`` of kind
    ``other``."""
    if not is_number(v):
        return ""
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, int) and kind == "other":
        return str(v)
    return _FORMATS.get(kind, _FORMATS["other"]).format(v)


def fmt_metric(v, metric: str) -> str:
    """:func:`fmt_number` in the format of ``metric``'s kind (the mean, interval, s.e., reference and
    differences of one metric all use it)."""
    return fmt_number(v, metric_kind(metric))


def sort_key(v) -> str:
    """A numeric value for a ``data-v`` sort attribute: ``repr`` of a finite number,
    ``Infinity`` / ``-Infinity`` (as JavaScript's ``parseFloat`` reads them), ``""`` (sorted last)
    for NaN, ``None`` or a non-number. Only digits, signs, ``.``, ``e`` and those words come out."""
    if not is_number(v) or math.isnan(v):
        return ""
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return repr(float(v))


def html_text(v) -> str:
    """Any value as HTML text content (``&``, ``<``, ``>``, quotes escaped); ``None`` is ``""``."""
    return html.escape("" if v is None else str(v), quote=True)


def html_attr(v) -> str:
    """Any value as the content of a double-quoted HTML attribute (same escaping as
    :func:`html_text`, quotes included; line breaks kept as entities)."""
    return html_text(v).replace("\n", "&#10;").replace("\r", "&#13;")


def jsonable(v):
    """``v`` with every non-finite float replaced by its name (``"nan"``, ``"inf"``, ``"-inf"``), so
    it is valid JSON (JSON has no NaN/Infinity); containers are copied, other values kept."""
    if isinstance(v, float) and not math.isfinite(v):
        return fmt_number(v)
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def script_json(obj) -> str:
    """``obj`` as JSON safe inside an HTML ``<script>`` element (``type="application/json"`` or
    JavaScript): strict JSON (non-finite floats as names, :func:`jsonable`), with ``<``, ``>``,
    ``&``, U+2028 and U+2029 written as ``\\uXXXX`` escapes, so no ``</script>``, ``<!--`` or line
    separator can appear in the element's text; any other object as its ``str``. ``JSON.parse`` of
    it gives back the strings as they were."""
    s = json.dumps(jsonable(obj), ensure_ascii=False, allow_nan=False, default=str)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        s = s.replace(ch, esc)
    return s


_MD_PUNCT = re.compile(r"([\\`*_{}\[\]()#+!|~])")


def md_text(v) -> str:
    """Any value as literal text in a Markdown table cell or paragraph: Markdown punctuation
    (``\\ ` * _ { } [ ] ( ) # + ! | ~``) backslash-escaped, ``&``, ``<``, ``>`` as HTML entities
    (no tag or autolink can form), line breaks and tabs as spaces (a row stays one line)."""
    s = "" if v is None else str(v)
    s = re.sub(r"[\r\n\t\u2028\u2029\x0b\x0c]+", " ", s)
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_PUNCT.sub(r"\\\1", s)


def csv_text(rows: list[dict], columns: list[str], fmt) -> str:
    """``rows`` as CSV text: a header of ``columns``, then ``fmt(row[column])`` per cell (missing
    cells are ``fmt(None)``); ``\n`` line ends. The one CSV writer of the leaderboard and the probe
    curves."""
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([fmt(r.get(c)) for c in columns])
    return buf.getvalue()
