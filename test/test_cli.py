"""The `langgs` command: map → query (--json) → render → info on real frames, and clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from langgs_ros.datasets import open_sequence

LANGGS = str(Path(sys.executable).with_name("langgs"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LANGGS, *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def small_map(tmp_path_factory, hololens_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("cli") / "office.ply"
    proc = run("map", "--rgbd", str(hololens_dir), "--out", str(out), "--frames", "4:16", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "hololens layout" in proc.stderr and "Gaussians" in proc.stderr
    return out


def test_query_json_format(small_map: Path, hololens_dir: Path) -> None:
    proc = run("query", str(small_map), "red backpack", "--top-k", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["query"] == "red backpack"
    assert 1 <= len(data["objects"]) <= 2
    top = data["objects"][0]
    assert set(top) == {"id", "name", "score", "center", "size", "yaw", "num_gaussians"}
    assert top["name"] == "red backpack" and len(top["center"]) == 3 and len(top["size"]) == 3
    backpack = next(o for o in open_sequence(hololens_dir).objects if o.name == "red backpack")
    assert backpack.contains(np.array(top["center"]), margin=0.10)


def test_render_and_info(small_map: Path, hololens_dir: Path, tmp_path: Path) -> None:
    png = tmp_path / "view.png"
    proc = run("render", str(small_map), "--pose-file", str(hololens_dir / "poses.txt"), "--index", "8",
               "--intrinsics", "495.57", "495.48", "269.50", "169.19", "--size", "270", "180", "--out", str(png))
    assert proc.returncode == 0, proc.stderr
    img = cv2.imread(str(png))
    assert img.shape == (180, 270, 3) and img.mean() > 10
    proc = run("info", str(small_map))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert "red backpack" in json.dumps(info)


def test_bad_input_gives_clear_errors(small_map: Path, tmp_path: Path) -> None:
    for args, text in [(("query", str(small_map), ""), "empty"), (("query", str(small_map), "x" * 10_000), "long"),
                       (("map", "--rgbd", str(tmp_path / "nope"), "--out", str(tmp_path / "m.ply")), "not a folder"),
                       (("info", str(tmp_path / "missing.ply")), "")]:
        proc = run(*args)
        assert proc.returncode == 2, (args[0], proc.stdout, proc.stderr)
        assert "error" in proc.stderr and text in proc.stderr
