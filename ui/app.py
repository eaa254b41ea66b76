"""Streamlit page: draw or upload a sketch, see its class and the nearest gallery images.

Started by ``sbir-engine ui --index INDEX_DIR``, which runs
``python -m streamlit run ui/app.py -- --index INDEX_DIR``. The index folder comes from ``--index``
after ``--``, else the ``SBIR_ENGINE_INDEX`` environment variable, else ``EngineConfig().index_dir``.

The page predicts whenever its input changes (a stroke on the canvas, an upload, k or the class
filters): Streamlit reruns the script on every change, and a query takes well under a second once
the model is loaded. Stable markers for tests and scripts: the text "Predicted class: **<label>**",
result images inside the container with the CSS class ``st-key-results`` captioned "<label> · <score>",
each with a "More like this" button (key ``more_<id>``: the gallery image becomes the query),
the query as the network sees it (captioned ``VIEW_CAPTION``) beside the class, and the canvas
(``st-key-canvas``) and upload box (``st-key-upload``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image

if importlib.util.find_spec("sbir_engine") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sbir_engine.config import IMAGE_EXTENSIONS, EngineConfig  # noqa: E402
from sbir_engine.engine import ModelMismatchError, Neighbour, QueryResult, SketchEngine  # noqa: E402
from sbir_engine.images import EmptySketchError, ImageError, composite_on_white, open_image  # noqa: E402
from sbir_engine.index import IndexFormatError  # noqa: E402

try:  # the page still takes uploads where the canvas component cannot load
    from streamlit_drawable_canvas import st_canvas
except Exception:  # pragma: no cover - depends on the installed component
    st_canvas = None

TITLE = "Sketch Based Image Retrieval"
INDEX_ENV = "SBIR_ENGINE_INDEX"
CANVAS_SIZE = 400
GRID_COLUMNS = 5
TOP_CLASSES = 5
VIEW_CAPTION = "What the model sees"
VIEW_ZOOM = 4  # the 28 px sketch shown at 112 px, its pixels kept square
# Result images are shown as thumbnails this many pixels across (a grid cell, twice over for HiDPI
# screens), decoded as the engine decodes them: a 12 MP photo re-encoded on every rerun cost 165 ms,
# a 16-bit PNG stopped the page, and a portrait photo lost its EXIF turn in Streamlit's resize.
THUMBNAIL = 480
HINT = "Draw a sketch on the canvas or upload a sketch image to see its class and the nearest gallery images."
# Session state: the gallery image whose "More like this" was pressed, and the query it was pressed
# under; a new drawing or upload is a new query and drops it.
MORE_LIKE = "more_like"
QUERY_SIGNATURE = "query_signature"


def index_dir_from_args(argv: list[str] | None = None) -> Path:
    """``--index`` from the script's arguments, else ``$SBIR_ENGINE_INDEX``, else the default."""
    parser = argparse.ArgumentParser(prog="ui/app.py", add_help=False, allow_abbrev=False)
    parser.add_argument("--index", type=Path, default=None)
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.index is not None:
        return args.index
    if os.environ.get(INDEX_ENV):
        return Path(os.environ[INDEX_ENV])
    return EngineConfig().index_dir


