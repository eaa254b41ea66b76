"""CLI mistakes said in one line before any work: a Milvus --index-type that is not one, an evaluation
with nothing to rank, a `ui` that cannot serve; and a `ui` that stops when its process is told to."""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from sbir_engine.build import build_index, remove_files
from sbir_engine.cli import app
from sbir_engine.index import GalleryIndex
from sbir_engine.metrics import hub_share

MILVUS_MISSING = [name for name in ("pymilvus", "milvus_lite") if importlib.util.find_spec(name) is None]
needs_milvus = pytest.mark.skipif(bool(MILVUS_MISSING), reason=f"{MILVUS_MISSING} not installed")
# The CLI as a separate process, where a library's logged traceback on stderr would show.
CLI = [sys.executable, "-c", "import sys; from sbir_engine.cli import app; sys.exit(app())"]


# Collections whose index type Milvus Lite cannot build, one with sbir-engine's metadata naming a
# right type, one naming the FAISS string an earlier version let through: argv[1] uri, argv[2] meta.
UNLOADABLE_COLLECTIONS = """
import json, sys
import numpy as np
from pymilvus import DataType, MilvusClient
from sbir_engine.milvus import META_PROPERTY

uri, meta = sys.argv[1], json.loads(sys.argv[2])
client = MilvusClient(uri)
for name, factory in (("unloadable", "FLAT"), ("old", "HNSW32,Flat")):
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=meta["dim"])
    index_params = client.prepare_index_params()
    index_params.add_index("vector", index_type="HNSW32,Flat", metric_type="COSINE")
    properties = {META_PROPERTY: json.dumps(meta | {"factory": factory})}
    client.create_collection(name, schema=schema, index_params=index_params, properties=properties)
    # Milvus Lite builds the index of stored rows when a later process loads the collection.
    client.insert(name, [{"id": i, "vector": np.eye(meta["dim"])[i].tolist()} for i in range(5)])
client.close()
"""


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as JSON parsers outside Python do."""
    return json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} in JSON output"))


def error_lines(stderr: str) -> list[str]:
    """stderr without TensorFlow's start-up chatter."""
    noise = ("WARNING: All log messages", "oneDNN", "absl", "XNNPACK")
    return [line for line in stderr.splitlines() if line.strip() and not any(n in line for n in noise)]


# -- Milvus index types ------------------------------------------------------------------------------


