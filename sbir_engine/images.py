"""Image decoding and the sketch normaliser: any file, array or canvas → the network's RGB input.

Every path into the model (training, gallery embedding, queries) goes through these functions, so
an image is resized the same way wherever it comes from.
"""

from __future__ import annotations

import io
import stat
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # HEIC/HEIF, the format phone cameras save photos in, is a Pillow plugin of its own
    from pillow_heif import register_heif_opener
except ImportError:  # decoding then fails with a message that names the package
    pass
else:
    register_heif_opener()

ImageSource = str | Path | bytes | np.ndarray | Image.Image

# Bumped whenever image decoding or the sketch normaliser changes what the network sees: it is part of
# every model fingerprint, so an index embedded under another version is refused, not silently mixed.
# 2: canvas strokes are re-stroked to a measured width (see _restroke).
PREPROCESSING_VERSION = 2

# Ink is anything darker than this on the 0–255 grey scale after compositing onto white.
INK_THRESHOLD = 200
# A page (larger than a bitmap) whose border reads darker than this, as a photographed sheet of paper
# does, is flattened to white before ink is looked for. Canvases, white scans and QuickDraw's bitmaps
# (whose ink can cover most of their border) are left exactly as they were: version 2 holds (tested).
PAPER_WHITE = 235
# White border around the ink, as a fraction of its longer side: about what QuickDraw bitmaps leave.
SKETCH_MARGIN = 0.08
# Canvas strokes are redrawn at this width (in raster pixels) at WORK_SCALE × the raster's resolution:
# the width at which canvases carry their bitmaps' ink (scripts/canvas_ink.py, training drawings).
STROKE_WIDTH = 1.025
WORK_SCALE = 8
# A mark whose longer side is under this share of the frame's is a speck, and left out of the crop when
# it lies further than that from the rest of the drawing (dust on a scan, a stray tap on a canvas).
SPECK = 0.02
# A mark along this share of a side of the frame is a band at its edge (a scanner's), not the drawing's.
EDGE_BAND = 0.9
# A picture whose border is this much darker than its lightest hundredth may be a page on a desk.
SURROUND_CONTRAST = 40
# A page on a desk is looked for down to this share of the frame (a sticky note shot from arm's length).
PAGE_SHARE = 0.04
# Found by its outline, a page is traced by edges all round (this share of its hull) and lighter than
# the desk around it by at least PAGE_LIFT of its light.
OUTLINE_TRACED = 0.9
PAGE_LIFT = 0.03
# How much worse a step of _restroke's may measure before it stops (in WORK_SCALE pixels): a step
# moves the width by about one, and the estimate wobbles by less than half of that.
WIDTH_TOLERANCE = 0.5
# A straight line across this share of the page's width (or down its height) runs edge to edge.
RULED_SPAN = 0.8
# Paper is ruled when it holds this many parallel lines from edge to edge (a drawing of a box, two).
RULED_LINES = 5
# Whether a page is ruled is looked at on a copy at most this many pixels across, and a ruled page's
# lines are found to paint them out on one at most RULED_ERASE across.
RULED_SEARCH = 256
RULED_ERASE = 1000
# A larger picture (a phone photo, a big scan) is reduced to this many pixels across before its
# drawing is looked for: a 28 px drawing needs nowhere near a phone camera's 12 MP.
LARGEST_SKETCH = 1600
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
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
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape} {source.dtype}>"
    return f"<{type(source).__name__}>"


