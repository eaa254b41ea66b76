"""The Milvus backend (Milvus Lite, a local file) against FAISS exact search on the same real vectors."""

import importlib.util
import json
import threading

import numpy as np
import pytest
from test_incremental import embedder, incoming, scenario, workspace  # noqa: F401  (fixtures by name)
from typer.testing import CliRunner

from sbir_engine.build import add_files, remove_files, writer_lock
from sbir_engine.cli import app
from sbir_engine.engine import SketchEngine
from sbir_engine.index import GalleryIndex

MISSING = [name for name in ("pymilvus", "milvus_lite") if importlib.util.find_spec(name) is None]
if not MISSING:
    # Imported here, not first inside a CliRunner call: pymilvus binds a logging handler to the
    # sys.stderr of its import, and CliRunner's is closed after the call (then pytest loses stderr).
    import pymilvus  # noqa: F401
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"{' and '.join(MISSING)} not installed: pip install -e '.[milvus]' (or the test extra)",
)


def assert_same_neighbours(expected, got, tol=1e-5):
    """Same ids in the same order and scores within ``tol``; ids may swap only inside exact ties."""
    for e_scores, e_ids, g_scores, g_ids in zip(*expected, *got, strict=True):
        e_scores, e_ids = e_scores[e_ids >= 0], e_ids[e_ids >= 0]
        g_scores, g_ids = g_scores[g_ids >= 0], g_ids[g_ids >= 0]
        assert len(g_ids) == len(e_ids)
        np.testing.assert_allclose(g_scores, e_scores, atol=tol)
        for position in np.nonzero(g_ids != e_ids)[0]:
            tied = e_ids[np.abs(e_scores - e_scores[position]) <= tol]
            assert g_ids[position] in tied, f"id {g_ids[position]} at {position} is not in a tie"
        assert set(g_ids.tolist()) == set(e_ids.tolist())


def test_export_answers_like_faiss_flat(small_index, tmp_path):
    from sbir_engine.milvus import MilvusStore, export_to_milvus

    uri = str(tmp_path / "gallery.db")
    store = export_to_milvus(small_index, uri, "photos")
    faiss_index = GalleryIndex.load(small_index)
    assert len(store) == len(faiss_index) and store.factory == "FLAT"
    everything = len(faiss_index)
    queries = np.asarray(faiss_index.vectors)
    assert_same_neighbours(faiss_index.search(queries, everything), store.search(queries, everything))
    labels = ["cat", "fish"]
    expected = faiss_index.search(queries[:20], 15, labels)
    assert_same_neighbours(expected, store.search(queries[:20], 15, labels))
    _, ids = store.search(queries[:20], 15, labels)
    assert {store.entries[int(i)].label for i in ids.ravel()} <= set(labels)
    # Entries, probabilities and metadata made the trip.
    some = [int(i) for i in faiss_index.ids[:7]]
    assert [store.entries[i] for i in some] == [faiss_index.entries[i] for i in some]
    np.testing.assert_allclose(store.probabilities[some], faiss_index.probabilities[:7], atol=1e-6)
    reopened = MilvusStore.open(uri, "photos")
    assert reopened.meta["model"]["fingerprint"] == faiss_index.meta["model"]["fingerprint"]
    assert sorted(e.id for e in reopened.entries.values()) == sorted(faiss_index.entries)
    # An existing collection is not overwritten unless asked.
    with pytest.raises(Exception, match="already has a collection"):
        export_to_milvus(small_index, uri, "photos")


def test_engine_queries_milvus_like_faiss(small_index, small_gallery, tmp_path):
    from sbir_engine.milvus import export_to_milvus

    uri = str(tmp_path / "gallery.db")
    store = export_to_milvus(small_index, uri)
    on_faiss = SketchEngine.load(small_index)
    on_milvus = SketchEngine.from_store(store)
    sketches = sorted(small_gallery.glob("*/sketch_*"))[::7][:4]
    for sketch in sketches:
        for same_class in (False, True):
            a = on_faiss.query(sketch, k=8, same_class=same_class)
            b = on_milvus.query(sketch, k=8, same_class=same_class)
            assert a.label == b.label
            expected = (np.array([[n.score for n in a.neighbours]]), np.array([[n.id for n in a.neighbours]]))
            got = (np.array([[n.score for n in b.neighbours]]), np.array([[n.id for n in b.neighbours]]))
            assert_same_neighbours(expected, got)
            assert [n.path for n in b.neighbours] == [on_faiss.index.entries[n.id].path for n in b.neighbours]
    assert on_milvus.reload() is False


def test_add_and_remove_on_milvus_match_faiss(workspace, incoming, embedder):  # noqa: F811
    from sbir_engine.milvus import MilvusTarget, export_to_milvus

    gallery, index = workspace
    uri = str(index.parent / "gallery.db")
    export_to_milvus(index, uri)
    target = MilvusTarget(uri)
    gone = scenario(gallery, index, incoming, embedder, target=target)
    # The same steps on the FAISS folder (the files are in the gallery now) give the same index.
    added = add_files(index, [incoming], embedder=embedder)
    assert added.embedded == 5
    removed = remove_files(index, [gallery / p for p in gone])
    assert removed.removed == 3
    faiss_index, store = GalleryIndex.load(index), target.open_existing()
    assert faiss_index.factory == "Flat"
    assert sorted(e.id for e in store.entries.values()) == sorted(faiss_index.entries)
    queries = np.asarray(faiss_index.vectors)
    everything = len(faiss_index)
    assert_same_neighbours(faiss_index.search(queries, everything), store.search(queries, everything))


