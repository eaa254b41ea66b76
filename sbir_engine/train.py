"""Train the sketch classifier: the original recipe, on cached backbone features.

The backbone is frozen, so its features are computed once — for the validation and test images,
and for K augmented views of each training image — and the 512/N head trains on them in seconds.
``fine_tune`` adds the on-the-fly path that unfreezes the top of the backbone (backend-neutral
Keras, so it also runs on JAX on a GPU).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import keras
import numpy as np

from .aux_task import OtherDrawingBatches, OtherDrawings, other_drawings
from .backbones import cache_dir
from .config import EngineConfig
from .data import DOMAINS, DataError, Sample, dataset_quickdraw, load_split, read_dataset, read_stroke_records
from .embed import progress_bar, read_batches
from .images import CANVAS_STYLES, PREPROCESSING_VERSION, load_rgb, normalize_sketch, render_strokes
from .metrics import confusion_matrix, plot_confusion, plot_history, top_k_accuracy
from .model import (
    EMBEDDING_LAYER,
    PROBABILITIES_LAYER,
    SketchModel,
    apply_head,
    build_model,
    model_fingerprint,
)

# Sketches are white paper: augmentation fills uncovered borders with white, not mirrored ink.
FILL = {"fill_mode": "constant", "fill_value": 255.0}


class RandomStrokeWidth(keras.layers.Layer):
    """Thicken or thin dark ink on white paper by 0..``pixels`` pixels, chosen per image.

    Each step is a 3×3 min filter (spreads the dark ink by a pixel a side) or max filter (eats into
    it); backend-neutral (``keras.ops``), like the other augmentation layers.
    """

    def __init__(self, pixels: int, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.pixels = pixels
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training or self.pixels <= 0:
            return images
        ops = keras.ops
        shape = (ops.shape(images)[0], 1, 1, 1)
        # One draw in -p..p per image: negative thins, positive thickens, by that many steps.
        steps = keras.random.randint(shape, -self.pixels, self.pixels + 1, seed=self.seed_generator)
        out = images
        for step in range(1, self.pixels + 1):
            thicker = -ops.max_pool(-out, 3, 1, "same")
            thinner = ops.max_pool(out, 3, 1, "same")
            out = ops.where(steps >= step, thicker, ops.where(steps <= -step, thinner, out))
        return out

    def get_config(self) -> dict:
        return {**super().get_config(), "pixels": self.pixels}


def make_augmenter(config: EngineConfig, sketches: bool = False) -> keras.Sequential:
    """The original system's augmentation (zoom 0.15, shifts 0.2, shear 0.15) as Keras layers,
    plus random horizontal mirroring (``config.random_flip``) and, for sketches, stroke width."""
    flip = [keras.layers.RandomFlip("horizontal")] if config.random_flip else []
    strokes = [RandomStrokeWidth(config.stroke_jitter)] if sketches and config.stroke_jitter else []
    return keras.Sequential(
        strokes
        + flip
        + [
            keras.layers.RandomZoom(config.zoom, **FILL),
            keras.layers.RandomTranslation(config.shift, config.shift, **FILL),
            keras.layers.RandomShear(config.shear, config.shear, **FILL),
        ],
        name="augmentation",
    )


def backbone_features(
    model: SketchModel, samples: list[Sample], views: int, augment: bool, description: str
) -> tuple[np.ndarray, list[Sample]]:
    """Features (n_ok, views, dim) of each readable sample, cached on disk by content and settings.

    Without augmentation the features are the engine's own: averaged with the mirror image's
    under ``config.mirror``, as the serving model does.
    """
    config = model.config
    mirror = config.mirror and not augment
    sketches = all(s.domain == "sketch" for s in samples)
    key = hashlib.sha256()
    key.update(model_fingerprint(model.backbone, config).encode())
    augmentation = [config.seed, config.zoom, config.shift, config.shear, config.random_flip]
    augmentation.append(config.stroke_jitter if sketches else 0)
    key.update(json.dumps([views, augment, mirror, augmentation]).encode())
    for sample in samples:
        stat = sample.path.stat()
        key.update(f"{sample.path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    cache = cache_dir() / "features" / f"{key.hexdigest()[:24]}.npz"
    by_path = {s.path: s for s in samples}
    if cache.is_file():
        stored = np.load(cache, allow_pickle=False)
        return stored["features"], [by_path[Path(p)] for p in stored["paths"]]

    augmenter = make_augmenter(config, sketches)
    size = config.image_size
    chunks, kept = [], []
    with progress_bar() as progress:
        task = progress.add_task(description, total=len(samples))
        for batch in read_batches([s.path for s in samples], lambda p: load_rgb(p, size), config.batch_size):
            for path, reason in batch.failures:
                print(f"skipped {path}: {reason}")
            if batch.paths:
                per_view = []
                for _ in range(views):
                    if augment:  # an augmented view as it is (the augmenter flips at random)
                        images = augmenter(batch.arrays, training=True)
                        per_view.append(np.asarray(model.backbone.predict_on_batch(images)))
                    else:
                        per_view.append(model.served_features(batch.arrays))
                chunks.append(np.stack(per_view, axis=1))
                kept.extend(by_path[p] for p in batch.paths)
            progress.advance(task, len(batch.paths) + len(batch.failures))
    if not chunks:  # no sample, or none readable: no rows (nothing worth caching)
        return np.zeros((0, views, *model.head.input.shape[1:]), np.float32), []
    features = np.concatenate(chunks).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, features=features, paths=np.array([str(s.path) for s in kept]))
    return features, kept


def contrastive_trainer(model: SketchModel, images: bool = False, categories: int = 0) -> keras.Model:
    """The head with a second output, the unit-length embedding, for the metric-learning term: on
    cached backbone features, or with ``images`` on images through the backbone (fine-tuning).
    With ``categories``, a third: the auxiliary softmax over that many drawing categories."""
    if images:
        inputs = keras.Input(model.config.input_shape, name="image")
        # training=False keeps batch-norm statistics fixed, as in the classifier.
        features = model.backbone(inputs, training=False)
    else:
        inputs = features = keras.Input(model.head.input.shape[1:], name="features")
    embedding, probabilities = apply_head(model.head, features)
    unit = keras.layers.UnitNormalization(name="unit_embedding")(embedding)
    outputs = {"probabilities": probabilities, "unit_embedding": unit}
    if categories:
        outputs["aux"] = keras.layers.Dense(categories, activation="softmax", name="aux")(embedding)
    return keras.Model(inputs, outputs)


def compiled_trainer(
    model: SketchModel, images: bool = False, learning_rate: float | None = None, categories: int = 0
) -> keras.Model:
    """The head with its two losses: cross-entropy on the classes, contrastive on the embedding
    (``images``: the whole network, for fine-tuning, at ``learning_rate``); with ``categories`` the
    auxiliary all-category cross-entropy too, every cross-entropy skipping rows without a class."""
    config = model.config
    trainer = contrastive_trainer(model, images, categories)
    averaging = config.weight_averaging
    if categories:
        cross_entropy = {
            "probabilities": masked_cross_entropy(config.label_smoothing),
            "aux": masked_cross_entropy(),
        }
    else:
        cross_entropy = {
            "probabilities": keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
        }
    trainer.compile(
        optimizer=keras.optimizers.Adam(
            learning_rate or config.learning_rate, use_ema=averaging > 0, ema_momentum=averaging
        ),
        loss={**cross_entropy, "unit_embedding": supervised_contrastive_loss(config)},
        loss_weights={"probabilities": 1.0, "unit_embedding": config.contrastive_weight}
        | ({"aux": config.aux_weight} if categories else {}),
        weighted_metrics={"probabilities": ["accuracy"]},
    )
    return trainer


def masked_cross_entropy(label_smoothing: float = 0.0):
    """Cross-entropy in which a row without a class (an all-zero target) neither counts nor pulls:
    Keras' own loss reads a softmax's logits, and TensorFlow's fused gradient (softmax − target)
    assumes targets that sum to one, so it would push such rows' logits down."""

    def loss(targets, probabilities):
        labelled = keras.ops.sum(targets, axis=-1, keepdims=True)
        if label_smoothing:
            count = keras.ops.shape(targets)[-1]
            targets = targets * (1 - label_smoothing) + labelled * label_smoothing / count
        return -keras.ops.sum(targets * keras.ops.log(keras.ops.clip(probabilities, 1e-7, 1.0)), axis=-1)

    return loss


