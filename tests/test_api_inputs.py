"""The Python API's inputs: long embed lists in bounded batches, arrays of every dtype, label filters,
file objects and buffers, search vectors, k, and paths given as Path objects."""

from __future__ import annotations

import io
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sbir_engine import runtime as rt
from sbir_engine.cli import app
from sbir_engine.engine import SketchEngine
from sbir_engine.gallery import is_drawing
from sbir_engine.images import ImageError, open_image

TOL = 1e-5


@pytest.fixture(scope="module")
def engine(small_index) -> SketchEngine:
    return SketchEngine.load(small_index)


@pytest.fixture(scope="module")
def sketches(small_dataset) -> list[Path]:
    """Real held-out QuickDraw bitmaps of every class."""
    return sorted((small_dataset / "sketch" / "test").glob("*/*.png"))


@pytest.fixture(scope="module")
def sketch(small_dataset) -> Path:
    return sorted((small_dataset / "sketch" / "test" / "cat").iterdir())[0]


@pytest.fixture(scope="module")
def grey(sketch) -> np.ndarray:
    """The sketch as a uint8 grey array (0–255), as most callers hold one."""
    return np.asarray(Image.open(sketch).convert("L"))


# -- embed: bounded batches ----------------------------------------------------------------------------


def test_embed_works_in_batches_of_the_configured_size(engine, sketches, monkeypatch):
    """embed(list) ran every image in one forward pass (~8.5 MiB an image, kept by the TFLite
    interpreter): a few thousand paths ran a machine out of memory. Now config.batch_size at a time,
    read lazily from a generator, with the same vectors."""
    paths = (sketches * 3)[: 2 * engine.config.batch_size + 7]  # two full batches and a part
    expected = np.vstack([engine.embed(path) for path in paths])  # one image at a time
    pulled, batches = [], []
    runtime = engine.embedder._runtime

    def spy(images):
        batches.append((len(images), len(pulled)))
        return runtime(images)

    def lazily():
        for path in paths:
            pulled.append(path)
            yield path

    monkeypatch.setattr(engine.embedder, "_runtime", spy)
    got = engine.embed(lazily())
    assert got.shape == (len(paths), engine.config.embedding_dim)
    np.testing.assert_allclose(got, expected, atol=TOL)
    size = engine.config.batch_size
    assert [n for n, _ in batches] == [size, size, 7]
    assert [seen for _, seen in batches] == [size, 2 * size, len(paths)]  # decoded as it goes


def test_tflite_runtime_is_never_resized_beyond_its_batch(engine, small_config):
    """A large call used to resize the interpreter to its size and keep it so: now it runs in chunks."""
    runtime = engine.embedder._runtime
    if runtime.name != "tflite":
        pytest.skip(f"the engine runs {runtime.name}, not tflite")
    images = rt.probe_images(small_config.image_size, 2 * rt.TFLITE_MAX_BATCH + 3)
    embedding, probabilities = runtime(images)
    assert embedding.shape[0] == probabilities.shape[0] == len(images)
    assert runtime._batched_size <= rt.TFLITE_MAX_BATCH
    for start in (0, rt.TFLITE_MAX_BATCH, 2 * rt.TFLITE_MAX_BATCH):  # each chunk as its own call
        part_e, part_p = runtime(images[start : start + 3])
        np.testing.assert_allclose(embedding[start : start + 3], part_e, atol=1e-4)
        np.testing.assert_allclose(probabilities[start : start + 3], part_p, atol=1e-4)


# -- arrays of every dtype -----------------------------------------------------------------------------


