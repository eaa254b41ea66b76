"""``build_index``: gallery folder → index folder, incrementally.

Rerunning it embeds only new or changed files (by content hash), drops entries of deleted files
and keeps the ids of everything else. A different model means a full rebuild.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import IMAGE_EXTENSIONS
from .embed import Embedder, embed_images
from .index import (
    Entry,
    GalleryIndex,
    IndexFormatError,
    choose_factory,
    index_exists,
    make_faiss_index,
    new_meta,
    tune_search,
)
from .model import load_model


@dataclass
class GalleryFile:
    path: Path  # absolute, as found
    relative: str  # the manifest's key
    label: str | None


@dataclass
class BuildReport:
    index_dir: Path
    total: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    embedded: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    factory: str = ""
    search_parameter: tuple[str | None, int | None] = (None, None)
    recall_at_10: float = 1.0
    full_rebuild_reason: str | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        lines = []
        if self.full_rebuild_reason:
            lines.append(f"full rebuild: {self.full_rebuild_reason}")
        lines.append(
            f"{self.total} images indexed in {self.index_dir}: {self.added} added, {self.updated} updated, "
            f"{self.removed} removed, {self.unchanged} unchanged, {len(self.failed)} failed "
            f"({self.embedded} embedded, {self.seconds:.1f} s)"
        )
        name, value = self.search_parameter
        tuned = f", {name}={value}" if name else ""
        lines.append(f"index type {self.factory}{tuned}, recall@10 vs exact {self.recall_at_10:.3f}")
        lines.extend(f"failed {path}: {reason}" for path, reason in self.failed)
        return "\n".join(lines)


def scan_gallery(root: Path) -> list[GalleryFile]:
    """Image files under ``root``; the label is the first folder under the root, if any.

    Symlinked folders are not followed, so a link loop cannot hang the scan.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"gallery folder {root} does not exist")
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            relative = path.relative_to(root)
            label = relative.parts[0] if len(relative.parts) > 1 else None
            found.append(GalleryFile(path, relative.as_posix(), label))
    return found


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_index(
    model_dir: Path,
    gallery: Path,
    index_dir: Path,
    index_type: str | None = None,
    batch_size: int = 32,
    max_memory: int | None = None,
    full: bool = False,
    embedder: Embedder | None = None,
) -> BuildReport:
    """Embed the gallery and write the index folder; only new or changed files are embedded."""
    started = time.perf_counter()
    index_dir = Path(index_dir)
    embedder = embedder or Embedder(load_model(model_dir))
    fingerprint = embedder.model.fingerprint()
    report = BuildReport(index_dir)

    previous = None
    if index_exists(index_dir) and not full:
        try:
            previous = GalleryIndex.load(index_dir)
        except IndexFormatError as err:
            report.full_rebuild_reason = f"the previous index cannot be used ({err})"
        if previous is not None and previous.meta["model"]["fingerprint"] != fingerprint:
            report.full_rebuild_reason = "the model differs from the one that built the previous index"
            previous = None
        if previous is not None and Path(previous.meta["gallery_root"]) != Path(gallery).resolve():
            report.full_rebuild_reason = "the gallery folder differs from the previous build's"
            previous = None

    old_by_path = {e.path: e for e in previous.entries.values()} if previous else {}
    old_rows = {int(i): row for row, i in enumerate(previous.ids)} if previous else {}
    # Ids are never reused, not even those of removed files.
    next_id = max(previous.meta.get("next_id", 0) if previous else 0, max(old_rows, default=-1) + 1)

    kept_entries: list[Entry] = []
    kept_vectors: list[np.ndarray] = []
    kept_probabilities: list[np.ndarray] = []
    to_embed: list[tuple[GalleryFile, str, int, int]] = []  # file, sha256, size, id
    seen = set()
    for item in scan_gallery(gallery):
        try:
            digest, size = file_sha256(item.path), item.path.stat().st_size
        except OSError as err:
            report.failed.append((item.relative, f"cannot be read ({err.strerror or err})"))
            continue
        seen.add(item.relative)
        old = old_by_path.get(item.relative)
        if old is not None and old.sha256 == digest and old.label == item.label:
            kept_entries.append(old)
            kept_vectors.append(previous.vectors[old_rows[old.id]])
            kept_probabilities.append(previous.probabilities[old_rows[old.id]])
            report.unchanged += 1
        else:
            if old is not None:
                report.updated += 1
                entry_id = old.id
            else:
                report.added += 1
                entry_id, next_id = next_id, next_id + 1
            to_embed.append((item, digest, size, entry_id))
    report.removed = sum(1 for path in old_by_path if path not in seen)

    embedded = embed_images(embedder, [f.path for f, *_ in to_embed], batch_size, "Embedding gallery")
    report.embedded = len(embedded.paths)
    failures = {path: reason for path, reason in embedded.failures}
    by_path = {f.path: (f, digest, size, entry_id) for f, digest, size, entry_id in to_embed}
    for path, reason in failures.items():
        item, *_ = by_path[path]
        report.failed.append((item.relative, reason))
        if item.relative in old_by_path:  # it was updated into something unreadable: drop the stale entry
            report.updated -= 1
            report.removed += 1
        else:
            report.added -= 1
    for path, vector, probs in zip(embedded.paths, embedded.vectors, embedded.probabilities, strict=True):
        item, digest, size, entry_id = by_path[path]
        kept_entries.append(Entry(entry_id, item.relative, item.label, digest, size))
        kept_vectors.append(vector)
        kept_probabilities.append(probs)

    dim = embedder.config.embedding_dim
    vectors = np.stack(kept_vectors).astype(np.float32) if kept_vectors else np.zeros((0, dim), np.float32)
    n_classes = len(embedder.config.classes)
    probabilities = (
        np.stack(kept_probabilities).astype(np.float32)
        if kept_probabilities
        else np.zeros((0, n_classes), np.float32)
    )
    ids = np.array([e.id for e in kept_entries], dtype=np.int64)
    report.total = len(ids)
    report.factory = index_type or choose_factory(len(ids), dim, max_memory)
    faiss_index = make_faiss_index(vectors, ids, report.factory)
    name, value, report.recall_at_10 = tune_search(faiss_index, vectors, report.factory)
    report.search_parameter = (name, value)

    meta = new_meta(dim, report.factory, fingerprint, model_dir, index_dir, gallery)
    meta.update(
        count=report.total,
        search_parameter=[name, value],
        recall_at_10=report.recall_at_10,
        next_id=next_id,
        classes=list(embedder.config.classes),
    )
    report.seconds = time.perf_counter() - started
    GalleryIndex(faiss_index, vectors, probabilities, ids, kept_entries, meta).save(
        index_dir, report.summary().splitlines()
    )
    return report
