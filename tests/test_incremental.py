"""Galleries that change: add and remove images without re-embedding the rest; index choice by size.

The add/remove scenario runs on copies of the session's real index and gallery (small model
trained on real QuickDraw sketches and photos); the new images are real photos no model saw.
"""

import json
import shutil

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from sbir_engine.build import add_files, build_index, remove_files
from sbir_engine.cli import app
from sbir_engine.embed import Embedder
from sbir_engine.index import Entry, GalleryIndex, new_meta
from sbir_engine.index_factory import choose_factory, estimate_memory, make_faiss_index, tune_search
from sbir_engine.model import load_model

NEW_PHOTOS = {"cat": 3, "fish": 2}  # 5 real photos past the first 40 the small dataset drew from


@pytest.fixture(scope="module")
def embedder(small_run) -> Embedder:
    return Embedder(load_model(small_run))


@pytest.fixture
def workspace(small_index, small_gallery, small_run, embedder, tmp_path):
    """Copies of the session index and gallery, the index pointed at the copied gallery."""
    gallery, index = tmp_path / "gallery", tmp_path / "index"
    shutil.copytree(small_gallery, gallery)
    shutil.copytree(small_index, index)
    report = build_index(small_run, gallery, index, embedder=embedder)
    assert report.embedded == 0 and report.full_rebuild_reason is None  # a moved gallery is matched
    assert any("gallery moved" in note for note in report.notes)
    return gallery, index


@pytest.fixture(scope="module")
def incoming(tmp_path_factory, shared_data):
    """A folder of 5 new real photos, <class>/<file>, outside any gallery."""
    root = tmp_path_factory.mktemp("incoming")
    for label, count in NEW_PHOTOS.items():
        (root / label).mkdir()
        for path in sorted((shared_data / "photos" / label).iterdir())[40 : 40 + count]:
            shutil.copyfile(path, root / label / f"new_{path.name}")
    return root


def own_vector(embedder, path) -> np.ndarray:
    return embedder(embedder.load_image(path)[None])[0][0]


