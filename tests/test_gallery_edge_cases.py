"""Galleries and index folders as users have them: shared folders, odd names, folders that cannot be
listed, symlinks, user-chosen index types, and edits that must not lose files or entries.

Each test builds a small index of real photos (the session's small model) in its own tmp_path.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from sbir_engine import build, update
from sbir_engine.build import add_files, build_index, remove_files
from sbir_engine.cli import app
from sbir_engine.embed import Embedder
from sbir_engine.gallery import NOT_UTF8
from sbir_engine.index import CURRENT, GalleryIndex, IndexFormatError, NotAnIndexFolderError, current_version
from sbir_engine.index_factory import IndexTypeError, estimate_memory
from sbir_engine.model import load_model

LABELS = ("cat", "cup", "fish")


@pytest.fixture(scope="module")
def embedder(small_run) -> Embedder:
    return Embedder(load_model(small_run))


@pytest.fixture(scope="module")
def photos(small_photos) -> dict[str, list[Path]]:
    """A few real photos of each label, to copy into galleries."""
    return {label: sorted((small_photos / label).iterdir())[:8] for label in LABELS}


def make_gallery(root: Path, photos: dict[str, list[Path]], per_label: int = 2) -> Path:
    for label in LABELS:
        (root / label).mkdir(parents=True)
        for path in photos[label][:per_label]:
            shutil.copyfile(path, root / label / path.name)
    return root


def indexed(index_dir: Path) -> set[str]:
    return {entry.path for entry in GalleryIndex.load(index_dir).entries.values()}


def ids_by_path(index_dir: Path) -> dict[str, int]:
    return {entry.path: entry.id for entry in GalleryIndex.load(index_dir).entries.values()}


def one_line_error(result) -> str:
    """The error line of a command that failed without a traceback (a progress bar may come first)."""
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("Embedding")]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# -- the index folder: only a build's own files are ever deleted ----------------------------------


def test_a_build_deletes_only_its_versions_and_refuses_a_folder_that_is_not_an_index(
    photos, small_run, embedder, tmp_path
):
    gallery = make_gallery(tmp_path / "gallery", photos, 1)
    project = tmp_path / "project"  # `--out .` in a project: a venv, videos
    (project / "venv").mkdir(parents=True)
    (project / "videos" / "holiday.mp4").parent.mkdir()
    (project / "videos" / "holiday.mp4").write_text("precious")
    with pytest.raises(NotAnIndexFolderError, match=f"{project} is not an sbir-engine index .*venv, videos"):
        build_index(small_run, gallery, project, embedder=embedder)
    # The gallery itself as --out: refused before anything is embedded, in one line.
    args = ["build-index", "--model", str(small_run), "--gallery", str(gallery), "--out", str(gallery)]
    line = one_line_error(CliRunner().invoke(app, args))
    assert f"{gallery} is not an sbir-engine index" in line and "choose another --out" in line
    assert sorted(p.name for p in project.iterdir()) == ["venv", "videos"]
    assert not (gallery / CURRENT).exists()

    # A killed first build's leftovers and hidden files do not make a folder "not an index".
    index_dir = tmp_path / "index"
    (index_dir / ".tmp-v000001-99").mkdir(parents=True)
    (index_dir / ".DS_Store").write_text("")
    build_index(small_run, gallery, index_dir, embedder=embedder)
    # Whatever else is put in an index folder later, a build deletes only versions and its temp files.
    for name in ("vase", "venv", "v1", "v000001-notes", ".tmp-mine"):
        (index_dir / name).mkdir()
    (index_dir / "v000007").mkdir()  # a version a killed build left
    shutil.copyfile(photos["cat"][1], gallery / "cat" / photos["cat"][1].name)
    build_index(small_run, gallery, index_dir, embedder=embedder)
    names = sorted(p.name for p in index_dir.iterdir())
    expected = [".DS_Store", ".tmp-mine", CURRENT, "v000001-notes", "v000002", "v1", "vase", "venv"]
    assert names == sorted(expected)
    assert current_version(index_dir).name == "v000002" and len(indexed(index_dir)) == 4


# -- gallery files and folders ----------------------------------------------------------------------


def test_a_file_whose_name_is_not_utf8_is_reported_and_skipped(photos, small_run, embedder, tmp_path):
    gallery = make_gallery(tmp_path / "gallery", photos)
    latin1 = os.fsencode(gallery / "cat") + b"/caf\xe9.jpg"  # 'café.jpg' from an old Latin-1 archive
    shutil.copyfile(photos["cat"][2], latin1)
    report = build_index(small_run, gallery, tmp_path / "index", embedder=embedder)
    assert report.failed == [("cat/caf\\xe9.jpg", NOT_UTF8)] and report.total == 6
    assert len(indexed(tmp_path / "index")) == 6
    log = (current_version(tmp_path / "index") / "build.log").read_text(encoding="utf-8")
    assert "failed cat/caf\\xe9.jpg: its name is not valid UTF-8" in log
    # `index add` of such a file from outside: reported, not copied in.
    outside = os.fsencode(tmp_path) + b"/na\xefve.jpg"
    shutil.copyfile(photos["fish"][2], outside)
    added = add_files(tmp_path / "index", [Path(os.fsdecode(outside))], label="fish", embedder=embedder)
    assert added.added == 0 and [reason for _, reason in added.failed] == [NOT_UTF8]
    assert "na\\xefve.jpg" in added.failed[0][0] and not list((gallery / "fish").glob("na*"))


def test_hidden_files_and_folders_are_not_the_collection(photos, small_run, embedder, tmp_path):
    """A macOS zip's __MACOSX (AppleDouble ._ files), Jupyter's .ipynb_checkpoints copies, a Synology
    NAS's @eaDir thumbnails and hidden files are left out of a build, without failures; `index add`
    names them instead of adding what a rescan would drop. Before, the thumbnails and checkpoint
    copies were indexed as images (label "@eaDir") and every AppleDouble file was a failure."""
    gallery = make_gallery(tmp_path / "gallery", photos)
    cat = photos["cat"][0]
    (gallery / "__MACOSX" / "cat").mkdir(parents=True)
    (gallery / "__MACOSX" / "cat" / f"._{cat.name}").write_bytes(b"\0\5\26\7\0\2\0\0Mac OS X")
    (gallery / "cat" / ".ipynb_checkpoints").mkdir()
    shutil.copyfile(cat, gallery / "cat" / ".ipynb_checkpoints" / "copy-checkpoint.jpg")
    (gallery / "@eaDir" / cat.name).mkdir(parents=True)
    shutil.copyfile(photos["cat"][5], gallery / "@eaDir" / cat.name / "SYNOPHOTO_THUMB_M.jpg")
    shutil.copyfile(photos["fish"][5], gallery / "fish" / ".hidden.jpg")
    report = build_index(small_run, gallery, tmp_path / "index", embedder=embedder)
    assert report.failed == [] and report.added == 2 * len(LABELS), report.summary()
    assert indexed(tmp_path / "index") == {
        f"{label}/{path.name}" for label in LABELS for path in photos[label][:2]
    }
    added = add_files(
        tmp_path / "index", [gallery / "fish" / ".hidden.jpg", gallery / "cat"], embedder=embedder
    )
    assert added.added == 0 and [path for path, _ in added.failed] == [str(gallery / "fish" / ".hidden.jpg")]
    assert "is hidden" in added.failed[0][1]
    with pytest.raises(ValueError, match="is hidden"):
        add_files(tmp_path / "index", [photos["cup"][5]], label=".thumbs", embedder=embedder)
    # A gallery of nothing but such files builds an empty index, and says why it is empty.
    empty = build_index(small_run, gallery / "__MACOSX", tmp_path / "empty", embedder=embedder)
    assert empty.total == 0 and any("holds no image files" in note for note in empty.notes)
    # An index of images whose gallery is now empty (a disk not mounted under its mount point) is
    # left as it is, unless told (--full): a rescan would have dropped every vector.
    unmounted = tmp_path / "mount-point"
    unmounted.mkdir()
    message = rf"the gallery .*mount-point holds no image files, but the index holds {2 * len(LABELS)}"
    with pytest.raises(ValueError, match=message):
        build_index(small_run, unmounted, tmp_path / "index", embedder=embedder)
    assert len(indexed(tmp_path / "index")) == 2 * len(LABELS)
    assert build_index(small_run, unmounted, tmp_path / "index", embedder=embedder, full=True).total == 0


def unlistable(monkeypatch, folder: Path) -> None:
    """Make ``folder`` fail to list, as a folder without read permission or a dropped mount does
    (the tests run as root, whom permissions do not stop)."""
    real = os.scandir

    def scandir(path="."):
        if not isinstance(path, int) and Path(os.fsdecode(path)) == folder:  # (rmtree passes fds)
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.mark.parametrize("where", ["cat", ""])
def test_a_folder_that_cannot_be_listed_keeps_its_entries(
    where, photos, small_run, embedder, tmp_path, monkeypatch
):
    gallery = make_gallery(tmp_path / "gallery", photos)
    index_dir = tmp_path / "index"
    build_index(small_run, gallery, index_dir, embedder=embedder)
    before = indexed(index_dir)
    unlistable(monkeypatch, gallery / where if where else gallery)
    report = build_index(small_run, gallery, index_dir, embedder=embedder)
    assert report.failed == [
        (where or str(gallery), "folder cannot be listed (Permission denied): its indexed images are kept")
    ]
    assert report.removed == 0 and indexed(index_dir) == before
    # A full rebuild has no vectors it could keep for them: it says it drops them, and counts them.
    full = build_index(small_run, gallery, index_dir, embedder=embedder, full=True)
    assert full.failed == [
        (
            where or str(gallery),
            "folder cannot be listed (Permission denied): a full rebuild drops its indexed images",
        )
    ]
    assert full.removed == len(before) - len(indexed(index_dir)) > 0


def test_symlinks_in_the_gallery_are_added_and_removed_as_themselves(photos, small_run, embedder, tmp_path):
    """cat/linkN.jpg → ../fish/realN.jpg: removing (and deleting) a link leaves its target alone,
    whatever order the path is tried in; `index add` of a new link indexes the link."""
    gallery = make_gallery(tmp_path / "gallery", photos, 0)
    for i, path in enumerate(photos["fish"]):
        shutil.copyfile(path, gallery / "fish" / f"real{i}.jpg")
        (gallery / "cat" / f"link{i}.jpg").symlink_to(f"../fish/real{i}.jpg")
    index_dir = tmp_path / "index"
    build_index(small_run, gallery, index_dir, embedder=embedder)
    links = [gallery / "cat" / f"link{i}.jpg" for i in range(len(photos["fish"]))]
    report = remove_files(index_dir, links, delete_files=True)
    assert report.removed == len(links) and not report.failed
    assert indexed(index_dir) == {f"fish/real{i}.jpg" for i in range(len(links))}
    assert not any(os.path.lexists(link) for link in links)
    assert all((gallery / "fish" / f"real{i}.jpg").is_file() for i in range(len(links)))

    (gallery / "cup" / "new link.jpg").symlink_to("../fish/real0.jpg")
    added = add_files(index_dir, [gallery / "cup" / "new link.jpg"], embedder=embedder)
    # Indexed as an entry of its own, with the vector of the file it points to (same content).
    assert (added.added, added.embedded) == (1, 0) and "cup/new link.jpg" in indexed(index_dir)
    assert build_index(small_run, gallery, index_dir, embedder=embedder).embedded == 0  # as a rescan


# -- index remove / index add ------------------------------------------------------------------------


def test_delete_files_deletes_only_after_the_index_committed(
    photos, small_run, embedder, tmp_path, monkeypatch
):
    gallery = make_gallery(tmp_path / "gallery", photos)
    index_dir = tmp_path / "index"
    build_index(small_run, gallery, index_dir, embedder=embedder)

    def disk_full(self, store, report):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(build.FaissTarget, "commit", disk_full)
    with pytest.raises(OSError, match="No space left"):
        remove_files(index_dir, [gallery / "cat"], delete_files=True)
    assert len(list((gallery / "cat").iterdir())) == 2 and len(indexed(index_dir)) == 6
    monkeypatch.undo()
    report = remove_files(index_dir, [gallery / "cat"], delete_files=True)
    assert report.removed == 2 and not list((gallery / "cat").iterdir())


def test_removing_the_gallery_root_is_refused_plainly(photos, small_run, embedder, tmp_path):
    gallery = make_gallery(tmp_path / "gallery", photos)
    build_index(small_run, gallery, tmp_path / "index", embedder=embedder)
    report = remove_files(tmp_path / "index", [gallery], delete_files=True)
    assert report.removed == 0 and report.failed[0][0] == str(gallery)
    assert report.failed[0][1].startswith("is the gallery root: the whole gallery is not removed this way")
    assert len(indexed(tmp_path / "index")) == 6 and len(list(gallery.rglob("*.jpg"))) == 6


def test_a_failed_copy_leaves_the_gallery_when_the_model_differs_too(photos, small_run, embedder, tmp_path):
    gallery = make_gallery(tmp_path / "gallery", photos)
    index_dir = tmp_path / "index"
    build_index(small_run, gallery, index_dir, embedder=embedder)
    other = copy.copy(embedder)  # the same network under another fingerprint: a full rebuild
    other.model = SimpleNamespace(fingerprint=lambda: "another model")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    report = add_files(index_dir, [broken], label="cat", embedder=other)
    assert report.full_rebuild_reason and [path for path, _ in report.failed] == ["cat/broken.jpg"]
    assert not (gallery / "cat" / "broken.jpg").exists()


def test_a_batch_size_below_one_is_refused(photos, small_run, embedder, tmp_path):
    gallery = make_gallery(tmp_path / "gallery", photos, 1)
    for size in (0, -1):
        with pytest.raises(ValueError, match="batch size must be at least 1"):
            build_index(small_run, gallery, tmp_path / "index", batch_size=size, embedder=embedder)
    assert not (tmp_path / "index").exists()
    build_index(small_run, gallery, tmp_path / "index", embedder=embedder)
    with pytest.raises(ValueError, match="at least 1, not 0"):
        add_files(tmp_path / "index", [photos["cat"][5]], label="cat", batch_size=0, embedder=embedder)
    args = ["build-index", "--model", str(small_run), "--gallery", str(gallery), "--batch-size", "0"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "other")])
    assert result.exit_code == 2 and "--batch-size" in result.output


# -- user-chosen index types ------------------------------------------------------------------------


def test_index_types_are_checked_before_the_model_loads(photos, small_run, tmp_path, monkeypatch):
    gallery = make_gallery(tmp_path / "gallery", photos, 1)

    def no_model(run_dir):
        raise AssertionError("the model was loaded before the index type was checked")

    monkeypatch.setattr(build, "load_model", no_model)
    cases = {
        "bogus": r"is not a FAISS index type for 512-d inner-product vectors \(could not parse",
        "PQ7": "is not a FAISS index type .*multiple of the number of subquantizers",
        "IDMap,Flat": "leave out IDMap",
    }
    for factory, message in cases.items():
        with pytest.raises(IndexTypeError, match=message):
            build_index(small_run, gallery, tmp_path / "index", index_type=factory)
    assert not (tmp_path / "index").exists()


def test_unmodelled_index_types_build_and_too_big_ones_are_refused_before_embedding(
    photos, small_run, embedder, tmp_path, monkeypatch
):
    gallery = make_gallery(tmp_path / "gallery", photos, 3)
    assert estimate_memory("IVF4,SQ4", 100, 512) is None and estimate_memory("IVF4_HNSW8,Flat", 1, 8) is None
    for factory in ("IVF4,SQ4", "IVF4_HNSW8,Flat"):
        report = build_index(small_run, gallery, tmp_path / factory, index_type=factory, embedder=embedder)
        assert report.factory == factory and report.total == 9 and report.memory_bytes is None
    embedded = []
    monkeypatch.setattr(update, "embed_images", lambda *args, **kwargs: embedded.append(1))
    with pytest.raises(
        IndexTypeError, match="'IVF4096,Flat' needs at least 4096 images .* the gallery has 9"
    ):
        build_index(small_run, gallery, tmp_path / "ivf4096", index_type="IVF4096,Flat", embedder=embedder)
    assert not embedded


def test_an_ivf_index_emptied_and_refilled(photos, small_run, embedder, tmp_path):
    """Removing every image leaves an empty (Flat) index that loads; the chosen IVF type returns
    with the images, and a FAISS error (too few to train on) is one line naming the type."""
    gallery = make_gallery(tmp_path / "gallery", photos, 3)
    index_dir = tmp_path / "index"
    build_index(small_run, gallery, index_dir, index_type="IVF4,Flat", embedder=embedder)
    runner = CliRunner()
    result = runner.invoke(
        app, ["index", "remove", *(str(gallery / label) for label in LABELS), "-i", str(index_dir)]
    )
    assert result.exit_code == 0, result.output
    assert "no images: the index is Flat until some are added (IVF4,Flat then)" in result.output
    empty = GalleryIndex.load(index_dir)
    assert len(empty) == 0 and empty.factory == "Flat" and empty.meta["factory_source"] == "user"
    # One image cannot train 4 lists: said in one line, and the index is left as it was.
    result = runner.invoke(app, ["index", "add", str(gallery / "cat"), "-i", str(index_dir)])
    line = one_line_error(result)
    assert "index type IVF4,Flat cannot be built on 3 images" in line and "--index-type" in line
    assert len(GalleryIndex.load(index_dir)) == 0
    report = add_files(index_dir, [gallery], embedder=embedder)
    assert report.factory == "IVF4,Flat" and report.total == 9


def test_a_rebuild_without_index_type_says_it_replaced_the_chosen_type(photos, small_run, embedder, tmp_path):
    """A plain `build-index` rerun goes back to the size-based type (as documented); it says so, and
    how to keep the chosen one, instead of a bare "FAISS index rebuilt"."""
    gallery = make_gallery(tmp_path / "gallery", photos, 2)
    index_dir = tmp_path / "index"
    build_index(small_run, gallery, index_dir, index_type="HNSW8,Flat", embedder=embedder)
    shutil.copyfile(photos["cat"][2], gallery / "cat" / photos["cat"][2].name)
    kept = build_index(small_run, gallery, index_dir, index_type="HNSW8,Flat", embedder=embedder)
    assert kept.factory == "HNSW8,Flat" and not any("replaced" in note for note in kept.notes)
    shutil.copyfile(photos["cat"][3], gallery / "cat" / photos["cat"][3].name)
    report = build_index(small_run, gallery, index_dir, embedder=embedder)
    assert report.factory == "Flat"
    assert (
        "index type HNSW8,Flat (chosen with --index-type) replaced by Flat, the choice for 8 images: "
        "pass --index-type HNSW8,Flat to keep it"
    ) in report.notes
    again = build_index(small_run, gallery, index_dir, embedder=embedder)  # size-based from now on
    assert not any("replaced" in note for note in again.notes)


def test_a_damaged_index_is_rebuilt_keeping_the_ids_its_manifest_still_holds(
    photos, small_run, embedder, tmp_path
):
    gallery = make_gallery(tmp_path / "gallery", photos, per_label=3)
    index_dir = tmp_path / "index"
    build_index(small_run, gallery, index_dir, embedder=embedder, drawings=["nothing-yet"])
    remove_files(index_dir, [gallery / "fish"], delete_files=True)  # their ids are never given again
    ids = ids_by_path(index_dir)
    next_id = GalleryIndex.load(index_dir).meta["next_id"]
    assert next_id > max(ids.values()) + 1
    version = current_version(index_dir)
    (version / "vectors.npy").write_bytes(b"\x93NUMPY damaged")
    lines = (version / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    lost = json.loads(lines[0])["path"]
    (version / "manifest.jsonl").write_text("\n".join(["{not json", *lines[1:]]) + "\n", encoding="utf-8")
    shutil.copyfile(photos["fish"][5], gallery / "cup" / "new.jpg")

    report = build_index(small_run, gallery, index_dir, embedder=embedder)
    assert "the previous index cannot be used" in report.full_rebuild_reason
    assert f"the ids of {len(ids) - 1} files read from its manifest are kept" in report.full_rebuild_reason
    rebuilt = ids_by_path(index_dir)
    assert {path: rebuilt[path] for path in ids if path != lost} == {
        p: i for p, i in ids.items() if p != lost
    }
    # The file whose manifest line was damaged, and the new one, get ids never given before.
    assert min(rebuilt[lost], rebuilt["cup/new.jpg"]) >= next_id and rebuilt[lost] != rebuilt["cup/new.jpg"]
    assert GalleryIndex.load(index_dir).meta["drawings"] == ["nothing-yet"]  # as the index was built


def damage_and_rebuild(small_run, gallery, index_dir, embedder, manifest=None, meta=None, ids=None):
    """Write the given bytes over the current version's files (its vectors always), then rebuild."""
    version = current_version(index_dir)
    (version / "vectors.npy").write_bytes(b"\x93NUMPY damaged")
    for name, data in (("manifest.jsonl", manifest), ("index.json", meta), ("ids.npy", ids)):
        if data is not None:
            (version / name).write_bytes(data)
    return build_index(small_run, gallery, index_dir, embedder=embedder)


