"""Images → L2-normalised 512-d embeddings, streamed: reader (threads decode) → mapper (network).

Memory holds a few batches at a time whatever the number of images, and bad files are reported
and skipped instead of stopping the run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .images import ImageError, ImageSource, load_rgb, load_sketch, normalize_sketch
from .model import SketchModel, l2_normalize

Loader = Callable[[Path], np.ndarray]


def check_batch_size(batch_size: int) -> None:
    """Refuse a batch size under 1: no batch would ever fill, and every image would be dropped."""
    if batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, not {batch_size}")


@dataclass
class Batch:
    arrays: np.ndarray
    paths: list[Path]
    failures: list[tuple[Path, str]] = field(default_factory=list)


def read_batches(
    paths: Iterable[Path], load: Loader, batch_size: int = 32, workers: int = 4, prefetch: int = 2
) -> Iterator[Batch]:
    """Decode images on a thread pool (PIL releases the GIL) while the caller runs the network.

    Yields batches of good images; each batch also carries the failures met since the last one.
    """
    check_batch_size(batch_size)

    def safe_load(path: Path) -> tuple[Path, np.ndarray | None, str | None]:
        try:
            return path, load(path), None
        except ImageError as err:
            return path, None, err.reason
        except Exception as err:  # a decoder bug in one file must not stop a gallery build
            return path, None, f"{type(err).__name__}: {err}"

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        iterator = iter(paths)
        exhausted = False
        arrays, good, failures = [], [], []
        while True:
            # Keep a bounded number of decodes in flight: streaming, not the whole gallery at once.
            while not exhausted and len(pending) < batch_size * prefetch:
                try:
                    pending.append(pool.submit(safe_load, next(iterator)))
                except StopIteration:
                    exhausted = True
            if not pending:
                break
            path, array, reason = pending.pop(0).result()
            if array is None:
                failures.append((path, reason))
            else:
                arrays.append(array)
                good.append(path)
            if len(arrays) == batch_size:
                yield Batch(np.stack(arrays), good, failures)
                arrays, good, failures = [], [], []
        if arrays or failures:
            yield Batch(np.stack(arrays) if arrays else np.empty((0,)), good, failures)


class Embedder:
    """One forward pass per batch: image batch → (L2-normalised embeddings, class probabilities).

    The forward pass runs on a fast inference runtime chosen once here (see :mod:`sbir_engine.runtime`):
    ``runtime="auto"`` (default, or ``$SBIR_ENGINE_RUNTIME``) takes the fastest measured for the
    backbone — a LiteRT/ONNX file derived from the Keras model, keyed by its fingerprint, rebuilt
    when stale and checked against Keras within 1e-4 — or ``"tf"``, a ``tf.function`` traced once
    for a fixed input signature. Either way no call builds a graph or loads a model; the runtime is
    warmed up here. ``run_dir`` is where the derived file lives (the user cache if not given).
    The derived file snapshots the weights: re-create the Embedder after changing the model.
    """

    def __init__(
        self,
        model: SketchModel,
        runtime: str | None = None,
        run_dir: Path | None = None,
        num_threads: int | None = None,
    ):
        from .runtime import load_runtime

        self.model = model
        self.config = model.config
        self._runtime = load_runtime(model, runtime, run_dir, num_threads)
        self.runtime: str = self._runtime.name  # the runtime in use: "tf", "tflite" or "onnx"

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(images, dtype=np.float32)
        if len(images) == 0:
            dim, n = self.config.embedding_dim, len(self.config.classes)
            return np.zeros((0, dim), np.float32), np.zeros((0, n), np.float32)
        embeddings, probabilities = self._runtime(images)
        return l2_normalize(embeddings), np.asarray(probabilities, dtype=np.float32)

    def load_image(self, source: ImageSource) -> np.ndarray:
        return load_rgb(source, self.config.image_size, **self.limits)

    def load_sketch(self, source: ImageSource) -> np.ndarray:
        return load_sketch(source, self.config.image_size, self.config.sketch_raster, **self.limits)

    def normalize_sketch(self, source: ImageSource) -> Image.Image:
        """The sketch as the network is given it before resizing: the normaliser's raster image."""
        return normalize_sketch(source, self.config.sketch_raster, **self.limits)

    @property
    def limits(self) -> dict[str, int]:
        return {"max_bytes": self.config.max_upload_bytes, "max_pixels": self.config.max_pixels}


@dataclass
class Embeddings:
    vectors: np.ndarray
    probabilities: np.ndarray
    paths: list[Path]
    failures: list[tuple[Path, str]]


def _pause_point(name: str) -> None:
    """:func:`sbir_engine.index.pause_point`, imported only when a crash-safety test sets its
    variable: embedding needs no FAISS (``scripts/bench.py --gpu-parts`` runs where there is none)."""
    if os.environ.get("SBIR_ENGINE_TEST_PAUSE_AT"):  # index.PAUSE_ENV
        from .index import pause_point

        pause_point(name)


def decode_workers() -> int:
    """Decode threads for gallery embedding: one per usable core (2 to 16).

    Decoding is ~10% of the network's time per image on 2 cores (scripts/bench.py), so a thread per
    core keeps batches ready without crowding the runtime's own threads; more cores decode faster.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 2
    return max(2, min(16, cores))


def embed_images(
    embedder: Embedder,
    paths: list[Path],
    batch_size: int = 32,
    description: str = "Embedding",
    workers: int | None = None,
    prefetch: int = 2,
    sketches: Collection[Path] = (),
) -> Embeddings:
    """Embed image files with a progress bar (images/s); unreadable files are listed in ``failures``.

    Decoding runs ``prefetch`` batches ahead on ``workers`` threads (default :func:`decode_workers`)
    while the network runs, so the network is not kept waiting for images. The files in
    ``sketches`` are drawings: they go through the sketch normaliser, as a query sketch does.
    """
    vectors, probabilities, good, failures = [], [], [], []
    workers = workers or decode_workers()
    sketches = set(sketches)

    def load(path: Path) -> np.ndarray:
        return embedder.load_sketch(path) if path in sketches else embedder.load_image(path)

    with progress_bar() as progress:
        task = progress.add_task(description, total=len(paths))
        for batch in read_batches(paths, load, batch_size, workers, prefetch):
            failures.extend(batch.failures)
            if batch.paths:
                emb, probs = embedder(batch.arrays)
                vectors.append(emb)
                probabilities.append(probs)
                _pause_point("embedding")  # crash-safety tests stop (and kill) a build here
                good.extend(batch.paths)
            progress.advance(task, len(batch.paths) + len(batch.failures))
    dim = embedder.config.embedding_dim
    return Embeddings(
        np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32),
        np.concatenate(probabilities) if probabilities else np.zeros((0, len(embedder.config.classes))),
        good,
        failures,
    )


def progress_bar() -> Progress:
    """A rich progress bar with images/s; quiet when output is not a terminal-like stream."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeRemainingColumn(),
        transient=False,
    )


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:6.1f} img/s" if task.speed else "   ... img/s")
