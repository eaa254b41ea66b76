"""The Streamlit page under streamlit.testing.v1.AppTest: error panels, hints and rendered results.

AppTest runs ui/app.py in this process (the canvas component renders as an empty drawing), so
queries go through the upload box, with real QuickDraw bitmaps and the session's small real index.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from streamlit.testing.v1 import AppTest

from sbir_engine.build import build_index
from sbir_engine.index import GalleryIndex

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "ui" / "app.py"
TIMEOUT = 180  # the first run imports TensorFlow and loads the model
CAPTION = re.compile(r"^(?P<label>\S+) · (?P<score>-?\d+\.\d{3})$")
PREDICTED = re.compile(r"^Predicted class: \*\*(?P<label>\S+)\*\*$")
VIEW_CAPTION = "What the model sees"  # the query after the sketch normaliser, beside the class


def load_app_module():
    spec = importlib.util.spec_from_file_location("sbir_ui_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def page(monkeypatch, index_dir: Path | None = None, env_index: Path | None = None) -> AppTest:
    """Run the page once, as `streamlit run ui/app.py -- --index INDEX` (or with the env variable)."""
    monkeypatch.setattr(sys, "argv", [str(APP)] + (["--index", str(index_dir)] if index_dir else []))
    if env_index is not None:
        monkeypatch.setenv("SBIR_ENGINE_INDEX", str(env_index))
    else:
        monkeypatch.delenv("SBIR_ENGINE_INDEX", raising=False)
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()


def upload(at: AppTest, name: str, data: bytes, mime: str = "image/png") -> AppTest:
    at.file_uploader(key="upload").set_value((name, data, mime))
    return at.run()


def sketch_bytes(small_dataset: Path, label: str = "cat") -> bytes:
    """A real QuickDraw bitmap of the held-out split, as PNG bytes."""
    return sorted((small_dataset / "sketch" / "test" / label).iterdir())[0].read_bytes()


def predicted_label(at: AppTest) -> str:
    labels = [m.group("label") for m in (PREDICTED.match(md.value) for md in at.markdown) if m]
    assert len(labels) == 1, [md.value for md in at.markdown]
    return labels[0]


def result_captions(at: AppTest) -> list[str]:
    return [caption for image in at.image for caption in image.captions if caption != VIEW_CAPTION]


def view_captions(at: AppTest) -> list[str]:
    return [caption for image in at.image for caption in image.captions if caption == VIEW_CAPTION]


def assert_no_results(at: AppTest) -> None:
    assert not at.exception
    assert not at.image
    assert not [md for md in at.markdown if md.value.startswith("Predicted class")]


# -- index errors ------------------------------------------------------------------------------------


def test_missing_index_shows_one_error_panel(monkeypatch, tmp_path):
    at = page(monkeypatch, env_index=tmp_path / "no-such-index")
    assert not at.exception
    assert at.title[0].value == "Sketch Based Image Retrieval"
    assert len(at.error) == 1
    assert "no such index folder" in at.error[0].value and "\n" not in at.error[0].value
    assert not at.file_uploader  # nothing to query against
    assert_no_results(at)


def test_folder_that_is_not_an_index_shows_error_panel(monkeypatch, tmp_path):
    at = page(monkeypatch, index_dir=tmp_path)
    assert not at.exception
    assert len(at.error) == 1
    assert "is not an sbir-engine index" in at.error[0].value


def _copy_index(small_index: Path, tmp_path: Path, **meta_changes) -> Path:
    copy = tmp_path / "index"
    shutil.copytree(small_index, copy)
    version = copy / (copy / "CURRENT").read_text().strip()
    meta = json.loads((version / "index.json").read_text())
    for key, value in meta_changes.items():
        if key == "fingerprint":
            meta["model"]["fingerprint"] = value
        else:
            meta[key] = value
    (version / "index.json").write_text(json.dumps(meta))
    return copy


def test_index_of_another_model_shows_mismatch_panel(monkeypatch, tmp_path, small_index):
    at = page(monkeypatch, index_dir=_copy_index(small_index, tmp_path, fingerprint="0123456789abcdef"))
    assert not at.exception
    assert len(at.error) == 1
    assert at.error[0].value.startswith("Model and index do not match:")
    assert "0123456789abcdef" in at.error[0].value and "\n" not in at.error[0].value


def test_index_in_a_newer_format_shows_error_panel(monkeypatch, tmp_path, small_index):
    at = page(monkeypatch, index_dir=_copy_index(small_index, tmp_path, format_version=10_000))
    assert not at.exception
    assert len(at.error) == 1
    assert "newer than this sbir-engine reads" in at.error[0].value


# -- the page with a real index ----------------------------------------------------------------------


def test_empty_page_shows_hint_and_controls(monkeypatch, small_index, small_config):
    at = page(monkeypatch, index_dir=small_index)
    assert not at.exception and not at.error
    assert any(info.value.startswith("Draw a sketch on the canvas or upload") for info in at.info)
    assert at.slider(key="k").value == 10
    assert (at.slider(key="k").min, at.slider(key="k").max) == (1, 50)
    assert at.toggle(key="same_class").value is False
    assert at.file_uploader(key="upload") is not None
    assert any(", ".join(small_config.classes) in caption.value for caption in at.sidebar.caption)
    assert_no_results(at)


def test_uploaded_sketch_shows_class_chart_time_and_k_images(
    monkeypatch, small_index, small_dataset, small_config
):
    at = upload(page(monkeypatch, index_dir=small_index), "cat.png", sketch_bytes(small_dataset))
    assert not at.exception and not at.error
    label = predicted_label(at)
    assert label in small_config.classes
    assert any(re.fullmatch(r"Probability: \*\*\d+\.\d%\*\*", md.value) for md in at.markdown)
    assert any(re.fullmatch(r"Query time: \d+ ms", caption.value) for caption in at.caption)
    assert len(at.get("vega_lite_chart")) == 1  # the top-5 probabilities

    captions = result_captions(at)
    assert len(captions) == 10 and view_captions(at) == [VIEW_CAPTION] and len(at.image) == 11
    parsed = [CAPTION.match(caption) for caption in captions]
    assert all(parsed), captions
    assert {m.group("label") for m in parsed} <= set(small_config.classes)
    scores = [float(m.group("score")) for m in parsed]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 <= s <= 1.0 + 1e-3 for s in scores)


def test_k_and_only_the_predicted_class(monkeypatch, small_index, small_dataset):
    at = upload(page(monkeypatch, index_dir=small_index), "fish.png", sketch_bytes(small_dataset, "fish"))
    label = predicted_label(at)
    at.slider(key="k").set_value(3)
    at.toggle(key="same_class").set_value(True)
    at.run()
    assert not at.exception and not at.error
    assert predicted_label(at) == label
    captions = result_captions(at)
    assert len(captions) == 3
    assert all(CAPTION.match(caption).group("label") == label for caption in captions), captions


def test_only_these_classes_limits_the_results_not_the_prediction(monkeypatch, small_index, small_dataset):
    """The sidebar's class filter (the CLI's --label) offers the gallery's labels and keeps the
    results to the chosen ones; the predicted class is the model's, whatever is chosen."""
    at = upload(page(monkeypatch, index_dir=small_index), "fish.png", sketch_bytes(small_dataset, "fish"))
    label = predicted_label(at)
    labels = sorted({entry.label for entry in GalleryIndex.load(small_index).entries.values()})
    assert at.multiselect(key="labels").options == labels
    others = [name for name in labels if name != label][:2]
    at.multiselect(key="labels").set_value(others)
    at.slider(key="k").set_value(12)
    at.run()
    assert not at.exception and not at.error
    assert predicted_label(at) == label
    found = {CAPTION.match(caption).group("label") for caption in result_captions(at)}
    assert found == set(others) and len(result_captions(at)) == 12


