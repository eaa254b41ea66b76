"""Two recipes scored on the same query sketches, compared query by query (issue #5's "kept only if
it helps", with a test behind it).

Give the ``evaluation.json`` files that ``sbir-engine evaluate --out`` wrote, the baseline's and the
candidate's in the same order (one pair per training seed or prepared split). For each pair, and for
all pairs pooled, it prints how many queries only one of the two gets right at top-1 and at top-3
with the exact McNemar p-value of that split, and the mean difference of the queries' AP (the
engine's ranking and the 512-d embedding's) with a bootstrap 95 % interval over the queries.
Pooled pairs that share queries (several training seeds on one split) are not independent, so the
pooled p-value is a lower bound on the real one.

    python scripts/compare_evaluations.py --baseline runs/eval-rf12-s0/evaluation.json ... \\
        --candidate runs/eval-rf12d02-s0/evaluation.json ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sbir_engine.metrics import bootstrap_interval, mcnemar_exact


def paired_queries(baseline: Path, candidate: Path) -> tuple[list[dict], list[dict]]:
    """The two reports' per-query records of the queries both scored, in the same order."""
    records = []
    for path in (baseline, candidate):
        report = json.loads(Path(path).read_text())
        if "per_query" not in report:
            raise SystemExit(f"{path} has no per-query records: evaluate it again with this sbir-engine")
        records.append({q["path"]: q for q in report["per_query"] if q["rank"] is not None})
    shared = sorted(records[0].keys() & records[1].keys())
    if not shared:
        raise SystemExit(f"{baseline} and {candidate} share no query: compare runs on the same sketches")
    return [records[0][p] for p in shared], [records[1][p] for p in shared]


def compare(baseline: list[dict], candidate: list[dict]) -> dict:
    """Per top-k: queries only the baseline / only the candidate gets right, and McNemar's p; per AP:
    the candidate's mean gain and its bootstrap interval."""
    rank_a = np.array([q["rank"] for q in baseline])
    rank_b = np.array([q["rank"] for q in candidate])
    result: dict = {"queries": len(rank_a)}
    for k in (1, 3):
        hit_a, hit_b = rank_a <= k, rank_b <= k
        only_a, only_b = int(np.sum(hit_a & ~hit_b)), int(np.sum(hit_b & ~hit_a))
        result[f"top-{k}"] = (hit_a.mean(), hit_b.mean(), only_a, only_b, mcnemar_exact(only_a, only_b))
    for name in ("AP", "AP 512-d"):
        gain = np.array([b[name] - a[name] for a, b in zip(baseline, candidate, strict=True)])
        result[name] = (gain.mean(), *bootstrap_interval(gain))
    return result


def print_comparison(title: str, result: dict) -> None:
    print(f"{title} ({result['queries']} queries)")
    for k in (1, 3):
        a, b, only_a, only_b, p = result[f"top-{k}"]
        print(
            f"  top-{k}  {a:.3f} -> {b:.3f}  only the baseline right {only_a:3d}, "
            f"only the candidate {only_b:3d}  McNemar p = {p:.3f}"
        )
    for name in ("AP", "AP 512-d"):
        mean, low, high = result[name]
        print(f"  {name:8s} mean gain {mean:+.4f}  95 % interval [{low:+.4f}, {high:+.4f}]")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", nargs="+", type=Path, required=True, help="evaluation.json files")
    parser.add_argument("--candidate", nargs="+", type=Path, required=True, help="in the same order")
    args = parser.parse_args()
    if len(args.baseline) != len(args.candidate):
        parser.error("give as many --candidate files as --baseline files: they are compared in pairs")
    pooled: tuple[list[dict], list[dict]] = ([], [])
    for baseline, candidate in zip(args.baseline, args.candidate, strict=True):
        a, b = paired_queries(baseline, candidate)
        print_comparison(f"{baseline} -> {candidate}", compare(a, b))
        pooled[0].extend(a)
        pooled[1].extend(b)
    if len(args.baseline) > 1:
        print_comparison(f"pooled over {len(args.baseline)} pairs", compare(*pooled))


if __name__ == "__main__":
    main()
