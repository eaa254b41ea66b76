"""The engine: an index folder and its model, loaded once; sketch → class + nearest gallery images."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path, PurePath

import numpy as np
from PIL import Image

from .embed import Embedder
from .gallery import is_drawing
from .images import ACCEPTED, PREPROCESSING_VERSION, ImageSource, resize_to_array
from .index import GalleryIndex, current_version, label_counts, read_meta
from .model import load_model

# A query whose nearest entries are mostly copies of each other searches deeper for k distinct
# results, up to this many times its usual depth (and Milvus' largest top-k): a gallery of thousands
# of copies cannot make a query search it all.
MAX_DEEPENING = 2
MAX_SEARCH_DEPTH = 16_384


class ModelMismatchError(RuntimeError):
    """The model and the index were not made for each other."""


@dataclass(frozen=True)
class Neighbour:
    id: int
    path: str
    label: str | None
    score: float
    # Other gallery files with the same content (sha256): one result, not a row of copies.
    duplicates: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueryResult:
    label: str
    probabilities: dict[str, float]
    neighbours: list[Neighbour]
    timings_ms: dict[str, float] = field(default_factory=dict, compare=False)
    # The query after the sketch normaliser (the raster before resizing): what the network was given.
    sketch: Image.Image | None = field(default=None, compare=False, repr=False)
    # Why the answer is empty when that is not the query's fault (the CLI and the page show it).
    note: str | None = None

    def top_classes(self, n: int = 5) -> list[tuple[str, float]]:
        """The n most probable classes with their probabilities, most probable first (ties in class order)."""
        return sorted(self.probabilities.items(), key=lambda item: -item[1])[:n]

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "probabilities": self.probabilities,
            "neighbours": [asdict(n) for n in self.neighbours],
        }


def resolve_model_dir(index_dir: Path, meta: dict) -> Path:
    """The run folder that built the index: relative to the index first (folders move together)."""
    relative = (Path(index_dir) / meta["model"]["run_dir_relative"]).resolve()
    return relative if relative.is_dir() else Path(meta["model"]["run_dir"])


class SketchEngine:
    """Load with :meth:`load`; :meth:`query`, :meth:`embed` and :meth:`search` reuse the loaded state.

    Safe to share between threads: a query reads one index version from start to end, and
    :meth:`reload` swaps in a newer version in a single assignment.
    """

    def __init__(self, index_dir: Path | None, index: GalleryIndex, embedder: Embedder):
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self._index = index
        # The version the index was read from (a build may have committed since); None for a live
        # VectorStore such as a Milvus collection (see from_store), which has no versions to reload.
        self._version = getattr(index, "version", None) if self.index_dir is not None else None
        self.embedder = embedder
        self.config = embedder.config

    @classmethod
    def load(cls, index_dir: Path, model_dir: Path | None = None) -> SketchEngine:
        index = GalleryIndex.load(index_dir)
        model_dir = Path(model_dir) if model_dir else resolve_model_dir(index_dir, index.meta)
        model = load_model(model_dir)
        check_compatible(index, model.fingerprint(), model.config.embedding_dim, index_dir, model_dir)
        return cls(index_dir, index, Embedder(model, run_dir=_writable(model_dir)))

    @classmethod
    def from_store(cls, store, model_dir: Path | None = None) -> SketchEngine:
        """An engine over another :class:`~sbir_engine.index.VectorStore`, e.g. a Milvus collection."""
        model_dir = Path(model_dir) if model_dir else Path(store.meta["model"]["run_dir"])
        model = load_model(model_dir)
        check_compatible(store, model.fingerprint(), model.config.embedding_dim, store.location, model_dir)
        return cls(None, store, Embedder(model, run_dir=_writable(model_dir)))

    @property
    def index(self) -> GalleryIndex:
        return self._index

    @property
    def classes(self) -> tuple[str, ...]:
        return self.config.classes

    @property
    def gallery_root(self) -> Path:
        """The gallery folder of the loaded index version: a rebuild from a moved gallery moves it."""
        return Path(self._index.meta["gallery_root"])

    def is_drawing(self, path: str | PurePath) -> bool:
        """Whether the gallery entry at ``path`` (its manifest path) is a drawing, embedded as a
        sketch is (``build-index --drawings``): as a query it is then normalised, not taken as it is."""
        return is_drawing(path, self._index.meta.get("drawings", []))

    def reload(self) -> bool:
        """Pick up a newer index version written by a build; True if it changed."""
        if self.index_dir is None:
            return False
        version = current_version(self.index_dir)
        if version.name == self._version and read_meta(self.index_dir, version).get("version_id") == (
            self._index.meta.get("version_id")
        ):  # (an index deleted and built again has a v000001 of its own)
            return False
        index = GalleryIndex.load(self.index_dir)
        check_compatible(
            index, self.embedder.model.fingerprint(), self.config.embedding_dim, self.index_dir, None
        )
        self._index, self._version = index, index.version
        return True

    def embed(self, images: Iterable[ImageSource] | ImageSource, sketch: bool = True) -> np.ndarray:
        """L2-normalised embeddings, one row per image (sketches are normalised first).

        ``images`` is one image (path, bytes, binary file object, array or PIL image) or any sequence
        of them; an empty one gives an empty (0, embedding_dim) array. They are decoded and embedded
        ``config.batch_size`` at a time, so memory stays bounded however many there are.
        """
        load = self.embedder.load_sketch if sketch else self.embedder.load_image
        images, batch = _image_iter(images), max(1, self.config.batch_size)
        vectors = [np.zeros((0, self.config.embedding_dim), np.float32)]
        while chunk := list(islice(images, batch)):
            vectors.append(self.embedder(np.stack([load(image) for image in chunk]))[0])
        return np.concatenate(vectors)

    def search(
        self, vectors: np.ndarray, k: int = 10, labels: Iterable[str] | str | None = None
    ) -> list[list[Neighbour]]:
        """Raw nearest-neighbour search: for each vector, the k nearest gallery entries by cosine.

        ``vectors`` is one (embedding_dim,) vector or an (n, embedding_dim) matrix, L2-normalised here
        (so scores are cosines whatever their length); ``labels`` as in :meth:`query`.
        """
        check_k(k)
        labels = check_labels(labels)
        index = self._index
        scores, ids = index.search(vectors, k, labels)
        return [self._neighbours(index, s, i) for s, i in zip(scores, ids, strict=True)]

    def query(
        self,
        sketch: ImageSource,
        k: int = 10,
        same_class: bool = False,
        labels: Iterable[str] | str | None = None,
        photo: bool = False,
    ) -> QueryResult:
        """Classify a sketch and find its k nearest gallery images.

        ``labels`` keeps only images with one of these labels (a single string is one label); a
        label that no image of the index has is named in ``note``. ``same_class`` keeps only images
        of the predicted class; with ``labels`` too, both apply: the predicted class if it is one of
        ``labels`` (else nothing, and ``note`` says why).
        With ``photo`` the query is a picture to be taken as it is (a photo: "more like this"),
        embedded as the gallery's images are, without the sketch normaliser.
        """
        check_k(k)
        labels = check_labels(labels)
        index = self._index  # one index version for the whole query (reload may swap it meanwhile)
        t0 = time.perf_counter()
        if photo:
            normalised, image = None, self.embedder.load_image(sketch)
        else:  # Embedder.load_sketch in two steps, so that the result can show the normalised sketch
            normalised = self.embedder.normalize_sketch(sketch)
            image = resize_to_array(normalised, self.config.image_size)
        t1 = time.perf_counter()
        vectors, probabilities = self.embedder(image[None])
        t2 = time.perf_counter()
        probs = {name: float(p) for name, p in zip(self.classes, probabilities[0], strict=True)}
        label = self.classes[int(np.argmax(probabilities[0]))]
        notes = [unknown_labels_note(index, labels, vectors[0])] if labels else []
        wanted = labels
        if same_class:
            wanted = [label] if labels is None or label in labels else []
        if wanted == []:  # nothing can match: no search (Milvus has no empty filter)
            neighbours = []
        else:
            neighbours = self._ranked(index, vectors[0], probabilities[0], k, wanted)
        t3 = time.perf_counter()
        timings = {"decode": (t1 - t0) * 1e3, "network": (t2 - t1) * 1e3, "search": (t3 - t2) * 1e3}
        timings["total"] = (t3 - t0) * 1e3
        if same_class and labels is not None and label not in labels:
            notes.append(
                f"the predicted class {label!r} is not one of the labels asked for "
                f"({', '.join(map(repr, labels))}), so only the predicted class among them finds nothing"
            )
        elif same_class and not neighbours:
            # A filtered search finds every match (see GalleryIndex.search), so nothing found means the
            # predicted class names no image: a flat gallery, or folders named otherwise than the classes.
            notes.append(no_class_note(label))
        note = "; ".join(n for n in notes if n) or None
        return QueryResult(label, probs, neighbours, timings, normalised, note)

    def _ranked(
        self,
        index: GalleryIndex,
        vector: np.ndarray,
        probabilities: np.ndarray,
        k: int,
        labels: list[str] | None,
    ) -> list[Neighbour]:
        """The k best by the engine's score: cosine, re-ranked with class probabilities (see fused_scores).

        Files with the same content come back as one result that names the others; the search
        deepens until k distinct results are found, the index has no more, or it has gone
        MAX_DEEPENING times its usual depth.
        """
        weight = self.config.rerank_weight
        depth = k if weight == 0 else max(k, self.config.rerank_candidates)
        deepest = min(len(index), MAX_SEARCH_DEPTH, MAX_DEEPENING * depth)
        while True:
            scores, ids = index.search(vector[None], depth, labels)
            scores, ids = scores[0][ids[0] >= 0], ids[0][ids[0] >= 0]
            if weight:
                rows = [index.rows[int(i)] for i in ids]
                scores = fused_scores(scores, probabilities, index.probabilities[rows], weight)
                order = np.argsort(-scores, kind="stable")
                scores, ids = scores[order], ids[order]
            neighbours = collapse_duplicates(index, scores, ids, k)
            if len(neighbours) == k or len(ids) < depth or depth >= deepest:
                return neighbours
            depth = min(2 * depth, deepest)

    def resolve(self, result: Neighbour | str) -> Path:
        """The gallery file of a result, or of a path relative to the gallery as results give it."""
        return self.gallery_root / (result.path if isinstance(result, Neighbour) else result)

    @staticmethod
    def _neighbours(index: GalleryIndex, scores: np.ndarray, ids: np.ndarray) -> list[Neighbour]:
        out = []
        for score, entry_id in zip(scores, ids, strict=True):
            if entry_id < 0:
                continue
            entry = index.entries[int(entry_id)]
            out.append(Neighbour(int(entry_id), entry.path, entry.label, float(score)))
        return out


def check_k(k: int) -> None:
    """k is a whole number (int or numpy integer) of at least 1: below 1 would mean everything (k = -1
    in FAISS terms) or one result, and a fraction, inf or NaN the whole gallery or a crash after the
    network ran. A bool is refused too: ``k=True`` is a mistake, not a request for one result."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k (the number of results) must be a whole number, at least 1, got {k!r}")
    if k < 1:
        raise ValueError(f"k (the number of results) must be at least 1, got {k}")