def test_cli_backend_milvus(small_index, small_gallery, tmp_path):
    uri = str(tmp_path / "cli.db")
    runner = CliRunner()
    result = runner.invoke(app, ["index", "export-milvus", "--index", str(small_index), "--uri", uri])
    assert result.exit_code == 0, result.output
    assert "exported" in result.output
    sketch = sorted(small_gallery.glob("*/sketch_*"))[0]
    answers = []
    for backend in (["--index", str(small_index)], ["--backend", "milvus", "--uri", uri]):
        result = runner.invoke(app, ["query", str(sketch), *backend, "-k", "5", "--json"])
        assert result.exit_code == 0, result.output
        answers.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert [n["id"] for n in answers[0]["neighbours"]] == [n["id"] for n in answers[1]["neighbours"]]
    typo = runner.invoke(app, ["query", str(sketch), "--backend", "milvus", "--uri", uri, "--label", "cta"])
    assert typo.exit_code == 0 and "note: no image in the index has the label 'cta'" in typo.stderr
    info = runner.invoke(app, ["index", "info", "--backend", "milvus", "--uri", uri])
    assert info.exit_code == 0, info.output
    assert "Milvus" in info.output or "FLAT" in info.output
    bad = runner.invoke(app, ["query", str(sketch), "--backend", "milvus", "--uri", str(tmp_path / "x.txt")])
    assert bad.exit_code == 1 and ".db" in bad.output
    from sbir_engine.milvus import MilvusUnavailable, load_engine

    typo = tmp_path / "cIi.db"  # a mistyped file: said so, and not created (an empty database) instead
    for command in (["query", str(sketch)], ["index", "info"], ["index", "remove", str(sketch)]):
        result = runner.invoke(app, [*command, "--backend", "milvus", "--uri", str(typo)])
        assert result.exit_code == 1 and f"error: {typo}: no such Milvus Lite file" in result.output, (
            result.output
        )
        assert not typo.exists()
    with pytest.raises(MilvusUnavailable, match="no such Milvus Lite file"):
        load_engine(str(typo))
    assert not typo.exists()


def test_build_index_into_milvus_is_incremental(small_run, small_gallery, tmp_path):
    uri = str(tmp_path / "built.db")
    runner = CliRunner()
    command = ["build-index", "--model", str(small_run), "--gallery", str(small_gallery)]
    command += ["--backend", "milvus", "--uri", uri, "--collection", "built"]
    first = runner.invoke(app, command)
    assert first.exit_code == 0, first.output
    count = sum(1 for p in small_gallery.rglob("*") if p.is_file())
    assert f"{count} added" in first.output and f"({count} embedded" in first.output
    assert "Milvus FLAT" in first.output
    again = runner.invoke(app, command)
    assert again.exit_code == 0, again.output
    assert f"{count} unchanged" in again.output and "(0 embedded" in again.output
    # Another index type for an existing collection is said to be ignored (it was, without a word).
    hnsw = runner.invoke(app, [*command, "--index-type", "HNSW"])
    assert hnsw.exit_code == 0 and "Milvus FLAT" in hnsw.output, hnsw.output
    assert "the collection keeps its index type FLAT: --index-type HNSW applies when" in hnsw.output
    # A second writer of the same Lite collection is refused while another thread writes it (the
    # lock is re-entrant within a thread); other collections in the same file are not.
    from sbir_engine.milvus import MilvusTarget

    held, release = threading.Event(), threading.Event()

    def writer():
        with writer_lock(MilvusTarget(uri, "built")):
            held.set()
            release.wait(120)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert held.wait(60)
        busy = runner.invoke(app, command + ["--full"])
        other = runner.invoke(app, [*command[:-1], "other"])
    finally:
        release.set()
        thread.join()
    assert busy.exit_code == 1 and "another build-index, index add or index remove" in busy.output
    assert other.exit_code == 0 and f"{count} added" in other.output, other.output
    from sbir_engine.milvus import MilvusStore

    store = MilvusStore.open(uri, "built")
    assert len(store) == count and store.meta["next_id"] == count
    assert sorted(e.path for e in store.entries.values()) == sorted(
        p.relative_to(small_gallery).as_posix() for p in small_gallery.rglob("*") if p.is_file()
    )


def test_build_index_leaves_a_collection_it_did_not_write_alone(small_run, small_gallery, tmp_path):
    from pymilvus import MilvusClient

    uri = str(tmp_path / "shared.db")
    client = MilvusClient(uri)
    client.create_collection("theirs", dimension=4)
    client.insert("theirs", [{"id": i, "vector": [float(i), 1.0, 0.0, 0.0]} for i in range(3)])
    command = ["build-index", "--model", str(small_run), "--gallery", str(small_gallery)]
    command += ["--backend", "milvus", "--uri", uri, "--collection", "theirs"]
    refused = CliRunner().invoke(app, command)
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "collection 'theirs' was not written by sbir-engine" in refused.output
    assert "Left as it is: `build-index --full` replaces it" in refused.output
    client.load_collection("theirs")
    assert len(client.query("theirs", filter="id >= 0", output_fields=["id"])) == 3
    client.close()
