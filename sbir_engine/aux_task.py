"""The auxiliary task (``config.aux_weight``): the head's 512-d layer also learns every QuickDraw
category, on the package's drawings of the categories beside the dataset's classes.

``other_drawings`` serves those drawings through the backbone once (cached per backbone), and
``OtherDrawingBatches`` mixes them into the head's batches; ``train.fit_head`` adds the softmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from .backbones import cache_dir
from .config import EngineConfig
from .data import quickdraw_categories, read_quickdraw_bitmaps
from .embed import progress_bar
from .images import EmptySketchError, normalize_sketch, resize_to_array
from .model import SketchModel, model_fingerprint


@dataclass
class OtherDrawings:
    """Served features of the QuickDraw package's drawings of the categories beside the dataset's
    classes, with each drawing's index in ``categories`` (all categories, the classes included)."""

    features: np.ndarray
    labels: np.ndarray
    categories: list[str]


def other_drawings(
    model: SketchModel, tarball: Path, first_categories: int = 0, per_category: int = 0
) -> OtherDrawings:
    """The package's drawings of every category outside the model's classes, normalised as a query
    is and served as the engine serves a sketch; cached on disk per backbone (33k drawings).

    ``first_categories`` / ``per_category`` (0 = all) shrink the set: quick checks.
    """
    config = model.config
    names = quickdraw_categories(tarball)
    categories = sorted(set(names[: first_categories or None]) | set(config.classes))
    key = model_fingerprint(model.backbone, config)[:16]
    if first_categories or per_category:
        key += f"-{first_categories}x{per_category}"
    cache = cache_dir() / "features" / f"other-categories-{key}.npz"
    if cache.is_file():
        stored = np.load(cache, allow_pickle=False)
        return OtherDrawings(stored["features"], stored["labels"], categories)
    others = [name for name in categories if name not in config.classes]
    features, labels = [], []
    with progress_bar() as progress:
        task = progress.add_task("other categories' drawings", total=len(others))
        for category in others:
            drawings = []
            for bitmap in read_quickdraw_bitmaps(tarball, category)[: per_category or None]:
                try:
                    drawings.append(
                        resize_to_array(normalize_sketch(bitmap, config.sketch_raster), config.image_size)
                    )
                except EmptySketchError:
                    continue  # a blank drawing teaches nothing
            for start in range(0, len(drawings), 64):
                features.append(model.served_features(np.stack(drawings[start : start + 64])))
            labels.extend([categories.index(category)] * len(drawings))
            progress.advance(task)
    other = OtherDrawings(np.concatenate(features).astype(np.float32), np.array(labels), categories)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, features=other.features, labels=other.labels)
    return other


class OtherDrawingBatches(keras.utils.PyDataset):
    """The head's batches with ``config.aux_weight``: each step ``batch_size`` dataset rows (shuffled
    each epoch) and as many other-category drawings drawn at random, with the three outputs' targets
    (a drawing has no class, a photo no category: all-zero rows) and the sample weights."""

    def __init__(
        self,
        rows: tuple[np.ndarray, np.ndarray, list[str]],
        weights: np.ndarray,
        other: OtherDrawings,
        config: EngineConfig,
    ):
        super().__init__()
        self.x, self.y, domains = rows
        category = np.array([other.categories.index(c) for c in config.classes])
        self.category = np.where(np.array(domains) == "sketch", category[self.y], -1)
        self.weights, self.other, self.batch = weights, other, config.batch_size
        self.classes = len(config.classes)
        self.rng = np.random.default_rng(config.seed)
        self.order = self.rng.permutation(len(self.x))

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch)

    def __getitem__(self, index: int):
        rows = self.order[index * self.batch : (index + 1) * self.batch]
        drawn = self.rng.integers(0, len(self.other.labels), self.batch)
        x = np.concatenate([self.x[rows], self.other.features[drawn]])
        classes = np.zeros((len(x), self.classes), np.float32)
        classes[np.arange(len(rows)), self.y[rows]] = 1.0
        category = np.concatenate([self.category[rows], self.other.labels[drawn]])
        categories = np.zeros((len(x), len(self.other.categories)), np.float32)
        categories[category >= 0, category[category >= 0]] = 1.0
        weights = np.concatenate([self.weights[rows], np.ones(self.batch, np.float32)])
        return x, {"probabilities": classes, "unit_embedding": classes, "aux": categories}, weights

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.x))
