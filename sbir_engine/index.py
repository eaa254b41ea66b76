"""The gallery index: FAISS over L2-normalised embeddings, stable 64-bit ids, and a manifest.

An index folder holds versions and a pointer to the current one::

    INDEX/CURRENT             # the name of the complete version to load, replaced atomically
    INDEX/v000003/index.faiss # IndexIDMap2 over the chosen FAISS index (inner product = cosine)
    INDEX/v000003/vectors.npy, probabilities.npy, ids.npy, manifest.jsonl, index.json, build.log

A build writes a new version beside the current one and only then swaps ``CURRENT``: a build that
is killed at any point leaves the previous index loadable, answering exactly as before.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

FORMAT_VERSION = 1
CURRENT = "CURRENT"
FLAT_LIMIT = 50_000  # below this exact search is fast enough (a few ms on 2 cores)
TARGET_RECALL = 0.95


class IndexFormatError(RuntimeError):
    """An index folder that cannot be used, with the reason."""


@dataclass(frozen=True)
class Entry:
    id: int
    path: str  # relative to the gallery root
    label: str | None
    sha256: str
    size: int


def choose_factory(n: int, dim: int, max_memory: int | None = None) -> str:
    """Exact search for small galleries, HNSW while it fits in memory, IVF-PQ beyond (as autofaiss)."""
    if max_memory is None:
        max_memory = int(_total_memory() * 0.25)
    if n <= FLAT_LIMIT:
        return "Flat"
    hnsw_bytes = n * (dim * 4 + 32 * 2 * 4 * 1.1)
    if hnsw_bytes <= max_memory:
        return "HNSW32,Flat"
    nlist = 1 << int(round(math.log2(4 * math.sqrt(n))))
    if n * dim * 4 <= max_memory:
        return f"IVF{nlist},Flat"
    return f"IVF{nlist},PQ{dim // 8}"


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


def make_faiss_index(vectors: np.ndarray, ids: np.ndarray, factory: str) -> faiss.Index:
    """Train (if needed) and fill an inner-product index with explicit ids."""
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not inner.is_trained:
        sample = vectors
        if len(vectors) > 100_000:  # IVF trains on a sample; all of it adds nothing but time
            sample = vectors[np.random.default_rng(0).choice(len(vectors), 100_000, replace=False)]
        inner.train(np.ascontiguousarray(sample, dtype=np.float32))
    index = faiss.IndexIDMap2(inner)
    if len(vectors):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
    return index


def set_search_parameter(index: faiss.Index, name: str | None, value: int | None) -> None:
    if name is None or value is None:
        return
    inner = faiss.downcast_index(index.index if hasattr(index, "index") else index)
    if name == "efSearch":
        inner.hnsw.efSearch = int(value)
    elif name == "nprobe":
        inner.nprobe = int(value)


def tune_search(index: faiss.Index, vectors: np.ndarray, factory: str, k: int = 10, sample: int = 500):
    """Raise efSearch / nprobe until recall@k against exact search on the gallery's own vectors ≥ 0.95."""
    if factory == "Flat" or len(vectors) == 0:
        return None, None, 1.0
    name = "efSearch" if factory.startswith("HNSW") else "nprobe"
    rng = np.random.default_rng(0)
    queries = vectors[rng.choice(len(vectors), min(sample, len(vectors)), replace=False)]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(np.ascontiguousarray(vectors, dtype=np.float32))
    _, truth = exact.search(queries, k)
    # Map exact positions to ids through the index's own id table.
    ids = faiss.vector_to_array(index.id_map)
    truth_ids = ids[truth]
    recall = 0.0
    value = 16
    limit = 4096 if name == "efSearch" else getattr(faiss.downcast_index(index.index), "nlist", 1)
    while True:
        set_search_parameter(index, name, value)
        _, found = index.search(queries, k)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth_ids, strict=True)]))
        if recall >= TARGET_RECALL or value >= limit:
            return name, value, recall
        value = min(value * 2, limit)


