"""One self-contained HTML page for a ladder run: ``render_report(doc, "report.html")``.

The page loads nothing: plots and thumbnails are ``data:`` URIs, the CSS is inline, there is no script, no font and
no link out, and a Content-Security-Policy meta tag (``default-src 'none'; img-src data:; style-src
'unsafe-inline'``) makes the browser refuse anything else. It can be mailed, archived or opened offline as it is.
All text from the document is HTML-escaped; the Encoder Note goes through a small markdown subset
(``encoderlab.report.markdown``) that escapes before it adds markup.

The document is plain JSON. Every key is optional: a missing key (or ``None``, or an empty list) means no section.
Top-level values of the wrong type raise ``TypeError`` naming the key (a caller's bug, never hidden)::

    title: str                      # the page title (default "encoderlab report")
    encoder: str; dataset: str; created: str (ISO time)
    note_md: str                    # the Encoder Note, markdown: # / ## headings, paragraphs, - bullets,
                                    # 1. lists, **bold**, *italic*, `code`, ``` fences, pipe tables
    note_title: str                 # the note section's heading (default "Encoder Note"; e.g. "Filter summary")
    rungs: [ {name, level (0 = baseline), kind: "baseline" | "rung", metric (e.g. "top1"), value, ci_low,
              ci_high, fit_seconds, predict_ms_per_item, peak_rss_mb, trainable_params, chosen: bool,
              skipped: str | None} ]
        -> a table, and "quality vs cost": value with its interval against predict_ms_per_item (log x) and
           against fit_seconds; the chosen rung ringed, baselines as squares; skipped rungs only in the table
    curve: { points: [ {method, shots ("full" or int), mean, std, n_seeds, labels_per_class?} ],
             fit: [ {method, shots | labels_per_class, pred, lo, hi} ], note: str }
        -> accuracy against labels per class (log2 x), mean ± std, each fit dashed with its band. x is
           ``labels_per_class`` when a row has it (the real count behind "full"), else shots, with "full" one
           octave right of the largest; a one-point fit (an extrapolation) is a dashed step from the method's
           last point to the prediction, with its interval
    per_class: [ {class, recall, ci_low, ci_high, n} ]  -> bars sorted by recall (lowest first) with whiskers
    confusion: { classes: [str], matrix: [[int]] }      -> heatmap of counts, colour by row fraction
    slices: [ {column, value, accuracy, ci_low, ci_high, n, small: bool} ]  -> table, worst first
    failing: [ {id, image: path | None, text: str | None, label, prediction,
                neighbours: [ {id, image, text, label, similarity} ]} ]
        -> the failing item (thumbnail or text), label vs prediction, then its nearest neighbours
    retrieval: [ {query: {text | None, image | None}, results: [ {image | None, text | None, rank, score,
                                                                  correct: bool} ]} ]
    histograms: [ {title, values: [float], cut: float | None, xlabel} ]  -> histogram with the cut line
    data_problems: { counts: {kind: int}, items: [ {kind, id, detail} ] }  -> counts and the first items

Image paths are read as given (relative ones from the current directory). An image that cannot be decoded becomes
a labelled placeholder box and is listed under "Unreadable images" with its reason. Numbers may be ``None`` or
NaN (shown as "—"). Plots need matplotlib (``pip install 'encoderlab[report]'``); without it the page says so in
place of each plot and keeps every table.
"""

from __future__ import annotations

import html
import importlib
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .. import __version__
from ..atomic import atomic_write_text
from .markdown import markdown_to_html
from .thumbs import THUMB_PX, Thumbnails

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
DEFAULT_TITLE = "encoderlab report"
#: data problems and confused pairs listed in full up to this many; the counts always cover everything
MAX_LISTED = 50
#: characters of an item's text shown in a card
MAX_CARD_TEXT = 300
NO_MATPLOTLIB = "plot not drawn: matplotlib is not installed (pip install 'encoderlab[report]')"

_STR_KEYS = ("title", "encoder", "dataset", "created", "note_md", "note_title")
_LIST_KEYS = ("rungs", "per_class", "slices", "failing", "retrieval", "histograms")
_DICT_KEYS = ("curve", "confusion", "data_problems")

