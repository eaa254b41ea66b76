"""Write QuickDraw's pen-stroke records as a gallery of drawings: ``OUT/<class>/<class>_<i>.png``.

Each record is drawn as a scan or a canvas export would hold it (``--size`` px, ``--pen`` px lines,
black on white), for measuring how ``build-index`` embeds drawings in a user's gallery
(README, "Drawings in the gallery"):

    python scripts/drawing_gallery.py --size 1000 --pen 2 --out /tmp/drawings
    sbir-engine build-index --model runs/default --gallery /tmp/drawings --out /tmp/as-photos --no-drawings
    sbir-engine build-index --model runs/default --gallery /tmp/drawings --out /tmp/as-drawings --drawings '*'
    sbir-engine evaluate --index /tmp/as-photos --queries data/sketch/test      # and /tmp/as-drawings

The mixed gallery of the README (photos and drawings): a copy of ``data/photo/test`` with each class's
drawings in ``<class>/drawings/`` (``--out /tmp/d``, then ``cp /tmp/d/<class>/*.png
<gallery>/<class>/drawings/``), built with ``--no-drawings`` and with ``--drawings drawings``.

Line i of ``<class>.ndjson`` is bitmap i of the QuickDraw package, so ``<class>_<i>`` is also the
name of its bitmap in the prepared dataset. ``--unseen RUN`` keeps only the drawings whose bitmaps
that run did not train on (its validation and test splits; the test split alone for a refit head).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sbir_engine.config import EngineConfig
from sbir_engine.data import read_quickdraw_bitmaps, split_indices
from sbir_engine.images import render_strokes
from sbir_engine.model import CONFIG_FILE


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--out", type=Path, required=True, help="gallery folder to write")
    parser.add_argument("--size", type=int, default=1000, help="picture side in px")
    parser.add_argument("--pen", type=int, default=2, help="line width in px")
    parser.add_argument("--strokes", type=Path, help="quickdraw-strokes folder (default: the config's)")
    parser.add_argument("--unseen", type=Path, help="a run folder: only drawings it did not train on")
    args = parser.parse_args()
    config = EngineConfig.load(args.unseen / CONFIG_FILE) if args.unseen else EngineConfig()
    strokes = args.strokes or config.canvas_strokes
    written = 0
    for label in config.classes:
        lines = (strokes / f"{label}.ndjson").read_text(encoding="utf-8").splitlines()
        kept = range(len(lines))
        if args.unseen:
            # The bitmaps are split as prepare-data split them: by count, seed and class.
            count = len(read_quickdraw_bitmaps(config.quickdraw_tarball, label))
            split = split_indices(count, config.split, f"{config.split_seed}:sketch:{label}")
            kept = set(split["test"] if config.refit else split["val"] + split["test"])
        (args.out / label).mkdir(parents=True, exist_ok=True)
        for i, line in enumerate(lines):
            if i in kept:
                drawing = json.loads(line)["drawing"]
                render_strokes(drawing, args.size, args.pen).save(args.out / label / f"{label}_{i:04d}.png")
                written += 1
    print(f"{written} drawings ({args.size} px, pen {args.pen}) written to {args.out}")


if __name__ == "__main__":
    main()
