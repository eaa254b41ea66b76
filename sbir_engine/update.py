"""The one update path of ``build_index``, ``add_files`` and ``remove_files``
(:func:`update_store`): compare the gallery's files with the store's manifest, reuse the vectors
of content indexed already, embed the rest (each content once), then ``remove`` / ``relabel`` /
``add`` on the :class:`~sbir_engine.index.VectorStore` and let its target commit it; and the
:class:`BuildReport` all three return.
"""

from __future__ import annotations

import os
import stat
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .embed import Embedder, embed_images
from .gallery import GalleryFile, file_sha256, is_drawing
from .index import Entry, VectorStore, new_meta, repeated_contents


@dataclass
class BuildReport:
    """What a build, ``index add`` or ``index remove`` did: the counts, each failed file with its
    reason, notes, and the index type it committed."""

    index_dir: Path
    total: int = 0
    added: int = 0
    updated: int = 0
    moved: int = 0  # files moved or renamed in the gallery: their entries keep id and vector
    removed: int = 0
    unchanged: int = 0
    embedded: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    factory: str = ""
    search_parameter: tuple[str | None, int | None] = (None, None)
    recall_at_10: float | None = 1.0  # None: not measured (an index Milvus chose)
    memory_bytes: int | None = None  # the estimate the index type was chosen by
    full_rebuild_reason: str | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter, repr=False)  # the clock of `seconds`

    def summary(self) -> str:
        lines = []
        if self.full_rebuild_reason:
            lines.append(f"full rebuild: {self.full_rebuild_reason}")
        lines.append(
            f"{self.total} images indexed in {self.index_dir}: {self.added} added, {self.updated} updated, "
            f"{self.moved} moved, "
            f"{self.removed} removed, {self.unchanged} unchanged, {len(self.failed)} failed "
            f"({self.embedded} embedded, {self.seconds:.1f} s)"
        )
        name, value = self.search_parameter
        tuned = f", {name}={value}" if name else ""
        recall = "not measured" if self.recall_at_10 is None else f"{self.recall_at_10:.3f}"
        memory = f", ~{self.memory_bytes / 2**20:,.0f} MiB in memory" if self.memory_bytes is not None else ""
        lines.append(f"index type {self.factory}{tuned}, recall@10 vs exact {recall}{memory}")
        lines.extend(self.notes)
        lines.extend(f"failed {path}: {reason}" for path, reason in self.failed)
        return "\n".join(lines)


def recorded_drawings(store) -> list[str]:
    """The ``--drawings`` patterns the store was built with ([] for none, or no store)."""
    return list(store.meta.get("drawings", [])) if store is not None else []


