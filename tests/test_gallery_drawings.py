"""Drawings in a user's gallery (``build-index --drawings``): embedded as query sketches are.

The gallery is real: the small dataset's held-out photos, and real QuickDraw pen-stroke records
drawn as thin-lined 1000 px scans in ``<class>/drawings/``, the kind of file a user's own drawings
are. The queries are the same records drawn as the page's canvas draws them.
"""

from __future__ import annotations

import importlib.util
import io
import shutil

import numpy as np
import pytest
from conftest import SMALL_CLASSES
from typer.testing import CliRunner

from sbir_engine.build import add_files, build_index
from sbir_engine.cli import app
from sbir_engine.data import read_stroke_records
from sbir_engine.embed import Embedder
from sbir_engine.engine import SketchEngine
from sbir_engine.gallery import check_drawing_patterns, is_drawing
from sbir_engine.images import render_strokes
from sbir_engine.index import GalleryIndex
from sbir_engine.model import load_model

DRAWINGS = range(10, 16)  # stroke records per class; record i is the package's bitmap i
SCAN = (1000, 2)  # picture size and pen: a thin-lined scan, far from the 28 px bitmaps' lines
CANVAS = (400, 6)  # the page's canvas and default pen


@pytest.fixture(scope="module")
def embedder(small_run) -> Embedder:
    return Embedder(load_model(small_run))


@pytest.fixture(scope="module")
def records(small_config, shared_data) -> dict[str, list[dict]]:
    return {
        label: [read_stroke_records(shared_data / "quickdraw-strokes", label)[i] for i in DRAWINGS]
        for label in small_config.classes
    }


@pytest.fixture(scope="module")
def mixed_gallery(tmp_path_factory, small_gallery, records) -> object:
    """``<class>/photo_*.jpg`` (held-out photos) and ``<class>/drawings/<class>_<i>.png`` (scans)."""
    root = tmp_path_factory.mktemp("mixed") / "gallery"
    for label, drawings in records.items():
        (root / label / "drawings").mkdir(parents=True)
        for photo in sorted((small_gallery / label).glob("photo_*")):
            shutil.copyfile(photo, root / label / photo.name)
        for i, record in zip(DRAWINGS, drawings, strict=True):
            render_strokes(record["drawing"], *SCAN).save(root / label / "drawings" / f"{label}_{i:04d}.png")
    return root


def canvases(records: dict[str, list[dict]]) -> tuple[list, list[str]]:
    """Each record drawn on the page's canvas, and the gallery path of its scan."""
    images, paths = [], []
    for label, drawings in records.items():
        for i, record in zip(DRAWINGS, drawings, strict=True):
            images.append(render_strokes(record["drawing"], *CANVAS, rgba=True))
            paths.append(f"{label}/drawings/{label}_{i:04d}.png")
    return images, paths


def own_drawing_first(index_dir, records) -> float:
    """The share of canvas queries whose nearest gallery image is their own drawing's scan."""
    engine = SketchEngine.load(index_dir)
    images, paths = canvases(records)
    neighbours = engine.search(engine.embed(images), k=1)
    return float(np.mean([found[0].path == path for found, path in zip(neighbours, paths, strict=True)]))


def test_patterns_name_files_and_folders_as_gitignore_does():
    assert is_drawing("cat/drawings/a.png", ["drawings"])  # a folder's name, at any depth
    assert is_drawing("sketches/cat/a.png", ["sketches"])
    assert is_drawing("cat/a.sketch.png", ["*.sketch.png"])  # a file's name
    assert not is_drawing("cat/a.png", ["*.sketch.png"])
    assert is_drawing("cat/drawings/a.png", ["*/drawings"])  # a path from the root
    assert not is_drawing("drawings/a.png", ["*/drawings"])
    assert is_drawing("cat/drawings/a.png", ["cat/drawings"]) and not is_drawing(
        "cup/drawings/a.png", ["cat/drawings"]
    )
    assert not is_drawing("cat/photo_drawings.png", ["drawings"])  # whole names, not parts of them
    assert is_drawing("cat/a.png", ["*"]) and not is_drawing("cat/a.png", [])
    assert is_drawing("drawings/a.png", ["**/drawings"]) and is_drawing(
        "x/cat/drawings/a.png", ["**/cat/drawings"]
    )
    assert not is_drawing("x/cat/drawings/a.png", ["cat/drawings"]) and not is_drawing("cat/A.PNG", ["*.png"])
    assert check_drawing_patterns(["sketches/", "./*/drawings"]) == ["sketches", "*/drawings"]
    assert check_drawing_patterns("drawings") == ["drawings"]  # one pattern, not its letters
    for bad in ("", "/", "/abs/drawings", "../elsewhere", ".", "!drawings", "cat//drawings"):
        with pytest.raises(ValueError, match="not a pattern over the gallery's relative paths"):
            check_drawing_patterns([bad])


