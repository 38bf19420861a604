"""A tiny, safe markdown subset for the Encoder Note: headings, paragraphs, lists, ``**bold**``, `code`, pipe tables.

Every piece of text is HTML-escaped *before* any markup is added, so nothing in the note can inject a tag or an
attribute; the converter only ever emits the fixed tags below. Links and images are left as plain text on purpose:
the report must not load or point at anything outside itself. Headings are shifted down two levels (``#`` becomes
``<h3>``) because the note sits inside a report section.
"""

from __future__ import annotations

import html
import re

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^\s*[-*+]\s+(.*)$")
_ORDERED = re.compile(r"^\s*\d+[.)]\s+(.*)$")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|__(?=\S)(.+?)(?<=\S)__")
_ITALIC = re.compile(r"(?<![\w*])\*(?=\S)([^*]+?)(?<=\S)\*(?![\w*])")


def inline_markdown(text: str) -> str:
    """Escape ``text``, then render `code` spans (taken literally), ``**bold**`` and ``*italic*``."""
    out: list[str] = []
    pos = 0
    for m in _CODE_SPAN.finditer(text):
        out.append(_emphasis(html.escape(text[pos:m.start()])))
        out.append(f"<code>{html.escape(m.group(2).strip())}</code>")
        pos = m.end()
    out.append(_emphasis(html.escape(text[pos:])))
    return "".join(out)


def _emphasis(escaped: str) -> str:
    escaped = _BOLD.sub(lambda m: f"<strong>{m.group(1) or m.group(2)}</strong>", escaped)
    return _ITALIC.sub(r"<em>\1</em>", escaped)


def _is_table_start(lines: list[str], i: int) -> bool:
    return "|" in lines[i] and i + 1 < len(lines) and "-" in lines[i + 1] and bool(_TABLE_RULE.match(lines[i + 1]))


def _block_starts(lines: list[str], i: int) -> bool:
    line = lines[i]
    return bool(_HEADING.match(line) or _BULLET.match(line) or _ORDERED.match(line) or _FENCE.match(line)
                or _is_table_start(lines, i))


def _cells(row: str) -> list[str]:
    row = row.strip()
    if row.startswith("|"):
        row = row[1:]
    if row.endswith("|") and not row.endswith("\\|"):
        row = row[:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row)]


def _table(lines: list[str], i: int) -> tuple[str, int]:
    header = _cells(lines[i])
    rows: list[list[str]] = []
    i += 2
    while i < len(lines) and lines[i].strip() and "|" in lines[i]:
        rows.append(_cells(lines[i]))
        i += 1
    width = max([len(header)] + [len(r) for r in rows])
    head = "".join(f"<th>{inline_markdown(c)}</th>" for c in header + [""] * (width - len(header)))
    body = "".join("<tr>" + "".join(f"<td>{inline_markdown(c)}</td>" for c in r + [""] * (width - len(r))) + "</tr>"
                   for r in rows)
    return f"<table class=\"md\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>", i


def _list(lines: list[str], i: int, pattern: re.Pattern[str], tag: str) -> tuple[str, int]:
    items: list[str] = []
    while i < len(lines) and lines[i].strip():
        m = pattern.match(lines[i])
        if m:
            items.append(m.group(1))
        elif items and lines[i].startswith((" ", "\t")):  # an indented continuation of the previous item
            items[-1] += " " + lines[i].strip()
        else:
            break
        i += 1
    return f"<{tag}>" + "".join(f"<li>{inline_markdown(t)}</li>" for t in items) + f"</{tag}>", i


def _fenced(lines: list[str], i: int) -> tuple[str, int]:
    fence = _FENCE.match(lines[i]).group(1)  # type: ignore[union-attr]  # the caller matched it
    body: list[str] = []
    i += 1
    while i < len(lines) and not lines[i].strip().startswith(fence):
        body.append(lines[i])
        i += 1
    return f"<pre><code>{html.escape(chr(10).join(body))}</code></pre>", i + 1


def _paragraph(lines: list[str], i: int) -> tuple[str, int]:
    text = [lines[i].strip()]
    i += 1
    while i < len(lines) and lines[i].strip() and not _block_starts(lines, i):
        text.append(lines[i].strip())
        i += 1
    return f"<p>{inline_markdown(' '.join(text))}</p>", i


def markdown_to_html(text: str) -> str:
    """Convert the markdown subset in ``text`` to HTML; unknown syntax comes out as escaped text."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        heading = _HEADING.match(line)
        if heading:
            level = min(6, len(heading.group(1)) + 2)
            out.append(f"<h{level}>{inline_markdown(heading.group(2))}</h{level}>")
            i += 1
        elif _FENCE.match(line):
            block, i = _fenced(lines, i)
            out.append(block)
        elif _is_table_start(lines, i):
            block, i = _table(lines, i)
            out.append(block)
        elif _BULLET.match(line):
            block, i = _list(lines, i, _BULLET, "ul")
            out.append(block)
        elif _ORDERED.match(line):
            block, i = _list(lines, i, _ORDERED, "ol")
            out.append(block)
        else:
            block, i = _paragraph(lines, i)
            out.append(block)
    return "\n".join(out)
