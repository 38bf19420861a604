"""Data sources: one spec string each, parsed in one place, dispatched through a registry of prefixes.

Specs: ``folder:PATH``, ``csv:PATH``, ``jsonl:PATH``, ``parquet:PATH`` (options after ``?``, e.g.
``csv:pairs.csv?image=img_path&text=caption``), packaged sets ``openclipart``, ``emoji``, ``emoji:subcategory``,
``fashion-mnist``, WebDataset shards ``wds:DIR/{00000..00099}.tar``. A bare existing directory reads as
``folder:``, a bare ``.csv``/``.jsonl``/``.parquet`` file as its format. ``load_dataset`` is the only place that
turns a spec into a ``Dataset``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import EncoderlabError, UnknownNameError, close_matches
from ..specs import parse_options, split_query
from .images import IMAGE_EXTENSIONS
from .manifest import Dataset, is_valid_text, safe_text
from .splits import DEFAULT_RATIOS, check_ratios


@dataclass
class SourceResult:
    """What a source loader returns: manifest rows plus everything it left out and why."""

    table: pd.DataFrame
    root: Path
    skipped: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    split_info: dict[str, Any] | None = None  # None: "source" when the table has splits, else none


# loader(target, options, *, columns, data_home) -> SourceResult
SourceLoader = Callable[..., SourceResult]


@dataclass(frozen=True)
class SourceKind:
    prefix: str
    loader: SourceLoader
    description: str
    options: tuple[str, ...] = ()
    example: str = ""
    takes_columns: bool = False


@dataclass(frozen=True)
class ParsedSource:
    prefix: str
    target: str
    options: dict[str, str]


_SOURCES: dict[str, SourceKind] = {}
_BUILTINS_LOADED = False

# File extensions that make a bare path mean a tabular source.
_FILE_KINDS = {
    ".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"
}


def register_source(
    prefix: str,
    loader: SourceLoader,
    description: str,
    *,
    options: tuple[str, ...] = (),
    example: str = "",
    takes_columns: bool = False,
) -> None:
    """Register a loader for specs ``prefix:target?option=value``."""
    _SOURCES[prefix] = SourceKind(prefix, loader, description, tuple(options), example, takes_columns)


def _load_builtins() -> None:
    # Builtin sources register on import; kept lazy so importing one module does not import them all.
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from . import packaged, tabular, wds  # noqa: F401


def list_sources() -> dict[str, str]:
    """Registered prefixes and what they read."""
    _load_builtins()
    return {p: k.description for p, k in sorted(_SOURCES.items())}


def parse_source_spec(spec: str) -> ParsedSource:
    """Split ``PREFIX:TARGET?k=v&...`` into its parts; unknown prefixes and options fail with close matches."""
    _load_builtins()
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise EncoderlabError(f"empty data source spec {spec!r}", "e.g. folder:path/to/images or csv:pairs.csv")
    text = os.fspath(spec).strip() if isinstance(spec, os.PathLike) else spec.strip()
    body, query, _ = split_query(text)
    head, sep, rest = body.partition(":")
    if sep and head in _SOURCES:
        prefix, target = head, rest
    elif not sep and head in _SOURCES:
        prefix, target = head, ""
    elif os.path.isdir(body):
        prefix, target = "folder", body
    elif os.path.isfile(body) and Path(body).suffix.lower() in _FILE_KINDS:
        prefix, target = _FILE_KINDS[Path(body).suffix.lower()], body
    else:
        choices = [p + ":" for p in sorted(_SOURCES)]
        probe = head + ":" if sep else head
        guess = close_matches(probe, choices)
        hint = f"did you mean {', '.join(guess)}?" if guess else f"known: {', '.join(choices)}"
        if sep:
            raise UnknownNameError(f"unknown data source prefix {head + ':'!r} in {text!r}; {hint}")
        raise UnknownNameError(
            f"data source {text!r} is neither an existing directory/file nor a known source; {hint} "
            f"(known: {', '.join(choices)})"
        )
    kind = _SOURCES[prefix]
    options = parse_options(query, dict.fromkeys(kind.options, str), spec=text, what=f"{prefix}: data source",
                            allow_empty=True)
    return ParsedSource(prefix, target, options)


def load_dataset(
    spec: str,
    *,
    columns: Mapping[str, str | None] | None = None,
    splits: Mapping[str, float] | str | bool | None = None,
    seed: int | str = 0,
    data_home: str | os.PathLike | None = None,
) -> Dataset:
    """Read a data source into a ``Dataset``.

    ``columns`` maps manifest names (``id``, ``image``, ``text``, ``label``, ``split``) to the file's column
    names for tabular sources (options in the spec win). ``splits``: None keeps the source's splits and
    hash-splits 80/10/10 by id when it has none; ``"source"`` requires the source's splits; a ratio mapping
    re-splits every item by id hash with ``seed``; False leaves items without splits.
    ``data_home`` is where packaged sets live (default ``encoderlab.paths.data_dir()``).
    """
    parsed = parse_source_spec(spec)
    kind = _SOURCES[parsed.prefix]
    if columns and not kind.takes_columns:
        raise EncoderlabError(f"columns= applies to csv:, jsonl: and parquet: sources, not {parsed.prefix}:")
    home = Path(data_home).expanduser() if data_home is not None else None
    result = kind.loader(parsed.target, parsed.options, columns=dict(columns or {}), data_home=home)
    spec_text = os.fspath(spec) if isinstance(spec, os.PathLike) else str(spec).strip()
    if result.table.empty:
        reasons = Counter(str(s.get("reason")) for s in result.skipped)
        why = f"; skipped: {dict(reasons)}" if reasons else ""
        raise EncoderlabError(f"data source {spec_text!r} has no usable items{why}", "check the path and its contents")
    ds = Dataset(result.table, source=spec_text, root=result.root, skipped=result.skipped,
                 split_info=result.split_info, info=result.info)
    return apply_split_policy(ds, splits, seed)


def apply_split_policy(ds: Dataset, splits: Mapping[str, float] | str | bool | None, seed: int | str) -> Dataset:
    """Apply ``load_dataset``'s ``splits`` argument (see there)."""
    has = ds.table["split"].notna()
    if splits is False or splits == "none":
        table = ds.table.copy()
        table["split"] = pd.Series([None] * len(table), index=table.index, dtype=object)
        return ds.derive(table, split_info={"method": "none"})
    if isinstance(splits, Mapping):
        return ds.with_splits(check_ratios(splits), seed)
    if splits not in (None, "source"):
        raise EncoderlabError(
            f"splits={splits!r} is not understood",
            'use None (source splits, else 80/10/10), "source", False, or ratios like {"train": 0.9, "test": 0.1}',
        )
    if has.all():
        return ds
    if has.any():
        raise EncoderlabError(
            f"{ds.source!r}: {int((~has).sum())} of {len(has)} items have no split while the others do",
            "fill the split column for every row, or pass splits=RATIOS to re-split everything by id hash",
        )
    if splits == "source":
        raise EncoderlabError(f"{ds.source!r} defines no splits", "pass splits=None or ratios to make hash splits")
    return ds.with_splits(DEFAULT_RATIOS, seed)