def update_store(
    target,
    store: VectorStore | None,
    files: list[GalleryFile],
    report: BuildReport,
    embedder: Embedder | None,
    model_dir: Path | None,
    gallery: Path,
    batch_size: int,
    drop_missing: bool,
    drop: set[int] = frozenset(),
    fresh: bool = False,
    keep: Iterable[str] = (),
    drawings: list[str] | None = None,
) -> BuildReport:
    """The one update path: compare ``files`` with the manifest, embed what is new or changed,
    remove ``drop`` (and, for a rescan, entries whose file is gone), add, commit.

    ``fresh``: embed every file into a new, empty store (another model), keeping ids by path.
    ``keep``: folders a rescan could not list ("" the root): their entries are not taken for gone.
    ``drawings``: the patterns that name the drawings (None: those the store was built with); a
    file they now name otherwise than before is embedded again, as what it now is.
    Content already indexed as the same kind (same sha256) is not embedded again: its vector is
    reused, and a file moved or renamed within the gallery keeps its entry's id.
    """
    before = recorded_drawings(store)
    drawings = before if drawings is None else drawings
    old_by_path = {e.path: e for e in store.entries.values()} if store is not None else {}
    next_id = int(store.meta.get("next_id", 0)) if store is not None else 0
    next_id = max(next_id, max(old_by_path.values(), key=lambda e: e.id).id + 1 if old_by_path else 0)
    to_embed: list[_Task] = []
    indexed: dict[tuple[str, bool], int] = {}  # (sha256, drawing) → an entry holding its vector
    elsewhere: dict[tuple[str, bool], list[Entry]] = defaultdict(list)  # the same, at paths not given
    present = {item.relative for item in files}
    for entry in old_by_path.values():
        key = (entry.sha256, is_drawing(entry.path, before))
        if not fresh:  # another model's vectors are of no use, but a moved file still keeps its id
            indexed[key] = entry.id
        if entry.path not in present and not _under(entry.path, keep):
            elsewhere[key].append(entry)
    moved: set[int] = set()  # ids whose file moved: kept by the file at its new path
    seen = set()
    contents: list[str] = []  # the sha256 of every file: copies are reported
    rekinded = {True: 0, False: 0}  # files now named otherwise by --drawings: now a drawing / a photo
    for item in files:
        try:
            info = item.path.stat()
            if not stat.S_ISREG(info.st_mode):  # a FIFO or a device: reading it could block forever
                report.failed.append((item.relative, "is not a regular file (a pipe, socket or device)"))
                continue
            digest, size = file_sha256(item.path), info.st_size
        except OSError as err:
            report.failed.append((item.relative, f"cannot be read ({err.strerror or err})"))
            continue
        seen.add(item.relative)
        contents.append(digest)
        old = old_by_path.get(item.relative)
        drawing = is_drawing(item.relative, drawings)
        same_kind = old is None or is_drawing(old.path, before) == drawing
        if old is not None and old.sha256 == digest and old.label == item.label and same_kind and not fresh:
            continue
        if not same_kind and not fresh:
            rekinded[drawing] += 1
        if old is not None:
            report.updated += 1  # re-embedded under its id
            entry_id = old.id
        elif (source := _moved_from(elsewhere[(digest, drawing)], gallery, drop_missing)) is not None:
            report.moved += 1  # the content of a file that is gone: moved or renamed here
            entry_id = source.id
            moved.add(entry_id)
        else:
            report.added += 1
            entry_id, next_id = next_id, next_id + 1  # ids are never reused
        to_embed.append(_Task(item, digest, size, info.st_mtime_ns, entry_id, drawing))
    for now_drawing, count in rekinded.items():
        if count:
            why = "drawings: --drawings now names" if now_drawing else "photos: --drawings no longer names"
            report.notes.append(f"{count} files embedded again as {why} them")
    drop = set(drop)
    if drop_missing:
        drop |= {
            e.id for path, e in old_by_path.items() if path not in seen and (fresh or not _under(path, keep))
        } - moved
        copies = repeated_contents(contents)
        if copies:  # indexed all the same: each is a path someone may look for
            report.notes.append(
                f"{copies} files repeat another file's content (same sha256); "
                "a query answers with each content once and names its copies"
            )

    # A moved file keeps its entry's vector: only the manifest changes (FAISS is not touched).
    relabelled = [] if fresh else [task.entry() for task in to_embed if task.entry_id in moved]
    to_embed = [task for task in to_embed if fresh or task.entry_id not in moved]
    new_entries, vectors, probabilities = _reuse(
        store, [task for task in to_embed if task.key in indexed], indexed, report
    )
    to_embed = [task for task in to_embed if task.key not in indexed]
    if to_embed and embedder is None:
        raise ValueError("files to embed but no model")
    if to_embed:
        embedded = _embed_once(embedder, to_embed, batch_size, report)
        for task, reason in embedded.failures:
            report.failed.append((task.item.relative, reason))
            if task.item.relative in old_by_path:  # updated into something unreadable: drop the stale entry
                report.updated -= 1
                drop.add(task.entry_id)
            else:
                report.added -= 1
        for task in embedded.changed:  # an indexed file keeps its entry (hash and vector) as it was
            report.failed.append((task.item.relative, CHANGED_DURING_BUILD))
            if task.item.relative in old_by_path:
                report.updated -= 1
                if fresh:  # a new store holds no entry of it
                    drop.add(task.entry_id)
            else:
                report.added -= 1
        new_entries.extend(task.entry() for task in embedded.tasks)
        vectors.append(embedded.vectors)
        probabilities.append(embedded.probabilities)
    report.removed = len(drop & {e.id for e in old_by_path.values()})
    report.unchanged = 0 if fresh else len(old_by_path) - report.updated - report.removed - report.moved

    if embedder is not None:
        meta = new_meta(
            embedder.config.embedding_dim,
            store.meta.get("factory", "Flat") if store is not None else "Flat",
            embedder.model.fingerprint(),
            model_dir,
            target.anchor,
            gallery,
        )
        meta["classes"] = list(embedder.config.classes)
        meta["drawings"] = list(drawings)
        if store is None or fresh:
            store = target.create(embedder.config.embedding_dim, len(embedder.config.classes), meta)
        else:
            meta["created"] = store.meta.get("created", meta["created"])
            store.meta.update(meta)
    store.meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    store.meta["next_id"] = next_id
    store.remove(drop)
    store.relabel(relabelled)
    if new_entries:
        store.add(new_entries, np.concatenate(vectors), np.concatenate(probabilities))
    target.commit(store, report)
    return report