def test_an_upload_marked_as_a_photo_skips_the_sketch_normaliser(monkeypatch, small_index, small_gallery):
    photo = sorted((small_gallery / "cup").glob("photo_*"))[0]
    at = page(monkeypatch, index_dir=small_index)
    at.toggle(key="photo").set_value(True)
    at = upload(at, photo.name, photo.read_bytes(), "image/jpeg")
    assert not at.exception and not at.error
    assert view_captions(at) == []  # a photo is shown to the model as it is
    captions = result_captions(at)
    assert len(captions) == 10
    # The gallery holds this very photo: it comes first, at cosine 1 (re-ranked: 0.5 + 0.5 * |p|²).
    assert float(CAPTION.match(captions[0]).group("score")) > float(CAPTION.match(captions[1]).group("score"))


def test_more_like_this_queries_with_a_result_and_back_returns(monkeypatch, small_index, small_dataset):
    at = upload(page(monkeypatch, index_dir=small_index), "fish.png", sketch_bytes(small_dataset, "fish"))
    first = result_captions(at)
    buttons = [b for b in at.button if b.key and b.key.startswith("more_")]
    assert len(buttons) == 10 and all(b.label == "More like this" for b in buttons)
    chosen = GalleryIndex.load(small_index).entries[int(buttons[2].key.removeprefix("more_"))]
    at = buttons[2].click().run()
    assert not at.exception and not at.error
    assert f"More like the gallery image {chosen.path}" in [c.value for c in at.caption]
    assert view_captions(at) == []  # the gallery image is taken as it is
    captions = result_captions(at)
    assert len(captions) == 10 and captions != first
    # The image itself comes first (cosine 1), ahead of every other.
    assert [b.key for b in at.button if b.key and b.key.startswith("more_")][0] == f"more_{chosen.id}"
    at = at.button(key="back").click().run()
    assert result_captions(at) == first and view_captions(at) == [VIEW_CAPTION]
    # A new query drops the choice: its own results, not the image's neighbours.
    at = at.button(key=f"more_{chosen.id}").click().run()
    at = upload(at, "cat.png", sketch_bytes(small_dataset, "cat"))
    assert not any(c.value.startswith("More like the gallery image") for c in at.caption)
    assert view_captions(at) == [VIEW_CAPTION]
    # So do removing the upload (the same file uploaded again is a new query: before, the choice came
    # back) and flipping the photo switch (before, the page stayed as it was).
    cat = result_captions(at)
    for change in ("remove", "photo"):
        at = next(b for b in at.button if b.key and b.key.startswith("more_")).click().run()
        assert any(c.value.startswith("More like the gallery image") for c in at.caption)
        if change == "remove":
            at.file_uploader(key="upload").set_value(None)
            at = upload(at.run(), "cat.png", sketch_bytes(small_dataset, "cat"))
            assert result_captions(at) == cat
        else:
            at = at.toggle(key="photo").set_value(True).run()
            assert view_captions(at) == []  # the upload itself, as a photo
        assert not any(c.value.startswith("More like the gallery image") for c in at.caption), change


