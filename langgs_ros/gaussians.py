"""Pixel-aligned Gaussians: one flat 3D Gaussian ("surfel") per valid depth pixel.

Feed-forward Gaussian reconstructors (pixelSplat, MVSplat, FLEG arXiv 2512.17541 §3.1) predict one Gaussian per
pixel, centred on the pixel's unprojected depth. Here the Gaussian parameters are derived geometrically instead
of by a learned head:

- **mean**: the pixel centre ``(u, v)`` unprojected with its z-depth ``d``: ``X_c = d K⁻¹ [u, v, 1]ᵀ``, then
  ``X_w = R X_c + t`` with ``world_from_camera = [R | t]``.
- **rotation**: the local surface normal ``n`` is the cross product of finite differences of the unprojected
  point map (central differences over ``normal_step`` pixels, the nearest valid neighbour within
  ``normal_window`` where there are holes, one-sided where one side is invalid or across a depth discontinuity),
  oriented towards the camera; where no normal can be formed it falls back to the reversed viewing ray. The
  Gaussian's local z axis is ``n``; its x axis is the viewing ray's component in the tangent plane (the
  direction in which the pixel's footprint is stretched by the obliquity), y = z × x.
- **scales**: the pixel footprint ``stride · d / f`` (metres per pixel at depth ``d``) times ``scale_factor``
  in-plane; along x additionally divided by ``max(|cos θ|, min_cos)`` where θ is the angle between the ray and
  the normal (the footprint of a pixel on an oblique surface); thickness = ``thickness_ratio`` × the in-plane
  scale.
- **opacity**: from the reconstruction confidence (rule in :class:`GaussianInitConfig`).
- **colour**: the pixel's RGB in [0, 1].
- **pixel blocks** (``block = b > 1``): each b×b block of (strided) pixels becomes one surfel before all of the
  above: its *foreground* pixels (valid, depth within ``max_depth_jump`` of the block's nearest) are averaged —
  depth, pixel position, colour, confidence — and the instance id is their most frequent one; the footprint is
  ``√k · d / f`` for k foreground pixels (the same area as k pixel surfels), normals are formed on the block
  grid. This is the first level of the moment-matching merge done in image space, where neighbours are known
  (a b×b block of pixel surfels merges into about the surfel of a b-times larger pixel, see
  :func:`langgs_ros.sparsify.merge_by_inverse`), and it divides the cost of everything downstream by b².

Pixels with invalid depth (0, NaN, inf, outside ``[min_depth, max_depth]``) or confidence below
``min_confidence`` produce no Gaussian.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from langgs_ros.geometry import quat_to_rotmat, rotmat_to_quat
from langgs_ros.types import NO_INSTANCE, FrameSegmentation, Gaussians, WindowReconstruction

__all__ = ["GaussianInitConfig", "gaussians_from_depth", "gaussians_from_window", "rgb_on_grid",
           "transform_gaussians"]


@dataclass
class GaussianInitConfig:
    """Parameters of :func:`gaussians_from_depth`.

    Attributes:
        min_depth: nearest valid depth, metres.
        max_depth: farthest valid depth, metres.
        stride: pixel subsampling (1 = every pixel, 2 = every other row/column, ...).
        block: b×b blocks of (strided) pixels averaged into one surfel (1 = one surfel per pixel; see the
            module docstring). ``normal_step`` and ``normal_window`` are then divided by b (at least 1).
        scale_factor: in-plane standard deviation as a multiple of the (strided) pixel footprint ``stride·d/f``.
            0.5 makes neighbouring Gaussians (one footprint apart) overlap at their 1σ contours.
        min_cos: lower bound on ``|cos θ|`` (ray vs normal) when stretching the footprint on oblique surfaces
            (0.25 caps the stretch at 4×).
        thickness_ratio: normal-direction standard deviation as a fraction of the in-plane one (flat surfels).
        normal_step: preferred finite-difference baseline in (strided) pixels on each side. 2 is robust to
            depth maps upsampled 2x by pixel duplication (e.g. HoloLens), where 1-pixel differences are 0.
        normal_window: on each side the first valid neighbour at ``normal_step..normal_window`` pixels (then
            ``normal_step-1..1``) is used (real depth maps have holes).
        max_depth_jump: relative depth difference ``|d_n − d| / d`` above which a neighbour is treated as across
            a discontinuity (not used for the normal).
        min_confidence: pixels with confidence below this are dropped.
        opacity_rule: ``"confidence"``: ``opacity = clamp(base_opacity · confidence, min_opacity, 1)``;
            ``"constant"``: ``opacity = base_opacity`` for every valid pixel.
        base_opacity: opacity of a fully trusted pixel (0.9 leaves room for later evidence, cf. the usual 3DGS
            initialisation at 0.1 for optimisation; here there is no optimisation, so surfaces start nearly
            opaque).
        min_opacity: lower clamp for the confidence rule.
    """

    min_depth: float = 0.1
    max_depth: float = 10.0
    stride: int = 1
    block: int = 1
    scale_factor: float = 0.5
    min_cos: float = 0.25
    thickness_ratio: float = 0.1
    normal_step: int = 2
    normal_window: int = 3
    max_depth_jump: float = 0.05
    min_confidence: float = 0.0
    opacity_rule: Literal["confidence", "constant"] = "confidence"
    base_opacity: float = 0.9
    min_opacity: float = 0.05

    def validate(self) -> None:
        """Raise ``ValueError`` on inconsistent settings."""
        if not (0 <= self.min_depth < self.max_depth):
            raise ValueError(f"need 0 <= min_depth < max_depth, got {self.min_depth}, {self.max_depth}")
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {self.block}")
        if self.stride < 1 or self.normal_step < 1 or self.normal_window < self.normal_step:
            raise ValueError("need stride >= 1 and 1 <= normal_step <= normal_window")
        if self.scale_factor <= 0 or self.thickness_ratio <= 0 or not (0 < self.min_cos <= 1):
            raise ValueError("scale_factor, thickness_ratio must be > 0 and min_cos in (0, 1]")
        if self.opacity_rule not in ("confidence", "constant"):
            raise ValueError(f"unknown opacity_rule {self.opacity_rule!r}")
        if not (0 < self.base_opacity <= 1 and 0 <= self.min_opacity <= 1):
            raise ValueError("base_opacity must be in (0, 1] and min_opacity in [0, 1]")


def _as_tensor(x: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        a = np.ascontiguousarray(x)
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


def _normalize(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(eps)


def _normals_from_points(points: torch.Tensor, valid: torch.Tensor, depth: torch.Tensor, k: int,
                         max_jump: float, base: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel normals from a camera-frame point map (not yet oriented); ``k`` = neighbour search range.

    Args:
        points: (H, W, 3) camera-frame points; valid: (H, W) bool; depth: (H, W) z-depth.

    Returns:
        ``(normals (H, W, 3) unit, ok (H, W) bool)``; ``ok`` is False where no tangent pair could be formed.
    """

    # Pad once; every shifted neighbour map is then a view (no per-shift allocation).
    r = max(k, base)
    H, W = depth.shape
    pts_pad = F.pad(points.permute(2, 0, 1), (r, r, r, r)).permute(1, 2, 0)
    dep_pad = F.pad(depth, (r, r, r, r))
    val_pad = F.pad(valid.to(torch.uint8), (r, r, r, r)).bool()
    tol = max_jump * depth

    def neighbour(dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """First valid neighbour in direction (dy, dx) at steps ``base..k`` then ``base-1..1`` pixels, not
        across a discontinuity."""
        p_out = torch.zeros_like(points)
        v_out = torch.zeros_like(valid)
        for step in [*range(base, k + 1), *range(min(base, k + 1) - 1, 0, -1)]:
            ys, xs = slice(r + dy * step, r + dy * step + H), slice(r + dx * step, r + dx * step + W)
            v = val_pad[ys, xs] & ((dep_pad[ys, xs] - depth).abs() <= tol) & ~v_out
            p_out = torch.where(v[..., None], pts_pad[ys, xs], p_out)
            v_out |= v
        return p_out, v_out

    def tangent(p_plus: torch.Tensor, v_plus: torch.Tensor, p_minus: torch.Tensor,
                v_minus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = v_plus & v_minus
        t = torch.where(both[..., None], p_plus - p_minus,
                        torch.where(v_plus[..., None], p_plus - points, points - p_minus))
        return t, (v_plus | v_minus) & valid

    px, vx = neighbour(0, 1)
    mx, vmx = neighbour(0, -1)
    py, vy = neighbour(1, 0)
    my, vmy = neighbour(-1, 0)
    tx, okx = tangent(px, vx, mx, vmx)
    ty, oky = tangent(py, vy, my, vmy)
    n = torch.linalg.cross(tx, ty, dim=-1)
    nn = n.norm(dim=-1)
    ok = okx & oky & (nn > 1e-12)
    return n / nn.clamp_min(1e-12)[..., None], ok


def _average_blocks(dz: torch.Tensor, valid: torch.Tensor, u: torch.Tensor, v: torch.Tensor, col: torch.Tensor,
                    conf: torch.Tensor | None, ids: torch.Tensor | None, b: int, max_jump: float, stride: int
                    ) -> tuple[torch.Tensor, ...]:
    """Average b×b pixel blocks over their foreground pixels (valid, depth ≤ (1 + max_jump) × the block's
    nearest). Inputs (h, w[, 3]); outputs on the (ceil(h/b), ceil(w/b)) block grid: depth (0 where the block has
    no valid pixel), valid, mean pixel u and v, colour, confidence (or None), most frequent instance id among
    the foreground (or None), and the footprint ``stride·√k`` in full-resolution pixels for k foreground pixels."""
    h, w = dz.shape
    H, W = -(-h // b) * b, -(-w // b) * b

    def blocks(t: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """(h, w, ...) -> (H/b, W/b, b*b, ...), padded with ``fill``."""
        if (H, W) != (h, w):
            pad = torch.full((H, W, *t.shape[2:]), fill, dtype=t.dtype, device=t.device)
            pad[:h, :w] = t
            t = pad
        t = t.reshape(H // b, b, W // b, b, *t.shape[2:]).transpose(1, 2)
        return t.reshape(H // b, W // b, b * b, *t.shape[4:])

    d_b, ok_b = blocks(dz), blocks(valid, False)
    nearest = torch.where(ok_b, d_b, torch.full_like(d_b, float("inf"))).amin(dim=-1, keepdim=True)
    fg = ok_b & (d_b <= nearest * (1.0 + max_jump))
    k = fg.sum(dim=-1)
    wgt = fg.float() / k.clamp(min=1)[..., None]

    def mean(t: torch.Tensor) -> torch.Tensor:
        x = blocks(t)
        return (x * (wgt[..., None] if x.ndim == 4 else wgt)).sum(dim=2)

    out_valid = k > 0
    depth = torch.where(out_valid, mean(dz), torch.zeros_like(k, dtype=dz.dtype))
    u_b, v_b = mean(u.contiguous()), mean(v.contiguous())  # 0 for empty blocks: invalid, never unprojected
    col_b = mean(col)
    conf_b = mean(conf) if conf is not None else None
    ids_b = None
    if ids is not None:
        x = blocks(ids, NO_INSTANCE)  # (Hb, Wb, b*b)
        votes = ((x[..., :, None] == x[..., None, :]) & fg[..., None, :]).sum(dim=-1)  # (Hb, Wb, b*b)
        votes = torch.where(fg, votes, torch.full_like(votes, -1))
        ids_b = torch.gather(x, 2, votes.argmax(dim=-1, keepdim=True))[..., 0]
    foot = stride * k.float().sqrt()
    return depth, out_valid, u_b, v_b, col_b, conf_b, ids_b, foot


@torch.inference_mode()
def gaussians_from_depth(
    depth: torch.Tensor | np.ndarray,
    rgb: torch.Tensor | np.ndarray,
    intrinsics: torch.Tensor | np.ndarray,
    world_from_camera: torch.Tensor | np.ndarray,
    confidence: torch.Tensor | np.ndarray | None = None,
    instance_ids: torch.Tensor | np.ndarray | None = None,
    config: GaussianInitConfig | None = None,
    *,
    device: torch.device | str | None = None,
) -> Gaussians:
    """One flat Gaussian per valid depth pixel (see the module docstring for the construction).

    Args:
        depth: (H, W) float z-depth in metres along the optical axis; 0/NaN/inf invalid.
        rgb: (H, W, 3) uint8 image, or float in [0, 1], RGB order, on the same pixel grid.
        intrinsics: (3, 3) pinhole matrix K in pixels for the (H, W) grid.
        world_from_camera: (4, 4) camera-to-world pose (OpenCV optical axes).
        confidence: optional (H, W) confidence in [0, 1]; ``None`` = 1 where depth is valid.
        instance_ids: optional (H, W) int instance id per pixel (``-1`` none); ``None`` = all ``-1``.
        config: :class:`GaussianInitConfig` (defaults if ``None``).
        device: where to compute and return; default: ``depth``'s device (CPU for numpy input).

    Returns:
        :class:`~langgs_ros.types.Gaussians` with N = number of valid (strided) pixels or pixel blocks,
        row-major order,
        float32 on ``device``; ``weights`` is ``None``.

    Raises:
        ValueError: shape mismatches, non-finite intrinsics/pose or a bad config.
    """
    cfg = config or GaussianInitConfig()
    cfg.validate()
    dev = torch.device(device) if device is not None else (depth.device if isinstance(depth, torch.Tensor)
                                                          else torch.device("cpu"))
    d = _as_tensor(depth, dev, torch.float32)
    if d.ndim != 2:
        raise ValueError(f"depth must be (H, W), got shape {tuple(d.shape)}")
    H, W = d.shape
    col = _as_tensor(rgb, dev)
    if col.shape != (H, W, 3):
        raise ValueError(f"rgb must be (H, W, 3) = ({H}, {W}, 3), got {tuple(col.shape)}")
    col = col.float() / 255.0 if col.dtype == torch.uint8 else col.float().clamp(0.0, 1.0)
    K = _as_tensor(intrinsics, dev, torch.float32)
    T = _as_tensor(world_from_camera, dev, torch.float32)
    if K.shape != (3, 3) or T.shape != (4, 4):
        raise ValueError(f"intrinsics must be (3, 3) and world_from_camera (4, 4), got {tuple(K.shape)}, "
                         f"{tuple(T.shape)}")
    if not (torch.isfinite(K).all() and torch.isfinite(T).all()) or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError("intrinsics/pose must be finite with positive focal lengths")
    conf = None
    if confidence is not None:
        conf = _as_tensor(confidence, dev, torch.float32)
        if conf.shape != (H, W):
            raise ValueError(f"confidence must be (H, W) = ({H}, {W}), got {tuple(conf.shape)}")
    ids = None
    if instance_ids is not None:
        ids = _as_tensor(instance_ids, dev, torch.int32)
        if ids.shape != (H, W):
            raise ValueError(f"instance_ids must be (H, W) = ({H}, {W}), got {tuple(ids.shape)}")

    s = cfg.stride
    if s > 1:
        d, col = d[::s, ::s], col[::s, ::s]
        conf = conf[::s, ::s] if conf is not None else None
        ids = ids[::s, ::s] if ids is not None else None
    h, w = d.shape
    fx, fy, cx, cy, skew = K[0, 0], K[1, 1], K[0, 2], K[1, 2], K[0, 1]

    valid = torch.isfinite(d) & (d >= cfg.min_depth) & (d <= cfg.max_depth) & (d > 0)
    if conf is not None:
        conf = torch.nan_to_num(conf, nan=0.0).clamp(0.0, 1.0)
        valid &= conf >= cfg.min_confidence
        valid &= conf > 0
    dz = torch.where(valid, d, torch.zeros_like(d))

    # Pixel centres (integer coordinates of the full-resolution grid).
    v_pix = (torch.arange(h, device=dev, dtype=torch.float32) * s)[:, None].expand(h, w)
    u_pix = (torch.arange(w, device=dev, dtype=torch.float32) * s)[None, :].expand(h, w)
    footprint: torch.Tensor | None = None  # per-surfel in-plane extent in full-resolution pixels (blocks)
    normal_step, normal_window = cfg.normal_step, cfg.normal_window
    if cfg.block > 1:
        dz, valid, u_pix, v_pix, col, conf, ids, footprint = _average_blocks(
            dz, valid, u_pix, v_pix, col, conf, ids, cfg.block, cfg.max_depth_jump, s)
        h, w = dz.shape
        normal_step = max(1, round(cfg.normal_step / cfg.block))
        normal_window = max(normal_step, round(cfg.normal_window / cfg.block))

    y_n = (v_pix - cy) / fy
    x_n = (u_pix - cx - skew * y_n) / fx
    rays = torch.stack((x_n, y_n, torch.ones_like(x_n)), dim=-1)  # (h, w, 3), z = 1
    pts_c = rays * dz[..., None]

    normals, n_ok = _normals_from_points(pts_c, valid, dz, normal_window, cfg.max_depth_jump, normal_step)

    # Flatten to the valid pixels.
    idx = valid.reshape(-1).nonzero().squeeze(1)
    P = pts_c.reshape(-1, 3)[idx]
    ray = _normalize(rays.reshape(-1, 3)[idx])
    n = normals.reshape(-1, 3)[idx]
    ok = n_ok.reshape(-1)[idx]
    n = torch.where(ok[:, None], n, -ray)
    n = torch.where(((n * ray).sum(-1) > 0)[:, None], -n, n)  # orient towards the camera
    cos = (n * ray).sum(-1).abs()
    # Tangent x axis: the ray's component in the tangent plane (direction of footprint stretch).
    t1 = ray - (ray * n).sum(-1, keepdim=True) * n
    t1n = t1.norm(dim=-1, keepdim=True)
    # Fallback for rays along the normal: any unit vector orthogonal to n.
    alt = torch.where((n[:, :1].abs() < 0.9), torch.tensor([1.0, 0.0, 0.0], device=dev).expand_as(n),
                      torch.tensor([0.0, 1.0, 0.0], device=dev).expand_as(n))
    alt = _normalize(alt - (alt * n).sum(-1, keepdim=True) * n)
    t1 = torch.where(t1n > 1e-6, t1 / t1n.clamp_min(1e-12), alt)
    t2 = torch.linalg.cross(n, t1, dim=-1)
    R_wc, t_wc = T[:3, :3], T[:3, 3]
    means = P @ R_wc.T + t_wc
    # Local axes (t1, t2, n) rotated into the world: columns of R_w = R_wc R_c (one GEMM per axis, no bmm).
    R_w = torch.stack((t1 @ R_wc.T, t2 @ R_wc.T, n @ R_wc.T), dim=-1)
    quats = rotmat_to_quat(R_w)

    f = 0.5 * (fx + fy)
    extent = footprint.reshape(-1)[idx] if footprint is not None else float(s)  # pixels: s without blocks
    foot = cfg.scale_factor * extent * P[:, 2] / f
    stretch = 1.0 / cos.clamp_min(cfg.min_cos)
    scales = torch.stack((foot * stretch, foot, foot * cfg.thickness_ratio), dim=-1)

    if conf is not None and cfg.opacity_rule == "confidence":
        opac = (cfg.base_opacity * conf.reshape(-1)[idx]).clamp(cfg.min_opacity, 1.0)
    else:
        opac = torch.full((idx.numel(),), cfg.base_opacity, device=dev)
    colors = col.reshape(-1, 3)[idx]
    inst = ids.reshape(-1)[idx] if ids is not None else torch.full((idx.numel(),), NO_INSTANCE, dtype=torch.int32,
                                                                    device=dev)
    return Gaussians(means.contiguous(), quats.contiguous(), scales.contiguous(), opac.contiguous(),
                     colors.contiguous(), inst.to(torch.int32).contiguous(), weights=None)


def _resize_nearest_ids(ids: np.ndarray, H: int, W: int) -> np.ndarray:
    """Nearest-neighbour resample of an (h, w) id image onto an (H, W) grid (pixel-centre aligned)."""
    h, w = ids.shape
    ys = np.clip(((np.arange(H) + 0.5) * h / H).astype(np.int64), 0, h - 1)
    xs = np.clip(((np.arange(W) + 0.5) * w / W).astype(np.int64), 0, w - 1)
    return ids[ys[:, None], xs[None, :]]


def rgb_on_grid(rgb: np.ndarray | torch.Tensor, height: int, width: int,
                device: torch.device | str) -> torch.Tensor:
    """A frame's colour image on another pixel grid (e.g. a reconstructor's depth grid).

    Args:
        rgb: (h, w, 3) uint8 (0..255) or float (0..1) RGB image.
        height, width: the target grid.
        device: where the result lives.

    Returns:
        The image itself as a tensor when the grid already matches (dtype kept), else the bilinearly resized
        (antialiased) image, (height, width, 3) float32 in [0, 1].
    """
    t = rgb.to(device) if isinstance(rgb, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(rgb)).to(device)
    if t.shape[:2] == (height, width):
        return t
    tf = t.float().permute(2, 0, 1)[None]
    tf = tf / 255.0 if t.dtype == torch.uint8 else tf
    return F.interpolate(tf, size=(height, width), mode="bilinear", align_corners=False,
                         antialias=True)[0].permute(1, 2, 0).clamp(0, 1)


def gaussians_from_window(
    rec: WindowReconstruction,
    segmentations: Sequence[FrameSegmentation] | None = None,
    config: GaussianInitConfig | None = None,
) -> list[Gaussians]:
    """Pixel Gaussians for each frame of a reconstructed window.

    Colours come from ``rec.frames[i].rgb`` (bilinearly resized if the frame's image grid differs from the
    depth grid); instance ids from ``segmentations[i].instance_ids`` (nearest-neighbour resized likewise), else
    ``-1``.

    Args:
        rec: the window (depth, confidence, intrinsics, world_from_camera on the reconstructor's device).
        segmentations: ``None`` or one :class:`FrameSegmentation` per frame (local ids 0..K-1, -1 none).
        config: :class:`GaussianInitConfig`.

    Returns:
        S :class:`Gaussians` (in ``rec.frame`` coordinates, on ``rec.depth``'s device), one per frame.

    Raises:
        ValueError: number of segmentations or frames differs from the window length.
    """
    S = len(rec)
    if len(rec.frames) != S:
        raise ValueError(f"window has {S} depth maps but {len(rec.frames)} frames")
    if segmentations is not None and len(segmentations) != S:
        raise ValueError(f"got {len(segmentations)} segmentations for a window of {S} frames")
    dev = rec.depth.device
    H, W = int(rec.depth.shape[1]), int(rec.depth.shape[2])
    out = []
    for i in range(S):
        rgb = rgb_on_grid(rec.frames[i].rgb, H, W, dev)
        ids = None
        if segmentations is not None:
            seg_ids = np.asarray(segmentations[i].instance_ids)
            if seg_ids.shape != (H, W):
                seg_ids = _resize_nearest_ids(seg_ids, H, W)
            ids = seg_ids.astype(np.int32)
        out.append(gaussians_from_depth(rec.depth[i], rgb, rec.intrinsics[i], rec.world_from_camera[i],
                                        confidence=rec.confidence[i], instance_ids=ids, config=config,
                                        device=dev))
    return out


def transform_gaussians(g: Gaussians, new_from_old: np.ndarray) -> Gaussians:
    """Gaussians moved by a similarity transform (e.g. a re-levelled unposed map: ``map_new <- map_old``).

    Args:
        g: N Gaussians in frame ``old`` (means (N, 3) float32 m, quats (N, 4) float32 wxyz world-from-Gaussian,
            scales (N, 3) m, weights (N,) m² when set).
        new_from_old: (4, 4) similarity ``[[s R, t], [0, 1]]`` (R orthonormal, det +1, s > 0; t in metres).

    Returns:
        N Gaussians in ``new``: means ``s R μ + t``, quats of ``R R_i`` (wxyz), scales × s, weights × s² (they are
        areas), opacities, colours and instance ids unchanged (same dtype and device as ``g``).

    Raises:
        ValueError: ``new_from_old`` not a finite (4, 4) similarity.
    """
    T = np.asarray(new_from_old, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise ValueError(f"new_from_old must be a finite (4, 4) matrix, got shape {T.shape}")
    det = float(np.linalg.det(T[:3, :3]))
    scale = det ** (1.0 / 3.0) if det > 0 else 0.0
    R_np = T[:3, :3] / scale if scale > 0 else T[:3, :3]
    if scale <= 0 or not np.allclose(R_np @ R_np.T, np.eye(3), atol=1e-6):
        raise ValueError("new_from_old must be a similarity [[s R, t], [0, 1]] with R a rotation and s > 0")
    R = torch.as_tensor(R_np, dtype=g.means.dtype, device=g.means.device)
    t = torch.as_tensor(T[:3, 3], dtype=g.means.dtype, device=g.means.device)
    means = scale * (g.means @ R.T) + t
    quats = rotmat_to_quat(R[None] @ quat_to_rotmat(g.quats)) if len(g) else g.quats.clone()
    return Gaussians(means, quats.to(g.quats.dtype), g.scales * scale, g.opacities.clone(), g.colors.clone(),
                     g.instance_ids.clone(), None if g.weights is None else g.weights * (scale * scale))
