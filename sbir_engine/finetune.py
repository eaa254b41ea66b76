"""Fine-tuning the top of the backbone, on the fly, after the head has trained on cached features.

Backend-neutral Keras (a ``PyDataset`` and preprocessing layers, no ``tf.data``), so the same
code trains on TensorFlow here and on JAX on a lent GPU.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from .backbones import unfreeze_top
from .data import Sample, load_split
from .images import load_rgb
from .model import SketchModel


class AugmentedImages(keras.utils.PyDataset):
    """Batches of (image, one-hot label), augmented with the original recipe when training."""

    def __init__(self, samples: list[Sample], model: SketchModel, augment: bool, **kwargs):
        super().__init__(**kwargs)
        from .train import make_augmenter

        self.samples = list(samples)
        self.config = model.config
        self.classes = {label: i for i, label in enumerate(model.config.classes)}
        self.augmenter = make_augmenter(model.config) if augment else None
        self.rng = np.random.default_rng(model.config.seed)

    def __len__(self) -> int:
        return -(-len(self.samples) // self.config.batch_size)

    def __getitem__(self, index: int):
        size = self.config.batch_size
        batch = self.samples[index * size : (index + 1) * size]
        images = np.stack([load_rgb(s.path, self.config.image_size) for s in batch])
        if self.augmenter is not None:
            images = keras.ops.convert_to_numpy(self.augmenter(images, training=True))
        labels = keras.utils.to_categorical([self.classes[s.label] for s in batch], len(self.classes))
        return images, labels

    def on_epoch_end(self) -> None:
        if self.augmenter is not None:
            self.rng.shuffle(self.samples)


def fine_tune(
    model: SketchModel,
    data_dir: Path,
    n_blocks: int,
    epochs: int,
    verbose: int = 2,
    learning_rate_factor: float = 0.1,
    train_samples: list[Sample] | None = None,
) -> dict[str, list[float]]:
    """Unfreeze the top ``n_blocks`` of the backbone and train with the whole network end to end."""
    config = model.config
    train_samples = train_samples or load_split(data_dir, "train", config.domains)
    val_samples = load_split(data_dir, "val", config.domains)
    unfreeze_top(model.backbone, n_blocks)
    model.classifier.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate * learning_rate_factor),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.classifier.fit(
        AugmentedImages(train_samples, model, augment=True, workers=4),
        validation_data=AugmentedImages(val_samples, model, augment=False, workers=4),
        epochs=epochs,
        verbose=verbose,
        callbacks=[
            keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=2, restore_best_weights=True)
        ],
    ).history
    model.backbone.trainable = False
    return history