_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330; margin: 0;
       background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 20px; margin: 36px 0 10px; border-bottom: 2px solid #e3e6eb;
     padding-bottom: 4px; } h3 { font-size: 16px; margin: 20px 0 8px; } h4, h5, h6 { font-size: 14px; }
.meta { color: #5b6473; margin: 0 0 12px; } .meta b { color: #1d2330; font-weight: 600; }
nav { font-size: 13px; margin: 8px 0 0; } nav a { margin-right: 12px; color: #2357b5; text-decoration: none; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #dde1e7; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f2f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.chosen td { background: #fff1dc; font-weight: 600; } tr.skipped td { color: #8a919c; }
tr.small td { color: #8a919c; }
.badge { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 11px; font-weight: 600; }
.badge.chosen { background: #ff7f0e; color: #fff; } .badge.small { background: #e3e6eb; color: #444; }
.badge.skip { background: #eee; color: #666; }
img.plot { max-width: 100%; height: auto; display: block; margin: 8px 0; }
.muted { color: #8a919c; font-size: 12px; }
.cards { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
.row { display: flex; gap: 18px; padding: 10px 0; border-bottom: 1px solid #eceef2; align-items: flex-start; }
figure { margin: 0; width: 112px; font-size: 11px; text-align: center; }
figure.lead { width: 132px; } figcaption { margin-top: 3px; overflow-wrap: anywhere; }
figure.ok img, figure.ok .txt { outline: 3px solid #2ca02c; } figure.bad img, figure.bad .txt { outline: 3px solid
  #d62728; } figure.same img, figure.same .txt { outline: 2px solid #2ca02c; }
figure.pred img, figure.pred .txt { outline: 2px solid #ff7f0e; }
img.thumb { display: block; margin: 0 auto; background: #fff; border: 1px solid #e3e6eb; }
.txt { font-size: 11px; text-align: left; background: #f6f7f9; border: 1px solid #e3e6eb; padding: 4px;
       max-height: 120px; overflow: auto; overflow-wrap: anywhere; }
.ph { display: flex; flex-direction: column; justify-content: center; align-items: center; margin: 0 auto;
      background: repeating-linear-gradient(45deg, #fbeaea, #fbeaea 6px, #fff 6px, #fff 12px);
      border: 1px dashed #d62728; color: #a31f1f; font-size: 10px; overflow: hidden; overflow-wrap: anywhere; }
.wrong { color: #d62728; } code { background: #f0f2f5; padding: 0 3px; border-radius: 3px; }
pre { background: #f0f2f5; padding: 8px; overflow: auto; } details { margin: 6px 0; }
footer { color: #8a919c; font-size: 12px; margin-top: 40px; }
"""


@dataclass
class _Context:
    thumbs: Thumbnails
    plots: ModuleType | None  # encoderlab.report.plots, or None without matplotlib


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def finite_number(v: Any) -> float | None:
    """``v`` as a finite float, or None (missing, NaN, infinite, a bool, not a number)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _worst_first(rows: Sequence[Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
    """Rows by ascending ``key``; rows without a number for it go last."""
    return sorted(rows, key=lambda r: (finite_number(r.get(key)) is None, finite_number(r.get(key)) or 0.0))


def _fixed(v: Any, digits: int = 3) -> str:
    f = finite_number(v)
    return "—" if f is None else f"{f:.{digits}f}"


def _sig(v: Any) -> str:
    f = finite_number(v)
    return "—" if f is None else f"{f:.3g}"


def _si(v: Any) -> str:
    """Parameter counts as 950, 4.7k, 22.7M, 1.2B."""
    f = finite_number(v)
    if f is None:
        return "—"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(f) >= scale:
            return f"{f / scale:.1f}{unit}"
    return f"{f:.0f}"


def _with_ci(v: Any, lo: Any, hi: Any) -> str:
    if finite_number(lo) is None or finite_number(hi) is None:
        return _fixed(v)
    return f"{_fixed(v)} <span class=\"muted\">[{_fixed(lo)}, {_fixed(hi)}]</span>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = (),
           row_classes: Sequence[str] | None = None) -> str:
    """A table from cells that are already HTML; columns in ``numeric`` are right-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for k, row in enumerate(rows):
        cls = f' class="{row_classes[k]}"' if row_classes and row_classes[k] else ""
        cells = "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _plot(ctx: _Context, alt: str, draw: Callable[[ModuleType], bytes | None]) -> str:
    if ctx.plots is None:
        return f'<p class="muted">{_e(NO_MATPLOTLIB)}</p>'
    png = draw(ctx.plots)
    return "" if png is None else f'<img class="plot" src="{ctx.plots.png_data_uri(png)}" alt="{_e(alt)}">'


def _visual(ctx: _Context, image: Any, text: Any, alt: str) -> str:
    """An item as a card body: its thumbnail (or placeholder), its text, or a note that it has neither."""
    parts = []
    if image:
        parts.append(ctx.thumbs.tag(str(image), alt))
    if text:
        t = str(text)
        parts.append(f'<div class="txt">{_e(t if len(t) <= MAX_CARD_TEXT else t[:MAX_CARD_TEXT] + "…")}</div>')
    if not parts:
        parts.append(f'<div class="ph" style="width:{ctx.thumbs.size}px;height:{ctx.thumbs.size // 2}px">'
                     "no image or text</div>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------------------ sections

def _note_section(note: str, ctx: _Context) -> str:
    return markdown_to_html(note) if note.strip() else ""


def _rung_status(r: Mapping[str, Any]) -> tuple[str, str]:
    if r.get("skipped"):
        return f'<span class="badge skip">skipped</span> {_e(r["skipped"])}', "skipped"
    if r.get("chosen"):
        return '<span class="badge chosen">chosen</span>', "chosen"
    return "", ""


def _rungs_section(rungs: list[dict[str, Any]], ctx: _Context) -> str:
    rows, classes = [], []
    for r in rungs:
        status, cls = _rung_status(r)
        rows.append([_e(r.get("name")), _e(r.get("level")), _e(r.get("kind")), _e(r.get("metric")),
                     _with_ci(r.get("value"), r.get("ci_low"), r.get("ci_high")), _sig(r.get("fit_seconds")),
                     _sig(r.get("predict_ms_per_item")), _sig(r.get("peak_rss_mb")), _si(r.get("trainable_params")),
                     status])
        classes.append(cls)
    header = ["rung", "level", "kind", "metric", "value [95% CI]", "fit s", "predict ms / item", "peak RSS MB",
              "trainable params", "status"]
    table = _table(header, rows, numeric=(1, 4, 5, 6, 7, 8), row_classes=classes)
    plot = _plot(ctx, "quality vs cost", lambda p: p.quality_vs_cost(rungs))
    return table + ('<h3 id="quality-vs-cost">Quality vs cost</h3>' + plot if plot else "")


def _curve_section(curve: dict[str, Any], ctx: _Context) -> str:
    points, fit = list(curve.get("points") or []), list(curve.get("fit") or [])
    parts = []
    if points or fit:
        parts.append(_plot(ctx, "accuracy vs labels per class", lambda p: p.label_curve(points, fit)))
    if curve.get("note"):
        parts.append(f"<p>{_e(curve['note'])}</p>")
    if points:
        rows = [[_e(p.get("method")), _e(p.get("shots")), _fixed(p.get("mean")), _fixed(p.get("std")),
                 _e(p.get("n_seeds"))] for p in points]
        parts.append("<details><summary>the points</summary>"
                     + _table(["method", "labels per class", "mean", "std", "seeds"], rows, numeric=(1, 2, 3, 4))
                     + "</details>")
    return "".join(parts)


def _per_class_section(rows: list[dict[str, Any]], ctx: _Context) -> str:
    ordered = _worst_first(rows, "recall")
    plot = _plot(ctx, "per-class recall", lambda p: p.per_class_recall(ordered))
    cells = [[_e(r.get("class")), _with_ci(r.get("recall"), r.get("ci_low"), r.get("ci_high")), _e(r.get("n"))]
             for r in ordered]
    return plot + ("<details><summary>every class</summary>"
                   + _table(["class", "recall [95% CI]", "n"], cells, numeric=(1, 2)) + "</details>")


def _confusion_matrix(confusion: Mapping[str, Any]) -> tuple[list[str], np.ndarray]:
    classes = [str(c) for c in confusion.get("classes") or []]
    try:
        matrix = np.asarray(confusion.get("matrix") or [], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"report document: confusion.matrix must be a square list of integer rows ({e})") from None
    if matrix.size == 0 and not classes:
        return [], matrix
    if matrix.shape != (len(classes), len(classes)):
        raise ValueError(f"report document: confusion.matrix has shape {matrix.shape} but there are "
                         f"{len(classes)} classes; it must be {len(classes)} x {len(classes)}")
    return classes, matrix


def _confusion_section(confusion: dict[str, Any], ctx: _Context) -> str:
    classes, matrix = _confusion_matrix(confusion)
    if not classes:
        return ""
    plot = _plot(ctx, "confusion matrix", lambda p: p.confusion_heatmap(classes, matrix))
    off = [(int(matrix[i, j]), i, j) for i in range(len(classes)) for j in range(len(classes))
           if i != j and matrix[i, j] > 0]
    off.sort(key=lambda t: -t[0])
    if not off:
        return plot
    sums = matrix.sum(axis=1)
    rows = [[_e(classes[i]), _e(classes[j]), str(n), _fixed(n / sums[i], 2)] for n, i, j in off[:10]]
    return plot + "<h3>Most confused pairs</h3>" + _table(["true", "predicted as", "count", "share of true"], rows,
                                                          numeric=(2, 3))


def _slices_section(slices: list[dict[str, Any]], ctx: _Context) -> str:
    ordered = _worst_first(slices, "accuracy")
    rows = [[_e(s.get("column")), _e(s.get("value")), _with_ci(s.get("accuracy"), s.get("ci_low"), s.get("ci_high")),
             _e(s.get("n")), '<span class="badge small">small</span>' if s.get("small") else ""] for s in ordered]
    note = '<p class="muted">Worst first. Small slices have too few items for their accuracy to mean much.</p>'
    return note + _table(["column", "value", "accuracy [95% CI]", "n", ""], rows, numeric=(2, 3),
                         row_classes=["small" if s.get("small") else "" for s in ordered])


def _failing_card(item: Mapping[str, Any], ctx: _Context) -> str:
    label, pred = item.get("label"), item.get("prediction")
    lead = (f'<figure class="lead">{_visual(ctx, item.get("image"), item.get("text"), str(item.get("id", "")))}'
            f'<figcaption>{_e(item.get("id"))}<br>label: <b>{_e(label)}</b><br>'
            f'predicted: <b class="wrong">{_e(pred)}</b></figcaption></figure>')
    cards = []
    for nb in item.get("neighbours") or []:
        cls = "same" if nb.get("label") == label else "pred" if nb.get("label") == pred else ""
        cards.append(f'<figure class="{cls}">{_visual(ctx, nb.get("image"), nb.get("text"), str(nb.get("id", "")))}'
                     f'<figcaption>{_e(nb.get("label"))}<br>sim {_fixed(nb.get("similarity"), 2)}</figcaption>'
                     "</figure>")
    neighbours = f'<div class="cards">{"".join(cards)}</div>' if cards else '<p class="muted">no neighbours</p>'
    return f'<div class="row">{lead}<div>{neighbours}</div></div>'


def _failing_section(failing: list[dict[str, Any]], ctx: _Context) -> str:
    legend = ('<p class="muted">Each failing test item, then its nearest neighbours: green outline = the item\'s '
              "label, orange = the wrongly predicted label.</p>")
    return legend + "".join(_failing_card(item, ctx) for item in failing)


def _retrieval_section(queries: list[dict[str, Any]], ctx: _Context) -> str:
    rows = []
    for k, q in enumerate(queries):
        query = q.get("query") or {}
        lead = (f'<figure class="lead">{_visual(ctx, query.get("image"), query.get("text"), f"query {k + 1}")}'
                f"<figcaption>query {k + 1}</figcaption></figure>")
        cards = [f'<figure class="{"ok" if r.get("correct") else "bad"}">'
                 f'{_visual(ctx, r.get("image"), r.get("text"), "result " + str(r.get("rank", "")))}'
                 f'<figcaption>#{_e(r.get("rank"))} · {_fixed(r.get("score"), 3)}'
                 f'{"" if r.get("correct") else " · wrong"}</figcaption></figure>' for r in q.get("results") or []]
        rows.append(f'<div class="row">{lead}<div class="cards">{"".join(cards)}</div></div>')
    legend = '<p class="muted">Each query and its top results: green outline = correct, red = wrong.</p>'
    return legend + "".join(rows)


def _histograms_section(hists: list[dict[str, Any]], ctx: _Context) -> str:
    parts = []
    for h in hists:
        title, values = str(h.get("title") or "histogram"), list(h.get("values") or [])
        cut = finite_number(h.get("cut"))
        plot = _plot(ctx, title, lambda p: p.histogram(values, cut, str(h.get("xlabel") or ""), title))
        parts.append(f"<h3>{_e(title)}</h3>" + (plot or '<p class="muted">no values</p>'))
    return "".join(parts)


def _data_problems_section(problems: dict[str, Any], ctx: _Context) -> str:
    parts = []
    counts = problems.get("counts") or {}
    if counts:
        parts.append(_table(["problem", "count"], [[_e(k), _e(v)] for k, v in counts.items()], numeric=(1,)))
    items = list(problems.get("items") or [])
    if items:
        rows = [[_e(i.get("kind")), _e(i.get("id")), _e(i.get("detail"))] for i in items[:MAX_LISTED]]
        parts.append(_table(["kind", "item", "detail"], rows))
        if len(items) > MAX_LISTED:
            parts.append(f'<p class="muted">and {len(items) - MAX_LISTED} more not listed here</p>')
    return "".join(parts)


def _unreadable_section(ctx: _Context) -> str:
    rows = [[_e(path), _e(reason)] for path, reason in ctx.thumbs.failures.items()]
    return _table(["image", "reason"], rows) if rows else ""


#: (document key, anchor, heading, renderer), in page order
SECTIONS: tuple[tuple[str, str, str, Callable[[Any, _Context], str]], ...] = (
    ("note_md", "note", "Encoder Note", _note_section),
    ("rungs", "rungs", "Rungs", _rungs_section),
    ("curve", "curve", "Accuracy vs labels per class", _curve_section),
    ("per_class", "per-class", "Per-class recall", _per_class_section),
    ("confusion", "confusion", "Confusion matrix", _confusion_section),
    ("slices", "slices", "Slices", _slices_section),
    ("failing", "failing", "Failing items", _failing_section),
    ("retrieval", "retrieval", "Retrieval", _retrieval_section),
    ("histograms", "histograms", "Histograms", _histograms_section),
    ("data_problems", "data-problems", "Data problems", _data_problems_section),
)
UNREADABLE_HEADING = "Unreadable images"


# ---------------------------------------------------------------------------------------------------------- page

def _check_rows(value: Any, where: str) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        raise TypeError(f"report document: {where} must be a list of objects, got {type(value).__name__}: "
                        f"{value!r:.80}")
    bad = next((i for i, v in enumerate(value) if not isinstance(v, Mapping)), None)
    if bad is not None:
        raise TypeError(f"report document: {where}[{bad}] must be an object, got {value[bad]!r:.80}")


def _check_object(value: Any, where: str) -> None:
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"report document: {where} must be an object, got {type(value).__name__}: {value!r:.80}")


def check_document(doc: Any) -> None:
    """Raise ``TypeError`` naming the key when a present value has the wrong type for its section."""
    if not isinstance(doc, Mapping):
        raise TypeError(f"report document must be a JSON object (dict), got {type(doc).__name__}")
    for key in _STR_KEYS:
        if doc.get(key) is not None and not isinstance(doc[key], str):
            raise TypeError(f"report document: {key!r} must be a string, got {type(doc[key]).__name__}")
    for key in _LIST_KEYS:
        _check_rows(doc.get(key), key)
    for key in _DICT_KEYS:
        _check_object(doc.get(key), key)
    curve, problems = doc.get("curve") or {}, doc.get("data_problems") or {}
    _check_rows(curve.get("points"), "curve.points")
    _check_rows(curve.get("fit"), "curve.fit")
    _check_object(problems.get("counts"), "data_problems.counts")
    _check_rows(problems.get("items"), "data_problems.items")
    for i, item in enumerate(doc.get("failing") or []):
        _check_rows(item.get("neighbours"), f"failing[{i}].neighbours")
    for i, q in enumerate(doc.get("retrieval") or []):
        _check_object(q.get("query"), f"retrieval[{i}].query")
        _check_rows(q.get("results"), f"retrieval[{i}].results")


def _header(doc: Mapping[str, Any], present: Sequence[tuple[str, str]]) -> str:
    title = doc.get("title") or DEFAULT_TITLE
    meta = [f"{name} <b>{_e(doc[key])}</b>" for key, name in (("encoder", "encoder"), ("dataset", "dataset"),
                                                             ("created", "created")) if doc.get(key)]
    nav = "".join(f'<a href="#{anchor}">{_e(heading)}</a>' for anchor, heading in present)
    return (f"<header><h1>{_e(title)}</h1>" + (f'<p class="meta">{" · ".join(meta)}</p>' if meta else "")
            + (f"<nav>{nav}</nav>" if nav else "") + "</header>")


def report_html(doc: Mapping[str, Any], *, thumb_px: int = THUMB_PX, max_pixels: int | None = None) -> str:
    """The report page as a string (``render_report`` writes it); see the module docstring for ``doc``."""
    check_document(doc)
    # The tables need nothing beyond the standard library; only the plots need matplotlib.
    plots = importlib.import_module(".plots", __package__) if importlib.util.find_spec("matplotlib") else None
    ctx = _Context(Thumbnails(thumb_px, max_pixels), plots)
    sections: list[tuple[str, str, str]] = []
    for key, anchor, heading, render in SECTIONS:
        value = doc.get(key)
        body = render(value, ctx) if value else ""
        if body:
            sections.append((anchor, (doc.get("note_title") or heading) if key == "note_md" else heading, body))
    unreadable = _unreadable_section(ctx)  # after the others: it lists what they failed to decode
    if unreadable:
        note = '<p class="muted">These images are shown as placeholder boxes above.</p>'
        sections.append(("unreadable", UNREADABLE_HEADING, note + unreadable))
    title = _e(doc.get("title") or DEFAULT_TITLE)
    body = "".join(f'<section id="{a}"><h2>{_e(h)}</h2>{b}</section>' for a, h, b in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="referrer" content="no-referrer"><link rel="icon" href="data:,">'
            f"<title>{title}</title><style>{_CSS}</style></head>\n<body><main>"
            + _header(doc, [(a, h) for a, h, _ in sections]) + body
            + f"<footer>encoderlab {_e(__version__)} · a self-contained page: it loads nothing from anywhere."
              "</footer></main></body></html>\n")


def render_report(doc: Mapping[str, Any], out_path: str | os.PathLike, *, thumb_px: int = THUMB_PX,
                  max_pixels: int | None = None) -> Path:
    """Write the report for ``doc`` to ``out_path`` atomically (a reader never sees half a page); returns the path.

    ``thumb_px``: the longer side of each thumbnail; ``max_pixels``: the decompression-bomb guard for the images
    (default ``$ENCODERLAB_MAX_PIXELS`` or 64 Mpx, as everywhere in encoderlab).
    """
    out = Path(out_path)
    atomic_write_text(out, report_html(doc, thumb_px=thumb_px, max_pixels=max_pixels))
    return out


def report_images(doc: Mapping[str, Any]) -> list[str]:
    """Every image path the report for ``doc`` shows, each once, in page order."""
    found: dict[str, None] = {}

    def add(path: Any) -> None:
        if path:
            found.setdefault(str(path))

    for item in doc.get("failing") or []:
        add(item.get("image"))
        for nb in item.get("neighbours") or []:
            add(nb.get("image"))
    for q in doc.get("retrieval") or []:
        add((q.get("query") or {}).get("image"))
        for r in q.get("results") or []:
            add(r.get("image"))
    return list(found)
