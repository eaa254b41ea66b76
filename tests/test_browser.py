"""End to end: the Streamlit page in Chromium, driven by Playwright, on the session's small real index.

The server is `python -m streamlit run ui/app.py ... -- --index INDEX` on a free localhost port. A real
QuickDraw cat is drawn stroke by stroke with the mouse, a real QuickDraw bitmap and a broken file are
uploaded through the file input, and a screenshot of the page with the drawn query is checked.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from PIL import Image

from sbir_engine.config import SHARED_DATA
from sbir_engine.data import read_stroke_records

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
K_SLIDER = '.st-key-k input[type="range"]'
CAPTION = re.compile(r"^(?P<label>\S+) · (?P<score>-?\d+\.\d{3})$")


def _helpers():
    spec = importlib.util.spec_from_file_location("sbir_screenshot", REPO / "scripts" / "screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ui = _helpers()


@pytest.fixture(scope="module")
def app_url(small_index, tmp_path_factory):
    """The page served against the small index; the server is stopped when the module is done."""
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    try:
        with ui.serve(small_index, log, timeout=90) as url:
            yield url
    finally:
        if log.exists():  # shown by pytest for a failing test
            print("---- streamlit server log (tail) ----\n" + log.read_text(errors="replace")[-3000:])


@pytest.fixture(scope="module")
def browser():
    if not Path(ui.CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {ui.CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = ui.launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, app_url):
    page = ui.open_page(browser, app_url)  # waits for the model to load and the empty-canvas hint
    yield page
    page.close()


def check_results(page, label: str, captions: list[str], k: int, classes) -> None:
    assert label in classes
    assert len(captions) == k and page.locator(ui.RESULT_IMAGES).count() == k
    parsed = [CAPTION.match(caption) for caption in captions]
    assert all(parsed), captions
    assert {m.group("label") for m in parsed} <= set(classes)
    scores = [float(m.group("score")) for m in parsed]
    assert scores == sorted(scores, reverse=True)
    assert page.get_by_text(re.compile(r"^Query time: \d+ ms$")).count() == 1
    # The query as the network saw it: the normaliser's 28 px sketch, shown four times enlarged.
    view = page.locator(ui.VIEW_IMAGE)
    assert view.count() == 1 and view.locator("img").evaluate("img => img.naturalWidth") == 28 * 4
    assert page.locator('[data-testid="stException"]').count() == 0
    assert page.locator('[data-testid="stAlertContentError"]').count() == 0


def test_drawn_cat_shows_class_and_k_nearest_images(page, small_config, tmp_path):
    strokes = read_stroke_records(SHARED_DATA / "quickdraw-strokes", "cat")[0]["drawing"]
    assert page.get_by_text(ui.HINT).is_visible()
    k = int(page.locator(K_SLIDER).input_value())
    assert k == 10

    ui.draw_strokes(page, strokes)
    ui.wait_for_strokes(page, len(strokes))
    label, captions = ui.wait_for_results(page, k)
    check_results(page, label, captions, k, small_config.classes)
    assert page.get_by_text(ui.HINT).count() == 0

    # The README's screenshot comes from scripts/screenshot.py on the demo index, not from here.
    shot = ui.full_page_screenshot(page, tmp_path / "screenshot.png")
    with Image.open(shot) as image:
        assert image.width == ui.VIEWPORT["width"] and image.height >= ui.VIEWPORT["height"]


def test_uploaded_sketch_shows_results_then_k_and_class_filter(page, small_dataset, small_config, tmp_path):
    # A real QuickDraw bitmap from the held-out split, re-encoded as a PNG file to upload.
    source = sorted((small_dataset / "sketch" / "test" / "cat").iterdir())[0]
    sketch = tmp_path / "my-cat-sketch.png"
    with Image.open(source) as image:
        image.save(sketch, format="PNG")

    page.locator(ui.FILE_INPUT).set_input_files(str(sketch))
    label, captions = ui.wait_for_results(page, 10)
    check_results(page, label, captions, 10, small_config.classes)

    slider = page.locator(K_SLIDER)
    slider.focus()
    for _ in range(6):
        page.keyboard.press("ArrowLeft")
    page.wait_for_function(
        "([sel, n]) => document.querySelectorAll(sel).length === n", arg=[ui.RESULT_IMAGES, 4], timeout=60_000
    )
    ui.wait_idle(page)
    assert slider.input_value() == "4"
    assert page.locator(ui.RESULT_IMAGES).count() == 4

    page.locator(".st-key-same_class").get_by_text("Only the predicted class").click()
    page.wait_for_function(
        """([sel, label]) => { const c = [...document.querySelectorAll(sel)].map(e => e.innerText);
                              return c.length === 4 && c.every(t => t.startsWith(label + ' '));}""",
        arg=[ui.RESULT_CAPTIONS, label],
        timeout=60_000,
    )
    ui.wait_idle(page)
    captions = page.locator(ui.RESULT_CAPTIONS).all_inner_texts()
    assert [CAPTION.match(c).group("label") for c in captions] == [label] * 4


def test_unreadable_upload_shows_error_panel(page):
    page.locator(ui.FILE_INPUT).set_input_files(
        files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"these are notes, not a picture\n"}]
    )
    error = page.locator('[data-testid="stAlertContentError"]')
    error.wait_for(timeout=60_000)
    ui.wait_idle(page)
    assert (
        error.inner_text().strip() == "Cannot use the uploaded file notes.png: not a recognised image format"
    )
    assert page.locator(ui.RESULT_IMAGES).count() == 0
    assert page.locator('[data-testid="stException"]').count() == 0
