"""Image decoding and the sketch normaliser: any file, array or canvas → the network's RGB input.

Every path into the model (training, gallery embedding, queries) goes through these functions, so
an image is resized the same way wherever it comes from.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path
from typing import IO

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .paper import (
    PAPER_WHITE,
    border,
    crop_to_page,
    erase_ruled_lines,
    flatten_paper,
    shrunk,
    stroke_width,
)

try:  # HEIC/HEIF, the format phone cameras save photos in, is a Pillow plugin of its own
    from pillow_heif import register_heif_opener
except ImportError:  # decoding then fails with a message that names the package
    pass
else:
    register_heif_opener()

# A binary file object (anything with .read(): an open file, BytesIO, an upload) is read from where it is.
ImageSource = str | Path | bytes | bytearray | memoryview | IO[bytes] | np.ndarray | Image.Image
# What open_image says it takes when given something else.
ACCEPTED = "a path (str or Path), bytes, a binary file object, a numpy array or a PIL image"

# Bumped whenever image decoding or the sketch normaliser changes what the network sees: it is part of
# every model fingerprint, so an index embedded under another version is refused, not silently mixed.
# 2: canvas strokes are re-stroked to a measured width (see _restroke).
PREPROCESSING_VERSION = 2

# Ink is anything darker than this on the 0–255 grey scale after compositing onto white.
INK_THRESHOLD = 200
# A drawing larger than a bitmap whose marks (what is darker than paper, PAPER_WHITE) are at their
# darkest (their darkest tenth) lighter than FAINT is a faint one (a pencil pressed lightly, a light
# grey pen), and its grey levels are stretched until those marks read as ink; up to FAINTEST, lighter
# than which marks cannot be told from paper's grain (yellow on white reads 226).
FAINT = 180
FAINTEST = 220
# White border around the ink, as a fraction of its longer side: about what QuickDraw bitmaps leave.
SKETCH_MARGIN = 0.08
# Canvas strokes are redrawn at this width (in raster pixels) at WORK_SCALE × the raster's resolution:
# the width at which canvases carry their bitmaps' ink (scripts/canvas_ink.py, training drawings).
STROKE_WIDTH = 1.025
WORK_SCALE = 8
# A mark whose longer side is under this share of the frame's is a speck, and left out of the crop when
# it lies further than that from the rest of the drawing (dust on a scan, a stray tap on a canvas).
SPECK = 0.02
# How much worse a step of _restroke's may measure before it stops (in WORK_SCALE pixels): a step
# moves the width by about one, and the estimate wobbles by less than half of that.
WIDTH_TOLERANCE = 0.5
# A larger picture (a phone photo, a big scan) is reduced to this many pixels across before its
# drawing is looked for: a 28 px drawing needs nowhere near a phone camera's 12 MP.
LARGEST_SKETCH = 1600
# A camera's finest JPEGs (24–50 MP) run to 12–25 MB: a gallery of them must not be refused.
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    """An input that is not a usable image; the message names the source and the reason."""

    def __init__(self, source: object, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


class EmptySketchError(ImageError):
    """A sketch with no ink on it."""


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{memoryview(source).nbytes} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape} {source.dtype}>"
    name = getattr(source, "name", None)  # an open file's path, an upload's file name
    if hasattr(source, "read") and isinstance(name, str):
        return name
    if isinstance(source, Image.Image) and getattr(source, "filename", ""):  # Image.open(path)
        return os.fsdecode(source.filename)
    return f"<{type(source).__name__}>"


def open_image(
    source: ImageSource,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode a path, bytes (or a bytearray, memoryview), binary file object (read from its current
    position), array or PIL image into a fully loaded PIL image; anything else is an :class:`ImageError`.

    Refuses files over ``max_bytes`` and images over ``max_pixels`` (decompression bombs) before
    decoding their pixels, honours EXIF orientation and takes the first frame of animations.
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        image = source
        width, height = image.size
        if width * height <= max_pixels:  # (refused below otherwise, before decoding)
            try:  # a lazily opened file decodes here: its errors are this function's to name
                image.load()
            except (OSError, SyntaxError, ValueError) as err:
                raise ImageError(name, f"image data is corrupt or truncated ({err})") from err
    elif isinstance(source, np.ndarray):
        image = _array_to_image(source, name)
    else:
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            try:
                if path.is_dir():
                    raise ImageError(name, "is a folder, not an image file")
                info = path.stat()
                if not stat.S_ISREG(info.st_mode):  # reading a FIFO or a device could block forever
                    raise ImageError(name, "is not a regular file (a pipe, socket or device)")
                size = info.st_size
                if size > max_bytes:
                    raise ImageError(name, f"file is {size:,} bytes, over the limit of {max_bytes:,}")
                data = path.read_bytes()
            except OSError as err:
                raise ImageError(name, f"cannot be read ({err.strerror or err})") from err
        elif isinstance(source, (bytes, bytearray, memoryview)):
            size = memoryview(source).nbytes
            if size > max_bytes:
                raise ImageError(name, f"upload is {size:,} bytes, over the limit of {max_bytes:,}")
            data = bytes(source)
        elif hasattr(source, "read"):
            data = _read_upload(source, name, max_bytes)
        else:
            raise ImageError(name, f"not an image source (type {type(source).__name__}): give {ACCEPTED}")
        if not data:
            raise ImageError(name, "file is empty (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                width, height = image.size
                if width * height > max_pixels and image.format in ("JPEG", "MPO"):
                    _draft_within(image, max_pixels)
                    width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(
                        name, f"image is {width}×{height} pixels, over the limit of {max_pixels:,} pixels"
                    )
                image.load()
        except ImageError:
            raise
        except Image.DecompressionBombError as err:  # a header far beyond PIL's own limit
            limit = f"over the limit of {max_pixels:,} pixels"
            raise ImageError(name, f"image is too large to decode (decompression bomb?), {limit}") from err
        except UnidentifiedImageError as err:
            raise ImageError(name, _unidentified(data)) from err
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError(name, f"image data is corrupt or truncated ({err})") from err
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(name, f"image is {width}×{height} pixels, over the limit of {max_pixels:,} pixels")
    if width == 0 or height == 0:
        raise ImageError(name, "image has no pixels")
    frames = getattr(image, "n_frames", 1)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not lose an otherwise good image
        pass
    if frames > 1:  # (the transposed copy no longer knows): said when the first frame is empty
        image.info["n_frames"] = frames
    return image


def _read_upload(source: IO[bytes], name: str, max_bytes: int) -> bytes:
    """A binary file object's bytes (Streamlit's UploadedFile, BytesIO, an open file); one byte past
    the limit is enough to refuse it, without reading a huge stream into memory."""
    if isinstance(source, io.TextIOBase):
        raise ImageError(name, "is a file opened in text mode: open it with 'rb'")
    try:
        data = source.read(max_bytes + 1)
    except OSError as err:
        raise ImageError(name, f"cannot be read ({err.strerror or err})") from err
    except Exception as err:  # e.g. a file closed already
        raise ImageError(name, f"cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(name, f"its read() gave a {type(data).__name__}, not bytes")
    if len(data) > max_bytes:
        raise ImageError(name, f"upload is over the limit of {max_bytes:,} bytes")
    return bytes(data)


# ISO media files (HEIF, AVIF) name their format in the brand after "ftyp" (bytes 4–12).
HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")
AVIF_BRANDS = (b"avif", b"avis")


def _unidentified(data: bytes) -> str:
    """Why Pillow could not tell what ``data`` is: a HEIC or AVIF file whose decoder this installation
    lacks (said with what to install), one that its decoder could not read (cut short: a sync or a
    download interrupted), or no image format Pillow knows."""
    brand = data[8:12] if data[4:8] == b"ftyp" else b""
    Image.init()
    if brand in AVIF_BRANDS and "AVIF" not in Image.ID:
        return "an AVIF image, and this Pillow has no AVIF decoder (upgrade Pillow: recent wheels have it)"
    if brand in HEIF_BRANDS and "HEIF" not in Image.ID:
        return "a HEIC/HEIF image, and its decoder is not installed (pip install pillow-heif)"
    if brand in AVIF_BRANDS + HEIF_BRANDS:
        kind = "AVIF" if brand in AVIF_BRANDS else "HEIC/HEIF"
        return f"image data is corrupt or truncated (a {kind} file its decoder cannot read)"
    return "not a recognised image format"


def _draft_within(image: Image.Image, max_pixels: int) -> None:
    """Have a JPEG over ``max_pixels`` decode at 1/2, 1/4 or 1/8 of its size, the largest within the
    limit: a camera's 24–50 MP photo then costs a few megapixels of memory, not a refusal (its DCT
    gives the smaller sizes for free; the network sees 180 px)."""
    width, height = image.size
    for scale in (2, 4, 8):
        if -(-width // scale) * -(-height // scale) <= max_pixels:  # sizes round up
            image.draft(None, (-(-width // scale), -(-height // scale)))
            return


def _array_to_image(array: np.ndarray, name: str) -> Image.Image:
    """An H×W, H×W×1, H×W×3 (RGB) or H×W×4 (RGBA) array as an 8-bit image, its values read by dtype:

    * uint8: 0–255 as it is;
    * float: 0–1 when no value is over 1, else 0–255 (clipped);
    * bool, and an integer array (uint8 too) holding only 0s and 1s: a mask, 0 and 1 → 0 and 255
      (``mask.astype(np.uint8)``; as a picture such an array would be black throughout);
    * other integer types: 0–255, or, when a value is over 255, 16-bit 0–65535 (÷257, clipped), as
      16-bit PNG and TIFF scans are read (``cv2.IMREAD_UNCHANGED``) and as PIL's 16- and 32-bit integer
      images are (see composite_on_white). 10- or 12-bit data must be scaled by the caller.
    """
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(name, "array must be H×W, H×W×3 (RGB) or H×W×4 (RGBA)")
    if array.size == 0:
        raise ImageError(name, "image has no pixels")
    if array.dtype == np.uint8 and array.max() > 1:  # the usual case: a picture, taken as it is
        return Image.fromarray(array)
    integer = np.issubdtype(array.dtype, np.integer)
    array = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ImageError(name, "array holds NaN or infinite values")
    peak = array.max()
    if peak <= 1.0:  # floats in [0, 1], or a 0/1 mask
        array = array * 255.0
    elif integer and peak > 255:  # 16-bit
        array = array / 257.0
    array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten any mode (RGBA, LA, palette with transparency, 16-bit, CMYK) to RGB on white."""
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode == "La":  # premultiplied alpha: PIL converts it only to LA (which un-premultiplies)
        image = image.convert("LA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # float32, in place: a 36 MP 16-bit scan in float64 temporaries took a gigabyte to decode.
        array = np.array(image, dtype=np.float32)  # a copy: a mode-F image's own pixels are read-only
        peak = array.max(initial=0)
        # 16-bit, 8-bit (8-bit values stored in 16 bits, as some tools save them), or floats in
        # [0, 1] (as arrays are read, see _array_to_image)
        top = 65535.0 if peak > 255 else 1.0 if image.mode == "F" and peak <= 1.0 else 255.0
        array *= 255.0 / top
        image = Image.fromarray(np.clip(array, 0, 255, out=array).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _drawing_grey(image: Image.Image) -> np.ndarray:
    """A sketch's grey levels, composited onto white; but where a transparent background holds strokes
    lighter than ink (white or yellow ones, as drawing apps in dark mode export them), which white
    would swallow, their opacity is the ink."""
    grey = np.asarray(composite_on_white(image).convert("L"), dtype=np.uint8)
    if image.mode not in ("RGBA", "RGBa", "LA", "La", "PA", "P"):
        return grey
    if image.mode not in ("RGBA", "LA", "PA"):  # premultiplied or palette: PIL's alpha comes by conversion
        image = image.convert("LA" if image.mode == "La" else "RGBA")
    alpha = np.asarray(image.getchannel("A"))
    drawn = np.count_nonzero(alpha > 127)
    # Strokes (not an opaque card with transparent corners) that white swallowed (not dark ones).
    if 0 < drawn < 0.5 * grey.size and np.count_nonzero(grey < INK_THRESHOLD) < 0.5 * drawn:
        return 255 - alpha
    return grey


def load_rgb(source: ImageSource, size: int, **limits: int) -> np.ndarray:
    """A gallery image or photo as the network sees it: float32 RGB 0–255, size×size."""
    rgb = composite_on_white(open_image(source, **limits))
    return resize_to_array(rgb, size)


def resize_to_array(image: Image.Image, size: int) -> np.ndarray:
    # Bilinear with PIL's antialiasing, for every image everywhere; the aspect ratio is squashed as
    # keras' image_dataset_from_directory does by default.
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def normalize_sketch(source: ImageSource, raster: int = 28, **limits: int) -> Image.Image:
    """Any drawing → black ink on white, cropped to its ink, padded square, rastered at ``raster`` px.

    A thin-lined 400 px browser canvas and a 28 px QuickDraw bitmap come out alike: ink is found
    on the composited grey image, a photographed page is cut out of its desk and squared up and its
    grey paper flattened to white, light-on-dark drawings are inverted, a notebook's rules are taken
    off, and the box filter turns thin strokes into the soft, thick lines of the bitmaps the model
    learnt from.
    """
    name = _describe(source)
    image = open_image(source, **limits)
    frames = image.info.get("n_frames", 1)
    grey = _drawing_grey(image)
    grey, _ = shrunk(grey, LARGEST_SKETCH)  # a phone photo or a big scan: 28 px need nowhere near 12 MP
    larger_than_bitmap = max(grey.shape) > 2 * raster  # a canvas, scan or photo
    if larger_than_bitmap:  # a page on a desk is cut out of it (a canvas is left as it is)
        grey = crop_to_page(grey)
    if np.median(border(grey)) < 128:  # white (or coloured) ink on a dark board
        grey = 255 - grey
    if larger_than_bitmap and np.median(border(grey)) < PAPER_WHITE:  # a photographed page
        grey = flatten_paper(grey)
    if larger_than_bitmap:
        grey = _darkened(erase_ruled_lines(grey))
    ink = grey < INK_THRESHOLD
    box = None
    if ink.any():  # None from drawing_box: nothing but grains of the paper or of noise
        box = drawing_box(ink) if larger_than_bitmap else _box(ink)
    if box is None:
        if larger_than_bitmap:  # light marks that hold a stroke, not paper's grain
            faint = _grain_end(cv2.GaussianBlur(grey, (3, 3), 0)) is not None
        else:
            faint = grey.min() < PAPER_WHITE
        if faint:
            raise EmptySketchError(
                name,
                f"no ink found: its marks are all too light to tell from paper (a stroke needs grey level "
                f"{FAINTEST} or darker; yellow on white is lighter): draw in a darker colour",
            )
        # A drawing app's "replay" GIF starts blank: say which frame was looked at.
        where = f" in frame 1 of {frames}: of an animation only the first frame is read" if frames > 1 else ""
        raise EmptySketchError(name, f"the sketch is empty (no ink found{where})")
    top, bottom, left, right = box
    crop = grey[top:bottom, left:right]
    height, width = crop.shape
    side = int(round(max(height, width) * (1 + 2 * SKETCH_MARGIN)))
    square = np.full((side, side), 255, dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = crop
    if side > 2 * raster:  # a canvas or a scan, not a bitmap: give its strokes the bitmaps' width
        square = _restroke(square, raster)
    return Image.fromarray(square).resize((raster, raster), Image.Resampling.BOX)


def _darkened(grey: np.ndarray) -> np.ndarray:
    """A faint drawing's grey levels stretched so that its strokes read as ink as a pen's do: the
    darkest tenth of its marks turns black, and paper stays white. Without it the ink threshold cut
    through strokes about as light as it (at grey level 204 the crop followed their darkest grains)
    and found none in lighter ones. It works on a lightly smoothed copy, so that the paper's grain is
    not stretched into ink, and only where the marks hold a stroke (a mark at least SPECK of the
    frame long), which a blank page's grain does not."""
    marks = grey[grey < PAPER_WHITE]
    if not marks.size:
        return grey
    level = float(np.percentile(marks, 10))
    if not FAINT <= level <= FAINTEST:
        return grey
    smooth = cv2.GaussianBlur(grey, (3, 3), 0)
    grain = _grain_end(smooth)
    if grain is None:
        return grey
    # White is where the grain ends rather than PAPER_WHITE: thin strokes lose contrast in the smoothing.
    white = max(PAPER_WHITE, grain)
    stretched = (np.arange(256) - level) * (255 / (white - level))
    return np.clip(np.rint(stretched), 0, 255).astype(np.uint8)[smooth]


def _grain_end(smooth: np.ndarray) -> float | None:
    """Where a lightly smoothed picture's paper grain ends (its median less four spreads, the median
    absolute deviation as a sigma), if anything darker than that and than PAPER_WHITE holds a stroke
    (a mark at least SPECK of the frame long); None if nothing does. Heavy grain (a noisy scan)
    clumps below PAPER_WHITE in the smoothing and would otherwise pass for a faint stroke."""
    counts = _histogram(smooth)
    paper = _quantile(counts, 0.5)
    spread = 1.4826 * _quantile(np.bincount(np.abs(np.arange(256) - paper), weights=counts), 0.5)
    grain = paper - max(4 * spread, 4)
    return grain if not _specks(_marks(smooth < min(PAPER_WHITE, grain)), smooth.shape).all() else None


def _specks(boxes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Which of these marks (boxes: left, top, width, height) are specks: longer side under SPECK of
    the frame's (``shape``)."""
    return np.maximum(boxes[:, 2], boxes[:, 3]) < SPECK * max(shape)


def _histogram(grey: np.ndarray) -> np.ndarray:
    """How many pixels have each grey level (OpenCV's count is some ten times numpy's bincount)."""
    return cv2.calcHist([grey], [0], None, [256], [0, 256]).ravel()


def _quantile(counts: np.ndarray, share: float) -> int:
    """The grey level at ``share`` of a histogram's pixels (the lowest level that reaches it)."""
    return int(np.searchsorted(np.cumsum(counts), share * counts.sum()))


def _box(ink: np.ndarray) -> tuple[int, int, int, int]:
    """The rows and columns (top, bottom, left, right; ends exclusive) that hold all of the ink."""
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def drawing_box(ink: np.ndarray) -> tuple[int, int, int, int] | None:
    """The box of a drawing's ink (top, bottom, left, right; ends exclusive), less the specks apart
    from it: a grain of dust on a scan or a stray tap on a canvas would otherwise stretch the crop
    and shrink the drawing into a corner of it (a 2 px speck took a scanned cup's likeness to its
    canvas from 0.97 to 0.34). A speck is a mark whose longer side is under SPECK of the frame's; one
    within that distance of the other marks' box counts as part of the drawing. Where every mark is
    a speck (a dotted drawing, or a blank page's heavy grain), the marks that hold a 2×2 block of
    ink count (a pen's dot does; grain, whose dark pixels fall independently, almost never does),
    and None means there are none: the page is blank."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(ink.astype(np.uint8), connectivity=8)
    left, top, width, height = stats[1:, :4].T
    bottom, right = top + height, left + width
    speck = _specks(stats[1:], ink.shape)
    if not speck.any():
        return _box(ink)
    if speck.all():
        square = np.ones((2, 2), np.uint8)
        border = {"borderType": cv2.BORDER_CONSTANT, "borderValue": 0}  # outside the frame is paper
        block = cv2.erode(ink.astype(np.uint8), square, anchor=(0, 0), **border)
        solid = np.zeros(count, dtype=bool)
        solid[np.unique(labels[block > 0])] = True
        near = solid[1:]  # row 0 is the paper
        if not near.any():
            return None
    else:
        reach, body = SPECK * max(ink.shape), ~speck
        near = body | (
            (bottom > top[body].min() - reach)
            & (top < bottom[body].max() + reach)
            & (right > left[body].min() - reach)
            & (left < right[body].max() + reach)
        )
    return top[near].min(), bottom[near].max(), left[near].min(), right[near].max()


def _marks(ink: np.ndarray) -> np.ndarray:
    """The box (left, top, width, height) of each connected mark of ``ink`` (8-connected), a row each."""
    _, _, stats, _ = cv2.connectedComponentsWithStats(ink.astype(np.uint8), connectivity=8)
    return stats[1:, :4]  # row 0 is the paper


def _restroke(square: np.ndarray, raster: int) -> np.ndarray:
    """Redraw the ink at a fixed width (STROKE_WIDTH raster pixels), whatever pen drew it."""
    work = WORK_SCALE * raster
    grey = np.asarray(Image.fromarray(square).resize((work, work), Image.Resampling.BOX), dtype=np.uint8)
    # PIL's box filter weighs whole pixels by their centres: a lone 1 px line can fall between two of
    # its windows (313 → 224 px) and vanish. Where all ink did, an area mean keeps it (any other
    # drawing comes out as in version 2).
    if grey.min() == 255:
        grey = cv2.resize(square, (work, work), interpolation=cv2.INTER_AREA)
    # Midway between the ink's typical darkness and white: faint, thin strokes survive the reduction
    # (the darkest pixel alone can be a lone dot where thin strokes cross, leaving the rest behind).
    dark = grey[grey < INK_THRESHOLD]
    level = float(np.median(dark)) if dark.size else float(grey.min())
    ink = grey < (level + 255) / 2
    # Grow or shrink the ink a pixel of width at a time and keep the step whose measured width is
    # nearest the target: measured, because growing widens diagonal strokes more than straight ones.
    target = STROKE_WIDTH * WORK_SCALE
    width = stroke_width(ink)
    grow = width < target
    # Thinning stops at half the excess, as blots inflate the estimate and thin lines would break.
    steps = 4 * WORK_SCALE if grow else int(np.ceil((width - target) / 2))
    best, error = ink, abs(width - target)
    for step in range(steps):
        ink = _widen(ink, grow, corner=step % 2)
        width = stroke_width(ink)
        # About equal is not worse: the estimate reads a 1 px line and a 2 px one both as about 2 (a
        # long thin line with a few wider bits read 2.27 then 2.24, or 3.36 then 3.22, and stayed faint).
        if not ink.any() or abs(width - target) > error + WIDTH_TOLERANCE:
            break
        if abs(width - target) < error:
            best, error = ink, abs(width - target)
    return np.where(best, 0, 255).astype(np.uint8)


def _widen(ink: np.ndarray, grow: bool, corner: int) -> np.ndarray:
    """One pixel more (or less) stroke width: a 2×2 dilation (erosion), anchored at alternate corners so
    that repeated steps keep the strokes centred."""
    padded = np.pad(ink, 1)
    height, width = ink.shape
    sign = -1 if corner else 1
    offsets = [(1 + sign * dy, 1 + sign * dx) for dy in (0, 1) for dx in (0, 1)]
    shifted = [padded[y : y + height, x : x + width] for y, x in offsets]
    return np.logical_or.reduce(shifted) if grow else np.logical_and.reduce(shifted)


def load_sketch(source: ImageSource, size: int, raster: int = 28, **limits: int) -> np.ndarray:
    """A query sketch as the network sees it: normalised, then resized like every other image."""
    return resize_to_array(normalize_sketch(source, raster, **limits), size)


# Canvas-like renderings: (canvas size, pen width, RGBA on transparent?) as people draw in browsers.
CANVAS_STYLES = ((400, 6, True), (256, 3, False), (800, 12, False), (200, 8, True))


def canvas_style_name(size: int, width: int, rgba: bool) -> str:
    """How reports name a canvas style, e.g. "canvas 400px pen 6 RGBA"."""
    return f"canvas {size}px pen {width}{' RGBA' if rgba else ''}"


def render_strokes(
    strokes: list, size: int = 400, stroke_width: int = 6, rgba: bool = False, fill: float = 0.8
) -> Image.Image:
    """Draw pen strokes (QuickDraw's ``[[x…], [y…], …]``) the way a browser canvas would.

    The drawing is scaled to ``fill`` of the canvas and centred; ``rgba`` gives black ink on a
    transparent background, as streamlit-drawable-canvas returns it.
    """
    from PIL import ImageDraw

    xs = np.concatenate([np.asarray(s[0], dtype=np.float64) for s in strokes])
    ys = np.concatenate([np.asarray(s[1], dtype=np.float64) for s in strokes])
    extent = max(xs.max() - xs.min(), ys.max() - ys.min(), 1.0)
    scale = fill * size / extent
    offset_x = (size - (xs.max() - xs.min()) * scale) / 2 - xs.min() * scale
    offset_y = (size - (ys.max() - ys.min()) * scale) / 2 - ys.min() * scale
    image = Image.new("RGBA" if rgba else "RGB", (size, size), (0, 0, 0, 0) if rgba else (255, 255, 255))
    draw = ImageDraw.Draw(image)
    ink = (0, 0, 0, 255) if rgba else (0, 0, 0)
    for stroke in strokes:
        points = [
            (x * scale + offset_x, y * scale + offset_y) for x, y in zip(stroke[0], stroke[1], strict=False)
        ]
        if len(points) == 1:
            points = points * 2
        draw.line(points, fill=ink, width=stroke_width, joint="curve")
    return image
