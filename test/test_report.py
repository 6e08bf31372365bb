"""langgs_ros.report on a small synthetic map whose picture is known: a red floor with a blue box on it."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import torch

from langgs_ros.report import top_down_image, write_map_report
from langgs_ros.types import Gaussians, InstanceTable, MapSnapshot


def floor_and_box() -> MapSnapshot:
    """1 m x 1 m red floor at z = 0 (2 cm spacing) and a blue 0.2 m box top at z = 0.5 m (instance 7, "blue box")."""
    g = np.linspace(0.0, 1.0, 51)
    fx, fy = np.meshgrid(g, g)
    floor = np.stack([fx.ravel(), fy.ravel(), np.zeros(fx.size)], 1)
    b = np.linspace(0.4, 0.6, 11)
    bx, by = np.meshgrid(b, b)
    box = np.stack([bx.ravel(), by.ravel(), np.full(bx.size, 0.5)], 1)
    means = np.concatenate([floor, box])
    n, nb = len(means), len(box)
    colors = np.concatenate([np.tile([1.0, 0.0, 0.0], (len(floor), 1)), np.tile([0.0, 0.0, 1.0], (nb, 1))])
    inst = np.concatenate([np.full(len(floor), -1), np.full(nb, 7)])
    gauss = Gaussians(
        means=torch.tensor(means, dtype=torch.float32), quats=torch.tensor([[1.0, 0, 0, 0]] * n),
        scales=torch.full((n, 3), 0.012), opacities=torch.full((n,), 0.95),
        colors=torch.tensor(colors, dtype=torch.float32), instance_ids=torch.tensor(inst, dtype=torch.int32))
    table = InstanceTable(
        ids=np.array([7], np.int32), embeddings=torch.nn.functional.normalize(torch.ones(1, 4), dim=1),
        names=["blue box"], centers=np.array([[0.5, 0.5, 0.5]]), sizes=np.array([[0.2, 0.2, 0.0]]),
        yaws=np.zeros(1), num_gaussians=np.array([nb]), observations=np.ones(1))
    return MapSnapshot(gaussians=gauss, instances=table, encoder_id="test", floor_height=0.0)


def pixel(img: np.ndarray, extent: tuple[float, ...], x: float, y: float) -> np.ndarray:
    H, W = img.shape[:2]
    col = int((x - extent[0]) / (extent[1] - extent[0]) * W)
    row = int((y - extent[2]) / (extent[3] - extent[2]) * H)
    return img[row, col]


def test_top_down_shows_the_highest_gaussian_below_the_cut() -> None:
    snap = floor_and_box()
    img, extent = top_down_image(snap, cell=0.02)
    assert np.allclose(pixel(img, extent, 0.5, 0.5), [0, 0, 1, 1])  # box top seen from above
    assert np.allclose(pixel(img, extent, 0.1, 0.1), [1, 0, 0, 1])  # floor
    assert np.allclose(pixel(img, extent, 0.1, 0.9), [1, 0, 0, 1])
    img, extent = top_down_image(snap, cell=0.02, height_cut=0.25)  # box left out: the floor under it shows
    assert np.allclose(pixel(img, extent, 0.5, 0.5), [1, 0, 0, 1])
    assert 0.0 <= extent[0] <= 0.03 and 0.97 <= extent[1] <= 1.05


def test_report_files(tmp_path: Path) -> None:
    snap = floor_and_box()
    down = np.diag([1.0, -1.0, -1.0, 1.0])  # camera optical axis along world -z (looking down), x along world x
    down[:3, 3] = [0.5, 0.5, 2.0]
    K = np.array([[60.0, 0, 32.0], [0, 60.0, 24.0], [0, 0, 1.0]])
    answers = [{"query": "blue box", "objects": [{"id": 7, "name": "blue box", "score": 0.9,
                                                  "center": [0.5, 0.5, 0.5]}], "inside_ground_truth_box": True}]
    paths = write_map_report(snap, tmp_path / "rep", camera_path=np.array([[0.0, 0.0, 1.5], [1.0, 1.0, 1.5]]),
                             answers=answers, last_camera=(down, K, 64, 48))
    assert set(paths) == {"top_down", "view"}
    plan = mpimg.imread(paths["top_down"])
    assert plan.shape[0] > 500 and plan.shape[1] > 500
    view = mpimg.imread(paths["view"])[..., :3]
    assert view.shape == (48, 64, 3)
    assert view[24, 32, 2] > 0.8 and view[24, 32, 0] < 0.2  # the box in the middle of the downward view
    assert view[24, 44, 0] > 0.8 and view[24, 44, 2] < 0.2  # floor around it (0.33 m to the side)
    assert view[2, 2].min() > 0.9  # white background beyond the floor
