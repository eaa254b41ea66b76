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
import os
import re
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import faiss
import numpy as np

from .images import PREPROCESSING_VERSION
from .index_factory import (
    add_in_chunks,
    exact_search,
    make_faiss_index,
    refine_exact,
    refine_factor,
    set_search_parameter,
)

FORMAT_VERSION = 1
CURRENT = "CURRENT"
# What a build writes in an index folder, and all that its cleanup may ever delete: versions,
# their staging folders and the pointer's temporary file (a killed build's leftovers included).
VERSION_NAME = re.compile(r"v\d{6,}")
LEFTOVER_NAME = re.compile(rf"\.tmp-v\d{{6,}}-\d+|\.{CURRENT}\.tmp-\d+")
# Crash-safety tests name a point of a build here to stop it there and kill it (see pause_point).
PAUSE_ENV = "SBIR_ENGINE_TEST_PAUSE_AT"


class IndexFormatError(RuntimeError):
    """An index folder that cannot be used, with the reason."""


class NotAnIndexFolderError(ValueError):
    """A folder that holds other things than an index: a build does not write its index there."""


class ForeignIndexError(IndexFormatError):
    """An index this sbir-engine did not write in a form it knows (a newer format, a Milvus
    collection of someone else's): unlike a damaged index of ours, build-index does not replace it."""


# What every reader of an index's metadata takes from it: key → type (model: its own keys).
_META_FIELDS = {"dim": int, "gallery_root": str, "model": dict}
_MODEL_FIELDS = {"fingerprint": str, "run_dir": str}


def check_meta(meta: object, where: str) -> None:
    """An index's metadata, checked before anything reads it: a damaged one is an
    :class:`IndexFormatError` (one line; ``build-index`` rebuilds), not a KeyError deep inside."""
    if not isinstance(meta, dict):
        raise IndexFormatError(f"{where}: its metadata is not a JSON object (found {type(meta).__name__})")
    check_format_version(meta, where)
    for fields, found, prefix in ((_META_FIELDS, meta, ""), (_MODEL_FIELDS, meta.get("model"), "model.")):
        for key, kind in fields.items():
            value = found.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise IndexFormatError(f"{where}: its metadata has no valid {prefix}{key} (found {value!r})")


def check_format_version(meta: dict, where: str) -> None:
    found = meta.get("format_version")
    if not isinstance(found, int):
        raise IndexFormatError(f"{where}: its metadata has no index format version (found {found!r})")
    if found > FORMAT_VERSION:
        raise ForeignIndexError(
            f"{where} was written in index format {found}, newer than this sbir-engine reads "
            f"({FORMAT_VERSION}); upgrade sbir-engine or rebuild the index"
        )


@dataclass(frozen=True)
class Entry:
    id: int
    path: str  # relative to the gallery root
    label: str | None
    sha256: str
    size: int


