"""Head levers on cached features (issue #5): what the 13-way head still gains from data or weights.

For each training seed, heads train as `sbir-engine train --no-augment` trains them (`fit_head` on
the features the engine serves; with ``--augment`` on augmented views, as `train` does), under
these variants:
- ``sketches F``: a class-stratified share F of the training sketches, all the photos: the
  learning curve, which tells what training on more drawings (train + validation) could add;
- ``class-balanced photos``: each class's training photos weighted to one total within the photo
  domain (the capped photo classes hold 39 to 300 images, so the head's prior leans to the big ones);
- ``dropout R`` (with ``--dropouts``): all the rows, the backbone features dropped at rate R while the
  head trains (``train --head-dropout R``);
- ``stroke views P`` (with ``--stroke-views``): all the rows, plus each training sketch with its ink
  thickened and thinned by P pixels (P steps of ``RandomStrokeWidth``'s 3×3 filters), served as the
  engine serves a sketch (mirror-averaged); the extra rows share the sketch domain's weight.
- ``aux 345 L`` (with ``--aux-weights``): all the rows, and a second softmax over every QuickDraw
  category on the same 512-d layer, trained (loss weight L) on the served features of the package's
  drawings of the other categories — 32 drawn at random beside each batch of 32 dataset rows — and on
  the training sketches under their own category; the 13-way and contrastive terms see the dataset's
  rows only, as before, and the extra softmax is dropped when serving.
Each variant reports validation and test sketch top-1 / top-3, as trained and with the head's
training class prior divided out of its probabilities (``prior-corrected``: logit adjustment,
Menon et al. 2021). Medians over the seeds at the end.

    python scripts/head_levers.py --data data --backbone-weights runs/sketch345/backbone.npz
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import keras
import numpy as np
from keras import ops

from sbir_engine.aux_task import other_drawings
from sbir_engine.config import EngineConfig
from sbir_engine.data import Sample, dataset_quickdraw, load_split
from sbir_engine.embed import read_batches
from sbir_engine.images import load_rgb
from sbir_engine.metrics import top_k_accuracy
from sbir_engine.model import SketchModel, build_model
from sbir_engine.train import domain_balanced_weights, fit_head, head_rows, joined_rows, served_rows


def stratified_share(labels: np.ndarray, eligible: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A mask keeping ``share`` of each class's eligible rows (a seeded choice) and every other row."""
    keep = np.ones(len(labels), bool)
    rng = np.random.default_rng(100 + seed)
    for label in np.unique(labels[eligible]):
        rows = np.flatnonzero(eligible & (labels == label))
        keep[rng.choice(rows, int(round(len(rows) * (1 - share))), replace=False)] = False
    return keep


def class_balanced_photo_weights(labels: np.ndarray, domains: np.ndarray) -> np.ndarray:
    """Domain-balanced weights in which every class's photos also weigh the same in total (the
    photo domain's total, and so the balance of the domains, stays as it was)."""
    weights = domain_balanced_weights(list(domains))
    photo = domains == "photo"
    counts = np.bincount(labels[photo], minlength=labels.max() + 1).astype(float)
    present = counts > 0
    factor = np.ones_like(counts)
    factor[present] = counts[present].mean() / counts[present]
    return (weights * np.where(photo, factor[labels], 1.0)).astype(np.float32)