def early_stopping(config: EngineConfig, patience: int) -> list[keras.callbacks.Callback]:
    """Early stopping on validation accuracy that keeps the best epoch's weights: the averaged
    weights under ``config.weight_averaging`` (swapped in before each validation, so they are the
    ones judged and kept)."""
    averaged = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if config.weight_averaging else []
    return averaged + [
        keras.callbacks.EarlyStopping(
            monitor="val_probabilities_accuracy", mode="max", patience=patience, restore_best_weights=True
        )
    ]


def supervised_contrastive_loss(config: EngineConfig):
    """Supervised contrastive loss (Khosla et al., 2020) over a batch of unit embeddings.

    Sketches and photos share batches, so same-class pairs across domains are pulled together:
    the 512-d space is shaped for retrieval, not only for the classifier's decision.
    """
    temperature = config.temperature

    def loss(labels_one_hot, unit_embeddings):
        ops = keras.ops
        count = ops.shape(unit_embeddings)[0]
        self_mask = ops.eye(count)
        # Rows without a class (the other categories' drawings, with config.aux_weight) are neither
        # anchors nor in any row's denominator: the term is the dataset rows' alone.
        labelled = ops.cast(ops.sum(labels_one_hot, axis=-1) > 0, "float32")
        labels = ops.argmax(labels_one_hot, axis=-1)
        same = ops.cast(ops.equal(labels[:, None], labels[None, :]), "float32")
        positives = same * labelled[:, None] * labelled[None, :] - self_mask * labelled[:, None]
        excluded = self_mask + (1.0 - labelled[None, :]) * (1.0 - self_mask)
        logits = ops.matmul(unit_embeddings, ops.transpose(unit_embeddings)) / temperature - 1e9 * excluded
        log_prob = logits - ops.logsumexp(logits, axis=1, keepdims=True)
        mean_positive = ops.sum(positives * log_prob, axis=1) / ops.maximum(ops.sum(positives, axis=1), 1.0)
        return -mean_positive * labelled

    return loss


