"""Prompts for zero-shot classification: class names made readable, and prompt templates kept as data.

Template sets are text files, one template per line with ``{}`` where the class name goes (``#`` starts a comment):
``clip80`` (the 80 ImageNet templates of the CLIP paper), ``simple`` (a short generic set), ``name`` (the bare
class name), or the path of a user file. Class display names default to the humanized labels (``sea_lion`` ->
"sea lion") and can be overridden by a JSON object or a two-column CSV file ``label,name``.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import EncoderlabError, close_matches

TEMPLATE_DIR = Path(__file__).with_name("templates")


def template_sets() -> list[str]:
    """Names of the packaged template sets."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.txt"))


def _parse_templates(text: str, where: str) -> list[str]:
    templates = [line.strip() for line in text.splitlines()]
    templates = [t for t in templates if t and not t.startswith("#")]
    if not templates:
        raise EncoderlabError(f"template file {where} holds no templates",
                              "write one template per line, e.g. 'a photo of a {}.'")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise EncoderlabError(
            f"template {bad[0]!r} in {where} must contain exactly one '{{}}' (where the class name goes)",
            "write e.g. 'a photo of a {}.'",
        )
    return list(dict.fromkeys(templates))


def load_templates(spec: str | Sequence[str]) -> list[str]:
    """Templates of a packaged set name, a file path, or a list given directly (deduplicated, order kept)."""
    if not isinstance(spec, str):
        return _parse_templates("\n".join(spec), "the given list")
    packaged = TEMPLATE_DIR / f"{spec}.txt"
    if "/" not in spec and packaged.is_file():
        return _parse_templates(packaged.read_text(encoding="utf-8"), spec)
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            return _parse_templates(path.read_text(encoding="utf-8"), str(path))
        except UnicodeDecodeError as e:
            raise EncoderlabError(f"template file {str(path)!r} is not UTF-8 text", "save it as UTF-8") from e
    guess = close_matches(spec, template_sets())
    hint = f"did you mean {', '.join(guess)}? " if guess else ""
    raise EncoderlabError(
        f"unknown template set {spec!r} (neither a packaged set nor a file)",
        f"{hint}use one of {', '.join(template_sets())} or a text file with one template per line",
    )


def humanize(label: str) -> str:
    """A readable class name from a label: ``sea_lion`` -> "sea lion", ``SeaLion`` -> "Sea Lion"."""
    text = re.sub(r"[_\s]+", " ", str(label)).strip()
    # Split camelCase words, keeping acronyms whole: "TVMonitor" -> "TV Monitor".
    text = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", text)
    return text


def load_class_names(path: str | Path) -> dict[str, str]:
    """``label -> display name`` from a JSON object or a CSV file with columns ``label,name``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise EncoderlabError(f"class-name file {str(p)!r} does not exist", "give a JSON object or a label,name CSV")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EncoderlabError(f"class-name file {str(p)!r} is not UTF-8 text", "save it as UTF-8") from None
    if p.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise EncoderlabError(f"class-name file {str(p)!r} is not valid JSON ({e})",
                                  'write {"label": "name"}') from e
        if not isinstance(obj, dict):
            raise EncoderlabError(f"class-name file {str(p)!r} holds a {type(obj).__name__}", 'write {"label": "name"}')
        return {str(k): str(v) for k, v in obj.items()}
    rows = list(csv.reader(text.splitlines()))
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["label", "name"]:
        rows = rows[1:]
    bad = [r for r in rows if r and len(r) < 2]
    if bad:
        raise EncoderlabError(f"class-name file {str(p)!r}: row {bad[0]!r} has no name", "write label,name per line")
    return {r[0].strip(): r[1].strip() for r in rows if r}


def class_display_names(classes: Sequence[str], overrides: Mapping[str, str] | None = None) -> list[str]:
    """Display names in class order; overrides naming unknown labels fail (a typo would silently do nothing)."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(map(str, classes)))
    if unknown:
        guess = close_matches(unknown[0], [str(c) for c in classes])
        raise EncoderlabError(
            f"class-name override for unknown label {unknown[0]!r}",
            f"did you mean {', '.join(guess)}?" if guess else f"labels are: {', '.join(map(str, classes[:20]))}",
        )
    return [overrides.get(str(c), humanize(str(c))) for c in classes]


def class_prompts(names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """``prompts[c][t]``: template t filled with class name c."""
    return [[t.replace("{}", n) for t in templates] for n in names]