def one_line(err: BaseException | str) -> str:
    """An exception (or a message) as one line of text: no traceback, no embedded newlines."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


@st.cache_resource(show_spinner="Loading the model and the index…", max_entries=4)
def load_engine(index_dir: str) -> SketchEngine:
    """One engine per index folder and process; failures are not cached, so a fixed index loads."""
    engine = SketchEngine.load(Path(index_dir))
    try:  # trace the network once here, so the first query on the page is as fast as the next
        engine.embed(np.full((8, 8, 3), 255, np.uint8), sketch=False)
    except Exception:  # a failed warm-up is not an error: the query will show any real one
        pass
    return engine


def get_engine(index_dir: Path) -> SketchEngine | None:
    """The loaded engine, or None after showing a one-line error panel."""
    try:
        return current_engine(str(Path(index_dir).resolve()))
    except IndexFormatError as err:
        st.error(f"Index not usable: {one_line(err)}")
    except ModelMismatchError as err:
        st.error(f"Model and index do not match: {one_line(err)}")
    except Exception as err:  # a damaged run folder, a missing weights file, …
        st.error(f"Cannot load the index {index_dir}: {type(err).__name__}: {one_line(err)}")
    st.caption(
        "Start the page with `sbir-engine ui --index INDEX_DIR` on a folder written by "
        "`sbir-engine build-index`."
    )
    return None


def current_engine(index_dir: str) -> SketchEngine:
    """The cached engine, moved on to a newer version written by `build-index` since it loaded.

    A build with another model makes the cached model useless for the new version (reload refuses
    it): that engine is dropped and the folder loaded afresh, with the model that built it.
    """
    engine = load_engine(index_dir)
    try:
        engine.reload()
    except ModelMismatchError:
        load_engine.clear(index_dir)
        engine = load_engine(index_dir)
    return engine


def settings() -> tuple[int, bool, int]:
    with st.sidebar:
        st.header("Settings")
        k = st.slider("Number of results (k)", min_value=1, max_value=50, value=10, key="k")
        same_class = st.toggle("Only the predicted class", value=False, key="same_class")
        stroke_width = st.slider("Stroke width", min_value=1, max_value=30, value=6, key="stroke_width")
    return k, same_class, stroke_width


@st.cache_data(max_entries=8, show_spinner=False)
def gallery_labels(_engine: SketchEngine, index_version: tuple[str, str, str | None]) -> list[str]:
    """The labels of the gallery's images, once per index version (a large gallery's manifest is
    not walked on every rerun); ``index_version`` is the cache key."""
    return sorted({entry.label for entry in _engine.index.entries.values() if entry.label})


def label_filter(engine: SketchEngine, index_dir: Path) -> list[str] | None:
    """The sidebar's "Only these classes": the labels the results may have (None: all of them)."""
    index = engine.index
    version = (str(index_dir), str(getattr(index, "version", "")), index.meta.get("version_id"))
    chosen = st.sidebar.multiselect(
        "Only these classes",
        gallery_labels(engine, version),
        key="labels",
        help="Results only from gallery images of these classes (the prediction is not limited).",
    )
    return chosen or None


def sketch_inputs(engine: SketchEngine, stroke_width: int) -> tuple[object | None, str, bool]:
    """The query (upload first, else a non-empty drawing), a name for it in messages, and whether it
    is a photo (an upload marked so)."""
    draw_col, upload_col = st.columns([3, 2], gap="medium")
    drawing = None
    with draw_col:
        st.subheader("Draw")
        if st_canvas is None:
            st.warning("The drawing canvas is not available (streamlit-drawable-canvas is not installed).")
        else:
            canvas = st_canvas(
                stroke_width=stroke_width,
                stroke_color="#000000",
                background_color="",  # transparent: the engine composites onto white
                drawing_mode="freedraw",
                height=CANVAS_SIZE,
                width=CANVAS_SIZE,
                update_streamlit=True,
                return_image_data=True,
                key="canvas",
            )
            objects = (canvas.json_data or {}).get("objects") or []
            if objects:
                drawing = canvas.image_data
                strokes = len(objects)  # freedraw: one path per stroke
                plural = "s" if strokes != 1 else ""
                st.caption(f"{strokes} stroke{plural} on the canvas · undo or clear in its toolbar")
    with upload_col:
        st.subheader("…or upload")
        max_mb = max(1, math.ceil(engine.config.max_upload_bytes / 2**20))
        upload = st.file_uploader(
            "Sketch image",
            type=[ext.lstrip(".") for ext in IMAGE_EXTENSIONS],
            max_upload_size=max_mb,
            key="upload",
            help=(
                "Dark lines on a light background (or the reverse), a scan, or a phone photo of a "
                "drawing on paper (plain, ruled or squared); any size up to the limits."
            ),
        )
        photo = st.toggle(
            "It is a photo, not a drawing",
            key="photo",
            help="Find gallery images like this picture: it is embedded as the gallery's images are, "
            "without the sketch normaliser.",
        )
        if upload is not None:
            if drawing is not None:
                st.caption("Showing results for the uploaded file; remove it to query the drawing.")
            return upload.getvalue(), f"the uploaded file {upload.name}", photo
    if drawing is not None:
        return drawing, "the drawing", False
    return None, "", False


