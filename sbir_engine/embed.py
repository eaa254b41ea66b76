"""Images → L2-normalised 512-d embeddings, streamed: reader (threads decode) → mapper (network).

Memory holds a few batches at a time whatever the number of images, and bad files are reported
and skipped instead of stopping the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .images import ImageError, ImageSource, load_rgb, load_sketch
from .model import SketchModel, l2_normalize

Loader = Callable[[Path], np.ndarray]


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

    The graph is traced once for a fixed input signature, so no call builds a graph or a model.
    """

    def __init__(self, model: SketchModel):
        import tensorflow as tf

        self.model = model
        self.config = model.config
        serving = model.serving_model()
        size = self.config.image_size
        self._forward = tf.function(
            lambda images: serving(images, training=False),
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)],
        )

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        embeddings, probabilities = self._forward(np.asarray(images, dtype=np.float32))
        return l2_normalize(embeddings.numpy()), probabilities.numpy()

    def load_image(self, path: Path) -> np.ndarray:
        return load_rgb(path, self.config.image_size, **self.limits)

    def load_sketch(self, source: ImageSource) -> np.ndarray:
        return load_sketch(source, self.config.image_size, self.config.sketch_raster, **self.limits)

    @property
    def limits(self) -> dict[str, int]:
        return {"max_bytes": self.config.max_upload_bytes, "max_pixels": self.config.max_pixels}


@dataclass
class Embeddings:
    vectors: np.ndarray
    probabilities: np.ndarray
    paths: list[Path]
    failures: list[tuple[Path, str]]


def embed_images(
    embedder: Embedder, paths: list[Path], batch_size: int = 32, description: str = "Embedding"
) -> Embeddings:
    """Embed image files with a progress bar; unreadable files are listed in ``failures``."""
    vectors, probabilities, good, failures = [], [], [], []
    with progress_bar() as progress:
        task = progress.add_task(description, total=len(paths))
        for batch in read_batches(paths, embedder.load_image, batch_size):
            failures.extend(batch.failures)
            if batch.paths:
                emb, probs = embedder(batch.arrays)
                vectors.append(emb)
                probabilities.append(probs)
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
