#!/usr/bin/env python
"""sbir-engine benchmark: one command, one table, one JSON file. See BENCHMARKS.md.

    python scripts/bench.py --out bench.json                 # the full run (≈8 min on 2 quiet cores)
    python scripts/bench.py --quick --out /tmp/smoke.json    # a smoke run (a few minutes)
    KERAS_BACKEND=jax python scripts/bench.py --gpu-parts --out gpu.json   # no TensorFlow, no FAISS

Parts (each backbone × runtime; ratios are measured in the same run, rounds interleaved):

* query   end to end, file → ``SketchEngine.query`` result (k = 10) against a 10k gallery: the real
          sketch file is decoded and normalised, the real network runs, FAISS searches and the engine
          re-ranks; only the gallery's 10k vectors are synthetic (real embeddings of real photos,
          duplicated with small noise) so that 10k images need not be embedded.
* embed   gallery embedding img/s at the best batch size: the bare runtime on decoded arrays vs the
          full ``embed_images`` pipeline (thread-pool decode of real image files + network).
* train   head training on cached features: a ``contrastive_trainer`` fit exactly as ``train()``
          compiles it, on random features of the real dataset's size; median epoch time × 100.
* faiss   synthetic clustered 512-d vectors at each size: the index type ``choose_factory`` picks,
          build + tune time, memory, QPS and recall@10 against exact search on held-out queries.

Every reported figure is a median over ``--rounds`` (≥ 5 unless ``--quick``) rounds.
ResNet-50 runs with random weights (``weights=None``) by default: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

LITE2, RESNET = "efficientnet-lite2", "resnet50"
ALIASES = {"lite2": LITE2, LITE2: LITE2, "resnet50": RESNET, "resnet": RESNET}
SHORT = {LITE2: "lite2", RESNET: "resnet50"}
GALLERY_SIZE = 10_000
K = 10


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def train_row(part: str, name: str, t: dict) -> tuple[str, ...]:
    """A table row for a head-training measurement."""
    return (
        part,
        name,
        f"{t['rows']:,} rows × {t['feature_dim']}",
        "",
        "",
        f"{t['samples_per_s']:,.0f} rows/s",
        "",
        f"{t['median_epoch_s']:.2f} s/epoch → 100 epochs ≈ {t['estimated_100_epochs_s']:.0f} s",
    )


def median(values) -> float:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else float("nan")


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def load_average() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    return {
        "cpu": cpu_name(),
        "cores": cores,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": load_average(),
    }


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextmanager
def quiet_progress():
    """embed_images draws a rich progress bar: keep it off the benchmark's output while timing."""
    import rich

    console = rich.get_console()
    before = console.quiet
    console.quiet = True
    try:
        yield
    finally:
        console.quiet = before


def rotated(items: list, by: int) -> list:
    """Round r starts with a different runtime, so no runtime always runs first (or last)."""
    by %= max(len(items), 1)
    return items[by:] + items[:by]


# ----------------------------------------------------------------------------------------------
# Real inputs: photo files and canvas-like sketch files
# ----------------------------------------------------------------------------------------------


def photo_files(count: int, work: Path) -> tuple[list[Path], str]:
    """``count`` real photos spread over the classes; synthetic JPEGs where the real data is absent."""
    from sbir_engine.config import SHARED_DATA

    root = SHARED_DATA / "photos"
    if root.is_dir():
        per_class = [
            sorted(p for p in d.iterdir() if p.is_file()) for d in sorted(root.iterdir()) if d.is_dir()
        ]
        picked: list[Path] = []
        i = 0
        while len(picked) < count and any(i < len(files) for files in per_class):
            picked.extend(files[i] for files in per_class if i < len(files))
            i += 1
        if len(picked) >= count:
            return picked[:count], f"real photos from {root}"
    from PIL import Image

    folder = work / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        path = folder / f"photo_{i:05d}.jpg"
        if not path.exists():
            base = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
            image = Image.fromarray(base).resize((320, 240), Image.Resampling.BICUBIC)
            image.save(path, quality=90)
        out.append(path)
    return out, "synthetic JPEGs (real photos not found)"


def sketch_files(count: int, work: Path) -> tuple[list[Path], str]:
    """Query files as the drawing page sends them: 400 px RGBA canvases of real QuickDraw strokes."""
    from sbir_engine.config import SHARED_DATA
    from sbir_engine.data import read_stroke_records
    from sbir_engine.images import render_strokes

    folder = work / "queries"
    folder.mkdir(parents=True, exist_ok=True)
    strokes_dir = SHARED_DATA / "quickdraw-strokes"
    drawings = []
    if strokes_dir.is_dir():
        per_class = []
        for path in sorted(strokes_dir.glob("*.ndjson")):
            per_class.append([record["drawing"] for record in read_stroke_records(strokes_dir, path.stem)])
        i = 0
        while len(drawings) < count and any(i < len(d) for d in per_class):
            drawings.extend(d[i] for d in per_class if i < len(d))
            i += 1
    source = f"real QuickDraw strokes from {strokes_dir}"
    if len(drawings) < count:
        rng = np.random.default_rng(0)
        while len(drawings) < count:
            drawings.append([rng.uniform(0, 255, (2, 12)).round().tolist() for _ in range(3)])
        source = "random strokes (real strokes not found)"
    out = []
    for i, drawing in enumerate(drawings[:count]):
        path = folder / f"sketch_{i:04d}.png"
        render_strokes(drawing, size=400, stroke_width=6, rgba=True).save(path)
        out.append(path)
    return out, source