def test_arrays_are_read_by_their_dtype(engine, grey):
    """uint16 was clipped to 0–255 (every grey turned white) and a uint8 0/1 mask read as all black
    (an "empty sketch"); ordinary uint8, int and float arrays read as before."""
    want = engine.embed(grey)
    same = {
        "uint16 (16-bit scan)": grey.astype(np.uint16) * 257,
        "int32 over 255": grey.astype(np.int32) * 257,
        "int64 0–255": grey.astype(np.int64),
        "float 0–255": grey.astype(np.float64),
        "float 0–1": grey.astype(np.float32) / 255,
        "uint8 RGB": np.repeat(grey[..., None], 3, axis=2),
    }
    for name, array in same.items():
        np.testing.assert_allclose(engine.embed(array), want, atol=TOL, err_msg=name)
    mask = grey >= 128
    as_mask = engine.embed(mask)
    for array in (mask.astype(np.uint8), mask.astype(np.int64), mask.astype(np.float32)):
        np.testing.assert_allclose(engine.embed(array), as_mask, atol=TOL, err_msg=str(array.dtype))
    assert set(np.unique(np.asarray(open_image(mask.astype(np.uint8))))) == {0, 255}
    # The same pixels as a PIL 16-bit image and as a uint16 array are one picture.
    sixteen = grey.astype(np.uint16) * 257
    np.testing.assert_allclose(engine.embed(Image.fromarray(sixteen)), engine.embed(sixteen), atol=TOL)
    assert engine.query(mask.astype(np.uint8), k=3).label == engine.query(mask, k=3).label


# -- label filters -------------------------------------------------------------------------------------


def test_a_single_label_string_is_one_label(engine, sketch):
    """labels="cat" was iterated as 'c', 'a', 't': no neighbours, no note."""
    as_list = engine.query(sketch, k=5, labels=["cat"])
    as_str = engine.query(sketch, k=5, labels="cat")
    assert len(as_str.neighbours) == 5 and {n.label for n in as_str.neighbours} == {"cat"}
    assert as_str.neighbours == as_list.neighbours and as_str.note is None
    found = engine.search(engine.embed(sketch), k=4, labels="cat")[0]
    assert len(found) == 4 and {n.label for n in found} == {"cat"}
    with pytest.raises(ValueError, match="labels must be strings"):
        engine.query(sketch, labels=["cat", 3])


def test_an_unknown_label_gives_a_note(engine, sketch, small_index):
    result = engine.query(sketch, k=5, labels=["umbrela"])
    assert result.neighbours == []
    assert result.note == (
        "no image in the index has the label 'umbrela' (its labels: airplane, cat, cup, fish, umbrella)"
    )
    mixed = engine.query(sketch, k=5, labels=["cat", "nosuch"])  # the known one still answers
    assert {n.label for n in mixed.neighbours} == {"cat"} and len(mixed.neighbours) == 5
    assert "'nosuch'" in mixed.note and "'cat'" not in mixed.note
    # The CLI still says so (once before its answers) and answers.
    cli = CliRunner().invoke(app, ["query", str(sketch), "--index", str(small_index), "--label", "umbrela"])
    assert cli.exit_code == 0 and cli.stderr.count("no image in the index has the label 'umbrela'") == 1


def test_same_class_and_labels_both_apply(engine, sketch, small_index):
    """same_class used to replace labels without a word: now the predicted class among the labels."""
    predicted = engine.query(sketch, k=3).label
    other = next(c for c in engine.classes if c != predicted)
    both = engine.query(sketch, k=3, same_class=True, labels=[other, predicted])
    assert len(both.neighbours) == 3 and {n.label for n in both.neighbours} == {predicted}
    assert both.note is None
    apart = engine.query(sketch, k=3, same_class=True, labels=[other])
    assert apart.neighbours == []
    assert f"the predicted class {predicted!r} is not one of the labels asked for ({other!r})" in apart.note
    cli = CliRunner().invoke(
        app, ["query", str(sketch), "--index", str(small_index), "--same-class", "--label", other]
    )
    assert cli.exit_code == 0 and "not one of the labels asked for" in cli.stderr
    assert "  1. " not in cli.stdout  # no neighbours listed


# -- file objects, buffers and unsupported types -------------------------------------------------------


def test_file_objects_and_buffers_are_images(engine, sketch):
    """A BytesIO, an open file (an upload) and a memoryview or bytearray are one image each."""
    data = sketch.read_bytes()
    want = engine.query(sketch, k=4)
    with open(sketch, "rb") as handle:
        for source in (io.BytesIO(data), handle, memoryview(data), bytearray(data)):
            got = engine.query(source, k=4)
            assert (got.label, got.neighbours) == (want.label, want.neighbours), type(source).__name__
    one = engine.embed(sketch)
    for source in (io.BytesIO(data), memoryview(data), bytearray(data)):
        np.testing.assert_allclose(engine.embed(source), one, atol=TOL, err_msg=type(source).__name__)
    assert engine.embed([io.BytesIO(data), memoryview(data)]).shape == (2, engine.config.embedding_dim)