def model_view(sketch: Image.Image) -> Image.Image:
    """The query after the sketch normaliser (cropped, re-stroked, 28 px; ``QueryResult.sketch``),
    enlarged: what the network is given, so that a drawing it misreads can be seen as it saw it."""
    return sketch.resize((sketch.width * VIEW_ZOOM, sketch.height * VIEW_ZOOM), Image.Resampling.NEAREST)


def render_result(
    result: QueryResult, resolve: Callable[[Neighbour], Path], k: int, view: Image.Image | None = None
) -> None:
    """The query as the network saw it (``view``), the predicted class, the top-5 probabilities, the
    query time and the grid of nearest images."""
    with st.container(key="answer"):
        if view is not None:
            view_col, info_col, chart_col = st.columns([1, 2, 4], gap="large")
            with view_col:
                st.image(view, caption=VIEW_CAPTION, width=view.width)
        else:
            info_col, chart_col = st.columns([1, 2], gap="large")
        with info_col:
            st.markdown(f"Predicted class: **{result.label}**")
            st.markdown(f"Probability: **{result.probabilities.get(result.label, 0.0):.1%}**")
            total = result.timings_ms.get("total")
            if total is not None:
                st.caption(f"Query time: {total:.0f} ms")
        with chart_col:
            top = result.top_classes(TOP_CLASSES)
            st.bar_chart(
                {"class": [name for name, _ in top], "probability": [p for _, p in top]},
                x="class", y="probability", horizontal=True, sort="-probability", height=200,
            )  # fmt: skip
    with st.container(key="results"):
        st.subheader("Nearest gallery images")
        neighbours = result.neighbours
        if result.note:  # why nothing matches, e.g. "only the predicted class" on unlabelled images
            st.warning(result.note)
        if not neighbours:
            if not result.note:
                st.info("The index holds no images that match.")
            return
        if len(neighbours) < k:
            st.caption(f"{len(neighbours)} of {k} results: the index holds no more that match.")
        for start in range(0, len(neighbours), GRID_COLUMNS):
            columns = st.columns(GRID_COLUMNS)
            for column, neighbour in zip(columns, neighbours[start : start + GRID_COLUMNS], strict=False):
                with column:
                    caption = f"{neighbour.label or '—'} · {neighbour.score:.3f}"
                    if neighbour.duplicates:  # the same file elsewhere in the gallery: shown once
                        copies = len(neighbour.duplicates)
                        caption += f" · {copies} more cop{'y' if copies == 1 else 'ies'} in the gallery"
                    if show_result_image(resolve(neighbour), caption, neighbour.path):
                        st.caption(f"`{Path(neighbour.path).name}`")  # which file: to find it again
                        st.button(
                            "More like this",
                            key=f"more_{neighbour.id}",
                            on_click=choose_more_like,
                            args=(neighbour.path,),
                            help="Gallery images like this one (it is the query, embedded as the build did).",
                        )


