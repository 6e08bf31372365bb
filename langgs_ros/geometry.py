"""Small geometry helpers shared by the core: rotations, gravity-aligned yaw frames and boxes.

Conventions (see :mod:`langgs_ros.types`): quaternions are **w, x, y, z** and rotate from a Gaussian's / box's
local frame into the world (``world_from_local``); rotation matrices are proper (det +1) with the local axes as
columns. Yaw is measured about the map's unit ``up`` vector in the horizontal frame returned by
:func:`yaw_frame`: ``box_x = cos(yaw) e1 + sin(yaw) e2`` (the convention of the shared ``hololens_office``
annotations; for a REP-103 ``map`` with ``up = +z`` this is the usual yaw from +x towards +y).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import ConvexHull, QhullError

__all__ = [
    "GravityBox",
    "covariance_from_scales_quats",
    "fit_gravity_aligned_box",
    "heading_yaw",
    "normalize_up",
    "quat_to_rotmat",
    "rotation_from_yaw",
    "rotmat_to_quat",
    "scales_quats_from_covariance",
    "symmetric_eigh3",
    "yaw_frame",
]


# ----------------------------------------------------------------------------------------------------------------
# Rotations (batched torch, device-agnostic)
# ----------------------------------------------------------------------------------------------------------------
def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """Rotation matrices from quaternions.

    Args:
        quats: (..., 4) quaternions, **w, x, y, z**; need not be normalised (normalised here).

    Returns:
        (..., 3, 3) proper rotation matrices, same dtype/device; ``R @ v_local = v_world``.
    """
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    xy, xz, yz = x * y, x * z, y * z
    wx, wy, wz = w * x, w * y, w * z
    R = torch.stack(
        (
            1 - 2 * (yy + zz), 2 * (xy - wz), 2 * (xz + wy),
            2 * (xy + wz), 1 - 2 * (xx + zz), 2 * (yz - wx),
            2 * (xz - wy), 2 * (yz + wx), 1 - 2 * (xx + yy),
        ),
        dim=-1,
    )
    return R.reshape(*q.shape[:-1], 3, 3)


def rotmat_to_quat(R: torch.Tensor) -> torch.Tensor:
    """Quaternions from proper rotation matrices (Shepperd's method, branch-free over the batch).

    Args:
        R: (..., 3, 3) rotation matrices (det +1; columns = local axes in world).

    Returns:
        (..., 4) unit quaternions **w, x, y, z** with ``w >= 0`` (the sign is canonicalised).
    """
    m00, m01, m02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    m10, m11, m12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    m20, m21, m22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    # 4 q_i^2 for each component; the largest is divided by (numerically safest).
    a2 = torch.stack(
        (1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22), dim=-1
    ).clamp_min(0.0)
    amax, b = a2.max(dim=-1)
    b0, b1, b2 = b == 0, b == 1, b == 2
    d_wx, d_wy, d_wz = m21 - m12, m02 - m20, m10 - m01
    s_xy, s_xz, s_yz = m10 + m01, m02 + m20, m12 + m21
    w = torch.where(b0, amax, torch.where(b1, d_wx, torch.where(b2, d_wy, d_wz)))
    x = torch.where(b0, d_wx, torch.where(b1, amax, torch.where(b2, s_xy, s_xz)))
    y = torch.where(b0, d_wy, torch.where(b1, s_xy, torch.where(b2, amax, s_yz)))
    z = torch.where(b0, d_wz, torch.where(b1, s_xz, torch.where(b2, s_yz, amax)))
    q = torch.stack((w, x, y, z), dim=-1)
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.where(q[..., :1] < 0, -q, q)


def covariance_from_scales_quats(scales: torch.Tensor, quats: torch.Tensor) -> torch.Tensor:
    """3DGS covariance ``Σ = R S Sᵀ Rᵀ`` (Kerbl et al. 2023, Eq. 6).

    Args:
        scales: (N, 3) standard deviations in metres.
        quats: (N, 4) quaternions w, x, y, z.

    Returns:
        (N, 3, 3) covariances in m², same dtype as ``scales``.
    """
    R = quat_to_rotmat(quats.to(scales.dtype))
    return (R * (scales * scales)[:, None, :]) @ R.transpose(1, 2)


Vec3 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _cross(a: Vec3, b: Vec3) -> Vec3:
    return a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]


def _dot(a: Vec3, b: Vec3) -> torch.Tensor:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _pick(mask: torch.Tensor, a: Vec3, b: Vec3) -> Vec3:
    return tuple(torch.where(mask, x, y) for x, y in zip(a, b))  # type: ignore[return-value]


def _scaled(a: Vec3, k: torch.Tensor) -> Vec3:
    return a[0] * k, a[1] * k, a[2] * k


def symmetric_eigh3(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form eigen-decomposition of symmetric 3×3 matrices (a non-iterative ``torch.linalg.eigh``).

    Eigenvalues from the trigonometric solution of the characteristic cubic (Smith 1961, "Eigenvalues of a
    symmetric 3×3 matrix", CACM 4(4)); eigenvectors as in Eberly, "A Robust Eigensolver for 3×3 Symmetric
    Matrices" (Geometric Tools, 2014): first the eigenvector of the eigenvalue farther from the other two (the
    longest cross product of two rows of ``A − λI``), then the middle one inside its orthogonal complement (a 2×2
    null vector), the third by a cross product. A repeated eigenvalue gets an arbitrary orthonormal basis of its
    eigenspace, as with ``eigh``. Computed element-wise in float64 (batched LAPACK ``eigh`` is about 3× slower on a
    CPU for N ~ 10⁴). Accuracy: ~1e-16 relative to the largest |entry| for well separated eigenvalues, ~1e-8 near
    a repeated one (the ``acos`` of the cubic is ill-conditioned there), far below float32 round-off.

    Args:
        A: (N, 3, 3) symmetric matrices (symmetrised here: ``(A + Aᵀ) / 2``).

    Returns:
        ``(evals (N, 3) ascending, evecs (N, 3, 3))`` in ``A``'s dtype; ``evecs[:, :, k]`` is the unit
        eigenvector of ``evals[:, k]`` and every ``evecs`` is a proper rotation (det +1).
    """
    dtype, N = A.dtype, A.shape[0]
    if N == 0:
        return A.new_zeros(0, 3), A.new_zeros(0, 3, 3)
    S = A.to(torch.float64).reshape(N, 9)
    a00, a11, a22 = S[:, 0], S[:, 4], S[:, 8]
    a01, a02, a12 = 0.5 * (S[:, 1] + S[:, 3]), 0.5 * (S[:, 2] + S[:, 6]), 0.5 * (S[:, 5] + S[:, 7])
    scale = torch.stack((a00, a11, a22, a01, a02, a12), dim=1).abs().amax(dim=1).clamp_min(1e-300)
    a00, a11, a22, a01, a02, a12 = (x / scale for x in (a00, a11, a22, a01, a02, a12))  # entries in [-1, 1]
    q = (a00 + a11 + a22) / 3.0
    b00, b11, b22 = a00 - q, a11 - q, a22 - q
    p = ((b00 * b00 + b11 * b11 + b22 * b22 + 2.0 * (a01 * a01 + a02 * a02 + a12 * a12)) / 6.0).sqrt()
    isotropic = p <= 1e-12
    det_b = (b00 * (b11 * b22 - a12 * a12) - a01 * (a01 * b22 - a12 * a02) + a02 * (a01 * a12 - b11 * a02))
    r = (det_b / (2.0 * torch.where(isotropic, torch.ones_like(p), p) ** 3)).clamp(-1.0, 1.0)
    phi = torch.acos(r) / 3.0
    lam_max = q + 2.0 * p * torch.cos(phi)
    lam_min = q + 2.0 * p * torch.cos(phi + 2.0 * math.pi / 3.0)
    lam_mid = 3.0 * q - lam_max - lam_min
    # The eigenvalue farther from the other two is simple: r >= 0 -> the largest, else the smallest.
    top = r >= 0.0
    lam = torch.where(top, lam_max, lam_min)
    rows = ((a00 - lam, a01, a02), (a01, a11 - lam, a12), (a02, a12, a22 - lam))
    c0, c1, c2 = _cross(rows[0], rows[1]), _cross(rows[0], rows[2]), _cross(rows[1], rows[2])
    n0, n1, n2 = _dot(c0, c0), _dot(c1, c1), _dot(c2, c2)
    use1, use2 = (n1 > n0) & (n1 >= n2), (n2 > n0) & (n2 > n1)
    v = _pick(use2, c2, _pick(use1, c1, c0))
    nv = torch.where(use2, n2, torch.where(use1, n1, n0)).sqrt()
    one, zero = torch.ones_like(q), torch.zeros_like(q)
    v = _pick(isotropic, (one, zero, zero), _scaled(v, 1.0 / nv.clamp_min(1e-300)))
    # Orthonormal U, V spanning the plane ⟂ v.
    use_xy = v[0] * v[0] + v[1] * v[1] >= v[1] * v[1] + v[2] * v[2]
    u = _pick(use_xy, (-v[1], v[0], zero), (zero, -v[2], v[1]))
    u = _scaled(u, 1.0 / _dot(u, u).sqrt().clamp_min(1e-300))
    w = _cross(v, u)

    def sym_mul(x: Vec3) -> Vec3:
        return (a00 * x[0] + a01 * x[1] + a02 * x[2], a01 * x[0] + a11 * x[1] + a12 * x[2],
                a02 * x[0] + a12 * x[1] + a22 * x[2])

    su, sw = sym_mul(u), sym_mul(w)
    m00, m01, m11 = _dot(u, su) - lam_mid, _dot(u, sw), _dot(w, sw) - lam_mid
    use0 = m00.abs() >= m11.abs()
    # Null vector of [[m00, m01], [m01, m11]]: perpendicular to its larger row; u where the block is ~0.
    x = torch.where(use0, -m01, m11)
    y = torch.where(use0, m00, -m01)
    nrm = (x * x + y * y).sqrt()
    tiny = nrm <= 1e-12
    x = torch.where(tiny, one, x / nrm.clamp_min(1e-300))
    y = torch.where(tiny, zero, y / nrm.clamp_min(1e-300))
    v_mid = tuple(x * ui + y * wi for ui, wi in zip(u, w))
    v_mid = _pick(isotropic, (zero, one, zero), v_mid)  # type: ignore[arg-type]
    # Ascending columns (v_min, v_mid, v_max) with det +1: the third is the cross product of the first two.
    v_min = _pick(top, _cross(v_mid, v), v)
    v_max = _cross(v_min, v_mid)
    evals = torch.stack((lam_min, lam_mid, lam_max), dim=-1) * scale[:, None]
    evecs = torch.stack([torch.stack(col, dim=-1) for col in (v_min, v_mid, v_max)], dim=-1)
    return evals.to(dtype), evecs.to(dtype)


def scales_quats_from_covariance(cov: torch.Tensor, min_scale: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Decompose symmetric covariances into 3DGS scales and rotations (closed form: :func:`symmetric_eigh3`).

    Args:
        cov: (N, 3, 3) symmetric positive semi-definite covariances, m².
        min_scale: lower bound on each returned standard deviation (m), guards degenerate (planar/linear) merges.

    Returns:
        ``(scales (N, 3) m, ascending, quats (N, 4) w, x, y, z)`` in ``cov``'s dtype.
    """
    if cov.shape[0] == 0:
        return cov.new_zeros(0, 3), cov.new_zeros(0, 4)
    evals, evecs = symmetric_eigh3(cov)
    scales = evals.clamp_min(min_scale * min_scale).sqrt()
    return scales, rotmat_to_quat(evecs)


# ----------------------------------------------------------------------------------------------------------------
# Gravity-aligned frames and boxes (numpy, CPU)
# ----------------------------------------------------------------------------------------------------------------
def normalize_up(up: np.ndarray | tuple[float, float, float] | list[float]) -> np.ndarray:
    """Unit ``up`` vector as float64 (3,).

    Raises:
        ValueError: not 3 finite values or zero length.
    """
    u = np.asarray(up, dtype=np.float64).reshape(-1)
    if u.shape != (3,) or not np.all(np.isfinite(u)) or np.linalg.norm(u) < 1e-9:
        raise ValueError(f"up must be a non-zero finite 3-vector, got {up!r}")
    return u / np.linalg.norm(u)


def yaw_frame(up: np.ndarray | tuple[float, float, float] | list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal reference axes ``(e1, e2)`` for yaw about ``up``.

    ``e1`` is world +x projected onto the plane orthogonal to ``up`` (world +y if x is nearly parallel to up),
    ``e2 = up × e1``; so ``(e1, e2, up)`` is a right-handed orthonormal frame and yaw = atan2(v·e2, v·e1).

    Returns:
        ``e1, e2``: (3,) float64 unit vectors.
    """
    u = normalize_up(up)
    ref = np.array([1.0, 0.0, 0.0]) if abs(u[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = ref - (ref @ u) * u
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(u, e1)
    return e1, e2


def heading_yaw(direction: np.ndarray, up: np.ndarray | tuple[float, float, float]) -> float:
    """Yaw (rad, in (-π, π]) of a world direction about ``up`` in the :func:`yaw_frame` convention."""
    e1, e2 = yaw_frame(up)
    d = np.asarray(direction, dtype=np.float64)
    return float(np.arctan2(d @ e2, d @ e1))


def rotation_from_yaw(yaw: float, up: np.ndarray | tuple[float, float, float]) -> np.ndarray:
    """World-from-box rotation (3, 3) float64: columns ``box_x, box_y, up`` with ``box_x = cos(yaw) e1 +
    sin(yaw) e2``."""
    u = normalize_up(up)
    e1, e2 = yaw_frame(u)
    bx = np.cos(yaw) * e1 + np.sin(yaw) * e2
    by = np.cross(u, bx)
    return np.stack((bx, by, u), axis=1)


@dataclass
class GravityBox:
    """A gravity-aligned 3D box.

    Attributes:
        center: (3,) float64 box centre, world metres.
        size: (3,) float64 extents along box x, box y (horizontal, ``size[0] >= size[1]``) and up, metres.
        yaw: rotation about ``up`` (rad, in (-π/2, π/2]) of box x in the :func:`yaw_frame` convention.
        rotation: (3, 3) float64 world-from-box rotation (columns box x, box y, up).
    """

    center: np.ndarray
    size: np.ndarray
    yaw: float
    rotation: np.ndarray


def _min_area_rectangle(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Minimum-area enclosing rectangle of 2D points (rotating calipers over the convex-hull edges).

    Returns ``(centre (2,), size (2,) with size[0] >= size[1], angle of the size[0] axis in rad)``.
    """
    pts = np.unique(np.round(xy, 6), axis=0)
    if pts.shape[0] >= 3:
        try:
            hull = pts[ConvexHull(pts).vertices]
        except QhullError:  # collinear / degenerate
            hull = pts
    else:
        hull = pts
    if hull.shape[0] == 1:
        return hull[0].copy(), np.zeros(2), 0.0
    edges = np.roll(hull, -1, axis=0) - hull
    angles = np.unique(np.mod(np.arctan2(edges[:, 1], edges[:, 0]), np.pi / 2))
    c, s = np.cos(angles), np.sin(angles)
    # Project hull points onto each candidate axis pair: (A, H).
    u = hull[:, 0][None] * c[:, None] + hull[:, 1][None] * s[:, None]
    v = -hull[:, 0][None] * s[:, None] + hull[:, 1][None] * c[:, None]
    w = u.max(1) - u.min(1)
    h = v.max(1) - v.min(1)
    best = int(np.argmin(w * h))
    a = angles[best]
    cu = 0.5 * (u[best].max() + u[best].min())
    cv = 0.5 * (v[best].max() + v[best].min())
    centre = np.array([cu * np.cos(a) - cv * np.sin(a), cu * np.sin(a) + cv * np.cos(a)])
    size = np.array([w[best], h[best]])
    if size[1] > size[0]:
        size = size[::-1].copy()
        a += np.pi / 2
    a = float(np.mod(a + np.pi / 2, np.pi) - np.pi / 2)  # (-π/2, π/2]
    if a <= -np.pi / 2 + 1e-12:
        a += np.pi
    return centre, size, a


def fit_gravity_aligned_box(
    points: np.ndarray,
    up: np.ndarray | tuple[float, float, float] = (0.0, 0.0, 1.0),
    trim_percent: float = 2.0,
) -> GravityBox | None:
    """Robust minimum-area gravity-aligned box of a point set.

    Points are expressed in the yaw frame ``(e1, e2, up)``; heights are trimmed to the ``[trim, 100 - trim]``
    percentiles; the horizontal projection is trimmed to the same percentiles along its two principal axes
    (PCA of the 2D points), then the minimum-area rectangle of the remaining points is found with rotating
    calipers on their convex hull (``scipy.spatial.ConvexHull``). Same construction as the shared
    ``hololens_office`` ground-truth boxes.

    Args:
        points: (N, 3) world points in metres (e.g. an instance's Gaussian means).
        up: unit gravity-up vector of the world frame.
        trim_percent: percent trimmed at each end of each axis (0 = none, must be < 50).

    Returns:
        The :class:`GravityBox`, or ``None`` for an empty / non-finite point set.

    Raises:
        ValueError: ``trim_percent`` outside [0, 50).
    """
    if not 0.0 <= trim_percent < 50.0:
        raise ValueError(f"trim_percent must be in [0, 50), got {trim_percent}")
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    p = p[np.all(np.isfinite(p), axis=1)]
    if p.shape[0] == 0:
        return None
    u = normalize_up(up)
    e1, e2 = yaw_frame(u)
    xy = np.stack((p @ e1, p @ e2), axis=1)
    z = p @ u
    if trim_percent > 0 and p.shape[0] >= 10:
        zlo, zhi = np.percentile(z, [trim_percent, 100 - trim_percent])
        mean = xy.mean(0)
        _, vecs = np.linalg.eigh(np.cov((xy - mean).T) + 1e-12 * np.eye(2))
        ab = (xy - mean) @ vecs
        lo = np.percentile(ab, trim_percent, axis=0)
        hi = np.percentile(ab, 100 - trim_percent, axis=0)
        keep_xy = np.all((ab >= lo) & (ab <= hi), axis=1)
        if keep_xy.sum() >= 3:
            xy = xy[keep_xy]
        keep_z = (z >= zlo) & (z <= zhi)
        if keep_z.any():
            z = z[keep_z]
    c2, s2, yaw = _min_area_rectangle(xy)
    zmin, zmax = float(z.min()), float(z.max())
    center = c2[0] * e1 + c2[1] * e2 + 0.5 * (zmin + zmax) * u
    size = np.array([s2[0], s2[1], zmax - zmin])
    return GravityBox(center=center, size=size, yaw=yaw, rotation=rotation_from_yaw(yaw, u))
