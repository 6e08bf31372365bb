"""Similarity (Sim(3)) alignment of reconstructed windows into the map frame (ROS-free, numpy).

A feed-forward reconstructor (VGGT, arXiv 2503.11651) returns each window in its own frame — the first camera of
the window — and at an arbitrary global scale. This module places consecutive windows into one map:

1. **Umeyama** (:func:`umeyama`): the least-squares similarity between two weighted point sets in closed form.
2. **RANSAC** (:func:`ransac_umeyama`): the same, robust to outliers (MSAC scoring, adaptive iteration count,
   refit on the inliers).
3. **Window chaining** (:class:`WindowAligner`): consecutive windows share frames (the window overlap of
   :class:`~langgs_ros.frames.FrameBuffer`). For each shared frame the correspondences are its camera centre and a
   confidence-weighted subsample of its per-pixel 3-D points (the same pixels, from this window's depth and from
   the copy stored when the frame was first placed in the map). The first window defines the reconstruction
   frame ``R``.
4. **Metric scale and gravity from odometry**: when frames carry odometry/TF poses (``Frame.world_from_camera``),
   the camera centres in ``R`` and in the odometry frame ``O`` are accumulated over windows and a Sim(3)
   ``O <- R`` is re-estimated after every window (RANSAC). Output poses are then in ``O``: metric, with the
   odometry frame's gravity (its ``z``/up axis).
5. **Gravity and scale without odometry** (:mod:`~langgs_ros.reconstruction.gravity`): when the first window
   carries no odometry, a Sim(3) ``M <- R`` is estimated from it (RANSAC floor plane checked against the mean
   camera up; scale from the declared camera height above the floor) and applied to every window: the map is
   z-up with the floor at z = 0, in metres of the prior (``scale_source = "camera_height"``) or in reconstruction
   units (``"none"``). As windows arrive it is re-estimated on the whole keyframe memory
   (:func:`~langgs_ros.reconstruction.gravity.relevel_correction`); a change is returned as
   :attr:`WindowAlignment.map_correction`, which the caller applies to the map already fused.

Frames placed in the map are kept in a :class:`~langgs_ros.reconstruction.keyframe_memory.KeyframeMemory` (images,
geometry, descriptors); the reconstructor feeds some of them back to the network as *anchors* with each window, so
windows are registered against the map, not only against the previous window.

Conventions: poses are 4x4 ``world_from_camera`` (camera-to-world, OpenCV optical axes) float64 arrays; a
:class:`Sim3` ``S = (s, R, t)`` maps a point ``x`` to ``s R x + t``; ``A.compose(B)`` is ``A ∘ B`` (apply ``B``
first). Units: metres in the odometry frame, "window units" (arbitrary) in reconstruction frames.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from langgs_ros.reconstruction.gravity import (
    GravityConfig,
    GravityEstimate,
    estimate_gravity_and_scale,
    relevel_correction,
    relevel_due,
)
from langgs_ros.reconstruction.keyframe_memory import KeyframeMemory
from langgs_ros.types import Frame

log = logging.getLogger(__name__)

__all__ = [
    "AlignerConfig",
    "AlignmentError",
    "FrameGeometry",
    "Sim3",
    "WindowAligner",
    "WindowAlignment",
    "fit_shared_frames",
    "fit_trajectory_sim3",
    "frame_correspondences",
    "frame_key",
    "ransac_umeyama",
    "sample_frame_geometry",
    "umeyama",
]


class AlignmentError(ValueError):
    """Two point sets (or a window and the map) cannot be aligned: too few or degenerate correspondences, too few
    RANSAC inliers, or no frame shared with the map and no odometry. The message says which."""


def _as_rotation(R: np.ndarray) -> np.ndarray:
    """Closest proper rotation (Frobenius norm) to a (3, 3) matrix, via SVD: ``U diag(1, 1, det(UV^T)) V^T``."""
    U, _, Vt = np.linalg.svd(np.asarray(R, dtype=np.float64))
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U @ Vt)) or 1.0
    return U @ D @ Vt


@dataclass(frozen=True)
class Sim3:
    """A 3-D similarity transform ``x -> s R x + t``.

    Attributes:
        s: scale factor (> 0, unitless: target units per source unit).
        R: (3, 3) float64 proper rotation (``R^T R = I``, ``det R = +1``).
        t: (3,) float64 translation in target units.

    Raises:
        ValueError: (on construction) non-finite or non-positive scale, wrong shapes, or ``R`` not a proper
            rotation within 1e-6.
    """

    s: float = 1.0
    R: np.ndarray = field(default_factory=lambda: np.eye(3))
    t: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def __post_init__(self) -> None:
        s = float(self.s)
        R = np.asarray(self.R, dtype=np.float64)
        t = np.asarray(self.t, dtype=np.float64).reshape(-1)
        if not math.isfinite(s) or s <= 0:
            raise ValueError(f"Sim3 scale must be a positive finite number, got {self.s}")
        if R.shape != (3, 3) or not np.all(np.isfinite(R)):
            raise ValueError(f"Sim3 rotation must be a finite (3, 3) matrix, got shape {R.shape}")
        if np.abs(R.T @ R - np.eye(3)).max() > 1e-6 or np.linalg.det(R) < 0:
            raise ValueError("Sim3 rotation is not a proper rotation (R^T R != I or det R < 0)")
        if t.shape != (3,) or not np.all(np.isfinite(t)):
            raise ValueError(f"Sim3 translation must be a finite (3,) vector, got shape {t.shape}")
        object.__setattr__(self, "s", s)
        object.__setattr__(self, "R", R)
        object.__setattr__(self, "t", t)

    @staticmethod
    def identity() -> Sim3:
        """The identity transform."""
        return Sim3()

    @staticmethod
    def from_matrix(M: np.ndarray) -> Sim3:
        """From a 4x4 matrix ``[[sR, t], [0, 1]]`` (``s = det(sR)^(1/3)``, ``R`` re-orthonormalised by SVD).

        Raises:
            ValueError: not a finite 4x4 matrix, or its 3x3 block has a non-positive determinant.
        """
        M = np.asarray(M, dtype=np.float64)
        if M.shape != (4, 4) or not np.all(np.isfinite(M)):
            raise ValueError(f"expected a finite (4, 4) matrix, got shape {M.shape}")
        det = float(np.linalg.det(M[:3, :3]))
        if det <= 0:
            raise ValueError(f"the 3x3 block of a similarity must have a positive determinant, got {det}")
        s = det ** (1.0 / 3.0)
        return Sim3(s, _as_rotation(M[:3, :3] / s), M[:3, 3])

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Transform points: ``s R p + t``.

        Args:
            points: (..., 3) coordinates in source units.

        Returns:
            (..., 3) float64 in target units.
        """
        p = np.asarray(points, dtype=np.float64)
        return self.s * p @ self.R.T + self.t

    def compose(self, other: Sim3) -> Sim3:
        """``self ∘ other`` (apply ``other`` first): ``(s1 s2, R1 R2, s1 R1 t2 + t1)``."""
        return Sim3(self.s * other.s, _as_rotation(self.R @ other.R), self.s * self.R @ other.t + self.t)

    def inverse(self) -> Sim3:
        """The inverse ``x -> (1/s) R^T (x - t)``."""
        return Sim3(1.0 / self.s, self.R.T.copy(), -(self.R.T @ self.t) / self.s)

    def matrix(self) -> np.ndarray:
        """(4, 4) float64 homogeneous matrix ``[[s R, t], [0, 1]]``."""
        M = np.eye(4)
        M[:3, :3] = self.s * self.R
        M[:3, 3] = self.t
        return M

    def transform_pose(self, world_from_camera: np.ndarray) -> np.ndarray:
        """Map camera poses into the target frame: rotation ``R R_c`` (stays proper), centre ``s R c + t``.

        The camera's own axes are not scaled (a pose is rigid); only its position is, so the result is again a
        rigid ``world_from_camera``. Depth maps seen by the camera must be multiplied by ``s`` separately.

        Args:
            world_from_camera: (4, 4) or (N, 4, 4) camera-to-source poses.

        Returns:
            Same shape, float64 camera-to-target poses.

        Raises:
            ValueError: wrong shape.
        """
        T = np.asarray(world_from_camera, dtype=np.float64)
        if T.shape[-2:] != (4, 4):
            raise ValueError(f"poses must be (4, 4) or (N, 4, 4), got {T.shape}")
        out = np.array(T, copy=True)
        out[..., :3, :3] = self.R @ T[..., :3, :3]
        out[..., :3, 3] = self.apply(T[..., :3, 3])
        out[..., 3, :] = (0.0, 0.0, 0.0, 1.0)
        return out


