"""Serve the Streamlit page, draw a real QuickDraw sketch on its canvas and screenshot the results.

    python scripts/screenshot.py --index INDEX_DIR [--out docs/screenshot.png] [--label cat]

The helpers (start the server on a free port, drive Chromium, draw strokes with the mouse, wait for
the page to settle, take a full-height screenshot) are shared with ``tests/test_browser.py``.
Chromium is Debian's (/usr/bin/chromium, or $CHROMIUM); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "ui" / "app.py"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
VIEWPORT = {"width": 1200, "height": 900}

# Stable markers of the page (see ui/app.py).
CANVAS = ".st-key-canvas canvas.upper-canvas"
FILE_INPUT = '.st-key-upload input[type="file"]'
RESULT_IMAGES = '.st-key-results [data-testid="stImage"]'
RESULT_CAPTIONS = '.st-key-results [data-testid="stImageCaption"]'
VIEW_IMAGE = '.st-key-answer [data-testid="stImage"]'  # the query as the network saw it
HINT = "Draw a sketch on the canvas or upload a sketch image"
PREDICTED = re.compile(r"Predicted class:\s*(\S+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(index_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    """``streamlit run ui/app.py -- --index INDEX_DIR`` on localhost:port, output to log_path."""
    command = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.port", str(port), "--server.address", "127.0.0.1", "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
        "--server.fileWatcherType", "none",  # others edit the tree: no "source changed" prompts
        "--", "--index", str(index_dir),
    ]  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process by stop_server
    proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def wait_until_serving(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Streamlit server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the Streamlit server did not serve {url} within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    log = getattr(proc, "log", None)
    if log is not None:
        log.close()


@contextmanager
def serve(index_dir: Path, log_path: Path, timeout: float = 60):
    """The page served on a free port: yields its URL; the server is stopped on exit."""
    port = free_port()
    proc = start_server(index_dir, port, log_path)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, proc, timeout)
        yield url
    finally:
        stop_server(proc)


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def open_page(browser, url: str, timeout_ms: float = 90_000):
    """A new page on the app, once the engine is loaded (the empty-canvas hint shows)."""
    page = browser.new_page(viewport=dict(VIEWPORT))
    page.set_default_timeout(timeout_ms)
    page.goto(url)
    page.get_by_text(HINT).wait_for()
    page.locator(CANVAS).wait_for()
    return page


def draw_strokes(page, strokes, selector: str = CANVAS, fill: float = 0.8, steps: int = 2) -> None:
    """Draw strokes with the mouse, scaled and centred into the canvas's box (page coordinates)."""
    canvas = page.locator(selector)
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    xs = [x for stroke in strokes for x in stroke[0]]
    ys = [y for stroke in strokes for y in stroke[1]]
    width, height = max(xs) - min(xs), max(ys) - min(ys)
    scale = fill * min(box["width"], box["height"]) / max(width, height, 1)
    left = box["x"] + (box["width"] - width * scale) / 2
    top = box["y"] + (box["height"] - height * scale) / 2
    for stroke in strokes:
        points = [
            (left + (x - min(xs)) * scale, top + (y - min(ys)) * scale)
            for x, y in zip(stroke[0], stroke[1], strict=True)
        ]
        page.mouse.move(*points[0])
        page.mouse.down()
        for point in points[1:] or points:  # a dot is a one-point stroke
            page.mouse.move(*point, steps=steps)
        page.mouse.up()


def wait_for_strokes(page, count: int) -> None:
    """Wait until the server has seen all ``count`` strokes (the caption under the canvas)."""
    page.get_by_text(re.compile(rf"^{count} strokes? on the canvas")).wait_for()


def wait_idle(page, timeout: float = 60, settle: float = 0.75) -> None:
    """Wait until no script run is in progress and nothing on the page is stale, for ``settle`` s."""
    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        busy = page.evaluate(
            """() => Boolean(document.querySelector('[data-testid="stStatusWidget"]')
                     || document.querySelector('[data-stale="true"]'))"""
        )
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= settle:
            return
        time.sleep(0.15)
    raise TimeoutError(f"the page was still running after {timeout:.0f} s")


def wait_for_results(page, k: int, timeout: float = 90) -> tuple[str, list[str]]:
    """Wait for the predicted class and exactly k result images; returns (label, captions)."""
    page.locator(RESULT_IMAGES).nth(k - 1).wait_for(timeout=timeout * 1000)
    wait_idle(page, timeout)
    text = page.get_by_text("Predicted class:").inner_text()
    match = PREDICTED.search(text)
    if not match:
        raise AssertionError(f"no predicted class in {text!r}")
    return match.group(1), page.locator(RESULT_CAPTIONS).all_inner_texts()


def full_page_screenshot(page, path: Path) -> Path:
    """Streamlit scrolls inside its main element: grow the viewport to its height, then shoot."""
    height = page.evaluate(
        """() => { const main = document.querySelector('[data-testid="stMain"]');
                   return Math.ceil(Math.max(main ? main.scrollHeight : 0, document.body.scrollHeight)); }"""
    )
    page.set_viewport_size({"width": VIEWPORT["width"], "height": max(VIEWPORT["height"], height)})
    wait_idle(page)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(dict(VIEWPORT))
    return path


def main(argv: list[str] | None = None) -> None:
    from playwright.sync_api import sync_playwright

    from sbir_engine.config import SHARED_DATA
    from sbir_engine.data import read_stroke_records

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True, help="Index folder written by build-index.")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshot.png")
    parser.add_argument("--label", default="cat", help="QuickDraw class whose strokes are drawn.")
    parser.add_argument("--drawing", type=int, default=0, help="Which drawing of the class (line number).")
    parser.add_argument(
        "--log",
        type=Path,
        default=Path(tempfile.gettempdir()) / "streamlit-screenshot.log",
        help="Where the Streamlit server's output goes (read it when the page does not come up).",
    )
    args = parser.parse_args(argv)

    strokes = read_stroke_records(SHARED_DATA / "quickdraw-strokes", args.label)[args.drawing]["drawing"]
    with serve(args.index, args.log) as url, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = open_page(browser, url)
            draw_strokes(page, strokes)
            wait_for_strokes(page, len(strokes))
            label, captions = wait_for_results(page, 10)
            full_page_screenshot(page, args.out)
        finally:
            browser.close()
    print(f"predicted {label}; {len(captions)} results; screenshot written to {args.out}")


if __name__ == "__main__":
    main()
