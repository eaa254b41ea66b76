"""Bad input on real photos: a build never crashes, indexes every good image and names every bad one.

The corpus is generated here from real photos: odd but valid images (CMYK, 16-bit, palette with
transparency, RGBA, EXIF-rotated, animated, names with spaces and non-ASCII characters) must be
indexed; broken ones (empty, truncated, text, decompression bomb, FIFO, dangling link, unreadable)
must be listed with their path and reason; non-images and link loops are ignored.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import stat
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from sbir_engine.build import build_index
from sbir_engine.cli import app
from sbir_engine.config import EngineConfig
from sbir_engine.embed import Embedder
from sbir_engine.engine import SketchEngine
from sbir_engine.images import ImageError, load_rgb, load_sketch, open_image
from sbir_engine.index import GalleryIndex, current_version
from sbir_engine.model import load_model

ORIENTATION = 0x0112

# Reason each broken file must be reported with (a regular expression).
BAD_REASONS = {
    "cat/empty.jpg": r"file is empty \(0 bytes\)",
    "cat/truncated.jpg": r"corrupt or truncated",
    "cup/notes.png": r"not a recognised image format",
    "cup/bomb.png": r"too large to decode \(decompression bomb\?\), over the limit of 40,000,000 pixels",
    "fish/pipe.jpg": r"not a regular file",
    "fish/dangling.jpg": r"cannot be read \(No such file or directory\)",
}


@dataclass
class Corpus:
    root: Path
    good: list[str] = field(default_factory=list)  # relative paths that must be indexed
    bad: dict[str, str] = field(default_factory=dict)  # relative path → reason pattern
    ignored: list[str] = field(default_factory=list)  # present, but not images: never reported


def photos(small_photos: Path, label: str, n: int, start: int = 0) -> list[Path]:
    return sorted((small_photos / label).iterdir())[start : start + n]


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header (correct CRCs) that claims a huge image over a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + chunk(b"IEND", b"")
    )


def exif_rotated(photo: Path, out: Path, orientation: int) -> Image.Image:
    """Save a non-square crop of a photo with an EXIF orientation tag; return the upright image."""
    crop = Image.open(photo).convert("RGB").crop((0, 0, 64, 40))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    crop.save(out, "JPEG", quality=95, exif=exif)
    stored = Image.open(out)
    stored.load()
    turn = {6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}[orientation]
    return stored.transpose(turn)


def middle_of(photo: Path) -> Image.Image:
    """The 64×40 middle of a photo (the cup photos' corners are white background)."""
    image = Image.open(photo).convert("RGB")
    left, top = image.width // 2 - 32, image.height // 2 - 20
    return image.crop((left, top, left + 64, top + 40))


def make_corpus(root: Path, small_photos: Path) -> Corpus:
    corpus = Corpus(root)
    for label in ("airplane", "cat", "cup", "fish", "umbrella"):
        (root / label).mkdir(parents=True)

    def good(relative: str) -> Path:
        corpus.good.append(relative)
        return root / relative

    for label in ("airplane", "cat", "cup", "fish", "umbrella"):  # plain real photos
        for path in photos(small_photos, label, 2):
            shutil.copyfile(path, good(f"{label}/{path.name}"))
    cat, cup, fish, umbrella, airplane = (photos(small_photos, c, 3, 5) for c in
                                          ("cat", "cup", "fish", "umbrella", "airplane"))  # fmt: skip
    shutil.copyfile(cat[0], good("cat/my cat photo.jpg"))
    shutil.copyfile(cup[0], good("cup/tasse à café ☕.jpg"))
    shutil.copyfile(cat[2], good("cat/saved from a browser.jfif"))  # JPEGs by other names
    shutil.copyfile(fish[2], good("fish/old camera.JPE"))
    Image.open(fish[0]).save(good("fish/魚 1.png"))
    Image.open(fish[1]).convert("CMYK").save(good("fish/cmyk.jpg"), "JPEG", quality=95)
    grey = np.asarray(Image.open(fish[2]).convert("L"), np.uint16) * 257
    Image.fromarray(grey).save(good("fish/grey16.png"))  # mode I;16
    palette = Image.open(umbrella[0]).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.save(good("umbrella/palette.png"), transparency=0)
    rgba = Image.open(umbrella[1]).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(good("umbrella/rgba.png"))
    exif_rotated(airplane[0], good("airplane/rotated6.jpg"), 6)
    exif_rotated(airplane[1], good("airplane/rotated8.jpg"), 8)
    frames = [Image.open(p).convert("RGB") for p in cat]
    frames[0].save(good("cat/animated.gif"), save_all=True, append_images=frames[1:], duration=100, loop=0)
    # A phone's HEIC photo, turned by its EXIF tag as phones store portrait shots, and an AVIF.
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    middle_of(cup[1]).save(good("cup/IMG_0001.HEIC"), "HEIF", exif=exif.tobytes())
    Image.open(cup[2]).convert("RGB").save(good("cup/cup.avif"), "AVIF", quality=90)

    data = cat[1].read_bytes()
    (root / "cat/empty.jpg").write_bytes(b"")
    (root / "cat/truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "cup/notes.png").write_text("these are my notes, not a picture\n")
    (root / "cup/bomb.png").write_bytes(png_claiming(40_000, 40_000))
    os.mkfifo(root / "fish/pipe.jpg")  # reading it would block forever
    (root / "fish/dangling.jpg").symlink_to(root / "fish/gone.jpg")
    corpus.bad.update(BAD_REASONS)

    (root / "cat/readme.txt").write_text("not an image, not a failure\n")
    (root / "cat/loop").symlink_to("..", target_is_directory=True)  # gallery/cat/loop → gallery
    corpus.ignored += ["cat/readme.txt", "cat/loop"]
    return corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, small_photos) -> Corpus:
    return make_corpus(tmp_path_factory.mktemp("bad-input") / "gallery", small_photos)


@pytest.fixture(scope="module")
def embedder(small_run) -> Embedder:
    return Embedder(load_model(small_run))


@pytest.fixture(scope="module")
def built(corpus, small_run, embedder, tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("bad-input-index") / "index"
    return build_index(small_run, corpus.root, index_dir, embedder=embedder), index_dir


def test_the_corpus_is_what_it_claims(corpus):
    root = corpus.root
    bomb = (root / "cup/bomb.png").read_bytes()
    assert len(bomb) < 200 and bomb[12:16] == b"IHDR"
    assert struct.unpack(">II", bomb[16:24]) == (40_000, 40_000)  # 1.6 gigapixels claimed
    assert Image.open(root / "fish/cmyk.jpg").mode == "CMYK"
    assert Image.open(root / "fish/grey16.png").mode == "I;16"
    palette = Image.open(root / "umbrella/palette.png")
    assert palette.mode == "P" and "transparency" in palette.info
    assert Image.open(root / "umbrella/rgba.png").mode == "RGBA"
    assert Image.open(root / "cat/animated.gif").n_frames == 3
    assert Image.open(root / "airplane/rotated6.jpg").getexif()[ORIENTATION] == 6
    assert (root / "cup/IMG_0001.HEIC").read_bytes()[4:12] == b"ftypheic"
    assert (root / "cup/cup.avif").read_bytes()[4:12] == b"ftypavif"
    assert stat.S_ISFIFO(os.lstat(root / "fish/pipe.jpg").st_mode)
    assert (root / "cat/loop/cat/loop/cat").is_dir()  # a real loop
    assert not (root / "fish/dangling.jpg").exists()


def test_odd_but_valid_images_decode(corpus, small_photos):
    for relative in corpus.good:
        array = load_rgb(corpus.root / relative, 180)
        assert array.shape == (180, 180, 3) and array.dtype == np.float32, relative
        assert 0 <= array.min() and array.max() <= 255 and array.std() > 5, relative
    # EXIF orientation is applied: the 64×40 stored pixels come out 40×64, turned the right way.
    for name, orientation in (("rotated6.jpg", 6), ("rotated8.jpg", 8)):
        path = corpus.root / "airplane" / name
        assert Image.open(path).size == (64, 40)
        decoded = open_image(path)
        assert decoded.size == (40, 64)
        turn = {6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}[orientation]
        upright = Image.open(path).transpose(turn)
        np.testing.assert_array_equal(np.asarray(decoded), np.asarray(upright))
    # HEIC and AVIF decode to their photos (within the codecs' loss), the HEIC upright.
    cup = photos(small_photos, "cup", 3, 5)  # the corpus's sources
    heic = np.asarray(open_image(corpus.root / "cup/IMG_0001.HEIC"), np.float32)
    upright = middle_of(cup[1]).transpose(Image.Transpose.ROTATE_270)
    assert heic.shape == (64, 40, 3) and np.abs(heic - np.asarray(upright, np.float32)).mean() < 8
    avif = np.asarray(open_image(corpus.root / "cup/cup.avif"), np.float32)
    assert np.abs(avif - np.asarray(Image.open(cup[2]).convert("RGB"), np.float32)).mean() < 8
    # Transparency is paper: the transparent top of the RGBA photo comes out white.
    rgba = open_image(corpus.root / "umbrella/rgba.png")
    assert rgba.getpixel((10, 0))[3] == 0
    assert (load_rgb(rgba, 64)[0] == 255).all()


def test_a_missing_heic_or_avif_decoder_is_named(corpus, monkeypatch):
    """Without pillow-heif (or with a Pillow that lacks AVIF) such a photo is a named error saying what
    to install, not 'not a recognised image format'."""
    Image.init()
    monkeypatch.setattr(Image, "ID", [name for name in Image.ID if name not in ("HEIF", "AVIF")])
    reasons = {"cup/IMG_0001.HEIC": "pip install pillow-heif", "cup/cup.avif": "no AVIF decoder"}
    for relative, reason in reasons.items():
        with pytest.raises(ImageError, match=re.escape(reason)) as caught:
            open_image(corpus.root / relative)
        assert str(caught.value).startswith(str(corpus.root / relative))


def test_files_from_cameras_and_broken_downloads(corpus, small_photos, engine, tmp_path):
    """A 48 MP camera JPEG (over the pixel limit) is read at a quarter of its pixels, not refused, and
    embeds as its photo; a HEIC or AVIF cut short is corrupt, not a decoder to install (both are);
    a PIL image of a truncated file is an ImageError, as any other source; evaluate's sheet of missed
    sketches shows them upright."""
    from sbir_engine.evaluate import contact_sheet

    photo = Image.open(photos(small_photos, "airplane", 1)[0]).convert("RGB")
    camera = tmp_path / "DSC_0001.jpg"
    photo.resize((8000, 6000), Image.Resampling.BICUBIC).save(camera, "JPEG", quality=90)
    assert camera.stat().st_size < EngineConfig().max_upload_bytes
    assert open_image(camera).size == (4000, 3000)
    cosine = engine.embed(camera, sketch=False)[0] @ engine.embed(photo, sketch=False)[0]
    assert cosine > 0.98, cosine

    for relative, keep in (("cup/IMG_0001.HEIC", 200), ("cup/cup.avif", None)):
        data = (corpus.root / relative).read_bytes()
        cut = tmp_path / Path(relative).name
        cut.write_bytes(data[: keep or len(data) // 2])
        with pytest.raises(ImageError, match="corrupt or truncated"):
            open_image(cut)
    with pytest.raises(ImageError, match=r"truncated\.jpg: image data is corrupt or truncated"):
        engine.query(Image.open(corpus.root / "cat/truncated.jpg"))

    scan = photo.resize((120, 80))  # a scan stored sideways, with the tag that turns it upright
    sideways = tmp_path / "scan.jpg"
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    scan.transpose(Image.Transpose.ROTATE_90).save(sideways, quality=95, exif=exif)
    contact_sheet([{"path": sideways, "label": "cup", "top3": [("cup", 0.5)] * 3}], tmp_path / "sheet.png")
    cell = np.asarray(Image.open(tmp_path / "sheet.png").convert("L").crop((0, 0, 120, 120)), np.float32)
    upright, turned = (
        np.asarray(image.resize((120, 120)).convert("L"), np.float32)
        for image in (scan, scan.transpose(Image.Transpose.ROTATE_90))
    )
    assert np.abs(cell - upright).mean() < np.abs(cell - turned).mean() / 2


@pytest.mark.parametrize("relative", sorted(BAD_REASONS))
def test_each_bad_file_is_a_named_image_error(corpus, relative):
    path = corpus.root / relative
    with pytest.raises(ImageError, match=BAD_REASONS[relative]) as caught:
        load_rgb(path, 180)
    assert caught.value.source == str(path)
    with pytest.raises(ImageError, match=BAD_REASONS[relative]):
        load_sketch(path, 180)


def test_build_index_indexes_every_good_image_and_names_every_bad_one(built, corpus, embedder):
    report, index_dir = built
    assert report.total == report.added == len(corpus.good) == 24
    assert dict(report.failed).keys() == corpus.bad.keys()
    for relative, reason in report.failed:
        assert re.search(corpus.bad[relative], reason), (relative, reason)
    index = GalleryIndex.load(index_dir)
    assert sorted(e.path for e in index.entries.values()) == sorted(corpus.good)
    assert {e.label for e in index.entries.values()} == {"airplane", "cat", "cup", "fish", "umbrella"}
    assert len(index) == len(corpus.good)

    summary = report.summary()
    log = (current_version(index_dir) / "build.log").read_text(encoding="utf-8")
    for relative, reason in report.failed:
        assert f"failed {relative}: {reason}" in summary.splitlines()
        assert f"failed {relative}: {reason}" in log.splitlines()
    for relative in corpus.ignored:
        assert relative not in summary and relative not in log
    assert "24 images indexed" in log and "6 failed" in log

    # The EXIF-rotated photo was embedded upright: its vector is the upright image's, not the stored one's.
    by_path = {e.path: e.id for e in index.entries.values()}
    stored = index.vectors[index.rows[by_path["airplane/rotated6.jpg"]]]
    path = corpus.root / "airplane/rotated6.jpg"
    sideways = np.asarray(Image.open(path).convert("RGB"))  # pixels as stored, without the EXIF tag
    upright = np.rot90(sideways, k=-1)  # orientation 6: turn 90° clockwise to view
    vectors, _ = embedder(np.stack([load_rgb(upright, 180), load_rgb(sideways, 180)]))
    assert float(stored @ vectors[0]) > 0.9999
    assert float(stored @ vectors[1]) < 0.99


def test_cli_build_index_reports_failures_and_strict_fails(corpus, small_run, tmp_path):
    runner = CliRunner()
    out = tmp_path / "index"
    args = ["build-index", "--model", str(small_run), "--gallery", str(corpus.root), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert f"{len(corpus.good)} images indexed" in result.stdout
    log = (current_version(out) / "build.log").read_text(encoding="utf-8").splitlines()
    for relative, pattern in corpus.bad.items():
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"failed {relative}: "))
        assert re.search(pattern, line), line
        assert line in log
    assert len(GalleryIndex.load(out)) == len(corpus.good)

    # --strict: the same build (nothing left to embed) fails with a non-zero status, still naming the files.
    strict = runner.invoke(app, [*args, "--strict"])
    assert strict.exit_code == 3, strict.output
    assert "0 added" in strict.stdout and f"{len(corpus.good)} unchanged" in strict.stdout
    assert all(f"failed {relative}: " in strict.stdout for relative in corpus.bad)
    assert len(GalleryIndex.load(out)) == len(corpus.good)


@pytest.fixture(scope="module")
def engine(built, small_run) -> SketchEngine:
    return SketchEngine.load(built[1], small_run)


def bad_queries(corpus: Corpus, folder: Path) -> dict[str, tuple[Path, str]]:
    """Every kind of bad query file → (path, reason pattern)."""
    kinds = {Path(r).stem: (corpus.root / r, pattern) for r, pattern in corpus.bad.items()}
    blank = folder / "blank sketch é.png"
    Image.new("RGB", (300, 300), "white").save(blank)
    yellow = folder / "yellow pen.png"
    drawn = Image.new("RGB", (300, 300), "white")
    ImageDraw.Draw(drawn).ellipse((60, 60, 240, 240), outline=(255, 255, 0), width=6)
    drawn.save(yellow)
    huge = folder / "huge.png"
    limit = EngineConfig().max_upload_bytes
    huge.write_bytes((corpus.root / corpus.good[0]).read_bytes() + b"\0" * limit)
    kinds.update(
        missing=(folder / "missing.png", r"cannot be read \(No such file or directory\)"),
        text=(corpus.root / "cat/readme.txt", r"not a recognised image format"),
        blank=(blank, r"the sketch is empty \(no ink found\)"),
        yellow=(yellow, r"too light to tell from paper \(a stroke needs grey level 220 or darker"),
        huge=(huge, rf"file is [\d,]+ bytes, over the limit of {limit:,}"),
    )
    return kinds


def test_cli_query_gives_a_one_line_error_for_each_bad_kind(corpus, built, engine, tmp_path, monkeypatch):
    runner = CliRunner()
    index_dir = built[1]
    kinds = bad_queries(corpus, tmp_path)
    # The first query loads the engine for real; the rest reuse it (loading a model takes seconds).
    first, *rest = sorted(kinds)
    for n, kind in enumerate([first, *rest]):
        if n == 1:
            monkeypatch.setattr(SketchEngine, "load", classmethod(lambda cls, index, model=None: engine))
        path, pattern = kinds[kind]
        result = runner.invoke(app, ["query", str(path), "--index", str(index_dir)])
        assert result.exit_code == 1, (kind, result.output)
        assert not isinstance(result.exception, (ImageError, OSError)), kind
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.output, (kind, result.output)
        assert lines[0].startswith(f"error: {path}: "), (kind, lines[0])
        assert re.search(pattern, lines[0]), (kind, lines[0])
    # And a good query still works after all that.
    good = corpus.root / corpus.good[0]
    result = runner.invoke(app, ["query", str(good), "--index", str(index_dir), "-k", "3"])
    assert result.exit_code == 0 and result.output.startswith("class: "), result.output
    # A folder is its images (the API takes one image and names a folder as an error): each good one
    # answered, each bad one named on stderr, and the symlink back to the gallery root not followed.
    with pytest.raises(ImageError, match="is a folder, not an image file"):
        engine.query(corpus.root / "cat")
    result = runner.invoke(app, ["query", str(corpus.root / "cat"), "--index", str(index_dir), "--json"])
    answered = [json.loads(line)["sketch"] for line in result.stdout.strip().splitlines()]
    cats = sorted(str(corpus.root / r) for r in corpus.good if r.startswith("cat/"))
    assert result.exit_code == 1 and sorted(answered) == cats
    errors = result.stderr.strip().splitlines()
    bad_cats = [f"error: {corpus.root / r}: " for r in sorted(corpus.bad) if r.startswith("cat/")]
    assert len(errors) == len(bad_cats)
    assert all(e.startswith(b) for e, b in zip(sorted(errors), bad_cats, strict=True))


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_unreadable_file_is_reported(small_photos, small_run, embedder, tmp_path):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    good = photos(small_photos, "cat", 2)
    shutil.copyfile(good[0], gallery / "good.jpg")
    locked = gallery / "locked.jpg"
    shutil.copyfile(good[1], locked)
    locked.chmod(0)
    try:
        locked.read_bytes()
    except PermissionError:
        pass
    else:
        pytest.skip("running as root: chmod 000 does not stop reads (FIFOs and dangling links cover this)")
    try:
        report = build_index(small_run, gallery, tmp_path / "index", embedder=embedder)
        assert report.total == 1
        assert report.failed == [("locked.jpg", "cannot be read (Permission denied)")]
        with pytest.raises(ImageError, match="cannot be read"):
            load_rgb(locked, 180)
    finally:
        locked.chmod(0o644)


# -- limits on the API -------------------------------------------------------------------------------


def test_query_limits_name_the_limit(engine, corpus):
    photo = (corpus.root / corpus.good[0]).read_bytes()
    limit = engine.config.max_upload_bytes
    with pytest.raises(ImageError, match=f"upload is {limit + 1:,} bytes, over the limit of {limit:,}"):
        engine.query(photo + b"\0" * (limit + 1 - len(photo)))
    pixels = engine.config.max_pixels
    with pytest.raises(ImageError, match=f"image is 7000×6000 pixels, over the limit of {pixels:,} pixels"):
        engine.query(png_claiming(7000, 6000))  # 42 megapixels claimed in 4 kB: refused before decoding
    with pytest.raises(ImageError, match=f"decompression bomb\\?\\), over the limit of {pixels:,} pixels"):
        engine.query(png_claiming(40_000, 40_000))
    with pytest.raises(ImageError, match="file is empty"):
        engine.query(b"")
    # Just under the limits is fine.
    assert engine.query(photo + b"\0" * (limit - len(photo)), k=1).neighbours


# -- refusals with a clear, one-line message ---------------------------------------------------------


def build_args(model: Path, gallery: Path, out: Path) -> list[str]:
    return ["build-index", "--model", str(model), "--gallery", str(gallery), "--out", str(out)]


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, lines
    return lines[0]


def edit_meta(index_dir: Path, **changes) -> None:
    path = current_version(index_dir) / "index.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if key in ("fingerprint", "preprocessing"):
            meta["model"][key] = value
            if value is None:  # an index written before the key existed
                del meta["model"][key]
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def test_cli_refuses_mismatched_or_damaged_indexes_in_one_line(built, corpus, small_run, embedder, tmp_path):
    runner = CliRunner()
    sketch = corpus.root / corpus.good[0]
    cases = {
        "fingerprint": (dict(fingerprint="0" * 32), r"is not the one that built the index"),
        # An index from before an upgrade of the sketch normaliser: the message says what to rebuild.
        "preprocessing": (
            dict(fingerprint="0" * 32, preprocessing=None),
            r"built with sketch preprocessing version 1 .* Rebuild it with `sbir-engine build-index",
        ),
        "dimension": (dict(dim=256), r"embedding dimension mismatch"),
        "format": (dict(format_version=99), r"written in index format 99, newer than this sbir-engine reads"),
        "manifest": (None, rf"manifest does not match the index \({len(corpus.good) - 1} manifest entries"),
        "pointer": (None, r"CURRENT names v\d+, which is missing"),
    }
    for name, (changes, pattern) in cases.items():
        copy = tmp_path / name
        shutil.copytree(built[1], copy)
        if changes:
            edit_meta(copy, **changes)
        elif name == "manifest":
            manifest = current_version(copy) / "manifest.jsonl"
            manifest.write_text("".join(manifest.read_text(encoding="utf-8").splitlines(True)[1:]), "utf-8")
        else:
            (copy / "CURRENT").write_text("v999999\n")
        args = ["query", str(sketch), "--index", str(copy), "--json"]
        line = one_line_error(runner.invoke(app, args))
        assert re.search(pattern, line), (name, line)
    line = one_line_error(runner.invoke(app, ["query", str(sketch), "--index", str(tmp_path / "nowhere")]))
    assert "no such index folder; build one with `sbir-engine build-index`" in line
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    line = one_line_error(runner.invoke(app, build_args(not_a_run, corpus.root, tmp_path / "x")))
    assert "holds no trained model (model.keras)" in line
    line = one_line_error(runner.invoke(app, build_args(small_run, tmp_path / "nothing", copy)))
    assert "gallery folder" in line and "does not exist" in line

    # A build over an index it cannot use says so, rebuilds everything, and keeps ids by path.
    copy = tmp_path / "other-model"
    shutil.copytree(built[1], copy)
    ids = {e.path: e.id for e in GalleryIndex.load(copy).entries.values()}
    edit_meta(copy, fingerprint="0" * 32)
    report = build_index(small_run, corpus.root, copy, embedder=embedder)
    assert report.full_rebuild_reason and "model differs" in report.full_rebuild_reason
    assert report.summary().startswith("full rebuild: the model differs")
    assert report.embedded == len(corpus.good) and report.unchanged == 0
    assert {e.path: e.id for e in GalleryIndex.load(copy).entries.values()} == ids


def test_build_leaves_an_index_of_a_newer_format_alone_unless_told(built, corpus, small_run, tmp_path):
    copy = tmp_path / "newer"
    shutil.copytree(built[1], copy)
    edit_meta(copy, format_version=99)
    before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    line = one_line_error(CliRunner().invoke(app, build_args(small_run, corpus.root, copy)))
    assert "index format 99, newer than this sbir-engine reads" in line
    assert "Left as it is: `build-index --full` replaces it" in line
    assert {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
    replaced = CliRunner().invoke(app, build_args(small_run, corpus.root, copy) + ["--full"])
    assert replaced.exit_code == 0, replaced.output
    assert "full rebuild: asked for (--full): replacing an index it cannot read" in replaced.output
    assert len(GalleryIndex.load(copy)) == len(corpus.good)


def test_an_index_written_with_utf8_names_loads_under_an_ascii_locale(built):
    """The manifest is UTF-8 whatever the locale: non-ASCII file names survive a C-locale reader."""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    script = (
        "import json, locale, sys; from sbir_engine.index import GalleryIndex; "
        "print(locale.getpreferredencoding()); "
        "print(json.dumps(sorted(e.path for e in GalleryIndex.load(sys.argv[1]).entries.values())))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(built[1])], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    encoding, paths = out.stdout.splitlines()[-2:]
    assert encoding.lower() in ("ansi_x3.4-1968", "ascii", "us-ascii"), encoding
    assert "cup/tasse à café ☕.jpg" in json.loads(paths) and "fish/魚 1.png" in json.loads(paths)


# -- safe loading ----------------------------------------------------------------------------------------


def test_a_model_file_carrying_code_is_refused(small_run, tmp_path):
    import keras

    from sbir_engine.model import MODEL_FILE

    marker = tmp_path / "code-ran"
    run = tmp_path / "evil-run"
    run.mkdir()
    shutil.copyfile(small_run / "config.json", run / "config.json")
    inputs = keras.Input((4,))
    path = str(marker)  # (a closure: Keras stores it with the function's bytecode)
    touch = keras.layers.Lambda(lambda x: (open(path, "w").close(), x)[1], name="touch")
    keras.Model(inputs, touch(inputs)).save(run / MODEL_FILE)
    marker.unlink(missing_ok=True)
    # The file does carry code: unsafe loading would run it.
    keras.models.load_model(run / MODEL_FILE, safe_mode=False, compile=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match="(?i)lambda|safe_mode"):
        load_model(run)
    assert not marker.exists()
    line = one_line_error(CliRunner().invoke(app, build_args(run, tmp_path, tmp_path / "index")))
    assert "safe_mode" in line or "Lambda" in line or "lambda" in line
    assert not marker.exists()


UNSAFE_CALLS = {("pickle", "load"), ("pickle", "loads"), ("marshal", "loads"), ("dill", "load"),
                ("dill", "loads"), ("joblib", "load"), ("torch", "load")}  # fmt: skip


def test_the_package_never_unpickles_user_files():
    import ast

    import sbir_engine

    package = Path(sbir_engine.__file__).parent
    sources = sorted(package.glob("*.py"))
    assert len(sources) > 10
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for needle in ("pickle.load(", "pickle.loads(", "allow_pickle=True", "safe_mode=False",
                       "enable_unsafe_deserialization"):  # fmt: skip
            assert needle not in text, f"{path.name}: {needle}"
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = ast.unparse(node.func.value)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{path.name}: {ast.unparse(node)}"
            assert (owner.split(".")[-1], node.func.attr) not in UNSAFE_CALLS, where
            if owner in ("np", "numpy") and node.func.attr == "load":
                assert keywords.get("allow_pickle") == "False", where
            if node.func.attr == "load_model" and "keras" in owner:
                assert keywords.get("safe_mode") == "True", where
    # The .pth reader unpickles through a class that resolves only what it allows.
    from sbir_engine import pth

    unpicklers = [c for c in vars(pth).values() if isinstance(c, type) and issubclass(c, pickle.Unpickler)]
    assert unpicklers and all(c.find_class is not pickle.Unpickler.find_class for c in unpicklers)


def test_a_replay_gif_that_starts_blank_is_empty_and_says_which_frame(tmp_path):
    """Drawing apps export a drawing's replay as a GIF whose first frame is blank: the first frame is
    what is read (as documented), and the error now says so instead of a bare "no ink found"."""
    blank = Image.new("RGB", (200, 200), "white")
    half, drawn = blank.copy(), blank.copy()
    ImageDraw.Draw(half).arc((40, 40, 160, 160), 0, 180, fill="black", width=6)
    ImageDraw.Draw(drawn).ellipse((40, 40, 160, 160), outline="black", width=6)
    replay = tmp_path / "replay.gif"
    blank.save(replay, save_all=True, append_images=[half, drawn], duration=100)
    with pytest.raises(ImageError, match=r"no ink found in frame 1 of 3: of an animation only the first"):
        load_sketch(replay, 180)
    drawn.save(replay, save_all=True, append_images=[blank], duration=100)
    assert load_sketch(replay, 180).min() < 100  # the drawing in its first frame is read