def check_labels(labels: Iterable[str] | str | None) -> list[str] | None:
    """A label filter as a list of labels: a single string is one label, not its characters."""
    if labels is None:
        return None
    if isinstance(labels, str):
        return [labels]
    try:
        labels = list(labels)
    except TypeError:
        raise ValueError(f"labels must be a label or a list of labels, not {type(labels).__name__}") from None
    for label in labels:
        if not isinstance(label, str):
            raise ValueError(f"labels must be strings (the gallery's folder names), got {label!r}")
    return labels


def unknown_labels_note(index: GalleryIndex, labels: list[str], vector: np.ndarray) -> str | None:
    """A note naming the labels that no image of the index has (a typo would just give no neighbours),
    with the labels it has, as ``sbir-engine query --label`` prints it; None when all are known."""
    if isinstance(index, GalleryIndex):  # its label → ids map, cached: no search
        missing = [name for name in labels if not len(index.ids_with_label(name))]
    else:  # another VectorStore (Milvus): a filtered one-result search finds an image of the label if any
        missing = [name for name in labels if index.search(vector[None], 1, [name])[1][0, 0] < 0]
    if not missing:
        return None
    known = ", ".join(sorted(set(label_counts(index.entries.values())) - {"-"}))
    notes = (f"no image in the index has the label {name!r} (its labels: {known})" for name in missing)
    return "; ".join(notes)