def test_drawings_are_embedded_as_query_sketches_and_find_their_canvas(
    small_run, mixed_gallery, records, embedder, tmp_path
):
    as_photos = build_index(small_run, mixed_gallery, tmp_path / "photos", embedder=embedder)
    report = build_index(
        small_run, mixed_gallery, tmp_path / "drawings", embedder=embedder, drawings=["drawings"]
    )
    n_drawings = len(DRAWINGS) * len(records)
    assert as_photos.total == report.total > n_drawings
    assert f"{n_drawings} of {report.total} files are drawings (--drawings 'drawings')" in "\n".join(
        report.notes
    )
    index = GalleryIndex.load(tmp_path / "drawings")
    assert index.meta["drawings"] == ["drawings"]
    engine = SketchEngine.load(tmp_path / "drawings")
    for entry in index.entries.values():
        drawing = "/drawings/" in entry.path
        assert engine.is_drawing(entry.path) == drawing
        stored = index.vectors[index.rows[entry.id]]
        again = engine.embed(mixed_gallery / entry.path, sketch=drawing)[0]
        assert float(stored @ again) > 0.999, entry.path  # as a query of its kind is embedded
    # What it is for: a drawing on the page finds the same drawing's thin-lined scan, which the
    # photo path (a 1000 px picture resized to the network's input, its lines thinned to a trace) loses.
    found, found_as_photos = (
        own_drawing_first(tmp_path / "drawings", records),
        own_drawing_first(tmp_path / "photos", records),
    )
    assert found >= 0.9 and found > found_as_photos + 0.2, (found, found_as_photos)


def test_a_rerun_keeps_the_patterns_and_a_change_embeds_only_the_files_it_moves(
    small_run, mixed_gallery, records, embedder, tmp_path
):
    gallery = tmp_path / "gallery"
    shutil.copytree(mixed_gallery, gallery)
    index_dir = tmp_path / "index"
    build_index(small_run, gallery, index_dir, embedder=embedder, drawings=["drawings"])
    again = build_index(small_run, gallery, index_dir, embedder=embedder)  # no patterns given: kept
    assert again.embedded == 0 and GalleryIndex.load(index_dir).meta["drawings"] == ["drawings"]

    narrowed = build_index(small_run, gallery, index_dir, embedder=embedder, drawings=["cat/drawings"])
    others = len(DRAWINGS) * (len(records) - 1)
    assert narrowed.embedded == narrowed.updated == others and narrowed.added == 0
    assert f"{others} files embedded again as photos: --drawings no longer names them" in narrowed.notes

    # A drawing added later is embedded as the recorded patterns say, not as a photo.
    new = gallery / "cat" / "drawings" / "new.png"
    render_strokes(records["cat"][0]["drawing"], SCAN[0], SCAN[1] + 1).save(new)  # not a copy of a drawing
    added = add_files(index_dir, [new], embedder=embedder)
    assert added.added == 1, added.summary()
    index = GalleryIndex.load(index_dir)
    entry = next(e for e in index.entries.values() if e.path == "cat/drawings/new.png")
    stored = index.vectors[index.rows[entry.id]]
    assert float(stored @ embedder(embedder.load_sketch(new)[None])[0][0]) > 0.999
    # One brought in from outside lands in <label>/, which no folder pattern names: said, not silent.
    outside = tmp_path / "outside.png"
    render_strokes(records["cat"][1]["drawing"], SCAN[0], SCAN[1] + 2).save(outside)  # no copy of one
    copied = add_files(index_dir, [outside], label="cat", embedder=embedder)
    assert copied.added == 1 and (
        "1 files copied in are embedded as photos: no --drawings pattern ('cat/drawings') names "
        "cat/outside.png" in "\n".join(copied.notes)
    ), copied.summary()

    # Moved out of the drawings' folder it is a photo now: embedded again, not moved with its vector.
    (gallery / "cat" / "drawings" / "new.png").rename(gallery / "cat" / "new.png")
    out = build_index(small_run, gallery, index_dir, embedder=embedder)
    assert (out.embedded, out.added, out.removed, out.moved) == (1, 1, 1, 0), out.summary()

    cleared = build_index(small_run, gallery, index_dir, embedder=embedder, drawings=[])
    assert cleared.embedded == len(DRAWINGS) and GalleryIndex.load(index_dir).meta["drawings"] == []


