"""Drawings on paper, scanned or photographed: the page found on its desk and squared up, the light
on it divided out, a notebook's rules taken off. Grey pictures in, grey pictures out (0–255, ink
dark); ``images.normalize_sketch`` calls these before it looks for ink.
"""

from __future__ import annotations

import cv2
import numpy as np

# A page (larger than a bitmap) whose border reads darker than this, as a photographed sheet of paper
# does, is flattened to white before ink is looked for. Canvases, white scans and QuickDraw's bitmaps
# (whose ink can cover most of their border) are left exactly as they were: version 2 holds (tested).
PAPER_WHITE = 235
# A side of the frame dark along this share of it is surround, not ink.
EDGE_BAND = 0.9
# A picture whose border is this much darker than its lightest hundredth may be a page on a desk.
SURROUND_CONTRAST = 40
# A page on a desk is looked for down to this share of the frame (a sticky note shot from arm's length).
PAGE_SHARE = 0.04
# Found by its outline, a page is traced by edges all round (this share of its hull) and lighter than
# the desk around it by at least PAGE_LIFT of its light.
OUTLINE_TRACED = 0.9
PAGE_LIFT = 0.03
# A straight line across this share of the page's width (or down its height) runs edge to edge.
RULED_SPAN = 0.8
# Paper is ruled when it holds this many parallel lines from edge to edge (a drawing of a box, two).
RULED_LINES = 5
# Whether a page is ruled is looked at on a copy at most this many pixels across, and a ruled page's
# lines are found to paint them out on one at most RULED_ERASE across.
RULED_SEARCH = 256
RULED_ERASE = 1000


def _sides(grey: np.ndarray) -> tuple[np.ndarray, ...]:
    """The picture's outermost rows and columns: top, bottom, left, right."""
    return grey[0], grey[-1], grey[:, 0], grey[:, -1]


def border(grey: np.ndarray) -> np.ndarray:
    """The picture's outermost rows and columns, one after another."""
    return np.concatenate(_sides(grey))


def darkest_side(grey: np.ndarray) -> float:
    """The grey level that the darkest side of the picture stays under along EDGE_BAND of it: a strip
    of desk beside a page that fills the rest of the frame, or the dark edge of a scanner's glass."""
    return float(min(np.percentile(side, 100 * EDGE_BAND) for side in _sides(grey)))


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
    the largest light region (``_lightest_region``). So it is where one side alone is that dark nearly
    all along (``darkest_side``: a strip of desk beside a page photographed close up, the edge of a
    scanner's glass), if what lies outside the page is bare: a shadow along a side of the page holds
    the drawing's strokes and stays. Where the desk is nearly as light as the paper
    (a white one), or where no light region is as paper is, it is the largest outline that edges
    trace all round and that is lighter than the desk around it (``_page_outline``): under light
    falling off across the frame, the far side of a white desk is lighter than the near side of
    the page, and no split of grey levels tells them apart. Light strokes on a dark board are no
    page by either measure, and stay as they are. A picture whose surround is white (a canvas, a
    white scan) is no page on a desk, and is spared the looking.
    """
    surround, strip = np.median(border(grey)), darkest_side(grey)
    if min(surround, strip) >= 255 - SURROUND_CONTRAST:
        return grey
    lightest = np.percentile(grey, 99)
    on_a_desk = surround < lightest - SURROUND_CONTRAST
    beside_a_strip = not on_a_desk and strip < lightest - SURROUND_CONTRAST
    if on_a_desk or beside_a_strip:
        page = _lightest_region(grey, bare_surround=beside_a_strip)
        if page is not None:
            return page
    outline = _page_outline(grey)
    squared = None if outline is None else _squared_up(grey, outline)
    return grey if squared is None else squared[0]


def _lightest_region(grey: np.ndarray, bare_surround: bool = False) -> np.ndarray | None:
    """The page as the largest light region, squared up, if it is as paper is: PAGE_SHARE of the
    frame at least, 85 % light (the ink is the rest) and light all round its border (95 %), once
    lines thinner than 2 % of the frame are closed over (a notebook's rules cross its edges). Chalk
    strokes up to 6 % of a board's width did none of that. With ``bare_surround``, only if nothing
    is drawn outside it (``_marked``)."""
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
    if bare_surround and _marked(grey, outline):
        return None
    squared = _squared_up(grey, outline, light)
    if squared is None:
        return None
    page, page_light = squared
    return page if page_light.mean() >= 0.85 and border(page_light).mean() >= 0.95 else None


def _marked(grey: np.ndarray, outline: np.ndarray) -> bool:
    """Whether the picture outside ``outline`` holds marks: more than 0.2 % of it darker by
    SURROUND_CONTRAST than what is around it (looked at on a copy at most 512 px across). A shadow
    across part of a page holds the drawing's strokes; a desk or a scanner's lid does not."""
    small, scale = shrunk(grey, 512)
    near = np.ones((2 * round(0.01 * max(small.shape)) + 1,) * 2, np.uint8)
    page = np.round(outline * scale).astype(np.int32)
    outside = cv2.erode(cv2.fillConvexPoly(np.ones_like(small), page, 0), near) > 0  # not the page's edge
    if not outside.any():
        return False
    surround = cv2.morphologyEx(small, cv2.MORPH_CLOSE, near)
    return bool((small[outside] < surround[outside].astype(int) - SURROUND_CONTRAST).mean() > 0.002)


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
