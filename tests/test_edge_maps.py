"""scripts/edge_maps.py, the photo → edge-map lever: datasets that `train` and `build-index` accept."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sbir_engine.data import load_split

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "edge_maps.py"


def run_script(*args: str) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=True)
    return done.stdout


def test_edge_maps_replace_photos_and_report_a_corrupt_one(small_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    broken = data / "photo" / "train" / "cup" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out = tmp_path / "edges"
    output = run_script("--data", str(data), "--out", str(out))
    assert f"skipped {broken}: " in output and "1 photos skipped" in output

    sketches = [s.path.name for s in load_split(data, "train", ("sketch",))]
    assert [s.path.name for s in load_split(out, "train", ("sketch",))] == sketches
    for split in ("train", "val", "test"):
        photos = [s for s in load_split(data, split, ("photo",)) if s.path != broken]
        edges = load_split(out, split, ("photo",))
        assert [(s.label, s.path.stem) for s in edges] == [(s.label, s.path.stem) for s in photos]
    for sample in load_split(out, "test", ("photo",))[:20]:
        pixels = np.asarray(Image.open(sample.path))
        assert pixels.shape == (180, 180) and set(np.unique(pixels)) <= {0, 255}
        assert 0.002 < (pixels == 0).mean() < 0.4, sample.path  # lines, neither blank nor a fill

    bridge = tmp_path / "bridge"
    run_script("--data", str(data), "--out", str(bridge), "--edges", str(out), "--bridge")
    train = {s.path.name for s in load_split(bridge, "train", ("photo",))}
    photos = {s.path.name for s in load_split(data, "train", ("photo",)) if s.path != broken}
    assert train == photos | {f"edge-{Path(name).stem}.png" for name in photos}
    test = load_split(bridge, "test", ("photo",))
    assert [s.path.name for s in test] == [s.path.name for s in load_split(data, "test", ("photo",))]
