"""Fine-tuning the top of the backbone on the fly (the --fine-tune path), on a few real images."""

import numpy as np

from sbir_engine.data import load_split
from sbir_engine.finetune import AugmentedImages, fine_tune
from sbir_engine.images import load_rgb
from sbir_engine.model import load_model


def test_fine_tune_moves_only_the_top_blocks(small_run, small_dataset, tmp_path):
    model = load_model(small_run)
    config = model.config.replace(batch_size=8)
    model.config = config
    samples = load_split(small_dataset, "train", ("sketch",))[::25][:16]
    before = {w.path: np.array(w) for w in model.classifier.weights}

    history = fine_tune(model, small_dataset, n_blocks=1, epochs=1, verbose=0, train_samples=samples)

    assert len(history["loss"]) == 1 and np.isfinite(history["loss"][0])
    assert np.isfinite(history["unit_embedding_loss"][0])  # the contrastive term trains too
    changed = {
        path for path, value in before.items() if not np.array_equal(value, np.array(_weight(model, path)))
    }
    assert any("top_conv" in path for path in changed) and any("block20" in path for path in changed)
    assert not any("block0_" in path or "stem" in path for path in changed)  # lower blocks stay frozen
    assert not any("_bn/" in path and "moving" in path for path in changed)  # batch-norm statistics too
    assert model.backbone.trainable is False  # frozen again for the next head training
    model.save(tmp_path)
    assert load_model(tmp_path).fingerprint() == model.fingerprint()


def test_augmented_batches_mix_classes_and_weigh_the_domains_equally(small_run, small_dataset):
    model = load_model(small_run)
    samples = load_split(small_dataset, "train", ("sketch", "photo"))  # sorted by domain and class
    data = AugmentedImages(samples, model, augment=True)
    images, targets, weights = data[0]
    size = model.config.batch_size
    assert images.shape == (size, 180, 180, 3) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 255 + 1e-3  # interpolation rounding
    labels = targets["probabilities"]
    np.testing.assert_array_equal(labels, targets["unit_embedding"])
    np.testing.assert_array_equal(labels.sum(axis=1), 1)
    assert len(np.unique(labels.argmax(axis=1))) > 3  # shuffled from the first epoch
    # Each domain's weights add up to half the split, whatever its count.
    domains = np.array([s.domain for s in samples])
    sketches, photos = (domains == "sketch").sum(), (domains == "photo").sum()
    assert sketches != photos
    chosen = domains[data.order[:size]]
    expected = np.where(chosen == "sketch", len(samples) / (2 * sketches), len(samples) / (2 * photos))
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert {"sketch", "photo"} <= set(chosen)
    # Validation batches keep the split's order, unaugmented.
    plain, _, _ = AugmentedImages(samples, model, augment=False)[0]
    np.testing.assert_array_equal(plain[0], load_rgb(samples[0].path, 180))


def _weight(model, path):
    return next(w for w in model.classifier.weights if w.path == path)
