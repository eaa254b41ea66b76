"""The GPU route of sketch-domain pre-training: the whole EfficientNet-Lite2 on all 345 categories.

On CPUs, `sbir-engine pretrain` adapts the backbone's top blocks (sbir_engine/pretrain.py). This
script trains every block on a lent GPU machine, in two steps, because that machine has no
TensorFlow, no network and no ../shared:

    # here (CPU): pack what the GPU run needs into .carry/ (bitmaps, photos, ImageNet weights, wheels)
    python scripts/pretrain_sketch.py prepare --data data --carry .carry
    # on a GPU machine (JAX backend, backend-neutral Keras):
    KERAS_BACKEND=jax python scripts/pretrain_sketch.py train --carry .carry --out OUT
    # back here: train the 13-class engine on the adapted backbone
    sbir-engine train --data data --out runs/sketch345 --backbone-weights OUT/lite2-sketch345.npz

The held-out val/test drawings of the dataset's classes are left out of pre-training (same seeded
split as prepare-data), so the test split stays unseen. The dataset's training photos join in,
labelled with their QuickDraw category, so the backbone keeps its photo features.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prepare(data_dir: Path, carry: Path, photos_per_class: int) -> None:
    from PIL import Image

    from sbir_engine.backbones import lite2_imagenet_weights, save_npz_weights
    from sbir_engine.config import EngineConfig
    from sbir_engine.data import (
        load_split,
        quickdraw_categories,
        read_quickdraw_bitmaps,
        split_indices,
    )
    from sbir_engine.images import normalize_sketch
    from sbir_engine.train import cap_per_class

    summary = json.loads((data_dir / "dataset.json").read_text())
    config = EngineConfig(
        classes=tuple(summary["classes"]), seed=summary["seed"], split=tuple(summary["split"])
    )
    tarball = Path(summary["sources"]["quickdraw"])
    categories = quickdraw_categories(tarball)
    out = carry / "pretrain"
    shutil.rmtree(out, ignore_errors=True)
    (out / "photos").mkdir(parents=True)
    bitmaps, labels, held_out = [], [], 0
    for index, category in enumerate(categories):
        drawings = read_quickdraw_bitmaps(tarball, category)
        keep = range(len(drawings))
        if category in config.classes:  # only the training split of the engine's own classes
            keep = split_indices(len(drawings), config.split, f"{config.seed}:sketch:{category}")["train"]
            held_out += len(drawings) - len(keep)
        for i in keep:
            bitmaps.append(np.asarray(normalize_sketch(drawings[i], config.sketch_raster)))
            labels.append(index)
    val = load_split(data_dir, "val", ("sketch",))
    val_images = np.stack([np.asarray(Image.open(s.path).convert("L")) for s in val])
    np.savez_compressed(
        out / "sketches.npz",
        images=np.stack(bitmaps),
        labels=np.array(labels, np.int32),
        val_images=val_images,
        val_labels=np.array([categories.index(s.label) for s in val], np.int32),
        categories=np.array(categories),
    )
    photos = cap_per_class(load_split(data_dir, "train", ("photo",)), "photo", photos_per_class, config.seed)
    for sample in photos:
        (out / "photos" / sample.label).mkdir(exist_ok=True)
        shutil.copyfile(sample.path, out / "photos" / sample.label / sample.path.name)
    weights = lite2_imagenet_weights("imagenet")
    weights.pop("predictions", None)
    save_npz_weights(weights, out / "lite2-imagenet.npz")
    print(
        f"{len(bitmaps)} sketches of {len(categories)} categories ({held_out} held out), {len(photos)} photos"
    )


def batches(images: np.ndarray, labels: np.ndarray, n_classes: int, batch: int, shuffle: bool):
    """Float32 batches from an in-memory uint8 image array, reshuffled every epoch."""
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=4)
            self.rng = np.random.default_rng(0)
            self.order = np.arange(len(images))
            self.on_epoch_end()

        def __len__(self) -> int:
            return -(-len(images) // batch)

        def __getitem__(self, i: int):
            rows = np.sort(self.order[i * batch : (i + 1) * batch])
            return images[rows].astype(np.float32), keras.utils.to_categorical(labels[rows], n_classes)

        def on_epoch_end(self) -> None:
            if shuffle:
                self.rng.shuffle(self.order)

    return Batches()


def load_images(source: Path, size: int, limit: int = 0):
    """The carried sketches and photos as uint8 size×size RGB arrays, with 345-way labels."""
    from PIL import Image

    from sbir_engine.images import load_rgb

    stored = np.load(source / "sketches.npz")
    categories = [str(c) for c in stored["categories"]]

    def upscale(bitmaps: np.ndarray) -> np.ndarray:
        # The same PIL bilinear resize as every other path into the network.
        out = np.empty((len(bitmaps), size, size, 3), np.uint8)
        for i, bitmap in enumerate(bitmaps):
            out[i] = np.asarray(Image.fromarray(bitmap).convert("RGB").resize((size, size), Image.BILINEAR))
        return out

    images = [upscale(stored["images"])]
    labels = [stored["labels"]]
    photo_paths = sorted((source / "photos").rglob("*.*"))
    images.append(np.stack([load_rgb(p, size).astype(np.uint8) for p in photo_paths]))
    labels.append(np.array([categories.index(p.parent.name) for p in photo_paths], np.int32))
    images, labels = np.concatenate(images), np.concatenate(labels)
    if limit:  # a smoke run on a random subset
        keep = np.random.default_rng(0).choice(len(images), min(limit, len(images)), replace=False)
        images, labels = images[keep], labels[keep]
    val_images, val_labels = upscale(stored["val_images"]), stored["val_labels"]
    return images, labels, val_images, val_labels, categories, len(photo_paths)


def train(
    carry: Path,
    out: Path,
    epochs: int,
    batch: int,
    learning_rate: float,
    max_seconds: float,
    limit: int = 0,
    bench: bool = False,
    augment: bool = True,
) -> None:
    import keras

    from sbir_engine.backbones import build_backbone, save_npz_weights, unfreeze_top
    from sbir_engine.config import EngineConfig
    from sbir_engine.train import make_augmenter

    started = time.perf_counter()
    config = EngineConfig()
    size = config.image_size
    source = carry / "pretrain"

    images, labels, val_images, val_labels, categories, photo_count = load_images(source, size, limit)
    prepared = time.perf_counter() - started
    print(f"{len(images)} training images ({photo_count} photos), prepared in {prepared:.0f} s", flush=True)

    backbone = build_backbone("efficientnet-lite2", config.input_shape, source / "lite2-imagenet.npz")
    trainable = unfreeze_top(backbone, 1000)  # every block; batch norm stays frozen
    inputs = keras.Input(config.input_shape)
    # Keras' affine augmentation layers ran at 78 img/s under JAX on an H200: --no-augment trains on
    # the plain images, which the 345 categories' variety makes up for.
    features = backbone(make_augmenter(config)(inputs) if augment else inputs)
    outputs = keras.layers.Dense(len(categories), activation="softmax", name="sketch345")(
        keras.layers.Dropout(0.2)(features)
    )
    model = keras.Model(inputs, outputs)
    steps = epochs * -(-len(images) // batch)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps, warmup_target=None)
    model.compile(keras.optimizers.Adam(schedule), "categorical_crossentropy", metrics=["accuracy"])

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.t0
            logs["seconds"] = seconds
            logs["images_per_second"] = len(images) / seconds
            print(f"epoch {epoch + 1}: {seconds:.1f} s, {len(images) / seconds:.0f} img/s", flush=True)
            if time.perf_counter() - started > max_seconds:
                self.model.stop_training = True

    n = len(categories)
    history = model.fit(
        batches(images, labels, n, batch, shuffle=True),
        validation_data=batches(val_images, val_labels, n, 256, shuffle=False),
        epochs=epochs,
        verbose=2,
        callbacks=[Clock()],
    ).history

    # Inference throughput of the adapted backbone (the embedding part of the benchmark).
    probe = images[:4096].astype(np.float32)
    backbone.predict(probe[:512], batch_size=256, verbose=0)
    t0 = time.perf_counter()
    backbone.predict(probe, batch_size=256, verbose=0)
    embed_rate = len(probe) / (time.perf_counter() - t0)

    out.mkdir(parents=True, exist_ok=True)
    weights = {layer.name: layer.get_weights() for layer in backbone.layers if layer.weights}
    # Two halves: a device run returns files of at most 16 MB (merge with `merge` afterwards).
    names = list(weights)
    for part, chosen in (("a", names[: len(names) // 2]), ("b", names[len(names) // 2 :])):
        save_npz_weights({n: weights[n] for n in chosen}, out / f"lite2-sketch345-{part}.npz")
    report = {
        "device": _device_name(),
        "backend": keras.backend.backend(),
        "training_images": int(len(images)),
        "categories": n,
        "trainable_layers": len(trainable),
        "batch": batch,
        "learning_rate": learning_rate,
        "history": {k: [float(v) for v in vs] for k, vs in history.items()},
        "embedding_images_per_second_batch256": embed_rate,
        "seconds": time.perf_counter() - started,
    }
    (out / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    if bench:  # after the weights are safe: a failure here loses nothing
        report["backbone_speeds"] = benchmark_backbones(config)
        (out / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))


def benchmark_backbones(config, batch: int = 128, steps: int = 20) -> dict:
    """Full-training and inference img/s of each backbone with the 512/N head (random weights)."""
    import keras

    from sbir_engine.model import build_model

    speeds = {}
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch,) + config.input_shape).astype(np.float32)
    y = keras.utils.to_categorical(rng.integers(0, len(config.classes), batch), len(config.classes))
    for name in ("efficientnet-lite2", "resnet50"):
        model = build_model(config.replace(backbone=name), weights=None)
        model.backbone.trainable = True
        model.classifier.compile(keras.optimizers.Adam(1e-4), "categorical_crossentropy")
        model.classifier.train_on_batch(x, y)  # compile
        t0 = time.perf_counter()
        for _ in range(steps):
            model.classifier.train_on_batch(x, y)
        train_rate = steps * batch / (time.perf_counter() - t0)
        big = np.concatenate([x] * 8)
        model.classifier.predict(big, batch_size=256, verbose=0)
        t0 = time.perf_counter()
        model.classifier.predict(np.concatenate([big] * 4), batch_size=256, verbose=0)
        infer_rate = 4 * len(big) / (time.perf_counter() - t0)
        speeds[name] = {"train_images_per_second": train_rate, "inference_images_per_second": infer_rate}
        print(name, speeds[name], flush=True)
    return speeds


def _device_name() -> str:
    try:
        import jax

        return str(jax.devices()[0].device_kind)
    except Exception:
        return "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--carry", type=Path, default=Path(".carry"))
    p.add_argument("--photos-per-class", type=int, default=200)
    t = sub.add_parser("train")
    t.add_argument("--carry", type=Path, default=Path(".carry"))
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--epochs", type=int, default=12)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--learning-rate", type=float, default=3e-4)
    t.add_argument("--max-seconds", type=float, default=360)
    t.add_argument("--no-augment", dest="augment", action="store_false")
    t.add_argument("--bench", action="store_true", help="also time both backbones' training and inference")
    t.add_argument("--limit", type=int, default=0, help="train on this many random images (smoke run)")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.data, args.carry, args.photos_per_class)
    else:
        train(
            args.carry,
            args.out,
            args.epochs,
            args.batch,
            args.learning_rate,
            args.max_seconds,
            args.limit,
            args.bench,
            args.augment,
        )


if __name__ == "__main__":
    main()
