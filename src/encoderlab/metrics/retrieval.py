"""Image<->text retrieval metrics for galleries where an image has several captions and captions repeat.

Representation: ``image_emb [n_img, d]``, ``text_emb [n_txt, d]`` over *distinct* caption strings, and the
positive relation as parallel index arrays ``pair_img, pair_txt`` (text ``pair_txt[k]`` describes image
``pair_img[k]``; many-to-many). Keeping a shared caption ("a dog") once, with several positive images, is what
makes the ranks honest: stored once per image, each copy would be a query whose other correct images count
as misses, and a gallery item that ties with the right answer.

Scores are cosine similarities: both embedding sets are L2-normalised here, so callers need not do it.
The score matrix is never materialised whole; queries (and, for huge galleries, gallery items) are processed in
blocks, so memory is O(chunk_size x gallery block).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import EncoderlabError
from ..normalize import normalize_rows

#: gallery items scored per block; keeps a block of 1024 queries at <= 128 MiB of float32 scores
GALLERY_CHUNK = 32768


def _normalized(emb: np.ndarray, name: str) -> np.ndarray:
    """``emb`` as C-contiguous float32 rows of unit L2 norm; zero or non-finite rows are refused."""
    arr = np.asarray(emb)
    if arr.ndim != 2:
        raise EncoderlabError(f"{name} must be 2-D [n, d], got shape {arr.shape}", "pass one embedding row per item")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise EncoderlabError(f"{name} is empty (shape {arr.shape})", "pass at least one non-empty embedding")
    if arr.dtype.kind not in "iuf":
        raise EncoderlabError(f"{name} must be numeric, got dtype {arr.dtype}", "pass float embeddings")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise EncoderlabError(f"{name} holds NaN or infinite values", "check the encoder output")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if np.any(norms == 0):
        bad = int(np.flatnonzero(norms[:, 0] == 0)[0])
        raise EncoderlabError(f"{name} row {bad} is all zeros, so its cosine similarity is undefined",
                              "drop the item or fix the encoder output")
    return normalize_rows(arr)


def _indices(idx: np.ndarray | Sequence[int], name: str, n: int, what: str) -> np.ndarray:
    """A pair index array as int64, every entry in ``[0, n)``."""
    arr = np.asarray(idx)
    if arr.ndim != 1:
        raise EncoderlabError(f"{name} must be 1-D, got shape {arr.shape}", "pass one index per positive pair")
    if arr.size and (arr.dtype.kind not in "iu"):
        raise EncoderlabError(f"{name} must hold integer indices, got dtype {arr.dtype}", "pass int row indices")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        bad = int(arr[(arr < 0) | (arr >= n)][0])
        raise EncoderlabError(f"{name} holds index {bad}, out of range for {n} {what}",
                              f"indices must point at rows 0..{n - 1} of the {what} embeddings")
    return arr


def _validate(image_emb: np.ndarray, text_emb: np.ndarray, pair_img: np.ndarray | Sequence[int],
              pair_txt: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Normalised embeddings and checked pair arrays, with errors naming the bad value."""
    img = _normalized(image_emb, "image_emb")
    txt = _normalized(text_emb, "text_emb")
    if img.shape[1] != txt.shape[1]:
        raise EncoderlabError(f"image_emb has dimension {img.shape[1]} but text_emb has {txt.shape[1]}",
                              "embed images and texts with the same (joint-space) model")
    pi = _indices(pair_img, "pair_img", img.shape[0], "image")
    pt = _indices(pair_txt, "pair_txt", txt.shape[0], "text")
    if pi.size != pt.size:
        raise EncoderlabError(f"pair_img has {pi.size} entries but pair_txt has {pt.size}",
                              "pass parallel arrays: pair k links image pair_img[k] to text pair_txt[k]")
    if pi.size == 0:
        raise EncoderlabError("no positive (image, text) pairs given", "pass at least one matching pair")
    return img, txt, pi, pt


