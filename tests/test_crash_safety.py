"""A build killed with SIGKILL at any point loses nothing: the previous index answers exactly as before.

``sbir-engine build-index`` runs in a subprocess on a copy of a real index with new photos to add;
``SBIR_ENGINE_TEST_PAUSE_AT`` (see ``sbir_engine.index.pause_point``) stops it at a chosen point
— while embedding, half-way through writing the new version, just before the ``CURRENT`` swap,
just after it — where the test kills it. Two builds run at a time, each on its own index copy.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sbir_engine.build import FaissTarget, IndexBusyError, build_index, remove_files, writer_lock
from sbir_engine.cli import app
from sbir_engine.embed import Embedder
from sbir_engine.index import CURRENT, PAUSE_ENV, GalleryIndex, current_version
from sbir_engine.model import load_model

CLASSES = ("airplane", "cat", "cup", "fish", "umbrella")
# Where a build is killed, and whether the new version was committed by then.
POINTS = {"embedding": False, "writing": False, "committing": False, "cleanup": True}
CLI = "from sbir_engine.cli import app; app(prog_name='sbir-engine')"


def answers(index_dir: Path, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    index = GalleryIndex.load(index_dir)
    scores, ids = index.search(queries, 10)
    return scores, ids, {e.id: e for e in index.entries.values()}


@pytest.fixture(scope="module")
def embedder(small_run) -> Embedder:
    return Embedder(load_model(small_run))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_photos, small_run, embedder):
    """An index of 15 real photos, then 10 more photos added to its gallery (not yet indexed)."""
    root = tmp_path_factory.mktemp("crash")
    gallery, index_dir = root / "gallery", root / "index"
    for label in CLASSES:
        (gallery / label).mkdir(parents=True)
        for path in sorted((small_photos / label).iterdir())[:3]:
            shutil.copyfile(path, gallery / label / path.name)
    build_index(small_run, gallery, index_dir, embedder=embedder)
    for label in CLASSES:
        for path in sorted((small_photos / label).iterdir())[3:5]:
            shutil.copyfile(path, gallery / label / path.name)
    before = GalleryIndex.load(index_dir)
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(5, before.dim)).astype(np.float32)
    queries = np.concatenate([np.asarray(before.vectors[:5]), noise / np.linalg.norm(noise, axis=1)[:, None]])
    return gallery, index_dir, queries


def start_build(small_run: Path, gallery: Path, index_dir: Path, point: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, PAUSE_ENV: point, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, "-c", CLI, "build-index", "--model", str(small_run), "--gallery", str(gallery)]
    command += ["--out", str(index_dir), "--batch-size", "4"]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def wait_for_pause(process: subprocess.Popen, log: Path, point: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while f"paused at {point}" not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"build did not pause at {point} (exit {process.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def test_a_killed_build_leaves_the_previous_index_answering_as_before(setup, small_run, embedder, tmp_path):
    gallery, base, queries = setup
    scores, ids, entries = answers(base, queries)
    base_version = current_version(base).name

    # What an uninterrupted build gives: the reference for every rerun.
    reference = tmp_path / "reference"
    shutil.copytree(base, reference)
    report = build_index(small_run, gallery, reference, embedder=embedder)
    assert (report.added, report.unchanged, report.total) == (10, 15, 25)
    ref_scores, ref_ids, ref_entries = answers(reference, queries)

    copies = {point: tmp_path / f"index-{point}" for point in POINTS}
    points = list(POINTS)
    for wave in (points[:2], points[2:]):  # two builds at a time: each holds ~1 GB
        processes, logs = {}, {}
        for point in wave:
            shutil.copytree(base, copies[point])
            logs[point] = tmp_path / f"{point}.log"
            processes[point] = start_build(small_run, gallery, copies[point], point, logs[point])
        try:
            for point, process in processes.items():
                wait_for_pause(process, logs[point], point)
                process.send_signal(signal.SIGKILL)
                assert process.wait(timeout=30) == -signal.SIGKILL
        finally:
            for process in processes.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()

    for point, committed in POINTS.items():
        copy = copies[point]
        if not committed:  # the previous index is still the index, answering bit for bit as before
            assert current_version(copy).name == base_version, point
            after_scores, after_ids, after_entries = answers(copy, queries)
            np.testing.assert_array_equal(after_ids, ids, err_msg=point)
            np.testing.assert_array_equal(after_scores, scores, err_msg=point)
            assert after_entries == entries, point
        else:  # the swap happened: the new version is complete
            assert current_version(copy).name != base_version
            after_scores, after_ids, after_entries = answers(copy, queries)
            assert after_entries == ref_entries
            np.testing.assert_array_equal(after_ids, ref_ids)
            np.testing.assert_allclose(after_scores, ref_scores, atol=1e-5)
        leftovers = {p.name for p in copy.iterdir() if p.name.startswith(".")}
        if point in ("writing", "committing"):
            assert leftovers, f"{point}: expected the killed build's half-written files"

        # A rerun completes and cleans up after the killed build.
        rerun = build_index(small_run, gallery, copy, embedder=embedder)
        assert rerun.total == 25 and not rerun.failed, point
        assert (rerun.added, rerun.unchanged) == ((0, 25) if committed else (10, 15)), point
        names = sorted(p.name for p in copy.iterdir())
        assert names == sorted([CURRENT, current_version(copy).name]), (point, names)
        assert not any(".tmp-" in name for name in names)
        rerun_scores, rerun_ids, rerun_entries = answers(copy, queries)
        assert rerun_entries == ref_entries, point  # same ids for the same files
        np.testing.assert_array_equal(rerun_ids, ref_ids, err_msg=point)
        np.testing.assert_allclose(rerun_scores, ref_scores, atol=1e-5, err_msg=point)


def test_a_second_writer_is_refused_while_a_build_runs(setup, small_run, embedder, tmp_path):
    """Two writers that both read the old index would each commit their own update, the last dropping
    the other's files: the second is refused at once, saying why; the lock dies with its holder."""
    gallery, base, queries = setup
    scores, ids, _ = answers(base, queries)
    index_dir = tmp_path / "index"
    shutil.copytree(base, index_dir)
    log = tmp_path / "build.log"
    process = start_build(small_run, gallery, index_dir, "embedding", log)
    try:
        wait_for_pause(process, log, "embedding")
        with pytest.raises(IndexBusyError, match=f"{index_dir}: another build-index"):
            build_index(small_run, gallery, index_dir, embedder=embedder)
        with pytest.raises(IndexBusyError):
            remove_files(index_dir, [gallery / "cat"])
        command = ["build-index", "--model", str(small_run), "--gallery", str(gallery)]
        refused = CliRunner().invoke(app, [*command, "--out", str(index_dir)])
        assert refused.exit_code == 1 and "is writing this index right now" in refused.output
        after_scores, after_ids, _ = answers(index_dir, queries)  # untouched by the refused writers
        np.testing.assert_array_equal(after_ids, ids)
        np.testing.assert_array_equal(after_scores, scores)
    finally:
        process.kill()
        process.wait()
    report = build_index(small_run, gallery, index_dir, embedder=embedder)  # the killed holder freed it
    assert (report.added, report.unchanged, report.total) == (10, 15, 25)