def no_class_note(label: str) -> str:
    """Why a same-class query found nothing: no image carries the predicted class as its label."""
    return (
        f"no image in the index has the label {label!r}, the predicted class, so only the predicted "
        f"class (--same-class) finds nothing: labels are the gallery's <label>/<image> folder names "
        f"(a flat gallery has none; `sbir-engine index info` lists them)"
    )


def _image_iter(images: Iterable[ImageSource] | ImageSource) -> Iterator[ImageSource]:
    """One image as an iterator over it alone, a sequence of them as an iterator over them (bytes,
    memoryviews, binary file objects and arrays are one image: not their rows, ints or lines)."""
    one = (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Image.Image)
    if isinstance(images, one) or hasattr(images, "read"):
        return iter([images])
    try:
        return iter(images)
    except TypeError:
        kind = type(images).__name__
        raise TypeError(f"embed takes an image ({ACCEPTED}) or a sequence of them, not {kind}") from None


def collapse_duplicates(index: GalleryIndex, scores: np.ndarray, ids: np.ndarray, k: int) -> list[Neighbour]:
    """The first k distinct results of ranked entries: a copy (same sha256) joins the best-ranked
    one's ``duplicates``. Copies have the same vector, so they rank side by side."""
    first: dict[str, int] = {}  # sha256 -> position in out
    out: list[Neighbour] = []
    for score, entry_id in zip(scores, ids, strict=True):
        entry = index.entries[int(entry_id)]
        if entry.sha256 not in first and len(out) == k:
            break  # the k-th result's copies, right behind it, are in
        if entry.sha256 in first:
            kept = out[first[entry.sha256]]
            out[first[entry.sha256]] = replace(kept, duplicates=(*kept.duplicates, entry.path))
            continue
        first[entry.sha256] = len(out)
        out.append(Neighbour(int(entry_id), entry.path, entry.label, float(score)))
    return out


