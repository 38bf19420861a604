"""User-facing errors: one line naming the bad value and the fix."""

from __future__ import annotations


class EncoderlabError(Exception):
    """An error caused by user input or environment, printed by the CLI as one line (no traceback).

    ``fix`` says what to do about it; it is appended to the message.
    """

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(f"{message} ({fix})" if fix else message)


class UnknownNameError(EncoderlabError, KeyError):
    """A registry lookup failed; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class CorruptStoreError(EncoderlabError):
    """An embedding shard failed its integrity check; it is refused, never read."""


class BadImageError(Exception):
    """An image that cannot be used; ``reason`` is short and stable (e.g. ``truncated``, ``zero-byte``)."""

    def __init__(self, path: str, reason: str, detail: str = "") -> None:
        self.path = path
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


def close_matches(value: str, choices: list[str], n: int = 5) -> list[str]:
    """Close matches by edit similarity, then by substring, so typos and partial names both help."""
    import difflib

    found = difflib.get_close_matches(value, choices, n=n, cutoff=0.5)
    low = value.lower()
    for c in choices:
        if len(found) >= n:
            break
        if c not in found and (low in c.lower() or c.lower() in low):
            found.append(c)
    return found