def cap_per_class(samples: list[Sample], domain: str, cap: int, seed: int) -> list[Sample]:
    """At most ``cap`` samples of ``domain`` per class (a seeded choice): photo classes range 57–1500."""
    groups: dict[str, list[Sample]] = defaultdict(list)
    kept = []
    for sample in samples:
        (groups[sample.label] if sample.domain == domain else kept).append(sample)
    rng = np.random.default_rng(seed)
    for label in sorted(groups):
        group = groups[label]
        if len(group) > cap:
            group = [group[i] for i in sorted(rng.choice(len(group), cap, replace=False))]
        kept.extend(group)
    return kept


def domain_balanced_weights(domains: list[str]) -> np.ndarray:
    """Sample weights under which every domain counts the same in loss and validation accuracy."""
    names, counts = np.unique(domains, return_counts=True)
    share = dict(zip(names, counts, strict=True))
    return np.array([len(domains) / (len(share) * share[d]) for d in domains], dtype=np.float32)


# The head's rows: features, class indices and the domain of each row.
HeadRows = tuple[np.ndarray, np.ndarray, list[str]]


def training_features(model: SketchModel, samples: list[Sample]) -> HeadRows:
    """The head's training rows: backbone features of ``sketch_views`` / ``photo_views`` augmented
    views of each sample or, without ``config.augment``, of each sample as the engine serves it;
    with their class indices and domains."""
    config = model.config
    features, labels, domains = [], [], []
    for domain, views in (("sketch", config.sketch_views), ("photo", config.photo_views)):
        subset = [s for s in samples if s.domain == domain]
        if not subset:
            continue
        views = views if config.augment else 1
        description = f"{domain} train ×{views}" if config.augment else f"{domain} train as served"
        feats, kept = backbone_features(model, subset, views, config.augment, description)
        features.append(feats.reshape(-1, feats.shape[-1]))
        labels.extend(config.classes.index(s.label) for s in kept for _ in range(views))
        domains.extend(domain for s in kept for _ in range(views))
    return np.concatenate(features), np.array(labels), domains