def fused_scores(
    cosine: np.ndarray, query_probabilities: np.ndarray, gallery_probabilities: np.ndarray, weight: float
) -> np.ndarray:
    """The engine's ranking score: ``(1 - w) · cos(e_q, e_g) + w · ⟨p_q, p_g⟩``.

    ``p`` are the classifier's class probabilities of the query and of each gallery image (stored
    at build time), so an image the classifier puts in the sketch's class rises even when its
    embedding is only fairly close. ``w = 0`` ranks by the 512-d embedding alone.
    """
    return (1.0 - weight) * cosine + weight * (gallery_probabilities @ query_probabilities)


def _writable(run_dir: Path) -> Path | None:
    """The run folder keeps the exported fast-runtime file when it can; else the user cache does."""
    return run_dir if os.access(run_dir, os.W_OK) else None


def check_compatible(
    index: GalleryIndex, fingerprint: str, dim: int, index_dir: Path, model_dir: Path | None
):
    built_by = index.meta["model"]["fingerprint"]
    built_with = index.meta["model"].get("preprocessing", 1)  # indexes older than the key: version 1
    if built_by != fingerprint and built_with != PREPROCESSING_VERSION:
        raise ModelMismatchError(
            f"the index {index_dir} was built with sketch preprocessing version {built_with} and this "
            f"sbir-engine prepares images with version {PREPROCESSING_VERSION}: its embeddings would not be "
            f"comparable. Rebuild it with `sbir-engine build-index --model RUN_DIR` (the model itself "
            f"needs no retraining)."
        )
    if built_by != fingerprint:
        where = f" at {model_dir}" if model_dir else ""
        raise ModelMismatchError(
            f"the model{where} (fingerprint {fingerprint}) is not the one that built the index {index_dir} "
            f"(fingerprint {built_by}): its embeddings would not be comparable. Rebuild the index with "
            f"`sbir-engine build-index --model RUN_DIR` or load the index with the model that built it."
        )
    if index.dim != dim:
        raise ModelMismatchError(
            f"the model makes {dim}-d embeddings but the index {index_dir} holds {index.dim}-d"
        )
