"""Two recipes scored on the same query sketches, compared query by query over several pairs of
runs (issue #5's "kept only if it helps", with a test behind it).

Give the ``evaluation.json`` files that ``sbir-engine evaluate --out`` wrote, the baseline's and the
candidate's in the same order (one pair per training seed or prepared split). For each pair, and for
all pairs pooled, it prints how many queries only one of the two gets right at top-1 and at top-3
with the exact McNemar p-value of that split, and the mean difference of the queries' AP (the
engine's ranking and the 512-d embedding's) with a bootstrap 95 % interval over the queries
(``sbir_engine.metrics.compare_queries``; one pair alone is ``sbir-engine evaluate --against``).
Pooled pairs that share queries (several training seeds on one split) are not independent, so the
pooled p-value flatters a difference.

    python scripts/compare_evaluations.py --baseline runs/eval-rf12-s0/evaluation.json ... \\
        --candidate runs/eval-rf12d02-s0/evaluation.json ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sbir_engine.metrics import compare_queries, format_comparison, paired_queries


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
        try:
            a, b = paired_queries(json.loads(baseline.read_text()), json.loads(candidate.read_text()))
        except (OSError, ValueError) as err:
            parser.error(f"{baseline} / {candidate}: {err}")
        print(format_comparison(f"{baseline} -> {candidate}", compare_queries(a, b)))
        pooled[0].extend(a)
        pooled[1].extend(b)
    if len(args.baseline) > 1:
        print(format_comparison(f"pooled over {len(args.baseline)} pairs", compare_queries(*pooled)))


if __name__ == "__main__":
    main()