def test_cli_drawings_options(small_run, mixed_gallery, records, tmp_path):
    runner = CliRunner()
    base = ["build-index", "--model", str(small_run), "--gallery", str(mixed_gallery)]
    both = runner.invoke(app, [*base, "--out", str(tmp_path / "a"), "--drawings", "x", "--no-drawings"])
    assert both.exit_code == 2 and "--drawings and --no-drawings contradict" in both.output
    typo = runner.invoke(
        app, [*base, "--out", str(tmp_path / "b"), "--drawings", "drawing", "--drawings", "*/drawings"]
    )
    assert typo.exit_code == 0, typo.output
    assert "--drawings 'drawing' matches no file in the gallery" in typo.output
    assert GalleryIndex.load(tmp_path / "b").meta["drawings"] == ["drawing", "*/drawings"]
    info = runner.invoke(app, ["index", "info", "--index", str(tmp_path / "b")])
    n_drawings = len(DRAWINGS) * len(SMALL_CLASSES)
    assert (
        f"drawings    {n_drawings} embedded as sketches (--drawings 'drawing' --drawings '*/drawings')"
        in info.output
    )
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "c"), "--drawings", "../x"])
    assert bad.exit_code == 1 and "not a pattern over the gallery's relative paths" in bad.output
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_more_like_this_on_a_drawing_queries_with_it_as_a_drawing(
    monkeypatch, small_run, mixed_gallery, records, embedder, tmp_path
):
    from test_ui import VIEW_CAPTION, page, upload, view_captions

    build_index(small_run, mixed_gallery, tmp_path / "index", embedder=embedder, drawings=["drawings"])
    canvas, path = canvases({"cat": records["cat"]})
    data = io.BytesIO()
    canvas[0].save(data, format="PNG")
    at = upload(page(monkeypatch, index_dir=tmp_path / "index"), "cat.png", data.getvalue())
    index = GalleryIndex.load(tmp_path / "index")
    own = next(e for e in index.entries.values() if e.path == path[0])
    assert [b.key for b in at.button if b.key and b.key.startswith("more_")][0] == f"more_{own.id}"
    at = at.button(key=f"more_{own.id}").click().run()
    assert not at.exception and not at.error
    # Normalised as the build normalised it: the model's view is shown, and the drawing finds itself.
    assert view_captions(at) == [VIEW_CAPTION]
    assert [b.key for b in at.button if b.key and b.key.startswith("more_")][0] == f"more_{own.id}"


@pytest.mark.skipif(importlib.util.find_spec("milvus_lite") is None, reason="Milvus Lite not installed")
def test_a_milvus_collection_keeps_the_patterns_too(small_run, mixed_gallery, embedder, tmp_path):
    from sbir_engine.milvus import MilvusStore, MilvusTarget

    uri = str(tmp_path / "gallery.db")
    build_index(
        small_run, mixed_gallery, None, embedder=embedder, target=MilvusTarget(uri), drawings=["drawings"]
    )
    again = build_index(small_run, mixed_gallery, None, embedder=embedder, target=MilvusTarget(uri))
    assert again.embedded == 0, again.summary()
    store = MilvusStore.open(uri, MilvusTarget(uri).collection)
    assert store.meta["drawings"] == ["drawings"]
    ids = {entry.path: entry.id for entry in store.entries.values()}
    # A renamed drawing keeps its id and the vector the collection holds.
    gallery = tmp_path / "gallery"
    shutil.copytree(mixed_gallery, gallery)
    (gallery / "cup" / "drawings" / "cup_0010.png").rename(gallery / "cup" / "drawings" / "renamed.png")
    renamed = build_index(small_run, gallery, None, embedder=embedder, target=MilvusTarget(uri))
    assert (renamed.embedded, renamed.moved, renamed.removed) == (0, 1, 0), renamed.summary()
    entries = {e.path: e for e in MilvusStore.open(uri, MilvusTarget(uri).collection).entries.values()}
    assert entries["cup/drawings/renamed.png"].id == ids["cup/drawings/cup_0010.png"]
    assert SketchEngine.from_store(store, small_run).is_drawing("cat/drawings/cat_0010.png")
