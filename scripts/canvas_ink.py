"""How much ink each browser-canvas style leaves after the sketch normaliser, against the bitmaps.

For the training drawings of a prepared split that have pen-stroke records (line i of
``<strokes>/<class>.ndjson`` is QuickDraw bitmap i), both the 28×28 bitmap and each canvas style
of ``images.CANVAS_STYLES`` (or each ``--style``) go through ``normalize_sketch``; the script
prints, per style, the median ratio of the canvas's ink (summed darkness) to its bitmap's. A ratio
far from 1 is a style that the normaliser's re-stroking does not bring to the bitmaps' line
weight; ``images.STROKE_WIDTH`` is the width at which the median over the styles is nearest 1
(docs/quality.md, "A calibrated normaliser"). A second table gives how that ink is laid down: of
the grey pixels (darker than 224), the share that is near-black (darker than 32) and their number
per drawing, for the bitmaps and each style (docs/quality.md, "Drawn as QuickDraw drew its
bitmaps"). Training drawings only, so nothing held out is looked at.

    python scripts/canvas_ink.py --split-seed 0
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from sbir_engine import images
from sbir_engine.config import EngineConfig
from sbir_engine.data import read_quickdraw_bitmaps, read_stroke_records, split_indices
from sbir_engine.images import CANVAS_STYLES, canvas_style_name, normalize_sketch, render_strokes

REPO = Path(__file__).resolve().parent.parent


def normaliser_at(revision: str):
    """``normalize_sketch`` as ``sbir_engine/images.py`` had it at ``revision``, with that revision's
    ``paper.py`` beside it where it had one (the page handling lived in ``images.py`` until then)."""
    package = Path(tempfile.mkdtemp()) / f"sbir_engine_at_{abs(hash(revision)):x}"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("images.py", "paper.py"):
        shown = subprocess.run(
            ["git", "show", f"{revision}:sbir_engine/{name}"], cwd=REPO, capture_output=True, text=True
        )
        if shown.returncode == 0:
            (package / name).write_text(shown.stdout)
        elif name == "images.py":
            raise SystemExit(f"no sbir_engine/images.py at {revision}: {shown.stderr.strip()}")
    sys.path.insert(0, str(package.parent))
    return importlib.import_module(f"{package.name}.images").normalize_sketch


def normaliser_versions(against: str | None) -> dict[str, Callable]:
    """This checkout's sketch normaliser as "here", and ``against``'s beside it when a revision is given."""
    versions = {"here": images.normalize_sketch}
    if against:
        versions[against] = normaliser_at(against)
    return versions


@contextmanager
def normalising_with(normaliser: Callable):
    """Let every query sketch go through ``normaliser`` inside the block; the original after it."""
    saved = images.normalize_sketch
    images.normalize_sketch = normaliser
    try:
        yield
    finally:
        images.normalize_sketch = saved


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
    parser.add_argument("--against", help="a git revision whose sketch normaliser is scored beside this one")
    args = parser.parse_args()
    config = EngineConfig()
    styles = args.styles or list(CANVAS_STYLES)
    drawings = []  # (bitmap, strokes) of the split's training drawings
    for label in config.classes:
        records = read_stroke_records(args.strokes, label)
        bitmaps = read_quickdraw_bitmaps(config.quickdraw_tarball, label)
        split = split_indices(len(bitmaps), config.split, f"{args.split_seed}:sketch:{label}")
        drawings += [(bitmaps[i], records[i]["drawing"]) for i in split["train"] if i < len(records)]
    versions = normaliser_versions(args.against)
    # 28 px bitmaps skip the canvas treatment: they come out the same under every version.
    bitmaps = [normalize_sketch(bitmap, config.sketch_raster) for bitmap, _ in drawings]
    bitmap_ink = [ink(bitmap) for bitmap in bitmaps]
    canvases = {
        (version, style): [normalise(render_strokes(s, *style), config.sketch_raster) for _, s in drawings]
        for version, normalise in versions.items()
        for style in styles
    }
    medians = {
        key: float(np.median(np.array([ink(canvas) for canvas in normalised]) / bitmap_ink))
        for key, normalised in canvases.items()
    }
    print(f"{len(drawings)} training drawings with strokes (split seed {args.split_seed})")
    print(f"{'canvas ink / bitmap ink, median':32s}" + "".join(f"{v:>10s}" for v in versions))
    for style in styles:
        print(f"{canvas_style_name(*style):32s}" + "".join(f"{medians[v, style]:10.2f}" for v in versions))
    overall = [np.median([medians[v, style] for style in styles]) for v in versions]
    print(f"{'median over the styles':32s}" + "".join(f"{value:10.3f}" for value in overall))
    # Equal ink can be spread thin or kept dark: how many grey pixels carry it, and how many are near-black.
    print(f"\n{'grey levels: near-black share, grey px':32s}" + "".join(f"{v:>16s}" for v in versions))
    print(f"{'the bitmaps':32s}" + grey_levels(bitmaps) * len(versions))
    for style in styles:
        print(f"{canvas_style_name(*style):32s}" + "".join(grey_levels(canvases[v, style]) for v in versions))


def grey_levels(images: list) -> str:
    """Of the pixels darker than 224, the share darker than 32, and their number per drawing."""
    pixels = np.concatenate([np.asarray(image).ravel() for image in images])
    grey = pixels[pixels < 224]
    return f"{(grey < 32).mean():9.2f}{grey.size / len(images):7.0f}"


if __name__ == "__main__":
    main()
