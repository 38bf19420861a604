"""One registry type for every pluggable kind (encoders, encoder prefixes, data sources, rungs, saved model kinds).

``Registry[T]`` maps names to entries; an unknown name fails with close matches and the known names, and
``list(pattern)`` filters by glob or substring, like timm's ``list_models('*vit*')``. Builtins register on import;
a registry can be told which modules to import lazily so that ``import encoderlab`` stays light.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from .errors import UnknownNameError, close_matches

T = TypeVar("T")


def matches(name: str, pattern: str | None) -> bool:
    """Glob match when ``pattern`` has wildcards, else case-insensitive substring; None matches everything."""
    if not pattern:
        return True
    pat = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    return fnmatch.fnmatch(name.lower(), pat.lower())


class Registry(Generic[T]):
    """Named entries of one kind (``what`` names the kind in error messages, e.g. "rung").

    ``builtins`` are module paths imported on first use; their import registers the builtin entries.
    """

    def __init__(self, what: str, builtins: Sequence[str] = ()) -> None:
        self.what = what
        self._entries: dict[str, T] = {}
        self._builtins = tuple(builtins)
        self._loaded = not builtins

    def load_builtins(self) -> None:
        """Import the builtin modules once (their import registers the builtin entries)."""
        if not self._loaded:
            self._loaded = True
            for module in self._builtins:
                importlib.import_module(module)

    def register(self, name: str, entry: T, *, replace: bool = True) -> T:
        """Add (or with ``replace``, overwrite) an entry; returns it so it can decorate."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} name must be a non-empty string, got {name!r}")
        if not replace and name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def peek(self, name: str) -> T | None:
        """The entry of ``name`` if registered, without importing builtins (None otherwise)."""
        return self._entries.get(name)

    def unregister(self, name: str) -> T | None:
        """Remove an entry (tests use this to undo their registrations); returns it, or None."""
        return self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry of ``name``; an unknown name raises ``UnknownNameError`` with close matches."""
        self.load_builtins()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            pass
        known = sorted(self._entries)
        guess = close_matches(str(name), known)
        hint = f"did you mean {', '.join(guess)}? " if guess else ""
        raise UnknownNameError(f"unknown {self.what} {name!r}; {hint}known: {', '.join(known) or 'none'}")

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted names, filtered by a glob or substring ``pattern``."""
        self.load_builtins()
        return sorted(n for n in self._entries if matches(n, pattern))

    def __contains__(self, name: object) -> bool:
        self.load_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        self.load_builtins()
        return sorted(self._entries.items())