# ---------------------------------------------------------------------------------------------- Umeyama
def _umeyama_batch(src: np.ndarray, dst: np.ndarray, w: np.ndarray, with_scale: bool, symmetric: bool = False,
                   rel_eps: float = 1e-9) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Batched weighted Umeyama. src, dst (B, n, 3); w (B, n) >= 0 with positive sums; ``symmetric``: Horn's scale.

    Returns (s (B,), R (B, 3, 3), t (B, 3), ok (B,) bool); ``ok`` is False for degenerate sets (cross-covariance
    of rank < 2, i.e. collinear or coincident points, or zero source spread).
    """
    wn = w / w.sum(axis=1, keepdims=True)
    mu_x = np.einsum("bn,bnk->bk", wn, src)
    mu_y = np.einsum("bn,bnk->bk", wn, dst)
    xc = src - mu_x[:, None]
    yc = dst - mu_y[:, None]
    var_x = np.einsum("bn,bnk,bnk->b", wn, xc, xc)
    cov = np.einsum("bn,bni,bnj->bij", wn, yc, xc)  # Σ_xy = Σ w (y - μy)(x - μx)^T, Umeyama eq. (38)
    U, D, Vt = np.linalg.svd(cov)
    S = np.ones((src.shape[0], 3))
    S[:, 2] = np.where(np.linalg.det(U) * np.linalg.det(Vt) < 0, -1.0, 1.0)  # eq. (39)/(43)
    R = np.einsum("bij,bj,bjk->bik", U, S, Vt)  # eq. (40): R = U S V^T
    scale_ref = np.maximum(D[:, 0], 1e-300)
    ok = (D[:, 1] > rel_eps * scale_ref) & (var_x > 0) & np.all(np.isfinite(cov), axis=(1, 2))
    if with_scale and symmetric:
        var_y = np.einsum("bn,bnk,bnk->b", wn, yc, yc)
        s = np.sqrt(var_y / np.where(var_x > 0, var_x, 1.0))  # Horn 1987, Sec. 2.D: s = sqrt(σy² / σx²)
        ok &= s > 0
        s = np.where(ok, s, 1.0)
    elif with_scale:
        s = np.einsum("bj,bj->b", D, S) / np.where(var_x > 0, var_x, 1.0)  # eq. (42): c = tr(DS) / σx²
        ok &= s > 0
        s = np.where(ok, s, 1.0)
    else:
        s = np.ones(src.shape[0])
    t = mu_y - s[:, None] * np.einsum("bij,bj->bi", R, mu_x)  # eq. (41): t = μy - c R μx
    return s, R, t, ok


def umeyama(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None,
            with_scale: bool = True, symmetric_scale: bool = False) -> Sim3:
    """Weighted least-squares similarity ``dst ≈ s R src + t`` in closed form.

    Minimises ``Σ_i w_i ||dst_i - (s R src_i + t)||²`` (Umeyama, "Least-squares estimation of transformation
    parameters between two point patterns", IEEE TPAMI 13(4), 1991, eqs. 34-43, with weights): with weighted
    means ``μx, μy``, source variance ``σx² = Σ w |x - μx|² / Σ w`` and cross-covariance
    ``Σxy = Σ w (y - μy)(x - μx)^T / Σ w = U D V^T``: ``R = U S V^T`` with ``S = diag(1, 1, sign(det U det V))``,
    ``s = tr(D S) / σx²`` and ``t = μy - s R μx``.

    Args:
        src: (N, 3) source points (any units).
        dst: (N, 3) target points (target units).
        weights: (N,) non-negative weights (``None``: all 1).
        with_scale: estimate ``s`` (False: rigid, ``s = 1``).
        symmetric_scale: use Horn's symmetric scale ``s = sqrt(σy² / σx²)`` (Horn, "Closed-form solution of
            absolute orientation using unit quaternions", JOSA A 4(4), 1987, Sec. 2.D) instead of Umeyama's
            ``tr(DS) / σx²``. Umeyama's estimate treats ``src`` as exact: with noise ``σn²`` on ``src`` it is biased
            low by ``σx² / (σx² + σn²)``; the symmetric one is unbiased when both sets carry the same relative noise
            (e.g. two depth predictions of the same pixels), which matters when many fits are chained.

    Returns:
        The :class:`Sim3` mapping ``src`` onto ``dst``.

    Raises:
        ValueError: shape mismatch, N < 3, non-finite values, or negative / all-zero weights.
        AlignmentError: degenerate configuration (points collinear or coincident: rank(Σxy) < 2).
    """
    x, y, w = _check_sets(src, dst, weights)
    s, R, t, ok = _umeyama_batch(x[None], y[None], w[None], with_scale, symmetric_scale)
    if not ok[0]:
        raise AlignmentError("degenerate point configuration for Umeyama (points collinear or coincident)")
    return Sim3(float(s[0]), _as_rotation(R[0]), t[0])


def _check_sets(src: np.ndarray, dst: np.ndarray,
                weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(src, dtype=np.float64)
    y = np.asarray(dst, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 3 or x.shape != y.shape:
        raise ValueError(f"src and dst must both be (N, 3), got {x.shape} and {y.shape}")
    if x.shape[0] < 3:
        raise ValueError(f"need at least 3 correspondences, got {x.shape[0]}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("src and dst must be finite")
    if weights is None:
        w = np.ones(x.shape[0])
    else:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape[0] != x.shape[0]:
            raise ValueError(f"weights must be (N,) = ({x.shape[0]},), got {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero")
    return x, y, w


def ransac_umeyama(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None, threshold_m: float = 0.05,
                   iterations: int = 300, min_inliers: int = 3, rng: np.random.Generator | int | None = None,
                   with_scale: bool = True, confidence: float = 0.999,
                   symmetric_scale: bool = False) -> tuple[Sim3, np.ndarray, np.ndarray]:
    """Robust Sim(3) between correspondences with outliers: RANSAC over minimal 3-point Umeyama fits.

    Hypotheses come from 3 correspondences drawn with probability proportional to their weights; each is
    scored by the weighted truncated squared residual (MSAC, Torr & Zisserman, CVIU 78(1), 2000:
    ``Σ w_i min(r_i², τ²)``). The iteration count adapts to the best inlier fraction ``ε``
    (``k = log(1 - p) / log(1 - ε³)``, Fischler & Bolles 1981), capped at ``iterations``. The best hypothesis is
    refined by weighted :func:`umeyama` on its inliers, re-selecting inliers until the set is stable (at most 5
    rounds).

    Args:
        src: (N, 3) source points.
        dst: (N, 3) target points.
        weights: (N,) non-negative weights (``None``: all 1); used for sampling, scoring and the refit.
        threshold_m: inlier threshold ``τ`` on ``||dst - S(src)||`` in target units (metres for a metric
            target).
        iterations: maximum number of hypotheses.
        min_inliers: fewest inliers (>= 3) accepted.
        rng: random generator or seed (``None``: a fresh unseeded generator).
        with_scale: estimate the scale (False: rigid).
        confidence: RANSAC success probability ``p`` for the adaptive stop.
        symmetric_scale: the refit on the inliers uses the symmetric scale (see :func:`umeyama`).

    Returns:
        ``(sim3, inlier_mask (N,) bool, residuals (N,) float64)`` — residuals of every correspondence under the
        final transform, target units.

    Raises:
        ValueError: bad inputs (see :func:`umeyama`), ``threshold_m <= 0`` or ``iterations < 1``.
        AlignmentError: no non-degenerate hypothesis, or fewer than ``min_inliers`` inliers.
    """
    x, y, w = _check_sets(src, dst, weights)
    if not (threshold_m > 0 and math.isfinite(threshold_m)):
        raise ValueError(f"threshold_m must be a positive number, got {threshold_m}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    min_inliers = max(3, int(min_inliers))
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    n = x.shape[0]
    tau2 = float(threshold_m) ** 2
    p = w / w.sum()
    n_pos = int(np.count_nonzero(p))
    best_cost, best = math.inf, None
    done, needed, batch = 0, int(iterations), 64
    if n_pos < 3:
        raise AlignmentError(f"only {n_pos} correspondences have a positive weight; need at least 3")
    while done < min(needed, iterations):
        b = min(batch, iterations - done)
        if n == 3:
            idx, b = np.arange(3)[None], 1
        else:
            # Three distinct indices per hypothesis (weighted, without replacement within a sample).
            idx = np.stack([gen.choice(n, size=3, replace=False, p=p) for _ in range(b)])
        s, R, t, ok = _umeyama_batch(x[idx], y[idx], w[idx] + 1e-12, with_scale)
        done += b
        if not ok.any():
            if n == 3:
                break
            continue
        s, R, t = s[ok], R[ok], t[ok]
        pred = s[:, None, None] * np.einsum("bij,nj->bni", R, x) + t[:, None]
        r2 = ((pred - y[None]) ** 2).sum(-1)
        cost = (np.minimum(r2, tau2) * w[None]).sum(1)
        k = int(np.argmin(cost))
        if cost[k] < best_cost:
            best_cost, best = float(cost[k]), (float(s[k]), R[k], t[k])
            eps = float((r2[k] <= tau2).mean())
            if eps >= 1.0:
                needed = done
            else:
                den = math.log(max(1e-12, 1.0 - eps ** 3))
                needed = iterations if den >= 0 else math.ceil(math.log(1.0 - confidence) / den)
        if n == 3:
            break
    if best is None:
        raise AlignmentError("RANSAC found no non-degenerate 3-point sample (points collinear or coincident?)")
    sim = Sim3(best[0], _as_rotation(best[1]), best[2])
    inl = np.linalg.norm(sim.apply(x) - y, axis=1) ** 2 <= tau2
    for _ in range(5):
        if int(inl.sum()) < 3 or w[inl].sum() <= 0:
            break
        try:
            refit = umeyama(x[inl], y[inl], w[inl], with_scale=with_scale, symmetric_scale=symmetric_scale)
        except AlignmentError:
            break
        new_inl = np.linalg.norm(refit.apply(x) - y, axis=1) ** 2 <= tau2
        if int(new_inl.sum()) < int(inl.sum()) * 0.9:  # refit made things worse: keep the hypothesis' set
            break
        sim = refit
        if np.array_equal(new_inl, inl):
            break
        inl = new_inl
    residuals = np.linalg.norm(sim.apply(x) - y, axis=1)
    inl = residuals <= threshold_m
    if int(inl.sum()) < min_inliers:
        raise AlignmentError(f"RANSAC: only {int(inl.sum())} of {n} correspondences within {threshold_m:.4g} "
                             f"(need {min_inliers})")
    return sim, inl, residuals


# ---------------------------------------------------------------------------------------------- per-frame geometry
def frame_key(frame: Frame) -> tuple[str, float]:
    """Identity of a frame across windows: ``(frame_id, stamp rounded to 1 µs)``."""
    return (str(frame.frame_id), round(float(frame.stamp), 6))


@dataclass
class FrameGeometry:
    """A sparse, fixed pixel grid of one frame's reconstruction (what the aligner stores per map frame).

    Attributes:
        key: :func:`frame_key` of the frame.
        world_from_camera: (4, 4) float64 camera-to-frame pose in the geometry's frame.
        image_size: (H, W) of the depth map the grid was sampled from.
        pixels: (M,) int64 flat pixel indices ``v * W + u`` of the sampled grid pixels with valid depth.
        points: (M, 3) float64 3-D points of those pixels in the geometry's frame.
        depth: (M,) float64 z-depth of those pixels (geometry units).
        confidence: (M,) float64 confidence in (0, 1].
    """

    key: tuple[str, float]
    world_from_camera: np.ndarray
    image_size: tuple[int, int]
    pixels: np.ndarray
    points: np.ndarray
    depth: np.ndarray
    confidence: np.ndarray

    @property
    def centre(self) -> np.ndarray:
        """(3,) camera centre in the geometry's frame."""
        return self.world_from_camera[:3, 3]

    def transformed(self, sim: Sim3) -> FrameGeometry:
        """The same frame expressed through ``sim`` (poses and points mapped, depth scaled by ``s``)."""
        return FrameGeometry(self.key, sim.transform_pose(self.world_from_camera), self.image_size,
                             self.pixels, sim.apply(self.points), self.depth * sim.s, self.confidence)


def sample_frame_geometry(key: tuple[str, float], depth: np.ndarray, intrinsics: np.ndarray,
                          world_from_camera: np.ndarray, confidence: np.ndarray | None = None,
                          stride: int = 8) -> FrameGeometry:
    """Back-project a regular pixel grid of a depth map into 3-D.

    Grid pixels ``(u, v) = (stride//2 + i·stride, stride//2 + j·stride)``; a pixel ``(u, v)`` with depth ``z``
    maps to ``X_c = z K^{-1} [u, v, 1]^T`` (pinhole, pixel centres at integer coordinates) and then to
    ``world_from_camera · X_c``. Pixels with non-finite or non-positive depth or zero confidence are dropped.

    Args:
        key: frame identity (:func:`frame_key`).
        depth: (H, W) z-depth (any units); 0/NaN/inf invalid.
        intrinsics: (3, 3) K in pixels for the (H, W) grid.
        world_from_camera: (4, 4) camera-to-frame pose.
        confidence: (H, W) in [0, 1] (``None``: 1 where depth is valid).
        stride: grid spacing in pixels (>= 1).

    Returns:
        The :class:`FrameGeometry`.

    Raises:
        ValueError: wrong shapes or stride < 1.
    """
    d = np.asarray(depth)
    if d.ndim != 2:
        raise ValueError(f"depth must be (H, W), got {d.shape}")
    H, W = d.shape
    K = np.asarray(intrinsics, dtype=np.float64)
    T = np.asarray(world_from_camera, dtype=np.float64)
    if K.shape != (3, 3) or T.shape != (4, 4):
        raise ValueError(f"intrinsics must be (3, 3) and world_from_camera (4, 4), got {K.shape} and {T.shape}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    vs = np.arange(stride // 2, H, stride)
    us = np.arange(stride // 2, W, stride)
    pix = (vs[:, None] * W + us[None, :]).reshape(-1)
    if confidence is not None and np.asarray(confidence).shape != (H, W):
        raise ValueError(f"confidence must be {(H, W)}, got {np.asarray(confidence).shape}")
    z = d.reshape(-1)[pix].astype(np.float64)
    c = np.ones_like(z) if confidence is None else np.asarray(confidence).reshape(-1)[pix].astype(np.float64)
    ok = np.isfinite(z) & (z > 0) & np.isfinite(c) & (c > 0)
    pix, z, c = pix[ok], z[ok], np.clip(c[ok], 0.0, 1.0)
    uv1 = np.stack([(pix % W).astype(np.float64), (pix // W).astype(np.float64), np.ones(pix.size)])
    xc = (np.linalg.inv(K) @ uv1).T * z[:, None]  # X_c = z K^-1 [u, v, 1]^T
    pts = xc @ T[:3, :3].T + T[:3, 3]
    return FrameGeometry(key, T.copy(), (int(H), int(W)), pix.astype(np.int64), pts, z, c)


def frame_correspondences(src: Sequence[FrameGeometry], dst: Sequence[FrameGeometry], max_points_per_frame: int,
                          centre_weight: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray,
                                                                                   np.ndarray, np.ndarray]:
    """3-D correspondences between two reconstructions of the same frames.

    For each pair ``(src[i], dst[i])`` (the same frame in two frames of reference): the camera centres (weight
    ``centre_weight``) and the pixels present in both grids, weighted by ``sqrt(c_src c_dst)``; at most
    ``max_points_per_frame`` pixels per frame are kept, drawn without replacement with probability proportional
    to the weight (a confidence-weighted subsample).

    Returns:
        ``(src_points (N, 3), dst_points (N, 3), weights (N,), dst_depth (N,))`` — ``dst_depth`` is the depth of
        each correspondence in the target frame (the centres' entries are NaN).

    Raises:
        ValueError: ``src`` and ``dst`` of different lengths, or grids of different image sizes.
    """
    if len(src) != len(dst):
        raise ValueError(f"need one target per source frame, got {len(src)} and {len(dst)}")
    xs, ys, ws, ds = [], [], [], []
    for a, b in zip(src, dst):
        if a.image_size != b.image_size:
            raise ValueError(f"frame {a.key}: image sizes differ ({a.image_size} vs {b.image_size})")
        xs.append(a.centre[None])
        ys.append(b.centre[None])
        ws.append(np.array([centre_weight], dtype=np.float64))
        ds.append(np.array([np.nan]))
        _, ia, ib = np.intersect1d(a.pixels, b.pixels, assume_unique=True, return_indices=True)
        if ia.size == 0:
            continue
        wt = np.sqrt(a.confidence[ia] * b.confidence[ib])
        pos = np.flatnonzero(wt > 0)
        if pos.size > max_points_per_frame:
            pos = rng.choice(pos, size=max_points_per_frame, replace=False, p=wt[pos] / wt[pos].sum())
        xs.append(a.points[ia[pos]])
        ys.append(b.points[ib[pos]])
        ws.append(wt[pos])
        ds.append(b.depth[ib[pos]])
    if not xs:
        return np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws), np.concatenate(ds)


# ---------------------------------------------------------------------------------------------- trajectories
def fit_trajectory_sim3(src_poses: np.ndarray, dst_poses: np.ndarray, weights: np.ndarray | None = None,
                        threshold_m: float = 0.10, min_baseline_m: float = 0.10, min_spread_m: float = 0.03,
                        iterations: int = 300, rng: np.random.Generator | int | None = None,
                        ) -> tuple[Sim3, np.ndarray, np.ndarray]:
    """Sim(3) mapping a reconstructed camera trajectory onto a metric (odometry) one: ``dst ≈ S ∘ src``.

    Two regimes, chosen by the spread of the target camera centres (principal standard deviations
    ``σ1 >= σ2 >= σ3`` of the centred positions):

    * ``σ2 >= min_spread_m`` (the trajectory spans a plane or volume): :func:`ransac_umeyama` on the camera
      centres (Umeyama 1991).
    * otherwise, if the trajectory's extent (largest distance from its mean, times 2) is at least
      ``min_baseline_m`` (nearly straight motion, where the rotation about the line of motion is not observable
      from positions): the rotation comes from the camera orientations, ``R = argmin Σ w_j ||R_dst,j - R R_src,j||_F²``
      = polar factor of ``Σ w_j R_dst,j R_src,j^T`` (chordal L2 mean; orientations more than 10° from the mean
      are dropped and it is recomputed); then scale and translation by RANSAC over pairs of cameras
      (``s = (y_i - y_j)·R(x_i - x_j) / |x_i - x_j|²``, ``t = y_i - s R x_i``, MSAC score) refined by weighted least
      squares on the inliers, ``s = Σ w (y - ȳ)·R(x - x̄) / Σ w |R(x - x̄)|²``, ``t = ȳ - s R x̄``.

    Args:
        src_poses: (N, 4, 4) camera-to-source poses (any units).
        dst_poses: (N, 4, 4) camera-to-target poses of the same cameras (metres).
        weights: (N,) non-negative weights (``None``: all 1).
        threshold_m: inlier threshold on camera-centre residuals, target metres.
        min_baseline_m: least trajectory extent (metres) at which the scale is considered observable.
        min_spread_m: least second principal standard deviation (metres) for the position-only fit.
        iterations: RANSAC iterations.
        rng: random generator or seed.

    Returns:
        ``(sim3, inlier_mask (N,), residuals (N,) metres)``.

    Raises:
        ValueError: shapes differ or are not (N, 4, 4), N < 2.
        AlignmentError: extent below ``min_baseline_m`` (scale not observable yet), or too few inliers.
    """
    A = np.asarray(src_poses, dtype=np.float64)
    B = np.asarray(dst_poses, dtype=np.float64)
    if A.ndim != 3 or A.shape[1:] != (4, 4) or A.shape != B.shape:
        raise ValueError(f"src_poses and dst_poses must both be (N, 4, 4), got {A.shape} and {B.shape}")
    n = A.shape[0]
    if n < 2:
        raise AlignmentError(f"need at least 2 posed cameras to fit a trajectory, got {n}")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(n)
    x, y = A[:, :3, 3], B[:, :3, 3]
    yc = y - y.mean(axis=0)
    sigma = np.linalg.svd(yc, compute_uv=False) / math.sqrt(n)
    extent = 2.0 * float(np.linalg.norm(yc, axis=1).max())
    if extent < min_baseline_m:
        raise AlignmentError(f"odometry baseline {extent:.3f} m < {min_baseline_m} m: metric scale not observable "
                             "yet")
    if n >= 3 and sigma[1] >= min_spread_m:
        try:
            return ransac_umeyama(x, y, w, threshold_m=threshold_m, iterations=iterations,
                                  min_inliers=max(3, int(0.3 * n)), rng=rng)
        except AlignmentError:
            pass  # fall through to the orientation-based fit
    # Orientation-based rotation (robust chordal mean), then scale/translation by least squares.
    Rs = np.einsum("nij,nkj->nik", B[:, :3, :3], A[:, :3, :3])  # R_dst,j R_src,j^T
    keep = w > 0
    R = _as_rotation((w[keep, None, None] * Rs[keep]).sum(0))
    for _ in range(2):
        ang = np.arccos(np.clip((np.einsum("nij,ij->n", Rs, R) - 1.0) / 2.0, -1.0, 1.0))
        keep = (ang < math.radians(10.0)) & (w > 0)
        if keep.sum() < 2:
            raise AlignmentError("camera orientations of the two trajectories disagree (> 10° from their mean)")
        R = _as_rotation((w[keep, None, None] * Rs[keep]).sum(0))
    # Given R, y = s R x + t has 4 unknowns: 2-camera hypotheses s = (y_i - y_j)·R(x_i - x_j) / |x_i - x_j|²,
    # t = y_i - s R x_i, scored by MSAC on the centres, then weighted least squares on the inliers.
    xr = x @ R.T
    cand = np.flatnonzero(keep)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if cand.size * (cand.size - 1) // 2 <= iterations:
        ii, jj = np.triu_indices(cand.size, k=1)
        pi, pj = cand[ii], cand[jj]
    else:
        pi = gen.choice(cand, size=iterations)
        pj = gen.choice(cand, size=iterations)
    dx = xr[pi] - xr[pj]
    den = (dx ** 2).sum(1)
    good = den > 1e-12 * max(1e-300, float(den.max(initial=0.0)))
    if not good.any():
        raise AlignmentError("reconstructed camera centres coincide: scale not observable")
    pi, pj, dx, den = pi[good], pj[good], dx[good], den[good]
    s_h = ((y[pi] - y[pj]) * dx).sum(1) / den
    t_h = y[pi] - s_h[:, None] * xr[pi]
    r2 = ((s_h[:, None, None] * xr[None] + t_h[:, None] - y[None]) ** 2).sum(-1)
    cost = (np.minimum(r2, threshold_m ** 2) * w[None] * keep[None]).sum(1) + 1e30 * (s_h <= 0)
    k = int(np.argmin(cost))
    if s_h[k] <= 0:
        raise AlignmentError("trajectory fit gave a non-positive scale (trajectories inconsistent)")
    inl = keep & (r2[k] <= threshold_m ** 2)
    sim = Sim3(float(s_h[k]), R, t_h[k])
    for _ in range(3):
        if inl.sum() < 2:
            break
        ww = w * inl
        xm = (ww[:, None] * xr).sum(0) / ww.sum()
        ym = (ww[:, None] * y).sum(0) / ww.sum()
        d = float((ww * ((xr - xm) ** 2).sum(1)).sum())
        s_ls = float((ww * ((y - ym) * (xr - xm)).sum(1)).sum()) / d if d > 0 else -1.0
        if s_ls <= 0:
            break
        sim = Sim3(s_ls, R, ym - s_ls * xm)
        new_inl = keep & (np.linalg.norm(sim.apply(x) - y, axis=1) <= threshold_m)
        if np.array_equal(new_inl, inl):
            break
        inl = new_inl
    res = np.linalg.norm(sim.apply(x) - y, axis=1)
    inl = res <= threshold_m
    if inl.sum() < 2:
        raise AlignmentError(f"trajectory fit: only {int(inl.sum())} cameras within {threshold_m} m")
    return sim, inl, res


# ---------------------------------------------------------------------------------------------- window aligner
@dataclass
class AlignerConfig:
    """Parameters of :class:`WindowAligner`.

    Attributes:
        grid_stride: pixel spacing of the grid sampled from each frame's depth (8 on 540x360 = 3,000 pixels).
        max_points_per_frame: correspondences drawn per shared frame (confidence-weighted subsample).
        centre_weight: weight of a shared camera centre relative to one fully confident pixel (confidence 1).
        overlap_threshold: RANSAC inlier threshold for window-to-map alignment, as a fraction of the median
            depth of the map's correspondences (0.03 = 3 cm at 1 m); relative because the map frame may not be
            metric.
        symmetric_scale: window-to-map fits use the symmetric scale estimate (see :func:`umeyama`): both sides are
            predictions with similar relative noise, and Umeyama's scale would shrink the map a little at every
            chained window.
        min_overlap_inliers: fewest inliers accepted for a window-to-map fit.
        min_inlier_ratio: smallest inlier fraction accepted for a window-to-map fit.
        ransac_iterations: maximum RANSAC hypotheses per fit.
        odometry_threshold_m: RANSAC inlier threshold on camera centres for the reconstruction -> odometry fit,
            metres.
        odometry_min_baseline_m: least odometry trajectory extent before the metric scale is estimated, metres.
        odometry_min_spread_m: least second principal spread of the odometry centres for a position-only fit
            (else orientations give the rotation, see :func:`fit_trajectory_sim3`), metres.
        odometry_max_frames: most recent odometry correspondences kept (older ones dropped: the fit tracks slow
            drift of the chained reconstruction).
        max_stored_frames: capacity of the keyframe memory (frames whose image and geometry are kept as
            registration targets and anchors; when full, the most redundant one is evicted).
        gravity: gravity / scale estimation for windows without odometry (:class:`GravityConfig`).
    """

    grid_stride: int = 8
    max_points_per_frame: int = 800
    centre_weight: float = 10.0
    overlap_threshold: float = 0.03
    symmetric_scale: bool = True
    min_overlap_inliers: int = 20
    min_inlier_ratio: float = 0.5
    ransac_iterations: int = 300
    odometry_threshold_m: float = 0.10
    odometry_min_baseline_m: float = 0.10
    odometry_min_spread_m: float = 0.03
    odometry_max_frames: int = 500
    max_stored_frames: int = 128
    gravity: GravityConfig = field(default_factory=GravityConfig)

    def validate(self) -> None:
        """Raise ``ValueError`` on out-of-range settings."""
        if self.grid_stride < 1 or self.max_points_per_frame < 1 or self.ransac_iterations < 1:
            raise ValueError("grid_stride, max_points_per_frame and ransac_iterations must be >= 1")
        if not (self.overlap_threshold > 0 and self.odometry_threshold_m > 0):
            raise ValueError("overlap_threshold and odometry_threshold_m must be > 0")
        if not 0 <= self.min_inlier_ratio <= 1:
            raise ValueError(f"min_inlier_ratio must be in [0, 1], got {self.min_inlier_ratio}")
        if self.centre_weight < 0 or self.odometry_max_frames < 3 or self.max_stored_frames < 1:
            raise ValueError("centre_weight must be >= 0, odometry_max_frames >= 3, max_stored_frames >= 1")
        self.gravity.validate()


def fit_shared_frames(src: Sequence[FrameGeometry], dst: Sequence[FrameGeometry], config: AlignerConfig,
                      rng: np.random.Generator) -> tuple[Sim3, float, float, int]:
    """Sim(3) mapping ``src`` geometry onto ``dst`` geometry of the same frames (two reconstructions of them).

    Correspondences from :func:`frame_correspondences`; :func:`ransac_umeyama` with the inlier threshold
    ``config.overlap_threshold`` times the median target depth of the correspondences (relative, since neither
    frame need be metric).

    Returns:
        ``(sim, inlier RMS (target units, weighted), inlier ratio, number of correspondences)``.

    Raises:
        AlignmentError: fewer than ``config.min_overlap_inliers`` correspondences or inliers, or an inlier ratio
            below ``config.min_inlier_ratio``.
    """
    x, y, w, dd = frame_correspondences(src, dst, config.max_points_per_frame, config.centre_weight, rng)
    n = x.shape[0]
    if n < max(3, config.min_overlap_inliers):
        raise AlignmentError(f"only {n} correspondences in the shared frames (need {config.min_overlap_inliers})")
    finite = np.isfinite(dd)
    scale_ref = float(np.median(dd[finite])) if finite.any() else 0.0
    if not scale_ref > 0:
        raise AlignmentError("shared frames have no valid depth to set the inlier threshold")
    sim, inl, r = ransac_umeyama(x, y, w, threshold_m=config.overlap_threshold * scale_ref,
                                 iterations=config.ransac_iterations, min_inliers=config.min_overlap_inliers, rng=rng,
                                 symmetric_scale=config.symmetric_scale)
    ratio = float(inl.mean())
    if ratio < config.min_inlier_ratio:
        raise AlignmentError(f"only {100 * ratio:.0f}% of {n} shared-frame correspondences are inliers "
                             f"(need {100 * config.min_inlier_ratio:.0f}%)")
    rms = float(np.sqrt(np.average(r[inl] ** 2, weights=w[inl]))) if w[inl].sum() > 0 else 0.0
    return sim, rms, ratio, n


@dataclass
class WindowAlignment:
    """Result of :meth:`WindowAligner.align` for a window of S frames.

    Attributes:
        window_to_output: Sim(3) from the window's own frame to the output frame.
        world_from_camera: (S, 4, 4) float64 camera-to-output poses.
        depth_scale: factor turning the window's depth into output units (``window_to_output.s``).
        metric: True when the output frame is the odometry frame (metres, odometry gravity).
        residuals: diagnostics (see :meth:`WindowAligner.align`).
        map_correction: Sim(3) ``M' <- M`` (rotation, shift, scale) that the caller must apply to everything already in
            the map before fusing this window (the map was re-levelled: see
            :func:`~langgs_ros.reconstruction.gravity.relevel_correction`); ``None`` = the map frame is unchanged.
            This window's ``world_from_camera`` is already in ``M'``.
    """

    window_to_output: Sim3
    world_from_camera: np.ndarray
    depth_scale: float
    metric: bool
    residuals: dict[str, float]
    map_correction: Sim3 | None = None


@dataclass
class _OdomPair:
    pose_rec: np.ndarray  # (4, 4) camera-to-R
    pose_odom: np.ndarray  # (4, 4) camera-to-O


class WindowAligner:
    """Places consecutive reconstructed windows into one map frame (stateful across windows).

    Frames ``R`` (reconstruction map: the first window's frame, arbitrary scale) and ``O`` (odometry, metric).
    For each window (poses and depth in its own frame ``W``):

    1. ``S_RW``: the first window gives the identity. Later windows are aligned through the frames they share with
       frames already placed (matched by :func:`frame_key`): correspondences from :func:`frame_correspondences`
       (camera centres + confidence-weighted pixels of this window vs the stored copy), then
       :func:`ransac_umeyama` with a threshold of ``overlap_threshold`` times the median depth. Without a shared
       frame (or if that fit fails) but with an odometry fit ``S_OR`` and posed frames in this window:
       ``S_RW = S_OR^{-1} ∘ S_OW`` with ``S_OW`` from this window's trajectory (:func:`fit_trajectory_sim3`).
       Otherwise :class:`AlignmentError` (the aligner's state is unchanged).
    2. The window's frames not yet stored are stored in ``R`` (grid geometry, see :func:`sample_frame_geometry`).
    3. Frames with odometry poses add (pose in ``R``, pose in ``O``) pairs, first placement only; ``S_OR`` is
       re-fitted on the most recent ``odometry_max_frames`` pairs with :func:`fit_trajectory_sim3` after every
       window that added pairs. Once it exists the output frame is ``O`` (metric); before, ``R``.

    Output: ``S_out,W = S_OR ∘ S_RW`` (or ``S_RW``), poses ``S_out,W.transform_pose(T_W)``, depth times
    ``S_out,W.s``. Windows already fused into a map are not moved when ``S_OR`` is later re-estimated;
    :attr:`map_from_reconstruction` is the current estimate.

    Not thread-safe (owned by the reconstructor, i.e. the mapping worker thread).

    Args:
        config: :class:`AlignerConfig` (defaults if None).
        seed: seed of the random generator (subsampling, RANSAC) — runs are reproducible.
    """

    def __init__(self, config: AlignerConfig | None = None, seed: int = 0) -> None:
        self.config = config or AlignerConfig()
        self.config.validate()
        self._seed = int(seed)
        self.reset()

    def reset(self) -> None:
        """Forget every window: the next window defines the map frame again."""
        self._rng = np.random.default_rng(self._seed)
        self.memory = KeyframeMemory(self.config.max_stored_frames)
        self.gravity: GravityEstimate | None = None
        self._odom: OrderedDict[tuple[str, float], _OdomPair] = OrderedDict()
        self.map_from_reconstruction: Sim3 | None = None
        self.num_windows = 0
        self.relevellings = 0
        self.last_odometry_fit: dict[str, float] = {}

    @property
    def metric(self) -> bool:
        """Whether outputs are currently expressed in the metric odometry frame."""
        return self.map_from_reconstruction is not None

    @property
    def num_stored_frames(self) -> int:
        """Frames whose geometry is kept for overlap alignment (keyframes in :attr:`memory`)."""
        return len(self.memory)

    @property
    def scale_source(self) -> str:
        """Where the output scale comes from: ``"odometry"``, ``"camera_height"`` (declared prior) or ``"none"``."""
        if self.metric:
            return "odometry"
        return self.gravity.scale_source if self.gravity is not None else "none"

    @property
    def up_source(self) -> str:
        """Where the output up (z) comes from: ``"odometry"``, ``"floor_plane"``, ``"camera_up"`` or ``"none"``."""
        if self.metric:
            return "odometry"
        return self.gravity.up_source if self.gravity is not None else "none"

    def _output_from_reconstruction(self) -> Sim3 | None:
        """The current ``out <- R`` transform (odometry fit, else the gravity/scale prior, else None = identity)."""
        if self.map_from_reconstruction is not None:
            return self.map_from_reconstruction
        return self.gravity.map_from_reconstruction if self.gravity is not None else None

    def align(self, frames: Sequence[Frame], world_from_camera: np.ndarray, depth: np.ndarray,
              intrinsics: np.ndarray, confidence: np.ndarray | None = None) -> WindowAlignment:
        """Align one window into the map and update the aligner's state.

        Args:
            frames: the S frames (``frame_id``/``stamp`` identify shared frames; ``world_from_camera``, when set,
                is the frame's odometry/TF camera-to-odometry pose in metres).
            world_from_camera: (S, 4, 4) camera-to-window poses from the reconstruction (window units).
            depth: (S, H, W) z-depth in window units; 0/NaN/inf invalid.
            intrinsics: (S, 3, 3) K in pixels for the (H, W) grid.
            confidence: (S, H, W) in [0, 1] (``None``: 1 where depth is valid).

        Returns:
            :class:`WindowAlignment`. ``residuals`` holds: ``overlap_frames``, ``overlap_points``,
            ``overlap_inlier_ratio``, ``overlap_rms`` (inlier RMS in output units; metres when metric),
            ``window_scale`` (window -> output), ``metric`` (0/1); with odometry ``odom_frames``,
            ``odom_inliers``, ``odom_inlier_ratio``, ``odom_rms_m``, ``odom_scale`` (R -> O), ``ate_m`` (RMS
            distance of this window's camera centres to their odometry centres, metres); and the summary
            ``rms_m``, ``inlier_ratio``, ``scale`` (odometry fit when metric, else the overlap fit); ``relevel_deg``
            when the map was re-levelled with this window.

        Raises:
            ValueError: inconsistent shapes or non-finite poses.
            AlignmentError: the window cannot be placed (no shared frame, fit failed, and no odometry fallback).
        """
        cfg = self.config
        S = len(frames)
        T_w = np.asarray(world_from_camera, dtype=np.float64)
        D = np.asarray(depth)
        Ks = np.asarray(intrinsics, dtype=np.float64)
        C = None if confidence is None else np.asarray(confidence)
        if S == 0:
            raise ValueError("empty window")
        if T_w.shape != (S, 4, 4) or not np.all(np.isfinite(T_w)):
            raise ValueError(f"world_from_camera must be finite (S, 4, 4) = ({S}, 4, 4), got {T_w.shape}")
        if D.ndim != 3 or D.shape[0] != S or Ks.shape != (S, 3, 3):
            raise ValueError(f"depth must be (S, H, W) and intrinsics (S, 3, 3) with S = {S}, got {D.shape} and "
                             f"{Ks.shape}")
        if C is not None and C.shape != D.shape:
            raise ValueError(f"confidence {C.shape} must match depth {D.shape}")
        keys = [frame_key(f) for f in frames]
        geo_w = [sample_frame_geometry(keys[i], D[i], Ks[i], T_w[i], None if C is None else C[i],
                                       cfg.grid_stride) for i in range(S)]
        res: dict[str, float] = {}
        shared = [i for i, k in enumerate(keys) if k in self.memory]
        res["overlap_frames"] = float(len(shared))
        S_RW: Sim3 | None = None
        overlap_error = ""
        if not len(self.memory):
            S_RW = Sim3.identity()
        elif shared:
            try:
                S_RW, rms_r, ratio, npts = self._fit_overlap([geo_w[i] for i in shared],
                                                             [self.memory[keys[i]].geometry for i in shared])
                res.update(overlap_points=float(npts), overlap_inlier_ratio=ratio, overlap_rms_r=rms_r)
            except AlignmentError as exc:
                overlap_error = str(exc)
                log.warning("window alignment through %d shared frame(s) failed: %s", len(shared), exc)
        if S_RW is None:
            S_RW = self._fit_via_odometry(frames, T_w)
            if S_RW is None:
                why = overlap_error or "it shares no frame with the map"
                raise AlignmentError(f"cannot place the window in the map: {why}; and no odometry fallback (needs "
                                     "an established metric fit and posed frames in this window)")
            res["odometry_fallback"] = 1.0
        geo_r = [g.transformed(S_RW) for g in geo_w]
        T_r = S_RW.transform_pose(T_w)
        # Store new frames (first placement wins: the map was built from it).
        for f, g in zip(frames, geo_r):
            self.memory.add(g.key, f, g, self.num_windows)
        # Odometry pairs and the R -> O fit.
        added = 0
        for i, f in enumerate(frames):
            if f.world_from_camera is None or keys[i] in self._odom:
                continue
            T_o = np.asarray(f.world_from_camera, dtype=np.float64)
            if T_o.shape != (4, 4) or not np.all(np.isfinite(T_o)):
                continue
            self._odom[keys[i]] = _OdomPair(T_r[i].copy(), T_o.copy())
            added += 1
        while len(self._odom) > cfg.odometry_max_frames:
            self._odom.popitem(last=False)
        if added:
            self._refit_odometry()
        res.update(self.last_odometry_fit)
        if (not self.metric and self.gravity is None and cfg.gravity.enabled
                and not any(f.world_from_camera is not None for f in frames)):
            pts = np.concatenate([g.points for g in geo_r]) if geo_r else np.zeros((0, 3))
            self.gravity = estimate_gravity_and_scale(pts, T_r, cfg.gravity, self._rng)
            log.info("unposed map frame: up from %s (tilt vs mean camera up %.1f deg), scale from %s (x%.4g)",
                     self.gravity.up_source, self.gravity.tilt_deg, self.gravity.scale_source,
                     self.gravity.map_from_reconstruction.s)
        correction = self._relevel(frames)
        S_xr = self._output_from_reconstruction()
        S_out = S_xr.compose(S_RW) if S_xr is not None else S_RW
        T_out = S_out.transform_pose(T_w)
        unit = S_xr.s if S_xr is not None else 1.0
        if self.gravity is not None and not self.metric:
            res.update({f"gravity_{k}": float(v) for k, v in self.gravity.info.items()})
        if "overlap_rms_r" in res:
            res["overlap_rms"] = res.pop("overlap_rms_r") * unit
        posed = [i for i, f in enumerate(frames) if f.world_from_camera is not None]
        if self.metric and posed:
            odo = np.stack([np.asarray(frames[i].world_from_camera, dtype=np.float64)[:3, 3] for i in posed])
            res["ate_m"] = float(np.sqrt(np.mean(np.sum((T_out[posed, :3, 3] - odo) ** 2, axis=1))))
        res["window_scale"] = S_out.s
        res["metric"] = float(self.metric)
        if self.metric:
            res["rms_m"] = res.get("odom_rms_m", math.nan)
            res["inlier_ratio"] = res.get("odom_inlier_ratio", math.nan)
        else:
            res["rms_m"] = res.get("overlap_rms", 0.0)
            res["inlier_ratio"] = res.get("overlap_inlier_ratio", 1.0)
        res["scale"] = S_out.s
        if correction is not None:
            res["relevel_deg"] = self.gravity.info["relevel_deg"]
        self.num_windows += 1
        return WindowAlignment(S_out, T_out, S_out.s, self.metric, res, correction)

    # ------------------------------------------------------------------ internals
    def _relevel(self, frames: Sequence[Frame]) -> Sim3 | None:
        """Re-estimate the up vector and the camera-height scale on the whole keyframe memory when due (unposed maps
        only); returns the correction of the map frame, or None (see
        :func:`~langgs_ros.reconstruction.gravity.relevel_correction`)."""
        cfg = self.config.gravity
        if (self.gravity is None or self.metric or not relevel_due(self.num_windows + 1, cfg)
                or any(f.world_from_camera is not None for f in frames)):
            return None
        kfs = list(self.memory)
        pts = np.concatenate([k.geometry.points for k in kfs])
        cams = np.stack([k.geometry.world_from_camera for k in kfs])
        out = relevel_correction(self.gravity, pts, cams, cfg, self._rng)
        if out is None:
            return None
        self.gravity, correction = out
        self.relevellings += 1
        log.info("unposed map re-levelled on %d keyframes: up moved %.2f deg, scale x%.4f (floor plane of %d "
                 "inliers)", len(kfs), self.gravity.info["relevel_deg"], correction.s, self.gravity.floor_inliers)
        return correction

    def _fit_overlap(self, src: list[FrameGeometry], dst: list[FrameGeometry]) -> tuple[Sim3, float, float, int]:
        """Sim(3) window -> R from shared frames; returns (sim, inlier RMS in R units, inlier ratio, N)."""
        return fit_shared_frames(src, dst, self.config, self._rng)

    def _fit_via_odometry(self, frames: Sequence[Frame], T_w: np.ndarray) -> Sim3 | None:
        """``S_RW = S_OR^{-1} ∘ S_OW`` from this window's own trajectory vs odometry, or None if impossible."""
        if self.map_from_reconstruction is None:
            return None
        idx = [i for i, f in enumerate(frames) if f.world_from_camera is not None]
        if len(idx) < 2:
            return None
        odo = np.stack([np.asarray(frames[i].world_from_camera, dtype=np.float64) for i in idx])
        cfg = self.config
        try:
            S_OW, _, _ = fit_trajectory_sim3(T_w[idx], odo, threshold_m=cfg.odometry_threshold_m,
                                             min_baseline_m=cfg.odometry_min_baseline_m,
                                             min_spread_m=cfg.odometry_min_spread_m,
                                             iterations=cfg.ransac_iterations, rng=self._rng)
        except AlignmentError as exc:
            log.warning("odometry fallback for an unconnected window failed: %s", exc)
            return None
        return self.map_from_reconstruction.inverse().compose(S_OW)

    def _refit_odometry(self) -> None:
        """Re-estimate ``S_OR`` from the accumulated pairs (keeps the previous estimate if the fit fails)."""
        cfg = self.config
        pairs = list(self._odom.values())
        A = np.stack([p.pose_rec for p in pairs])
        B = np.stack([p.pose_odom for p in pairs])
        try:
            sim, inl, r = fit_trajectory_sim3(A, B, threshold_m=cfg.odometry_threshold_m,
                                              min_baseline_m=cfg.odometry_min_baseline_m,
                                              min_spread_m=cfg.odometry_min_spread_m,
                                              iterations=cfg.ransac_iterations, rng=self._rng)
        except AlignmentError as exc:
            log.info("reconstruction -> odometry Sim(3) not (re-)estimated from %d cameras: %s", len(pairs), exc)
            self.last_odometry_fit = {"odom_frames": float(len(pairs))}
            return
        self.map_from_reconstruction = sim
        self.last_odometry_fit = {
            "odom_frames": float(len(pairs)), "odom_inliers": float(inl.sum()),
            "odom_inlier_ratio": float(inl.mean()), "odom_rms_m": float(np.sqrt(np.mean(r[inl] ** 2))),
            "odom_scale": sim.s,
        }