def scenario(gallery, index, incoming, embedder, target=None) -> list[str]:
    """Add 5 images, then remove 3 (two old, one new), checking each step; returns the removed paths.

    ``target`` None: the FAISS folder ``index``; else a Milvus target (a live store, not a snapshot).
    """
    location = None if target else index

    def current():
        return target.open_existing() if target else GalleryIndex.load(index)

    old_ids = {entry.path: entry.id for entry in current().entries.values()}
    added = add_files(location, [incoming], embedder=embedder, target=target)
    # Only the 5 new images were embedded; nothing else changed.
    assert (added.embedded, added.added, added.updated, added.removed) == (5, 5, 0, 0)
    assert added.unchanged == len(old_ids) and not added.failed
    store = current()
    assert len(store) == len(old_ids) + 5
    # Outside files were copied into <gallery>/<label>/, so the index still mirrors the gallery.
    new_paths = sorted(p.relative_to(incoming).as_posix() for p in incoming.rglob("*.jpg"))
    for path in new_paths:
        assert (gallery / path).read_bytes() == (incoming / path).read_bytes()
    ids = {entry.path: entry.id for entry in store.entries.values()}
    assert {p: ids[p] for p in old_ids} == old_ids
    new_ids = [ids[p] for p in new_paths]
    assert len(set(new_ids)) == 5 and min(new_ids) > max(old_ids.values())
    # Each new image is found first by its own embedding, with its label, filtered or not.
    for path, entry_id in zip(new_paths, new_ids, strict=True):
        label = path.split("/")[0]
        scores, found = store.search(own_vector(embedder, gallery / path), 3)
        assert found[0][0] == entry_id and scores[0][0] == pytest.approx(1.0, abs=1e-4)
        assert store.entries[entry_id].label == label
        assert store.search(own_vector(embedder, gallery / path), 3, labels=[label])[1][0][0] == entry_id

    # Removing 3 embeds nothing; they never come back, whatever k; everyone else keeps their id.
    paths = sorted(old_ids)
    gone = [paths[0], paths[len(paths) // 2], new_paths[-1]]
    removed = remove_files(location, [gallery / gone[0], gone[1], gallery / gone[2]], target=target)
    assert (removed.removed, removed.embedded, removed.added) == (3, 0, 0) and not removed.failed
    assert any("still in the gallery folder" in note for note in removed.notes)
    after = current()
    remaining = {p: i for p, i in ids.items() if p not in gone}
    assert {e.path: e.id for e in after.entries.values()} == remaining
    queries = np.stack([own_vector(embedder, gallery / p) for p in gone])
    _, found = after.search(queries, len(ids) + 10)
    assert not {ids[p] for p in gone} & set(found.ravel().tolist())
    assert set(found[0][found[0] >= 0].tolist()) == set(remaining.values())
    return gone


def test_add_and_remove_embed_only_what_changed(workspace, incoming, embedder, small_run):
    gallery, index = workspace
    scenario(gallery, index, incoming, embedder)
    # The index mirrors the gallery: a rescan embeds nothing new (the removed files, still in the
    # folder, are what it would add back — the report of `remove` said so).
    rescan = build_index(small_run, gallery, index, embedder=embedder)
    assert rescan.embedded == 3 and rescan.added == 3 and rescan.removed == 0
    info = json.loads((index / (index / "CURRENT").read_text().strip() / "index.json").read_text())
    assert info["factory"] == "Flat" and info["recall_at_10"] == 1.0 and info["memory_bytes"] > 0


def test_moved_renamed_and_copied_files_are_not_embedded_again(workspace, embedder, small_run):
    gallery, index = workspace
    before = GalleryIndex.load(index)
    by_path = {entry.path: entry for entry in before.entries.values()}
    cat, fish = (
        sorted(p for p in by_path if p.startswith("cat/")),
        sorted(p for p in by_path if p.startswith("fish/")),
    )
    (gallery / cat[0]).rename(gallery / "cat" / "renamed.jpg")  # renamed in its folder
    (gallery / fish[0]).rename(gallery / "cup" / "was_a_fish.jpg")  # moved to another class folder
    shutil.copyfile(gallery / cat[1], gallery / "cat" / "copy.jpg")  # a copy of an indexed file
    report = build_index(small_run, gallery, index, embedder=embedder)
    assert (report.embedded, report.moved, report.added, report.removed) == (0, 2, 1, 0), report.summary()
    assert report.unchanged == len(by_path) - 2 and "1 files not embedded" in "\n".join(report.notes)
    after = GalleryIndex.load(index)
    entries = {entry.path: entry for entry in after.entries.values()}
    # A moved file keeps its id and vector, with the label of where it is now; a copy gets its own id.
    assert entries["cat/renamed.jpg"].id == by_path[cat[0]].id
    assert (
        entries["cup/was_a_fish.jpg"].id == by_path[fish[0]].id
        and entries["cup/was_a_fish.jpg"].label == "cup"
    )
    assert entries["cat/copy.jpg"].id not in {entry.id for entry in before.entries.values()}
    for path, source in (
        ("cat/renamed.jpg", cat[0]),
        ("cup/was_a_fish.jpg", fish[0]),
        ("cat/copy.jpg", cat[1]),
    ):
        stored = after.vectors[after.rows[entries[path].id]]
        assert np.array_equal(stored, before.vectors[before.rows[by_path[source].id]])
        assert float(stored @ own_vector(embedder, gallery / path)) > 0.999  # what embedding it would give
    assert cat[0] not in entries and fish[0] not in entries


def test_new_copies_are_embedded_once_and_a_full_rebuild_keeps_moved_ids(
    workspace, incoming, embedder, small_run, tmp_path
):
    """Copies among the new files (the same photo saved twice, a broken file twice) are embedded, or
    found unreadable, once for all; and a full rebuild, which embeds everything again, still gives
    a moved file the id it had. Before, each copy was embedded and the moved file got a new id."""
    gallery, index = workspace
    photo = next((incoming / "cat").iterdir())
    for name in ("one.jpg", "two.jpg"):
        shutil.copyfile(photo, gallery / "cat" / name)
        (gallery / "fish" / name).write_bytes(b"not an image")
    report = build_index(small_run, gallery, index, embedder=embedder)
    assert (report.embedded, report.added) == (1, 2), report.summary()
    assert sorted(path for path, _ in report.failed) == ["fish/one.jpg", "fish/two.jpg"]
    assert "1 files not embedded: they repeat another new file's content" in "\n".join(report.notes)
    after = GalleryIndex.load(index)
    ids = {entry.path: entry.id for entry in after.entries.values()}
    one, two = (after.vectors[after.rows[ids[f"cat/{name}"]]] for name in ("one.jpg", "two.jpg"))
    assert ids["cat/one.jpg"] != ids["cat/two.jpg"] and np.array_equal(one, two)
    assert float(one @ own_vector(embedder, photo)) > 0.999

    old = sorted(p for p in ids if p.startswith("cup/"))[0]
    (gallery / old).rename(gallery / "cat" / "was_a_cup.jpg")
    full = build_index(small_run, gallery, index, embedder=embedder, full=True)
    assert full.moved == 1 and full.removed == 0, full.summary()
    rebuilt = {entry.path: entry.id for entry in GalleryIndex.load(index).entries.values()}
    assert rebuilt == {**{p: i for p, i in ids.items() if p != old}, "cat/was_a_cup.jpg": ids[old]}


def test_index_add_of_a_file_moved_by_hand_moves_its_entry(workspace, embedder):
    gallery, index = workspace
    before = {entry.path: entry.id for entry in GalleryIndex.load(index).entries.values()}
    old = sorted(p for p in before if p.startswith("cat/"))[0]
    (gallery / old).rename(gallery / "fish" / "was_a_cat.jpg")
    report = add_files(index, [gallery / "fish" / "was_a_cat.jpg"], embedder=embedder)
    assert (report.moved, report.added, report.embedded, report.removed) == (1, 0, 0, 0), report.summary()
    after = {entry.path: entry.id for entry in GalleryIndex.load(index).entries.values()}
    assert after == {**{p: i for p, i in before.items() if p != old}, "fish/was_a_cat.jpg": before[old]}
    # A copy (the original still there) is not a move: a new id, the stored vector.
    shutil.copyfile(gallery / "fish" / "was_a_cat.jpg", gallery / "cup" / "copy.jpg")
    copy = add_files(index, [gallery / "cup" / "copy.jpg"], embedder=embedder)
    assert (copy.moved, copy.added, copy.embedded) == (0, 1, 0), copy.summary()


def test_remove_with_delete_files_and_failures(workspace, embedder, small_run, tmp_path):
    gallery, index = workspace
    before = GalleryIndex.load(index)
    victim = sorted(e.path for e in before.entries.values())[1]
    cup_folder = gallery / "cup"
    cup_count = sum(1 for e in before.entries.values() if e.label == "cup")
    report = remove_files(index, [gallery / victim, "no/such.png", cup_folder], delete_files=True)
    assert report.removed == 1 + cup_count and report.embedded == 0
    assert [reason for _, reason in report.failed] == ["not in the index"]
    assert not (gallery / victim).exists() and not any(cup_folder.rglob("*.*"))
    rescan = build_index(small_run, gallery, index, embedder=embedder)
    assert (rescan.embedded, rescan.added, rescan.removed) == (0, 0, 0)
    # A file that is not an image, and a broken image copied in from outside, are reported; the
    # broken copy does not stay in the gallery.
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    note = tmp_path / "notes.txt"
    note.write_text("hello")
    report = add_files(index, [broken, note], label="cat", embedder=embedder)
    assert report.added == 0 and report.embedded == 0 and len(report.failed) == 2
    assert not (gallery / "cat" / "broken.jpg").exists()


def test_cli_index_add_remove_info(workspace, incoming):
    gallery, index = workspace
    runner = CliRunner()
    photo = next((incoming / "fish").iterdir())
    result = runner.invoke(app, ["index", "add", str(photo), "--index", str(index), "--label", "fish"])
    assert result.exit_code == 0, result.output
    assert "1 added" in result.output and "(1 embedded" in result.output
    assert (gallery / "fish" / photo.name).is_file()
    result = runner.invoke(app, ["index", "remove", f"fish/{photo.name}", "--index", str(index)])
    assert result.exit_code == 0, result.output
    assert "1 removed" in result.output and "(0 embedded" in result.output
    info = runner.invoke(app, ["index", "info", "--index", str(index)])
    assert info.exit_code == 0, info.output
    assert "Flat" in info.output and "recall@10" in info.output and "memory" in info.output
    missing = runner.invoke(app, ["index", "remove", "nowhere.png", "--index", str(index), "--strict"])
    assert missing.exit_code == 3 and "not in the index" in missing.output


def test_another_model_means_a_full_rebuild_keeping_ids(workspace, other_run, incoming):
    gallery, index = workspace
    before = GalleryIndex.load(index)
    report = add_files(index, [incoming / "fish"], label="fish", model_dir=other_run)
    assert "model differs" in report.full_rebuild_reason and "full rebuild" in report.summary()
    assert report.embedded == len(before) + 2 and report.updated == len(before) and report.added == 2
    after = GalleryIndex.load(index)
    old = {e.path: e.id for e in before.entries.values()}
    assert {e.path: e.id for e in after.entries.values() if e.path in old} == old


# -- index choice by size and memory -------------------------------------------------------------


def clustered(n: int, dim: int = 64, clusters: int = 50, seed: int = 0) -> np.ndarray:
    """Unit vectors around 50 fixed random centres (a mixture of Gaussians on the sphere)."""
    centres = np.random.default_rng(1234).normal(size=(clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    which = rng.integers(0, clusters, n)
    x = centres[which] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_choice_by_size_and_memory_budget():
    gib = 2**30
    assert choose_factory(10_000, 512) == "Flat"
    # 1M × 512 on a 24 GiB machine (default budget 6 GiB): HNSW fits (~2.9 GB), and the estimate
    # is the FAISS structure (vectors + 64 links each) plus per-entry bookkeeping.
    assert choose_factory(1_000_000, 512, 6 * gib) == "HNSW32,Flat"
    hnsw = estimate_memory("HNSW32,Flat", 1_000_000, 512)
    assert 2.2 * gib < hnsw < 3.5 * gib
    # Tighter budgets step down: IVF-Flat, then 8-bit scalar codes, then 64-byte PQ codes.
    assert choose_factory(1_000_000, 512, int(2.75 * gib)) == "IVF4096,Flat"
    assert choose_factory(1_000_000, 512, 2 * gib) == "IVF4096,SQ8"
    assert choose_factory(1_000_000, 512, 1 * gib) == "IVF4096,PQ64"
    assert estimate_memory("IVF4096,PQ64", 1_000_000, 512) < 1 * gib
    # 10M does not fit 6 GiB even as PQ (the manifest alone is ~7 GB): the smallest is returned,
    # and this is where docs/scaling.md says to move to Milvus.
    assert choose_factory(10_000_000, 512, 6 * gib) == "IVF16384,PQ64"


# (PQ is left out: training its codebooks takes ~30 s on 2 shared cores; scripts/scale_check.py
# measures it.)
@pytest.mark.parametrize("factory", ["HNSW32,Flat", "IVF64,Flat", "IVF64,SQ8"])
def test_tuned_search_reaches_the_target_recall(factory):
    vectors = clustered(20_000)
    ids = np.arange(len(vectors), dtype=np.int64) * 3 + 7
    index = make_faiss_index(vectors, ids, factory)
    name, value, recall = tune_search(index, vectors, factory)
    assert recall >= 0.95 and name in ("efSearch", "nprobe") and value >= 1
    assert name == "nprobe" or value >= 16  # never below FAISS's default efSearch
    meta = new_meta(64, factory, "f", ".", ".", ".")
    meta["search_parameter"] = [name, value]
    entries = [Entry(int(i), f"{'ab'[int(i) % 2]}/{i}.png", "ab"[int(i) % 2], "0", 1) for i in ids]
    gallery = GalleryIndex(index, vectors, np.zeros((len(ids), 2), np.float32), ids, entries, meta)
    # Held-out queries: recall@10 against exact search, through GalleryIndex.search (PQ re-ranks).
    queries = clustered(200, seed=1)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    scores, found = gallery.search(queries, 10)
    recall = np.mean([len(set(f) & set(ids[e])) / 10 for f, e in zip(found, exact, strict=True)])
    assert recall >= 0.9
    # A label filter keeps the tuned efSearch / nprobe (plain SearchParameters would be refused).
    _, found = gallery.search(queries[:5], 10, labels=["b"])
    assert all(gallery.entries[int(i)].label == "b" for i in found.ravel() if i >= 0)
    # Removing from an index that cannot drop ids in place rebuilds it before the next save.
    gallery.remove(ids[:100])
    assert gallery.stale != isinstance(faiss.downcast_index(index.index), faiss.IndexFlat)
    assert gallery.refresh(factory) in ("refilled (trained IVF quantizer kept)", "rebuilt")
    assert gallery.index.ntotal == len(ids) - 100


def test_a_type_that_cannot_reach_the_recall_is_replaced(tmp_path, monkeypatch):
    """HNSW's graph can fail on strongly clustered vectors; the build then takes the next type."""
    from sbir_engine import build, index_factory

    monkeypatch.setattr(index_factory, "FLAT_LIMIT", 1_000)  # a small gallery stands in for a large one
    vectors, n = clustered(6_000), 6_000
    meta = new_meta(64, "Flat", "f", tmp_path, tmp_path / "index", tmp_path)
    store = GalleryIndex.empty(64, 2, meta)
    store.add([Entry(i, f"a/{i}.png", "a", "0", 1) for i in range(n)], vectors, np.zeros((n, 2), np.float32))
    real = build.tune_search

    def hnsw_fails(index, vectors, factory, *args, **kwargs):
        if factory.startswith("HNSW"):
            return "efSearch", 512, 0.7
        return real(index, vectors, factory, *args, **kwargs)

    monkeypatch.setattr(build, "tune_search", hnsw_fails)
    report = build.BuildReport(str(tmp_path / "index"))
    build.FaissTarget(tmp_path / "index").commit(store, report)
    assert report.factory == "IVF256,Flat" and report.recall_at_10 >= 0.95
    assert "HNSW32,Flat reached recall@10 0.700 at most" in report.summary()
    saved = GalleryIndex.load(tmp_path / "index")
    assert saved.meta["rejected_factories"] == {"HNSW32,Flat": 0.7}
    # Later updates do not try HNSW again.
    saved.add([Entry(n, "a/new.png", "a", "0", 1)], clustered(1, seed=5), np.zeros((1, 2), np.float32))
    again = build.BuildReport(str(tmp_path / "index"))
    build.FaissTarget(tmp_path / "index", keep_type=True).commit(saved, again)
    assert again.factory == "IVF256,Flat" and "reached" not in again.summary()
    assert GalleryIndex.load(tmp_path / "index").index.ntotal == n + 1