def _query_ranks(queries: np.ndarray, gallery: np.ndarray, pos_q: np.ndarray, pos_g: np.ndarray,
                 chunk_size: int, gallery_chunk: int) -> np.ndarray:
    """1-based rank of each query's best positive among non-positives; -1 for queries with no positive.

    Every positive scores <= the best positive by definition, so "gallery items scoring strictly above the
    best positive" are all negatives: counting them needs no positive mask. The best positive is read from
    the same matmul block that is compared against it, so ties are decided on identical float32 values.
    """
    n_q, n_g = queries.shape[0], gallery.shape[0]
    order = np.argsort(pos_q, kind="stable")
    pos_q, pos_g = pos_q[order], pos_g[order]
    ranks = np.full(n_q, -1, dtype=np.int64)
    g_blocks = [(g0, min(g0 + gallery_chunk, n_g)) for g0 in range(0, n_g, gallery_chunk)]
    for q0 in range(0, n_q, chunk_size):
        q1 = min(q0 + chunk_size, n_q)
        lo, hi = np.searchsorted(pos_q, [q0, q1])
        if lo == hi:
            continue  # no query in this chunk has a positive: nothing to rank
        rows, cols = pos_q[lo:hi] - q0, pos_g[lo:hi]
        best = np.full(q1 - q0, -np.inf, dtype=np.float32)
        q = queries[q0:q1]
        blocks: list[np.ndarray] = []
        for g0, g1 in g_blocks:
            s = q @ gallery[g0:g1].T
            sel = (cols >= g0) & (cols < g1)
            np.maximum.at(best, rows[sel], s[rows[sel], cols[sel] - g0])
            if len(g_blocks) == 1:
                blocks.append(s)  # one block: keep it rather than recompute it for the counting pass
        count = np.zeros(q1 - q0, dtype=np.int64)
        for b, (g0, g1) in enumerate(g_blocks):
            # recomputing a block gives bit-identical scores (same operands and shapes), so ties stay ties
            s = blocks[b] if blocks else q @ gallery[g0:g1].T
            count += np.count_nonzero(s > best[:, None], axis=1)
        has_pos = np.isfinite(best)
        ranks[q0:q1] = np.where(has_pos, count + 1, -1)
    return ranks


def _check_chunk(value: int, name: str) -> None:
    """Refuse a block size that is not a positive integer (0 would loop forever, a float would fail deep in numpy)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise EncoderlabError(f"{name} must be a positive integer, got {value!r}", "use e.g. 1024")


def retrieval_ranks(image_emb: np.ndarray, text_emb: np.ndarray, pair_img: np.ndarray | Sequence[int],
                    pair_txt: np.ndarray | Sequence[int], chunk_size: int = 1024, *,
                    gallery_chunk: int = GALLERY_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Rank of the best-ranked positive for every image query (over texts) and every text query (over images).

    rank = 1 + number of *non-positive* gallery items scoring strictly above the query's best positive, so a
    query's other positives never push it down and an exact tie with a negative counts in the query's favour.
    Queries with no positive get rank ``-1``; the metric helpers exclude them. Scores are float32 cosine
    similarities computed ``chunk_size`` queries (x ``gallery_chunk`` items) at a time.

    Returns ``(i2t_rank [n_img], t2i_rank [n_txt])`` as int64 arrays.
    """
    _check_chunk(chunk_size, "chunk_size")
    _check_chunk(gallery_chunk, "gallery_chunk")
    img, txt, pi, pt = _validate(image_emb, text_emb, pair_img, pair_txt)
    return _both_ranks(img, txt, pi, pt, int(chunk_size), int(gallery_chunk))


