"""Sketch-domain pre-training: adapt the backbone's top blocks to drawings before the head is trained.

ImageNet features were learnt on photos, and the engine's classes have ~70 training drawings each.
The QuickDraw package holds 345 categories × 100 drawings: teaching the top blocks to tell all of
them apart gives the head features made for line drawings. The dataset's own training split (its
sketches and capped photos) stands in for its classes, so their held-out drawings stay unseen and
the backbone keeps its photo features.

CPU route: the frozen blocks below ``cut`` run once per view of each image (as is, mirrored, and
with ``pretrain_views`` > 2 augmented like ``train``'s views; with ``pretrain_stroke_jitter``, the
drawings' ink in every view but the first is thickened or thinned as ``train`` does); the top blocks
train on the cached activations (one view of each image per epoch, picked at random) under a
cosine-decaying learning rate. Batch normalisation stays frozen, as in fine-tuning.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import keras
import numpy as np

from .backbones import WeightMean, build_backbone, layer_weights, save_npz_weights, unfreeze_top
from .config import EngineConfig
from .data import (
    Sample,
    dataset_quickdraw,
    load_split,
    quickdraw_categories,
    read_dataset,
    read_quickdraw_bitmaps,
)
from .embed import progress_bar, read_batches
from .images import EmptySketchError, load_rgb, normalize_sketch, resize_to_array
from .train import RandomStrokeWidth, cap_per_class, make_augmenter

WEIGHTS_FILE = "backbone.npz"
AVERAGED_FILE = "backbone-averaged.npz"  # with pretrain_average_last: the last epochs' mean
REPORT_FILE = "pretrain.json"
# The highest block output that still has 12×12 resolution at 180 px: the blocks above it are a
# quarter of the network's cost and are what the pre-training adapts.
DEFAULT_CUTS = {"efficientnet-lite2": "block14_add", "resnet50": "conv4_block6_out"}
# Batches of images (RGB 0–255) with a mask of the drawings among them: stroke jitter is for ink.
Batches = Iterator[tuple[np.ndarray, np.ndarray]]


def pretrain_backbone(
    data_dir: Path,
    out_dir: Path,
    config: EngineConfig | None = None,
    batch_size: int = 128,
    drawings_per_category: int = 0,
    categories: int = 0,
    verbose: int = 2,
) -> dict:
    """Write ``out_dir/backbone.npz`` (for ``train --backbone-weights``) and return the report.

    Epochs, learning rate and the cut come from ``config.pretrain_epochs`` /
    ``pretrain_learning_rate`` / ``pretrain_cut``.

    ``drawings_per_category`` / ``categories`` (0 = all) shrink the run for quick checks.
    """
    started = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    dataset = read_dataset(data_dir)  # not a prepared dataset: its DataError says what to run
    config = (config or EngineConfig()).replace(classes=tuple(dataset["classes"]))
    keras.utils.set_random_seed(config.seed)
    epochs, learning_rate = config.pretrain_epochs, config.pretrain_learning_rate
    tarball = dataset_quickdraw(dataset)
    others = [c for c in quickdraw_categories(tarball) if c not in config.classes]
    if categories:
        others = others[: max(0, categories - len(config.classes))]
    names = sorted(set(others) | set(config.classes))
    label_of = {name: i for i, name in enumerate(names)}

    own = cap_per_class(load_split(data_dir, "train"), "photo", config.pretrain_photos_per_class, config.seed)
    val = load_split(data_dir, "val", ("sketch",))
    backbone = build_backbone(config.backbone, config.input_shape, "imagenet")
    cut = config.pretrain_cut or DEFAULT_CUTS[config.backbone]
    lower, upper = split_at(backbone, cut)

    count = config.pretrain_views
    # Built only when used: its layers draw seeds, which would change the default run's other draws.
    augmenter = make_augmenter(config) if count > 2 else None
    jitter = config.pretrain_stroke_jitter
    strokes = RandomStrokeWidth(jitter, seed=config.seed) if jitter else None

    def activations(images: Batches, total: int, description: str, views: int = 1):
        """Lower-block activations of each batch: as is, then mirrored, then augmented views."""
        outs = [np.empty((total,) + tuple(lower.output.shape[1:]), np.float16) for _ in range(views)]
        done = 0
        with progress_bar() as progress:
            task = progress.add_task(description, total=total)
            for batch, drawn in images:
                for view, out in enumerate(outs):
                    image = view_of(batch, drawn, view, augmenter, strokes)
                    out[done : done + len(batch)] = np.asarray(lower.predict_on_batch(image))
                done += len(batch)
                progress.advance(task, len(batch))
        return outs

    drawings, labels = [], []
    for category in others:  # normalised once, at 28 px: all 345 categories fit in ~30 MB
        for bitmap in read_quickdraw_bitmaps(tarball, category)[: drawings_per_category or None]:
            try:
                drawings.append(normalize_sketch(bitmap, config.sketch_raster))
            except EmptySketchError:
                continue  # a blank drawing teaches nothing
            labels.append(label_of[category])
    own_images, own_labels, own_domains = _read_samples(own, config, label_of)
    labels = np.concatenate([np.array(labels, np.int64), own_labels])

    def training_images() -> Batches:
        for start in range(0, len(drawings), 64):
            batch = np.stack([resize_to_array(d, config.image_size) for d in drawings[start : start + 64]])
            yield batch, np.ones(len(batch), bool)
        for start in range(0, len(own_images), 64):
            drawn = own_domains[start : start + 64] == "sketch"
            yield own_images[start : start + 64].astype(np.float32), drawn

    views = activations(training_images(), len(labels), f"lower blocks ({count} views)", count)
    val_images, y_val, _ = _read_samples(val, config, label_of)
    validation = iter([(val_images.astype(np.float32), np.ones(len(y_val), bool))])
    [x_val] = activations(validation, len(y_val), "lower blocks (validation)")
    lowered = time.perf_counter() - started

    unfreeze_top(backbone, 1000)  # every block but batch norm; only those above the cut get gradients
    adapted = [layer.name for layer in upper.layers if layer.trainable_weights]
    inputs = keras.Input(upper.input.shape[1:])
    dropped = keras.layers.Dropout(0.2)(upper(inputs))
    model = keras.Model(inputs, keras.layers.Dense(len(names), activation="softmax")(dropped))
    steps = epochs * -(-len(labels) // batch_size)
    model.compile(
        keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, steps)),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    rng = np.random.default_rng(config.seed)
    history: dict[str, list[float]] = {}
    tail, tail_epochs = WeightMean(), []
    for epoch in range(epochs):
        # One view per image (with 2 views, the same draws as a plain-or-mirrored coin flip).
        pick = (count - 1) - (rng.random(len(labels)) * count).astype(int)
        x_train = views[0].copy()
        for view in range(1, count):  # in place: no temporary copy of the picked activations
            np.copyto(x_train, views[view], where=(pick == view)[:, None, None, None])
        logs = model.fit(
            x_train, labels, validation_data=(x_val, y_val), batch_size=batch_size, verbose=verbose
        ).history
        for key, values in logs.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        if epoch >= epochs - config.pretrain_average_last:
            tail.add(layer_weights(backbone))
            tail_epochs.append(epoch + 1)

    save_npz_weights(layer_weights(backbone), out_dir / WEIGHTS_FILE)
    if tail.count:
        save_npz_weights(tail.mean(), out_dir / AVERAGED_FILE)
    report = {
        "backbone": config.backbone,
        "cut": cut,
        "adapted_layers": len(adapted),
        "categories": len(names),
        "training_images": int(len(labels)),
        "own_training_images": len(own_labels),
        "epochs": epochs,
        "learning_rate": learning_rate,
        "views": count,
        "stroke_jitter": jitter,
        "seed": config.seed,
        "averaged_epochs": tail_epochs,
        "history": history,
        "lower_blocks_seconds": round(lowered, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def view_of(
    batch: np.ndarray,
    drawn: np.ndarray,
    view: int,
    augmenter: keras.Layer | None = None,
    strokes: keras.Layer | None = None,
) -> np.ndarray:
    """View ``view`` of a batch: 0 as is, 1 mirrored, then augmented by ``augmenter``; beyond the
    first, the drawings' (``drawn``) ink is thickened or thinned by ``strokes`` when given."""
    if view == 0:
        return batch
    image = batch[:, :, ::-1] if view == 1 else np.asarray(augmenter(batch, training=True))
    if strokes is not None and drawn.any():  # ink on paper: photos are left as they are
        image = np.where(drawn[:, None, None, None], np.asarray(strokes(image, training=True)), image)
    return image


