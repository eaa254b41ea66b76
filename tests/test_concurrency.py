"""One engine, many threads: concurrent queries answer exactly as serial ones, and a query during a
build sees the old index or the new one, never a mix.
"""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pytest

from sbir_engine.build import build_index
from sbir_engine.engine import SketchEngine
from sbir_engine.images import render_strokes
from sbir_engine.index import GalleryIndex, current_version

CLASSES = ("airplane", "cat", "cup", "fish", "umbrella")


@pytest.fixture(scope="module")
def sketches(shared_data) -> list:
    """Real QuickDraw drawings of the small classes, as a browser canvas returns them."""
    out = []
    for label in CLASSES:
        lines = (shared_data / "quickdraw-strokes" / f"{label}.ndjson").read_text().splitlines()
        drawings = [json.loads(line) for line in lines[:20]]
        out += [render_strokes(d["drawing"], 400, 6, rgba=True) for d in drawings if d["recognized"]][:3]
    return out


@pytest.fixture(scope="module")
def engine(small_index) -> SketchEngine:
    return SketchEngine.load(small_index)


def test_eight_threads_answer_exactly_like_serial_queries(engine, sketches):
    serial = [engine.query(sketch, k=10) for sketch in sketches]
    vectors = engine.embed(sketches)
    serial_search = engine.search(vectors, k=10)
    work = list(range(len(sketches))) * 3  # 45 queries on 8 threads

    def query(i: int):
        return i, engine.query(sketches[i], k=10)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(query, work))
        searches = list(pool.map(lambda i: engine.search(vectors[i : i + 1], k=10)[0], work))
    for (i, result), found in zip(results, searches, strict=True):
        expected = serial[i]
        assert result.label == expected.label
        assert result.probabilities == expected.probabilities
        assert [n.id for n in result.neighbours] == [n.id for n in expected.neighbours]
        assert [n.score for n in result.neighbours] == [n.score for n in expected.neighbours]
        assert result == expected
        assert found == serial_search[i]
    assert len({r.label for _, r in results}) > 1  # different sketches, different answers


def test_a_query_during_an_incremental_build_sees_one_whole_version(
    small_index, small_gallery, small_run, shared_data, sketches, tmp_path
):
    index_dir, gallery = tmp_path / "index", tmp_path / "gallery"
    shutil.copytree(small_index, index_dir)
    shutil.copytree(small_gallery, gallery)
    engine = SketchEngine.load(index_dir, small_run)
    old_manifest = set(engine.index.entries)
    old = [engine.query(sketch, k=10) for sketch in sketches]
    # New real photos (after the 40 per class the small dataset used), in every class.
    for label in CLASSES:
        for path in sorted((shared_data / "photos" / label).iterdir())[40:44]:
            shutil.copyfile(path, gallery / label / f"new_{path.name}")

    seen, errors = [], []
    building = threading.Event()
    building.set()

    def build_then_reload():
        try:
            report = build_index(small_run, gallery, index_dir, embedder=engine.embedder)
            assert report.added == 4 * len(CLASSES) and not report.failed
            assert engine.reload()
        except BaseException as err:  # reported by the main thread
            errors.append(err)
        finally:
            building.clear()

    builder = threading.Thread(target=build_then_reload)
    builder.start()
    i = 0
    while building.is_set() or i % len(sketches):  # query all through the build, and a round after
        seen.append((i % len(sketches), engine.query(sketches[i % len(sketches)], k=10)))
        i += 1
    builder.join()
    assert not errors, errors
    seen += [(j, engine.query(sketch, k=10)) for j, sketch in enumerate(sketches)]

    new_manifest = set(GalleryIndex.load(index_dir).entries)
    assert len(new_manifest) == len(old_manifest) + 4 * len(CLASSES) and old_manifest < new_manifest
    new = [engine.query(sketch, k=10) for sketch in sketches]
    assert any(a != b for a, b in zip(old, new, strict=True)), "the new photos change some answers"
    versions = {"old": 0, "new": 0}  # counted on the sketches whose answer the new photos change
    for j, result in seen:
        assert result in (old[j], new[j]), f"query {j} matches neither the old nor the new index"
        assert {n.id for n in result.neighbours} <= (old_manifest if result == old[j] else new_manifest)
        if old[j] != new[j]:
            versions["old" if result == old[j] else "new"] += 1
    assert all(result == new[j] for j, result in seen[-len(sketches) :])  # the round after the reload
    changed = sum(a != b for a, b in zip(old, new, strict=True))
    assert versions["old"] > 0 and versions["new"] >= changed, versions


def test_loading_while_a_build_replaces_the_version_reads_the_new_one(small_index, tmp_path, monkeypatch):
    """A reader that found CURRENT just before a build swapped it and removed that version still loads."""
    index_dir = tmp_path / "index"
    shutil.copytree(small_index, index_dir)
    before = GalleryIndex.load(index_dir)
    first = current_version(index_dir)
    read_index = faiss.read_index
    calls = []

    def read_index_while_a_build_commits(path, *args):
        calls.append(Path(path).parent.name)
        if len(calls) == 1:  # between reading CURRENT and reading the files: a build commits and cleans up
            before.save(index_dir, ["a concurrent build"])
            assert not first.exists()
        return read_index(path, *args)

    monkeypatch.setattr(faiss, "read_index", read_index_while_a_build_commits)
    loaded = GalleryIndex.load(index_dir)
    assert calls[0] == first.name and calls[-1] == current_version(index_dir).name != first.name
    assert set(loaded.entries) == set(before.entries)
    queries = np.asarray(before.vectors[:4])
    np.testing.assert_array_equal(loaded.search(queries, 5)[1], before.search(queries, 5)[1])


def test_an_engine_loaded_during_a_build_reloads_to_it(small_index, small_run, tmp_path, monkeypatch):
    from sbir_engine import engine as engine_module

    index_dir = tmp_path / "index"
    shutil.copytree(small_index, index_dir)
    dropped = min(GalleryIndex.load(index_dir).entries)
    load_model = engine_module.load_model

    def load_model_while_a_build_commits(run_dir):
        index = GalleryIndex.load(index_dir)  # a build that removes one entry commits meanwhile
        index.remove([dropped])
        index.save(index_dir, ["a concurrent build"])
        return load_model(run_dir)

    monkeypatch.setattr(engine_module, "load_model", load_model_while_a_build_commits)
    engine = SketchEngine.load(index_dir, small_run)
    engine.reload()
    assert dropped not in engine.index.entries