def served_rows(model: SketchModel, samples: list[Sample], description: str) -> HeadRows:
    """Rows of the readable samples as the engine serves them (one view, mirror-averaged under
    ``config.mirror``): what validation and the test split are scored on."""
    features, kept = backbone_features(model, samples, 1, False, description)
    labels = np.array([model.config.classes.index(s.label) for s in kept])
    return features[:, 0], labels, [s.domain for s in kept]


def canvas_samples(samples: list[Sample], config: EngineConfig) -> list[Sample]:
    """Canvas renderings of the drawings among ``samples`` that have pen-stroke records: line i of
    ``<canvas_strokes>/<class>.ndjson`` is the drawing prepared as ``<class>_<i>.png``. Each is drawn
    in one of CANVAS_STYLES (a seeded pick), normalised as the engine normalises a query, and
    written once under the cache, so that it trains like any prepared sketch."""
    rng = np.random.default_rng(config.seed)
    folder = cache_dir() / "canvases"
    drawings = defaultdict(list)  # class -> its sketches' drawing indices, in the samples' order
    for sample in samples:
        named = re.fullmatch(rf"{re.escape(sample.label)}_(\d+)", sample.path.stem)
        if sample.domain == "sketch" and named:
            drawings[sample.label].append(int(named[1]))
    out = []
    for label in sorted(drawings):
        records = read_stroke_records(config.canvas_strokes, label)
        for index in (i for i in drawings[label] if i < len(records)):
            size, width, rgba = CANVAS_STYLES[rng.integers(len(CANVAS_STYLES))]
            # The normaliser's version is in the key: a new normaliser must not reuse old renderings.
            style = [size, width, rgba, config.sketch_raster, PREPROCESSING_VERSION]
            key = hashlib.sha256(json.dumps([records[index], *style]).encode())
            file = folder / f"{label}_{index:04d}-{key.hexdigest()[:16]}.png"
            if not file.is_file():
                canvas = render_strokes(records[index]["drawing"], size, width, rgba)
                folder.mkdir(parents=True, exist_ok=True)
                partial = file.with_suffix(".partial.png")  # a killed run leaves no half-written file
                normalize_sketch(canvas, config.sketch_raster).save(partial)
                partial.replace(file)
            out.append(Sample(file, label, "sketch"))
    print(f"canvas views: {len(out)} training drawings rendered from {config.canvas_strokes}")
    return out


def head_rows(
    model: SketchModel, data_dir: Path, domains: tuple[str, ...] = DOMAINS
) -> tuple[list[Sample], HeadRows, HeadRows]:
    """What the head trains and validates on: the training split (photos capped per class) as
    ``training_features`` rows and the validation split as the engine serves it, each as (features,
    class indices, domains); with the training samples, which fine-tuning reuses."""
    config = model.config
    train_samples = cap_per_class(
        load_split(data_dir, "train", domains), "photo", config.max_photos_per_class, config.seed
    )
    if config.canvas_views:
        train_samples += canvas_samples(train_samples, config)
    train_rows = training_features(model, train_samples)
    val_rows = served_rows(model, load_split(data_dir, "val", domains), "val")
    if not len(val_rows[1]):
        raise DataError(f"{data_dir} has no readable validation images, which early stopping needs")
    # Photo classes of 3 or fewer images have none (the split rounds them away): say whose are judged.
    validated = dict.fromkeys(val_rows[2])
    for domain in (d for d in dict.fromkeys(train_rows[2]) if d not in validated):
        print(f"{domain}: no validation images, early stopping judges {', '.join(validated)} alone")
    return train_samples, train_rows, val_rows


