"""``evaluate``, where every quality figure of the README comes from, on the small real model and photos."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sbir_engine.build import build_index
from sbir_engine.cli import app
from sbir_engine.engine import SketchEngine
from sbir_engine.evaluate import evaluate, evaluate_canvas, format_report
from sbir_engine.metrics import compare_queries, format_comparison, paired_queries

GROUPS = "bitmap by Google's recognized flag"


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory, small_run, small_dataset):
    out = tmp_path_factory.mktemp("photo-index") / "index"
    build_index(small_run, small_dataset / "photo" / "test", out)
    return out


@pytest.fixture(scope="module")
def evaluation(photo_index, small_dataset, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    queries = small_dataset / "sketch" / "test"
    return evaluate(photo_index, queries, out=out, canvas_strokes=shared_data / "quickdraw-strokes"), out


def test_every_query_ranks_the_whole_gallery(evaluation, small_dataset, small_metrics):
    report, out = evaluation
    sketches = sorted((small_dataset / "sketch" / "test").rglob("*.png"))
    photos = [p for p in (small_dataset / "photo" / "test").rglob("*") if p.is_file()]
    assert report["queries"] == len(sketches) and report["skipped"] == []
    assert report["retrieval"]["gallery"] == report["embedding_retrieval"]["gallery"] == len(photos)
    # The same model on the same test sketches as `train` measured (serving runtime vs Keras: ±1 sketch).
    top1, top3 = report["classification"]["top1"], report["classification"]["top3"]
    assert top1 == pytest.approx(small_metrics["sketch"]["test_top1"], abs=1.01 / len(sketches))
    assert top1 <= top3 <= 1
    # Retrieval far above what a random order gives: the expected share of the query's class.
    labels = [p.parent.name for p in photos]
    chance = np.mean([labels.count(p.parent.name) / len(labels) for p in sketches])
    assert report["retrieval"]["mAP@all"] > 2 * chance
    assert report["embedding_retrieval"]["mAP@all"] > 1.5 * chance
    saved = json.loads((out / "evaluation.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert saved["classification"] == report["classification"]
    # Each headline figure sits inside its 95 % interval, which a few dozen queries leave wide.
    for numbers, name in [
        (report["classification"], "top1"), (report["classification"], "top3"),
        (report["retrieval"], "mAP@all"), (report["retrieval"], "P@10"),
        (report["embedding_retrieval"], "mAP@all"),
    ]:  # fmt: skip
        low, high = numbers[f"{name}_ci95"]
        assert 0 <= low <= numbers[name] <= high <= 1 and high - low > 0.02, name
        assert f"{numbers[name]:.3f} [{low:.3f}, {high:.3f}]" in format_report(report)
    assert (out / "confusion.png").stat().st_size > 0


def test_top3_misses_are_listed_and_drawn(evaluation):
    report, out = evaluation
    misses = report["top3_misses"]
    assert len(misses) == round((1 - report["classification"]["top3"]) * report["queries"])
    for miss in misses:
        said = [label for label, _ in miss["top3"]]
        assert miss["label"] not in said and miss["label_probability"] <= miss["top3"][-1][1]
        assert f"not in top 3: {miss['path']}" in format_report(report)
    sheet = out / "top3-misses.png"
    assert (Image.open(sheet).width == 120 * len(misses)) if misses else not sheet.exists()


def unseen_drawings(shared_data, small_dataset, splits: tuple[str, ...]) -> tuple[int, int]:
    """How many stroke records are drawings of these splits, and how many of them Google did not
    recognise (the prepared files are named by the drawing's index, line i = bitmap i)."""
    count, not_recognised = 0, 0
    for strokes in sorted((shared_data / "quickdraw-strokes").glob("*.ndjson")):
        label = strokes.stem
        files = [f for split in splits for f in (small_dataset / "sketch" / split).glob(f"{label}/*.png")]
        indices = {int(re.search(r"(\d+)$", f.stem).group(1)) for f in files}
        records = [json.loads(line) for line in strokes.read_text().splitlines() if line.strip()]
        for i, record in enumerate(records):
            if i in indices:
                count += 1
                not_recognised += not record["recognized"]
    return count, not_recognised


def test_canvas_check_pairs_each_unseen_drawing_with_its_bitmap(
    evaluation, photo_index, small_dataset, shared_data
):
    """Canvases are scored on the drawings the model has not trained on, split by Google's flag:
    the validation and test splits', or the test split's alone for a refit head (`train --refit`
    trains the served head on validation too)."""
    report, _ = evaluation
    canvas = report["canvas"]
    unseen, not_recognised = unseen_drawings(shared_data, small_dataset, ("val", "test"))
    assert canvas["drawings"] == unseen > 0
    assert not_recognised > 0  # some held-out airplanes and cats were not recognised by Google
    groups = canvas[GROUPS]
    assert groups["recognized"]["drawings"] + groups["not recognized"]["drawings"] == unseen
    assert groups["not recognized"]["drawings"] == not_recognised
    for numbers in groups.values():
        if numbers["drawings"]:
            assert 0 <= numbers["top1"] <= numbers["top3"] <= 1
    renderings = [name for name in canvas if name.startswith("canvas ")]
    assert len(renderings) == 4 and all(0 <= canvas[name] <= 1 for name in renderings)
    text = format_report(report)
    assert "bitmaps recognized" in text and text.count("canvas check") == 5
    # The drawings a canvas loses and its bitmap wins are named (as in the prepared dataset), with
    # what each losing style answered: at least as many as the top-1 difference of each style.
    misses = canvas["misses"]
    for name in renderings:
        listed = sum(name in miss["wrong"] for miss in misses)
        assert listed >= round(canvas["drawings"] * (canvas["bitmap"] - canvas[name]))
    for miss in misses:
        label = miss["drawing"].rsplit("_", 1)[0]
        bitmap = f"{label}/{miss['drawing']}.png"
        assert any((small_dataset / "sketch" / part / bitmap).is_file() for part in ("val", "test"))
        assert miss["wrong"] and all(said != label for said in miss["wrong"].values())
    assert text.count("canvas miss:") == len(misses)
    # Paired counts: what a style alone loses (its listed misses) less what it alone wins is its gap.
    for name in renderings:
        paired = canvas["paired"][name]
        assert paired["lost"] == sum(name in miss["wrong"] for miss in misses)
        assert paired["lost"] - paired["won"] == round(canvas["drawings"] * (canvas["bitmap"] - canvas[name]))
        assert 0 < paired["mcnemar_p"] <= 1
        assert f"{paired['lost']} lost, {paired['won']} won, McNemar p = {paired['mcnemar_p']:.2f}" in text

    engine = SketchEngine.load(photo_index)
    engine.embedder.config = engine.config.replace(refit=True)
    strokes, tarball = shared_data / "quickdraw-strokes", engine.config.quickdraw_tarball
    refit = evaluate_canvas(engine.embedder, strokes, tarball)
    assert 0 < refit["drawings"] == unseen_drawings(shared_data, small_dataset, ("test",))[0] < unseen
    # A change can be chosen on the validation drawings alone, whatever the head trained on.
    validation = evaluate_canvas(engine.embedder, strokes, tarball, splits=("val",))
    assert validation["drawings"] == unseen - refit["drawings"]


def test_canvas_check_follows_the_dataset_split_not_the_training_seed(
    evaluation, photo_index, small_dataset, shared_data
):
    """`train --seed N` on a dataset split with another seed: the held-out drawings stay the dataset's."""
    engine = SketchEngine.load(photo_index)
    assert engine.config.data_seed == json.loads((small_dataset / "dataset.json").read_text())["seed"]
    engine.embedder.config = engine.config.replace(seed=engine.config.data_seed + 7)
    strokes, tarball = shared_data / "quickdraw-strokes", engine.config.quickdraw_tarball
    again = evaluate_canvas(engine.embedder, strokes, tarball)
    assert again == evaluation[0]["canvas"]


def test_two_evaluations_compare_query_by_query(evaluation, photo_index, small_dataset, tmp_path):
    report, out = evaluation
    ranks = [q["rank"] for q in report["per_query"]]
    assert len(ranks) == report["queries"] and min(ranks) == 1
    assert np.mean(np.array(ranks) <= 3) == pytest.approx(report["classification"]["top3"])
    # The same model without the class re-ranking: the same classes, the engine's ranking becomes
    # the 512-d one.
    plain = evaluate(photo_index, small_dataset / "sketch" / "test", rerank_weight=0.0)
    saved = json.loads((out / "evaluation.json").read_text())
    result = compare_queries(*paired_queries(saved, plain))
    assert result["queries"] == report["queries"]
    assert result["top-1"][2:] == (0, 0, 1.0) and result["top-3"][2:] == (0, 0, 1.0)
    assert plain["retrieval"]["mAP@all"] == pytest.approx(report["embedding_retrieval"]["mAP@all"])
    gain = report["embedding_retrieval"]["mAP@all"] - report["retrieval"]["mAP@all"]
    assert result["AP"][0] == pytest.approx(gain) and abs(gain) > 1e-4
    assert result["AP 512-d"] == pytest.approx((0.0, 0.0, 0.0))
    # Ranks worked out by hand: top-1 is lost on one query and won on two.
    records = [{"rank": r, "AP": 0.5, "AP 512-d": 0.5} for r in (1, 1, 2, 5)]
    other = [{"rank": r, "AP": 0.75, "AP 512-d": 0.5} for r in (1, 2, 1, 1)]
    hand = compare_queries(records, other)
    assert hand["top-1"][2:] == (1, 2, 1.0) and hand["top-3"][2:] == (0, 1, 1.0)
    assert hand["AP"] == pytest.approx((0.25, 0.25, 0.25))
    text = format_comparison("hand", hand)
    assert "only the baseline right   1, only the candidate   2  McNemar p = 1.000" in text
    # Queries pair up by their <class>/<image> name, wherever the query folder was.
    moved = [dict(q, path=str(Path("/elsewhere", *Path(q["path"]).parts[-2:]))) for q in plain["per_query"]]
    assert compare_queries(*paired_queries(saved, {"per_query": moved})) == result
    with pytest.raises(ValueError, match="share no query sketch"):
        paired_queries(saved, {"per_query": [dict(q, path="elsewhere.png") for q in saved["per_query"]]})


def test_evaluate_against_an_earlier_evaluation_and_over_several_pairs(
    evaluation, photo_index, small_dataset, tmp_path
):
    _, out = evaluation
    earlier = out / "evaluation.json"
    queries = str(small_dataset / "sketch" / "test")
    args = ["evaluate", "--index", str(photo_index), "--queries", queries]
    result = CliRunner().invoke(app, [*args, "--against", str(earlier)])
    assert result.exit_code == 0, result.output
    assert f"against {earlier} (the baseline)" in result.output
    assert "only the baseline right   0, only the candidate   0  McNemar p = 1.000" in result.output
    # A report without per-query records (an older sbir-engine) and a missing file: one line each.
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"queries": 3}))
    result = CliRunner().invoke(app, [*args, "--against", str(old)])
    assert result.exit_code == 1 and f"--against {old}: the baseline report has no per-query" in result.output
    result = CliRunner().invoke(app, [*args, "--against", str(tmp_path / "missing.json")])
    assert result.exit_code == 1 and "missing.json" in result.output and "Traceback" not in result.output
    # The script pools several pairs (here the same pair twice).
    script = Path(__file__).parents[1] / "scripts" / "compare_evaluations.py"
    pairs = ["--baseline", str(earlier), str(earlier), "--candidate", str(earlier), str(earlier)]
    printed = subprocess.run(
        [sys.executable, str(script), *pairs], capture_output=True, text=True, check=True
    )
    assert printed.stdout.count("McNemar p = 1.000") == 6 and "pooled over 2 pairs" in printed.stdout
