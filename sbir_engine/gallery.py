"""The gallery folder → its image files: names, labels, content hashes, which are drawings, and
where ``index add`` puts files it brings in from outside.

A gallery holds photos and, where the user says so, drawings. A drawing is embedded as a query
sketch is (the sketch normaliser: crop to the ink, re-stroke at the bitmaps' line width), so that a
thin-lined scan or a large canvas export lands where the training drawings did; a photo is
resized as it is. Which files are drawings is the user's to say, with patterns over the gallery's
relative paths (``--drawings``): a guess would take white-background product photos for drawings.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePath

from .config import IMAGE_EXTENSIONS


@dataclass
class GalleryFile:
    path: Path  # absolute, as found
    relative: str  # the manifest's key
    label: str | None


NOT_UTF8 = "its name is not valid UTF-8 (rename it: the index stores names as UTF-8)"
# Folders that archivers and file managers leave beside one's images: a macOS zip's __MACOSX (its
# ._x.png are AppleDouble metadata, not images) and a Synology NAS's @eaDir (a thumbnail per image).
NOT_A_COLLECTION = ("__MACOSX", "@eaDir")
HIDDEN = "is hidden (a name starting with '.', or in __MACOSX or @eaDir): galleries leave such files out"


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is not part of an image collection: hidden (``.DS_Store``,
    ``.ipynb_checkpoints``, ``.Trash``) or an archiver's or file manager's (:data:`NOT_A_COLLECTION`)."""
    return name.startswith(".") or name in NOT_A_COLLECTION


@dataclass
class GalleryScan:
    files: list[GalleryFile]
    # Folders that could not be listed (relative, "" for the root) and why: what the index holds
    # under them is kept, not dropped as deleted.
    unlisted: list[tuple[str, str]] = field(default_factory=list)


def walk_gallery(root: Path) -> GalleryScan:
    """Image files under ``root`` (the label is the first folder under the root, if any), and the
    folders that could not be listed (no permission, a dropped network mount).

    Symlinked folders are followed (a class folder moved to another disk and linked back is still
    the class), each real folder once: a link loop or a second link to one folder is not walked
    again. Hidden files and folders (:func:`is_hidden`) are left out: thumbnails and metadata, not
    the collection.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"gallery folder {root} does not exist")
    scan = GalleryScan([])

    def unlisted(err: OSError) -> None:  # without it os.walk skips the folder: it would look empty
        folder = Path(err.filename) if err.filename else root
        relative = folder.relative_to(root).as_posix() if folder.is_relative_to(root) else "."
        scan.unlisted.append(("" if relative == "." else relative, err.strerror or str(err)))

    walked = {os.path.realpath(root)}

    def first_visit(folder: str) -> bool:
        real = os.path.realpath(folder)
        if real in walked:
            return False
        walked.add(real)
        return True

    for folder, dirs, files in os.walk(root, onerror=unlisted, followlinks=True):
        dirs[:] = [
            name for name in sorted(dirs) if not is_hidden(name) and first_visit(os.path.join(folder, name))
        ]
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix.lower() not in IMAGE_EXTENSIONS or is_hidden(name):
                continue
            relative = path.relative_to(root)
            label = relative.parts[0] if len(relative.parts) > 1 else None
            scan.files.append(GalleryFile(path, relative.as_posix(), label))
    return scan


def scan_gallery(root: Path) -> list[GalleryFile]:
    """Image files under ``root``: :func:`walk_gallery`'s files."""
    return walk_gallery(root).files


def shown(path: Path | str) -> str:
    """A path as a report shows it: a name that is not UTF-8 (Python's surrogate escapes) comes
    out with its bytes escaped (``caf\\xe9.png``), so printing or logging it cannot fail."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a byte name decoded with surrogateescape
        return False
    return True


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_drawing_patterns(patterns: Iterable[str] | str) -> list[str]:
    """``--drawings`` patterns, checked: relative to the gallery root, inside it, not empty.

    A single string is one pattern (not its characters); ``./`` and trailing slashes are dropped.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    checked = []
    for pattern in patterns:
        stripped = pattern.removeprefix("./").strip("/")
        parts = stripped.split("/")
        if not stripped or pattern.startswith(("/", "!")) or ".." in parts or "." in parts or "" in parts:
            raise ValueError(
                f"--drawings {pattern!r} is not a pattern over the gallery's relative paths "
                "(e.g. 'sketches', '*/drawings' or '*.sketch.png'; no leading '/' or '!')"
            )
        checked.append(stripped)
    return checked


