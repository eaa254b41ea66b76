"""Which FAISS index a gallery gets, and how it is built and tuned (``build_index``'s inside).

Exact search up to FLAT_LIMIT vectors; beyond it the best type that fits the memory budget (HNSW,
then IVF, then IVF with 8-bit scalar or product-quantised codes, whose candidates are re-scored
exactly), each tuned to the smallest efSearch / nprobe that reaches TARGET_RECALL against exact
search. ``index.GalleryIndex`` holds the result; docs/scaling.md has the measurements.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable

import faiss
import numpy as np

FLAT_LIMIT = 50_000  # below this exact search is fast enough (a few ms on 2 cores)
TARGET_RECALL = 0.95
HNSW_M = 32
# Compressed codes rank candidates only approximately: this many × k candidates are re-scored
# exactly against vectors.npy (memory-mapped, so it costs page cache, not heap). 8-bit scalar
# codes need few; 8-bit PQ codes of 8 dimensions each need more (measured: recall@10 ≥ 0.97).
REFINE_FACTOR = {"SQ": 4, "PQ": 16}
DEFAULT_MEMORY_FRACTION = 0.25
# Python-side bytes per entry of a loaded index: the manifest (Entry objects and their strings,
# measured at ~400 B), the id → row dict, ids.npy and FAISS's IndexIDMap2 id tables.
ENTRY_OVERHEAD = 700


def default_memory_budget() -> int:
    """The index's share of this machine's memory: 1/4 of RAM (6 GiB on a 24 GiB machine)."""
    return int(_total_memory() * DEFAULT_MEMORY_FRACTION)


def ivf_lists(n: int) -> int:
    """IVF list count: the power of two nearest 4·sqrt(n) (FAISS's guideline for up to ~10M)."""
    return max(1, 1 << int(round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))))


class IndexTypeError(ValueError):
    """A FAISS index type (``--index-type``) that cannot be used here, with the reason."""


# The types estimate_memory models: what factory_candidates chooses from (HNSW's M, IVF's lists,
# 8-bit codes). Others chosen with --index-type get no estimate rather than a wrong one.
_HNSW = re.compile(r"HNSW(\d*)(?:,Flat)?")
_IVF = re.compile(r"IVF(\d+)(?:,(Flat|SQ8|PQ(\d+)(?:x8)?))?")


def estimate_memory(factory: str, n: int, dim: int, n_classes: int = 16) -> int | None:
    """Resident bytes of a loaded index: the FAISS structure, class probabilities and manifest.

    ``vectors.npy`` is memory-mapped and not counted: a query never touches it except to re-score
    the few candidates of a compressed index (REFINE_FACTOR · k rows). None for a type it does
    not model (one chosen with ``--index-type``).
    """
    per_entry = ENTRY_OVERHEAD + 4 * n_classes
    fixed = 0
    hnsw, ivf = _HNSW.fullmatch(factory), _IVF.fullmatch(factory)
    if factory == "Flat":
        codes = 4 * dim
    elif hnsw:
        m = int(hnsw.group(1) or HNSW_M)
        if m < 2:
            return None
        # Level 0 holds 2M links, higher levels M links for 1/M of the nodes; levels + offsets.
        codes = 4 * dim + 4 * 2 * m + 4 * m / (m - 1) + 12
    elif ivf:
        fixed = 4 * dim * int(ivf.group(1))  # the coarse quantizer's centroids
        code = ivf.group(2) or "Flat"
        if code == "Flat":
            codes = 4 * dim
        elif code == "SQ8":
            codes = dim
        else:
            codes = int(ivf.group(3))
            fixed += 4 * dim * 256  # PQ codebooks
        codes += 8  # the id stored beside each code in its inverted list
    else:
        return None
    return int(n * (codes + per_entry) + fixed)


