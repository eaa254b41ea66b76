"""The classifier: the original design's parameter counts, a small real training run, embeddings."""

import csv
import json

import numpy as np
import pytest

from sbir_engine.config import EngineConfig
from sbir_engine.embed import Embedder
from sbir_engine.model import build_model, load_model


def count(weights) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


def test_resnet50_head_matches_the_original_system():
    model = build_model(EngineConfig(backbone="resnet50"), weights=None)
    classifier = model.classifier
    assert count(classifier.non_trainable_weights) == 23_587_712
    assert count(classifier.trainable_weights) == 1_049_088 + 6_669 == 1_055_757
    assert classifier.count_params() == 24_643_469
    assert classifier.output.shape[1:] == (13,) and classifier.input.shape[1:] == (180, 180, 3)


def test_small_training_run_beats_chance_by_far(small_run, small_metrics):
    """Five real classes (chance 0.2), a few epochs on cached features."""
    assert small_metrics["sketch"]["test_top1"] >= 0.6
    assert small_metrics["photo"]["test_top1"] >= 0.75
    assert small_metrics["sketch"]["test_top3"] >= small_metrics["sketch"]["test_top1"]
    for name in ("model.keras", "config.json", "history.csv", "history.png", "confusion_sketch.png"):
        assert (small_run / name).stat().st_size > 0, name
    with open(small_run / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == small_metrics["epochs_run"] and "val_probabilities_accuracy" in rows[0]


def test_saved_model_loads_safely_and_embeds(small_run, small_dataset):
    model = load_model(small_run)
    assert model.classes == ("airplane", "cat", "cup", "fish", "umbrella")
    assert json.loads((small_run / "fingerprint.json").read_text())["fingerprint"] == model.fingerprint()
    embedder = Embedder(model)
    paths = sorted((small_dataset / "sketch" / "test" / "cup").iterdir())[:4]
    paths += sorted((small_dataset / "photo" / "test" / "cup").iterdir())[:2]
    vectors, probabilities = embedder(np.stack([embedder.load_image(p) for p in paths]))
    assert vectors.shape == (6, 512) and probabilities.shape == (6, 5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # The serving path agrees with the saved Keras classifier it is built from.
    direct = np.asarray(
        model.classifier.predict(np.stack([embedder.load_image(p) for p in paths]), verbose=0)
    )
    np.testing.assert_allclose(probabilities, direct, atol=1e-5)


def test_missing_run_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="sbir-engine train"):
        load_model(tmp_path)
