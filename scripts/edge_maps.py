"""Photo → edge-map lever (issue #5): a prepared dataset whose photos are Canny edge maps.

Classic sketch-based retrieval draws the photos' edges so that the gallery looks like the queries.
This writes a copy of a prepared dataset for `sbir-engine train` / `build-index` to measure it:
- default: every photo replaced by its edge map (black lines on white, at the network's input
  size), so the head trains on, and the index holds, edge maps;
- ``--bridge``: the training photos keep their colour and gain their edge maps beside them (as
  more photos of their class, a bridge between the domains); validation and test photos stay as
  they are, so the index holds the real photos.
The sketches are shared by a symbolic link. Measured and not adopted: docs/quality.md, "Photos as
edge maps".

    python scripts/edge_maps.py --data data --out runs/data-edge
    python scripts/edge_maps.py --data data --out runs/data-bridge --edges runs/data-edge --bridge
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from sbir_engine.config import EngineConfig
from sbir_engine.data import SPLITS, load_split
from sbir_engine.images import ImageError, composite_on_white, open_image


def edge_map(path: Path, size: int, sigma: float) -> Image.Image:
    """Canny edges of the photo's grey image at ``size``×``size`` (squashed as the network sees
    it), drawn black on white like a sketch."""
    from skimage.feature import canny  # a test extra, as this script is a measurement

    grey = composite_on_white(open_image(path)).convert("L").resize((size, size), Image.Resampling.BILINEAR)
    edges = canny(np.asarray(grey, np.float64) / 255.0, sigma=sigma)
    return Image.fromarray(np.where(edges, 0, 255).astype(np.uint8))


def link(target: Path, link_path: Path) -> None:
    link_path.parent.mkdir(parents=True, exist_ok=True)
    if not (link_path.is_symlink() or link_path.exists()):
        link_path.symlink_to(target.resolve())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("data"), help="prepared dataset to copy")
    parser.add_argument("--out", type=Path, required=True, help="the new prepared dataset")
    parser.add_argument("--sigma", type=float, default=2.0, help="Canny's Gaussian, in pixels at image size")
    parser.add_argument("--bridge", action="store_true", help="add edge maps to the training photos only")
    parser.add_argument("--edges", type=Path, help="with --bridge: an edge-map dataset to take them from")
    args = parser.parse_args()

    size = EngineConfig().image_size
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.data / "dataset.json", args.out / "dataset.json")
    link(args.data / "sketch", args.out / "sketch")
    written = linked = skipped = 0
    for split in SPLITS:
        if args.bridge and split != "train":
            if (args.data / "photo" / split).is_dir():
                link(args.data / "photo" / split, args.out / "photo" / split)
            continue
        for sample in load_split(args.data, split, ("photo",)):
            relative = sample.path.relative_to(args.data)
            name = f"edge-{sample.path.stem}.png" if args.bridge else f"{sample.path.stem}.png"
            out = args.out / relative.with_name(name)
            made = args.edges / relative.with_suffix(".png") if args.edges else None
            if made is not None and made.is_file():  # drawn already: link it rather than redraw
                link(made, out)
                linked += 1
            elif not out.exists():
                try:
                    image = edge_map(sample.path, size, args.sigma)
                except ImageError as err:
                    print(f"skipped {err}")
                    skipped += 1
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                image.save(out)
                written += 1
            if args.bridge:  # the photo itself, beside its edge map
                link(sample.path, args.out / relative)
    print(f"{args.out}: {written} edge maps written, {linked} linked, {skipped} photos skipped")


if __name__ == "__main__":
    main()