def check_factory(factory: str, dim: int, n: int = 0) -> None:
    """Refuse an index type FAISS cannot make, or cannot train on ``n`` (> 0) vectors, before any
    image is embedded: said after embedding a gallery, the error would cost all that time."""
    try:
        index = faiss.downcast_index(faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT))
    except RuntimeError as err:
        raise IndexTypeError(
            f"--index-type {factory!r} is not a FAISS index type for {dim}-d inner-product vectors "
            f"({faiss_reason(err)})"
        ) from None
    if isinstance(index, faiss.IndexIDMap):  # ids are sbir-engine's own (IndexIDMap2 around the index)
        raise IndexTypeError(f"--index-type {factory!r}: leave out IDMap, sbir-engine maps ids itself")
    needed = _training_points(index)
    if 0 < n < needed:
        raise IndexTypeError(
            f"--index-type {factory!r} needs at least {needed} images to train on, the gallery has {n}: "
            "choose another (fewer IVF lists, no PQ) or leave --index-type out"
        )


def needs_training(factory: str, dim: int) -> bool:
    """Whether a ``factory`` index must be trained (IVF, PQ, SQ): an empty one cannot be built."""
    return not faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT).is_trained


def _training_points(index: faiss.Index) -> int:
    """The fewest vectors k-means can train ``index`` on: one per IVF list, 256 for 8-bit PQ."""
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    needed = getattr(index, "nlist", 0)
    pq = getattr(index, "pq", None)
    return max(needed, pq.ksub if pq is not None else 0)


def faiss_reason(err: Exception) -> str:
    """The reason in a FAISS error, on one line, without its C++ function and source line."""
    text = " ".join(str(err).split())
    text = re.sub(r"^Error in .*? at \S+:\d+: (?:Error: )?", "", text)
    return text.split(" failed: ", 1)[-1]


def choose_factory(n: int, dim: int, max_memory: int | None = None, n_classes: int = 16) -> str:
    """Exact search for small galleries, HNSW while it fits the budget, IVF beyond, then compressed.

    The budget (bytes, default :func:`default_memory_budget`) bounds :func:`estimate_memory`.
    IVF-SQ8 (4× smaller codes) and IVF-PQ (32× smaller) re-rank their candidates exactly
    (:func:`refine_factor`), so recall stays near the target. When even IVF-PQ does not fit,
    it is still returned (the smallest there is).
    """
    return factory_candidates(n, dim, max_memory, n_classes)[0]


def factory_candidates(
    n: int, dim: int, max_memory: int | None = None, n_classes: int = 16, rejected: Iterable[str] = ()
) -> list[str]:
    """The index types that fit the budget, best first (:func:`choose_factory` takes the first).

    A build falls back to the next one when tuning shows that a type cannot reach the target
    recall on this gallery (HNSW's graph can, on strongly clustered vectors); those are passed
    as ``rejected``.
    """
    if max_memory is None:
        max_memory = default_memory_budget()
    if n <= FLAT_LIMIT:
        return ["Flat"]
    nlist = ivf_lists(n)
    candidates = [
        f"HNSW{HNSW_M},Flat",
        f"IVF{nlist},Flat",
        f"IVF{nlist},SQ8",
        f"IVF{nlist},PQ{_pq_subquantizers(dim)}",
    ]
    fitting = [f for f in candidates if estimate_memory(f, n, dim, n_classes) <= max_memory]
    return [f for f in fitting if f not in set(rejected)] or fitting[-1:] or candidates[-1:]


