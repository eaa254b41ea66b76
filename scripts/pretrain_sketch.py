"""The GPU route of sketch-domain pre-training: the whole EfficientNet-Lite2 on all 345 categories.

On CPUs, `sbir-engine pretrain` adapts the backbone's top blocks (sbir_engine/pretrain.py). This
script trains every block on a lent GPU machine (all but the stem, batch norm and, unless
--train-depthwise, the depthwise kernels), with ``train``'s augmentation drawn afresh every epoch,
for as many epochs as its time budget holds. In steps, because that machine has no TensorFlow,
no network and no ../shared:

    # here (CPU): pack what the GPU run needs into .carry/ (bitmaps, photos, ImageNet weights, wheels)
    python scripts/pretrain_sketch.py prepare --data data --carry .carry
    # on a GPU machine (JAX backend, backend-neutral Keras), with .carry copied beside the script;
    # one card holds two runs at once (the README's GPU route runs seeds 2 to 5)
    pip install --no-index --no-deps --target /tmp/site .carry/wheels/*.whl
    export PYTHONPATH=/tmp/site KERAS_BACKEND=jax XLA_PYTHON_CLIENT_MEM_FRACTION=0.4
    python scripts/pretrain_sketch.py train --out OUT/s2 --seed 2 --workers 6 &   # and --seed 3
    # back here: join each run's weight files, average the runs (a uniform soup), train the engine
    python scripts/pretrain_sketch.py merge OUT/s2/lite2-sketch345-*.npz --out runs/gpu-s2.npz
    python scripts/pretrain_sketch.py average runs/gpu-s*.npz --out runs/sketch345-gpu/backbone.npz
    sbir-engine train --data data --out runs/gpu --backbone-weights runs/sketch345-gpu/backbone.npz \
        --label-smoothing 0.1
    # (``train --average-last K`` also writes OUT/averaged/, one run's last K epochs averaged;
    # measured in docs/quality.md)

The held-out val/test drawings of the dataset's classes are left out of pre-training (same seeded
split as prepare-data), so the test split stays unseen. The dataset's training photos join in,
labelled with their QuickDraw category, so the backbone keeps its photo features.
"""

from __future__ import annotations