class GalleryIndex:
    """A loaded index version: FAISS index, vectors, ids and manifest, kept in agreement."""

    def __init__(
        self,
        index: faiss.Index,
        vectors: np.ndarray,
        probabilities: np.ndarray,
        ids: np.ndarray,
        entries: list[Entry],
        meta: dict,
    ):
        self.index = index
        self.vectors = vectors
        self.probabilities = probabilities  # each entry's class probabilities, for re-ranking
        self.ids = ids
        self.rows = {int(i): row for row, i in enumerate(ids)}
        self.entries = {e.id: e for e in entries}
        self.meta = meta
        self._label_ids: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(
        self, vectors: np.ndarray, k: int, labels: list[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cosine scores and ids of the k nearest entries (id -1 where fewer exist)."""
        queries = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query vectors have dimension {queries.shape[1]}, the index holds {self.dim}")
        k = max(1, min(int(k), max(len(self), 1)))
        if labels is None:
            return self.index.search(queries, k)
        allowed = np.concatenate([self._ids_with_label(label) for label in labels] or [np.zeros(0, np.int64)])
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
        return self.index.search(queries, k, params=params)

    def _ids_with_label(self, label: str) -> np.ndarray:
        if label not in self._label_ids:
            self._label_ids[label] = np.array(
                [e.id for e in self.entries.values() if e.label == label], np.int64
            )
        return self._label_ids[label]

    # -- storage ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, index_dir: Path) -> GalleryIndex:
        index_dir = Path(index_dir)
        version = current_version(index_dir)
        meta_path = version / "index.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise IndexFormatError(f"{meta_path}: cannot be read ({err})") from err
        found = meta.get("format_version")
        if not isinstance(found, int) or found > FORMAT_VERSION:
            raise IndexFormatError(
                f"{index_dir} was written in index format {found}, newer than this sbir-engine reads "
                f"({FORMAT_VERSION}); upgrade sbir-engine or rebuild the index"
            )
        try:
            index = faiss.read_index(str(version / "index.faiss"))
            vectors = np.load(version / "vectors.npy", allow_pickle=False)
            probabilities = np.load(version / "probabilities.npy", allow_pickle=False)
            ids = np.load(version / "ids.npy", allow_pickle=False)
            entries = [
                Entry(**json.loads(line))
                for line in (version / "manifest.jsonl").read_text().splitlines()
                if line
            ]
        except (OSError, RuntimeError, ValueError, TypeError) as err:
            raise IndexFormatError(f"{version}: index files are missing or damaged ({err})") from err
        gallery = cls(index, vectors, probabilities, ids, entries, meta)
        gallery.check_consistency(version)
        set_search_parameter(index, *(meta.get("search_parameter") or (None, None)))
        return gallery

    def check_consistency(self, where: Path) -> None:
        if self.index.d != self.dim or self.vectors.shape[1:] != (self.dim,):
            raise IndexFormatError(
                f"{where}: embedding dimension mismatch (index.json says {self.dim}, "
                f"FAISS index has {self.index.d}, vectors have {self.vectors.shape[1:]})"
            )
        stored = faiss.vector_to_array(self.index.id_map) if self.index.ntotal else np.zeros(0, np.int64)
        counts = {len(stored), len(self.ids), len(self.entries), len(self.vectors), len(self.probabilities)}
        if len(counts) != 1 or set(stored.tolist()) != set(self.entries):
            raise IndexFormatError(
                f"{where}: the manifest does not match the index ({len(self.entries)} manifest entries, "
                f"{len(stored)} vectors in the FAISS index); rebuild it with `sbir-engine build-index`"
            )

    def save(self, index_dir: Path, log_lines: list[str] = ()) -> Path:
        """Write a new version and swap it in atomically; older versions are then removed."""
        index_dir = Path(index_dir)
        index_dir.mkdir(parents=True, exist_ok=True)
        previous = _read_pointer(index_dir)
        number = int(previous[1:]) + 1 if previous and previous[1:].isdigit() else 1
        name = f"v{number:06d}"
        staging = index_dir / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        faiss.write_index(self.index, str(staging / "index.faiss"))
        np.save(staging / "vectors.npy", self.vectors)
        np.save(staging / "probabilities.npy", self.probabilities)
        np.save(staging / "ids.npy", self.ids)
        with open(staging / "manifest.jsonl", "w") as out:
            for entry in sorted(self.entries.values(), key=lambda e: e.id):
                out.write(json.dumps(asdict(entry), ensure_ascii=False) + "\n")
        (staging / "index.json").write_text(json.dumps(self.meta, indent=2) + "\n")
        (staging / "build.log").write_text("\n".join(log_lines) + ("\n" if log_lines else ""))
        _fsync_tree(staging)
        final = index_dir / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        pointer_tmp = index_dir / f".{CURRENT}.tmp-{os.getpid()}"
        pointer_tmp.write_text(name + "\n")
        _fsync_file(pointer_tmp)
        os.replace(pointer_tmp, index_dir / CURRENT)  # the commit point
        _fsync_file(index_dir)
        for old in index_dir.iterdir():
            if old.name != name and (
                old.name.startswith("v") and old.is_dir() or old.name.startswith(".tmp-")
            ):
                shutil.rmtree(old, ignore_errors=True)
        return final


def _read_pointer(index_dir: Path) -> str | None:
    try:
        return (Path(index_dir) / CURRENT).read_text().strip() or None
    except OSError:
        return None


def current_version(index_dir: Path) -> Path:
    index_dir = Path(index_dir)
    name = _read_pointer(index_dir)
    if name is None:
        if not index_dir.exists():
            raise IndexFormatError(
                f"{index_dir}: no such index folder; build one with `sbir-engine build-index`"
            )
        raise IndexFormatError(f"{index_dir} is not an sbir-engine index (no {CURRENT} file)")
    version = index_dir / name
    if not version.is_dir():
        raise IndexFormatError(f"{index_dir}: {CURRENT} names {name}, which is missing")
    return version


def index_exists(index_dir: Path) -> bool:
    return _read_pointer(Path(index_dir)) is not None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        _fsync_file(path)
    _fsync_file(folder)


def new_meta(
    dim: int, factory: str, fingerprint: str, model_dir: Path, index_dir: Path, gallery_root: Path
) -> dict:
    model_dir, index_dir = Path(model_dir).resolve(), Path(index_dir).resolve()
    return {
        "format_version": FORMAT_VERSION,
        "dim": dim,
        "factory": factory,
        "metric": "inner_product",
        "model": {
            "fingerprint": fingerprint,
            "run_dir": str(model_dir),
            "run_dir_relative": os.path.relpath(model_dir, index_dir),
        },
        "gallery_root": str(Path(gallery_root).resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