def test_a_damaged_index_gives_no_id_twice_whatever_of_it_survives(photos, small_run, embedder, tmp_path):
    gallery = make_gallery(tmp_path / "gallery", photos, per_label=2)
    index_dir = tmp_path / "index"
    build_index(small_run, gallery, index_dir, embedder=embedder, drawings=["fish"])
    remove_files(index_dir, [gallery / "fish"], delete_files=True)  # the last ids: never given again
    version = current_version(index_dir)
    given = json.loads((version / "index.json").read_text())["next_id"]
    lines = (version / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    saved = tmp_path / "saved"
    shutil.copytree(index_dir, saved)
    (gallery / "fish").mkdir(exist_ok=True)
    shutil.copyfile(photos["fish"][6], gallery / "fish" / "new.jpg")

    def rebuilt(**damage) -> dict[str, int]:
        shutil.rmtree(index_dir)
        shutil.copytree(saved, index_dir)
        report = damage_and_rebuild(small_run, gallery, index_dir, embedder, **damage)
        assert "the previous index cannot be used" in report.full_rebuild_reason
        index = GalleryIndex.load(index_dir)
        assert index.meta["drawings"] == (["fish"] if damage.get("meta") is None else [])
        lost_patterns = any("--drawings patterns could not be read" in note for note in report.notes)
        assert lost_patterns == (damage.get("meta") is not None)  # said, not silently photos
        return {entry.path: entry.id for entry in index.entries.values()}

    # Only the metadata survives (the manifest is garbage): the next id and the patterns do.
    assert rebuilt(manifest=b"\x00\xff garbage")["fish/new.jpg"] >= given
    # Lines of the wrong types are left out, not fatal: a list for a path, -1 (FAISS's "none"), True.
    odd = [{**json.loads(lines[0]), "path": ["cat", "x.jpg"]}, {**json.loads(lines[1]), "id": -1}]
    odd.append({**json.loads(lines[2]), "id": True})
    manifest = "\n".join([*map(json.dumps, odd), *lines[3:]]).encode()
    ids = rebuilt(manifest=manifest)
    assert len(set(ids.values())) == len(ids) and min(ids.values()) >= 0 and ids["fish/new.jpg"] >= given
    # index.json and the last manifest line lost: the id list still holds every id then in use, so
    # the lost line's file and the new one get ids above them (the removed files' ids are not known).
    in_use = [json.loads(line)["id"] for line in lines]
    ids = rebuilt(manifest="\n".join(lines[:-1]).encode(), meta=b"{")
    lost = json.loads(lines[-1])["path"]
    assert min(ids[lost], ids["fish/new.jpg"]) > max(in_use) and len(set(ids.values())) == len(ids)


@pytest.mark.parametrize(
    "meta",
    [b"[]", b'{"format_version": 1, "gallery_root": "/x", "model": {"fingerprint": "f", "run_dir": "r"}}'],
)
def test_index_metadata_of_the_wrong_shape_is_damage_not_a_crash(meta, photos, small_run, embedder, tmp_path):
    gallery = make_gallery(tmp_path / "gallery", photos)
    index_dir = tmp_path / "index"
    build_index(small_run, gallery, index_dir, embedder=embedder)
    (current_version(index_dir) / "index.json").write_bytes(meta)
    with pytest.raises(IndexFormatError, match="its metadata"):
        GalleryIndex.load(index_dir)
    report = build_index(small_run, gallery, index_dir, embedder=embedder)
    assert "the previous index cannot be used" in report.full_rebuild_reason
    assert indexed(index_dir) == {f"{label}/{path.name}" for label in LABELS for path in photos[label][:2]}


def test_a_move_on_an_hnsw_index_leaves_the_graph_alone(photos, small_run, embedder, tmp_path, monkeypatch):
    gallery = make_gallery(tmp_path / "gallery", photos, per_label=4)
    index_dir = tmp_path / "index"
    build_index(small_run, gallery, index_dir, index_type="HNSW8,Flat", embedder=embedder)
    before = GalleryIndex.load(index_dir)
    old = {entry.path: entry.id for entry in before.entries.values()}
    refreshes = []
    real_refresh = GalleryIndex.refresh
    monkeypatch.setattr(
        GalleryIndex,
        "refresh",
        lambda self, *a, **k: refreshes.append(real_refresh(self, *a, **k)) or refreshes[-1],
    )
    moved = sorted(p for p in old if p.startswith("cat/"))[0]
    (gallery / moved).rename(gallery / "cup" / "was_a_cat.jpg")
    report = build_index(small_run, gallery, index_dir, index_type="HNSW8,Flat", embedder=embedder)
    assert (report.moved, report.embedded, report.factory) == (1, 0, "HNSW8,Flat"), report.summary()
    assert not any("rebuilt" in how for how in refreshes), refreshes
    after = GalleryIndex.load(index_dir)
    entry = after.entries[old[moved]]
    assert (entry.path, entry.label) == ("cup/was_a_cat.jpg", "cup")
    _, found = after.search(before.vectors[before.rows[old[moved]]][None], 1, labels=["cup"])
    assert found[0][0] == old[moved]  # the label filter follows the move


def test_names_with_unicode_line_separators_load_and_keep_their_ids(photos, small_run, embedder, tmp_path):
    """U+2028, U+2029 and U+0085 (a cp1252 "…" decoded wrongly) are line breaks to str.splitlines(),
    but not to the manifest's JSON lines: an index of such names loads, and a rebuild embeds nothing.
    Before, the build said it succeeded, every load said the index was damaged, and every rebuild
    embedded everything again under new ids."""
    gallery = make_gallery(tmp_path / "gallery", photos)
    shutil.copyfile(photos["cat"][3], gallery / "cat" / "line\u2028sep.jpg")
    shutil.copyfile(photos["cup"][3], gallery / "cup" / "trip\u0085 2019.jpg")
    (gallery / "fish").rename(gallery / "fish\u2029tank")
    index_dir = tmp_path / "index"
    build_index(small_run, gallery, index_dir, embedder=embedder)
    ids = ids_by_path(index_dir)
    assert {"cat/line\u2028sep.jpg", "cup/trip\u0085 2019.jpg"} <= ids.keys() and len(ids) == 8
    assert sum(path.startswith("fish\u2029tank/") for path in ids) == 2
    again = build_index(small_run, gallery, index_dir, embedder=embedder)
    assert again.embedded == 0 and again.unchanged == 8 and not again.full_rebuild_reason
    assert ids_by_path(index_dir) == ids


def test_a_running_engine_sees_an_index_deleted_and_built_again(photos, small_run, embedder, tmp_path):
    """A new index in the same folder starts at v000001 again: reload (the page's) must still see it."""
    from sbir_engine.engine import SketchEngine

    index_dir = tmp_path / "index"
    build_index(small_run, make_gallery(tmp_path / "old", photos, 1), index_dir, embedder=embedder)
    engine = SketchEngine.load(index_dir)
    assert engine.reload() is False and len(engine.index) == len(LABELS)
    shutil.rmtree(index_dir)
    build_index(small_run, make_gallery(tmp_path / "new", photos, 3), index_dir, embedder=embedder)
    assert current_version(index_dir).name == "v000001"
    assert engine.reload() is True and len(engine.index) == 3 * len(LABELS)
    assert engine.reload() is False


def test_a_class_folder_linked_into_the_gallery_is_the_class(photos, small_run, embedder, tmp_path):
    """A class folder moved to another disk and linked back stays indexed under its class (it was
    dropped as "removed", without a word); a second link to it and a link loop are not walked again;
    `index add` of a linked folder inside the gallery indexes it where it is, under its label (it was
    copied flat into the gallery root, without one)."""
    gallery = make_gallery(tmp_path / "gallery", photos)
    index_dir = tmp_path / "index"
    build_index(small_run, gallery, index_dir, embedder=embedder)
    before = ids_by_path(index_dir)
    (gallery / "cat").rename(tmp_path / "cat-elsewhere")
    (gallery / "cat").symlink_to(tmp_path / "cat-elsewhere", target_is_directory=True)
    (gallery / "cup" / "again").symlink_to(tmp_path / "cat-elsewhere", target_is_directory=True)
    (gallery / "fish" / "loop").symlink_to("..", target_is_directory=True)
    report = build_index(small_run, gallery, index_dir, embedder=embedder)
    assert (report.removed, report.added, report.unchanged) == (0, 0, len(before)), report.summary()
    assert ids_by_path(index_dir) == before

    (tmp_path / "teapots").mkdir()
    shutil.copyfile(photos["cup"][4], tmp_path / "teapots" / "pot.jpg")
    (gallery / "teapot").symlink_to(tmp_path / "teapots", target_is_directory=True)
    added = add_files(index_dir, [gallery / "teapot"], embedder=embedder)
    assert added.added == 1 and not added.failed and not (gallery / "pot.jpg").exists()
    assert {e.path: e.label for e in GalleryIndex.load(index_dir).entries.values()}[
        "teapot/pot.jpg"
    ] == "teapot"
    # --delete-files removes a linked folder's images from the index, and leaves the files where they
    # really are (as it leaves a linked file's target): they are another folder's, not the gallery's.
    removed = remove_files(index_dir, [gallery / "teapot"], delete_files=True)
    assert removed.removed == 1 and removed.failed == [
        (str(gallery / "teapot" / "pot.jpg"), build.LINKED_FOLDER)
    ]
    assert (tmp_path / "teapots" / "pot.jpg").is_file() and "teapot/pot.jpg" not in indexed(index_dir)


def test_an_index_that_cannot_be_written_is_said_before_anything_is_embedded(
    photos, small_run, embedder, tmp_path, monkeypatch
):
    """A read-only index folder (or one whose parent is, where its writer's lock goes) is one line
    before any embedding; before, a PermissionError traceback came after the whole embedding pass.
    Made read-only with chattr +i: the tests run as root, whom permissions do not stop."""
    import subprocess

    gallery = make_gallery(tmp_path / "gallery", photos)
    index_dir = tmp_path / "parent" / "index"
    build_index(small_run, gallery, index_dir, embedder=embedder)
    shutil.copyfile(photos["cat"][5], gallery / "cat" / "new.jpg")
    runner = CliRunner()
    embedded = []
    monkeypatch.setattr(update, "embed_images", lambda *a, **k: embedded.append(1) or iter(()))
    for frozen, reason in (
        (index_dir, "the index folder cannot be written"),
        (index_dir.parent, "writer's lock"),
    ):
        if frozen == index_dir.parent:
            (index_dir.parent / ".index.lock").unlink()
        if subprocess.run(["chattr", "+i", str(frozen)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here (a file system without it, or not root)")
        try:
            args = [
                "build-index",
                "--model",
                str(small_run),
                "--gallery",
                str(gallery),
                "--out",
                str(index_dir),
            ]
            for command in (
                args,
                ["index", "remove", str(gallery / "cat" / "new.jpg"), "-i", str(index_dir)],
            ):
                result = runner.invoke(app, command)
                assert result.exit_code == 1 and reason in one_line_error(result), result.output
        finally:
            subprocess.run(["chattr", "-i", str(frozen)], check=True)
    assert not embedded and "cat/new.jpg" not in indexed(index_dir)


def test_a_file_edited_while_the_build_reads_it_keeps_no_vector_of_other_content(
    photos, small_run, embedder, tmp_path, monkeypatch
):
    """A file's hash is taken in the scan and its pixels read later: edited in between, its vector
    was the new content's under the old content's hash, and copies (or an undo) reused that wrong
    vector until --full. Now such a file is reported and left as it was; the next build indexes it."""
    from sbir_engine.gallery import file_sha256

    gallery = make_gallery(tmp_path / "gallery", photos)
    index_dir = tmp_path / "index"
    build_index(small_run, gallery, index_dir, embedder=embedder)
    old = {e.path: e for e in GalleryIndex.load(index_dir).entries.values()}
    edited, new = gallery / "cat" / photos["cat"][0].name, gallery / "cat" / "new.jpg"
    shutil.copyfile(photos["fish"][6], edited)  # edited before the build: to be embedded again
    shutil.copyfile(photos["cup"][6], new)
    real = update.embed_images

    def edit_then_embed(*args, **kwargs):  # the user saves both files again while the build runs
        shutil.copyfile(photos["fish"][7], edited)
        shutil.copyfile(photos["cup"][7], new)
        return real(*args, **kwargs)

    monkeypatch.setattr(update, "embed_images", edit_then_embed)
    report = build_index(small_run, gallery, index_dir, embedder=embedder)
    assert dict(report.failed) == {
        "cat/" + photos["cat"][0].name: update.CHANGED_DURING_BUILD,
        "cat/new.jpg": update.CHANGED_DURING_BUILD,
    }
    assert (report.added, report.updated) == (0, 0)
    entries = {e.path: e for e in GalleryIndex.load(index_dir).entries.values()}
    assert entries == old  # the edited file keeps its entry as it was indexed: hash and vector agree
    monkeypatch.setattr(update, "embed_images", real)
    again = build_index(small_run, gallery, index_dir, embedder=embedder)
    assert (again.added, again.updated, again.failed) == (1, 1, [])
    index = GalleryIndex.load(index_dir)
    by_path = {e.path: e for e in index.entries.values()}
    for path, source in ((edited, photos["fish"][7]), (new, photos["cup"][7])):
        entry = by_path[path.relative_to(gallery).as_posix()]
        assert entry.sha256 == file_sha256(source)
        stored = index.stored([entry.id])[0][0]
        assert float(stored @ embedder(embedder.load_image(source)[None])[0][0]) > 0.999


def test_index_add_after_the_gallery_moved_says_to_build_from_where_it_is(
    photos, small_run, embedder, tmp_path
):
    """`index add` copies outside files into the index's gallery folder: after the gallery moved, it made
    the old path again to hold the file, which the next build-index from the new place then dropped."""
    gallery = make_gallery(tmp_path / "gallery", photos)
    index_dir = tmp_path / "index"
    build_index(small_run, gallery, index_dir, embedder=embedder)
    gallery.rename(tmp_path / "moved")
    with pytest.raises(
        FileNotFoundError, match=r"gallery folder .*gallery is not there \(moved or renamed\?\)"
    ):
        add_files(index_dir, [photos["cat"][5]], label="cat", embedder=embedder)
    assert not gallery.exists()
    build_index(small_run, tmp_path / "moved", index_dir, embedder=embedder)
    assert add_files(index_dir, [photos["cat"][5]], label="cat", embedder=embedder).added == 1
    assert f"cat/{photos['cat'][5].name}" in indexed(index_dir)
