"""``build_index``: gallery folder → index, incrementally; ``add_files`` / ``remove_files`` edit one.

Rerunning a build embeds only new or changed files (by content hash), drops entries of deleted
files and keeps the ids of everything else; content indexed already is never embedded twice (a
moved or renamed file keeps its id and vector). A different model means a full rebuild. All three
share one code path (:func:`sbir_engine.update.update_store`): compare files with the manifest,
embed what is new, then ``remove`` / ``add`` on a :class:`~sbir_engine.index.VectorStore` and let
its target commit it — a FAISS index folder (:class:`FaissTarget`) or a Milvus collection
(``sbir_engine.milvus``).

``add_files`` keeps the rule that the index mirrors the gallery folder: a file inside the gallery
is indexed where it is; a file from elsewhere is first copied to ``<gallery>/<label>/<name>`` (or
``<gallery>/<name>`` without a label; :func:`sbir_engine.gallery.stage_files`), so a later
``build-index`` rescan finds it and changes nothing, and results always resolve under the
gallery root.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import IMAGE_EXTENSIONS, EngineConfig
from .embed import Embedder, check_batch_size
from .gallery import (
    NOT_UTF8,
    GalleryFile,
    check_drawing_patterns,
    drawing_matches,
    gallery_relative,
    is_drawing,
    is_utf8,
    shown,
    stage_files,
    walk_gallery,
)
from .index import (
    ForeignIndexError,
    GalleryIndex,
    IndexFormatError,
    Salvage,
    check_index_folder,
    index_exists,
)
from .index_factory import (
    TARGET_RECALL,
    IndexTypeError,
    check_factory,
    default_memory_budget,
    estimate_memory,
    factory_candidates,
    faiss_reason,
    needs_training,
    tune_search,
)
from .model import CONFIG_FILE, load_model
from .update import BuildReport, recorded_drawings, update_store

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer at a time is then the user's to keep
    fcntl = None


class IndexBusyError(RuntimeError):
    """Another build, add or remove is writing the same index."""


class IndexNotWritableError(RuntimeError):
    """The index folder, or the folder that holds it (and its writer's lock), cannot be written."""


# Re-entrant within a thread (add_files may call build_index); another thread's open file and
# flock conflict with this one's, so threads of one process exclude each other like processes.
class _HeldLocks(threading.local):
    def __init__(self) -> None:
        self.paths: set[Path] = set()


_held = _HeldLocks()


@contextmanager
def writer_lock(target) -> Iterator[None]:
    """One writer at a time per index: two builds that both read the old index would each write
    their own update, and the last would silently drop the other's files. A second writer fails
    at once with a message that says why. Readers (queries) never wait: commits are atomic swaps.
    """
    path = getattr(target, "lock_path", None)
    held = _held.paths
    if path is None or fcntl is None or path in held:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError as err:
        raise IndexNotWritableError(
            f"{target.location}: its writer's lock {path} cannot be made ({err.strerror or err}): the "
            "folder that holds the index must be writable"
        ) from err
    with handle:
        _check_writable(target)  # before anything is embedded, not when the new version is saved
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexBusyError(
                f"{target.location}: another build-index, index add or index remove is writing this index "
                "right now; run this again when it has finished"
            ) from None
        held.add(path)
        try:
            yield
        finally:
            held.discard(path)


def _check_writable(target) -> None:
    folder = getattr(target, "index_dir", None)
    if folder is None or not Path(folder).is_dir():
        return
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise IndexNotWritableError(
            f"{target.location}: the index folder cannot be written ({err.strerror or err}); "
            "nothing was changed"
        ) from err


class FaissTarget:
    """Where a build lands: a versioned FAISS index folder, committed by an atomic swap.

    The index type is chosen by size and memory budget unless ``index_type`` is given;
    ``keep_type`` (``index add`` / ``index remove``) keeps the type and budget a build chose.
    """

    backend = "faiss"

    def __init__(
        self,
        index_dir: Path,
        index_type: str | None = None,
        max_memory: int | None = None,
        keep_type: bool = False,
    ):
        self.index_dir = Path(index_dir)
        self.index_type = index_type
        self.max_memory = max_memory
        self.keep_type = keep_type

    @property
    def location(self) -> str:
        return str(self.index_dir)

    @property
    def anchor(self) -> Path:
        """The folder the model's relative path is stored against."""
        return self.index_dir

    @property
    def lock_path(self) -> Path:
        """Beside the folder, not in it: the folder itself is replaced when a build commits.
        Named after the folder itself, so a writer through a symlink to it takes the same lock."""
        folder = self.index_dir.resolve()
        return folder.parent / f".{folder.name}.lock"

    def open(self) -> GalleryIndex | None:
        if index_exists(self.index_dir):
            return GalleryIndex.load(self.index_dir)
        check_index_folder(self.index_dir)  # before any image is embedded
        return None

    def open_existing(self) -> GalleryIndex:
        return GalleryIndex.load(self.index_dir)  # says how to build one when there is none

    def model_dir(self, meta: dict) -> Path:
        from .engine import resolve_model_dir

        return resolve_model_dir(self.index_dir, meta)

    def salvage(self) -> Salvage:
        return Salvage.read(self.index_dir)

    def create(self, dim: int, n_classes: int, meta: dict) -> GalleryIndex:
        return GalleryIndex.empty(dim, n_classes, meta)

    def commit(self, store: GalleryIndex, report: BuildReport) -> None:
        meta = store.meta
        n, n_classes = len(store.ids), store.probabilities.shape[1]
        budget = self.max_memory or (meta.get("memory_budget") if self.keep_type else None)
        budget = budget or default_memory_budget()
        rejected = dict(meta.get("rejected_factories") or {})
        # A type the user chose: index add / remove keep it, a build without --index-type says it replaced it.
        chosen = (
            (meta.get("requested_factory") or store.factory) if meta.get("factory_source") == "user" else None
        )
        requested = self.index_type or (chosen if self.keep_type else None)
        if requested:
            candidates, source = [requested], "user"
            meta["requested_factory"] = requested  # kept while the index is empty (and Flat)
        else:
            candidates = factory_candidates(n, store.dim, budget, n_classes, rejected)
            source = "size"
            meta.pop("requested_factory", None)
        if n == 0 and needs_training(candidates[0], store.dim):
            # Nothing to train an IVF, PQ or SQ index on: an empty index is exact until images come.
            report.notes.append(f"no images: the index is Flat until some are added ({candidates[0]} then)")
            candidates = ["Flat"]
        for attempt, factory in enumerate(candidates):
            how, (name, value, recall) = self._build(store, factory, n)
            if recall >= TARGET_RECALL or attempt == len(candidates) - 1:
                break
            rejected[factory] = round(recall, 4)
            report.notes.append(
                f"{factory} reached recall@10 {recall:.3f} at most ({name}={value}) on this gallery: "
                f"using {candidates[attempt + 1]} instead"
            )
        meta["rejected_factories"] = rejected
        if source == "size" and chosen and chosen != factory:
            report.notes.append(
                f"index type {chosen} (chosen with --index-type) replaced by {factory}, the choice for "
                f"{n} images: pass --index-type {chosen} to keep it"
            )
        memory = estimate_memory(factory, n, store.dim, n_classes)
        meta.update(
            factory=factory,
            factory_source=source,
            memory_budget=budget,
            memory_bytes=memory,
            search_parameter=[name, value],
            recall_at_10=recall,
            count=n,
        )
        meta.setdefault("trained_count", n)
        report.factory, report.search_parameter, report.recall_at_10 = factory, (name, value), recall
        report.memory_bytes = memory
        if (
            report.updated or report.removed or (report.added and report.unchanged)
        ):  # an update, not a first build
            report.notes.append(f"FAISS index {how}")
        report.total = n
        report.seconds = time.perf_counter() - report.started
        store.save(self.index_dir, report.summary().splitlines())

    def _build(self, store: GalleryIndex, factory: str, n: int) -> tuple[str, tuple]:
        """Bring the FAISS index to ``factory`` and tune it; a FAISS error is one line naming the type."""
        # An IVF quantizer trained on a gallery less than half today's size is trained again.
        retrain = factory.startswith("IVF") and n > 2 * int(store.meta.get("trained_count") or n)
        try:
            how = store.refresh(factory, retrain)
            tuned = tune_search(store.index, store.vectors, factory)
            if tuned[2] < TARGET_RECALL and how == "updated in place" and factory != "Flat":
                how = store.refresh(factory, retrain=True)  # in-place additions may have cost recall
                tuned = tune_search(store.index, store.vectors, factory)
        except RuntimeError as err:  # FAISS's own, with its C++ source line: not a traceback
            raise IndexTypeError(
                f"index type {factory} cannot be built on {n} images ({faiss_reason(err)}); "
                "choose another with `build-index --index-type`"
            ) from err
        return how, tuned


def build_index(
    model_dir: Path,
    gallery: Path,
    index_dir: Path | None,
    index_type: str | None = None,
    batch_size: int = 32,
    max_memory: int | None = None,
    full: bool = False,
    embedder: Embedder | None = None,
    target=None,
    drawings: Iterable[str] | None = None,
) -> BuildReport:
    """Embed the gallery into an index; only new or changed files are embedded.

    ``target`` is where the index lives: a :class:`FaissTarget` over ``index_dir`` by default,
    or a ``sbir_engine.milvus.MilvusTarget``. ``drawings``: patterns naming the gallery's drawings
    (:func:`sbir_engine.gallery.is_drawing`), embedded as sketches are; None keeps the ones the
    index was built with, ``[]`` embeds every file as a photo. Files whose kind changes are
    embedded again.
    """
    check_batch_size(batch_size)
    drawings = None if drawings is None else check_drawing_patterns(drawings)
    target = target or FaissTarget(index_dir, index_type, max_memory)
    with writer_lock(target):
        report = BuildReport(target.location)
        _check_index_type(target, model_dir, embedder)
        store, fresh, salvage = None, False, None
        try:  # before the model loads: a refusal here is said at once
            store = target.open()
        except ForeignIndexError as err:
            if not full:  # replacing it would delete what another program or version wrote
                raise ForeignIndexError(f"{err}. Left as it is: `build-index --full` replaces it") from err
            report.full_rebuild_reason = f"asked for (--full): replacing an index it cannot read ({err})"
        except IndexFormatError as err:  # ours but damaged: the gallery rebuilds it
            report.full_rebuild_reason = f"the previous index cannot be used ({err})"
            salvage = target.salvage() if isinstance(target, FaissTarget) else None
        embedder = embedder or Embedder(load_model(model_dir))
        if store is not None and store.meta["model"]["fingerprint"] != embedder.model.fingerprint():
            report.full_rebuild_reason = (
                "the model differs from the one that built the previous index: every image is embedded again"
            )
            fresh = True
        elif store is not None and full:
            report.full_rebuild_reason = "asked for (--full): every image is embedded again"
            fresh = True
        if store is not None and not fresh and Path(store.meta["gallery_root"]) != Path(gallery).resolve():
            report.notes.append(
                f"the gallery moved from {store.meta['gallery_root']} to {Path(gallery).resolve()}: "
                "entries are matched by relative path and content hash, so nothing unchanged is embedded"
            )
        if salvage:  # every file embedded again, under the id it had
            store, fresh = salvage, True
            report.full_rebuild_reason += (
                f"; the ids of {len(salvage.entries)} files read from its manifest are kept"
            )
        if drawings is None and salvage is not None and "drawings" not in salvage.meta:
            report.notes.append(
                "the damaged index's --drawings patterns could not be read: every file is embedded as a "
                "photo; if some are drawings, run this again with --drawings"
            )
        if drawings is None:  # a rerun keeps what the user said of the gallery
            drawings = recorded_drawings(store)
        # What happens to the indexed images of a folder that cannot be listed: a full rebuild has
        # no vectors for them that it could keep (or, for another model, use).
        fate = (
            ""
            if store is None
            else ": a full rebuild drops its indexed images"
            if fresh
            else ": its indexed images are kept"
        )
        files, keep = _scan(gallery, report, drawings, fate)
        if not files and not keep and store is not None and not full and not salvage and len(store):
            # A disk not mounted leaves an empty mount point: every vector would be dropped at commit.
            raise ValueError(
                f"the gallery {shown(gallery)} holds no image files, but the index holds {len(store)}: "
                "nothing was changed (a disk that is not mounted, a folder emptied by mistake?); "
                "to empty the index, run build-index again with --full"
            )
        if isinstance(target, FaissTarget) and target.index_type:  # enough images to train it on?
            check_factory(target.index_type, embedder.config.embedding_dim, len(files))
        return update_store(
            target,
            store,
            files,
            report,
            embedder,
            model_dir,
            gallery,
            batch_size,
            True,
            keep=keep,
            fresh=fresh,
            drawings=drawings,
        )


def _scan(
    gallery: Path, report: BuildReport, drawings: list[str], fate: str
) -> tuple[list[GalleryFile], list[str]]:
    """The gallery files a build indexes, and the folders it could not list (their entries stay).

    A file whose name is not UTF-8 cannot be written to the manifest; it and an unlisted folder
    are reported as failures, the rest is built. A pattern that matches nothing is said: a typo
    would otherwise embed drawings as photos without a word.
    """
    scan = walk_gallery(gallery)
    if not scan.files and not scan.unlisted:  # an empty index is no error, but rarely what was meant
        kinds = ", ".join(IMAGE_EXTENSIONS)
        report.notes.append(f"the gallery {shown(gallery)} holds no image files ({kinds}), at any depth")
    for folder, reason in scan.unlisted:
        where = shown(folder or gallery)
        report.failed.append((where, f"folder cannot be listed ({reason}){fate}"))
    files = []
    for item in scan.files:
        if is_utf8(item.relative):
            files.append(item)
        else:
            report.failed.append((shown(item.relative), NOT_UTF8))
    named, unmatched = drawing_matches(files, drawings)
    if drawings:
        patterns = " ".join(f"--drawings {pattern!r}" for pattern in drawings)
        report.notes.append(f"{named} of {len(files)} files are drawings ({patterns}), embedded as sketches")
    for pattern in unmatched:
        report.notes.append(f"--drawings {pattern!r} matches no file in the gallery")
    return files, [folder for folder, _ in scan.unlisted]


def _check_index_type(target, model_dir: Path | None, embedder: Embedder | None) -> None:
    """A FAISS --index-type that cannot work is refused before the model loads (its dimension
    comes from the run's config), not after the whole gallery was embedded."""
    if not (isinstance(target, FaissTarget) and target.index_type):
        return
    if embedder is not None:
        dim = embedder.config.embedding_dim
    elif model_dir is not None and (Path(model_dir) / CONFIG_FILE).is_file():
        dim = EngineConfig.load(Path(model_dir) / CONFIG_FILE).embedding_dim
    else:
        return  # no run there: load_model says so
    check_factory(target.index_type, dim)


def add_files(
    index_dir: Path | None,
    paths: Iterable[Path],
    label: str | None = None,
    model_dir: Path | None = None,
    batch_size: int = 32,
    embedder: Embedder | None = None,
    target=None,
) -> BuildReport:
    """Index image files (or folders of them) into an existing index, embedding only those.

    Files inside the gallery are indexed where they are (their label is their first folder);
    files from elsewhere are copied into ``<gallery>/<label>/`` first (see the module doc).
    A model other than the index's means a full rebuild, which the report says.
    """
    check_batch_size(batch_size)
    target = target or FaissTarget(index_dir, keep_type=True)
    with writer_lock(target):
        report = BuildReport(target.location)
        store = target.open_existing()
        gallery = Path(store.meta["gallery_root"])
        if not gallery.is_dir():  # moved: files copied in would make the old path again, then be lost
            raise FileNotFoundError(
                f"the index's gallery folder {gallery} is not there (moved or renamed?): run "
                "`sbir-engine build-index --gallery <where it is now>` first, then index add"
            )
        model_dir = Path(model_dir) if model_dir else target.model_dir(store.meta)
        embedder = embedder or Embedder(load_model(model_dir))
        files, copied = stage_files(paths, gallery, label, report.failed)
        patterns = recorded_drawings(store)
        if as_photos := [key for key in copied if patterns and not is_drawing(key, patterns)]:
            # A drawing copied to <label>/ is embedded as a photo where the patterns name folders.
            more = f" and {len(as_photos) - 3} more" if len(as_photos) > 3 else ""
            report.notes.append(
                f"{len(as_photos)} files copied in are embedded as photos: no --drawings pattern "
                f"({' '.join(map(repr, patterns))}) names {', '.join(as_photos[:3])}{more}; to add a "
                "drawing, copy it where a pattern names it, then index add it there"
            )
        if store.meta["model"]["fingerprint"] != embedder.model.fingerprint():
            rebuilt = build_index(
                model_dir, gallery, None, batch_size=batch_size, embedder=embedder, target=target
            )
            rebuilt.failed[:0] = report.failed
            return _drop_failed_copies(rebuilt, copied)
        report = update_store(target, store, files, report, embedder, model_dir, gallery, batch_size, False)
        return _drop_failed_copies(report, copied)


def _drop_failed_copies(report: BuildReport, copied: dict[str, Path]) -> BuildReport:
    """A file copied in from outside that could not be indexed does not stay in the gallery."""
    failed = {path for path, _ in report.failed}
    for relative, destination in copied.items():
        if relative in failed:
            destination.unlink(missing_ok=True)
    return report


GALLERY_ROOT = (
    "is the gallery root: the whole gallery is not removed this way (name its folders or files; "
    "to start over, delete the index folder and run `build-index`)"
)


def remove_files(
    index_dir: Path | None, paths: Iterable[Path | str], delete_files: bool = False, target=None
) -> BuildReport:
    """Drop entries by path (a file, a folder of them, or a manifest path); nothing is embedded.

    The files stay in the gallery unless ``delete_files``; a later ``build-index`` rescan would
    index files that are still there again, which the report says.
    """
    target = target or FaissTarget(index_dir, keep_type=True)
    with writer_lock(target):
        report = BuildReport(target.location)
        store = target.open_existing()
        gallery = Path(store.meta["gallery_root"])
        by_path = {entry.path: entry.id for entry in store.entries.values()}
        drop: dict[int, str] = {}
        for given in paths:
            relative = gallery_relative(Path(given), gallery)
            if relative == "":  # with --delete-files it would empty the gallery: refused, not guessed at
                report.failed.append((shown(given), GALLERY_ROOT))
                continue
            if relative is None:
                report.failed.append(
                    (shown(given), f"not a file or folder inside the gallery {shown(gallery)}")
                )
                continue
            matched = (
                [relative] if relative in by_path else [p for p in by_path if p.startswith(relative + "/")]
            )
            if not matched:
                report.failed.append((shown(given), "not in the index"))
            drop.update((by_path[path], path) for path in matched)
        # lexists: a symlink whose target is gone is still a file in the gallery
        still_there = [gallery / path for path in drop.values() if os.path.lexists(gallery / path)]
        if still_there and not delete_files:
            report.notes.append(
                f"{len(still_there)} removed file(s) are still in the gallery folder: a later `build-index` "
                "indexes them again (delete them, or use --delete-files)"
            )
        report = update_store(target, store, [], report, None, None, gallery, 32, False, set(drop))
        if delete_files:  # only once the index no longer holds them: a failed commit deletes nothing
            _delete(still_there, gallery, report)
        return report


LINKED_FOLDER = "removed from the index, not deleted: it lies in a linked folder, outside the gallery"


def _delete(paths: list[Path], gallery: Path, report: BuildReport) -> None:
    """Delete removed files, as links where they are links; a file reached through a linked folder
    lies elsewhere (another disk, another collection) and is left there, as a linked file's target is."""
    real_gallery = gallery.resolve()
    for path in paths:
        if not Path(os.path.realpath(path.parent)).is_relative_to(real_gallery):
            report.failed.append((shown(path), LINKED_FOLDER))
            continue
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            report.failed.append((shown(path), f"removed from the index, not deleted ({err.strerror})"))
