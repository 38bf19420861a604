"""The representation ladder's frozen rungs: zero-shot, probes, retrieval, their costs, and run directories."""

from .classify import run_probe, run_zeroshot, zeroshot_classifier
from .compare import Comparison, format_comparison, run_comparison
from .prepare import Prepared, prepare
from .retrieve import run_retrieval
from .runs import RunResult, data_provenance, default_run_dir, write_run

__all__ = [
    "Comparison",
    "Prepared",
    "RunResult",
    "data_provenance",
    "default_run_dir",
    "format_comparison",
    "prepare",
    "run_comparison",
    "run_probe",
    "run_retrieval",
    "run_zeroshot",
    "write_run",
    "zeroshot_classifier",
]