def test_unsupported_sources_are_image_errors(engine, sketch, tmp_path):
    for source in (None, 42, [str(sketch)], object()):
        kind = type(source).__name__
        with pytest.raises(ImageError, match=f"not an image source \\(type {kind}\\): give a path"):
            engine.query(source)
    with open(sketch) as text, pytest.raises(ImageError, match="opened in text mode"):
        engine.query(text)
    with pytest.raises(ImageError, match="upload is over the limit of 100 bytes"):
        open_image(io.BytesIO(sketch.read_bytes()), max_bytes=100)
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"not a picture")
    with open(notes, "rb") as handle, pytest.raises(ImageError, match=f"{notes}: not a recognised image"):
        engine.query(handle)  # named by its file name
    with pytest.raises(ImageError, match="file is empty"):
        engine.query(io.BytesIO())


# -- search vectors ------------------------------------------------------------------------------------


def test_search_takes_cosines_of_any_length_and_refuses_bad_vectors(engine, sketches):
    """search scored dot products (10·v scored 9.5) and answered NaN with nothing."""
    vectors = engine.embed(sketches[:2])
    plain = engine.search(vectors[:1], k=3)[0]
    for scaled in (10 * vectors[:1], vectors[0], vectors[:1].astype(np.float64)):
        again = engine.search(scaled, k=3)[0]
        assert [n.id for n in again] == [n.id for n in plain]
        np.testing.assert_allclose([n.score for n in again], [n.score for n in plain], atol=TOL)
    mean = vectors.mean(axis=0)
    best = engine.search(mean, k=1)[0][0]
    stored, _ = engine.index.stored([best.id])
    assert best.score == pytest.approx(float(stored[0] @ (mean / np.linalg.norm(mean))), abs=TOL)
    bad = [
        ("NaN or infinite", np.full((1, 512), np.nan, np.float32)),
        ("NaN or infinite", np.full(512, np.inf)),
        (r"shape \(n, 512\) or \(512,\) \(the index holds 512-d\), got \(2, 512, 1\)", np.ones((2, 512, 1))),
        (r"got \(1, 3\)", np.ones((1, 3))),
    ]
    for message, vector in bad:
        with pytest.raises(ValueError, match=message):
            engine.search(vector, k=2)
    # A zero vector (what the model's normalisation leaves of a silent ReLU layer) scores 0 everywhere.
    assert all(n.score == 0 for n in engine.search(np.zeros(512), k=2)[0])


# -- k -------------------------------------------------------------------------------------------------


def test_k_must_be_a_whole_number(engine, sketch):
    """k=2.5 answered the whole gallery; inf, NaN, '5' and None crashed after the network ran."""
    vectors = engine.embed(sketch)
    for k in (2.5, float("inf"), float("nan"), "5", None, True, False, np.float32(3)):
        with pytest.raises(ValueError, match=r"k \(the number of results\) must be a whole number"):
            engine.query(sketch, k=k)
        with pytest.raises(ValueError, match="must be a whole number"):
            engine.search(vectors, k=k)
    for k in (np.int64(3), np.int32(3), 3):
        assert len(engine.query(sketch, k=k).neighbours) == len(engine.search(vectors, k=k)[0]) == 3


# -- paths as Path objects -----------------------------------------------------------------------------


def test_is_drawing_takes_a_path(engine):
    patterns = ["*/drawings"]
    for path in (Path("cat/drawings/a.png"), PurePosixPath("cat/drawings/a.png"), "cat/drawings/a.png"):
        assert is_drawing(path, patterns)
    assert not is_drawing(Path("cat/a.png"), patterns)
    assert engine.is_drawing(Path("cat/drawings/a.png")) is False  # this index has no drawings
