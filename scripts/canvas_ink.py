"""How much ink each browser-canvas style leaves after the sketch normaliser, against the bitmaps.

For the training drawings of a prepared split that have pen-stroke records (line i of
``<strokes>/<class>.ndjson`` is QuickDraw bitmap i), both the 28×28 bitmap and each canvas style
of ``images.CANVAS_STYLES`` (or each ``--style``) go through ``normalize_sketch``; the script
prints, per style, the median ratio of the canvas's ink (summed darkness) to its bitmap's. A ratio
far from 1 is a style that the normaliser's re-stroking does not bring to the bitmaps' line
weight; ``images.STROKE_WIDTH`` is the width at which the median over the styles is nearest 1
(docs/quality.md, "A calibrated normaliser"). Training drawings only, so nothing held out is
looked at.

    python scripts/canvas_ink.py --split-seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sbir_engine.config import EngineConfig
from sbir_engine.data import read_quickdraw_bitmaps, read_stroke_records, split_indices
from sbir_engine.images import CANVAS_STYLES, normalize_sketch, render_strokes


def ink(image) -> float:
    return float((255 - np.asarray(image, dtype=np.float64)).sum() / 255)


def canvas_style(text: str) -> tuple[int, int, bool]:
    size, pen, *rgba = text.split(",")
    return int(size), int(pen), rgba == ["rgba"]


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--split-seed", type=int, default=0, help="prepare-data --seed of the split")
    parser.add_argument("--strokes", type=Path, default=EngineConfig().canvas_strokes)
    parser.add_argument(
        "--style",
        dest="styles",
        action="append",
        type=canvas_style,
        help="SIZE,PEN[,rgba]: a canvas style to measure instead of CANVAS_STYLES (repeatable), e.g. "
        "the page's 400 px canvas with its pen slider at 1 and at 30: --style 400,1,rgba --style 400,30,rgba",
    )
    args = parser.parse_args()
    config = EngineConfig()
    styles = args.styles or list(CANVAS_STYLES)
    ratios: dict[tuple, list[float]] = {style: [] for style in styles}
    for label in config.classes:
        records = read_stroke_records(args.strokes, label)
        bitmaps = read_quickdraw_bitmaps(config.quickdraw_tarball, label)
        split = split_indices(len(bitmaps), config.split, f"{args.split_seed}:sketch:{label}")
        training = set(split["train"])
        for i, record in enumerate(records):
            if i not in training:
                continue
            bitmap_ink = ink(normalize_sketch(bitmaps[i], config.sketch_raster))
            for style in styles:
                canvas = normalize_sketch(render_strokes(record["drawing"], *style), config.sketch_raster)
                ratios[style].append(ink(canvas) / bitmap_ink)
    print(f"{len(ratios[styles[0]])} training drawings with strokes (split seed {args.split_seed})")
    for (size, width, rgba), values in ratios.items():
        name = f"canvas {size}px pen {width}{' RGBA' if rgba else ''}"
        print(f"{name:26s} ink / bitmap ink: median {np.median(values):.2f}")
    print(f"median over the styles: {np.median([np.median(v) for v in ratios.values()]):.3f}")


if __name__ == "__main__":
    main()
