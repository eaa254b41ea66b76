"""A Milvus collection as the engine's vector store, beside the FAISS index folder.

One row per gallery image: ``id`` (the manifest's stable id, primary key), ``vector`` (the 512-d
embedding, COSINE metric), ``probabilities`` (the classifier's class probabilities, an ARRAY of
FLOAT, read back for the engine's re-ranking), ``path`` (relative to the gallery root),
``label`` ("" for none), ``sha256`` and ``size`` (for incremental builds). What the FAISS folder
keeps in ``index.json`` (model fingerprint and run folder, gallery root, classes, next id) is the
collection property ``sbir.meta``.

``uri`` is a local file ending in ``.db`` for Milvus Lite (``pip install -e '.[milvus]'`` in the checkout)
or ``http://host:19530`` for a Milvus standalone or cluster. :class:`MilvusStore` satisfies
:class:`~sbir_engine.index.VectorStore`, so :meth:`SketchEngine.from_store
<sbir_engine.engine.SketchEngine.from_store>` answers the same queries from it, and
:class:`MilvusTarget` lets ``build_index`` / ``add_files`` / ``remove_files`` write to it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .index import (
    Entry,
    ForeignIndexError,
    GalleryIndex,
    IndexFormatError,
    check_meta,
    query_matrix,
)

DEFAULT_COLLECTION = "sbir_gallery"
META_PROPERTY = "sbir.meta"
MAX_TOP_K = 16_384  # Milvus's limit on limit (+ offset) of one search or query
BATCH = 2_000  # rows per insert / upsert: ~5 MB of 512-d vectors, well under gRPC's message limit
CACHE_SIZE = 100_000  # entries kept from search results for the engine's lookups
_FIELDS = ["path", "label", "sha256", "size"]
# Index types of a float vector field: Milvus Lite builds only the first six, a server all of them.
# Milvus accepts any name when the collection is made and fails only when it loads it, so an
# unknown one would leave a collection no later command can open: names are checked up front.
LITE_INDEX_TYPES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW", "HNSW_SQ", "AUTOINDEX")
SERVER_INDEX_TYPES = (
    *LITE_INDEX_TYPES,
    *("IVF_PQ", "IVF_RABITQ", "HNSW_PQ", "HNSW_PRQ", "SCANN", "DISKANN"),
    *("GPU_BRUTE_FORCE", "GPU_IVF_FLAT", "GPU_IVF_PQ", "GPU_CAGRA"),
)


class MilvusUnavailable(RuntimeError):
    """pymilvus (or milvus-lite, for a local file) is not installed, or the URI cannot be used."""


def is_lite(uri: str) -> bool:
    return "://" not in str(uri)


def check_index_type(index_type: str | None, uri: str) -> str:
    """The Milvus index type to build (upper-case; the default when None or ""), or a ValueError
    naming the ones the backend at ``uri`` accepts."""
    lite = is_lite(uri)
    if not index_type:
        return "FLAT" if lite else "AUTOINDEX"
    accepted = LITE_INDEX_TYPES if lite else SERVER_INDEX_TYPES
    if index_type.strip().upper() not in accepted:
        where = "Milvus Lite (a .db file)" if lite else "a Milvus server"
        raise ValueError(
            f"--index-type {index_type!r} is not a Milvus index type; {where} accepts "
            f"{', '.join(accepted)} (FAISS factory strings such as HNSW32,Flat are for --backend faiss)"
        )
    return index_type.strip().upper()


def connect(uri: str, create: bool = True):
    """A ``MilvusClient``: a Milvus Lite file (created if missing, unless not ``create``) or a
    server's address."""
    try:
        from pymilvus import MilvusClient
    except ImportError as err:
        raise MilvusUnavailable(
            "the Milvus backend needs pymilvus (and milvus-lite for a local file): "
            "pip install -e '.[milvus]' in the sbir-engine checkout"
        ) from err
    # Every failed call raises a MilvusException to its caller; pymilvus (and Milvus Lite's
    # in-process server) also log it with a traceback, which would bury the one-line error.
    for name in ("pymilvus.decorators", "milvus_lite.adapter.grpc.servicer"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    uri = str(uri)
    if is_lite(uri):
        if not uri.endswith(".db"):
            raise MilvusUnavailable(f"a Milvus Lite URI is a local file ending in .db, not {uri!r}")
        if not create and not Path(uri).exists():  # (Milvus Lite keeps a folder by that name)
            raise MilvusUnavailable(
                f"{uri}: no such Milvus Lite file; make one with "
                "`sbir-engine build-index --backend milvus` or `sbir-engine index export-milvus`"
            )
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        uri = str(Path(uri).resolve())
    try:
        return MilvusClient(uri)
    except Exception as err:  # pymilvus raises its own and grpc's errors
        raise MilvusUnavailable(f"cannot connect to Milvus at {uri}: {err}") from err


def label_filter(labels: Iterable[str]) -> str:
    """A Milvus boolean expression keeping rows whose label is one of ``labels`` (quoted safely)."""
    return "label in [" + ", ".join(json.dumps(str(label), ensure_ascii=False) for label in labels) + "]"


class MilvusStore:
    """A gallery in a Milvus collection, with the :class:`~sbir_engine.index.VectorStore` interface.

    Scores are Milvus's COSINE similarities; with the default FLAT index they equal exact search
    (and FAISS ``Flat``) within float rounding. Entries and class probabilities of search results
    come back with the results and are kept in a bounded cache, so the engine's ``entries[id]``
    and ``probabilities[[rows[id], ...]]`` need no second round trip.
    """

    def __init__(self, client, uri: str, collection: str, meta: dict):
        self.client = client
        self.uri = str(uri)
        self.collection = collection
        self.meta = meta
        self.entries = _Entries(self)
        self.rows = _Rows(self)  # id → id: the cache is keyed by id
        self.probabilities = _Probabilities(self)
        self._cache: OrderedDict[int, tuple[Entry, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, uri: str, collection: str = DEFAULT_COLLECTION, client=None) -> MilvusStore | None:
        """The collection's store, or None when it does not exist."""
        client = client or connect(uri)
        if not client.has_collection(collection):
            return None
        properties = client.describe_collection(collection).get("properties") or {}
        if META_PROPERTY not in properties:
            raise ForeignIndexError(
                f"{uri}: collection {collection!r} was not written by sbir-engine (no {META_PROPERTY})"
            )
        try:
            meta = json.loads(properties[META_PROPERTY])
        except ValueError as err:
            raise IndexFormatError(f"{uri}: collection {collection!r} has damaged metadata ({err})") from err
        check_meta(meta, f"{uri}: collection {collection!r}")
        factory = str(meta.get("factory", "AUTOINDEX"))
        try:  # one written before index types were checked cannot load: build-index replaces it
            check_index_type(factory, uri)
        except ValueError as err:
            raise IndexFormatError(
                f"{uri}: collection {collection!r} has the index type {factory!r}, which Milvus cannot "
                "load; `sbir-engine build-index --backend milvus` rebuilds it"
            ) from err
        client.load_collection(collection)
        return cls(client, uri, collection, meta)

    @classmethod
    def create(
        cls,
        uri: str,
        collection: str,
        dim: int,
        n_classes: int,
        meta: dict,
        index_type: str | None = None,
        client=None,
    ) -> MilvusStore:
        """A new, empty collection (an existing one of that name is dropped)."""
        from pymilvus import DataType, MilvusClient

        index_type = check_index_type(index_type, uri)  # before the old collection is dropped
        client = client or connect(uri)
        if client.has_collection(collection):
            client.drop_collection(collection)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field(
            "probabilities", DataType.ARRAY, element_type=DataType.FLOAT, max_capacity=max(n_classes, 1)
        )
        schema.add_field("path", DataType.VARCHAR, max_length=4096)
        schema.add_field("label", DataType.VARCHAR, max_length=512)
        schema.add_field("sha256", DataType.VARCHAR, max_length=64)
        schema.add_field("size", DataType.INT64)
        index_params = client.prepare_index_params()
        index_params.add_index("vector", index_type=index_type, metric_type="COSINE")
        meta = {**meta, "backend": "milvus", "factory": index_type, "metric": "cosine"}
        client.create_collection(
            collection,
            schema=schema,
            index_params=index_params,
            consistency_level="Strong",  # a search sees every insert and delete before it
            properties={META_PROPERTY: json.dumps(meta)},
        )
        client.load_collection(collection)
        return cls(client, uri, collection, meta)

    # -- the VectorStore interface -------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def factory(self) -> str:
        return str(self.meta.get("factory", "AUTOINDEX"))

    @property
    def location(self) -> str:
        return f"{self.uri} (collection {self.collection})"

    def __len__(self) -> int:
        answer = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(answer[0]["count(*)"])

    def search(
        self, vectors: np.ndarray, k: int, labels: list[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cosine scores and ids of the k nearest rows (id -1 where fewer exist), as FAISS gives."""
        queries = query_matrix(vectors, self.dim)
        k = max(1, min(int(k), MAX_TOP_K))
        hits = self.client.search(
            self.collection,
            data=list(queries),
            limit=k,
            filter=label_filter(labels) if labels is not None else "",
            output_fields=[*_FIELDS, "probabilities"],
            search_params={"metric_type": "COSINE", "params": dict(self.meta.get("search_params") or {})},
        )
        scores = np.full((len(queries), k), -np.finfo(np.float32).max, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        fetched = []
        for row, found in enumerate(hits):
            for column, hit in enumerate(found):
                ids[row, column], scores[row, column] = int(hit["id"]), float(hit["distance"])
                fetched.append(_entry_of(hit["id"], hit["entity"]))
        self._remember(fetched)
        return scores, ids

    def add(self, entries: list[Entry], vectors: np.ndarray, probabilities: np.ndarray) -> None:
        """Upsert rows by id (a changed file keeps its id)."""
        for start in range(0, len(entries), BATCH):
            rows = [
                {
                    "id": int(entry.id),
                    "vector": np.asarray(vector, np.float32),
                    "probabilities": [float(p) for p in probs],
                    "path": entry.path,
                    "label": entry.label or "",
                    "sha256": entry.sha256,
                    "size": int(entry.size),
                }
                for entry, vector, probs in zip(
                    entries[start : start + BATCH],
                    vectors[start : start + BATCH],
                    probabilities[start : start + BATCH],
                    strict=True,
                )
            ]
            self.client.upsert(self.collection, rows)
        self._forget(e.id for e in entries)

    def remove(self, ids: Iterable[int]) -> int:
        ids = sorted({int(i) for i in ids})
        if not ids:
            return 0
        present = 0
        for start in range(0, len(ids), BATCH):
            chunk = ids[start : start + BATCH]
            present += len(self.client.get(self.collection, ids=chunk, output_fields=["id"]))
            self.client.delete(self.collection, ids=chunk)
        self._forget(ids)
        return present

    # -- metadata and lookups ------------------------------------------------------------------

    def save_meta(self) -> None:
        self.client.alter_collection_properties(
            self.collection, properties={META_PROPERTY: json.dumps(self.meta)}
        )

    def flush(self) -> None:
        if not is_lite(self.uri):
            self.client.flush(self.collection)

    def close(self) -> None:
        self.client.close()

    def fetch(self, ids: Iterable[int]) -> dict[int, tuple[Entry, np.ndarray]]:
        """Entries and probabilities by id: from the cache, else from Milvus (missing ids absent)."""
        wanted = [int(i) for i in ids]
        with self._lock:
            found = {i: self._cache[i] for i in wanted if i in self._cache}
        missing = [i for i in dict.fromkeys(wanted) if i not in found]
        for start in range(0, len(missing), MAX_TOP_K):
            rows = self.client.get(
                self.collection,
                ids=missing[start : start + MAX_TOP_K],
                output_fields=[*_FIELDS, "probabilities"],
            )
            fetched = [_entry_of(row["id"], row) for row in rows]
            self._remember(fetched)
            found.update((entry.id, (entry, probs)) for entry, probs in fetched)
        return found

    def relabel(self, entries: list[Entry]) -> None:
        """New paths and labels for entries (moved files): rows are upserted with their own vectors."""
        if entries:
            self.add(entries, *self.stored([entry.id for entry in entries]))

    def stored(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The vectors and class probabilities stored for entries, in the order of ``ids``."""
        wanted = [int(i) for i in ids]
        found = {}
        for start in range(0, len(wanted), MAX_TOP_K):
            chunk = wanted[start : start + MAX_TOP_K]
            for row in self.client.get(self.collection, ids=chunk, output_fields=["vector", "probabilities"]):
                found[int(row["id"])] = row
        vectors = np.array([found[i]["vector"] for i in wanted], np.float32).reshape(len(wanted), self.dim)
        probabilities = np.array([found[i]["probabilities"] for i in wanted], np.float32)
        return vectors, probabilities.reshape(len(wanted), -1)

    def iter_entries(self, batch_size: int = 5_000) -> Iterator[Entry]:
        """Every entry (without vectors), streamed: what an incremental build compares against."""
        with _quiet_lite(self.uri):
            iterator = self.client.query_iterator(
                self.collection, batch_size=batch_size, filter="", output_fields=["id", *_FIELDS]
            )
        try:
            while True:
                batch = iterator.next()
                if not batch:
                    return
                for row in batch:
                    yield _entry_of(row["id"], row)[0]
        finally:
            iterator.close()

    def _remember(self, fetched: list[tuple[Entry, np.ndarray]]) -> None:
        with self._lock:
            for entry, probs in fetched:
                self._cache[entry.id] = (entry, probs)
                self._cache.move_to_end(entry.id)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)

    def _forget(self, ids: Iterable[int]) -> None:
        with self._lock:
            for entry_id in ids:
                self._cache.pop(int(entry_id), None)


@contextmanager
def _quiet_lite(uri: str):
    """Milvus Lite has no timestamp service; pymilvus's iterator says so (harmlessly) at length."""
    names = ("pymilvus.client.iterator.query_iterator", "grpc._server") if is_lite(uri) else ()
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _entry_of(entry_id, fields: dict) -> tuple[Entry, np.ndarray]:
    entry = Entry(
        int(entry_id), fields["path"], fields.get("label") or None, fields["sha256"], int(fields["size"])
    )
    return entry, np.asarray(fields.get("probabilities") or [], np.float32)


class _Entries(Mapping):
    """id → Entry over the collection (cached from searches, fetched when missing)."""

    def __init__(self, store: MilvusStore):
        self._store = store

    def __getitem__(self, entry_id: int) -> Entry:
        found = self._store.fetch([entry_id])
        if int(entry_id) not in found:
            raise KeyError(entry_id)
        return found[int(entry_id)][0]

    def __contains__(self, entry_id) -> bool:
        return int(entry_id) in self._store.fetch([entry_id])

    def __iter__(self) -> Iterator[int]:
        return (entry.id for entry in self._store.iter_entries())

    def __len__(self) -> int:
        return len(self._store)

    def values(self) -> list[Entry]:  # one streamed pass, not one lookup per id
        return list(self._store.iter_entries())

    def items(self) -> list[tuple[int, Entry]]:
        return [(entry.id, entry) for entry in self._store.iter_entries()]


class _Rows(Mapping):
    """The engine's id → row step; rows of a Milvus store are its ids."""

    def __init__(self, store: MilvusStore):
        self._store = store

    def __getitem__(self, entry_id: int) -> int:
        return int(entry_id)

    def __iter__(self) -> Iterator[int]:
        return iter(self._store.entries)

    def __len__(self) -> int:
        return len(self._store)


class _Probabilities:
    """``probabilities[[id, ...]]`` → one row of class probabilities per id."""

    def __init__(self, store: MilvusStore):
        self._store = store

    def __getitem__(self, ids) -> np.ndarray:
        ids = [int(i) for i in np.atleast_1d(np.asarray(ids))]
        found = self._store.fetch(ids)
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"ids {missing[:5]} are not in {self._store.location}")
        if not ids:
            return np.zeros((0, len(self._store.meta.get("classes", []))), np.float32)
        return np.stack([found[i][1] for i in ids])


class MilvusTarget:
    """Where ``build_index`` / ``add_files`` / ``remove_files`` write when the backend is Milvus."""

    backend = "milvus"

    def __init__(self, uri: str, collection: str = DEFAULT_COLLECTION, index_type: str | None = None):
        self.uri = str(uri)
        self.collection = collection
        # Checked here, so that build-index refuses a wrong one before anything is embedded.
        self.index_type = check_index_type(index_type, self.uri) if index_type else None
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = connect(self.uri)
        return self._client

    @property
    def location(self) -> str:
        return f"{self.uri} (collection {self.collection})"

    @property
    def anchor(self) -> Path:
        return Path(self.uri).resolve().parent if is_lite(self.uri) else Path.cwd()

    @property
    def lock_path(self) -> Path | None:
        """Milvus Lite: a lock file per collection beside the database file (``build.writer_lock``).
        A server has none: writers on other machines would never see a local lock."""
        if not is_lite(self.uri):
            return None
        database = Path(self.uri).resolve()
        return database.parent / f".{database.name}.{self.collection}.lock"

    def open(self) -> MilvusStore | None:
        return MilvusStore.open(self.uri, self.collection, self.client)

    def open_existing(self) -> MilvusStore:
        if self._client is None:  # not a new, empty Milvus Lite file for a mistyped path
            self._client = connect(self.uri, create=False)
        store = self.open()
        if store is None:
            raise IndexFormatError(
                f"{self.uri} has no collection {self.collection!r}; make one with "
                "`sbir-engine build-index --backend milvus` or `sbir-engine index export-milvus`"
            )
        return store

    def model_dir(self, meta: dict) -> Path:
        return Path(meta["model"]["run_dir"])

    def create(self, dim: int, n_classes: int, meta: dict) -> MilvusStore:
        return MilvusStore.create(
            self.uri, self.collection, dim, n_classes, meta, self.index_type, self.client
        )

    def commit(self, store: MilvusStore, report) -> None:
        store.flush()
        report.total = len(store)
        store.meta.update(count=report.total, search_parameter=[None, None])
        store.meta["recall_at_10"] = 1.0 if store.factory == "FLAT" else None
        store.save_meta()
        report.factory = f"Milvus {store.factory} (COSINE)"
        if self.index_type and self.index_type != store.factory:  # an existing collection keeps its own
            report.notes.append(
                f"the collection keeps its index type {store.factory}: --index-type {self.index_type} "
                "applies when a collection is made (build-index --full makes it again)"
            )
        report.recall_at_10 = store.meta["recall_at_10"]
        report.memory_bytes = None
        report.seconds = time.perf_counter() - report.started


def export_to_milvus(
    index_dir: Path,
    uri: str,
    collection: str = DEFAULT_COLLECTION,
    overwrite: bool = False,
    index_type: str | None = None,
) -> MilvusStore:
    """Copy a FAISS index folder (vectors, probabilities, manifest, ids) into a new collection."""
    from .engine import resolve_model_dir

    index_type = check_index_type(index_type, uri)  # before anything is read or written
    index = GalleryIndex.load(index_dir)
    client = connect(uri)
    if client.has_collection(collection) and not overwrite:
        raise IndexFormatError(
            f"{uri} already has a collection {collection!r}; choose another --collection or --overwrite"
        )
    meta = json.loads(json.dumps(index.meta))
    meta["model"]["run_dir"] = str(resolve_model_dir(index_dir, index.meta).resolve())
    meta["exported_from"] = str(Path(index_dir).resolve())
    for key in ("search_parameter", "memory_budget", "memory_bytes", "factory_source", "trained_count"):
        meta.pop(key, None)
    store = MilvusStore.create(
        uri, collection, index.dim, index.probabilities.shape[1], meta, index_type, client
    )
    by_id = index.entries
    for start in range(0, len(index.ids), BATCH):
        ids = index.ids[start : start + BATCH]
        store.add(
            [by_id[int(i)] for i in ids],
            np.asarray(index.vectors[start : start + BATCH], np.float32),
            index.probabilities[start : start + BATCH],
        )
    store.flush()
    store.meta.update(count=len(store), recall_at_10=1.0 if store.factory == "FLAT" else None)
    store.save_meta()
    return store


def load_engine(uri: str, collection: str = DEFAULT_COLLECTION, model_dir: Path | None = None):
    """A :class:`~sbir_engine.engine.SketchEngine` answering from a Milvus collection."""
    from .engine import SketchEngine

    store = MilvusTarget(uri, collection).open_existing()
    return SketchEngine.from_store(store, model_dir)