def _both_ranks(img: np.ndarray, txt: np.ndarray, pi: np.ndarray, pt: np.ndarray, chunk_size: int,
                gallery_chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(i2t, t2i) ranks of already validated, normalised inputs."""
    return (_query_ranks(img, txt, pi, pt, chunk_size, gallery_chunk),
            _query_ranks(txt, img, pt, pi, chunk_size, gallery_chunk))


def _valid(ranks: np.ndarray | Sequence[int]) -> np.ndarray:
    """Ranks of the queries that have a positive (rank >= 1); refuses an input where none do."""
    arr = np.asarray(ranks)
    if arr.ndim != 1:
        raise EncoderlabError(f"ranks must be 1-D, got shape {arr.shape}", "pass the output of retrieval_ranks")
    arr = arr[arr >= 1]
    if arr.size == 0:
        raise EncoderlabError("no query has a positive (all ranks are -1 or the input is empty)",
                              "check pair_img / pair_txt link the images and texts being evaluated")
    return arr


def per_query_hits(ranks: np.ndarray | Sequence[int], k: int) -> np.ndarray:
    """Boolean per ranked query (queries with rank -1 dropped): is the best positive within the top ``k``?

    Its mean is ``recall_at_k``, which is what bootstrap intervals resample.
    """
    if int(k) != k or k < 1:
        raise EncoderlabError(f"k must be a positive integer, got {k!r}", "use k >= 1, e.g. 1, 5 or 10")
    return _valid(ranks) <= k


def recall_at_k(ranks: np.ndarray | Sequence[int], k: int) -> float:
    """Fraction of ranked queries whose best positive is within the top ``k`` (R@k)."""
    return float(per_query_hits(ranks, k).mean())


def reciprocal_ranks(ranks: np.ndarray | Sequence[int]) -> np.ndarray:
    """1/rank per ranked query (queries with rank -1 dropped); its mean is the MRR."""
    return 1.0 / _valid(ranks)


def mean_reciprocal_rank(ranks: np.ndarray | Sequence[int]) -> float:
    """Mean of 1/rank over ranked queries (MRR): rewards near misses that R@1 ignores."""
    return float(reciprocal_ranks(ranks).mean())


def _chance_r1(n_queries: int, pos_q: np.ndarray, pos_g: np.ndarray, n_gallery: int) -> float:
    """Expected R@1 of a random gallery order: mean over ranked queries of (distinct positives / gallery size)."""
    distinct = np.unique(pos_q * n_gallery + pos_g)  # a repeated pair is still one positive
    n_pos = np.bincount(distinct // n_gallery, minlength=n_queries)
    return float((n_pos[n_pos > 0] / n_gallery).mean())


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, pair_img: np.ndarray | Sequence[int],
                      pair_txt: np.ndarray | Sequence[int], ks: Sequence[int] = (1, 5, 10),
                      chunk_size: int = 1024) -> dict[str, float]:
    """Flat retrieval summary in both directions.

    Keys, for ``d`` in ``i2t`` (image queries over texts) and ``t2i``: ``{d}_R@{k}`` for each k in ``ks``,
    ``{d}_mrr``, ``{d}_median_rank``, ``{d}_queries`` (queries with at least one positive; others are
    excluded) and ``{d}_chance_R@1`` (expected R@1 of a random ranking, to show how far above chance we are).
    """
    _check_chunk(chunk_size, "chunk_size")
    img, txt, pi, pt = _validate(image_emb, text_emb, pair_img, pair_txt)
    i2t, t2i = _both_ranks(img, txt, pi, pt, int(chunk_size), GALLERY_CHUNK)
    return metrics_from_ranks(i2t, t2i, pi, pt, ks)


def metrics_from_ranks(i2t: np.ndarray, t2i: np.ndarray, pair_img: np.ndarray, pair_txt: np.ndarray,
                       ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """The ``retrieval_metrics`` summary from ranks already computed by ``retrieval_ranks`` (no second scoring pass)."""
    pi, pt = np.asarray(pair_img, dtype=np.int64), np.asarray(pair_txt, dtype=np.int64)
    out: dict[str, float] = {}
    for d, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{d}_R@{k}"] = recall_at_k(ranks, k)
        out[f"{d}_mrr"] = mean_reciprocal_rank(ranks)
        out[f"{d}_median_rank"] = float(np.median(_valid(ranks)))
        out[f"{d}_queries"] = int(np.count_nonzero(np.asarray(ranks) >= 1))
    out["i2t_chance_R@1"] = _chance_r1(len(i2t), pi, pt, len(t2i))
    out["t2i_chance_R@1"] = _chance_r1(len(t2i), pt, pi, len(i2t))
    return out


def pairs_from_captions(captions_per_image: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Distinct caption strings (first-seen order) and the ``(pair_img, pair_txt)`` arrays linking them to images.

    Captions are deduplicated by exact string equality across all images, so a caption shared by several
    images becomes one text with several positive images. A caption repeated within one image is one pair.
    An image with no captions gets no pair (it is excluded as an i2t query).
    """
    if isinstance(captions_per_image, str):
        raise EncoderlabError("captions_per_image must be a list of caption lists, got a single string",
                              "pass e.g. [['a dog', 'a brown dog'], ['a cat']]")
    index: dict[str, int] = {}
    pair_img: list[int] = []
    pair_txt: list[int] = []
    for i, caps in enumerate(captions_per_image):
        if isinstance(caps, str):
            raise EncoderlabError(f"captions of image {i} are a single string ({caps!r:.60}), not a list",
                                  "wrap each image's captions in a list: [['a dog'], ['a cat']]")
        seen: set[int] = set()
        for cap in caps:
            if not isinstance(cap, str):
                raise EncoderlabError(f"caption of image {i} is a {type(cap).__name__} ({cap!r:.60}), not a string",
                                      "pass caption strings")
            j = index.setdefault(cap, len(index))
            if j not in seen:
                seen.add(j)
                pair_img.append(i)
                pair_txt.append(j)
    return list(index), np.asarray(pair_img, dtype=np.int64), np.asarray(pair_txt, dtype=np.int64)