import argparse
import json
import os
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
    if summary["sources"].get("sketches"):  # its training split is not a cut of the package's drawings
        raise SystemExit(
            f"{data_dir} was prepared from your own drawings (prepare-data --sketches); this script "
            "packs QuickDraw-prepared datasets only: use `sbir-engine pretrain` for it"
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
    download_wheels(carry / "wheels")


# What the GPU machine lacks (it has JAX, numpy, PIL, rich, h5py, ml-dtypes, but no Keras).
GPU_WHEELS = ("keras", "namex", "optree")


def download_wheels(folder: Path) -> None:
    """This machine's versions of GPU_WHEELS, as CPython 3.12 x86-64 wheels, for `pip install --target`."""
    import subprocess
    from importlib.metadata import version

    platforms = [
        "manylinux_2_28_x86_64",
        "manylinux_2_27_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
    ]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", "--dest", str(folder)]
    command += [arg for platform in platforms for arg in ("--platform", platform)]
    subprocess.run(command + [f"{name}=={version(name)}" for name in GPU_WHEELS], check=True)
    print(f"wheels in {folder}: {', '.join(sorted(p.name for p in folder.glob('*.whl')))}")


def random_affine(image: np.ndarray, rng: np.random.Generator, config, sketch: bool) -> np.ndarray:
    """``train``'s augmentation (stroke width for sketches, mirror, zoom, shifts, shear), with PIL.

    In the augmentation workers, because Keras' affine layers in the model ran at 78 img/s under
    JAX on an H200. Borders fill with white paper, as ``train.FILL`` does.
    """
    from PIL import Image

    if sketch and config.stroke_jitter:  # one pixel of ink more or less
        step = int(rng.integers(-1, 2))
        if step:  # dark ink: a 3×3 minimum thickens it, a maximum thins it
            image = _filter3x3(image[..., 0], np.minimum if step > 0 else np.maximum)
    # A drawing is grey: one channel is a third of the work.
    picture = Image.fromarray(image[..., 0] if image.ndim == 3 and sketch else image)
    if config.random_flip and rng.random() < 0.5:
        picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    size = image.shape[0]
    zoom = 1 + rng.uniform(-config.zoom, config.zoom)
    shear_x, shear_y = rng.uniform(-config.shear, config.shear, 2)
    shift_x, shift_y = rng.uniform(-config.shift, config.shift, 2) * size
    # PIL maps each output pixel back to an input pixel: (x, y) -> (a x + b y + c, d x + e y + f),
    # here a zoom and shear about the centre, then a shift.
    a, b, d, e = zoom, shear_x, shear_y, zoom
    centre = size / 2
    c = centre - a * centre - b * centre + shift_x
    f = centre - d * centre - e * centre + shift_y
    moved = picture.transform(
        picture.size,
        Image.Transform.AFFINE,
        (a, b, c, d, e, f),
        Image.Resampling.BILINEAR,
        fillcolor=255 if sketch else (255,) * 3,
    )
    return np.asarray(moved.convert("RGB"))


def _filter3x3(channel: np.ndarray, op) -> np.ndarray:
    """A 3×3 minimum or maximum filter as separable numpy ops (PIL's rank filter took 1.7 ms)."""
    padded = np.pad(channel, 1, mode="edge")
    rows = op(op(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])
    return op(op(rows[:-2], rows[1:-1]), rows[2:])


# Augmentation processes: all cores but four, which JAX's host threads and the loader use.
DEFAULT_WORKERS = max(1, (os.cpu_count() or 2) - 4)

# What the augmentation workers read. Filled before they fork, so they share the images
# copy-on-write: only row numbers go to a worker and only its uint8 batch comes back.
_WORKER_DATA: dict = {}


def augmented_batch(rows: np.ndarray, seed: int, epoch: int, index: int) -> np.ndarray:
    """Training batch ``index`` of ``epoch``, augmented in a worker process. Its own generator,
    seeded by (seed, epoch, index), makes the batch the same whichever worker draws it."""
    images, sketches, config = (_WORKER_DATA[k] for k in ("images", "sketches", "config"))
    rng = np.random.default_rng([seed, epoch, index])
    return np.stack([random_affine(images[row], rng, config, sketches[row]) for row in rows])


def augment_pool(images: np.ndarray, sketches: np.ndarray, config, workers: int):
    """Processes that augment training batches. Threads were held to about one core by the GIL
    (2,200–3,100 img/s on the GPU machine, which trains several times faster); a fork made before
    Keras and JAX start their threads is safe."""
    import multiprocessing

    _WORKER_DATA.update(images=images, sketches=sketches, config=config)
    return multiprocessing.get_context("fork").Pool(workers)


def stop_pool(pool, data=None, timeout: float = 300.0) -> None:
    """Stop the augmentation processes, once the batches that ``data`` (from ``batches``) asked for
    ahead are done. ``Pool.terminate`` deadlocks when a worker is still writing a batch, larger than
    the pipe, after the pool has stopped reading results: the parent then waits for the result
    queue's lock that the writer holds (seen in CI, with the batches each epoch's end asks for)."""
    deadline = time.monotonic() + timeout
    for result in list(getattr(data, "pending", {}).values()):
        result.wait(max(0.0, deadline - time.monotonic()))
    pool.terminate()


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    batch: int,
    shuffle: bool,
    pool=None,
    seed: int = 0,
    ahead: int = 32,
):
    """uint8 batches from an in-memory image array, reshuffled every epoch (the model casts them
    to float on the device: a quarter of the bytes to move).

    With ``pool`` (from ``augment_pool``), each training image is augmented afresh every time it is
    drawn, ``ahead`` batches in advance; call ``fit`` with ``shuffle=False`` so that Keras asks for
    them in order. ``seed`` decides the order and the augmentation: the same seed draws the same
    batches.
    """
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.order = np.arange(len(images))
            self.epoch = 0
            self.pending = {}
            self.on_epoch_end()

        def __len__(self) -> int:
            return -(-len(images) // batch)

        def rows(self, i: int) -> np.ndarray:
            return np.sort(self.order[i * batch : (i + 1) * batch])

        def submit(self, i: int) -> None:
            if pool is not None and i < len(self) and i not in self.pending:
                self.pending[i] = pool.apply_async(augmented_batch, (self.rows(i), seed, self.epoch, i))

        def __getitem__(self, i: int):
            rows = self.rows(i)
            if pool is None:
                x = images[rows]
            else:
                for j in range(i, i + ahead):
                    self.submit(j)
                x = self.pending.pop(i).get()
            return x, keras.utils.to_categorical(labels[rows], n_classes)

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.pending.clear()  # batches of a stopped epoch: their rows are about to change
            if shuffle:
                self.rng.shuffle(self.order)
            for i in range(ahead):  # the next epoch's first batches, while validation runs
                self.submit(i)

    return Batches()


def load_images(source: Path, size: int, limit: int = 0):
    """The carried sketches and photos as uint8 size×size RGB arrays, with 345-way labels."""
    from PIL import Image

    from sbir_engine.images import load_rgb, resize_to_array

    stored = np.load(source / "sketches.npz")
    categories = [str(c) for c in stored["categories"]]

    def upscale(bitmaps: np.ndarray) -> np.ndarray:
        # The same PIL bilinear resize as every other path into the network.
        return np.stack([resize_to_array(Image.fromarray(b), size).astype(np.uint8) for b in bitmaps])

    images = [upscale(stored["images"])]
    labels = [stored["labels"]]
    photo_paths = sorted((source / "photos").rglob("*.*"))
    images.append(np.stack([load_rgb(p, size).astype(np.uint8) for p in photo_paths]))
    labels.append(np.array([categories.index(p.parent.name) for p in photo_paths], np.int32))
    sketches = np.arange(sum(map(len, images))) < len(images[0])
    images, labels = np.concatenate(images), np.concatenate(labels)
    if limit:  # a smoke run on a random subset
        keep = np.random.default_rng(0).choice(len(images), min(limit, len(images)), replace=False)
        images, labels, sketches = images[keep], labels[keep], sketches[keep]
    val_images, val_labels = upscale(stored["val_images"]), stored["val_labels"]
    return images, labels, sketches, val_images, val_labels, categories


def train(
    carry: Path,
    out: Path,
    batch: int,
    learning_rate: float,
    max_seconds: float,
    limit: int = 0,
    bench: bool = False,
    augment: bool = True,
    train_depthwise: bool = False,
    precision: str = "mixed_bfloat16",
    max_epochs: int = 30,
    seed: int = 0,
    average_last: int = 0,
    workers: int = DEFAULT_WORKERS,
) -> None:
    """Train the whole backbone (but the stem, batch norm and, by default, the depthwise kernels)
    for as many epochs as fit in ``max_seconds``, with a cosine learning rate over them.

    ``average_last`` K also writes, to ``out/averaged``, the mean of the weights after each of the
    last K epochs (stochastic weight averaging along the cosine tail, Izmailov et al., 2018: one
    run's own soup; batch norm is frozen, so no statistics need recomputing).

    ``seed`` fixes the new layer's initialisation, dropout, batch order and augmentation; the GPU's
    kernels (XLA, bfloat16 sums) are not bit-reproducible, so a rerun is close, not identical.
    ``workers`` processes augment the training batches."""
    from sbir_engine.config import EngineConfig

    started = time.perf_counter()
    config = EngineConfig()
    size = config.image_size
    source = carry / "pretrain"

    images, labels, sketches, val_images, val_labels, categories = load_images(source, size, limit)
    prepared = time.perf_counter() - started
    print(
        f"{len(images)} training images ({int((~sketches).sum())} photos), prepared in {prepared:.0f} s",
        flush=True,
    )
    pool = augment_pool(images, sketches, config, workers) if augment else None

    import keras  # after the fork: JAX's threads must not be copied into the workers

    from sbir_engine.backbones import WeightMean, build_backbone, layer_weights, unfreeze_top

    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(seed)
    backbone = build_backbone("efficientnet-lite2", config.input_shape, source / "lite2-imagenet.npz")
    unfreeze_top(backbone, 1000)  # every block; batch norm stays frozen
    if not train_depthwise:
        # JAX computes a depthwise kernel's gradient as slowly as a dense convolution's
        # (jax-ml/jax#13800); the kernels are 5 % of Lite2's weights.
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.DepthwiseConv2D):
                layer.trainable = False
    trainable = [layer.name for layer in backbone.layers if layer.trainable and layer.weights]
    outputs = keras.layers.Dense(len(categories), activation="softmax", dtype="float32", name="sketch345")(
        keras.layers.Dropout(0.2)(backbone.output)
    )
    model = keras.Model(backbone.input, outputs)
    model.compile(keras.optimizers.Adam(learning_rate), "categorical_crossentropy", metrics=["accuracy"])

    tail, tail_epochs = WeightMean(), []

    class Budget(keras.callbacks.Callback):
        """A warm-up epoch at a tenth of the rate (the 345-way layer starts random), then a cosine
        decay over the epochs that the measured epoch time leaves inside ``max_seconds``."""

        planned = 0  # known once an epoch without compilation has been timed

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()
            if epoch == 0:
                rate = learning_rate / 10
            elif not self.planned:
                rate = learning_rate
            else:
                progress = (epoch - 0.5) / max(1, self.planned - 1)  # mid-epoch
                rate = learning_rate * 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))
            self.model.optimizer.learning_rate = rate
            self.rate = rate

        def on_epoch_end(self, epoch, logs=None):
            now = time.perf_counter()
            seconds = now - self.t0
            logs.update(seconds=seconds, images_per_second=len(images) / seconds, learning_rate=self.rate)
            print(f"epoch {epoch + 1}: {seconds:.1f} s, {len(images) / seconds:.0f} img/s", flush=True)
            if epoch >= 1:  # epoch 1 included compiling
                planned = planned_epochs(
                    self.planned, epoch + 1, max_seconds - (now - started), seconds, max_epochs
                )
                if planned != self.planned:
                    print(f"{epoch + 1} epochs done in {now - started:.0f} s; training {planned}", flush=True)
                self.planned = planned
            if self.planned and epoch + 1 >= self.planned or now - started + seconds > max_seconds:
                self.model.stop_training = True
            if average_last and self.planned and epoch + 1 > self.planned - average_last:
                tail.add(layer_weights(backbone))
                tail_epochs.append(epoch + 1)

    n = len(categories)
    history = {}
    training = batches(images, labels, n, batch, True, pool, seed)
    try:
        history = model.fit(
            training,
            validation_data=batches(val_images, val_labels, n, 256, shuffle=False),
            shuffle=False,  # the batches shuffle themselves and are prepared in order
            epochs=1000,
            verbose=2,
            callbacks=[Budget()],
        ).history
    finally:  # whatever stopped training, keep what it learnt, then stop the workers
        save_parts(layer_weights(backbone), out)
        if tail.count:
            (out / "averaged").mkdir(exist_ok=True)
            save_parts(tail.mean(), out / "averaged")
        if pool is not None:
            stop_pool(pool, training)

    # Inference throughput of the adapted backbone (the embedding part of the benchmark).
    probe = images[:4096].astype(np.float32)
    backbone.predict(probe[:512], batch_size=256, verbose=0)
    t0 = time.perf_counter()
    backbone.predict(probe, batch_size=256, verbose=0)
    embed_rate = len(probe) / (time.perf_counter() - t0)

    report = {
        "device": _device_name(),
        "backend": keras.backend.backend(),
        "precision": precision,
        "training_images": int(len(images)),
        "categories": n,
        "trainable_layers": len(trainable),
        "depthwise_trained": train_depthwise,
        "augmented": augment,
        "batch": batch,
        "learning_rate": learning_rate,
        "max_seconds": max_seconds,
        "max_epochs": max_epochs,
        "seed": seed,
        "augment_workers": workers if augment else 0,
        "averaged_epochs": tail_epochs,
        "history": {k: [float(v) for v in vs] for k, vs in history.items()},
        "embedding_images_per_second_batch256": embed_rate,
        "seconds": time.perf_counter() - started,
    }
    (out / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    if bench:  # after the weights are safe: a failure here loses nothing
        report["backbone_speeds"] = benchmark_backbones(config)
        (out / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))


