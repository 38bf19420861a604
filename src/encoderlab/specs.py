"""Spec strings — ``prefix:target?key=value&...`` — parsed in one place, with typed, validated options.

Encoders (``hf-vision:facebook/dinov2-small?pool=mean``) and data sources (``csv:pairs.csv?text=caption``) both use
``split_query`` and ``parse_options``, so an unknown option fails the same way everywhere: with the bad key, close
matches and the options that exist.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any

from .errors import EncoderlabError, close_matches


def split_query(spec: str) -> tuple[str, str, bool]:
    """``"body?query"`` -> ``(body, query, had_question_mark)``."""
    body, qmark, query = spec.partition("?")
    return body, query, bool(qmark)


def parse_options(
    query: str,
    allowed: Mapping[str, Any],
    *,
    spec: str,
    what: str,
    allow_empty: bool = False,
) -> dict[str, Any]:
    """Parse ``key=value&...`` (percent-decoded) against ``allowed`` (option name -> rule).

    A rule is a tuple of permitted strings or a converter such as ``int``. ``allow_empty`` lets ``key=`` through as
    the empty string (data sources use it to switch a column off). ``what`` names the spec kind in messages.
    """
    options: dict[str, Any] = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            guess = close_matches(key, sorted(allowed))
            hint = f"did you mean {guess[0]!r}? " if guess else ""
            raise EncoderlabError(f"unknown option {key!r} in {what} spec {spec!r}", f"{hint}options: {known}")
        if value == "":
            if allow_empty:
                options[key] = ""
                continue
            raise EncoderlabError(f"option {key!r} in {spec!r} has no value", f"write {key}=VALUE")
        rule = allowed[key]
        if isinstance(rule, tuple):
            if value not in rule:
                raise EncoderlabError(f"{key}={value!r} in {spec!r} is not valid", f"use one of {', '.join(rule)}")
            options[key] = value
        else:
            try:
                options[key] = rule(value)
            except ValueError as e:
                raise EncoderlabError(f"{key}={value!r} in {spec!r} is not a {rule.__name__}") from e
    return options
