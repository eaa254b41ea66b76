"""The canvas check of trained runs on chosen splits' drawings, and a normaliser change measured against
an earlier revision's in the same process.

For each run folder (``train --out``), ``evaluate_canvas`` scores the drawings with pen-stroke records
in ``--drawings`` (``val`` chooses a change without the test split; default: every drawing the run has
not trained on) as 28×28 bitmaps and as canvases; with ``--against REV`` the canvases are scored a
second time through ``normalize_sketch`` as ``sbir_engine/images.py`` had it at that git revision. Prints
each run's per-style top-1, its gap (bitmap top-1 minus the worst style's) and its mean canvas top-1,
then per prepared split the medians over its runs, and their mean (docs/quality.md, "A calibrated
normaliser"); the medians pool every run given on a split, so give one recipe's runs at a time:

    python scripts/canvas_check.py --drawings val --against 8935994 runs/e12-s0 runs/e12-s1 ...
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from canvas_ink import normaliser_versions, normalising_with

from sbir_engine.embed import Embedder
from sbir_engine.evaluate import evaluate_canvas
from sbir_engine.model import load_model


def canvas_styles(report: dict) -> dict[str, float]:
    """Each canvas style's top-1 in an ``evaluate_canvas`` report."""
    return {name: value for name, value in report.items() if name.startswith("canvas ")}


def gap_and_mean(report: dict) -> tuple[float, float]:
    styles = canvas_styles(report).values()
    return 100 * (report["bitmap"] - min(styles)), statistics.mean(styles)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders written by `train --out`")
    parser.add_argument(
        "--drawings",
        choices=("train", "val", "test", "unseen"),
        default="unseen",
        help="whose drawings: unseen (the default) counts those the run has not trained on; train those "
        "whose bitmaps it learnt, which asks only whether canvases follow their bitmaps",
    )
    parser.add_argument("--against", help="a git revision whose sketch normaliser is scored beside this one")
    parser.add_argument("--strokes", type=Path, help="quickdraw-strokes folder (default: the run's config)")
    parser.add_argument(
        "--misses", action="store_true", help="list the drawings that canvases lose and their bitmaps win"
    )
    args = parser.parse_args()
    versions = normaliser_versions(args.against)
    splits = None if args.drawings == "unseen" else (args.drawings,)
    by_split: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    misses: dict[str, Counter] = defaultdict(Counter)  # per version: (drawing, recognised) -> styles × runs
    for run in args.runs:
        # The Keras graph, not a derived LiteRT file: nothing is written into the run folders.
        embedder = Embedder(load_model(run), runtime="tf")
        config = embedder.config
        line = []
        for name, normaliser in versions.items():
            with normalising_with(normaliser):
                report = evaluate_canvas(
                    embedder, args.strokes or config.canvas_strokes, config.quickdraw_tarball, splits
                )
            misses[name].update({(m["drawing"], m["recognized"]): len(m["wrong"]) for m in report["misses"]})
            gap, mean = gap_and_mean(report)
            by_split[config.split_seed][f"{name} gap"].append(gap)
            by_split[config.split_seed][f"{name} mean canvas"].append(mean)
            styles = " ".join(f"{v:.3f}" for v in canvas_styles(report).values())
            line.append(f"{name}: styles {styles}, gap {gap:.1f}, mean {mean:.3f}")
        print(
            f"{run} ({report['drawings']} drawings, bitmaps {report['bitmap']:.3f}) " + " | ".join(line),
            flush=True,
        )
    for key in next(iter(by_split.values())):
        medians = {seed: statistics.median(values[key]) for seed, values in sorted(by_split.items())}
        per_split = ", ".join(f"split {seed} {value:.3f}" for seed, value in medians.items())
        print(f"{key}: {per_split}; mean over splits {statistics.mean(medians.values()):.3f}")
    for name, counts in misses.items() if args.misses else ():
        lost = sum(counts.values())
        print(f"{name}: {lost} canvases lost where the bitmap won (styles × runs), by drawing:")
        for (drawing, recognised), count in counts.most_common():
            print(f"  {drawing:16s} {count:3d}  {'' if recognised else 'not '}recognized by Google")


if __name__ == "__main__":
    main()