def stroke_view_rows(
    model: SketchModel, sketches: list[Sample], pixels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Served features of each training sketch with its ink thinned, then thickened, by ``pixels``
    pixels at image_size (dark ink on white: a 3×3 max filter eats it, a min filter spreads it)."""
    config = model.config
    load = lambda path: load_rgb(path, config.image_size)  # noqa: E731
    by_path = {s.path: s for s in sketches}
    features, labels = [], []
    for batch in read_batches([s.path for s in sketches], load, config.batch_size):
        for sign in (1, -1):  # thinner: the max of the image; thicker: minus the max of its negative
            images = ops.convert_to_tensor(batch.arrays)
            for _ in range(pixels):
                images = sign * ops.max_pool(sign * images, 3, 1, "same")
            features.append(model.served_features(np.asarray(images)))
            labels.extend(config.classes.index(by_path[p].label) for p in batch.paths)
    return np.concatenate(features), np.array(labels)


def scores(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    return top_k_accuracy(probabilities, labels, 1), top_k_accuracy(probabilities, labels, 3)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--backbone-weights", required=True, help="as for `sbir-engine train`")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    parser.add_argument("--shares", default="0.6,0.8,1.0", help="shares of the training sketches")
    parser.add_argument("--dropouts", default="", help="head dropout rates to try, comma-separated")
    parser.add_argument(
        "--stroke-views", default="", help="ink thickened and thinned by these pixel counts, comma-separated"
    )
    parser.add_argument(
        "--aux-weights", default="", help="loss weights of the all-category softmax to try, comma-separated"
    )
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="as for `sbir-engine train`")
    parser.add_argument(
        "--augment", action="store_true", help="heads on augmented views (`train` without --no-augment)"
    )
    args = parser.parse_args()

    classes = tuple(json.loads((args.data / "dataset.json").read_text())["classes"])
    results: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    stroke_pixels = [int(p) for p in args.stroke_views.split(",") if p]
    stroke_rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # the backbone is every seed's
    other = None  # the other categories' rows, likewise
    for seed in (int(s) for s in args.seeds.split(",")):
        config = EngineConfig(
            classes=classes, seed=seed, augment=args.augment, label_smoothing=args.label_smoothing
        )
        model = build_model(config, args.backbone_weights)
        train_samples, (x, y, domains), (x_val, y_val, d_val) = head_rows(model, args.data)
        train_sketches = [s for s in train_samples if s.domain == "sketch"]
        for pixels in stroke_pixels:
            if pixels not in stroke_rows:
                stroke_rows[pixels] = stroke_view_rows(model, train_sketches, pixels)
        domains, d_val = np.array(domains), np.array(d_val)
        test_samples = load_split(args.data, "test", ("sketch",))
        x_test, y_test, _ = served_rows(model, test_samples, "test")
        sketch_val = d_val == "sketch"

        variants = {
            f"sketches {share:.2f}": (stratified_share(y, domains == "sketch", share, seed), None)
            for share in (float(s) for s in args.shares.split(","))
        }
        everything = np.ones(len(y), bool)
        variants["class-balanced photos"] = (everything, class_balanced_photo_weights(y, domains))
        rates = {f"dropout {float(r):.2f}": float(r) for r in args.dropouts.split(",") if r}
        variants.update({name: (everything, None) for name in rates})
        extra = {f"stroke views {p}": stroke_rows[p] for p in stroke_pixels}
        variants.update({name: (everything, None) for name in extra})
        aux_weights = {f"aux 345 {float(w):g}": float(w) for w in args.aux_weights.split(",") if w}
        variants.update({name: (everything, None) for name in aux_weights})
        if aux_weights and other is None:
            dataset = json.loads((args.data / "dataset.json").read_text())
            other = other_drawings(model, dataset_quickdraw(dataset))
        for name, (keep, weights) in variants.items():
            keras.utils.set_random_seed(seed)
            variant = config.replace(head_dropout=rates.get(name, 0.0), aux_weight=aux_weights.get(name, 0.0))
            model = build_model(variant, args.backbone_weights)
            train_rows = (x[keep], y[keep], list(domains[keep]))
            if name in extra:
                x_extra, y_extra = extra[name]
                train_rows = joined_rows(train_rows, (x_extra, y_extra, ["sketch"] * len(y_extra)))
            weights = domain_balanced_weights(train_rows[2]) if weights is None else weights[keep]
            aux = other if name in aux_weights else None
            history = fit_head(model, train_rows, (x_val, y_val, list(d_val)), None, weights, 0, other=aux)
            prior = np.bincount(train_rows[1], weights=weights, minlength=len(classes))
            prior = prior / prior.sum()
            row = []
            for features, labels in (
                (x_val[sketch_val], y_val[sketch_val]),
                (x_test, y_test),
            ):
                probabilities = np.asarray(model.head.predict(features, verbose=0))
                row.extend(scores(probabilities, labels) + scores(probabilities / prior, labels))
            results[name].append(tuple(row))
            print(
                f"seed {seed}  {name:22s} {len(history['loss']):3d} epochs  "
                "val {:.3f}/{:.3f} (prior-corrected {:.3f}/{:.3f})  "
                "test {:.3f}/{:.3f} (prior-corrected {:.3f}/{:.3f})".format(*row),
                flush=True,
            )
    print("\nmedians over the seeds: top-1/top-3, as trained and prior-corrected")
    for name, rows in results.items():
        m = np.median(np.array(rows), axis=0)
        print(f"{name:22s} val {m[0]:.3f}/{m[1]:.3f} ({m[2]:.3f}/{m[3]:.3f})", end="  ")
        print(f"test {m[4]:.3f}/{m[5]:.3f} ({m[6]:.3f}/{m[7]:.3f})")


if __name__ == "__main__":
    main()
