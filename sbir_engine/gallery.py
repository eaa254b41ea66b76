"""The gallery folder → its image files: names, labels, content hashes, and which are drawings.

A gallery holds photos and, where the user says so, drawings. A drawing is embedded as a query
sketch is (the sketch normaliser: crop to the ink, re-stroke at the bitmaps' line width), so that a
thin-lined scan or a large canvas export lands where the training drawings did; a photo is
resized as it is. Which files are drawings is the user's to say, with patterns over the gallery's
relative paths (``--drawings``): a guess would take white-background product photos for drawings.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from .config import IMAGE_EXTENSIONS


@dataclass
class GalleryFile:
    path: Path  # absolute, as found
    relative: str  # the manifest's key
    label: str | None


NOT_UTF8 = "its name is not valid UTF-8 (rename it: the index stores names as UTF-8)"


@dataclass
class GalleryScan:
    files: list[GalleryFile]
    # Folders that could not be listed (relative, "" for the root) and why: what the index holds
    # under them is kept, not dropped as deleted.
    unlisted: list[tuple[str, str]] = field(default_factory=list)


def walk_gallery(root: Path) -> GalleryScan:
    """Image files under ``root`` (the label is the first folder under the root, if any), and the
    folders that could not be listed (no permission, a dropped network mount).

    Symlinked folders are not followed, so a link loop cannot hang the scan.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"gallery folder {root} does not exist")
    scan = GalleryScan([])

    def unlisted(err: OSError) -> None:  # without it os.walk skips the folder: it would look empty
        folder = Path(err.filename) if err.filename else root
        relative = folder.relative_to(root).as_posix() if folder.is_relative_to(root) else "."
        scan.unlisted.append(("" if relative == "." else relative, err.strerror or str(err)))

    for folder, dirs, files in os.walk(root, onerror=unlisted, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
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


def check_drawing_patterns(patterns: Iterable[str]) -> list[str]:
    """``--drawings`` patterns, checked: relative to the gallery root, inside it, not empty."""
    checked = []
    for pattern in patterns:
        stripped = pattern.strip("/")
        if not stripped or pattern.startswith("/") or ".." in stripped.split("/") or stripped == ".":
            raise ValueError(
                f"--drawings {pattern!r} is not a pattern over the gallery's relative paths "
                "(e.g. 'sketches', '*/drawings' or '*.sketch.png')"
            )
        checked.append(stripped)
    return checked


def is_drawing(relative: str, patterns: Iterable[str]) -> bool:
    """Whether a gallery file (its manifest path) is a drawing, as ``.gitignore`` matches names:
    a pattern without "/" matches the file's name or any folder it is in (``sketches``,
    ``*.sketch.png``); one with "/" matches the path from the gallery root or a folder on it
    (``cat/drawings``, ``*/drawings``, where ``*`` may also cross folders)."""
    parts = relative.split("/")
    for pattern in patterns:
        if "/" in pattern:
            names = ("/".join(parts[: depth + 1]) for depth in range(len(parts)))
        else:
            names = iter(parts)
        if any(fnmatchcase(name, pattern) for name in names):
            return True
    return False


def unmatched_patterns(files: Iterable[GalleryFile], patterns: Iterable[str]) -> list[str]:
    """The patterns that name none of ``files``."""
    left = list(patterns)
    for item in files:
        left = [pattern for pattern in left if not is_drawing(item.relative, [pattern])]
        if not left:
            break
    return left