def planned_epochs(
    planned: int, done: int, seconds_left: float, epoch_seconds: float, max_epochs: int
) -> int:
    """How many epochs the cosine schedule spans, after ``done`` epochs with ``seconds_left`` of
    the budget, the last epoch having taken ``epoch_seconds``; ``planned`` is 0 until first set.

    Planned once from the first epoch without compilation; later only shortened, when slower
    epochs (runs sharing a card) would otherwise hit the budget on a rate above the cosine's floor.
    """
    return max(done, min(planned or max_epochs, done + int(seconds_left // epoch_seconds)))


def save_parts(weights: dict[str, list[np.ndarray]], out: Path, part_bytes: float = 15e6) -> list[Path]:
    """Weights by layer in files of about ``part_bytes`` at most (a device run returns files of at
    most 16 MiB, 8 files in all; ``merge`` joins them)."""
    from sbir_engine.backbones import save_npz_weights

    parts: list[dict[str, list[np.ndarray]]] = [{}]
    size = 0  # bytes in the last part
    for name, arrays in weights.items():
        layer_bytes = sum(a.nbytes for a in arrays)
        if parts[-1] and size + layer_bytes > part_bytes:
            parts.append({})
            size = 0
        parts[-1][name] = arrays
        size += layer_bytes
    paths = [out / f"lite2-sketch345-{k}.npz" for k in range(len(parts))]
    for part, path in zip(parts, paths, strict=True):
        save_npz_weights(part, path)
    return paths


def merge(parts: list[Path], out: Path) -> None:
    """Join the parts a device run returns into one weights file for ``train --backbone-weights``."""
    from sbir_engine.backbones import lite2_imagenet_weights, save_npz_weights

    weights = {}
    for part in parts:  # a missing part is named by the loader
        weights.update(lite2_imagenet_weights(part))
    save_npz_weights(weights, out)
    print(f"wrote {out} ({len(weights)} layers)")


def average(files: list[Path], out: Path) -> None:
    """Average backbone weight files layer by layer (a uniform "model soup", Wortsman et al., 2022).

    Runs that start from the same ImageNet weights stay close enough for their mean to be a model;
    batch normalisation is frozen in both pre-training routes, so its statistics are shared too.
    """
    from sbir_engine.backbones import WeightMean, lite2_imagenet_weights, save_npz_weights

    def layout(weights: dict[str, list[np.ndarray]]) -> dict[str, list[tuple[int, ...]]]:
        return {name: [a.shape for a in arrays] for name, arrays in weights.items()}

    mean, first = WeightMean(), None
    for path in files:
        weights = lite2_imagenet_weights(path)
        first = first or layout(weights)
        if layout(weights) != first:
            raise SystemExit(f"{path}: its layers or shapes differ from {files[0]}'s; not averaged")
        mean.add(weights)
    save_npz_weights(mean.mean(), out)
    print(f"wrote {out} (mean of {len(files)} weight files, {len(mean.sums)} layers)")


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
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--learning-rate", type=float, default=3e-4)
    t.add_argument("--max-seconds", type=float, default=450, help="the whole run's time budget")
    t.add_argument("--max-epochs", type=int, default=30)
    t.add_argument("--no-augment", dest="augment", action="store_false")
    t.add_argument(
        "--train-depthwise", action="store_true", help="also train the depthwise kernels (slow on JAX)"
    )
    t.add_argument(
        "--precision", default="mixed_bfloat16", help="Keras dtype policy (float32 for full precision)"
    )
    t.add_argument("--bench", action="store_true", help="also time both backbones' training and inference")
    t.add_argument("--limit", type=int, default=0, help="train on this many random images (smoke run)")
    t.add_argument("--seed", type=int, default=0, help="initialisation, batch order and augmentation")
    t.add_argument(
        "--average-last", type=int, default=0, help="also write the mean of the last K epochs' weights"
    )
    t.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="processes that augment the training batches (default: all cores but four)",
    )
    m = sub.add_parser("merge")
    m.add_argument("parts", type=Path, nargs="+")
    m.add_argument("--out", type=Path, required=True)
    a = sub.add_parser("average", help="layer-wise mean of backbone weight files")
    a.add_argument("files", type=Path, nargs="+")
    a.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.data, args.carry, args.photos_per_class)
    elif args.step == "merge":
        merge(args.parts, args.out)
    elif args.step == "average":
        average(args.files, args.out)
    else:
        train(
            args.carry,
            args.out,
            args.batch,
            args.learning_rate,
            args.max_seconds,
            args.limit,
            args.bench,
            args.augment,
            args.train_depthwise,
            args.precision,
            args.max_epochs,
            args.seed,
            args.average_last,
            args.workers,
        )


if __name__ == "__main__":
    main()