def _pq_subquantizers(dim: int) -> int:
    """8 dimensions per 8-bit sub-quantizer, at most 64 (64 bytes a vector at 512-d)."""
    return next(m for m in (64, 32, 16, 8, 4, 2, 1) if dim % m == 0 and m <= max(dim // 8, 1))


def refine_factor(factory: str) -> int:
    """How many × k candidates a factory's approximate scores need re-scored exactly (0: none)."""
    codes = factory.split(",")[-1]
    return REFINE_FACTOR.get(codes[:2], 0) if "," in factory else 0


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


def make_faiss_index(vectors: np.ndarray, ids: np.ndarray, factory: str) -> faiss.Index:
    """Train (if needed) and fill an inner-product index with explicit ids."""
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not inner.is_trained:
        # k-means wants ≥ 39 points per list (FAISS warns below); more than that adds only time.
        nlist = getattr(faiss.downcast_index(inner), "nlist", 1)
        size = min(len(vectors), max(100_000, 40 * nlist))
        sample = vectors
        if size < len(vectors):
            sample = vectors[np.sort(np.random.default_rng(0).choice(len(vectors), size, replace=False))]
        inner.train(np.ascontiguousarray(sample, dtype=np.float32))
    index = faiss.IndexIDMap2(inner)
    if isinstance(faiss.downcast_index(inner), faiss.IndexHNSW):
        # One add: FAISS's HNSW built from several large batches links them badly (measured at
        # 200k × 512: recall@10 0.97 in one batch, 0.82 in four, whatever efSearch).
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
    else:
        add_in_chunks(index, vectors, ids)
    return index


def add_in_chunks(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, chunk: int = 100_000) -> None:
    """Add without a second full float32 copy of a (possibly memory-mapped) array."""
    for start in range(0, len(vectors), chunk):
        index.add_with_ids(
            np.ascontiguousarray(vectors[start : start + chunk], dtype=np.float32),
            np.ascontiguousarray(ids[start : start + chunk], dtype=np.int64),
        )


def set_search_parameter(index: faiss.Index, name: str | None, value: int | None) -> None:
    if name is None or value is None:
        return
    inner = faiss.downcast_index(index.index if hasattr(index, "index") else index)
    if name == "efSearch":
        inner.hnsw.efSearch = int(value)
    elif name == "nprobe":
        inner.nprobe = int(value)


def exact_neighbours(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the exact top-k by inner product, computed in blocks (no copy of ``vectors``)."""
    return exact_search(queries, vectors, k)[1]


def exact_search(
    queries: np.ndarray, vectors: np.ndarray, k: int, rows: np.ndarray | None = None, block: int = 200_000
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and row numbers of the exact top-k by inner product among ``rows`` of ``vectors`` (all
    of them by default), read ``block`` rows at a time: a memory-mapped file is never copied whole."""
    rows = np.arange(len(vectors)) if rows is None else rows
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_rows = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(rows), block):
        part = rows[start : start + block]
        chunk = np.ascontiguousarray(vectors[part], dtype=np.float32)
        scores, at = faiss.knn(queries, chunk, min(k, len(part)), metric=faiss.METRIC_INNER_PRODUCT)
        best_scores = np.concatenate([best_scores, scores], axis=1)
        best_rows = np.concatenate([best_rows, part[at]], axis=1)
        order = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(best_scores, order, 1)
        best_rows = np.take_along_axis(best_rows, order, 1)
    return best_scores, best_rows


def refine_exact(
    queries: np.ndarray, scores: np.ndarray, found: np.ndarray, vectors: np.ndarray, rows_of, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidate ids exactly (``rows_of(ids)`` → rows of ``vectors``) and keep the k best."""
    valid = found >= 0
    rows = rows_of(np.where(valid, found, found[valid][0] if valid.any() else 0))
    if not valid.any():
        return scores[:, :k], found[:, :k]
    candidates = np.asarray(vectors[rows.ravel()], dtype=np.float32).reshape(*rows.shape, -1)
    exact = np.einsum("qd,qcd->qc", queries, candidates)
    exact[~valid] = -np.finfo(np.float32).max
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(exact, order, 1), np.take_along_axis(np.where(valid, found, -1), order, 1)


def tune_search(
    index: faiss.Index, vectors: np.ndarray, factory: str, k: int = 10, sample: int = 500
) -> tuple[str | None, int | None, float]:
    """The smallest efSearch / nprobe whose recall@k against exact search reaches TARGET_RECALL.

    Queries come from a seeded sample of the gallery's own vectors, each moved in a random
    direction by its distance to its nearest other vector: a point of the gallery's distribution
    that is not in the gallery, as a new query is. (The vectors themselves would be too easy: an
    HNSW search for a stored vector lands on it and its links are its neighbours, so efSearch
    tuned that way can fall below what held-out queries need.) The value doubles until the
    target is met, then a bisection finds the smallest that meets it. Exact answers are computed
    in blocks, so tuning at 1M vectors needs no second copy of them.
    ``vectors`` must be in the order the ids were added to ``index``.
    """
    if factory == "Flat" or len(vectors) <= k:
        return None, None, 1.0
    name = "efSearch" if factory.startswith("HNSW") else "nprobe"
    queries = probe_queries(vectors, sample)
    ids = faiss.vector_to_array(index.id_map)
    truth = ids[exact_neighbours(queries, vectors, k)]
    refine = refine_factor(factory)
    order = np.argsort(ids, kind="stable")

    def rows_of(found: np.ndarray) -> np.ndarray:
        return order[np.searchsorted(ids, found, sorter=order)]

    def recall_at(value: int) -> float:
        set_search_parameter(index, name, value)
        scores, found = index.search(queries, min(len(ids), k * max(refine, 1)))
        if refine:
            scores, found = refine_exact(queries, scores, found, vectors, rows_of, k)
        return recall_at_k(found, truth)

    limit = 4096 if name == "efSearch" else getattr(faiss.downcast_index(index.index), "nlist", 1)
    # Not below FAISS's default efSearch (16): under it an HNSW search keeps hardly more than its k
    # candidates, and the probe queries flatter it there (a 60k gallery: efSearch 4 tuned to 0.95,
    # held-out queries 0.91).
    floor = 16 if name == "efSearch" else 1
    low, value = floor - 1, min(16, limit)  # low: the largest value known to miss the target
    results = {}
    while True:
        results[value] = recall_at(value)
        if results[value] >= TARGET_RECALL or value >= limit:
            break
        if value >= 256 and results[value] - results[low] < 0.005:
            break  # a plateau below the target: this index cannot reach it (see factory_candidates)
        low, value = value, min(value * 2, limit)
    if results[value] >= TARGET_RECALL:
        high = value
        while high - low > max(1, high // 8):  # within 1/8 of the smallest: a few more tries
            middle = (low + high) // 2
            results[middle] = recall_at(middle)
            low, high = (low, middle) if results[middle] >= TARGET_RECALL else (middle, high)
        value = high
    set_search_parameter(index, name, value)
    return name, value, results[value]


def probe_queries(vectors: np.ndarray, sample: int = 500, seed: int = 0) -> np.ndarray:
    """Sampled vectors, each moved by its nearest-neighbour distance in a random direction."""
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(vectors), min(sample, len(vectors)), replace=False))
    base = np.ascontiguousarray(vectors[picked], dtype=np.float32)
    nearest = exact_neighbours(base, vectors, 2)
    other = np.where(nearest[:, 0] == picked, nearest[:, 1], nearest[:, 0])
    cosine = np.einsum("qd,qd->q", base, np.asarray(vectors[other], dtype=np.float32))
    distance = np.sqrt(np.clip(2.0 - 2.0 * cosine, 0.0, None))
    direction = rng.normal(size=base.shape).astype(np.float32)
    direction -= np.einsum("qd,qd->q", direction, base)[:, None] * base  # along the sphere
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    queries = base + direction * distance[:, None]
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's true ids that were found."""
    k = truth.shape[1]
    hits = [len(set(a[a >= 0].tolist()) & set(b.tolist())) for a, b in zip(found, truth, strict=True)]
    return float(np.mean(hits)) / k