def show_result_image(path: Path, caption: str, entry: str) -> bool:
    """One result's thumbnail; a file gone, or changed into something unreadable since the build,
    gets a warning in its cell instead, and the other results are shown as ever."""
    if not path.is_file():
        st.warning(f"{caption}: gallery file {entry} is missing")
        return False
    try:
        info = path.stat()
        data = thumbnail(str(path), info.st_mtime_ns, info.st_size)
    except (OSError, ImageError) as err:
        reason = err.reason if isinstance(err, ImageError) else err.strerror or str(err)
        st.warning(f"{caption}: gallery file {entry} cannot be shown ({one_line(reason)})")
        return False
    st.image(data, caption=caption, width="stretch")
    return True


@st.cache_data(max_entries=512, show_spinner=False)
def thumbnail(path: str, modified_ns: int, file_size: int) -> bytes:
    """A gallery image as a JPEG thumbnail, upright, on white; cached per version of the file (its
    modification time and size are part of the key)."""
    image = composite_on_white(open_image(path))
    image.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


def choose_more_like(path: str) -> None:
    st.session_state[MORE_LIKE] = (path, st.session_state.get(QUERY_SIGNATURE))


def signature_of(source: object) -> str:
    """A short fingerprint of a query (upload bytes or canvas pixels): has the input changed?"""
    data = source.tobytes() if isinstance(source, np.ndarray) else bytes(source)
    return hashlib.sha1(data).hexdigest()


def run_query(
    engine: SketchEngine,
    source: object,
    name: str,
    k: int,
    same_class: bool,
    photo: bool = False,
    labels: list[str] | None = None,
) -> None:
    try:
        result = engine.query(source, k=k, same_class=same_class, labels=labels, photo=photo)
    except EmptySketchError as err:
        if not isinstance(source, np.ndarray):  # an upload: why it has no drawing (too light, blank)
            st.warning(f"Cannot use {name}: {one_line(err.reason)}")
        st.info(HINT)
    except ImageError as err:
        st.error(f"Cannot use {name}: {one_line(err.reason)}")
    except IndexFormatError as err:
        st.error(f"Index not usable: {one_line(err)}")
    except ModelMismatchError as err:
        st.error(f"Model and index do not match: {one_line(err)}")
    except Exception as err:
        st.error(f"Query failed: {type(err).__name__}: {one_line(err)}")
    else:
        view = model_view(result.sketch) if result.sketch is not None else None  # a photo is as given
        render_result(result, engine.resolve, k, view)


def main() -> None:
    st.set_page_config(page_title=TITLE, page_icon="✏️", layout="wide")
    st.title(TITLE)
    st.caption(
        "Draw a sketch or upload one: the page predicts its class and shows the nearest gallery images."
    )
    k, same_class, stroke_width = settings()
    index_dir = index_dir_from_args()
    engine = get_engine(index_dir)
    if engine is None:
        return
    st.sidebar.caption(
        f"Index: `{index_dir}` · {len(engine.index)} images · classes: {', '.join(engine.classes)}"
    )
    labels = label_filter(engine, index_dir)
    source, name, photo = sketch_inputs(engine, stroke_width)
    st.divider()
    if source is None:  # nothing to query: a "More like this" chosen before does not come back later
        st.session_state.pop(MORE_LIKE, None)
        st.session_state.pop(QUERY_SIGNATURE, None)
        st.info(HINT)
        return
    # The photo switch is part of the query: flipping it drops a "More like this" too.
    signature = st.session_state[QUERY_SIGNATURE] = f"{signature_of(source)}:{photo}"
    chosen = st.session_state.get(MORE_LIKE)
    if chosen is None or chosen[1] != signature:
        st.session_state.pop(MORE_LIKE, None)
        run_query(engine, source, name, k, same_class, photo, labels)
        return
    path = chosen[0]
    st.caption(f"More like the gallery image {path}")
    st.button("Back to the query's results", key="back", on_click=st.session_state.pop, args=(MORE_LIKE,))
    # Embedded as the build embedded it, so that the image finds itself first.
    photo = not engine.is_drawing(path)
    run_query(engine, engine.resolve(path), f"the gallery image {path}", k, same_class, photo, labels)


if __name__ == "__main__":
    main()
