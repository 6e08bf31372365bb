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
    proc = run("map", "--rgbd", str(hololens_dir), "--out", str(out), "--frames", "4:16", "--quiet",
               "--report", str(out.parent / "report"), "--query", "red backpack")
    assert proc.returncode == 0, proc.stderr
    assert "hololens layout" in proc.stderr and "Gaussians" in proc.stderr
    return out


def test_map_report_pictures(small_map: Path) -> None:
    """``langgs map --report``: the plan and the view from the last camera are written and their paths printed."""
    report = small_map.parent / "report"
    plan = cv2.imread(str(report / "top_down.png"))
    assert plan is not None and plan.shape[0] > 500 and plan.std() > 10
    view = cv2.imread(str(report / "last_view.png"))
    assert view is not None and view.shape == (360, 540, 3) and view.std() > 10  # hololens frames are 540x360


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
    # Depth in millimetres (16-bit PNG), at half resolution of the frame: it agrees with the sensor's depth.
    dpng = tmp_path / "depth.png"
    proc = run("render", str(small_map), "--pose-file", str(hololens_dir / "poses.txt"), "--index", "8",
               "--intrinsics", "247.785", "247.74", "134.75", "84.595", "--size", "270", "180", "--what", "depth",
               "--out", str(dpng))
    assert proc.returncode == 0, proc.stderr
    rendered = cv2.imread(str(dpng), cv2.IMREAD_UNCHANGED)
    assert rendered.dtype == np.uint16 and rendered.shape == (180, 270)
    sensor = open_sequence(hololens_dir).frame(8).depth[::2, ::2] * 1000.0
    both = (rendered > 0) & (sensor > 0)
    assert both.mean() > 0.3
    assert np.median(np.abs(rendered[both] - sensor[both])) < 30.0  # mm
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


def test_many_queries_one_process(small_map: Path, tmp_path: Path) -> None:
    """Positional queries and a queries file are answered in one process, one JSON line each, in the format of
    a single ``langgs query --json``; a rejected query gets an error line and exit code 2."""
    qfile = tmp_path / "queries.txt"
    qfile.write_text("# comment\nsofa\n\n  espresso machine  \nred backpack\n")
    proc = run("query", str(small_map), "red backpack", "couch", "--queries-file", str(qfile), "--json",
               "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert [d["query"] for d in lines] == ["red backpack", "couch", "sofa", "espresso machine", "red backpack"]
    single = json.loads(run("query", str(small_map), "red backpack", "--json", "--top-k", "2").stdout)
    assert lines[0] == single and lines[4] == single  # same answer as one query per process
    for d in lines:
        assert set(d) == {"query", "objects"}
    proc = run("query", str(small_map), "sofa", " ", "--json")
    assert proc.returncode == 2 and "empty" in proc.stderr
    bad = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert bad[0]["query"] == "sofa" and "error" not in bad[0] and "empty" in bad[1]["error"]
    assert run("query", str(small_map)).returncode == 2


def _independent_iou(top: dict, box: dict, n: int = 400_000) -> float:
    """IoU by Monte Carlo: uniform samples of each box, the fraction inside the other (independent of the
    polygon clipping in langgs_ros.evaluation)."""
    rng = np.random.default_rng(0)

    def inside(p: np.ndarray, b: dict) -> np.ndarray:
        local = (p - np.asarray(b["center"])) @ np.asarray(b["rotation"])
        return np.all(np.abs(local) <= np.asarray(b["size"]) / 2, axis=1)

    def sample(b: dict) -> np.ndarray:
        local = (rng.random((n, 3)) - 0.5) * np.asarray(b["size"])
        return local @ np.asarray(b["rotation"]).T + np.asarray(b["center"])

    va, vb = float(np.prod(top["size"])), float(np.prod(box["size"]))
    inter = 0.5 * (inside(sample(top), box).mean() * va + inside(sample(box), top).mean() * vb)
    return float(inter / (va + vb - inter))


def test_eval_agrees_with_an_independent_scorer(small_map: Path, hololens_dir: Path, tmp_path: Path) -> None:
    objects_json = hololens_dir / "annotations" / "objects.json"
    proc = run("eval", str(small_map), "--objects", str(objects_json))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    lines = [json.loads(ln) for ln in out[:-2]]
    assert out[-2].startswith("mean IoU ")
    ann = json.loads(objects_json.read_text())["objects"]
    phrases = {t.lower() for o in ann for t in [o["name"], *o["synonyms"]]}
    assert sorted(d["query"].lower() for d in lines) == sorted(phrases)  # every name and synonym once
    boxes = {o["id"]: o for o in ann}
    k = 0
    for d in lines:
        assert d["targets"] == [o["id"] for o in ann if d["query"].lower() in
                                {t.lower() for t in [o["name"], *o["synonyms"]]}]
        top = d["top"]
        if top is None:
            assert not d["found"] and d["iou"] == 0.0
            continue
        c = np.asarray(top["center"])
        hit = any(np.all(np.abs(np.asarray(boxes[t]["rotation"]).T @ (c - np.asarray(boxes[t]["center"])))
                         <= np.asarray(boxes[t]["size"]) / 2 + 0.10) for t in d["targets"])
        assert d["found"] == hit, d["query"]
        k += hit
        best = max(_independent_iou(top, boxes[t]) for t in d["targets"])
        assert abs(d["iou"] - best) < 0.02, (d["query"], d["iou"], best)
    assert out[-1] == f"accuracy {100.0 * k / len(lines):.1f}% ({k}/{len(lines)})"
    assert k >= 5  # the sofa / backpack phrases are visible in frames 4:16
    # Same answers as `langgs query` (top-1 of each phrase).
    q = run("query", str(small_map), *[d["query"] for d in lines[:6]], "--json", "--top-k", "1")
    for d, qd in zip(lines[:6], (json.loads(ln) for ln in q.stdout.splitlines())):
        assert (qd["objects"][0]["id"] if qd["objects"] else None) == (d["top"]["id"] if d["top"] else None)
    # A queries file with explicit targets; a wrong margin changes nothing but the box test.
    qf = tmp_path / "q.txt"
    qf.write_text("sofa\nbeige seat => 1\n# skipped\nsomething => sofa, 2\n")
    proc = run("eval", str(small_map), "--objects", str(objects_json), "--queries", str(qf), "--margin", "0.5")
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(ln) for ln in proc.stdout.splitlines()[:-2]]
    assert [(d["query"], d["targets"]) for d in got] == [("sofa", [1]), ("beige seat", [1]), ("something", [1, 2])]
    qf.write_text("flux capacitor\n")
    proc = run("eval", str(small_map), "--objects", str(objects_json), "--queries", str(qf))
    assert proc.returncode == 2 and "flux capacitor" in proc.stderr
