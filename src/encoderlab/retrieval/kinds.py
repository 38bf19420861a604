"""Index kinds, the rule ``--kind auto`` follows, and the FAISS objects each kind builds and searches with.

Every kind searches L2-normalised embeddings by inner product (cosine similarity):

==========  ====================================  =====================  ==============================
kind        FAISS index                           bytes per vector       search knob (tuned on build)
==========  ====================================  =====================  ==============================
flat        ``Flat`` (exact)                      4·d                    none: exact
hnsw        ``HNSW32,Flat`` (efConstruction 40)   4·d + 8·M + 16         efSearch
ivf-flat    ``IVF{nlist},Flat``                   4·d + 8                nprobe
sq8         ``IVF{nlist},SQ8`` (8-bit scalars)    d + 8                  nprobe
ivf-pq      ``IVF{nlist},PQ{m}x4fs[,Refine(..)]`` m/2 + 8 [+ 2·d or d]   nprobe (and k_factor with Refine)
==========  ====================================  =====================  ==============================

The rule of ``--kind auto`` for N items of d dimensions and a memory budget B (``--memory``, default 4G; the
budget is the index's size, which is what searching it at full speed keeps in memory):

1. N < 50,000: ``flat``: exact, nothing to tune (at 100k x 512-d it still answers ~600 batched queries/s on 2 cores).
2. else the first kind whose estimated size fits in B, in this order: ``hnsw`` (fastest at high recall, no
   training), ``ivf-flat`` (exact vectors, a little smaller than HNSW), ``sq8`` (4x smaller, 8-bit vectors, recall
   close to ivf-flat's), ``ivf-pq`` (smallest: the largest code of m = d/4, d/8, d/16 or d/32 sub-vectors of 4
   bits that fits; its recall is lower and is measured like every other).
3. HNSW's recall can level off below the target however large efSearch grows (on tightly clustered data its graph
   has islands: 0.86 at efSearch 1024 on the 1M synthetic set of ``bench/index.py``), while an IVF kind reaches any
   recall as nprobe grows. So when the HNSW that auto chose misses the target, the next kind that fits is built
   instead, and ``index.json`` records the HNSW attempt under ``choice.fallback_from``.
4. nothing fits: an error naming the smallest size and the ``--memory`` that would hold it.

IVF kinds use nlist = 4·sqrt(N) rounded to a power of two, at most 65,536 and 1/40 of the vectors available for
training (FAISS wants 39 per list); they train on a sample of 40·nlist vectors (ivf-pq: at least 10,000), none of
them a query held out for measuring.
``ivf-pq`` asked for by name adds a re-ranking copy when it fits besides the codes (``Refine(SQfp16)``, else
``Refine(SQ8)``): the candidates the codes find, ``k_factor``·k of them, are re-scored exactly enough to reach
recall 0.95; the copy is memory-mapped from the index file on load, so it is read from disk, not held in RAM.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import EncoderlabError
from .backend import require_faiss

KINDS = ("flat", "hnsw", "ivf-flat", "sq8", "ivf-pq")
KIND_CHOICES = ("auto", *KINDS)
FLAT_BELOW = 50_000
DEFAULT_MEMORY = 4 << 30
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
MAX_NLIST = 65_536
TRAIN_PER_LIST = 40  # FAISS warns below 39 training vectors per list
MIN_TRAIN_PQ = 10_000  # the PQ codebooks (16 centroids per sub-vector) want a few thousand vectors whatever nlist
IVF_KINDS = ("ivf-flat", "sq8", "ivf-pq")
REFINES = ("fp16", "sq8", "none")
_REFINE_FACTORY = {"fp16": "Refine(SQfp16)", "sq8": "Refine(SQ8)"}

_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_memory(text: str | int) -> int:
    """``"4G"``, ``"512M"``, ``"1.5GB"``, ``"2GiB"`` or a byte count -> bytes (powers of 1024)."""
    if isinstance(text, int):
        value = text
    else:
        m = _MEMORY_RE.match(str(text))
        if not m:
            raise EncoderlabError(f"cannot read the memory budget {text!r}", "write e.g. 4G, 512M or 1.5GB")
        value = int(float(m.group(1)) * 1024 ** "bkmgt".index((m.group(2) or "b").lower()))
    if value <= 0:
        raise EncoderlabError(f"the memory budget must be positive, got {text!r}", "write e.g. 4G or 512M")
    return value


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5K``; ``3.2e9`` -> ``3.0G`` (powers of 1024, as ``--memory`` reads them)."""
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


