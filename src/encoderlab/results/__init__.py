"""Results: ``RunResult``, the one run-directory writer and reader, and the text tables every front end prints."""

from .run import (
    SCHEMA_VERSION,
    RunResult,
    clean_numbers,
    data_provenance,
    default_run_dir,
    read_run,
    resolve_run_dir,
    slug,
    write_run,
)
from .tables import fmt, format_comparison, format_table, with_ci

__all__ = [
    "SCHEMA_VERSION",
    "RunResult",
    "clean_numbers",
    "data_provenance",
    "default_run_dir",
    "fmt",
    "format_comparison",
    "format_table",
    "read_run",
    "resolve_run_dir",
    "slug",
    "with_ci",
    "write_run",
]
