"""The engine at its edges: k, empty and tuple inputs, filtered search on approximate indexes, a
gallery that moved, a same-class query that nothing can match, and the package's function names."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from sbir_engine.build import build_index
from sbir_engine.cli import app
from sbir_engine.engine import SketchEngine
from sbir_engine.index import Entry, GalleryIndex
from sbir_engine.index_factory import make_faiss_index, recall_at_k, set_search_parameter


@pytest.fixture(scope="module")
def engine(small_index) -> SketchEngine:
    return SketchEngine.load(small_index)


@pytest.fixture(scope="module")
def sketch(small_dataset) -> Path:
    """A real held-out QuickDraw bitmap."""
    return sorted((small_dataset / "sketch" / "test" / "cat").iterdir())[0]


def few_files(gallery: Path, out: Path, per_label: int = 2, flat: bool = False) -> Path:
    """The first files of each label of ``gallery``, as <label>/<file> or flat: a quick build."""
    for folder in sorted(p for p in gallery.iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir())[:per_label]:
            target = out / (f"{folder.name}-{path.name}" if flat else f"{folder.name}/{path.name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return out


# -- k -------------------------------------------------------------------------------------------------


def test_k_below_one_is_refused(engine, sketch, small_index):
    """k = 0 or -1 answered every candidate (query) or one result (search); now a clear error."""
    vectors = engine.embed(sketch)
    for k in (0, -1):
        with pytest.raises(ValueError, match=f"k \\(the number of results\\) must be at least 1, got {k}"):
            engine.query(sketch, k=k)
        with pytest.raises(ValueError, match="must be at least 1"):
            engine.search(vectors, k=k)
    assert len(engine.query(sketch, k=1).neighbours) == len(engine.search(vectors, k=1)[0]) == 1
    for k in ("0", "-1"):
        result = CliRunner().invoke(app, ["query", str(sketch), "--index", str(small_index), "-k", k])
        message = " ".join(result.output.split())
        assert result.exit_code == 2 and "Invalid value for '-k'" in message, result.output
        assert "greater than or equal to 1" in message or ">=1" in message, result.output


# -- embed ---------------------------------------------------------------------------------------------


def test_embed_takes_any_sequence_and_an_empty_one(engine, sketch):
    empty = engine.embed([])
    assert empty.shape == (0, engine.config.embedding_dim) and empty.dtype == np.float32
    assert engine.embed(()).shape == (0, engine.config.embedding_dim)
    one = engine.embed(sketch)
    assert one.shape == (1, engine.config.embedding_dim)
    np.testing.assert_allclose(engine.embed((sketch, str(sketch))), np.vstack([one, one]), atol=1e-5)
    np.testing.assert_allclose(engine.embed(p for p in [sketch]), one, atol=1e-5)
    np.testing.assert_allclose(engine.embed(sketch.read_bytes()), one, atol=1e-5)  # bytes: one image
    with pytest.raises(TypeError, match="embed takes an image .* or a sequence of them, not int"):
        engine.embed(42)


# -- filtered search on approximate indexes ------------------------------------------------------------


def test_a_label_filter_on_an_ivf_index_finds_every_match(
    engine, small_run, small_gallery, small_index, tmp_path
):
    """IVF probes only nprobe lists and filters after: a label whose images lie in other lists came
    back short or empty. The filtered search now answers as exact search does."""
    copy = tmp_path / "index"
    shutil.copytree(small_index, copy)
    build_index(small_run, small_gallery, copy, index_type="IVF8,Flat")  # nothing re-embedded
    ivf = SketchEngine.load(copy)
    assert ivf.index.factory == "IVF8,Flat"
    set_search_parameter(ivf.index.index, "nprobe", 1)  # a large gallery probes a few lists of many
    query = engine.embed(sketch_of(small_gallery, "umbrella"))
    quantizer = faiss.downcast_index(ivf.index.index.index).quantizer
    probed = quantizer.search(query, 1)[1][0, 0]  # the one list nprobe = 1 searches
    for label in ("airplane", "cup", "fish"):
        ids = ivf.index.ids_with_label(label)
        # Some of the label's images lie in lists the query does not probe (all of them, mostly).
        lists = quantizer.search(ivf.index.vectors[ivf.index._rows_of(ids)], 1)[1]
        assert (lists != probed).any()
        found = ivf.search(query, k=len(ids), labels=[label])[0]
        assert sorted(n.id for n in found) == sorted(ids.tolist())
        exact = engine.search(query, k=len(ids), labels=[label])[0]  # the Flat index: exact search
        assert [n.score for n in found] == pytest.approx([n.score for n in exact], abs=1e-5)
        result = ivf.query(sketch_of(small_gallery, "umbrella"), k=len(ids), labels=[label])
        expected = engine.query(sketch_of(small_gallery, "umbrella"), k=len(ids), labels=[label])
        assert {n.id for n in result.neighbours} == {n.id for n in expected.neighbours}
        assert [n.score for n in result.neighbours] == pytest.approx([n.score for n in expected.neighbours])


def sketch_of(gallery: Path, label: str) -> Path:
    return sorted((gallery / label).iterdir())[0]


def test_a_label_filter_on_an_hnsw_index_finds_k():
    """HNSW walks its graph as if unfiltered: a query far from a label's cluster found few of its
    entries or none (5,000 clustered vectors, efSearch 16). Short rows are now answered exactly."""
    rng = np.random.default_rng(0)
    n, dim = 5000, 64
    labels = rng.integers(0, 10, n)
    vectors = rng.normal(size=(10, dim))[labels] + rng.normal(size=(n, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    ids = np.arange(n, dtype=np.int64) * 7 + 3
    entries = [Entry(int(i), f"{c}/{i}.png", str(c), str(i), 1) for i, c in zip(ids, labels, strict=True)]
    probabilities = np.zeros((n, 3), np.float32)
    meta = {"dim": dim, "factory": "HNSW32,Flat"}
    hnsw = GalleryIndex(
        make_faiss_index(vectors, ids, "HNSW32,Flat"), vectors, probabilities, ids, entries, meta
    )
    set_search_parameter(hnsw.index, "efSearch", 16)
    flat = GalleryIndex(
        make_faiss_index(vectors, ids, "Flat"), vectors, probabilities, ids, entries, {**meta}
    )
    queries = vectors[labels == 0][:20]
    for k in (10, 100):
        found = hnsw.search(queries, k, labels=["5"])[1]
        assert (found >= 0).all() and np.isin(found, ids[labels == 5]).all()  # k each, all labelled 5
        assert recall_at_k(found, flat.search(queries, k, labels=["5"])[1]) >= 0.95
    scores, found = hnsw.search(queries, 1000, labels=["5", "5"])  # more than the label holds
    assert ((found >= 0).sum(axis=1) == (labels == 5).sum()).all()
    assert scores[found < 0].max() < -1e30  # FAISS's "nothing here"
    # Unfiltered search is the plain approximate one, as before.
    np.testing.assert_array_equal(hnsw.search(queries, 10)[1], hnsw.index.search(queries, 10)[1])


# -- a rebuild that moved the gallery -----------------------------------------------------------------


def test_reload_follows_a_gallery_that_moved(small_run, small_gallery, tmp_path, sketch):
    old = few_files(small_gallery, tmp_path / "gallery")
    index = tmp_path / "index"
    build_index(small_run, old, index)
    engine = SketchEngine.load(index)
    moved = tmp_path / "moved gallery é"
    shutil.move(old, moved)  # the user moves the folder and rebuilds from its new place
    build_index(small_run, moved, index)
    assert engine.reload()
    assert engine.gallery_root == moved.resolve()
    first = engine.query(sketch, k=1).neighbours[0]
    assert engine.resolve(first) == moved.resolve() / first.path and engine.resolve(first).is_file()


# -- same class on a gallery without class labels -----------------------------------------------------


def test_same_class_on_an_unlabelled_gallery_says_why_it_is_empty(small_run, small_gallery, tmp_path, sketch):
    flat = few_files(small_gallery, tmp_path / "flat", flat=True)
    build_index(small_run, flat, tmp_path / "index")
    engine = SketchEngine.load(tmp_path / "index")
    result = engine.query(sketch, k=3, same_class=True)
    assert result.neighbours == []
    assert f"no image in the index has the label {result.label!r}, the predicted class" in result.note
    assert engine.query(sketch, k=3).note is None and len(engine.query(sketch, k=3).neighbours) == 3
    cli = CliRunner().invoke(app, ["query", str(sketch), "--index", str(tmp_path / "index"), "--same-class"])
    assert cli.exit_code == 0, cli.output
    assert f"note: no image in the index has the label {result.label!r}" in cli.stderr
    assert "class: " in cli.stdout


def test_same_class_note_is_absent_when_the_class_has_images(engine, sketch):
    result = engine.query(sketch, k=3, same_class=True)
    assert len(result.neighbours) == 3 and result.note is None


# -- the package's public names ------------------------------------------------------------------------


def _check_functions(train, evaluate) -> None:
    assert inspect.isfunction(train) and inspect.isfunction(evaluate)
    assert list(inspect.signature(train).parameters)[:2] == ["data_dir", "out_dir"]
    assert list(inspect.signature(evaluate).parameters)[:2] == ["index_dir", "queries"]


def test_train_and_evaluate_are_the_functions_after_their_modules_are_imported():
    """A submodule is bound on its package when imported: the name used to become the module."""
    import sbir_engine
    import sbir_engine.evaluate
    import sbir_engine.train  # noqa: F401
    from sbir_engine import evaluate, train
    from sbir_engine.train import make_augmenter  # the module's other names, by its full name

    _check_functions(train, evaluate)
    assert sbir_engine.train is train and sbir_engine.evaluate is evaluate
    assert sys.modules["sbir_engine.train"].make_augmenter is make_augmenter


def test_train_and_evaluate_are_the_functions_when_imported_first():
    """In a fresh interpreter, ``from sbir_engine import train`` imports the module on first use."""
    code = (
        "import inspect; from sbir_engine import train, evaluate; "
        "print(inspect.isfunction(train), inspect.isfunction(evaluate), train.__module__)"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax"}  # inspected, never run: the lightest backend
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True True sbir_engine.train"