def open_image(
    source: ImageSource,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode a path, bytes, array or PIL image into a fully loaded PIL image.

    Refuses files over ``max_bytes`` and images over ``max_pixels`` (decompression bombs) before
    decoding their pixels, honours EXIF orientation and takes the first frame of animations.
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _array_to_image(source, name)
    else:
        if isinstance(source, (str, Path)):
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
        else:
            data = source
            if len(data) > max_bytes:
                raise ImageError(name, f"upload is {len(data):,} bytes, over the limit of {max_bytes:,}")
        if not data:
            raise ImageError(name, "file is empty (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
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
            raise ImageError(name, _missing_decoder(data) or "not a recognised image format") from err
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError(name, f"image data is corrupt or truncated ({err})") from err
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(name, f"image is {width}×{height} pixels, over the limit of {max_pixels:,} pixels")
    if width == 0 or height == 0:
        raise ImageError(name, "image has no pixels")
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not lose an otherwise good image
        return image


# ISO media files (HEIF, AVIF) name their format in the brand after "ftyp" (bytes 4–12).
HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")
AVIF_BRANDS = (b"avif", b"avis")


def _missing_decoder(data: bytes) -> str | None:
    """Why a HEIC or AVIF file did not decode here (a decoder this installation lacks), else None."""
    if data[4:8] != b"ftyp":
        return None
    if data[8:12] in AVIF_BRANDS:
        return "an AVIF image, and this Pillow has no AVIF decoder (upgrade Pillow: recent wheels have it)"
    if data[8:12] in HEIF_BRANDS:
        return "a HEIC/HEIF image, and its decoder is not installed (pip install pillow-heif)"
    return None


def _array_to_image(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(name, "array must be H×W, H×W×3 (RGB) or H×W×4 (RGBA)")
    if array.size == 0:
        raise ImageError(name, "image has no pixels")
    if array.dtype != np.uint8:
        array = np.asarray(array, dtype=np.float64)
        if not np.all(np.isfinite(array)):
            raise ImageError(name, "array holds NaN or infinite values")
        if array.max(initial=0) <= 1.0:  # floats in [0, 1]
            array = array * 255.0
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten any mode (RGBA, LA, palette with transparency, 16-bit, CMYK) to RGB on white."""
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode == "La":  # premultiplied alpha: PIL converts it only to LA (which un-premultiplies)
        image = image.convert("LA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max(initial=0)
        # 16-bit, 8-bit, or floats in [0, 1] (as arrays are read, see _array_to_image)
        top = 65535.0 if peak > 255 else 1.0 if image.mode == "F" and peak <= 1.0 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8))
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
    rgba = np.asarray((image.convert("LA") if image.mode == "La" else image).convert("RGBA"))
    drawn = rgba[..., 3] > 127
    if 0 < drawn.mean() < 0.5:  # strokes, not an opaque card with transparent corners
        colour = np.asarray(Image.fromarray(rgba[..., :3]).convert("L"))
        if np.median(colour[drawn]) >= INK_THRESHOLD:
            return 255 - rgba[..., 3]
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
    grey = _drawing_grey(open_image(source, **limits))
    grey, _ = shrunk(grey, LARGEST_SKETCH)  # a phone photo or a big scan: 28 px need nowhere near 12 MP
    larger_than_bitmap = max(grey.shape) > 2 * raster  # a canvas, scan or photo
    # A surround darker than white: a page on a desk, or a board (a canvas's is white: it is spared the look).
    if larger_than_bitmap and np.median(_border(grey)) < 255 - SURROUND_CONTRAST:
        grey = crop_to_page(grey)
    if np.median(_border(grey)) < 128:  # white (or coloured) ink on a dark board
        grey = 255 - grey
    if larger_than_bitmap and np.median(_border(grey)) < PAPER_WHITE:  # a photographed page
        grey = flatten_paper(grey)
    if larger_than_bitmap:
        grey = erase_ruled_lines(grey)
    ink = grey < INK_THRESHOLD
    if not ink.any() and grey.min() < PAPER_WHITE:
        raise EmptySketchError(
            name,
            f"no ink found: its marks are all lighter than grey level {INK_THRESHOLD}, too light to tell "
            "from paper (as yellow on white is): draw in a darker colour",
        )
    if not ink.any():
        raise EmptySketchError(name, "the sketch is empty (no ink found)")
    top, bottom, left, right = drawing_box(ink) if larger_than_bitmap else _box(ink)
    crop = grey[top:bottom, left:right]
    height, width = crop.shape
    side = int(round(max(height, width) * (1 + 2 * SKETCH_MARGIN)))
    square = np.full((side, side), 255, dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = crop
    if side > 2 * raster:  # a canvas or a scan, not a bitmap: give its strokes the bitmaps' width
        square = _restroke(square, raster)
    return Image.fromarray(square).resize((raster, raster), Image.Resampling.BOX)


def _box(ink: np.ndarray) -> tuple[int, int, int, int]:
    """The rows and columns (top, bottom, left, right; ends exclusive) that hold all of the ink."""
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def drawing_box(ink: np.ndarray) -> tuple[int, int, int, int]:
    """The box of a drawing's ink (top, bottom, left, right; ends exclusive), less the marks that are
    not the drawing's: specks apart from it (a grain of dust on a scan, a stray tap on a canvas),
    which would stretch the crop and shrink the drawing into a corner of it (a 2 px speck took a
    scanned cup's likeness to its canvas from 0.97 to 0.34), and bands along an edge of the frame
    (the dark edge of a scanner's glass beyond the page), which would do that and become a thick
    stroke of their own. A speck is a mark whose longer side is under SPECK of the frame's; one
    within that distance of the drawing's box counts as part of it. A band lies along EDGE_BAND of a
    side of the frame. Where every mark is one or the other, all of them count."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(ink.astype(np.uint8), connectivity=8)
    left, top, width, height = (stats[1:, i] for i in range(4))  # row 0 is the paper
    bottom, right = top + height, left + width
    reach = SPECK * max(ink.shape)
    speck = np.maximum(width, height) < reach
    band = np.zeros_like(speck)
    for side in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        band |= np.bincount(side, minlength=count)[1:] >= EDGE_BAND * side.size
    body = ~speck & ~band
    if not body.any() or body.all():
        return _box(ink)
    near = body | (
        speck
        & (bottom > top[body].min() - reach)
        & (top < bottom[body].max() + reach)
        & (right > left[body].min() - reach)
        & (left < right[body].max() + reach)
    )
    return top[near].min(), bottom[near].max(), left[near].min(), right[near].max()


def _border(grey: np.ndarray) -> np.ndarray:
    return np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])


def shrunk(grey: np.ndarray, longest: int) -> tuple[np.ndarray, float]:
    """``grey`` reduced to at most ``longest`` px across (an area mean), and the scale it was reduced
    by: 1 where it was no larger, and then it is returned as it is."""
    scale = min(1.0, longest / max(grey.shape))
    if scale == 1.0:
        return grey, 1.0
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA), scale


def crop_to_page(grey: np.ndarray) -> np.ndarray:
    """A page photographed on a desk, cut out and squared up: its four corners warped to an upright
    rectangle (a page lying askew or shot at an angle comes out straight), less 4 % of it all round
    for its edge (its shadow, or a sliver of desk where a corner is a little off).

    Where the surround is SURROUND_CONTRAST darker than the picture's lightest hundredth, the page is
    the largest light region (``_lightest_region``); where the desk is nearly as light as the paper
    (a white one), or where no light region is as paper is, it is the largest outline that edges
    trace all round and that is lighter than the desk around it (``_page_outline``): under light
    falling off across the frame, the far side of a white desk is lighter than the near side of
    the page, and no split of grey levels tells them apart. Light strokes on a dark board are no
    page by either measure, and stay as they are.
    """
    if np.median(_border(grey)) < np.percentile(grey, 99) - SURROUND_CONTRAST:
        page = _lightest_region(grey)
        if page is not None:
            return page
    outline = _page_outline(grey)
    squared = None if outline is None else _squared_up(grey, outline)
    return grey if squared is None else squared[0]


def _lightest_region(grey: np.ndarray) -> np.ndarray | None:
    """The page as the largest light region, squared up, if it is as paper is: PAGE_SHARE of the
    frame at least, 85 % light (the ink is the rest) and light all round its border (95 %), once
    lines thinner than 2 % of the frame are closed over (a notebook's rules cross its edges). Chalk
    strokes up to 6 % of a board's width did none of that."""
    # Otsu's split of the grey levels into surround and page: a midpoint between the surround and
    # the paper left the shadowed side of a page on a mid-grey desk out.
    _, light = cv2.threshold(cv2.GaussianBlur(grey, (5, 5), 0), 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Closed over lines thinner than 2 % of the frame: a squared page's rules, where its shadowed
    # side falls under the split, cut it into cells, none of them the page.
    close = 2 * round(0.01 * max(grey.shape)) + 1
    light = cv2.morphologyEx(light, cv2.MORPH_CLOSE, np.ones((close, close), np.uint8))
    contours, _ = cv2.findContours(light, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    outline = cv2.convexHull(max(contours, key=cv2.contourArea))  # ink along the edge dents it
    squared = _squared_up(grey, outline, light)
    if squared is None:
        return None
    page, page_light = squared
    return page if page_light.mean() >= 0.85 and _border(page_light).mean() >= 0.95 else None


def _squared_up(grey: np.ndarray, outline: np.ndarray, *masks: np.ndarray) -> list[np.ndarray] | None:
    """The page inside ``outline`` (a convex hull) warped to an upright rectangle, less its edge, and
    each of ``masks`` warped alike; None for an outline too small to be a page."""
    if cv2.contourArea(outline) < PAGE_SHARE * grey.size:
        return None
    corners = cv2.approxPolyDP(outline, 0.02 * cv2.arcLength(outline, True), True).reshape(-1, 2)
    if len(corners) != 4:  # a corner out of the frame, or a curled page: its tightest rectangle
        corners = cv2.boxPoints(cv2.minAreaRect(outline))
    corners = _clockwise_from_top_left(corners.astype(np.float32))
    top_left, top_right, bottom_right, bottom_left = corners
    width = round((np.linalg.norm(top_right - top_left) + np.linalg.norm(bottom_right - bottom_left)) / 2)
    height = round(width / page_aspect(corners, grey.shape))
    inset = max(1, round(0.04 * max(width, height)))
    if min(width, height) <= 2 * inset or (width - 2 * inset) * (height - 2 * inset) < PAGE_SHARE * grey.size:
        return None
    square_up = cv2.getPerspectiveTransform(
        corners,
        np.float32([[0, 0], [width, 0], [width, height], [0, height]]),
    )
    return [
        cv2.warpPerspective(image, square_up, (width, height), flags=flags)[
            inset : height - inset, inset : width - inset
        ]
        for image, flags in ((grey, cv2.INTER_AREA), *((mask, cv2.INTER_NEAREST) for mask in masks))
    ]


def _page_outline(grey: np.ndarray) -> np.ndarray | None:
    """The page's outline where brightness alone cannot tell it from the desk: the largest shape
    that edges enclose (Canny's, on a copy at most 512 px across), if the edges run all round it
    (OUTLINE_TRACED of its hull), as a page's do and a drawing's hull's, passing over the board
    between strokes, do not, and if it is lighter than the desk around it (PAGE_LIFT), as paper on
    a white desk is and a dark object is not. Its corners are in ``grey``'s pixels."""
    small, scale = shrunk(grey, 512)
    edges = cv2.dilate(cv2.Canny(cv2.GaussianBlur(small, (5, 5), 0), 10, 30), np.ones((3, 3), np.uint8))
    contours, _ = cv2.findContours(edges, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    outline = cv2.convexHull(max(contours, key=cv2.contourArea))
    hull = cv2.polylines(np.zeros_like(small), [outline], True, 1) > 0
    if (cv2.dilate(edges, np.ones((3, 3), np.uint8))[hull] > 0).mean() < OUTLINE_TRACED:
        return None
    inside = cv2.fillConvexPoly(np.zeros_like(small), outline, 1)
    reach = 2 * round(0.02 * max(small.shape)) + 1
    around = cv2.dilate(inside, np.ones((reach, reach), np.uint8)) > inside
    if not around.any() or np.median(small[around]) >= (1 - PAGE_LIFT) * np.median(small[inside > 0]):
        return None
    return (outline / scale).astype(np.float32)


def _clockwise_from_top_left(corners: np.ndarray) -> np.ndarray:
    """Four corners in clockwise order (on screen) starting from the top left one, so that a page is
    turned upright by the smaller angle, whichever way it lies."""
    centre = corners.mean(axis=0)
    clockwise = corners[np.argsort(np.arctan2(corners[:, 1] - centre[1], corners[:, 0] - centre[0]))]
    return np.roll(clockwise, -int(np.argmin(clockwise.sum(axis=1))), axis=0)


def page_aspect(corners: np.ndarray, frame: tuple[int, ...]) -> float:
    """Width over height of the rectangle whose photograph these four corners are (clockwise from
    the top left, in a frame of this shape).

    A page shot at an angle is foreshortened: its sides' lengths alone read a square page at 30
    degrees as 13 % wider than tall. Zhang and He (Whiteboard scanning, 2007) recover the ratio with
    the camera's focal length, which the page's two vanishing points give (principal point at the
    frame's centre, square pixels). Where a pair of sides is (nearly) parallel in the photograph
    there is no such point, and a phone camera's focal length (about 0.8 × the frame's longer side,
    a 65-degree field of view) stands in; a page seen square-on needs none.
    """
    centre = np.array([frame[1] / 2, frame[0] / 2])
    m1, m2, m4, m3 = (np.append(c - centre, 1.0) for c in corners)  # Zhang and He's m3 is bottom left
    k2 = np.dot(np.cross(m1, m4), m3) / np.dot(np.cross(m2, m4), m3)
    k3 = np.dot(np.cross(m1, m4), m2) / np.dot(np.cross(m3, m4), m2)
    n2, n3 = k2 * m2 - m1, k3 * m3 - m1  # the page's top and left edges, up to the focal length
    typical = 0.8 * max(frame)
    # Each edge's slope out of the frame's plane: near 0 its vanishing point is near infinity, and the
    # focal length it gives is noise (a page seen square-on, or edges parallel in the photograph).
    slopes = [typical * abs(n[2]) / np.hypot(n[0], n[1]) for n in (n2, n3)]
    measured = -(n2[0] * n3[0] + n2[1] * n3[1]) / (n2[2] * n3[2]) if min(slopes) > 0.1 else -1.0
    focal_squared = measured if (0.3 * typical) ** 2 < measured < (3 * typical) ** 2 else typical**2
    top, left = n2 * [1, 1, np.sqrt(focal_squared)], n3 * [1, 1, np.sqrt(focal_squared)]
    return float(np.linalg.norm(top) / np.linalg.norm(left))


def flatten_paper(grey: np.ndarray) -> np.ndarray:
    """Divide out the light falling on a photographed page, so that its paper reads white and its
    ink stays as dark against it as it was.

    The paper's brightness is the page with its ink closed over: a grey-level closing (the brightest
    pixel nearby, then the darkest of those) over about 8 % of the page, wider than a pen's line.
    Unlike the brightest pixel alone, smoothed, it keeps the edge of a shadow where it is, so that
    the shadow of a hand or a phone across the page does not leave a dark band beside it. A copy at
    most 512 px across keeps that cheap.
    """
    small, _ = shrunk(grey, 512)
    reach = 2 * round(0.04 * max(small.shape)) + 1
    closed = cv2.morphologyEx(small, cv2.MORPH_CLOSE, np.ones((reach, reach), np.uint8))
    paper = cv2.resize(closed, grey.shape[::-1], interpolation=cv2.INTER_LINEAR).astype(np.float32)
    return np.clip(grey * (255.0 / np.maximum(paper, 1.0)), 0, 255).astype(np.uint8)


def erase_ruled_lines(grey: np.ndarray) -> np.ndarray:
    """A notebook's ruled lines, a grid and a margin line, taken off the paper: the straight lines
    that run from edge to edge (RULED_SPAN of the page's width, or of its height), when RULED_LINES
    of them are parallel. A drawing cropped tight may hold a few such lines (a box filling the
    frame has four, a bus three parallel ones); five parallel ones are the paper's print, and the
    margin line beside them goes too. Two quick looks say whether a page may be ruled (marks that
    cross it often enough, microseconds; then lines on a copy RULED_SEARCH px across, a few ms), and
    only a ruled page is searched again, finely enough to paint its lines out, and filled in where
    they were (OpenCV's inpainting), so that strokes across a rule join up again. A stroke drawn
    along a rule goes with it.
    """
    if not _crossed_often(grey) or not len(_ruled_lines(grey, RULED_SEARCH)):
        return grey
    height, width = grey.shape
    mask = np.zeros_like(grey)
    thickness = max(3, round(0.01 * max(height, width)))
    for x0, y0, x1, y1 in _ruled_lines(grey, RULED_ERASE).round().astype(int):
        cv2.line(mask, (x0, y0), (x1, y1), 255, thickness)
    # Filled in from either side of each line: paper where it crossed paper, ink where a stroke crossed it.
    return cv2.inpaint(grey, mask, thickness, cv2.INPAINT_TELEA)


def _crossed_often(grey: np.ndarray) -> bool:
    """Whether RULED_LINES marks cross the page at a fifth of its width from either side, or at a
    fifth of its height from top and bottom: every line across RULED_SPAN of the page crosses both
    places. A drawing seldom does, and then the Hough transform need not run (microseconds, not
    milliseconds). Each place is looked at along five lines 2 % of the page apart, the most
    crossed one counting (one of them may run along a squared paper's rule)."""

    def crossings(lines: np.ndarray) -> int:
        rises = np.diff((lines < PAPER_WHITE).astype(np.int8), axis=-1) == 1
        return int(rises.sum(axis=-1).max())

    height, width = grey.shape
    steps = np.arange(5) * 0.02
    columns = [grey[:, np.round((start + steps) * (width - 1)).astype(int)].T for start in (0.16, 0.76)]
    rows = [grey[np.round((start + steps) * (height - 1)).astype(int)] for start in (0.16, 0.76)]
    return min(map(crossings, columns)) >= RULED_LINES or min(map(crossings, rows)) >= RULED_LINES


def _ruled_lines(grey: np.ndarray, search: int) -> np.ndarray:
    """The edge-to-edge straight lines (x0, y0, x1, y1) of a ruled page, found on a copy at most
    ``search`` px across (OpenCV's probabilistic Hough transform; faint rules count, so that
    light grey rules mark a page as ruled too); none where the page is not ruled."""
    height, width = grey.shape
    small, scale = shrunk(grey, search)
    marked = (small < PAPER_WHITE).astype(np.uint8)
    shortest = RULED_SPAN * min(small.shape)
    segments = cv2.HoughLinesP(
        marked,
        1,
        # Angle steps fine enough that a line between two drifts under a pixel along its length, and
        # a whole number of them to a right angle, so that level and upright lines fall on one.
        np.pi / (4 * np.ceil(np.pi * shortest / 8)),
        threshold=round(shortest / 2),
        minLineLength=shortest,
        maxLineGap=round(0.02 * max(small.shape)),
    )
    if segments is None:
        return np.empty((0, 4))
    segments = segments.reshape(-1, 4) / scale
    x0, y0, x1, y1 = segments.T
    ruled = segments[(np.abs(x1 - x0) >= RULED_SPAN * width) | (np.abs(y1 - y0) >= RULED_SPAN * height)]
    # One thick stroke holds several parallel segments: lines count apart only beyond twice the ink's width.
    apart = max(0.01 * max(height, width), 2 * stroke_width(marked.astype(bool)) / scale)
    angles = np.array([angle for angle, _ in _distinct_lines(ruled, apart)])
    turns = np.abs(angles[:, None] - angles[None, :])
    parallel = np.minimum(turns, np.pi - turns) < np.radians(2)
    return ruled if parallel.sum(axis=1).max(initial=0) >= RULED_LINES else np.empty((0, 4))


def _distinct_lines(segments: np.ndarray, apart: float) -> list[tuple[float, float]]:
    """The lines that segments (x0, y0, x1, y1) lie on, as (angle, offset) pairs: a thick line gives
    the Hough transform several segments side by side, which count once unless ``apart`` px apart."""
    lines: list[tuple[float, float]] = []
    for x0, y0, x1, y1 in segments:
        angle = np.arctan2(y1 - y0, x1 - x0) % np.pi
        offset = (y0 + y1) / 2 * np.cos(angle) - (x0 + x1) / 2 * np.sin(angle)
        for known_angle, known_offset in lines:
            turn = abs(angle - known_angle)
            if turn < np.radians(2) and abs(offset - known_offset) < apart:
                break
            if np.pi - turn < np.radians(2) and abs(offset + known_offset) < apart:  # the same, reversed
                break
        else:
            lines.append((angle, offset))
    return lines


def stroke_width(ink: np.ndarray) -> float:
    """Mean stroke width of a binary ink mask: twice its area over its boundary length."""
    padded = np.pad(ink, 1)
    interior = ink & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    boundary = int(ink.sum() - interior.sum())
    return 2.0 * float(ink.sum()) / max(boundary, 1)


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