def is_drawing(relative: str | PurePath, patterns: Iterable[str]) -> bool:
    """Whether a gallery file (its manifest path, a str or a relative Path) is a drawing, as
    ``.gitignore`` matches names: a pattern without "/" matches the file's name or any folder it is
    in (``sketches``, ``*.sketch.png``); one with "/" matches the path from the gallery root or a
    folder on it (``cat/drawings``, ``*/drawings``, where ``*`` may also cross folders), and one that
    starts with ``**/`` matches at any depth. Case counts, as it does in file names on Linux."""
    parts = (relative.as_posix() if isinstance(relative, PurePath) else relative).split("/")
    for pattern in patterns:
        anywhere = pattern.startswith("**/")
        pattern = pattern.removeprefix("**/") if anywhere else pattern
        starts = range(len(parts)) if anywhere else [0]
        if "/" in pattern:
            names = ("/".join(parts[i : j + 1]) for i in starts for j in range(i, len(parts)))
        else:
            names = iter(parts)
        if any(fnmatchcase(name, pattern) for name in names):
            return True
    return False


def drawing_matches(files: Iterable[GalleryFile], patterns: list[str]) -> tuple[int, list[str]]:
    """How many of ``files`` the patterns name drawings, and the patterns that name none of them."""
    if not patterns:  # most galleries: nothing to match
        return 0, []
    named, matched = 0, set()
    for item in files:
        hits = {pattern for pattern in patterns if is_drawing(item.relative, [pattern])}
        named += bool(hits)
        matched |= hits
    return named, [pattern for pattern in patterns if pattern not in matched]


def gallery_relative(path: Path, gallery: Path) -> str | None:
    """``path`` as a manifest key ("" for the gallery root itself; None if outside the gallery).

    A path on disk (or an absolute one) is taken relative to the gallery root; anything else is
    taken to be a manifest key already, as ``query`` prints them. The file itself comes first,
    its folders resolved: a symlink in the gallery is that entry (as a rescan finds it), not the
    file it points to. Only a path that is not in the gallery so is resolved to its target.
    """
    bases = [gallery.resolve(), Path(os.path.abspath(gallery))]
    absolute = Path(os.path.abspath(path))
    candidates = [absolute.parent.resolve() / absolute.name]
    if os.path.lexists(path):
        candidates.append(absolute.resolve())
    for candidate in candidates:
        for base in bases:
            if candidate.is_relative_to(base):
                relative = candidate.relative_to(base).as_posix()
                return "" if relative == "." else relative
    if path.is_absolute() or os.path.lexists(path):
        return None
    return path.as_posix().strip("/")


def stage_files(
    paths: Iterable[Path], gallery: Path, label: str | None, failed: list[tuple[str, str]]
) -> tuple[list[GalleryFile], dict[str, Path]]:
    """The gallery files that ``index add`` indexes, and the files it copied in from outside (by
    manifest key): a file inside the gallery is taken where it is, its first folder its label; a
    file or folder from elsewhere is copied to ``<gallery>/<label>/`` (see :mod:`sbir_engine.build`).
    Files that cannot be staged go to ``failed`` as (path, reason)."""
    gallery = Path(gallery)
    if label is not None and (not label or "/" in label or label in (".", "..") or not is_utf8(label)):
        raise ValueError(f"--label {shown(label)!r} is not a folder name (in UTF-8)")
    if label is not None and is_hidden(label):
        raise ValueError(f"--label {shown(label)!r} {HIDDEN}")
    staged: dict[str, GalleryFile] = {}
    copied: dict[str, Path] = {}
    for given in paths:
        given = Path(given)
        if not given.exists():
            failed.append((shown(given), "no such file or folder"))
            continue
        # A linked file or folder in the gallery is indexed as itself, where a rescan finds it.
        inside = gallery_relative(given, gallery)
        if given.is_dir():
            scan = walk_gallery(given)
            failed.extend(
                (shown(given / folder), f"cannot be listed ({why})") for folder, why in scan.unlisted
            )
            sources = [(f.path, Path(f.relative)) for f in scan.files]
        elif given.suffix.lower() in IMAGE_EXTENSIONS:
            sources = [(given, Path(given.name))]
        else:
            failed.append((shown(given), f"not an image file ({', '.join(IMAGE_EXTENSIONS)})"))
            continue
        for source, relative in sources:
            if not is_utf8(relative.as_posix()) or inside is not None and not is_utf8(inside):
                failed.append((shown(source), NOT_UTF8))
                continue
            # A rescan would drop it again (a folder's hidden files walk_gallery has left out already).
            if any(is_hidden(part) for part in Path(inside or "", relative).parts):
                failed.append((shown(source), HIDDEN))
                continue
            if inside is not None:  # indexed in place; its folder is its label
                key = Path(inside, relative).as_posix() if given.is_dir() else inside
                file_label = key.split("/")[0] if "/" in key else None
                if label is not None and file_label != label:
                    failed.append(
                        (key, f"inside the gallery its label is its folder ({file_label}), not {label!r}")
                    )
                    continue
                staged[key] = GalleryFile(gallery / key, key, file_label)
                continue
            key = (Path(label) / relative if label else relative).as_posix()
            destination = gallery / key
            if destination.exists():
                if file_sha256(destination) != file_sha256(source):
                    failed.append((shown(source), f"{shown(destination)} exists and is a different file"))
                    continue
            else:
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, destination)
                copied[key] = destination
            staged[key] = GalleryFile(destination, key, key.split("/")[0] if "/" in key else None)
    return list(staged.values()), copied
