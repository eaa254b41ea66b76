"""Scale check for the FAISS index choice: does the chosen index reach recall@10 ≥ 0.95 at ≥ 10× exact QPS?

For each gallery size it builds the index that ``choose_factory`` picks for the memory budget
(default: 1/4 of --total-memory-gib, i.e. what ``build-index`` picks on such a machine), tunes it
with ``tune_search`` exactly as a build does (falling back to the next candidate when tuning
cannot reach recall 0.95, as a build does), and measures on held-out queries:

    chosen index, estimated memory, resident memory added, build + tune time,
    recall@10 against exact search, QPS one query at a time and in one batch, vs exact (IndexFlatIP)

Data: synthetic, NOT uniform random (a worst case no embedding model produces). A two-level
mixture of Gaussians on the unit sphere, like class-structured embeddings: 20 "class" directions;
n/500 clusters around them (cosine ~0.7 to their class); each point = cluster centre + a
16-dimensional Gaussian patch (the cluster's own random subspace) + small isotropic noise,
L2-normalised. Queries are fresh draws from the same mixture, not in the gallery.

Usage (one run at 1M needs ~6 GB and, on 2 cores, tens of minutes for HNSW):

    python scripts/scale_check.py --sizes 10000,100000 --out scale_check.json
    python scripts/scale_check.py --sizes 1000000 --total-memory-gib 24
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sbir_engine.index import GalleryIndex  # noqa: E402
from sbir_engine.index_factory import (  # noqa: E402
    DEFAULT_MEMORY_FRACTION,
    TARGET_RECALL,
    estimate_memory,
    factory_candidates,
    make_faiss_index,
    recall_at_k,
    tune_search,
)

CLASSES, LATENT, PATCH, NOISE = 20, 16, 0.5, 0.1


def mixture(n: int, dim: int, seed: int, n_clusters: int) -> np.ndarray:
    """n unit vectors from the two-level mixture (the mixture itself is fixed by seed 0)."""
    structure = np.random.default_rng(0)
    classes = _unit(structure.normal(size=(CLASSES, dim)))
    spread = structure.normal(size=(n_clusters, dim)) / np.sqrt(dim)  # norm ~1: cosine ~0.7 to the class
    centres = _unit(classes[np.arange(n_clusters) % CLASSES] + spread)
    rng = np.random.default_rng(seed)
    which = np.sort(rng.integers(0, n_clusters, n))
    out = np.empty((n, dim), np.float32)
    start = 0
    for cluster, count in zip(*np.unique(which, return_counts=True), strict=True):
        basis = np.linalg.qr(np.random.default_rng(1000 + cluster).normal(size=(dim, LATENT)))[0]
        patch = rng.normal(size=(count, LATENT)) @ basis.T * (PATCH / np.sqrt(LATENT))  # norm ~PATCH
        noise = rng.normal(size=(count, dim)) * (NOISE / np.sqrt(dim))  # norm ~NOISE
        out[start : start + count] = _unit(centres[cluster] + patch + noise)
        start += count
    return out[rng.permutation(n)]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def qps(search, queries: np.ndarray, one_at_a_time: bool, budget_s: float = 20.0) -> float:
    """Queries per second; stops early (on whole queries) after budget_s."""
    started = time.perf_counter()
    if not one_at_a_time:
        search(queries)
        return len(queries) / (time.perf_counter() - started)
    done = 0
    for query in queries:
        search(query[None])
        done += 1
        if time.perf_counter() - started > budget_s:
            break
    return done / (time.perf_counter() - started)


def check(n: int, dim: int, budget: int, n_queries: int) -> dict:
    print(f"\n== {n:,} vectors × {dim} ==", flush=True)
    t = time.perf_counter()
    vectors = mixture(n, dim, seed=1, n_clusters=max(50, n // 500))
    queries = mixture(n_queries, dim, seed=2, n_clusters=max(50, n // 500))
    generated = time.perf_counter() - t
    ids = np.arange(n, dtype=np.int64)
    candidates = factory_candidates(n, dim, budget)
    print(f"candidates {candidates} (budget {budget / 2**30:.1f} GiB); data in {generated:.0f} s", flush=True)
    attempts = []
    for attempt, factory in enumerate(candidates):  # as FaissTarget.commit: fall back if tuning fails
        index = None
        before = resident_bytes()
        t = time.perf_counter()
        index = make_faiss_index(vectors, ids, factory)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        name, value, tuned_recall = tune_search(index, vectors, factory)
        tune_s = time.perf_counter() - t
        added = resident_bytes() - before
        attempts.append(
            {"factory": factory, "build_s": round(build_s, 2), "tune_s": round(tune_s, 2),
             "search_parameter": [name, value], "recall_at_10_tuning": round(tuned_recall, 4)}
        )  # fmt: skip
        print(f"{factory}: built in {build_s:.0f} s, {name}={value}, recall {tuned_recall:.3f}", flush=True)
        if tuned_recall >= TARGET_RECALL or attempt == len(candidates) - 1:
            break
    meta = {"factory": factory, "dim": dim}
    gallery = GalleryIndex(index, vectors, np.zeros((n, 1), np.float32), ids, [], meta)

    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    _, truth = exact.search(queries, 10)
    _, found = gallery.search(queries, 10)
    recall = recall_at_k(found, truth)

    def approximate(q):
        return gallery.search(q, 10)

    def brute(q):
        return exact.search(q, 10)

    single = qps(approximate, queries, True)
    single_exact = qps(brute, queries, True)
    batch = qps(approximate, queries, False)
    batch_exact = qps(brute, queries, False)
    result = {
        "n": n,
        "dim": dim,
        "factory": factory,
        "attempts": attempts,
        "search_parameter": [name, value],
        "memory_estimate_bytes": estimate_memory(factory, n, dim),
        "resident_added_bytes": added,
        "build_s": round(build_s, 2),
        "build_and_tune_s_all_attempts": round(sum(a["build_s"] + a["tune_s"] for a in attempts), 2),
        "tune_s": round(tune_s, 2),
        "recall_at_10_tuning": round(tuned_recall, 4),
        "recall_at_10_heldout": round(recall, 4),
        "qps_single": round(single, 1),
        "qps_single_exact": round(single_exact, 1),
        "speedup_single": round(single / single_exact, 1),
        "qps_batch": round(batch, 1),
        "qps_batch_exact": round(batch_exact, 1),
        "speedup_batch": round(batch / batch_exact, 1),
    }
    result["passes"] = recall >= 0.95 and (factory == "Flat" or result["speedup_single"] >= 10)
    print(
        f"recall@10 {recall:.3f} (tuning {tuned_recall:.3f}); one-at-a-time {single:,.0f} QPS vs exact "
        f"{single_exact:,.0f} ({result['speedup_single']}×); batch {batch:,.0f} vs {batch_exact:,.0f} "
        f"({result['speedup_batch']}×); memory est. {result['memory_estimate_bytes'] / 2**20:,.0f} MiB, "
        f"+{added / 2**20:,.0f} MiB resident",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated gallery sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--total-memory-gib", type=float, default=24.0, help="the machine to choose for")
    parser.add_argument("--budget-gib", type=float, default=0, help="override the budget (default: 1/4)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="FAISS threads (default: all cores)")
    parser.add_argument("--out", default="scale_check.json")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    budget = int((args.budget_gib or args.total_memory_gib * DEFAULT_MEMORY_FRACTION) * 2**30)
    machine = {
        "cpus": os.cpu_count(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "faiss": faiss.__version__,
    }
    print(f"machine: {machine}", flush=True)
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        results.append(check(n, args.dim, budget, args.queries))
        partial = {"machine": machine, "budget_bytes": budget, "results": results}
        Path(args.out).write_text(json.dumps(partial))
    machine["load_average_at_end"] = os.getloadavg()
    Path(args.out).write_text(
        json.dumps({"machine": machine, "budget_bytes": budget, "results": results}, indent=2) + "\n"
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