@runtime_checkable
class VectorStore(Protocol):
    """What the engine and the builders need from a place that holds gallery vectors.

    Satisfied by :class:`GalleryIndex` (a FAISS index folder) and by
    :class:`sbir_engine.milvus.MilvusStore` (a Milvus collection). Scores are cosine similarities
    (vectors are L2-normalised), ids the manifest's stable 64-bit ids, -1 where fewer than k exist.
    ``entries`` maps id → :class:`Entry`; ``probabilities[[rows[id], ...]]`` gives the stored class
    probabilities of entries (the engine's re-ranking reads them after each search).
    """

    meta: dict
    entries: Mapping[int, Entry]
    rows: Mapping[int, Any]
    probabilities: Any

    @property
    def dim(self) -> int: ...

    def __len__(self) -> int: ...

    def search(
        self, vectors: np.ndarray, k: int, labels: list[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def add(self, entries: list[Entry], vectors: np.ndarray, probabilities: np.ndarray) -> None:
        """Insert entries, replacing any with the same id."""

    def remove(self, ids: Iterable[int]) -> int:
        """Drop entries by id; returns how many were there."""

    def stored(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The vectors and class probabilities stored for entries, in the order of ``ids``."""

    def relabel(self, entries: list[Entry]) -> None:
        """New paths and labels for existing entries by id (moved files), their vectors kept."""


def label_counts(entries: Iterable[Entry]) -> Counter[str]:
    """How many entries carry each label ("-" for those without one)."""
    return Counter(entry.label or "-" for entry in entries)


def repeated_contents(digests: Iterable[str]) -> int:
    """How many files repeat another's content, given every file's sha256 (copies under other names)."""
    return sum(count - 1 for count in Counter(digests).values())


def query_matrix(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Query vectors as a contiguous float32 (n, dim) matrix of unit rows, or a clear error.

    Rows are L2-normalised so that scores are cosines (the index holds unit vectors) whatever the
    caller's scale, e.g. an average of embeddings; NaN and inf are refused. An all-zero row (a ReLU
    layer that gave nothing, which the model's own normalisation leaves zero) stays zero: every
    score 0, as before.
    """
    try:
        queries = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"query vectors must be numbers, shape (n, {dim}) or ({dim},) ({err})") from err
    shape = queries.shape
    queries = queries[None] if queries.ndim == 1 else queries
    if queries.ndim != 2 or queries.shape[1] != dim:
        expected = f"(n, {dim}) or ({dim},)"
        raise ValueError(f"query vectors must have shape {expected} (the index holds {dim}-d), got {shape}")
    if not np.isfinite(queries).all():
        raise ValueError("query vectors hold NaN or infinite values")
    norms = np.linalg.norm(queries, axis=1, keepdims=True)
    return np.ascontiguousarray(queries / np.maximum(norms, 1e-12))


def _search_threads(index: faiss.Index, queries: np.ndarray, k: int, params) -> tuple[np.ndarray, np.ndarray]:
    """Search one query on one OpenMP thread: on 2 cores FAISS's threads made a single query slower
    and, spinning afterwards, slowed the network too (BENCHMARKS.md). Batches keep every thread."""
    if len(queries) != 1:
        return index.search(queries, k, params=params)
    previous = faiss.omp_get_max_threads()  # a per-thread setting: other threads are unaffected
    faiss.omp_set_num_threads(1)
    try:
        return index.search(queries, k, params=params)
    finally:
        faiss.omp_set_num_threads(previous)


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
        self.vectors = vectors  # memory-mapped when loaded; row order = the FAISS index's id order
        self.probabilities = probabilities  # each entry's class probabilities, for re-ranking
        self.ids = ids
        self.rows = {int(i): row for row, i in enumerate(ids)}
        self.entries = {e.id: e for e in entries}
        self.meta = meta
        self.version: str | None = None  # the version folder it was loaded from, if any
        self._label_ids: dict[str, np.ndarray] = {}
        self._id_order: np.ndarray | None = None
        # Set when removals left the FAISS structure behind the arrays (HNSW and IVF cannot drop
        # ids in place here); :meth:`refresh` brings it back in line before a save.
        self.stale = False

    @classmethod
    def empty(cls, dim: int, n_classes: int, meta: dict) -> GalleryIndex:
        vectors = np.zeros((0, dim), np.float32)
        index = make_faiss_index(vectors, np.zeros(0, np.int64), "Flat")
        empty = cls(index, vectors, np.zeros((0, n_classes), np.float32), np.zeros(0, np.int64), [], meta)
        empty.stale = True  # built once, by refresh, when the gallery is in (not copied in twice)
        return empty

    @property
    def location(self) -> str:
        return str(self.meta.get("location", "FAISS index"))

    @property
    def factory(self) -> str:
        return str(self.meta.get("factory", "Flat"))

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(
        self, vectors: np.ndarray, k: int, labels: list[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cosine scores and ids of the k nearest entries (id -1 where fewer exist)."""
        queries = query_matrix(vectors, self.dim)
        k = max(1, min(int(k), max(len(self), 1)))
        refine = refine_factor(self.factory)
        depth = min(k * refine, max(len(self), 1)) if refine else k
        params = None
        if labels is not None:
            allowed = np.concatenate(  # each label once: ids of distinct labels are distinct
                [self.ids_with_label(label) for label in dict.fromkeys(labels)] or [np.zeros(0, np.int64)]
            )
            params = self._search_parameters(faiss.IDSelectorBatch(allowed))
        scores, ids = _search_threads(self.index, queries, depth, params)
        if refine:
            scores, ids = refine_exact(queries, scores, ids, self.vectors, self._rows_of, k)
        if labels is not None:
            # HNSW walks its graph and IVF probes its nprobe lists as if unfiltered and only then
            # drops what the filter refuses: a label away from the query can come back with few
            # results or none though it has many entries. Such rows are answered exactly instead.
            short = (ids >= 0).sum(axis=1) < min(k, len(allowed))
            if short.any():
                scores[short], ids[short] = self._exact_among(queries[short], allowed, k)
        return scores, ids

    def _exact_among(
        self, queries: np.ndarray, allowed: np.ndarray, k: int, block: int = 65_536
    ) -> tuple[np.ndarray, np.ndarray]:
        """The exact top k among the ``allowed`` ids, read from vectors.npy a block at a time (id -1
        where fewer exist)."""
        rows = np.sort(self._rows_of(allowed))  # in file order: the memory map is read forwards
        found, at = exact_search(queries, self.vectors, k, rows, block)
        scores = np.full((len(queries), k), -np.finfo(np.float32).max, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        scores[:, : found.shape[1]], ids[:, : found.shape[1]] = found, self.ids[at]
        return scores, ids

    def _search_parameters(self, selector) -> faiss.SearchParameters:
        """A selector plus the tuned efSearch / nprobe (SearchParameters would reset them)."""
        inner = faiss.downcast_index(self.index.index)
        if isinstance(inner, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
        if isinstance(inner, faiss.IndexIVF):
            return faiss.SearchParametersIVF(sel=selector, nprobe=inner.nprobe)
        return faiss.SearchParameters(sel=selector)

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        if self._id_order is None:
            self._id_order = np.argsort(self.ids, kind="stable")
        return self._id_order[np.searchsorted(self.ids, ids, sorter=self._id_order)]

    # -- changes ---------------------------------------------------------------------------------

    def add(self, entries: list[Entry], vectors: np.ndarray, probabilities: np.ndarray) -> None:
        """Append entries (replacing any with the same id); the FAISS index grows in place."""
        if not entries:
            return
        self.remove([e.id for e in entries if e.id in self.entries])
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        new_ids = np.array([e.id for e in entries], np.int64)
        self.vectors = np.concatenate([self.vectors, vectors])
        self.probabilities = np.concatenate([self.probabilities, np.asarray(probabilities, np.float32)])
        self.ids = np.concatenate([self.ids, new_ids])
        self.entries.update((e.id, e) for e in entries)
        self._changed()
        hnsw = isinstance(faiss.downcast_index(self.index.index), faiss.IndexHNSW)
        if hnsw and len(new_ids) > 0.1 * self.index.ntotal:
            self.stale = True  # a large batch is better built in one go (see make_faiss_index)
        if not self.stale:
            self.index.add_with_ids(vectors, new_ids)

    def relabel(self, entries: list[Entry]) -> None:
        """New paths and labels for entries by id (moved files); vectors and the FAISS index stay."""
        self.entries.update((entry.id, entry) for entry in entries)
        self._label_ids.clear()

    def stored(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The vectors and class probabilities stored for entries, in the order of ``ids``."""
        rows = [self.rows[int(i)] for i in ids]
        return self.vectors[rows], self.probabilities[rows]

    def remove(self, ids: Iterable[int]) -> int:
        """Drop entries by id: in place for exact (Flat) search, else :meth:`refresh` rebuilds."""
        gone = np.array(sorted({int(i) for i in ids} & set(self.entries)), np.int64)
        if not len(gone):
            return 0
        keep = ~np.isin(self.ids, gone)
        self.vectors, self.probabilities = self.vectors[keep], self.probabilities[keep]
        self.ids = self.ids[keep]
        for entry_id in gone.tolist():
            del self.entries[entry_id]
        self._changed()
        if not self.stale and isinstance(faiss.downcast_index(self.index.index), faiss.IndexFlat):
            self.index.remove_ids(faiss.IDSelectorBatch(gone))  # keeps the order of the rest
        else:
            self.stale = True
        return len(gone)

    def _changed(self) -> None:
        self.rows = {int(i): row for row, i in enumerate(self.ids)}
        self._label_ids.clear()
        self._id_order = None

    def refresh(self, factory: str, retrain: bool = False) -> str:
        """Make the FAISS index a ``factory`` index over exactly the current vectors; says how.

        The same factory is kept in place when nothing was removed; an IVF index that lost
        entries is refilled with its trained quantizer; anything else is rebuilt (and trained).
        """
        same = factory == self.factory and len(self.ids) and self.index.ntotal > 0
        inner = faiss.downcast_index(self.index.index)
        if same and not retrain and not self.stale:
            return "updated in place"
        if same and not retrain and isinstance(inner, faiss.IndexIVF):
            self.index.reset()
            add_in_chunks(self.index, self.vectors, self.ids)
            self.stale = False
            return "refilled (trained IVF quantizer kept)"
        self.index = make_faiss_index(self.vectors, self.ids, factory)
        self.meta["factory"] = factory
        self.meta["trained_count"] = len(self.ids)
        self.stale = False
        return "rebuilt"

    def ids_with_label(self, label: str) -> np.ndarray:
        """The ids of the entries with this label (none for a label the index does not hold); cached."""
        if label not in self._label_ids:
            self._label_ids[label] = np.array(
                [e.id for e in self.entries.values() if e.label == label], np.int64
            )
        return self._label_ids[label]

    # -- storage ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, index_dir: Path) -> GalleryIndex:
        index_dir = Path(index_dir)
        for attempt in range(5):
            version = current_version(index_dir)
            try:
                return cls._load_version(index_dir, version)
            except IndexFormatError:
                # A build swapped CURRENT and removed this version while it was being read: read the new one.
                if attempt == 4 or _read_pointer(index_dir) == version.name:
                    raise

    @classmethod
    def _load_version(cls, index_dir: Path, version: Path) -> GalleryIndex:
        meta = read_meta(index_dir, version)
        try:
            index = faiss.read_index(str(version / "index.faiss"))
            vectors = np.load(version / "vectors.npy", allow_pickle=False, mmap_mode="r")
            probabilities = np.load(version / "probabilities.npy", allow_pickle=False)
            ids = np.load(version / "ids.npy", allow_pickle=False)
            entries = [
                Entry(**json.loads(line))
                # "\n" alone ends a line: str.splitlines() would also split at U+2028, U+2029 and
                # U+0085, which json.dumps(ensure_ascii=False) leaves as they are in file names.
                for line in (version / "manifest.jsonl").read_text(encoding="utf-8").split("\n")
                if line.strip()
            ]
        except (OSError, RuntimeError, ValueError, TypeError) as err:
            raise IndexFormatError(f"{version}: index files are missing or damaged ({err})") from err
        gallery = cls(index, vectors, probabilities, ids, entries, meta)
        gallery.version = version.name  # what was read, whatever CURRENT says by now
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
        pause_point("writing")
        np.save(staging / "probabilities.npy", self.probabilities)
        np.save(staging / "ids.npy", self.ids)
        with open(staging / "manifest.jsonl", "w", encoding="utf-8") as out:
            for entry in sorted(self.entries.values(), key=lambda e: e.id):
                out.write(json.dumps(asdict(entry), ensure_ascii=False) + "\n")
        # Unique per version: an index folder deleted and built again starts at v000001 again, and a
        # running engine must still see that it changed (SketchEngine.reload).
        self.meta["version_id"] = uuid.uuid4().hex
        (staging / "index.json").write_text(json.dumps(self.meta, indent=2) + "\n", encoding="utf-8")
        log = "\n".join(log_lines) + ("\n" if log_lines else "")
        # The log names failed files as given; a name that is not UTF-8 is escaped, not fatal.
        (staging / "build.log").write_text(log, encoding="utf-8", errors="backslashreplace")
        _fsync_tree(staging)
        final = index_dir / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        pointer_tmp = index_dir / f".{CURRENT}.tmp-{os.getpid()}"
        pointer_tmp.write_text(name + "\n")
        _fsync_file(pointer_tmp)
        pause_point("committing")
        os.replace(pointer_tmp, index_dir / CURRENT)  # the commit point
        _fsync_file(index_dir)
        pause_point("cleanup")
        for old in index_dir.iterdir():
            if old.name != name and _written_by_a_build(old):
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:  # the pointer's temporary file, left by a build killed before its commit
                    old.unlink(missing_ok=True)
        return final


def _written_by_a_build(path: Path) -> bool:
    """A version, a staging folder or a pointer file: all that a cleanup may delete. Nothing else
    is touched, whatever its name (``--out`` may hold a ``venv/``, a gallery a ``vase/`` class)."""
    if path.is_symlink():
        return False
    if VERSION_NAME.fullmatch(path.name):
        return path.is_dir()
    return bool(LEFTOVER_NAME.fullmatch(path.name))


def pause_point(name: str) -> None:
    """Crash-safety tests: with ``$SBIR_ENGINE_TEST_PAUSE_AT`` = ``name``, say so and wait to be killed."""
    if os.environ.get(PAUSE_ENV) == name:
        print(f"{PAUSE_ENV}: paused at {name}", file=sys.stderr, flush=True)
        time.sleep(3600)


def _read_pointer(index_dir: Path) -> str | None:
    try:
        return (Path(index_dir) / CURRENT).read_text().strip() or None
    except OSError:
        return None


def read_meta(index_dir: Path, version: Path) -> dict:
    """A version's metadata (``index.json``), checked: a damaged one is an :class:`IndexFormatError`."""
    meta_path = version / "index.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise IndexFormatError(f"{meta_path}: cannot be read ({err})") from err
    check_meta(meta, str(index_dir))
    return meta


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


@dataclass
class Salvage:
    """What a damaged index version still tells a rebuild, read line by line: the manifest's
    entries (so that files keep their ids) and, from its metadata, the next id and the
    ``--drawings`` patterns. Shaped like a store's ``entries`` and ``meta``, without vectors."""

    entries: dict[int, Entry]
    meta: dict

    @classmethod
    def read(cls, index_dir: Path) -> Salvage:
        try:
            version = current_version(index_dir)
        except IndexFormatError:
            return cls({}, {})
        entries: dict[int, Entry] = {}
        paths = set()
        for line in _lines(version / "manifest.jsonl"):
            try:
                entry = Entry(**json.loads(line))
            except (ValueError, TypeError):
                continue  # a damaged line: that file is indexed anew
            if _is_id(entry.id) and _is_entry(entry) and entry.id not in entries and entry.path not in paths:
                entries[entry.id] = entry
                paths.add(entry.path)
        try:
            meta = json.loads("\n".join(_lines(version / "index.json")))
        except ValueError:
            meta = None
        meta = meta if isinstance(meta, dict) else {}
        # Only what a rebuild takes over, and only if it is what a build writes. The next id is
        # also at least one past every id still on record: a damaged index.json and a damaged last
        # manifest line must not let a new file take a deleted file's id.
        recorded = [meta.get("next_id"), *(entry.id + 1 for entry in entries.values()), _next_of_ids(version)]
        kept: dict = {"next_id": max((n for n in recorded if _is_id(n)), default=0)}
        drawings = meta.get("drawings")
        if isinstance(drawings, list) and all(isinstance(pattern, str) for pattern in drawings):
            kept["drawings"] = drawings
        return cls(entries, kept)

    def __bool__(self) -> bool:
        """Whether anything was read: entries, or metadata that a rebuild keeps."""
        return bool(self.entries) or self.meta.get("next_id", 0) > 0 or "drawings" in self.meta


def _is_id(value: object) -> bool:
    """An id a build can have written: FAISS ids are int64, and -1 means "no result"."""
    return type(value) is int and 0 <= value < 2**63


def _is_entry(entry: Entry) -> bool:
    return (
        isinstance(entry.path, str)
        and (entry.label is None or isinstance(entry.label, str))
        and isinstance(entry.sha256, str)
        and type(entry.size) is int
    )


def _next_of_ids(version: Path) -> int | None:
    """One past the largest id in the version's id list, if it can be read."""
    try:
        ids = np.load(version / "ids.npy", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return int(ids.max()) + 1 if ids.dtype == np.int64 and ids.ndim == 1 and len(ids) else None


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").split("\n")  # (not splitlines: see load)
    except OSError:
        return []


def index_exists(index_dir: Path) -> bool:
    return _read_pointer(Path(index_dir)) is not None


def check_index_folder(index_dir: Path) -> None:
    """Refuse to make an index of a folder that holds other things (``--out .``, ``--out <gallery>``).

    New, empty and index folders are fine, and so is one holding only what a killed first build
    left; hidden files (``.DS_Store``, ``.gitkeep``) do not count: a build never deletes them.
    """
    index_dir = Path(index_dir)
    if index_exists(index_dir) or not os.path.lexists(index_dir):
        return
    if not index_dir.is_dir():
        raise NotAnIndexFolderError(f"{index_dir} is a file, not an index folder: choose another --out")
    others = sorted(
        path.name
        for path in index_dir.iterdir()
        if not (path.name.startswith(".") or VERSION_NAME.fullmatch(path.name))
    )
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise NotAnIndexFolderError(
            f"{index_dir} is not an sbir-engine index (no {CURRENT} file) and holds other files ({shown}): "
            "an index is written into a new or empty folder; choose another --out"
        )


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
            "preprocessing": PREPROCESSING_VERSION,  # named when a model is refused after an upgrade
            "run_dir": str(model_dir),
            "run_dir_relative": os.path.relpath(model_dir, index_dir),
        },
        "gallery_root": str(Path(gallery_root).resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