# ---------------------------------------------------------------------------------------------------- folder

# Folder names recognised as splits, and the split name each one gives.
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

#: Reasons a source reports for an entry that did not become an item (image check reasons: ``images.REASONS``).
LISTING_REASONS = (
    "bad-filename",  # the file or folder name is not valid UTF-8 (see manifest.is_valid_text)
    "bad-row",  # a table row that is not a record (invalid JSON, not an object)
    "bad-value",  # a table cell of the wrong kind (a number where a path belongs, a dict as a caption, bad text)
    "conflict",  # rows of one item disagree on its label or split
    "empty-row",  # a table row with neither an image nor a text
    "not-a-file",
    "not-a-split-folder",
    "not-an-image",  # no image file extension
    "not-in-a-class-folder",
    "symlink-loop",  # a symlinked folder that leads back to the dataset root or a folder above it
    "symlink-other-class",  # a symlinked folder into another class folder: its images would get the wrong label
    "unreadable",
    "missing",
    "is-a-directory",
)


def bad_filename(path: str, what: str = "file") -> dict[str, Any]:
    """The skip entry for a path whose name is not valid UTF-8, shown with ``\\xNN`` escapes."""
    return {"path": safe_text(path), "reason": "bad-filename",
            "detail": f"the {what} name is not valid UTF-8 (bytes shown as \\xNN); rename it to use it"}


def check_path_name(path: str | os.PathLike, what: str) -> None:
    """Refuse a dataset root (or table file) whose own path is not valid UTF-8: every item under it would be."""
    text = os.fspath(path)
    if not is_valid_text(text):
        raise EncoderlabError(
            f"{what} '{safe_text(text)}' has a name that is not valid UTF-8 (bytes shown as \\xNN)",
            "rename the folder or file with the \\xNN bytes (or move the data somewhere with a UTF-8 path)",
        )


def _visible_entries(directory: str, skipped: list[dict[str, Any]]) -> list[os.DirEntry] | None:
    """Non-hidden entries of ``directory`` sorted by name; names that are not valid UTF-8 go to ``skipped``."""
    try:
        with os.scandir(directory) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        skipped.append({"path": directory, "reason": "unreadable", "detail": e.strerror or str(e)})
        return None
    good = []
    for e in entries:
        if is_valid_text(e.name):
            good.append(e)
        else:
            skipped.append(bad_filename(e.path, "folder" if _entry_is_dir(e) else "file"))
    return good