# ----------------------------------------------------------------------------------------------
# Model, runtimes and the 10k gallery
# ----------------------------------------------------------------------------------------------


def make_run(backbone: str, work: Path, weights) -> Path:
    import keras

    from sbir_engine.config import EngineConfig
    from sbir_engine.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model(EngineConfig(backbone=backbone), weights)
    run_dir = work / f"run-{SHORT[backbone]}"
    model.save(run_dir)
    return run_dir


def keras_reference(model, images: np.ndarray, chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    from sbir_engine.model import l2_normalize

    serving = model.serving_model()
    emb, prob = [], []
    for start in range(0, len(images), chunk):
        e, p = serving(images[start : start + chunk], training=False)
        emb.append(np.asarray(e))
        prob.append(np.asarray(p))
    return l2_normalize(np.concatenate(emb)), np.concatenate(prob)


def build_gallery(run_dir: Path, model, embedder, photos: list[Path], work: Path, size: int) -> Path:
    """A 10k-entry index whose vectors are real photo embeddings, duplicated with small noise."""
    from sbir_engine.index import Entry, GalleryIndex, new_meta
    from sbir_engine.model import l2_normalize

    choice = faiss_choice()
    arrays = np.stack([embedder.load_image(p) for p in photos])
    base, probabilities = embedder(arrays)
    rng = np.random.default_rng(0)
    pick = rng.integers(0, len(base), size)
    noise = rng.standard_normal((size, base.shape[1])).astype(np.float32) * (0.3 / np.sqrt(base.shape[1]))
    vectors = l2_normalize(base[pick] + noise)
    probs = probabilities[pick].astype(np.float32)
    ids = np.arange(size, dtype=np.int64)
    labels = [photos[i].parent.name for i in pick]
    # Distinct contents: the engine answers with each content once, so equal hashes would make every
    # entry a copy of the first and each query search ever deeper for k distinct results.
    entries = [Entry(int(i), f"synthetic/{i:06d}.jpg", labels[i], f"{i:064x}", 0) for i in ids]
    dim = vectors.shape[1]
    factory = choice.choose_factory(size, dim)
    index = choice.make_faiss_index(vectors, ids, factory)
    name, value, recall = choice.tune_search(index, vectors, factory)
    index_dir = work / f"index-{SHORT[model.config.backbone]}"
    gallery_root = work / "gallery"
    gallery_root.mkdir(exist_ok=True)
    meta = new_meta(dim, factory, model.fingerprint(), run_dir, index_dir, gallery_root)
    meta.update(
        count=size,
        search_parameter=[name, value],
        recall_at_10=recall,
        next_id=size,
        classes=list(model.config.classes),
    )
    GalleryIndex(index, vectors, probs, ids, entries, meta).save(index_dir)
    return index_dir


def load_embedders(model, run_dir: Path, runtimes: list[str]) -> tuple[dict, dict]:
    """Each runtime twice: cold (export + check + warm-up) and warm (from the exported file)."""
    from sbir_engine.embed import Embedder

    embedders, info = {}, {}
    for kind in runtimes:
        try:
            t0 = time.perf_counter()
            Embedder(model, runtime=kind, run_dir=run_dir)
            t1 = time.perf_counter()
            embedder = Embedder(model, runtime=kind, run_dir=run_dir)
            t2 = time.perf_counter()
        except Exception as err:
            info[kind] = {"available": False, "reason": f"{type(err).__name__}: {err}"}
            log(f"  {kind}: unavailable ({err})")
            continue
        embedders[kind] = embedder
        info[kind] = {"available": True, "first_load_s": t1 - t0, "load_s": t2 - t1}
        what = " (export + check + warm-up)" if kind in ("tflite", "onnx") else ""
        log(f"  {kind}: first load {t1 - t0:.1f} s{what}, then {t2 - t1:.2f} s")
    return embedders, info


# ----------------------------------------------------------------------------------------------
# Query latency
# ----------------------------------------------------------------------------------------------


def bench_queries(engines: dict, queries: list[Path], rounds: int, faiss_threads: dict | None = None) -> dict:
    """p50/p95 of ``engine.query(file)`` per engine; ``faiss_threads`` pins FAISS's OpenMP threads for
    some of them (the same engine measured with single-threaded search, as a variant)."""
    import faiss

    default_threads = faiss.omp_get_max_threads()
    faiss_threads = faiss_threads or {}
    for engine in engines.values():  # warm-up: first queries touch caches and lazy state
        for path in queries[:3]:
            engine.query(path, k=K)
    per = {k: {"p50": [], "p95": [], "decode": [], "network": [], "search": [], "all": []} for k in engines}
    answers: dict[str, list] = {k: [] for k in engines}
    for r in range(rounds):
        for kind in rotated(list(engines), r):
            engine = engines[kind]
            faiss.omp_set_num_threads(faiss_threads.get(kind) or default_threads)
            latencies, parts = [], {"decode": [], "network": [], "search": []}
            for path in queries:
                t0 = time.perf_counter()
                result = engine.query(path, k=K)
                latencies.append((time.perf_counter() - t0) * 1e3)
                for name in parts:
                    parts[name].append(result.timings_ms.get(name, float("nan")))
                if r == 0:
                    answers[kind].append([n.id for n in result.neighbours])
            per[kind]["p50"].append(percentile(latencies, 50))
            per[kind]["p95"].append(percentile(latencies, 95))
            per[kind]["all"].extend(latencies)
            for name, values in parts.items():
                per[kind][name].append(percentile(values, 50))
    faiss.omp_set_num_threads(default_threads)
    out = {}
    reference = answers.get("tf")
    for kind, values in per.items():
        out[kind] = {
            "p50_ms": median(values["p50"]),
            "p95_ms": median(values["p95"]),
            "p50_ms_per_round": values["p50"],
            "p95_ms_per_round": values["p95"],
            "pooled_p50_ms": percentile(values["all"], 50),
            "pooled_p95_ms": percentile(values["all"], 95),
            "decode_p50_ms": median(values["decode"]),
            "network_p50_ms": median(values["network"]),
            "search_p50_ms": median(values["search"]),
            "queries_per_round": len(queries),
            "faiss_threads": faiss_threads.get(kind) or default_threads,
        }
        if reference is not None:
            same = [
                len(set(a) & set(b)) / max(len(b), 1) for a, b in zip(answers[kind], reference, strict=True)
            ]
            out[kind]["top10_overlap_with_tf"] = float(np.mean(same))
    return out


# ----------------------------------------------------------------------------------------------
# Gallery embedding throughput
# ----------------------------------------------------------------------------------------------


def bare_rate(embedder, arrays: np.ndarray, batch: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(arrays), batch):
        embedder(arrays[start : start + batch])
    return len(arrays) / (time.perf_counter() - t0)


def pipeline_rate(embedder, paths: list[Path], batch: int) -> float:
    from sbir_engine.embed import embed_images

    with quiet_progress():
        t0 = time.perf_counter()
        result = embed_images(embedder, paths, batch)
        seconds = time.perf_counter() - t0
    if len(result.paths) != len(paths):
        raise RuntimeError(
            f"embed_images embedded {len(result.paths)} of {len(paths)} files: {result.failures[:3]}"
        )
    return len(paths) / seconds


def starvation(embedder, paths: list[Path], batch: int) -> dict:
    """Where the pipeline's time goes: waiting for decoded batches vs running the network."""
    from sbir_engine.embed import decode_workers, read_batches

    waiting = running = 0.0
    t0 = time.perf_counter()
    batches = read_batches(paths, embedder.load_image, batch, decode_workers())
    while True:
        t = time.perf_counter()
        try:
            item = next(batches)
        except StopIteration:
            break
        waiting += time.perf_counter() - t
        t = time.perf_counter()
        embedder(item.arrays)
        running += time.perf_counter() - t
    total = time.perf_counter() - t0
    return {"wait_share": waiting / total, "network_share": running / total, "seconds": total}


def bench_embedding(
    embedders: dict,
    photos: list[Path],
    batch_sizes: list[int],
    rounds: int,
    sweep_images: int,
    seconds: float,
) -> dict:
    """Per runtime: a batch-size sweep (bare), then ``rounds`` interleaved rounds of bare vs pipeline
    at the best batch size over the same images; each measurement lasts about ``seconds``."""
    first = next(iter(embedders.values()))
    arrays = np.stack([first.load_image(p) for p in photos])
    out = {}
    for kind, embedder in embedders.items():
        sweep = {}
        for batch in batch_sizes:
            n = max(batch * 2, -(-sweep_images // batch) * batch)
            data = np.resize(arrays, (n, *arrays.shape[1:]))
            embedder(data[:batch])  # warm-up (a TFLite interpreter resizes to a new batch size once)
            sweep[batch] = bare_rate(embedder, data, batch)
        best = max(sweep, key=sweep.get)
        # Images per round: about `seconds` of work at the sweep's rate, whole batches, ≥ 2 batches.
        n = int(min(len(photos), max(2 * best, sweep[best] * seconds)) // best * best) or len(photos)
        out[kind] = {"sweep_img_s": {str(b): r for b, r in sweep.items()}, "best_batch": best, "images": n}
        rates = {b: round(r, 1) for b, r in sweep.items()}
        log(f"  {kind}: bare img/s by batch {rates} → batch {best}, {n} images a round")
    for r in range(rounds):
        for kind in rotated(list(embedders), r):
            embedder, batch, n = embedders[kind], out[kind]["best_batch"], out[kind]["images"]
            bare = bare_rate(embedder, arrays[:n], batch)
            pipe = pipeline_rate(embedder, photos[:n], batch)
            out[kind].setdefault("bare", []).append(bare)
            out[kind].setdefault("pipeline", []).append(pipe)
            out[kind].setdefault("ratio", []).append(pipe / bare)
    for kind, values in out.items():
        values["bare_img_s"] = median(values["bare"])
        values["pipeline_img_s"] = median(values["pipeline"])
        values["ratio_pipeline_over_bare"] = median(values["ratio"])
        n = values["images"]
        values["starvation"] = starvation(embedders[kind], photos[:n], values["best_batch"])
    return out


# ----------------------------------------------------------------------------------------------
# Head training on cached features (backend-neutral)
# ----------------------------------------------------------------------------------------------


def dataset_size() -> tuple[int, int, str]:
    """Rows of cached training features and validation rows of the default dataset (13 classes)."""
    try:
        from sbir_engine.config import SHARED_DATA, EngineConfig
        from sbir_engine.data import obtain_quickdraw, read_quickdraw_bitmaps, split_indices

        config = EngineConfig()
        tarball = obtain_quickdraw(config.quickdraw_tarball)
        sketch_train = sketch_val = photo_train = photo_val = 0
        for label in config.classes:
            split = split_indices(
                len(read_quickdraw_bitmaps(tarball, label)), config.split, f"0:sketch:{label}"
            )
            sketch_train += len(split["train"])
            sketch_val += len(split["val"])
            n = len([p for p in (SHARED_DATA / "photos" / label).iterdir() if p.is_file()])
            split = split_indices(n, config.split, f"0:photo:{label}")
            photo_train += min(len(split["train"]), config.max_photos_per_class)
            photo_val += len(split["val"])
        rows = sketch_train * config.sketch_views + photo_train * config.photo_views
        return rows, sketch_val + photo_val, "counted from the real data (default config)"
    except Exception as err:  # no real data here (a GPU machine): the counts measured on it
        return 13_806, 1_289, f"default dataset's counts (real data not found: {type(err).__name__})"


def bench_training(
    backbone: str, epochs: int, rows: int, val_rows: int, batch_size: int | None = None
) -> dict:
    import keras

    from sbir_engine.config import EngineConfig
    from sbir_engine.model import build_model
    from sbir_engine.train import compiled_trainer, domain_balanced_weights

    config = EngineConfig(backbone=backbone)
    batch_size = batch_size or config.batch_size
    keras.utils.set_random_seed(0)
    model = build_model(config, weights=None)  # only the head trains; the backbone's weights do not matter
    dim = model.head.input.shape[-1]
    rng = np.random.default_rng(0)
    n_classes = len(config.classes)
    x = np.maximum(rng.standard_normal((rows, dim)).astype(np.float32), 0)  # pooled ReLU-like features
    y = keras.utils.to_categorical(rng.integers(0, n_classes, rows), n_classes)
    xv = np.maximum(rng.standard_normal((val_rows, dim)).astype(np.float32), 0)
    yv = keras.utils.to_categorical(rng.integers(0, n_classes, val_rows), n_classes)
    domains = ["sketch" if i % 3 else "photo" for i in range(rows)]
    trainer = compiled_trainer(model)
    times: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t0)

    t0 = time.perf_counter()
    trainer.fit(
        x,
        {"probabilities": y, "unit_embedding": y},
        sample_weight=domain_balanced_weights(domains),
        validation_data=(xv, {"probabilities": yv, "unit_embedding": yv}),
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        verbose=0,
        callbacks=[EpochTimer()],
    )
    total = time.perf_counter() - t0
    steady = times[1:] if len(times) > 1 else times  # the first epoch compiles
    epoch_s = median(steady)
    return {
        "what": "contrastive_trainer fit as train() compiles it, random features of the real dataset's size",
        "rows": rows,
        "val_rows": val_rows,
        "feature_dim": int(dim),
        "batch_size": batch_size,
        "epochs_timed": epochs,
        "epoch_s": times,
        "median_epoch_s": epoch_s,
        "first_epoch_s": times[0] if times else float("nan"),
        "fit_s": total,
        "estimated_100_epochs_s": times[0] + 99 * epoch_s if epochs < 100 else total,
        "measured_100_epochs": epochs >= 100,
        "samples_per_s": rows / epoch_s,
    }


# ----------------------------------------------------------------------------------------------
# FAISS at scale
# ----------------------------------------------------------------------------------------------


def synthetic_vectors(
    n: int,
    dim: int = 512,
    seed: int = 0,
    clusters: int = 256,
    latent: int = 32,
    decay: float = 0.75,
    spread: float = 0.6,
    noise: float = 0.05,
) -> np.ndarray:
    """Unit vectors shaped like the engine's embeddings (L2-normalised ReLU outputs).

    Cluster centres and offsets live in a ``latent``-d space with a decaying spectrum, are mixed
    into 512-d and rectified, plus a little positive noise. At 657 points this gives 50/80/90/95 %
    of the variance in 5/29/68/130 components and a median nearest-neighbour cosine of 0.87; the
    real photo embeddings of a small trained model gave 3/31/82/137 and 0.90 (isotropic Gaussian
    vectors, by contrast, make every neighbour nearly equidistant, a worst case no embedding is).
    """
    rng = np.random.default_rng(seed)
    scale = np.arange(1, latent + 1, dtype=np.float32) ** -decay
    centres = rng.standard_normal((clusters, latent)).astype(np.float32) * scale
    mix = rng.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    level = noise * float(scale.sum()) / np.sqrt(latent)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        z = centres[rng.integers(0, clusters, m)]
        z = z + spread * rng.standard_normal((m, latent)).astype(np.float32) * scale
        block = np.maximum(z @ mix, 0) + level * np.abs(rng.standard_normal((m, dim)).astype(np.float32))
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def faiss_choice():
    """The module that chooses, builds and tunes FAISS indexes: ``sbir_engine.index_factory``, or
    ``sbir_engine.index`` on commits from before the split (the benchmark also measures those)."""
    try:
        from sbir_engine import index_factory
    except ImportError:
        from sbir_engine import index as index_factory
    return index_factory


def heldout_queries(vectors: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    idx = faiss_choice()
    if hasattr(idx, "probe_queries"):  # the definition tune_search uses, with another seed
        return idx.probe_queries(vectors, count, seed=seed)
    rng = np.random.default_rng(seed)
    base = vectors[rng.choice(len(vectors), count, replace=False)]
    moved = base + rng.standard_normal(base.shape).astype(np.float32) * (0.2 / np.sqrt(base.shape[1]))
    return moved / np.linalg.norm(moved, axis=1, keepdims=True)


def faiss_data(n: int, dim: int, queries: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Gallery vectors and held-out queries: scripts/scale_check.py's mixture when it is there (the
    same data as the index's own scale check), else :func:`synthetic_vectors`."""
    try:
        sys.path.insert(0, str(ROOT / "scripts"))
        from scale_check import mixture
    except Exception:
        mixture = None
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    if mixture is not None:
        clusters = max(50, n // 500)
        gallery = mixture(n, dim, seed=1, n_clusters=clusters)
        fresh = mixture(queries, dim, seed=2, n_clusters=clusters)
        return gallery, fresh, "scale_check.mixture (fresh draws from the gallery's mixture as queries)"
    vectors = synthetic_vectors(n, dim)
    return (
        vectors,
        heldout_queries(vectors, queries),
        "bench.synthetic_vectors (moved gallery points as queries)",
    )


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(
        np.mean(
            [len(set(a[a >= 0].tolist()) & set(b.tolist())) / k for a, b in zip(found, truth, strict=True)]
        )
    )


def search_rates(search, queries: np.ndarray, rounds: int, singles: int) -> dict:
    """Batch QPS (all queries in one call) and single-query latency, medians over rounds."""
    qps, p50 = [], []
    search(queries[:8])
    for _ in range(rounds):
        t0 = time.perf_counter()
        search(queries)
        qps.append(len(queries) / (time.perf_counter() - t0))
        lat = []
        for q in queries[:singles]:
            t = time.perf_counter()
            search(q[None])
            lat.append((time.perf_counter() - t) * 1e3)
        p50.append(percentile(lat, 50))
    return {"qps": median(qps), "qps_per_round": qps, "single_p50_ms": median(p50)}


def bench_faiss(sizes: list[int], rounds: int, queries_count: int, dim: int = 512) -> dict:
    import faiss

    from sbir_engine.index import GalleryIndex

    idx = faiss_choice()
    out = {}
    for n in sizes:
        log(f"faiss: {n:,} synthetic vectors")
        vectors, queries, data = faiss_data(n, dim, min(queries_count, n))
        ids = np.arange(n, dtype=np.int64)
        # As a build chooses: the first candidate that fits the memory budget, the next one when
        # tuning cannot reach the target recall (index_factory.factory_candidates; choose_factory = first).
        if hasattr(idx, "factory_candidates"):
            candidates = idx.factory_candidates(n, dim)
        else:
            candidates = [idx.choose_factory(n, dim)]
        attempts = []
        for factory in candidates:
            index = None  # free the previous attempt's index first
            rss0 = rss_bytes()
            t0 = time.perf_counter()
            index = idx.make_faiss_index(vectors, ids, factory)
            build_s = time.perf_counter() - t0
            rss_build = rss_bytes() - rss0
            t0 = time.perf_counter()
            name, value, tuned_recall = idx.tune_search(index, vectors, factory)
            tune_s = time.perf_counter() - t0
            attempts.append(
                {"factory": factory, "build_s": build_s, "tune_s": tune_s, "recall": tuned_recall}
            )
            if tuned_recall >= getattr(idx, "TARGET_RECALL", 0.95):
                break
        estimate = idx.estimate_memory(factory, n, dim) if hasattr(idx, "estimate_memory") else None
        gallery = GalleryIndex(
            index, vectors, np.zeros((n, 1), np.float32), ids, [], {"dim": dim, "factory": factory}
        )
        exact = faiss.IndexFlatIP(dim)
        exact.add(vectors)
        _, truth = exact.search(queries, K)
        _, found = gallery.search(queries, K)
        singles = min(100, len(queries), max(10, int(2e6 / n)))  # one-by-one exact at 1M: 10
        exact_queries = queries[: max(50, min(len(queries), int(2e8 / n)))]  # exact at 1M: fewer queries
        ann = search_rates(lambda q, g=gallery: g.search(q, K), queries, rounds, singles)
        flat = search_rates(
            lambda q, e=exact: e.search(q, K), exact_queries, rounds, min(singles, len(exact_queries))
        )
        out[str(n)] = {
            "factory": factory,
            "search_parameter": [name, value],
            "build_s": build_s,
            "tune_s": tune_s,
            "tuned_recall_at_10": tuned_recall,
            "recall_at_10": recall(found, truth),
            "rss_growth_bytes": rss_build,
            "estimated_memory_bytes": estimate,
            "vectors_bytes": int(vectors.nbytes),
            "ann": ann,
            "exact": flat,
            "qps_ratio": ann["qps"] / flat["qps"],
            "single_query_speedup": flat["single_p50_ms"] / ann["single_p50_ms"],
            "queries": len(queries),
            "data": data,
            "attempts": attempts,
            "build_and_tune_s_all_attempts": sum(a["build_s"] + a["tune_s"] for a in attempts),
        }
        log(
            f"  {factory} {name}={value}: build {build_s:.1f} s, "
            f"recall@10 {out[str(n)]['recall_at_10']:.3f}, "
            f"{ann['qps']:.0f} QPS vs exact {flat['qps']:.0f}"
        )
        del gallery, index, exact, vectors
    return out


# ----------------------------------------------------------------------------------------------
# The CPU run
# ----------------------------------------------------------------------------------------------


def bench_backbone(backbone: str, args, work: Path) -> dict:
    from sbir_engine.engine import SketchEngine
    from sbir_engine.index import GalleryIndex
    from sbir_engine.model import load_model
    from sbir_engine.runtime import AUTO_ORDER, available_runtimes

    weights = "imagenet" if backbone == LITE2 else args.resnet_weights
    log(f"{backbone}: building the model (weights={weights})")
    run_dir = make_run(backbone, work, weights)
    model = load_model(run_dir)
    result: dict = {"weights": weights or "none (random init: speed does not depend on weights)"}
    runtimes = [r for r in args.runtimes if r in available_runtimes()]
    result["runtimes_missing"] = [r for r in args.runtimes if r not in runtimes]
    embedders, result["load"] = load_embedders(model, run_dir, runtimes)

    photos, result["photos"] = photo_files(args.embed_images, work)
    queries, result["queries"] = sketch_files(args.queries, work)
    check_images = np.stack([model_input for model_input in _check_inputs(embedders, photos, queries)])
    want_e, want_p = keras_reference(model, check_images)
    for kind, embedder in embedders.items():
        got = [embedder(check_images[i : i + 8]) for i in range(0, len(check_images), 8)]
        one = [embedder(check_images[i : i + 1]) for i in range(min(8, len(check_images)))]
        e = np.concatenate([g[0] for g in got])
        p = np.concatenate([g[1] for g in got])
        diff_e = max(
            float(np.abs(e - want_e).max()),
            max(float(np.abs(o[0] - want_e[i]).max()) for i, o in enumerate(one)),
        )
        diff_p = max(
            float(np.abs(p - want_p).max()),
            max(float(np.abs(o[1] - want_p[i]).max()) for i, o in enumerate(one)),
        )
        result["load"][kind].update(max_abs_diff_embedding=diff_e, max_abs_diff_probabilities=diff_p)
        result["load"][kind]["matches_keras_1e-4"] = bool(diff_e <= 1e-4 and diff_p <= 1e-4)

    if "query" not in args.skip:
        log(f"{backbone}: {GALLERY_SIZE:,}-entry gallery index")
        reference = embedders.get("tf") or next(iter(embedders.values()))
        index_dir = build_gallery(run_dir, model, reference, photos[:128], work, GALLERY_SIZE)
        engines = {
            kind: SketchEngine(index_dir, GalleryIndex.load(index_dir), e) for kind, e in embedders.items()
        }
        # The auto runtime again with single-threaded FAISS: OpenMP threads spinning beside the
        # network's threads on 2 cores slow a one-query search (and the network); see BENCHMARKS.md.
        auto = next((k for k in AUTO_ORDER.get(backbone, ()) if k in engines), None)
        threads = {}
        if auto and args.faiss_variant:
            engines[f"{auto}+faiss1t"] = engines[auto]
            threads[f"{auto}+faiss1t"] = 1
        log(
            f"{backbone}: query latency, {args.rounds} rounds × {len(queries)} queries "
            f"× {len(engines)} runtimes"
        )
        result["query"] = bench_queries(engines, queries, args.rounds, threads)
        result["query_factory"] = engines[next(iter(engines))].index.factory
        for kind, values in result["query"].items():
            log(f"  {kind}: p50 {values['p50_ms']:.1f} ms, p95 {values['p95_ms']:.1f} ms")
        del engines
        ranked = sorted(embedders, key=lambda k: result["query"][k]["p50_ms"])
        usable = [k for k in ranked if result["load"][k].get("matches_keras_1e-4")]
        result["fastest_query_runtime"] = usable[0] if usable else None

    if "embed" not in args.skip:
        log(f"{backbone}: embedding throughput (up to {len(photos)} image files)")
        result["embed"] = bench_embedding(
            embedders, photos, args.batch_sizes, args.rounds, args.sweep_images, args.embed_seconds
        )
        for kind, values in result["embed"].items():
            log(
                f"  {kind}: batch {values['best_batch']}: bare {values['bare_img_s']:.1f} img/s, "
                f"pipeline {values['pipeline_img_s']:.1f} img/s ({values['ratio_pipeline_over_bare']:.2f}×)"
            )
    result["auto_order"] = list(AUTO_ORDER.get(backbone, ()))
    result["auto_picks"] = next((k for k in AUTO_ORDER.get(backbone, ()) if k in embedders), "tf")
    del embedders
    return result


def _check_inputs(embedders: dict, photos: list[Path], queries: list[Path]):
    embedder = next(iter(embedders.values()))
    for path in photos[:24]:
        yield embedder.load_image(path)
    for path in queries[:8]:
        yield embedder.load_sketch(path)


# ----------------------------------------------------------------------------------------------
# --gpu-parts: backend-neutral Keras only (no TensorFlow, no FAISS imports)
# ----------------------------------------------------------------------------------------------


class _Blocker:
    """A meta-path finder that refuses to import the named top-level packages."""

    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"{name} is not imported by --gpu-parts", name=name)
        return None


def gpu_parts(args, work: Path) -> dict:
    import keras

    # Nothing here may import FAISS, nor TensorFlow unless it is Keras' backend: block them, so an
    # import fails loudly (Keras itself only probes for TensorFlow, as set_random_seed does).
    blocked = {"faiss"} | ({"tensorflow"} if keras.backend.backend() != "tensorflow" else set())
    sys.meta_path.insert(0, _Blocker(blocked - set(sys.modules)))

    from sbir_engine.embed import Embedder
    from sbir_engine.model import build_model

    backend = keras.backend.backend()
    devices = []
    if backend == "jax":
        import jax

        devices = [str(d) for d in jax.devices()]
    elif backend == "torch":
        import torch

        devices = [torch.cuda.get_device_name(0)] if torch.cuda.is_available() else ["cpu"]
    out: dict = {"keras_backend": backend, "devices": devices, "backbones": {}}
    rows, val_rows, source = dataset_size()
    photos, photo_source = photo_files(args.embed_images, work)
    from sbir_engine.config import EngineConfig

    for backbone in args.backbones:
        log(f"{backbone} on {backend} {devices}")
        keras.utils.set_random_seed(0)
        model = build_model(EngineConfig(backbone=backbone), weights=None)  # speed does not depend on weights
        part: dict = {"weights": "none (random init)", "photos": photo_source}
        embedder = Embedder(model, runtime="keras")
        part["embed"] = bench_embedding(
            {"keras": embedder}, photos, args.batch_sizes, args.rounds, args.sweep_images, args.embed_seconds
        )
        v = part["embed"]["keras"]
        log(
            f"  embed: batch {v['best_batch']}: bare {v['bare_img_s']:.1f}, "
            f"pipeline {v['pipeline_img_s']:.1f} img/s"
        )
        part["train"] = bench_training(backbone, args.train_epochs, rows, val_rows)
        part["train"]["dataset"] = source
        log(
            f"  train: {part['train']['median_epoch_s']:.2f} s/epoch "
            f"→ ~{part['train']['estimated_100_epochs_s']:.0f} s"
        )
        out["backbones"][backbone] = part
    out["tensorflow_imported"] = "tensorflow" in sys.modules
    out["faiss_imported"] = "faiss" in sys.modules
    return out


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def fmt(value, spec: str = ".1f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return f"{value:{spec}}{unit}"


def table(results: dict) -> str:
    """One markdown table: part | subject | variant | p50 | p95 | rate | ratio | detail."""
    rows = [("part", "subject", "variant", "p50", "p95", "rate", "ratio", "detail")]
    for backbone, b in results.get("backbones", {}).items():
        name = SHORT.get(backbone, backbone)
        base_q = b.get("query", {}).get("tf", {}).get("p50_ms")
        for kind, q in b.get("query", {}).items():
            load = b["load"][kind.split("+")[0]]
            speed = f"{base_q / q['p50_ms']:.2f}× tf" if base_q and kind != "tf" else ""
            detail = (
                f"decode {fmt(q['decode_p50_ms'])} + net {fmt(q['network_p50_ms'])} + search "
                f"{fmt(q['search_p50_ms'])} ms; max|Δ| {load['max_abs_diff_embedding']:.1e}/"
                f"{load['max_abs_diff_probabilities']:.1e}; load {load['load_s']:.2f} s"
            )
            rows.append(
                (
                    "query",
                    name,
                    kind,
                    fmt(q["p50_ms"], unit=" ms"),
                    fmt(q["p95_ms"], unit=" ms"),
                    "",
                    speed,
                    detail,
                )
            )
        for kind, e in b.get("embed", {}).items():
            rows.append(
                (
                    "embed",
                    name,
                    f"{kind} @{e['best_batch']}",
                    "",
                    "",
                    f"{e['pipeline_img_s']:.1f} img/s",
                    f"{e['ratio_pipeline_over_bare']:.2f}× bare",
                    f"bare {e['bare_img_s']:.1f} img/s; "
                    f"pipeline waits {e['starvation']['wait_share']:.0%} of its time",
                )
            )
        if "train" in b:
            rows.append(train_row("train", name, b["train"]))
        if b.get("fastest_query_runtime"):
            rows.append(
                (
                    "winner",
                    name,
                    b["fastest_query_runtime"],
                    "",
                    "",
                    "",
                    "",
                    f"auto picks {b['auto_picks']} (order {', '.join(b['auto_order'])})",
                )
            )
    for n, f in results.get("faiss", {}).items():
        name, value = f["search_parameter"]
        variant = f["factory"] + (f" {name}={value}" if name else "")
        memory = f["estimated_memory_bytes"] or f["rss_growth_bytes"]
        rows.append(
            (
                "faiss",
                f"{int(n):,}",
                variant,
                fmt(f["ann"]["single_p50_ms"], ".2f", " ms"),
                "",
                f"{f['ann']['qps']:,.0f} QPS",
                f"{f['qps_ratio']:.1f}× exact",
                f"recall@10 {f['recall_at_10']:.3f}; exact {f['exact']['qps']:,.0f} QPS; "
                f"one query at a time {f['single_query_speedup']:.1f}× exact; "
                f"build {f['build_s']:.1f} s "
                f"+ tune {f['tune_s']:.1f} s; ~{memory / 2**20:,.0f} MiB",
            )
        )
    for backbone, g in results.get("gpu_parts", {}).get("backbones", {}).items():
        name = SHORT.get(backbone, backbone)
        e = g["embed"]["keras"]
        rows.append(
            (
                "gpu embed",
                name,
                f"keras @{e['best_batch']}",
                "",
                "",
                f"{e['pipeline_img_s']:.1f} img/s",
                f"{e['ratio_pipeline_over_bare']:.2f}× bare",
                f"bare {e['bare_img_s']:.1f} img/s",
            )
        )
        rows.append(train_row("gpu train", name, g["train"]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench.json"), help="JSON results (default bench.json)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: small sizes, 3 rounds")
    parser.add_argument(
        "--gpu-parts",
        action="store_true",
        help="only embedding and training throughput, backend-neutral Keras (no TF, no FAISS)",
    )
    parser.add_argument("--backbones", default="lite2,resnet50", help="comma list: lite2, resnet50")
    parser.add_argument("--runtimes", default="tf,tflite,onnx", help="comma list of runtimes to measure")
    parser.add_argument("--rounds", type=int, help="rounds per measurement (median; default 5, quick 3)")
    parser.add_argument("--queries", type=int, help="query files per round (default 30, quick 10)")
    parser.add_argument(
        "--embed-images", type=int, help="image files per embedding round (default 128, quick 48)"
    )
    parser.add_argument(
        "--embed-seconds", type=float, help="seconds per embedding measurement (default 3, quick 1.5)"
    )
    parser.add_argument(
        "--sweep-images", type=int, help="images per batch-size trial (default 32, ≥ 2 batches)"
    )
    parser.add_argument(
        "--batch-sizes", help="batch sizes tried for embedding (default 1,8,16,32; gpu 32..512)"
    )
    parser.add_argument(
        "--train-epochs", type=int, help="epochs timed (default 6, quick 2; 100 times it all)"
    )
    parser.add_argument("--faiss-sizes", help="comma list (default 10000,100000,1000000; quick 10000)")
    parser.add_argument(
        "--faiss-queries", type=int, help="held-out queries per size (default 1000, quick 200)"
    )
    parser.add_argument(
        "--no-faiss-variant",
        dest="faiss_variant",
        action="store_false",
        help="do not also time the auto runtime's queries with single-threaded FAISS search",
    )
    parser.add_argument("--skip", default="", help="comma list of parts to skip: query, embed, train, faiss")
    parser.add_argument(
        "--resnet-weights",
        default=None,
        help="resnet50 weights: a notop .h5 path or 'imagenet' (default: random init)",
    )
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.backbones = [ALIASES[b.strip().lower()] for b in args.backbones.split(",") if b.strip()]
    args.runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    args.rounds = args.rounds or (3 if quick else 5)
    args.queries = args.queries or (10 if quick else 30)
    args.embed_images = args.embed_images or (48 if quick else 128)
    args.sweep_images = args.sweep_images or 32
    args.embed_seconds = args.embed_seconds or (1.5 if quick else 3.0)
    default_batches = "32,64,128,256,512" if args.gpu_parts else ("1,16,32" if quick else "1,8,16,32")
    args.batch_sizes = [int(b) for b in (args.batch_sizes or default_batches).split(",")]
    args.train_epochs = args.train_epochs or (2 if quick else 6)
    args.faiss_sizes = [
        int(float(s)) for s in (args.faiss_sizes or ("10000" if quick else "10000,100000,1000000")).split(",")
    ]
    args.faiss_queries = args.faiss_queries or (200 if quick else 1000)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.gpu_parts:
        args.embed_images = max(args.embed_images, 2 * max(args.batch_sizes))
        args.sweep_images = max(args.sweep_images, 2 * max(args.batch_sizes))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sbir-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    settings = {
        k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
    }
    results: dict = {
        "machine": machine_info(),
        "settings": settings,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        if args.gpu_parts:
            results["gpu_parts"] = gpu_parts(args, work)
        else:
            results["backbones"] = {}
            for backbone in args.backbones:
                if {"query", "embed"} <= args.skip:
                    results["backbones"][backbone] = {}
                    continue
                results["backbones"][backbone] = bench_backbone(backbone, args, work)
                results["backbones"][backbone]["load_average_after"] = load_average()
            if "train" not in args.skip:
                rows, val_rows, source = dataset_size()
                for backbone in args.backbones:
                    log(f"{backbone}: head training, {args.train_epochs} epochs on {rows:,} rows")
                    train = bench_training(backbone, args.train_epochs, rows, val_rows)
                    train["dataset"] = source
                    results["backbones"][backbone]["train"] = train
            if "faiss" not in args.skip:
                results["faiss"] = bench_faiss(args.faiss_sizes, args.rounds, args.faiss_queries)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_average_at_end"] = load_average()
    results["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(table(results))
    machine = results["machine"]
    print(
        f"\n{machine['cpu']}, {machine['cores']} cores; "
        f"load average {machine['load_average_at_start']} at start, "
        f"{machine['load_average_at_end']} at end; {results['seconds'] / 60:.1f} min; JSON: {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