def fit_head(
    model: SketchModel,
    train_rows: HeadRows,
    val_rows: HeadRows | None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    sample_weight: np.ndarray | None = None,
    verbose: int = 2,
    epochs: int | None = None,
    other: OtherDrawings | None = None,
) -> dict[str, list[float]]:
    """Train ``model``'s head on cached features (features, class indices, domains) with both
    losses; early stopping on validation accuracy keeps the best epoch. Returns the history.

    Without ``val_rows`` the head trains for ``epochs`` epochs and keeps the last (a refit).
    ``sample_weight`` replaces the domain-balanced training weights (the validation's stay).
    ``other`` (with ``config.aux_weight``) adds the auxiliary all-category task on those drawings."""
    config = model.config
    n = len(config.classes)
    x_train, y_train, d_train = train_rows
    weights = domain_balanced_weights(d_train) if sample_weight is None else sample_weight
    categories = len(other.categories) if other is not None else 0
    validation, stopping = None, []
    if val_rows is not None:
        x_val, y_val, d_val = val_rows
        labels_val = keras.utils.to_categorical(y_val, n)
        targets_val = {"probabilities": labels_val, "unit_embedding": labels_val}
        if categories:  # the validation rows count for the classes only
            targets_val["aux"] = np.zeros((len(y_val), categories), np.float32)
        validation = (x_val, targets_val, domain_balanced_weights(d_val))
        stopping = early_stopping(config, config.patience)
    trainer = compiled_trainer(model, categories=categories)
    if other is not None:
        data = {"x": OtherDrawingBatches(train_rows, weights, other, config)}
    else:
        labels_train = keras.utils.to_categorical(y_train, n)
        targets = {"probabilities": labels_train, "unit_embedding": labels_train}
        data = {"x": x_train, "y": targets, "sample_weight": weights, "batch_size": config.batch_size}
    history = trainer.fit(
        **data,
        validation_data=validation,
        epochs=epochs or config.epochs,
        shuffle=True,
        verbose=verbose,
        callbacks=[*stopping, *(callbacks or [])],
    )
    if val_rows is None and config.weight_averaging:
        # No validation swapped the averaged weights in: keep them, as early stopping would.
        trainer.optimizer.finalize_variable_values(trainer.trainable_variables)
    return history.history


def refit_head(
    model: SketchModel, rows: HeadRows, epochs: int, verbose: int = 2, other: OtherDrawings | None = None
) -> None:
    """Re-initialise the head's two layers and train them on ``rows`` for ``epochs`` epochs."""
    for name in (EMBEDDING_LAYER, PROBABILITIES_LAYER):
        layer = model.head.get_layer(name)
        layer.kernel.assign(layer.kernel_initializer(layer.kernel.shape))
        layer.bias.assign(layer.bias_initializer(layer.bias.shape))
    fit_head(model, rows, None, verbose=verbose, epochs=epochs, other=other)


def joined_rows(*rows: HeadRows) -> HeadRows:
    return (
        np.concatenate([r[0] for r in rows]),
        np.concatenate([r[1] for r in rows]),
        [domain for r in rows for domain in r[2]],
    )


