"""Background "stuff" (walls, floors, ceilings) among segmentation masks.

Open-vocabulary 3D mapping systems treat large planar background regions separately from objects
(ConceptGraphs, Gu et al., ICRA 2024, §III-B, drops background detections of walls/floors/ceilings before object
fusion; OpenMask3D and LangSplat only score object masks). A CLIP crop of a wall is a poor, view-dependent
"object" embedding that attracts generic queries. :func:`classify_stuff` finds such masks from depth: a mask is
*stuff* when it covers at least ``min_area`` of the image, at least ``min_valid_fraction`` of its pixels have depth,
and its back-projected pixels lie on one plane
(least-squares plane refit on its inliers; ``inlier_fraction`` of the points within ``inlier_distance``); the
plane's normal against the up direction names it:

- ``|n · up| >= normal_cos`` (horizontal): ``floor`` when the plane lies at least ``floor_below`` metres below the
  camera, ``ceiling`` when at least ``ceiling_above`` above it; otherwise not stuff (a table top is an object);
- ``|n · up| <= sqrt(1 - normal_cos²)`` (vertical): ``wall``;
- tilted planes are not stuff.

Up comes from the frame's pose and a world up when both are known, else the camera's −y axis (cameras are held
roughly upright).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STUFF_NAMES = ("wall", "floor", "ceiling")


@dataclass
class StuffConfig:
    """Thresholds of :func:`classify_stuff` (see the module docstring).

    Attributes:
        min_area: minimum mask area as a fraction of the image.
        min_valid_fraction: minimum fraction of the mask's pixels with valid depth.
        inlier_distance: metres from the plane for a point to count as an inlier.
        inlier_fraction: minimum fraction of inliers for a planar mask.
        normal_cos: |cos| between normal and up for "horizontal" (and sqrt(1 - normal_cos²) for "vertical").
        floor_below / ceiling_above: metres below / above the camera for a horizontal plane to be floor / ceiling.
        max_points: points used for the fit (deterministic subsample).
    """

    min_area: float = 0.08
    min_valid_fraction: float = 0.5
    inlier_distance: float = 0.03
    inlier_fraction: float = 0.85
    normal_cos: float = 0.9
    floor_below: float = 0.9
    ceiling_above: float = 0.5
    max_points: int = 4000


def camera_up(world_from_camera: np.ndarray | None, world_up: np.ndarray | None) -> np.ndarray:
    """Up in the camera's optical frame: ``R_wc^T · world_up`` when both are known, else ``(0, -1, 0)``."""
    if world_from_camera is not None and world_up is not None:
        u = np.asarray(world_from_camera, np.float64)[:3, :3].T @ np.asarray(world_up, np.float64)
        n = np.linalg.norm(u)
        if n > 1e-9:
            return u / n
    return np.array([0.0, -1.0, 0.0])


def _fit_plane(p: np.ndarray) -> tuple[np.ndarray, float]:
    c = p.mean(axis=0)
    _, _, vt = np.linalg.svd(p - c, full_matrices=False)
    n = vt[2]
    return n, float(n @ c)


def classify_stuff(masks: np.ndarray, depth: np.ndarray | None, intrinsics: np.ndarray | None,
                   up_camera: np.ndarray, config: StuffConfig | None = None) -> list[str | None]:
    """Name each mask ``"wall"``, ``"floor"``, ``"ceiling"`` or ``None`` (an object).

    Args:
        masks: (K, H, W) bool.
        depth: (H, W) float z-depth in metres (0 / NaN invalid) or None (then every mask is ``None``).
        intrinsics: (3, 3) pinhole K in pixels or None.
        up_camera: (3,) unit up in the camera optical frame (:func:`camera_up`).
        config: thresholds.

    Returns:
        K entries.
    """
    cfg = config or StuffConfig()
    K = int(masks.shape[0])
    out: list[str | None] = [None] * K
    if depth is None or intrinsics is None or K == 0:
        return out
    H, W = depth.shape
    Kmat = np.asarray(intrinsics, np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    u = np.asarray(up_camera, np.float64)
    vert_cos = float(np.sqrt(max(0.0, 1.0 - cfg.normal_cos ** 2)))
    for k in range(K):
        m = masks[k]
        if m.sum() < cfg.min_area * H * W:
            continue
        ys, xs = np.nonzero(m & valid)
        if len(ys) < max(50, cfg.min_valid_fraction * m.sum()):
            continue
        if len(ys) > cfg.max_points:
            pick = np.linspace(0, len(ys) - 1, cfg.max_points).astype(np.int64)
            ys, xs = ys[pick], xs[pick]
        z = depth[ys, xs].astype(np.float64)
        p = np.stack([(xs - Kmat[0, 2]) * z / Kmat[0, 0], (ys - Kmat[1, 2]) * z / Kmat[1, 1], z], axis=1)
        n, d = _fit_plane(p)
        inl = np.abs(p @ n - d) <= cfg.inlier_distance
        if inl.sum() >= 10:
            n, d = _fit_plane(p[inl])
            inl = np.abs(p @ n - d) <= cfg.inlier_distance
        if inl.mean() < cfg.inlier_fraction:
            continue
        c = abs(float(n @ u))
        if c >= cfg.normal_cos:
            height = float(p[inl].mean(axis=0) @ u)  # plane height relative to the camera centre, along up
            if height <= -cfg.floor_below:
                out[k] = "floor"
            elif height >= cfg.ceiling_above:
                out[k] = "ceiling"
        elif c <= vert_cos:
            out[k] = "wall"
    return out