def test_a_rebuild_with_another_model_is_served_with_that_model(
    monkeypatch, tmp_path, small_index, small_gallery, small_dataset, other_run
):
    """`build-index` with another model rewrites the index the page has loaded: the page loads the
    new model with it. Before, the cached engine refused every new version until a restart."""
    index = tmp_path / "index"
    shutil.copytree(small_index, index)
    at = upload(page(monkeypatch, index_dir=index), "cat.png", sketch_bytes(small_dataset))
    assert not at.error and len(result_captions(at)) == 10
    two = tmp_path / "two classes"
    for label in ("cat", "fish"):
        shutil.copytree(small_gallery / label, two / label)
    build_index(other_run, two, index)
    at = at.run()
    assert not at.exception and not at.error, [error.value for error in at.error]
    count = sum(1 for path in two.rglob("*") if path.is_file())
    assert any(f"· {count} images ·" in caption.value for caption in at.sidebar.caption)
    captions = result_captions(at)
    assert len(captions) == min(10, count)
    assert {CAPTION.match(caption).group("label") for caption in captions} <= {"cat", "fish"}
    assert not at.run().error  # and stays served


def test_only_the_predicted_class_on_an_unlabelled_gallery_says_why(
    monkeypatch, tmp_path, small_run, small_gallery, small_dataset
):
    """A flat gallery has no labels: "Only the predicted class" finds nothing, and says why."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for label in ("cat", "fish"):
        for path in sorted((small_gallery / label).iterdir())[:3]:
            shutil.copyfile(path, flat / f"{label}-{path.name}")
    build_index(small_run, flat, tmp_path / "index")
    at = upload(page(monkeypatch, index_dir=tmp_path / "index"), "cat.png", sketch_bytes(small_dataset))
    assert len(result_captions(at)) == 6 and not at.warning
    at.toggle(key="same_class").set_value(True)
    at.run()
    assert not at.exception and not at.error
    label = predicted_label(at)
    assert result_captions(at) == []
    assert len(at.warning) == 1 and f"no image in the index has the label '{label}'" in at.warning[0].value


def test_unreadable_upload_shows_one_line_error(monkeypatch, small_index):
    at = upload(page(monkeypatch, index_dir=small_index), "notes.png", b"these are notes, not a picture\n")
    assert len(at.error) == 1
    assert at.error[0].value == "Cannot use the uploaded file notes.png: not a recognised image format"
    assert_no_results(at)


def test_image_over_the_pixel_limit_shows_error(monkeypatch, small_index, small_config):
    side = math.isqrt(small_config.max_pixels) + 1
    buffer = io.BytesIO()
    Image.new("1", (side, side), 1).save(buffer, format="PNG")  # white, 1 bit: a few kB on disk
    assert len(buffer.getvalue()) < small_config.max_upload_bytes
    at = upload(page(monkeypatch, index_dir=small_index), "huge.png", buffer.getvalue())
    assert len(at.error) == 1
    assert "huge.png" in at.error[0].value
    assert f"over the limit of {small_config.max_pixels:,} pixels" in at.error[0].value
    assert_no_results(at)


def test_blank_or_too_light_upload_says_why_and_gets_the_hint(monkeypatch, small_index):
    """An upload with no drawing the engine can find is named with the engine's reason (before, a
    yellow drawing got only the hint, as if nothing had been uploaded), and the hint follows."""
    blank, yellow = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(blank, format="PNG")
    drawn = Image.new("RGB", (300, 300), "white")
    ImageDraw.Draw(drawn).line([(40, 150), (260, 150), (150, 40)], fill=(255, 255, 0), width=6)
    drawn.save(yellow, format="PNG")
    at = page(monkeypatch, index_dir=small_index)
    for name, data, reason in (
        ("blank.png", blank, "the sketch is empty (no ink found)"),
        ("yellow.png", yellow, "its marks are all too light to tell from paper"),
    ):
        at = upload(at, name, data.getvalue())
        assert not at.error
        assert [w.value for w in at.warning if reason in w.value][0].startswith(
            f"Cannot use the uploaded file {name}: "
        )
        assert any(info.value.startswith("Draw a sketch on the canvas or upload") for info in at.info)
        assert_no_results(at)


# -- pieces of the page without an index -------------------------------------------------------------


def test_index_dir_comes_from_args_then_env_then_default(monkeypatch, tmp_path):
    app = load_app_module()
    monkeypatch.setenv("SBIR_ENGINE_INDEX", str(tmp_path / "env"))
    assert app.index_dir_from_args(["--index", str(tmp_path / "arg")]) == tmp_path / "arg"
    assert app.index_dir_from_args(["--unrelated", "x"]) == tmp_path / "env"
    monkeypatch.delenv("SBIR_ENGINE_INDEX")
    from sbir_engine.config import EngineConfig

    assert app.index_dir_from_args([]) == EngineConfig().index_dir


def test_top_classes_are_the_most_probable_first():
    from sbir_engine.engine import QueryResult

    app = load_app_module()
    probabilities = {"a": 0.05, "b": 0.4, "c": 0.1, "d": 0.2, "e": 0.15, "f": 0.06, "g": 0.04}
    result = QueryResult("b", probabilities, [])
    expected = [("b", 0.4), ("d", 0.2), ("e", 0.15), ("c", 0.1), ("f", 0.06)]
    assert result.top_classes(app.TOP_CLASSES) == expected
    tied = QueryResult("x", {"x": 0.5, "y": 0.25, "z": 0.25}, [])
    assert tied.top_classes(2) == [("x", 0.5), ("y", 0.25)]


def _render(app_path: str, gallery: str, k: int) -> None:
    import importlib.util
    from pathlib import Path

    from sbir_engine.engine import Neighbour, QueryResult

    spec = importlib.util.spec_from_file_location("sbir_ui_app", app_path)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    result = QueryResult(
        label="cat",
        probabilities={"cat": 0.7, "fish": 0.2, "cup": 0.1},
        neighbours=[
            Neighbour(3, "cat/a.png", "cat", 0.9123),
            Neighbour(8, "cat/gone.png", None, 0.5),
            Neighbour(9, "cat/b.png", "cat", 0.4, duplicates=("cat/b copy.png", "old/b.png")),
        ],
        timings_ms={"total": 12.4},
    )
    app.render_result(result, lambda n: Path(gallery) / n.path, k)


def _render_files(app_path: str, gallery: str, names: list[str]) -> None:
    import importlib.util
    from pathlib import Path

    from sbir_engine.engine import Neighbour, QueryResult

    spec = importlib.util.spec_from_file_location("sbir_ui_app", app_path)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    neighbours = [Neighbour(i, f"cat/{name}", "cat", 0.9 - i / 10) for i, name in enumerate(names)]
    result = QueryResult("cat", {"cat": 1.0}, neighbours, {"total": 1.0})
    app.render_result(result, lambda n: Path(gallery) / n.path, len(names))


def test_result_images_are_thumbnails_decoded_as_the_engine_does(tmp_path):
    """16-bit and float images (which the engine indexes) are shown, a portrait phone photo upright,
    big photos as small thumbnails, and a file damaged since the build gets a warning in its own
    cell. Before, Streamlit re-encoded each file: the 16-bit PNG stopped the page (cannot write mode
    I;16 as JPEG) with every result after it, and a resized photo lost its EXIF turn."""
    folder = tmp_path / "cat"
    folder.mkdir()
    gradient = np.linspace(0, 65535, 64 * 96, dtype=np.uint16).reshape(64, 96)
    Image.fromarray(gradient).save(folder / "16bit.png")
    Image.fromarray(gradient.astype(np.float32) / 65535, mode="F").save(folder / "float.tif")
    landscape = Image.new("RGB", (1600, 1200), "white")
    exif = landscape.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to view: a portrait photo stored sideways
    landscape.save(folder / "portrait.jpg", exif=exif.tobytes())
    good = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(good, format="PNG")
    (folder / "damaged.png").write_bytes(good.getvalue()[:40])
    names = ["16bit.png", "float.tif", "damaged.png", "portrait.jpg"]
    at = AppTest.from_function(_render_files, args=(str(APP), str(tmp_path), names), default_timeout=TIMEOUT)
    at = at.run()
    assert not at.exception
    assert result_captions(at) == ["cat · 0.900", "cat · 0.800", "cat · 0.600"]
    assert len(at.warning) == 1 and "gallery file cat/damaged.png cannot be shown (" in at.warning[0].value
    app = load_app_module()
    shown = Image.open(io.BytesIO(app.thumbnail(str(folder / "portrait.jpg"), 0, 0)))
    assert shown.size == (app.THUMBNAIL * 3 // 4, app.THUMBNAIL)  # upright, and small


def test_render_result_marks_missing_files_and_short_lists(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (32, 32), "white").save(tmp_path / "cat" / "a.png")
    Image.new("RGB", (32, 32), "grey").save(tmp_path / "cat" / "b.png")
    at = AppTest.from_function(_render, args=(str(APP), str(tmp_path), 10), default_timeout=TIMEOUT).run()
    assert not at.exception
    assert [md.value for md in at.markdown][:2] == ["Predicted class: **cat**", "Probability: **70.0%**"]
    assert "Query time: 12 ms" in [c.value for c in at.caption]
    assert "3 of 10 results: the index holds no more that match." in [c.value for c in at.caption]
    assert result_captions(at) == ["cat · 0.912", "cat · 0.400 · 2 more copies in the gallery"]
    assert {"`a.png`", "`b.png`"} <= {c.value for c in at.caption}  # each shown result names its file
    assert len(at.warning) == 1 and "— · 0.500: gallery file cat/gone.png is missing" in at.warning[0].value