def _entry_is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _within(path: str, folder: str) -> bool:
    """Whether real path ``path`` is ``folder`` or lies inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclass
class _Classes:
    """Real paths of the dataset root and of every class folder, so a symlinked folder that leads back into the
    dataset can be told from one that brings in images from elsewhere."""

    root: str
    owners: dict[str, str] = field(default_factory=dict)  # real path -> class folder path relative to the root

    def problem(self, target: str, own: str) -> tuple[str, str] | None:
        """(reason, detail) when following a folder that resolves to ``target`` from class folder ``own`` (a real
        path) would loop or relabel another class's images; None when it is safe to follow."""
        if _within(self.root, target) or _within(own, target):
            return "symlink-loop", f"leads back to {target} (the dataset root or a folder above this one)"
        for real, name in self.owners.items():
            if real != own and (_within(target, real) or _within(real, target)):
                return "symlink-other-class", f"leads into class folder {name!r}; its images would get the wrong label"
        return None


def _walk_files(top: str, skipped: list[dict[str, Any]], classes: _Classes | None = None) -> Iterator[tuple[str, str]]:
    """(path, path relative to ``top``) of files under ``top``: recursive, symlinks followed, loops cut,
    hidden entries ignored; problems recorded in ``skipped``.

    With ``classes``, a symlinked folder leading back to the dataset root, above ``top``, or into another class
    folder is not followed (``symlink-loop`` / ``symlink-other-class``): its files would be listed twice or under
    the wrong label. Symlinked folders pointing outside the dataset are followed.
    """
    own = os.path.realpath(top)
    seen = {own}
    stack = [(top, "")]
    while stack:
        directory, rel_dir = stack.pop()
        entries = _visible_entries(directory, skipped)
        if entries is None:
            continue
        subdirs = []
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            if _entry_is_dir(e):
                real = os.path.realpath(e.path)
                problem = classes.problem(real, own) if classes is not None and e.is_symlink() else None
                if problem is None and real in seen:
                    problem = ("symlink-loop", f"leads to {real}, already listed")
                if problem is not None:
                    skipped.append({"path": e.path, "reason": problem[0], "detail": problem[1]})
                else:
                    seen.add(real)
                    subdirs.append((e.path, rel))
                continue
            try:
                is_file = e.is_file()
            except OSError:
                is_file = False
            if is_file:
                yield e.path, rel
            elif e.is_symlink():
                skipped.append({"path": e.path, "reason": "missing", "detail": "dangling symlink"})
            else:
                skipped.append({"path": e.path, "reason": "not-a-file"})
        stack.extend(reversed(subdirs))


def list_folder(root: str | os.PathLike, *, ignore: tuple[str, ...] = ()) -> SourceResult:
    """Read an image-folder tree: ``[split/]class/**/image``.

    If ``root`` holds any of ``train/ val/ valid/ validation/ test/``, those are the splits and the class
    folders are inside them. A class folder's images are found recursively (its nested sub-folders stay in the
    ``subfolder`` column). A level without sub-folders holds unlabelled images. Files without an image
    extension are reported in ``skipped`` as ``not-an-image``; hidden files are ignored; names that are not valid
    UTF-8 are reported as ``bad-filename``. Symlinked folders are followed unless they lead back into the dataset
    (``symlink-loop``, ``symlink-other-class``), so no image is ever listed under a class folder it is not in.
    """
    root_path = Path(root).expanduser().absolute()
    check_path_name(root_path, "folder")
    if not root_path.exists():
        raise EncoderlabError(f"folder {str(root)!r} does not exist", "give the directory holding the class folders")
    if not root_path.is_dir():
        raise EncoderlabError(f"folder source {str(root)!r} is a file, not a directory",
                              "use csv:/jsonl:/parquet: for tables, or a directory for folder:")
    skipped: list[dict[str, Any]] = []
    top = _visible_entries(str(root_path), skipped)
    if top is None:
        raise EncoderlabError(f"cannot read folder {str(root_path)!r}: {skipped[-1].get('detail')}")
    top = [e for e in top if e.name not in ignore]
    split_dirs = [e for e in top if _entry_is_dir(e) and e.name.lower() in SPLIT_FOLDERS]
    # (directory, split, entries) of each container level: the split folders, or the root itself.
    levels: list[tuple[str, str | None, list[os.DirEntry]]] = []
    if split_dirs:
        for e in top:
            if e in split_dirs:
                continue
            reason = "not-a-split-folder" if _entry_is_dir(e) else "not-in-a-class-folder"
            skipped.append({"path": e.path, "reason": reason, "detail": "the root holds split folders"})
        for e in split_dirs:
            entries = _visible_entries(e.path, skipped)
            if entries is not None:
                levels.append((e.path, SPLIT_FOLDERS[e.name.lower()], entries))
        split_info = {"method": "source", "folders": {e.name: SPLIT_FOLDERS[e.name.lower()] for e in split_dirs}}
    else:
        levels.append((str(root_path), None, top))
        split_info = None
    classes = _class_folders(root_path, levels, skipped)
    rows: list[dict[str, Any]] = []
    for directory, split, entries in levels:
        _read_level(directory, root_path, split, rows, skipped, entries, classes)
    table = pd.DataFrame(rows, columns=["id", "image", "texts", "label", "split", "subfolder"])
    if not table.empty and not table["subfolder"].astype(bool).any():
        table = table.drop(columns="subfolder")
    table = table.sort_values("id", kind="stable").reset_index(drop=True)
    return SourceResult(table, root_path, skipped, {}, split_info)


