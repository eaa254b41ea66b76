"""Fine-tuning the top of the backbone on the fly (the --fine-tune path), on a few real images."""

import numpy as np

from sbir_engine.data import load_split
from sbir_engine.finetune import AugmentedImages, fine_tune
from sbir_engine.model import load_model


def test_fine_tune_moves_only_the_top_blocks(small_run, small_dataset, tmp_path):
    model = load_model(small_run)
    config = model.config.replace(batch_size=8)
    model.config = config
    samples = load_split(small_dataset, "train", ("sketch",))[::25][:16]
    before = {w.path: np.array(w) for w in model.classifier.weights}

    history = fine_tune(model, small_dataset, n_blocks=1, epochs=1, verbose=0, train_samples=samples)

    assert len(history["loss"]) == 1 and np.isfinite(history["loss"][0])
    changed = {
        path for path, value in before.items() if not np.array_equal(value, np.array(_weight(model, path)))
    }
    assert any("top_conv" in path for path in changed) and any("block20" in path for path in changed)
    assert not any("block0_" in path or "stem" in path for path in changed)  # lower blocks stay frozen
    assert not any("_bn/" in path and "moving" in path for path in changed)  # batch-norm statistics too
    assert model.backbone.trainable is False  # frozen again for the next head training
    model.save(tmp_path)
    assert load_model(tmp_path).fingerprint() == model.fingerprint()


def test_augmented_batches_are_images_and_one_hot_labels(small_run, small_dataset):
    model = load_model(small_run)
    samples = load_split(small_dataset, "train", ("sketch", "photo"))[:40]
    images, labels = AugmentedImages(samples, model, augment=True)[0]
    assert images.shape == (model.config.batch_size, 180, 180, 3) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 255 + 1e-3  # interpolation rounding
    np.testing.assert_array_equal(labels.sum(axis=1), 1)


def _weight(model, path):
    return next(w for w in model.classifier.weights if w.path == path)
