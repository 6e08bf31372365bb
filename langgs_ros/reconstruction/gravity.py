"""Gravity and scale of an unposed reconstruction without odometry (ROS-free, numpy).

A feed-forward reconstruction comes in the first camera's frame at an arbitrary scale. Without odometry or tf,
:func:`estimate_gravity_and_scale` finds the Sim(3) ``M <- R`` that makes it a REP-103 ``map`` frame (z up, floor at
``z = 0``) at the scale of a declared prior:

1. **Camera up.** The mean of the cameras' up directions ``-y_cam`` (OpenCV optical axes: y points down in the
   image) is near-vertical for a robot camera (and for a person's head over a walk): the prior ``u0``.
2. **Floor plane.** RANSAC planes (3-point hypotheses, Fischler & Bolles 1981) over the reconstruction's points
   whose normal lies within ``max_tilt_deg`` of ``u0`` and that have every camera above them; after the best plane,
   its inliers are removed and the search repeated, giving the horizontal surfaces (floor, tables). The map's up is
   the least-squares normal of the largest one (refined by SVD on its inliers), so it is *checked* against the mean
   camera up (within ``max_tilt_deg``) rather than taken from it; the floor is the lowest plane holding at least
   ``floor_min_fraction`` of the largest one's inliers.
3. **Scale.** With a declared camera height ``h`` above the floor (``unposed.camera_height``) the scale is
   ``s = h / mean(height of the cameras above the floor plane)``; otherwise ``s = 1`` (units stay the
   reconstruction's; the map is then not metric and reported so).

Without a floor plane, up falls back to ``u0`` and the scale to 1 (reported in :class:`GravityEstimate`).

4. **Re-levelling as the map grows** (:func:`relevel_correction`). One window rarely sees enough floor: on the
   hololens sequence under the test error model the first window's floor plane (419 inliers) put the map's up
   5.6 degrees off the true up, while the same estimate over the keyframe memory of the first 2-12 windows was
   within 0.4-1.4 degrees. So the estimate is repeated on all stored keyframes every ``relevel_every`` windows
   (and at windows 2 and 4); when the map's up has moved by more than ``relevel_min_deg`` (or the camera-height
   scale, now from the mean height of all keyframes, by more than ``relevel_min_scale``) the map is rotated by
   the smallest rotation taking the new up to ``+z``, re-scaled and shifted to keep the floor at ``z = 0``,
   keeping its heading. The caller applies that Sim(3) correction to everything already in the map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from langgs_ros.reconstruction.alignment import Sim3

__all__ = ["GravityConfig", "GravityEstimate", "estimate_gravity_and_scale", "mean_camera_up",
           "relevel_correction", "relevel_due", "rotation_between"]


@dataclass
class GravityConfig:
    """Parameters of :func:`estimate_gravity_and_scale`.

    Attributes:
        enabled: estimate up/scale for unposed windows (False: the map stays in the first camera's frame).
        camera_height: declared height of the camera above the floor, metres (``unposed.camera_height``); ``None``
            = no scale prior (the map keeps the reconstruction's units).
        max_tilt_deg: largest angle between a floor-plane normal and the mean camera up, degrees.
        plane_threshold: RANSAC inlier distance of a point as a fraction of its distance to the nearest camera.
        ransac_iterations: plane hypotheses per search.
        max_planes: horizontal planes extracted (floor and furniture tops).
        min_plane_fraction: a plane needs at least this fraction of the points as inliers.
        floor_min_fraction: the floor is the lowest plane with at least this fraction of the largest plane's inliers.
        max_points: points used (uniform subsample).
        relevel_every: re-estimate the up vector on the keyframe memory every this many registered windows (and
            at windows 2 and 4); 0 = never (the first window's estimate stays).
        relevel_min_deg: smallest change of the map's up that re-levels the map, degrees (below it the map is left
            alone: each re-levelling rebuilds the map).
        relevel_max_deg: largest accepted change, degrees (a bigger jump is taken for a wrong plane and ignored).
        relevel_min_scale: smallest relative change of the camera-height scale that re-scales the map (with the
            prior; 0.005 = 0.5 %).
    """

    enabled: bool = True
    camera_height: float | None = None
    max_tilt_deg: float = 30.0
    plane_threshold: float = 0.01
    ransac_iterations: int = 300
    max_planes: int = 3
    min_plane_fraction: float = 0.03
    floor_min_fraction: float = 0.3
    max_points: int = 20000
    relevel_every: int = 4
    relevel_min_deg: float = 0.5
    relevel_max_deg: float = 15.0
    relevel_min_scale: float = 0.005

    def validate(self) -> None:
        """Raise ``ValueError`` on out-of-range settings."""
        if self.camera_height is not None and not (math.isfinite(self.camera_height) and self.camera_height > 0):
            raise ValueError(f"camera_height must be a positive number of metres or None, got {self.camera_height}")
        if not 0 < self.max_tilt_deg < 90 or self.plane_threshold <= 0 or self.ransac_iterations < 1:
            raise ValueError("max_tilt_deg must be in (0, 90), plane_threshold > 0, ransac_iterations >= 1")
        if (self.relevel_every < 0 or not 0 <= self.relevel_min_deg <= self.relevel_max_deg
                or self.relevel_min_scale < 0):
            raise ValueError("relevel_every must be >= 0, 0 <= relevel_min_deg <= relevel_max_deg and "
                             "relevel_min_scale >= 0")


@dataclass
class GravityEstimate:
    """Result of :func:`estimate_gravity_and_scale`.

    Attributes:
        map_from_reconstruction: Sim(3) ``M <- R`` (z up, floor at z = 0 when found; first camera at x = y = 0).
        up_reconstruction: (3,) unit up vector in ``R``.
        up_source: ``"floor_plane"`` or ``"camera_up"`` (no plane found).
        scale_source: ``"camera_height"`` (prior applied) or ``"none"``.
        tilt_deg: angle between the plane normal and the mean camera up (NaN without a plane), degrees.
        camera_height_rec: mean camera height above the floor in ``R`` units (NaN without a floor).
        floor_inliers: inliers of the floor plane (0 without one).
        planes: number of horizontal planes found.
    """

    map_from_reconstruction: Sim3
    up_reconstruction: np.ndarray
    up_source: str
    scale_source: str
    tilt_deg: float = math.nan
    camera_height_rec: float = math.nan
    floor_inliers: int = 0
    planes: int = 0
    info: dict[str, float] = field(default_factory=dict)


def mean_camera_up(world_from_camera: np.ndarray) -> np.ndarray:
    """(3,) unit mean of the cameras' up directions ``-R[:, 1]`` (OpenCV optical frame: y down).

    Args:
        world_from_camera: (N, 4, 4) camera-to-world poses.

    Raises:
        ValueError: wrong shape or the up directions cancel out.
    """
    T = np.asarray(world_from_camera, dtype=np.float64)
    if T.ndim != 3 or T.shape[1:] != (4, 4) or T.shape[0] == 0:
        raise ValueError(f"world_from_camera must be (N, 4, 4), got {T.shape}")
    m = -T[:, :3, 1].mean(axis=0)
    n = float(np.linalg.norm(m))
    if n < 1e-6:
        raise ValueError("camera up directions cancel out: no mean up")
    return m / n


def rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest (3, 3) rotation taking unit vector ``a`` onto unit vector ``b`` (Rodrigues' formula)."""
    a = np.asarray(a, np.float64) / np.linalg.norm(a)
    b = np.asarray(b, np.float64) / np.linalg.norm(b)
    v = np.cross(a, b)
    c = float(a @ b)
    if c < -1.0 + 1e-12:  # opposite: rotate pi about any axis orthogonal to a
        axis = np.cross(a, [1.0, 0.0, 0.0])
        if np.linalg.norm(axis) < 1e-6:
            axis = np.cross(a, [0.0, 1.0, 0.0])
        axis /= np.linalg.norm(axis)
        return 2.0 * np.outer(axis, axis) - np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


def _ransac_plane(P: np.ndarray, u0: np.ndarray, cams: np.ndarray, tau: np.ndarray, cos_tilt: float, iters: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, float, np.ndarray] | None:
    """Best plane ``n·x = d`` (n within the tilt cone of u0, cameras above it); returns (n, d, inlier mask).

    ``tau`` (N,) is each point's inlier distance (proportional to its distance from the cameras: depth noise of
    a reconstruction grows with depth); the refit is an SVD weighted by ``1 / tau²``.
    """
    n_pts = P.shape[0]
    if n_pts < 3:
        return None
    idx = rng.integers(0, n_pts, size=(iters, 3))
    a, b, c = P[idx[:, 0]], P[idx[:, 1]], P[idx[:, 2]]
    N = np.cross(b - a, c - a)
    norm = np.linalg.norm(N, axis=1)
    ok = norm > 1e-12
    N = N[ok] / norm[ok, None]
    a = a[ok]
    N *= np.sign(N @ u0)[:, None] + (N @ u0 == 0)[:, None]
    ok = N @ u0 >= cos_tilt
    N, a = N[ok], a[ok]
    if N.shape[0] == 0:
        return None
    d = np.einsum("ij,ij->i", N, a)
    above = ((cams @ N.T) - d[None]).min(axis=0) > float(np.median(tau))  # every camera above the plane
    N, d = N[above], d[above]
    if N.shape[0] == 0:
        return None
    counts = (np.abs(P @ N.T - d[None]) <= tau[:, None]).sum(axis=0)
    k = int(np.argmax(counts))
    n, dd = N[k], float(d[k])
    inl = np.abs(P @ n - dd) <= tau
    for _ in range(3):  # least-squares refit on the inliers (SVD normal), re-select
        Q = P[inl]
        if Q.shape[0] < 3:
            break
        wq = 1.0 / tau[inl] ** 2
        mu = (wq[:, None] * Q).sum(axis=0) / wq.sum()
        n_new = np.linalg.svd((Q - mu) * np.sqrt(wq)[:, None], full_matrices=False)[2][2]
        n_new = n_new if n_new @ u0 >= 0 else -n_new
        if n_new @ u0 < cos_tilt:
            break
        n, dd = n_new, float(n_new @ mu)
        inl = np.abs(P @ n - dd) <= tau
    return n, dd, inl


def estimate_gravity_and_scale(points: np.ndarray, world_from_camera: np.ndarray, config: GravityConfig,
                               rng: np.random.Generator | int | None = None) -> GravityEstimate:
    """Up vector, floor and scale of an unposed reconstruction (see the module docstring).

    Args:
        points: (N, 3) reconstructed 3-D points (frame ``R``, any units), e.g. the window's sampled depth grid.
        world_from_camera: (S, 4, 4) camera-to-``R`` poses of the cameras that saw them.
        config: :class:`GravityConfig`.
        rng: random generator or seed (RANSAC, subsampling).

    Returns:
        :class:`GravityEstimate`: ``M <- R`` maps the mean camera up (or the floor normal) to ``+z``, puts the
        floor at ``z = 0`` (when found) and the first camera at ``x = y = 0``, scaled by the camera-height prior.

    Raises:
        ValueError: wrong shapes, or camera up directions that cancel out.
    """
    from langgs_ros.reconstruction.alignment import Sim3  # local: the aligner imports this module

    config.validate()
    P = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    T = np.asarray(world_from_camera, dtype=np.float64)
    P = P[np.all(np.isfinite(P), axis=1)]
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if P.shape[0] > config.max_points:
        P = P[gen.choice(P.shape[0], size=config.max_points, replace=False)]
    u0 = mean_camera_up(T)
    cams = T[:, :3, 3]
    dist = np.linalg.norm(P[:, None] - cams[None], axis=2).min(axis=1) if P.shape[0] else np.zeros(0)
    scale_ref = float(np.median(dist)) if P.shape[0] else 0.0
    cos_tilt = math.cos(math.radians(config.max_tilt_deg))
    planes: list[tuple[np.ndarray, float, int]] = []
    if scale_ref > 0:
        tau = config.plane_threshold * np.maximum(dist, 0.1 * scale_ref)
        rest, tau_rest = P, tau
        for _ in range(config.max_planes):
            found = _ransac_plane(rest, u0, cams, tau_rest, cos_tilt, config.ransac_iterations, gen)
            if found is None:
                break
            n, d, inl = found
            if inl.sum() < max(30, config.min_plane_fraction * P.shape[0]):
                break
            planes.append((n, d, int(inl.sum())))
            rest, tau_rest = rest[~inl], tau_rest[~inl]
    if planes:
        n_up = planes[0][0]  # the largest horizontal surface gives gravity
        up = n_up
        tilt = math.degrees(math.acos(float(np.clip(n_up @ u0, -1.0, 1.0))))
        big = planes[0][2]
        floor_n, floor_d, floor_cnt = max((p for p in planes if p[2] >= config.floor_min_fraction * big),
                                          key=lambda p: float(cams.mean(axis=0) @ up) - p[1] / float(p[0] @ up))
        # heights of cameras above the floor, measured along the gravity normal through the floor plane
        floor_pt = floor_n * floor_d
        h_rec = float(np.mean((cams - floor_pt) @ up))
        up_source = "floor_plane"
    else:
        up, tilt, h_rec, floor_cnt, floor_pt, up_source = u0, math.nan, math.nan, 0, None, "camera_up"
    R = rotation_between(up, np.array([0.0, 0.0, 1.0]))
    if config.camera_height is not None and math.isfinite(h_rec) and h_rec > 0:
        s, scale_source = float(config.camera_height) / h_rec, "camera_height"
    else:
        s, scale_source = 1.0, "none"
    c0 = cams[0]
    t = -s * (R @ c0)
    t[2] = -s * float(R[2] @ floor_pt) if floor_pt is not None else 0.0
    return GravityEstimate(Sim3(s, R, t), up, up_source, scale_source, tilt, h_rec, floor_cnt, len(planes),
                           {"up_tilt_deg": tilt, "floor_inliers": float(floor_cnt), "planes": float(len(planes)),
                            "camera_height_rec": h_rec})


def relevel_due(num_windows: int, config: GravityConfig) -> bool:
    """Whether the up vector is re-estimated after the ``num_windows``-th registered window (windows 2, 4, then
    every ``config.relevel_every``; never when ``relevel_every`` is 0)."""
    k = int(config.relevel_every)
    return k > 0 and num_windows >= 2 and (num_windows in (2, 4) or num_windows % k == 0)


def relevel_correction(current: GravityEstimate, points: np.ndarray, world_from_camera: np.ndarray,
                       config: GravityConfig, rng: np.random.Generator | int | None = None
                       ) -> tuple[GravityEstimate, Sim3] | None:
    """Re-estimate the floor, up and camera-height scale of a growing unposed map and the correction that levels it.

    Args:
        current: the estimate the map is expressed with (``M <- R``).
        points: (N, 3) points of the map's keyframes in the reconstruction frame ``R``.
        world_from_camera: (S, 4, 4) camera-to-``R`` poses of those keyframes.
        config: :class:`GravityConfig` (the ``relevel_*`` thresholds, ``camera_height``).
        rng: random generator or seed.

    Returns:
        ``None`` when no floor plane is found, or when the map's up moved by more than ``relevel_max_deg``, or by
        less than ``relevel_min_deg`` with the scale changing by less than ``relevel_min_scale``; else
        ``(new, C)``: ``C`` is the Sim(3) ``M' <- M`` — the smallest rotation taking the new up to ``+z``, the
        scale ratio of the new camera-height estimate (1 without the prior), then a shift along z putting the new
        floor at ``z = 0`` (x, y of the origin kept) — and ``new`` the estimate with ``map_from_reconstruction =
        C ∘ current.map_from_reconstruction``.
    """
    from langgs_ros.reconstruction.alignment import Sim3  # local: the aligner imports this module

    est = estimate_gravity_and_scale(points, world_from_camera, config, rng)
    if est.up_source != "floor_plane":
        return None
    S = current.map_from_reconstruction
    up_map = S.R @ est.up_reconstruction
    angle = math.degrees(math.acos(float(np.clip(up_map[2] / np.linalg.norm(up_map), -1.0, 1.0))))
    s_c = 1.0
    if current.scale_source == "camera_height" and est.scale_source == "camera_height":
        s_c = est.map_from_reconstruction.s / S.s
    if angle > config.relevel_max_deg or not 0.5 < s_c < 2.0:
        return None
    if angle < config.relevel_min_deg and abs(s_c - 1.0) < config.relevel_min_scale:
        return None
    R_c = rotation_between(up_map, np.array([0.0, 0.0, 1.0]))
    floor_rec = est.map_from_reconstruction.inverse().apply(np.zeros((1, 3)))[0]  # a point of the new floor, R
    z_floor = float((s_c * R_c @ S.apply(floor_rec[None])[0])[2])
    C = Sim3(s_c, R_c, np.array([0.0, 0.0, -z_floor]))
    info = dict(est.info)
    info.update(relevel_deg=angle, relevel_scale=s_c)
    new = GravityEstimate(C.compose(S), est.up_reconstruction, "floor_plane", current.scale_source, est.tilt_deg,
                          est.camera_height_rec, est.floor_inliers, est.planes, info)
    return new, C