@needs_milvus
def test_milvus_index_type_is_checked_before_anything_is_written(
    small_run, small_gallery, small_index, tmp_path
):
    from pymilvus import MilvusClient

    uri = str(tmp_path / "types.db")
    runner = CliRunner()
    build = ["build-index", "--model", str(small_run), "--gallery", str(small_gallery)]
    build += ["--backend", "milvus", "--uri", uri, "--collection", "built", "--index-type", "HNSW32,Flat"]
    export = ["index", "export-milvus", "--index", str(small_index), "--uri", uri, "--collection", "copy"]
    for command in (build, export + ["--index-type", "bogus"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1, result.output
        message = result.output.strip()
        assert message.startswith("error: --index-type") and "\n" not in message
        assert "is not a Milvus index type" in message and "FLAT, IVF_FLAT" in message and "HNSW" in message
        assert "Embedding" not in result.output
    client = MilvusClient(uri)
    assert client.list_collections() == []  # nothing was made that later commands would trip on
    client.close()
    # A right name in any case is Milvus's own name, and the collection answers afterwards.
    result = runner.invoke(app, [*export, "--index-type", "hnsw"])
    assert result.exit_code == 0 and "index HNSW" in result.output, result.output
    info = runner.invoke(app, ["index", "info", "--backend", "milvus", "--uri", uri, "--collection", "copy"])
    assert info.exit_code == 0 and "type        HNSW" in info.output, info.output


@needs_milvus
def test_a_collection_milvus_cannot_load_is_one_line_and_build_index_replaces_it(
    small_run, small_gallery, small_index, tmp_path
):
    """Collections whose index Milvus cannot build (as an earlier version wrote them) on every verb."""
    uri = str(tmp_path / "broken.db")
    meta = json.dumps(GalleryIndex.load(small_index).meta)
    # Made in another process: a Milvus Lite file is held by one process until it exits.
    subprocess.run([sys.executable, "-c", UNLOADABLE_COLLECTIONS, uri, meta], check=True, timeout=300)
    sketch = sorted(small_gallery.glob("*/sketch_*"))[0]
    milvus = ["--backend", "milvus", "--uri", uri, "--collection"]
    for verb in (["index", "info"], ["query", str(sketch)]):
        for name, expected in (("unloadable", "unknown index_type"), ("old", "build-index --backend milvus")):
            done = subprocess.run([*CLI, *verb, *milvus, name], capture_output=True, text=True, timeout=300)
            lines = error_lines(done.stderr)
            assert done.returncode == 1 and len(lines) == 1, done.stderr
            assert lines[0].startswith("error: ") and expected in lines[0]
    # The collection an earlier version wrote with a FAISS factory string is rebuilt by build-index.
    command = ["build-index", "--model", str(small_run), "--gallery", str(small_gallery), *milvus, "old"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0 and "full rebuild" in result.output and "Milvus FLAT" in result.output


# -- evaluate with nothing, or no labels, to rank ----------------------------------------------------


@pytest.fixture(scope="module")
def flat_index(tmp_path_factory, small_run, small_gallery):
    """An index of an unlabelled gallery: the small gallery's photos in one flat folder."""
    gallery = tmp_path_factory.mktemp("flat-gallery")
    for path in sorted(small_gallery.glob("*/*"))[::4]:
        shutil.copyfile(path, gallery / f"{path.parent.name}-{path.name}")
    out = tmp_path_factory.mktemp("flat-index") / "index"
    build_index(small_run, gallery, out)
    return out


def test_evaluate_on_an_unlabelled_gallery_reports_classification_and_says_why_not_retrieval(
    flat_index, small_dataset, tmp_path
):
    queries = small_dataset / "sketch" / "test"
    runner = CliRunner()
    text = runner.invoke(app, ["evaluate", "--index", str(flat_index), "--queries", str(queries)])
    assert text.exit_code == 0, text.output
    assert "sketch classification  top-1" in text.output
    assert "retrieval not measured: the gallery has no labels" in text.output and "nan" not in text.output
    out = tmp_path / "evaluation"
    result = runner.invoke(
        app, ["evaluate", "-i", str(flat_index), "--queries", str(queries), "--json", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    for report in (strict_json(result.stdout), strict_json((out / "evaluation.json").read_text())):
        assert 0 <= report["classification"]["top1"] <= 1
        assert report["retrieval"] is None and report["embedding_retrieval"] is None
        assert "no labels" in report["retrieval_skipped"]
        assert all(q["AP"] is None for q in report["per_query"])
    assert "note: retrieval not measured" in result.stderr
    # Two such evaluations still compare query by query (top-k; the APs were not measured).
    against = runner.invoke(
        app,
        [
            "evaluate",
            "-i",
            str(flat_index),
            "--queries",
            str(queries),
            "--against",
            str(out / "evaluation.json"),
        ],
    )
    assert against.exit_code == 0, against.output
    assert "AP       not measured" in against.output


def test_evaluate_on_an_empty_gallery_is_a_one_line_error(flat_index, small_dataset, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(flat_index, index)
    remove_files(index, [entry.path for entry in GalleryIndex.load(index).entries.values()])
    assert len(GalleryIndex.load(index)) == 0
    queries = small_dataset / "sketch" / "test"
    for extra in ([], ["--json"]):
        result = CliRunner().invoke(app, ["evaluate", "-i", str(index), "--queries", str(queries), *extra])
        assert result.exit_code == 1, result.output
        assert result.stdout == "" and "NaN" not in result.output
        assert result.stderr.startswith("error: ") and "holds no gallery images" in result.stderr
        assert result.stderr.count("\n") == 1


def test_hubs_leave_unlabelled_gallery_images_out():
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.8, 0.2, 0.9, 0.1]])
    worst = hub_share(scores, ["cat", "dog"], ["cat", None, "dog", None], k=3)
    assert worst == {"cat": ("dog", 1 / 3), "dog": ("cat", 1 / 3)}


def test_report_json_writes_null_for_figures_that_could_not_be_measured():
    from sbir_engine.evaluate import report_json

    report = {"top1": float("nan"), "ci95": (float("nan"), float("inf")), "nested": [{"x": 0.5}]}
    assert strict_json(report_json(report)) == {"top1": None, "ci95": [None, None], "nested": [{"x": 0.5}]}


# -- ui --------------------------------------------------------------------------------------------


@pytest.fixture
def no_server(monkeypatch):
    """Record instead of starting Streamlit, however the CLI would start it."""
    started = []
    monkeypatch.setattr(subprocess, "call", lambda command, *a, **k: started.append(command) or 0)
    monkeypatch.setattr(os, "execv", lambda path, command: started.append(command))
    return started


def test_ui_refuses_a_missing_index_and_a_bad_port_before_starting(no_server, tmp_path, small_index):
    runner = CliRunner()
    for index, expected in (
        (tmp_path / "nonexist", "no such index folder"),
        (tmp_path, "not an sbir-engine index"),
    ):
        result = runner.invoke(app, ["ui", "--index", str(index), "--port", "8650"])
        assert result.exit_code == 1 and expected in result.stderr, result.output
        assert result.stderr.count("\n") == 1
    for port in ("70000", "-1", "0"):
        result = runner.invoke(app, ["ui", "--index", str(small_index), "--port", port])
        assert result.exit_code == 2 and "--port" in result.output, result.output
    assert no_server == []
    result = runner.invoke(app, ["ui", "--index", str(small_index), "--port", "8650"])
    assert result.exit_code == 0, result.output
    [command] = no_server
    assert command[command.index("--server.port") + 1] == "8650" and command[-2:] == [
        "--index",
        str(small_index),
    ]


def _free_port() -> int:
    for port in range(8600, 8700):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return port
    pytest.skip("no free port in 8600-8699")


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(os.name != "posix", reason="signals to a process group")
def test_sigterm_to_ui_stops_the_server(small_index):
    port = _free_port()
    command = [*CLI, "ui", "--index", str(small_index), "--port", str(port)]
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 90
        while not _listening(port):
            assert server.poll() is None and time.monotonic() < deadline, "the page did not start"
            time.sleep(0.3)
        server.send_signal(signal.SIGTERM)  # to `sbir-engine ui` alone, as a service manager does
        server.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _listening(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _listening(port), f"port {port} still served after SIGTERM to sbir-engine ui"
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
        server.wait(timeout=10)