class _Task(NamedTuple):
    """A gallery file to index under ``entry_id``: embedded, or given a stored vector."""

    item: GalleryFile
    digest: str  # sha256
    size: int
    mtime_ns: int  # with size: the file as it was hashed
    entry_id: int
    drawing: bool

    @property
    def key(self) -> tuple[str, bool]:
        """What its vector depends on: the content, and whether it is embedded as a drawing."""
        return self.digest, self.drawing

    def entry(self) -> Entry:
        return Entry(self.entry_id, self.item.relative, self.item.label, self.digest, self.size)


def _reuse(
    store: VectorStore | None, tasks: list[_Task], indexed: dict[tuple[str, bool], int], report: BuildReport
) -> tuple[list[Entry], list[np.ndarray], list[np.ndarray]]:
    """Entries for files whose content the store holds already (``indexed``: an entry by key), with
    that entry's stored vector and probabilities: a moved, renamed or copied file is not embedded."""
    if not tasks:
        return [], [], []
    vectors, probabilities = store.stored([indexed[task.key] for task in tasks])
    report.notes.append(f"{len(tasks)} files not embedded: their content is indexed already (copies)")
    return (
        [task.entry() for task in tasks],
        [np.asarray(vectors, np.float32)],
        [np.asarray(probabilities, np.float32)],
    )


class _Embedded(NamedTuple):
    tasks: list[_Task]  # row i of vectors and probabilities is tasks[i]'s
    vectors: np.ndarray
    probabilities: np.ndarray
    failures: list[tuple[_Task, str]]
    changed: list[_Task]  # files edited between their hash and their decode: vectors left out


CHANGED_DURING_BUILD = "changed while the build read it: indexed as it is now by the next build"


def _changed_since_scan(task: _Task) -> bool:
    """Whether the file is no longer what was hashed: its vector could then be another content's,
    stored under this digest (and reused for copies of it) until a --full rebuild."""
    try:
        info = task.item.path.stat()
    except OSError:
        return True
    return (info.st_size, info.st_mtime_ns) != (task.size, task.mtime_ns)


def _embed_once(embedder: Embedder, tasks: list[_Task], batch_size: int, report: BuildReport) -> _Embedded:
    """Embed the tasks' files, each content (and kind) once: new copies of one file share its vector,
    and its failure."""
    first: dict[tuple[str, bool], _Task] = {}
    for task in tasks:
        first.setdefault(task.key, task)
    unique = list(first.values())
    sketches = {task.item.path for task in unique if task.drawing}
    paths = [task.item.path for task in unique]
    embedded = embed_images(embedder, paths, batch_size, "Embedding gallery", sketches=sketches)
    report.embedded = len(embedded.paths)
    row = {path: i for i, path in enumerate(embedded.paths)}
    failed = dict(embedded.failures)
    changed = {task.item.path for task in unique if task.item.path in row and _changed_since_scan(task)}
    for path in changed:
        del row[path]
    done = [task for task in tasks if first[task.key].item.path in row]
    if len(done) > len(row):
        report.notes.append(
            f"{len(done) - len(row)} files not embedded: they repeat another new file's content (copies)"
        )
    rows = [row[first[task.key].item.path] for task in done]
    return _Embedded(
        done,
        embedded.vectors[rows],
        embedded.probabilities[rows],
        [(task, failed[first[task.key].item.path]) for task in tasks if first[task.key].item.path in failed],
        [task for task in tasks if first[task.key].item.path in changed],
    )


def _moved_from(candidates: list[Entry], gallery: Path, rescan: bool) -> Entry | None:
    """Of the entries with a new file's content at other paths, one whose file is gone (taken off
    the list): for a rescan, any that it did not find; for ``index add``, one no longer on disk."""
    for position, entry in enumerate(candidates):
        if rescan or not os.path.lexists(Path(gallery) / entry.path):
            return candidates.pop(position)
    return None


def _under(path: str, folders: Iterable[str]) -> bool:
    """Whether a manifest path lies in one of ``folders`` (relative; "" is the gallery root)."""
    return any(not folder or path.startswith(folder + "/") for folder in folders)