def test_the_writer_lock_excludes_other_threads_and_lets_its_own_thread_back_in(tmp_path):
    """add_files may call build_index on the same index (same thread); another thread must wait its turn."""
    target = FaissTarget(tmp_path / "index")
    outcomes = []

    def other_thread():
        try:
            with writer_lock(target):
                outcomes.append("other thread wrote")
        except IndexBusyError:
            outcomes.append("other thread refused")

    with writer_lock(target):
        with writer_lock(target):
            outcomes.append("same thread re-entered")
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    other_thread()  # free again once the holder is done
    assert outcomes == ["same thread re-entered", "other thread refused", "other thread wrote"]


def test_the_writer_lock_holds_through_a_symlink_to_the_index(tmp_path):
    """The lock is named after the folder itself: a second writer through a link to it is refused."""
    (tmp_path / "index").mkdir()
    (tmp_path / "link").symlink_to("index", target_is_directory=True)
    outcomes = []

    def writer_through_the_link():
        try:
            with writer_lock(FaissTarget(tmp_path / "link")):
                outcomes.append("wrote")
        except IndexBusyError:
            outcomes.append("refused")

    with writer_lock(FaissTarget(tmp_path / "index")):
        thread = threading.Thread(target=writer_through_the_link)
        thread.start()
        thread.join()
    assert outcomes == ["refused"]
