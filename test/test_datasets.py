"""RGB-D folder readers on the real hololens sequence and a synthetic TUM-layout folder."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from langgs_ros.datasets import DatasetError, open_sequence
from langgs_ros.reconstruction import make_reconstructor


def test_hololens_layout(hololens_dir: Path) -> None:
    seq = open_sequence(hololens_dir, max_depth=7.5)
    assert seq.layout == "hololens" and len(seq) == 94
    assert seq.intrinsics[0, 0] == pytest.approx(495.5677, abs=1e-3)
    assert seq.poses.shape == (94, 4, 4)
    assert len(seq.objects) == 15 and seq.label_names[2] == "red backpack"
    assert np.allclose(seq.up, [0, 1, 0], atol=0.01)
    f = seq.frame(5)
    assert f.rgb.shape == (360, 540, 3) and f.rgb.dtype == np.uint8
    assert f.depth.dtype == np.float32 and f.depth.max() <= 7.5 and (f.depth > 0).mean() > 0.3
    assert f.labels.shape == (360, 540) and set(np.unique(f.labels)) <= {0, *seq.label_names}
    assert np.allclose(f.world_from_camera, seq.poses[5])
    assert any("hololens layout" in line for line in seq.report)
    # the objects' boxes: centre inside, far point outside
    sofa = seq.objects[0]
    assert sofa.contains(sofa.center) and not sofa.contains(sofa.center + 5.0)


def test_rgbd_backend_on_real_frames(hololens_dir: Path) -> None:
    seq = open_sequence(hololens_dir)
    frames = list(seq.frames(range(3)))
    rec = make_reconstructor("rgbd", max_depth=6.0).reconstruct(frames)
    assert rec.depth.shape == (3, 360, 540) and rec.world_from_camera.shape == (3, 4, 4)
    assert float(rec.depth.max()) <= 6.0
    valid = rec.depth > 0
    assert bool(((rec.confidence > 0) == valid).all())
    assert float(rec.confidence.max()) <= 1.0
    frames[1].depth = None
    with pytest.raises(ValueError, match="needs depth"):
        make_reconstructor("rgbd").reconstruct(frames)
    with pytest.raises(ValueError, match="empty window"):
        make_reconstructor("rgbd").reconstruct([])
    with pytest.raises(ValueError, match="unknown reconstruction backend"):
        make_reconstructor("nerf")


def _write_tum(root: Path, n: int = 4) -> None:
    (root / "rgb").mkdir(parents=True)
    (root / "depth").mkdir()
    rgb_lines, depth_lines, gt_lines = [], [], []
    for i in range(n):
        t = 1000.0 + i / 30.0
        cv2.imwrite(str(root / "rgb" / f"{t:.6f}.png"), np.full((48, 64, 3), 40 * i, np.uint8))
        cv2.imwrite(str(root / "depth" / f"{t + 0.005:.6f}.png"), np.full((48, 64), 5000 * (i + 1), np.uint16))
        rgb_lines.append(f"{t:.6f} rgb/{t:.6f}.png")
        depth_lines.append(f"{t + 0.005:.6f} depth/{t + 0.005:.6f}.png")
        gt_lines.append(f"{t + 0.001:.6f} {i * 0.1} 0 0 0 0 0.7071068 0.7071068")
    (root / "rgb.txt").write_text("# color images\n" + "\n".join(rgb_lines) + "\n")
    (root / "depth.txt").write_text("\n".join(depth_lines) + "\n")
    (root / "groundtruth.txt").write_text("# timestamp tx ty tz qx qy qz qw\n" + "\n".join(gt_lines) + "\n")


def test_tum_layout(tmp_path: Path) -> None:
    root = tmp_path / "rgbd_dataset_freiburg2_xyz"
    _write_tum(root)
    seq = open_sequence(root)
    assert seq.layout == "tum" and len(seq) == 4
    assert seq.intrinsics[0, 0] == pytest.approx(520.9)  # freiburg2 from the folder name
    f = seq.frame(2)
    assert f.depth[0, 0] == pytest.approx(3.0)  # 15000 / 5000 units per metre
    assert f.world_from_camera[0, 3] == pytest.approx(0.2)
    assert np.allclose(f.world_from_camera[:3, :3], [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-6)
    assert any("published TUM freiburg2" in line for line in seq.report)


def test_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a folder"):
        open_sequence(tmp_path / "missing")
    with pytest.raises(DatasetError, match="not a known layout"):
        open_sequence(tmp_path)
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "poses.txt").write_text("1 2 3\n")
    with pytest.raises(DatasetError, match="16 numbers"):
        open_sequence(tmp_path)
    with pytest.raises(DatasetError, match="max_depth"):
        open_sequence(tmp_path, max_depth=-1)
