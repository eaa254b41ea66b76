"""Fast inference runtimes behind :class:`~sbir_engine.embed.Embedder`: images → (embedding, probabilities).

The Keras model (``RUN_DIR/model.keras``) stays the source of truth. A runtime other than plain
TensorFlow runs a file *derived* from it — ``serving-<fingerprint>.tflite`` or ``.onnx`` — that is

* keyed by the model fingerprint (:meth:`SketchModel.fingerprint`) and this module's export version,
  so a changed model never runs a stale export: a missing or stale file is rebuilt, others removed;
* checked against Keras on a probe batch before it is kept (max abs difference ≤ ``TOLERANCE`` on
  the L2-normalised embedding and on the probabilities), else the next runtime is used;
* written atomically (temporary file, then ``os.replace``), so a reader never sees half a file;
* stored in the run folder when the caller names it and it is writable, else in
  ``cache_dir()/runtimes`` (``$SBIR_ENGINE_CACHE``).

Runtimes (``runtime=``):

``tf``
    A ``tf.function`` with a fixed input signature ``[None, S, S, 3]``: traced once, no per-call graph.
``tflite``
    The LiteRT (TFLite) interpreter with XNNPACK, ``num_threads`` = usable cores; one interpreter
    for batch 1 (queries) and one resized to the last batch size seen (gallery embedding), at most
    ``TFLITE_MAX_BATCH``: a larger input runs in chunks of that size.
    ``ai_edge_litert`` is used when installed, else TensorFlow's built-in ``tf.lite.Interpreter``.
``onnx``
    ONNX Runtime (CPU) over a ``tf2onnx`` export; needs ``onnxruntime`` and ``tf2onnx``.
``keras``
    The Keras serving model's ``predict_on_batch``: backend-neutral (TensorFlow, JAX), slowest here.
``auto``
    The fastest runtime measured by ``scripts/bench.py`` for the backbone (``AUTO_ORDER``, see
    BENCHMARKS.md), falling back along the list when one is not installed or fails its check.

``$SBIR_ENGINE_RUNTIME`` sets the default for every ``Embedder`` that does not pass one.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .backbones import cache_dir
from .model import SketchModel, l2_normalize

RUNTIMES: tuple[str, ...] = ("tf", "tflite", "onnx", "keras")
# Fastest first, per backbone, from scripts/bench.py (query latency at batch 1 on 2 cores, then
# gallery throughput); see BENCHMARKS.md. 'tf' is always last: it needs nothing extra.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "efficientnet-lite2": ("tflite", "onnx", "tf"),
    "resnet50": ("tflite", "onnx", "tf"),
}
ENV_RUNTIME = "SBIR_ENGINE_RUNTIME"
# Bumped whenever the export recipe changes what a derived file holds.
EXPORT_VERSION = 1
TOLERANCE = 1e-4
OUTPUTS = ("embedding", "probabilities")
SUFFIXES = {"tflite": ".tflite", "onnx": ".onnx"}
CACHE_KEEP = 6  # exports kept per kind in the user cache (the most recently used)
# The largest batch a TFLite interpreter is sized for (the gallery's default batch): its tensors take
# ~8 MiB an image and stay allocated, so one call with thousands of images would hold gigabytes for good.
TFLITE_MAX_BATCH = 32

log = logging.getLogger(__name__)


class RuntimeUnavailable(RuntimeError):
    """A runtime that cannot be used here (package missing, conversion failed, outputs differ)."""


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def available_runtimes() -> list[str]:
    """The runtimes whose packages import here (a conversion can still fail for a given model)."""
    found = ["tf"]
    for kind in ("tflite", "onnx"):
        try:
            _require(kind)
            found.append(kind)
        except RuntimeUnavailable:
            pass
    return [*found, "keras"]


def resolve_order(runtime: str | None, backbone: str) -> tuple[str, ...]:
    runtime = (runtime or os.environ.get(ENV_RUNTIME) or "auto").lower()
    if runtime == "auto":
        return AUTO_ORDER.get(backbone, ("tf",))
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose auto or one of {', '.join(RUNTIMES)}")
    return (runtime,)


# ----------------------------------------------------------------------------------------------
# The runtimes: each is a callable float32 (n, S, S, 3) → (raw embeddings (n, D), probabilities (n, C))
# ----------------------------------------------------------------------------------------------


class Runtime:
    name = "?"
    path: Path | None = None

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def warm_up(self, image_size: int) -> None:
        self(np.full((1, image_size, image_size, 3), 255.0, np.float32))


_FORWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _serving_function(model: SketchModel):
    """The serving model as a ``tf.function`` with one fixed signature and named outputs.

    One per classifier (traced once, shared by the tf runtime, the exports and their checks); it
    reads the model's variables, so it follows weight changes as the Keras model does.
    """
    import tensorflow as tf

    cached = _FORWARDS.get(model.classifier)
    if cached is not None:
        return cached
    serving = model.serving_model()
    size = model.config.image_size

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="image")])
    def forward(image):
        embedding, probabilities = serving(image, training=False)
        return {"embedding": embedding, "probabilities": probabilities}

    _FORWARDS[model.classifier] = forward, serving
    return forward, serving


class TFRuntime(Runtime):
    name = "tf"

    def __init__(self, model: SketchModel):
        self._forward, self._serving = _serving_function(model)

    def __call__(self, images):
        out = self._forward(np.asarray(images, dtype=np.float32))
        return out["embedding"].numpy(), out["probabilities"].numpy()


class KerasRuntime(Runtime):
    """The serving model's compiled ``predict_on_batch``: backend-neutral (runs on JAX too), for
    ``scripts/bench.py --gpu-parts`` and as a reference; not in any ``auto`` order."""

    name = "keras"

    def __init__(self, model: SketchModel):
        self._serving = model.serving_model()

    def __call__(self, images):
        embedding, probabilities = self._serving.predict_on_batch(np.asarray(images, dtype=np.float32))
        return np.asarray(embedding), np.asarray(probabilities)


def _litert_interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter warns that it moved to ai_edge_litert
            import tensorflow as tf

            return tf.lite.Interpreter
    except (ImportError, AttributeError):
        return None


class TFLiteRuntime(Runtime):
    """A LiteRT interpreter per batch shape in use; calls are serialised (an interpreter is not reentrant)."""

    name = "tflite"

    def __init__(self, path: Path, num_threads: int | None = None):
        interpreter_class = _litert_interpreter_class()
        if interpreter_class is None:
            raise RuntimeUnavailable("neither ai_edge_litert nor tf.lite.Interpreter is available")
        self.path = Path(path)
        self._content = self.path.read_bytes()
        self._threads = num_threads or default_threads()
        self._class = interpreter_class
        self._lock = threading.Lock()
        self._single = self._make(1)  # queries
        self._batched = None  # gallery batches: resized when the batch size changes
        self._batched_size = 0

    def _make(self, batch: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            interpreter = self._class(model_content=self._content, num_threads=self._threads)
        (inp,) = interpreter.get_input_details()
        if int(inp["shape"][0]) != batch:
            interpreter.resize_tensor_input(inp["index"], [batch, *inp["shape"][1:]], strict=False)
        interpreter.allocate_tensors()
        # Outputs by name (their order in the flatbuffer is not guaranteed) through the one signature.
        (key,) = interpreter.get_signature_list()
        details = interpreter.get_signature_runner(key).get_output_details()
        if set(OUTPUTS) - set(details):
            raise RuntimeUnavailable(f"{self.path} has outputs {sorted(details)}, not {list(OUTPUTS)}")
        return interpreter, inp["index"], [details[name]["index"] for name in OUTPUTS]

    def __call__(self, images):
        images = np.ascontiguousarray(images, dtype=np.float32)
        n = len(images)
        if n > TFLITE_MAX_BATCH:  # in chunks: the interpreter is never resized beyond TFLITE_MAX_BATCH
            parts = [self(images[i : i + TFLITE_MAX_BATCH]) for i in range(0, n, TFLITE_MAX_BATCH)]
            return np.concatenate([e for e, _ in parts]), np.concatenate([p for _, p in parts])
        with self._lock:
            if n == 1:
                interpreter, inp, outs = self._single
            else:
                if self._batched is None or self._batched_size != n:
                    if self._batched is None:
                        self._batched = self._make(n)
                    else:
                        interpreter, inp, _ = self._batched
                        interpreter.resize_tensor_input(inp, list(images.shape), strict=False)
                        interpreter.allocate_tensors()
                    self._batched_size = n
                interpreter, inp, outs = self._batched
            interpreter.set_tensor(inp, images)
            interpreter.invoke()
            return interpreter.get_tensor(outs[0]), interpreter.get_tensor(outs[1])


class OnnxRuntime(Runtime):
    name = "onnx"

    def __init__(self, path: Path, num_threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise RuntimeUnavailable(f"onnxruntime is not installed ({err})") from err
        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or default_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        names = [o.name for o in self._session.get_outputs()]
        if set(OUTPUTS) - set(names):
            raise RuntimeUnavailable(f"{self.path} has outputs {names}, not {list(OUTPUTS)}")

    def __call__(self, images):
        # InferenceSession.run is thread-safe: no lock.
        embedding, probabilities = self._session.run(
            list(OUTPUTS), {self._input: np.ascontiguousarray(images, dtype=np.float32)}
        )
        return embedding, probabilities


# ----------------------------------------------------------------------------------------------
# Exported files: derived from the Keras model, keyed by its fingerprint
# ----------------------------------------------------------------------------------------------


def export_name(kind: str, fingerprint: str) -> str:
    return f"serving-{fingerprint[:20]}-v{EXPORT_VERSION}{SUFFIXES[kind]}"


_EXPORT_RE = re.compile(r"^serving-[0-9a-f]+-v\d+\.(tflite|onnx)$")


def export_folder(run_dir: Path | None) -> Path:
    """The run folder if given and writable, else the user cache (``cache_dir()/runtimes``)."""
    if run_dir is not None and Path(run_dir).is_dir() and os.access(run_dir, os.W_OK):
        return Path(run_dir)
    return cache_dir() / "runtimes"


def export_path(model: SketchModel, kind: str, run_dir: Path | None = None, fingerprint: str | None = None):
    return export_folder(run_dir) / export_name(kind, fingerprint or model.fingerprint())


def convert_tflite(model: SketchModel) -> bytes:
    """Keras → SavedModel (one endpoint, named outputs) → TFLite flatbuffer, float32, no quantisation."""
    import keras
    import tensorflow as tf

    forward, serving = _serving_function(model)
    with tempfile.TemporaryDirectory(prefix="sbir-tflite-") as tmp:
        archive = keras.export.ExportArchive()
        archive.track(serving)
        archive.add_endpoint("serve", forward)
        saved = os.path.join(tmp, "saved")
        archive.write_out(saved, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=["serve"])
        return converter.convert()


def convert_onnx(model: SketchModel, opset: int = 17) -> bytes:
    import tensorflow as tf

    try:
        import tf2onnx
    except Exception as err:
        raise RuntimeUnavailable(f"tf2onnx cannot be imported ({type(err).__name__}: {err})") from err
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    forward, _ = _serving_function(model)
    size = model.config.image_size
    proto, _ = tf2onnx.convert.from_function(
        forward, input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="image")], opset=opset
    )
    return proto.SerializeToString()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_stale(folder: Path, keep: Path, kind: str, run_dir: Path | None) -> None:
    """A run folder holds one model: drop exports of other fingerprints. The shared cache holds
    several models' exports: keep the ``CACHE_KEEP`` most recently used of each kind."""
    found = [p for p in folder.glob(f"serving-*{SUFFIXES[kind]}") if _EXPORT_RE.match(p.name) and p != keep]
    if run_dir is None or folder != Path(run_dir):
        found.sort(key=_mtime, reverse=True)
        found = found[CACHE_KEEP - 1 :]
    # Temporary files of conversions that were killed midway (older than an hour: not in progress).
    found += [p for p in folder.glob(f".serving-*{SUFFIXES[kind]}.*") if time.time() - _mtime(p) > 3600]
    for old in found:
        old.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def probe_images(image_size: int, n: int = 2, seed: int = 0) -> np.ndarray:
    """A deterministic probe batch: white paper with dark strokes and a noisy photo-like image."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (n, image_size, image_size, 3)).astype(np.float32)
    images[0] = 255.0
    images[0, image_size // 3 : image_size // 3 + 4, 10:-10] = 0.0
    images[0, 10:-10, image_size // 2 : image_size // 2 + 4] = 0.0
    return images


def max_differences(runtime: Callable, reference: Callable, images: np.ndarray) -> tuple[float, float]:
    """Max abs difference of the L2-normalised embeddings and of the probabilities."""
    e1, p1 = runtime(images)
    e0, p0 = reference(images)
    return (
        float(np.abs(l2_normalize(e1) - l2_normalize(e0)).max()),
        float(np.abs(np.asarray(p1) - np.asarray(p0)).max()),
    )


def _require(kind: str) -> None:
    """Raise :class:`RuntimeUnavailable` if the packages that ``kind`` needs do not import."""
    if kind == "tflite" and _litert_interpreter_class() is None:
        raise RuntimeUnavailable("no TFLite interpreter (install ai-edge-litert)")
    if kind == "onnx":
        try:
            import onnxruntime  # noqa: F401
            import tf2onnx  # noqa: F401
        except Exception as err:  # tf2onnx can fail at import on an incompatible TensorFlow
            reason = f"onnx needs onnxruntime and tf2onnx ({type(err).__name__}: {err})"
            raise RuntimeUnavailable(reason) from err


def _open(kind: str, path: Path, num_threads: int | None) -> Runtime:
    return TFLiteRuntime(path, num_threads) if kind == "tflite" else OnnxRuntime(path, num_threads)


def ensure_export(
    model: SketchModel,
    kind: str,
    run_dir: Path | None = None,
    fingerprint: str | None = None,
    num_threads: int | None = None,
    reference: Callable | None = None,
) -> Runtime:
    """The runtime over an up-to-date export, converting (and checking against Keras) if needed."""
    _require(kind)
    fingerprint = fingerprint or model.fingerprint()
    path = export_path(model, kind, run_dir, fingerprint)
    if path.is_file():
        try:
            opened = _open(kind, path, num_threads)
            os.utime(path)  # most recently used, for the cache's clean-up
            return opened
        except Exception as err:  # a damaged file: rebuild it below
            log.warning("rebuilding %s: %s: %s", path, type(err).__name__, err)
    started = time.perf_counter()
    try:
        data = convert_tflite(model) if kind == "tflite" else convert_onnx(model)
    except RuntimeUnavailable:
        raise
    except Exception as err:
        raise RuntimeUnavailable(f"{kind} conversion failed: {type(err).__name__}: {err}") from err
    # Check the conversion before it is kept: from a temporary file beside the final one.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".check")
    os.close(fd)
    try:
        Path(tmp).write_bytes(data)
        candidate = _open(kind, Path(tmp), num_threads)
        reference = reference or TFRuntime(model)
        emb, prob = max_differences(candidate, reference, probe_images(model.config.image_size))
    finally:
        Path(tmp).unlink(missing_ok=True)
    if not (emb <= TOLERANCE and prob <= TOLERANCE):
        raise RuntimeUnavailable(
            f"{kind} export differs from Keras by {emb:.2e} (embedding) / {prob:.2e} (probabilities) "
            f"> {TOLERANCE:g}"
        )
    _write_atomic(path, data)
    _remove_stale(path.parent, path, kind, run_dir)
    log.info("exported %s in %.1f s (max diff %.1e / %.1e)", path, time.perf_counter() - started, emb, prob)
    return _open(kind, path, num_threads)


def load_runtime(
    model: SketchModel,
    runtime: str | None = "auto",
    run_dir: Path | None = None,
    num_threads: int | None = None,
    warm_up: bool = True,
) -> Runtime:
    """The first usable runtime of ``runtime`` (``auto``: the backbone's measured order), warmed up.

    Naming one runtime explicitly raises :class:`RuntimeUnavailable` if it cannot be used;
    ``auto`` moves on to the next one and ends with ``tf``, which always works.
    """
    order = resolve_order(runtime, model.config.backbone)
    explicit = len(order) == 1 and order[0] in SUFFIXES
    fingerprint = None
    errors = []
    for kind in order:
        try:
            if kind == "tf":
                chosen = TFRuntime(model)
            elif kind == "keras":
                chosen = KerasRuntime(model)
            else:
                fingerprint = fingerprint or model.fingerprint()
                chosen = ensure_export(model, kind, run_dir, fingerprint, num_threads)
        except RuntimeUnavailable as err:
            if explicit:
                raise
            errors.append(f"{kind}: {err}")
            log.warning("runtime %s unavailable, trying the next: %s", kind, err)
            continue
        if warm_up:
            chosen.warm_up(model.config.image_size)
        chosen.skipped = errors  # type: ignore[attr-defined]
        return chosen
    raise RuntimeUnavailable("; ".join(errors))  # pragma: no cover - 'tf' ends every auto order