def _class_folders(root: Path, levels: list[tuple[str, str | None, list[os.DirEntry]]],
                   skipped: list[dict[str, Any]]) -> _Classes:
    """Register every class folder's real path; drop (and report) class folders that are symlinks back into the
    dataset, e.g. ``kitty -> cat`` (cat's images again, labelled kitty) or ``val -> train``'s classes.

    Folders reached without a symlink claim their real path first, so the original keeps its images, not the alias.
    """
    root_real = os.path.realpath(root)
    classes = _Classes(root_real)
    candidates = []
    for directory, _, entries in levels:
        rel_level = os.path.relpath(directory, root)
        for e in entries:
            if _entry_is_dir(e):
                rel = e.name if rel_level == "." else os.path.join(rel_level, e.name)
                real = os.path.realpath(e.path)
                direct = real == os.path.join(root_real, rel)
                candidates.append((not direct, e, Path(rel).as_posix(), real))
    dropped: set[str] = set()
    for indirect, e, rel, real in sorted(candidates, key=lambda c: c[0]):  # stable: direct folders first, in order
        problem = None
        if not indirect:
            pass  # a real sub-folder of the tree can neither contain the root nor nest in a sibling class folder
        elif _within(root_real, real):
            problem = ("symlink-loop", f"leads back to {real} (the dataset root or a folder above it)")
        else:
            for other, name in classes.owners.items():
                if _within(real, other) or _within(other, real):
                    problem = ("symlink-other-class", f"leads into class folder {name!r}; its images would be "
                               f"listed again under class {e.name!r}")
                    break
        if problem is not None:
            skipped.append({"path": e.path, "reason": problem[0], "detail": problem[1]})
            dropped.add(e.path)
        else:
            classes.owners[real] = rel
    for i, (directory, split, entries) in enumerate(levels):
        levels[i] = (directory, split, [e for e in entries if e.path not in dropped])
    return classes


def _read_level(
    directory: str,
    root: Path,
    split: str | None,
    rows: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
    entries: list[os.DirEntry],
    classes: _Classes,
) -> None:
    """One container level (the root or a split folder): class sub-folders, or unlabelled images."""
    level = os.path.relpath(directory, root)
    prefix = "" if level == "." else Path(level).as_posix() + "/"
    class_dirs = [e for e in entries if _entry_is_dir(e)]
    files = [e for e in entries if not _entry_is_dir(e)]
    if class_dirs:
        for f in files:
            skipped.append({"path": f.path, "reason": "not-in-a-class-folder"})
        for d in class_dirs:
            before = len(rows)
            for path, rel in _walk_files(d.path, skipped, classes):
                _add_file(path, f"{prefix}{d.name}/", rel, d.name, split, rows, skipped)
            if len(rows) == before:
                where = f" in split {split!r}" if split else ""
                raise EncoderlabError(
                    f"class folder {d.path!r} (class {d.name!r}{where}) has no usable images",
                    f"add images with one of the extensions {sorted(IMAGE_EXTENSIONS)} or remove the folder",
                )
    else:
        for f in files:
            if os.path.isfile(f.path):
                _add_file(f.path, prefix, f.name, None, split, rows, skipped)
            else:
                skipped.append({"path": f.path, "reason": "missing", "detail": "dangling symlink"})


def _add_file(path: str, id_prefix: str, rel: str, label: str | None, split: str | None,
              rows: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> None:
    if os.path.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
        skipped.append({"path": path, "reason": "not-an-image", "detail": "not an image file extension"})
        return
    rows.append({
        "id": id_prefix + rel,
        "image": path,
        "texts": [],
        "label": label,
        "split": split,
        "subfolder": rel.rpartition("/")[0],
    })


def _load_folder(target: str, options: dict[str, str], *, columns: dict, data_home: Path | None) -> SourceResult:
    if not target:
        raise EncoderlabError("folder: needs a path", "e.g. folder:path/to/images")
    return list_folder(target)


register_source(
    "folder",
    _load_folder,
    "image folders: [train|val|test/]CLASS/**/IMAGE (label = class folder name)",
    example="folder:path/to/images",
)
