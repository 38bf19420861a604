"""FAISS, imported once, with the install hint when it is missing and a sane OpenMP wait policy.

``faiss`` is an optional dependency (``pip install 'encoderlab[index]'``). Before its first import this module sets
``OMP_WAIT_POLICY=PASSIVE`` unless the user set it: FAISS's OpenMP threads otherwise spin while they wait, and on a
machine shared with other jobs that made the 16-centroid k-means of a 4-bit PQ 40x slower (2 cores at load 4:
7.6 s instead of 0.18 s); with PASSIVE it took 0.20 s. A GPU build of FAISS is used for exact (flat) search when
it sees a GPU (``gpu_count() > 0``); everything else runs on the CPU.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import EncoderlabError

INSTALL_HINT = "pip install 'encoderlab[index]' (or pip install faiss-cpu>=1.7.4)"

_faiss: Any = None


def require_faiss() -> Any:
    """The ``faiss`` module, or an ``EncoderlabError`` saying how to install it."""
    global _faiss
    if _faiss is None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            import faiss
        except ImportError as e:
            raise EncoderlabError(f"indexes need FAISS, which is not installed ({e})", INSTALL_HINT) from None
        _faiss = faiss
    return _faiss


def gpu_count() -> int:
    """GPUs a GPU build of FAISS can use (0 with faiss-cpu)."""
    faiss = require_faiss()
    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get is not None else 0
    except Exception:  # a GPU build without a usable driver answers by raising
        return 0


def to_gpu_if_available(index: Any) -> Any:
    """``index`` copied to every visible GPU when FAISS has GPU support, else ``index`` itself (used for flat)."""
    if gpu_count() <= 0:
        return index
    faiss = require_faiss()
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except Exception:  # out of GPU memory or an unsupported index: the CPU copy answers the same
        return index
