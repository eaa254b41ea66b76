"""The classifier: frozen ImageNet backbone → Flatten → Dense(512, relu) → Dense(N, softmax).

The Dense(512) output, L2-normalised, is the engine's embedding. The head's layers are shared
between two models: ``classifier`` (image → probabilities, the saved model) and ``head``
(backbone features → probabilities), which trains in seconds on cached features.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from .backbones import FEATURE_DIMS, build_backbone
from .config import EngineConfig
from .images import PREPROCESSING_VERSION

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
FINGERPRINT_FILE = "fingerprint.json"
SAVED_FILES = (MODEL_FILE, CONFIG_FILE, FINGERPRINT_FILE)  # swapped in in this order
_PARTIAL = ".partial-"  # a save's files before they are swapped in
EMBEDDING_LAYER = "embedding"
PROBABILITIES_LAYER = "probabilities"
DROPOUT_LAYER = "feature_dropout"  # present only when config.head_dropout > 0


@dataclass
class SketchModel:
    """A trained (or freshly built) classifier with its config and the views the engine needs."""

    config: EngineConfig
    classifier: keras.Model
    backbone: keras.Model
    head: keras.Model

    @property
    def classes(self) -> tuple[str, ...]:
        return self.config.classes

    def serving_model(self) -> keras.Model:
        """image → (embedding before normalisation, probabilities) in one forward pass.

        With ``config.mirror`` the backbone sees each image and its mirror image in one
        batch of 2n, and the head reads the mean of the two feature vectors.
        """
        if not self.config.mirror:
            embedding = self.classifier.get_layer(EMBEDDING_LAYER).output
            return keras.Model(self.classifier.input, [embedding, self.classifier.output], name="serving")
        ops = keras.ops
        image = keras.Input(self.config.input_shape, name="image")
        both = ops.concatenate([image, ops.flip(image, axis=2)], axis=0)
        features = self.backbone(both, training=False)
        features = ops.mean(ops.reshape(features, (2, -1, features.shape[-1])), axis=0)
        return keras.Model(image, list(apply_head(self.classifier, features)), name="serving")

    def served_features(self, images: np.ndarray) -> np.ndarray:
        """Backbone features of a batch as the engine serves them: averaged with the mirror
        images' under ``config.mirror``, as ``serving_model`` does in one pass."""
        features = np.asarray(self.backbone.predict_on_batch(images))
        if self.config.mirror:
            features = (features + np.asarray(self.backbone.predict_on_batch(images[:, :, ::-1]))) / 2
        return features

    def fingerprint(self) -> str:
        return model_fingerprint(self.classifier, self.config)

    def save(self, run_dir: Path) -> None:
        """Write the model, its config and fingerprint beside each other, then swap them in: a run
        killed while writing (a model file takes seconds) leaves the folder's previous model whole."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(f"{_PARTIAL}*"):  # left by a save that was killed
            stale.unlink(missing_ok=True)
        partial = {name: run_dir / f"{_PARTIAL}{os.getpid()}-{name}" for name in SAVED_FILES}
        try:
            self.classifier.save(partial[MODEL_FILE])  # (the name must end in .keras)
            self.config.save(partial[CONFIG_FILE])
            fingerprint = json.dumps({"fingerprint": self.fingerprint()}) + "\n"
            partial[FINGERPRINT_FILE].write_text(fingerprint)
            for name, path in partial.items():
                os.replace(path, run_dir / name)
        finally:
            for path in partial.values():
                path.unlink(missing_ok=True)


def build_model(config: EngineConfig, weights: str | Path | None = "imagenet") -> SketchModel:
    backbone = build_backbone(config.backbone, config.input_shape, weights)
    backbone.trainable = False
    layers = [keras.layers.Flatten(name="flatten")]
    if config.head_dropout:
        layers.append(keras.layers.Dropout(config.head_dropout, seed=config.seed, name=DROPOUT_LAYER))
    layers.append(keras.layers.Dense(config.embedding_dim, activation="relu", name=EMBEDDING_LAYER))
    layers.append(keras.layers.Dense(len(config.classes), activation="softmax", name=PROBABILITIES_LAYER))

    image = keras.Input(config.input_shape, name="image")
    # training=False keeps batch-norm statistics fixed, also when the top of the backbone is fine-tuned.
    outputs = backbone(image, training=False)
    for layer in layers:
        outputs = layer(outputs)
    classifier = keras.Model(image, outputs, name="sketch_classifier")
    return SketchModel(config, classifier, backbone, head_model(classifier, config))


def load_model(run_dir: Path) -> SketchModel:
    """Load a run folder's model (``safe_mode=True``: no code from the file is executed)."""
    run_dir = Path(run_dir)
    path = run_dir / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no trained model ({MODEL_FILE}); run `sbir-engine train`")
    config = EngineConfig.load(run_dir / CONFIG_FILE)
    classifier = keras.models.load_model(path, safe_mode=True, compile=False)
    backbone = next(layer for layer in classifier.layers if isinstance(layer, keras.Model))
    return SketchModel(config, classifier, backbone, head_model(classifier, config))


def head_model(classifier: keras.Model, config: EngineConfig) -> keras.Model:
    """Backbone features → probabilities through the classifier's own head layers (shared weights),
    which trains in seconds on cached features."""
    features = keras.Input((FEATURE_DIMS[config.backbone],), name="features")
    return keras.Model(features, apply_head(classifier, features)[1], name="head")


def apply_head(source: keras.Model, features):
    """The head's layers, taken from ``source`` (the classifier or the head), on backbone features:
    (embedding before normalisation, probabilities)."""
    features = source.get_layer("flatten")(features)
    if any(layer.name == DROPOUT_LAYER for layer in source.layers):
        features = source.get_layer(DROPOUT_LAYER)(features)  # active only in training
    embedding = source.get_layer(EMBEDDING_LAYER)(features)
    return embedding, source.get_layer(PROBABILITIES_LAYER)(embedding)


def model_fingerprint(model: keras.Model, config: EngineConfig) -> str:
    """A hash of every weight and of what decides the network's input, so an index can tell its model."""
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            {
                "backbone": config.backbone,
                "image_size": config.image_size,
                "sketch_raster": config.sketch_raster,
                "mirror": config.mirror,
                "classes": list(config.classes),
                "preprocessing": PREPROCESSING_VERSION,
            },
            sort_keys=True,
        ).encode()
    )
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()[:32]


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    # An all-zero ReLU output has no direction; leave it zero rather than divide by zero.
    return vectors / np.maximum(norms, 1e-12)
