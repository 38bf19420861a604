"""Progress bars: tqdm when enabled, a silent stand-in otherwise, one switch for every long loop."""

from __future__ import annotations

from typing import Any


class NullBar:
    """Does nothing, with tqdm's methods used here (update, set_postfix, close; context manager)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NullBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_bar(total: int | None, unit: str, enabled: bool, desc: str | None = None, *,
                 leave: bool | None = None) -> Any:
    """A tqdm bar (stderr) when ``enabled``, else a ``NullBar``; ``leave`` defaults to "only when untitled"."""
    if not enabled:
        return NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, smoothing=0.1,
                leave=(desc is None) if leave is None else leave)
