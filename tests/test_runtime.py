"""The fast inference runtimes behind Embedder: same outputs as Keras, derived files kept fresh.

No timing is asserted here (scripts/bench.py measures speed); only agreement and file handling.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from sbir_engine import runtime as rt
from sbir_engine.embed import Embedder
from sbir_engine.images import load_rgb, load_sketch
from sbir_engine.model import l2_normalize, load_model

TOL = 1e-4
AVAILABLE = rt.available_runtimes()


@pytest.fixture(scope="module")
def run_copy(small_run, tmp_path_factory) -> Path:
    """A private copy of the session's run folder, so exports land in a folder of this module's own."""
    out = tmp_path_factory.mktemp("runtime") / "run"
    shutil.copytree(small_run, out)
    return out


@pytest.fixture(scope="module")
def real_images(small_dataset, small_run) -> np.ndarray:
    """Real sketches (through the query normaliser) and real photos, as the network sees them."""
    size = load_model(small_run).config.image_size

    def first(domain: str, label: str) -> list[Path]:
        return sorted((small_dataset / domain / "test" / label).iterdir())[:3]

    sketches = first("sketch", "cup") + first("sketch", "cat")
    photos = first("photo", "fish") + first("photo", "airplane")
    return np.stack([load_sketch(p, size) for p in sketches] + [load_rgb(p, size) for p in photos])


def keras_outputs(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    embedding, probabilities = model.serving_model()(images, training=False)
    return l2_normalize(np.asarray(embedding)), np.asarray(probabilities)


def assert_matches(embedder: Embedder, model, images: np.ndarray) -> None:
    want_e, want_p = keras_outputs(model, images)
    for part in (slice(None), slice(0, 1), slice(1, 4)):  # batched, batch 1 (a query), another size
        got_e, got_p = embedder(images[part])
        assert got_e.shape == want_e[part].shape and got_p.shape == want_p[part].shape
        assert np.abs(got_e - want_e[part]).max() <= TOL, embedder.runtime
        assert np.abs(got_p - want_p[part]).max() <= TOL, embedder.runtime
        np.testing.assert_allclose(np.linalg.norm(got_e, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("kind", rt.RUNTIMES)
def test_runtime_matches_keras_on_real_images(kind, run_copy, real_images):
    if kind not in AVAILABLE:
        pytest.skip(f"{kind} is not installed here (available: {AVAILABLE})")
    model = load_model(run_copy)
    embedder = Embedder(model, runtime=kind, run_dir=run_copy)
    assert embedder.runtime == kind
    assert_matches(embedder, model, real_images)
    if kind in rt.SUFFIXES:
        # The derived file sits in the run folder, named by the model's fingerprint.
        fingerprint = model.fingerprint()
        path = run_copy / rt.export_name(kind, fingerprint)
        assert path.is_file() and embedder._runtime.path == path
        assert (run_copy / "model.keras").is_file()  # the Keras model stays the source of truth


def test_auto_takes_the_first_available_of_the_measured_order(run_copy, real_images):
    model = load_model(run_copy)
    embedder = Embedder(model, run_dir=run_copy)
    expected = next(k for k in rt.AUTO_ORDER[model.config.backbone] if k in AVAILABLE)
    assert embedder.runtime == expected
    assert_matches(embedder, model, real_images)


def test_concurrent_queries_and_batches_agree(run_copy, real_images):
    """An engine is shared between threads: concurrent batch-1 and batched calls give the same answers."""
    embedder = Embedder(load_model(run_copy), run_dir=run_copy)
    single = [embedder(real_images[i : i + 1])[0] for i in range(len(real_images))]
    batched = embedder(real_images[:5])[0]
    errors = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                if i % 2:
                    got = embedder(real_images[:5])[0]
                    assert np.abs(got - batched).max() <= 1e-6
                else:
                    got = embedder(real_images[i : i + 1])[0]
                    assert np.abs(got - single[i]).max() <= 1e-6
        except BaseException as err:  # reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def _stale_kind() -> str:
    return "tflite" if "tflite" in AVAILABLE else "onnx"


def test_stale_export_is_rebuilt_and_bad_exports_are_refused(run_copy, real_images, tmp_path, monkeypatch):
    kind = _stale_kind()
    if kind not in AVAILABLE:
        pytest.skip("no runtime with a derived file is installed")
    run_dir = tmp_path / "run"
    shutil.copytree(run_copy, run_dir, ignore=shutil.ignore_patterns("serving-*"))
    model = load_model(run_dir)
    Embedder(model, runtime=kind, run_dir=run_dir)
    old_fingerprint = model.fingerprint()
    old_path = run_dir / rt.export_name(kind, old_fingerprint)
    old_bytes = old_path.read_bytes()

    # Reloading the same model reuses the file: no conversion.
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted although an up-to-date export exists")

    with monkeypatch.context() as patch:
        patch.setattr(rt, "convert_tflite", no_conversion)
        patch.setattr(rt, "convert_onnx", no_conversion)
        Embedder(load_model(run_dir), runtime=kind, run_dir=run_dir)

    # Change the weights (as a retrained model would): the fingerprint moves and the export is rebuilt.
    layer = model.classifier.get_layer("embedding")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * 1.5, bias + 0.05])
    new_fingerprint = model.fingerprint()
    assert new_fingerprint != old_fingerprint
    embedder = Embedder(model, runtime=kind, run_dir=run_dir)
    new_path = run_dir / rt.export_name(kind, new_fingerprint)
    assert new_path.is_file() and not old_path.exists()  # the stale file is gone
    assert_matches(embedder, model, real_images)  # and the new one follows the changed weights

    # A damaged export is rebuilt (and checked) rather than used. The converter is replaced by one
    # that returns the good bytes again, to spare the test a third real conversion.
    converter = "convert_tflite" if kind == "tflite" else "convert_onnx"
    good_bytes = new_path.read_bytes()
    new_path.write_bytes(b"not a model")
    with monkeypatch.context() as patch:
        patch.setattr(rt, converter, lambda *args, **kwargs: good_bytes)
        embedder = Embedder(model, runtime=kind, run_dir=run_dir)
    assert new_path.read_bytes() == good_bytes
    assert_matches(embedder, model, real_images)

    # A conversion whose outputs differ from Keras (here: the old model's export) is never kept:
    # naming the runtime raises, auto falls back to the next runtime of its order.
    new_path.unlink()
    monkeypatch.setattr(rt, converter, lambda *args, **kwargs: old_bytes)
    with pytest.raises(rt.RuntimeUnavailable, match="differs from Keras"):
        Embedder(model, runtime=kind, run_dir=run_dir)
    assert not new_path.exists() and not list(run_dir.glob(".serving-*"))
    monkeypatch.setitem(rt.AUTO_ORDER, model.config.backbone, (kind, "tf"))
    embedder = Embedder(model, runtime="auto", run_dir=run_dir)
    assert embedder.runtime == "tf"
    assert_matches(embedder, model, real_images)


def test_missing_package_falls_back_or_is_named(run_copy, monkeypatch):
    model = load_model(run_copy)

    def unavailable(kind: str) -> None:
        if kind != "tf":
            raise rt.RuntimeUnavailable(f"{kind} is not installed (test)")

    monkeypatch.setattr(rt, "_require", unavailable)
    with pytest.raises(rt.RuntimeUnavailable, match="not installed"):
        Embedder(model, runtime="onnx", run_dir=run_copy)
    assert Embedder(model, runtime="auto", run_dir=run_copy).runtime == "tf"
    monkeypatch.setenv(rt.ENV_RUNTIME, "tf")
    assert Embedder(model, run_dir=run_copy).runtime == "tf"
    with pytest.raises(ValueError, match="unknown runtime"):
        Embedder(model, runtime="tensorrt")


def test_cache_keeps_the_most_recent_exports(tmp_path):
    """In the shared cache (several models) old exports are pruned by last use, not by fingerprint."""
    folder = tmp_path / "runtimes"
    folder.mkdir()
    paths = []
    for i in range(rt.CACHE_KEEP + 3):
        path = folder / rt.export_name("onnx", f"{i:02x}" + "0" * 30)
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
        paths.append(path)
    keep = paths[0]
    rt._remove_stale(folder, keep, "onnx", run_dir=None)
    left = sorted(p for p in folder.iterdir())
    assert keep in left and len(left) == rt.CACHE_KEEP
    assert all(p in left for p in paths[-(rt.CACHE_KEEP - 1) :])


def test_embedding_code_imports_neither_tensorflow_nor_faiss_off_the_tensorflow_backend():
    """scripts/bench.py --gpu-parts embeds and trains with backend-neutral Keras on a GPU machine
    that may have neither TensorFlow nor FAISS: the modules it uses must not import them."""
    code = (
        "import sys, sbir_engine.embed, sbir_engine.runtime, sbir_engine.train, sbir_engine.model; "
        "print(sorted(m for m in ('tensorflow', 'faiss') if m in sys.modules))"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax"}  # the GPU route's backend (pretrain_sketch.py)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
