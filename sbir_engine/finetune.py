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
    """Batches of (image, targets, domain-balanced weights), augmented as ``train``'s cached views
    are when training: the original recipe, and stroke-width jitter for the sketches."""

    def __init__(self, samples: list[Sample], model: SketchModel, augment: bool, **kwargs):
        super().__init__(**kwargs)
        from .train import domain_balanced_weights, make_augmenter

        self.samples = list(samples)
        self.config = model.config
        self.classes = {label: i for i, label in enumerate(model.config.classes)}
        # Over the whole split, so that each domain weighs in as it did in the head's training.
        self.weights = domain_balanced_weights([s.domain for s in self.samples])
        domains = model.config.domains
        self.augmenters = (
            {domain: make_augmenter(model.config, domain == "sketch") for domain in domains}
            if augment
            else None
        )
        self.rng = np.random.default_rng(model.config.seed)
        # Training batches mix classes and domains from the first epoch: the split is sorted by
        # class, and the contrastive term needs positives and negatives in every batch.
        self.order = self.rng.permutation(len(self.samples)) if augment else np.arange(len(self.samples))

    def __len__(self) -> int:
        return -(-len(self.samples) // self.config.batch_size)

    def __getitem__(self, index: int):
        size = self.config.batch_size
        chosen = self.order[index * size : (index + 1) * size]
        batch = [self.samples[i] for i in chosen]
        images = np.stack([load_rgb(s.path, self.config.image_size) for s in batch])
        domains = np.array([s.domain for s in batch])
        if self.augmenters is not None:
            for domain, augmenter in self.augmenters.items():
                mask = domains == domain
                if mask.any():
                    images[mask] = keras.ops.convert_to_numpy(augmenter(images[mask], training=True))
        labels = keras.utils.to_categorical([self.classes[s.label] for s in batch], len(self.classes))
        weights = self.weights[chosen]
        return images, {"probabilities": labels, "unit_embedding": labels}, weights

    def on_epoch_end(self) -> None:
        if self.augmenters is not None:
            self.order = self.rng.permutation(len(self.samples))


def fine_tune(
    model: SketchModel,
    data_dir: Path,
    n_blocks: int,
    epochs: int,
    verbose: int = 2,
    learning_rate_factor: float = 0.1,
    train_samples: list[Sample] | None = None,
) -> dict[str, list[float]]:
    """Unfreeze the top ``n_blocks`` of the backbone and train the whole network end to end, with
    the head's two losses (cross-entropy and the contrastive term) at a tenth of its rate."""
    from .train import compiled_trainer, early_stopping

    config = model.config
    train_samples = train_samples or load_split(data_dir, "train", config.domains)
    val_samples = load_split(data_dir, "val", config.domains)
    unfreeze_top(model.backbone, n_blocks)
    network = compiled_trainer(model, images=True, learning_rate=config.learning_rate * learning_rate_factor)
    history = network.fit(
        AugmentedImages(train_samples, model, augment=True, workers=4),
        validation_data=AugmentedImages(val_samples, model, augment=False, workers=4),
        epochs=epochs,
        verbose=verbose,
        callbacks=early_stopping(config, patience=2),
    ).history
    model.backbone.trainable = False
    return history