def train(
    data_dir: Path,
    out_dir: Path,
    config: EngineConfig | None = None,
    weights: str | Path | None = "imagenet",
    fine_tune_blocks: int = 0,
    fine_tune_epochs: int = 3,
    verbose: int = 2,
    aux_drawings: tuple[int, int] = (0, 0),
) -> dict:
    """Train on a prepared dataset and write the run folder; returns ``metrics.json``'s content.

    ``aux_drawings`` (first categories, drawings per category; 0 = all) shrinks the auxiliary task's
    drawings with ``config.aux_weight``, for quick checks."""
    started = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    config = config or EngineConfig()
    dataset = read_dataset(data_dir)  # not a prepared dataset: its DataError says what to run
    available = dataset["domains"]
    domains = tuple(d for d in config.domains if d in available)
    if not domains:
        raise DataError(f"{data_dir} holds none of the domains {config.domains} (it has {available})")
    if config.aux_weight and fine_tune_blocks:
        raise ValueError("the auxiliary all-category task trains on cached features: leave out --fine-tune")
    if config.refit and fine_tune_blocks:
        # Fine-tuning stops early on validation, which a refit head has trained on.
        raise ValueError(
            "a refit head trains on the validation split that fine-tuning stops early on: "
            "leave out --refit (refit=False) with --fine-tune"
        )
    config = config.replace(
        classes=tuple(dataset["classes"]),
        domains=domains,
        split=tuple(dataset["split"]),
        data_seed=dataset["seed"],
        data_dir=data_dir.resolve(),  # evaluate --canvas reads which drawings it held out
    )
    keras.utils.set_random_seed(config.seed)
    model = build_model(config, weights)

    train_samples, train_rows, val_rows = head_rows(model, data_dir, domains)
    n = len(config.classes)

    out_dir.mkdir(parents=True, exist_ok=True)
    other = None
    if config.aux_weight:
        other = other_drawings(model, dataset_quickdraw(dataset), *aux_drawings)
    logger = keras.callbacks.CSVLogger(str(out_dir / "history.csv"))
    history = fit_head(model, train_rows, val_rows, [logger], verbose=verbose, other=other)
    # The epoch early stopping kept (its first best), for the refit on training + validation rows.
    best_epochs = int(np.argmax(history["val_probabilities_accuracy"])) + 1
    if config.refit:
        refit_head(model, joined_rows(train_rows, val_rows), best_epochs, verbose, other)
    if fine_tune_blocks:
        from .finetune import fine_tune

        history_ft = fine_tune(
            model, data_dir, fine_tune_blocks, fine_tune_epochs, verbose, train_samples=train_samples
        )
        for name, values in history_ft.items():
            history.setdefault(name, []).extend(values)
    # Both phases name the classifier's metrics after its output ("probabilities_accuracy").
    history = {k.replace("probabilities_", ""): v for k, v in history.items()}

    model.save(out_dir)
    plot_history(history, out_dir / "history.png")
    metrics = {
        "backbone": config.backbone,
        "backbone_weights": str(weights),  # which pre-training the run stands on
        "classes": list(config.classes),
        "epochs_run": len(history["loss"]),
        # With a refit the served head trained on validation too, for the best epoch's count.
        "refit_epochs": best_epochs if config.refit else None,
    }
    metrics["best_val_accuracy"] = float(max(history["val_accuracy"]))
    test = load_split(data_dir, "test", domains)
    for domain in domains:
        feats, labels, _ = served_rows(model, [s for s in test if s.domain == domain], f"{domain} test")
        if not len(labels):  # e.g. photo classes of 3 or fewer images, or only unreadable files
            print(f"{domain}: no test images, no test figures")
            metrics[domain] = {"test_images": 0}
            continue
        probs = np.asarray(model.head.predict(feats, verbose=0))
        metrics[domain] = {
            "test_top1": top_k_accuracy(probs, labels, 1),
            "test_top3": top_k_accuracy(probs, labels, 3),
            "test_images": len(labels),
        }
        matrix = confusion_matrix(probs.argmax(axis=1), labels, n)
        plot_confusion(matrix, config.classes, out_dir / f"confusion_{domain}.png", f"{domain} test split")
    # Every other output is rewritten; a confusion matrix of a domain without test figures now
    # would be an earlier run's, beside this run's model.
    for domain in DOMAINS:
        if "test_top1" not in metrics.get(domain, {}):
            (out_dir / f"confusion_{domain}.png").unlink(missing_ok=True)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