def split_at(backbone: keras.Model, cut: str) -> tuple[keras.Model, keras.Model]:
    """The backbone as two models, below and above the layer ``cut``; a clear error otherwise."""
    names = [layer.name for layer in backbone.layers]
    if cut not in names:
        outputs = ", ".join(n for n in names if n.endswith(("_add", "_out")))
        raise ValueError(
            f"pretrain cut {cut!r}: {backbone.name} has no such layer (its blocks' outputs include {outputs})"
        )
    try:
        upper = keras.Model(backbone.get_layer(cut).output, backbone.output)
    except ValueError as err:  # a layer inside a block: a skip connection passes around it
        raise ValueError(f"pretrain cut {cut!r} does not split {backbone.name} in two ({err})") from err
    return keras.Model(backbone.input, backbone.get_layer(cut).output), upper


def _read_samples(
    samples: list[Sample], config: EngineConfig, label_of: dict[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dataset's images (uint8, as the network sees them), labels and domains; unreadable files
    are skipped."""
    images, labels, domains = [], [], []
    domain_of = {s.path: s.domain for s in samples}
    load = partial(load_rgb, size=config.image_size)
    for batch in read_batches([s.path for s in samples], load, 64):
        for path, reason in batch.failures:
            print(f"skipped {path}: {reason}")
        images.extend(batch.arrays.astype(np.uint8))
        labels.extend(label_of[path.parent.name] for path in batch.paths)
        domains.extend(domain_of[path] for path in batch.paths)
    images = np.array(images, np.uint8).reshape(-1, config.image_size, config.image_size, 3)
    return images, np.array(labels, np.int64), np.array(domains)