@dataclass(frozen=True)
class IndexPlan:
    """What to build: a kind, its build parameters, how big it will be and why it was chosen."""

    kind: str
    dim: int
    count: int
    params: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    estimated_bytes: int = 0

    @property
    def factory(self) -> str:
        """The ``faiss.index_factory`` string of this plan."""
        p = self.params
        if self.kind == "flat":
            return "Flat"
        if self.kind == "hnsw":
            return f"HNSW{p['M']},Flat"
        base = f"IVF{p['nlist']},"
        if self.kind == "ivf-flat":
            return base + "Flat"
        if self.kind == "sq8":
            return base + "SQ8"
        refine = _REFINE_FACTORY.get(p.get("refine", "none"))
        return base + f"PQ{p['m']}x4fs" + (f",{refine}" if refine else "")

    @property
    def needs_training(self) -> bool:
        return self.kind in IVF_KINDS

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "factory": self.factory, "params": dict(self.params), "reason": self.reason,
                "estimated_bytes": self.estimated_bytes}


def nlist_for(n: int, train_rows: int | None = None) -> int:
    """4·sqrt(n) rounded to a power of two, at most ``MAX_NLIST`` and ``train_rows``/40 (the vectors available for
    training, default n: FAISS wants 39 per list)."""
    avail = n if train_rows is None else train_rows
    if n < 2 or avail < 2 * TRAIN_PER_LIST:
        return 1
    target = 2 ** round(math.log2(4 * math.sqrt(n)))
    cap = 2 ** int(math.log2(avail // TRAIN_PER_LIST))
    return int(max(1, min(target, cap, MAX_NLIST)))


def train_size(plan: IndexPlan) -> int:
    """How many vectors the IVF kinds train on (0 for kinds without training)."""
    if not plan.needs_training:
        return 0
    want = TRAIN_PER_LIST * plan.params["nlist"]
    if plan.kind == "ivf-pq":
        want = max(want, MIN_TRAIN_PQ)
    return int(want)


def estimate_bytes(kind: str, n: int, d: int, params: dict[str, Any]) -> int:
    """Size of an index of ``n`` vectors (what loading it without memory-mapping takes)."""
    if kind == "flat":
        return n * 4 * d
    if kind == "hnsw":
        return n * (4 * d + 8 * params["M"] + 16)
    lists = params["nlist"] * 4 * d
    if kind == "ivf-flat":
        return n * (4 * d + 8) + lists
    if kind == "sq8":
        return n * (d + 8) + lists + 8 * d
    refine = {"fp16": 2 * d, "sq8": d}.get(params.get("refine", "none"), 0)
    return n * ((params["m"] + 1) // 2 + 8 + refine) + lists + params["m"] * 16 * 4 * (d // params["m"])


def pq_sizes(d: int) -> list[int]:
    """The PQ sub-vector counts tried, largest code first: d/4, d/8, d/16, d/32 (those that divide d), else d."""
    found = [d // s for s in (4, 8, 16, 32) if d % s == 0 and d // s >= 2]
    return found or [d]


def _params(kind: str, n: int, d: int, memory: int, refine: str | None, train_rows: int | None) -> dict[str, Any]:
    """Build parameters of ``kind`` for ``n`` x ``d``: for ivf-pq the largest code (and most precise re-ranking copy,
    unless ``refine`` names one) that fits ``memory``, else the smallest; the caller compares sizes with the budget."""
    if kind == "hnsw":
        return {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}
    if kind == "flat":
        return {}
    nlist = nlist_for(n, train_rows)
    if kind != "ivf-pq":
        return {"nlist": nlist}
    refines = [refine] if refine else list(REFINES)
    for m in pq_sizes(d):
        for r in refines:
            p = {"nlist": nlist, "m": m, "nbits": 4, "refine": r}
            if estimate_bytes("ivf-pq", n, d, p) <= memory:
                return p
    return {"nlist": nlist, "m": pq_sizes(d)[-1], "nbits": 4, "refine": refines[-1]}


def choose_plan(n: int, d: int, kind: str = "auto", memory: int | str = DEFAULT_MEMORY,
                refine: str | None = None, train_rows: int | None = None, skip: tuple[str, ...] = ()) -> IndexPlan:
    """The kind and build parameters for ``n`` vectors of ``d`` dimensions (the rule in the module docstring).

    ``refine`` (ivf-pq only): ``fp16``, ``sq8`` or ``none``; None = the most precise that fits (``none`` under auto).
    ``train_rows``: vectors available for training IVF kinds (default n; the build holds its queries out).
    ``skip``: kinds auto passes over (the fallback after HNSW missed the recall target).
    """
    budget = parse_memory(memory)
    if kind not in KIND_CHOICES:
        from ..errors import close_matches

        guess = close_matches(kind, list(KIND_CHOICES))
        raise EncoderlabError(f"unknown index kind {kind!r}", (f"did you mean {guess[0]!r}? " if guess else "")
                              + f"use one of {', '.join(KIND_CHOICES)}")
    if refine is not None and refine not in REFINES:
        raise EncoderlabError(f"unknown re-ranking copy {refine!r}", f"use one of {', '.join(REFINES)}")
    if n < 1:
        raise EncoderlabError("nothing to index: 0 items", "index a dataset with usable items")
    if kind != "auto":
        params = _params(kind, n, d, budget, refine, train_rows)
        size = estimate_bytes(kind, n, d, params)
        note = "" if size <= budget else f" (over the {format_bytes(budget)} budget: asked for by name)"
        return IndexPlan(kind, d, n, params, f"asked for --kind {kind}{note}", size)
    if n < FLAT_BELOW:
        return IndexPlan("flat", d, n, {}, f"{n:,} items < {FLAT_BELOW:,}: exact search is fast enough",
                         estimate_bytes("flat", n, d, {}))
    for k in (k for k in ("hnsw", "ivf-flat", "sq8", "ivf-pq") if k not in skip):
        params = _params(k, n, d, budget, (refine or "none") if k == "ivf-pq" else None, train_rows)
        size = estimate_bytes(k, n, d, params)
        if size <= budget:
            return IndexPlan(k, d, n, params, f"{n:,} items: the first kind of hnsw, ivf-flat, sq8, ivf-pq that fits "
                             f"--memory {format_bytes(budget)} ({format_bytes(size)})", size)
    raise _too_big("ivf-pq", n, d, budget)


def _too_big(kind: str, n: int, d: int, budget: int) -> EncoderlabError:
    """The error when not even the smallest index fits the budget."""
    smallest = estimate_bytes("ivf-pq", n, d, {"nlist": nlist_for(n), "m": pq_sizes(d)[-1], "refine": "none"})
    return EncoderlabError(
        f"{n:,} vectors of {d} dimensions do not fit --memory {format_bytes(budget)} as {kind} (the smallest index, "
        f"ivf-pq with {pq_sizes(d)[-1]} sub-vectors, takes {format_bytes(smallest)})",
        f"raise --memory to at least {format_bytes(smallest * 1.1)}, or index fewer items (--split)")


# ---------------------------------------------------------------------------------------------------- FAISS


def new_index(plan: IndexPlan) -> Any:
    """An empty FAISS index for ``plan`` (inner product)."""
    faiss = require_faiss()
    index = faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":
        index.hnsw.efConstruction = plan.params["efConstruction"]
    return index


def search_knobs(plan_kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """The tunable search settings a kind has, with their current values (empty for flat)."""
    if plan_kind == "hnsw":
        return {"efSearch": int(params.get("efSearch", 64))}
    if plan_kind in IVF_KINDS:
        knobs = {"nprobe": int(params.get("nprobe", 8))}
        if params.get("refine", "none") != "none":
            knobs["k_factor"] = int(params.get("k_factor", 4))
        return knobs
    return {}


def search_parameters(kind: str, knobs: dict[str, Any], k: int, ntotal: int, nlist: int | None,
                      allowed: np.ndarray | None = None) -> Any:
    """FAISS ``SearchParameters`` for one search of ``k`` results, or None (defaults, no filter).

    HNSW explores at least k candidates (efSearch >= k); IVF probes enough lists to hold about 2·k vectors, so a
    large k still gets k results. ``allowed``: rows (int64) the results are restricted to; both then widen the
    search by the share of rows left out (HNSW at most 16x), since the filter drops candidates after they are found.
    """
    faiss = require_faiss()
    sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64)) if allowed is not None else None
    extra: dict[str, Any] = {"sel": sel} if sel is not None else {}
    reachable = max(1, min(ntotal, len(allowed))) if allowed is not None else max(ntotal, 1)
    if kind == "hnsw":
        widen = min(16, math.ceil(ntotal / reachable))
        return faiss.SearchParametersHNSW(efSearch=max(int(knobs["efSearch"]), k) * widen, **extra)
    if kind in IVF_KINDS:
        nl = int(nlist or 1)
        need = math.ceil(2 * k * nl / reachable)
        ivf = faiss.SearchParametersIVF(nprobe=int(min(nl, max(int(knobs["nprobe"]), need))), **extra)
        if "k_factor" in knobs:
            out = faiss.IndexRefineSearchParameters(k_factor=float(knobs["k_factor"]), base_index_params=ivf)
            out._keep = (ivf, sel)  # the C++ object points at these: keep the Python owners alive with it
            return out
        ivf._keep = sel
        return ivf
    return faiss.SearchParameters(**extra) if sel is not None else None


def apply_knobs(index: Any, kind: str, knobs: dict[str, Any]) -> None:
    """Store the tuned settings in the index object itself, so a plain ``index.search`` uses them too."""
    faiss = require_faiss()
    if kind == "hnsw":
        index.hnsw.efSearch = int(knobs["efSearch"])
    elif kind in IVF_KINDS:
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = int(knobs["nprobe"])
        if "k_factor" in knobs and hasattr(index, "k_factor"):
            index.k_factor = float(knobs["k_factor"])
