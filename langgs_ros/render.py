"""Rendering of semantic Gaussian maps: colour, depth (expected or planar), opacity, instance ids and features.

One entry point, :func:`render_gaussians`, with two backends picked from the Gaussians' device:

- ``"gsplat"`` (CUDA): ``gsplat.rasterization`` (gsplat 1.5, Ye et al. 2024) with ``render_mode="RGB+ED"``;
  ``viewmats`` = camera-from-world, ``Ks`` with the half-pixel shift below, quaternions w-x-y-z, linear scales,
  opacities in [0, 1], ``rasterize_mode="classic"``. Instance maps take extra passes that render per-class one-hot
  colours, at most :data:`INSTANCE_CLASS_CHUNK` classes per pass, keeping a running arg-max (see *Instance ids*).
- ``"torch"`` (any device, the CPU path): projection with gsplat's pure-PyTorch reference functions
  (``gsplat.cuda._torch_impl._quat_scale_to_covar_preci`` and ``_fully_fused_projection``: EWA splatting,
  Zwicker et al. 2002, with gsplat's ``eps2d`` low-pass dilation of the 2D covariance), then our own vectorised
  16x16-tile front-to-back alpha compositor, written to follow gsplat's CUDA kernel
  (``RasterizeToPixels3DGSFwd.cu``) and 3DGS (Kerbl et al., SIGGRAPH 2023, Sec. 6 and Eq. 2-3):

  - per pixel centre ``p`` and projected Gaussian (mean ``m``, conic ``Σ'⁻¹``, opacity ``o``):
    ``σ = ½ (p-m)ᵀ Σ'⁻¹ (p-m)``, ``α = min(0.999, o·exp(-σ))``; Gaussians with ``σ < 0`` or ``α < 1/255`` are skipped;
  - Gaussians are composited front to back in order of camera z of their means (per-tile sort, as 3DGS);
  - blending weight ``w_i = α_i T_i`` with ``T_i = Π_{j<i} (1 - α_j)``; a pixel stops at the first Gaussian that
    would bring ``T`` to ``<= 1e-4`` (that Gaussian is excluded, as in gsplat/3DGS);
  - a Gaussian is binned to the tiles overlapped by its 3.33-sigma screen box (gsplat's radius), so every
    (pixel, Gaussian) pair with ``α >= 1/255`` is visited; the tiled result equals brute-force compositing.

  Work is chunked over tiles and depth-ordered Gaussian batches so memory stays bounded (about
  ``max_chunk_elements`` floats per temporary) whatever N is.

Conventions (see :mod:`langgs_ros.types`): OpenCV camera axes; ``world_from_camera`` maps camera to world;
intrinsics are for pixel centres at integer coordinates, so both backends evaluate pixel ``(u, v)`` at
``(u + 0.5, v + 0.5)`` with ``cx, cy`` shifted by +0.5 (gsplat's convention puts pixel centres at half-integers).
A Gaussian whose mean projects to ``(fx x/z + cx, fy y/z + cy)`` is centred on that pixel index.

Outputs (:class:`RenderOutput`), on the Gaussians' device:

- ``rgb = Σ w_i c_i + T_final · background``;
- ``alpha = 1 - T_final = Σ w_i``;
- ``depth`` = expected z-depth ``Σ w_i z_i / Σ w_i`` (z of the Gaussian's mean in the camera frame, metres), set
  to 0 where ``alpha < alpha_threshold`` (default 0.5), i.e. where the pixel is mostly background; with
  ``depth_mode="planar"`` instead the z where the pixel's ray meets the blended tangent plane of the splats
  (:func:`planar_depth`; PGSR, Chen et al., IEEE TVCG 2024, Sec. 3.1: normal and distance maps composited as two
  more channels, ``z = D / (N · K⁻¹ p̃)``), which follows a slanted surface under a wide splat where the means'
  z does not (measured: the held-out depth error of the whole-sequence hololens map, 2.6 → 1.3 cm);
- ``features = Σ w_i f_i`` (alpha-weighted, *not* normalised; divide by ``alpha`` for a normalised feature);
- *Instance ids*: for each pixel the instance class with the largest **summed** blending weight
  ``Σ_{i ∈ class} w_i``, where unlabelled Gaussians (``instance_id == -1``) form a class of their own that
  competes too; ``-1`` where the unlabelled class wins or ``alpha < alpha_threshold``. Summing per instance (rather
  than taking the single heaviest Gaussian) is what one-hot feature rendering computes on CUDA, so both backends
  agree, and it is robust to objects made of many small Gaussians in front of one large one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from langgs_ros.types import NO_INSTANCE, Gaussians

__all__ = [
    "ALPHA_MAX",
    "ALPHA_MIN",
    "INSTANCE_CLASS_CHUNK",
    "PLANAR_MIN_COS",
    "TILE_SIZE",
    "TRANSMITTANCE_MIN",
    "ProjectedGaussians",
    "RenderOutput",
    "gsplat_cuda_available",
    "planar_depth",
    "plane_features",
    "project_gaussians",
    "render_gaussians",
    "tile_pairs",
]

TILE_SIZE = 16
"""Tile edge in pixels (as gsplat and 3DGS)."""
ALPHA_MIN = 1.0 / 255.0
"""Per-Gaussian alphas below this are skipped (3DGS / gsplat rule)."""
ALPHA_MAX = 0.999
"""Per-Gaussian alphas are clamped to this (3DGS / gsplat rule)."""
TRANSMITTANCE_MIN = 1e-4
"""A pixel stops at the first Gaussian that would bring its transmittance to <= this (excluded)."""
INSTANCE_CLASS_CHUNK = 32
"""Instance classes rendered per one-hot pass on the gsplat backend."""

Backend = Literal["auto", "gsplat", "torch"]
DepthMode = Literal["expected", "planar"]


@dataclass
class RenderOutput:
    """A rendered view (all tensors on the Gaussians' device).

    Attributes:
        rgb: (H, W, 3) float32 colour in [0, 1] (composited over ``background``).
        depth: (H, W) float32 z-depth in metres (expected, or planar with ``depth_mode="planar"``); 0 where
            ``alpha < alpha_threshold``.
        alpha: (H, W) float32 accumulated opacity ``1 - T_final`` in [0, 1].
        instance_ids: (H, W) int32 map instance id with the largest summed blending weight per pixel; ``-1`` where
            none / unlabelled / ``alpha < alpha_threshold``. ``None`` when rendered with ``render_instances=False``.
        features: (H, W, F) float32 alpha-weighted accumulated features ``Σ w_i f_i`` or ``None``.
        backend: the backend that produced it (``"gsplat"`` or ``"torch"``).
    """

    rgb: torch.Tensor
    depth: torch.Tensor
    alpha: torch.Tensor
    instance_ids: torch.Tensor | None
    features: torch.Tensor | None = None
    backend: str = "torch"


@dataclass
class ProjectedGaussians:
    """Screen-space Gaussians of one view (the visible subset), as used by the torch compositor.

    Attributes:
        index: (M,) int64 indices into the input Gaussians of the visible ones.
        means2d: (M, 2) float32 projected means in gsplat pixel coordinates (pixel ``u`` centred at ``u + 0.5``).
        conics: (M, 3) float32 upper triangle ``(a, b, c)`` of the inverse dilated 2D covariance.
        depths: (M,) float32 camera-frame z of the means, metres.
        radii: (M, 2) int32 screen half-extents in pixels (3.33 sigma, x and y).
        opacities: (M,) float32 opacities in [0, 1].
    """

    index: torch.Tensor
    means2d: torch.Tensor
    conics: torch.Tensor
    depths: torch.Tensor
    radii: torch.Tensor
    opacities: torch.Tensor


@functools.cache
def gsplat_cuda_available() -> bool:
    """Whether gsplat's CUDA extension can be used (CUDA runtime present and the extension loads).

    Importing the extension may JIT-compile it the first time (minutes) where a CUDA toolkit is installed; that is
    gsplat's own behaviour. Without a CUDA device this returns ``False`` without importing it. Cached per process.
    """
    if not torch.cuda.is_available():
        return False
    try:
        from gsplat.cuda._backend import _C  # slow import; may JIT-compile
    except Exception:  # any failure to build/load the extension means "not available"
        return False
    return _C is not None


def _as_tensor(x: torch.Tensor | np.ndarray | Sequence, device: torch.device, name: str,
               shape: tuple[int, ...]) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64),
                        dtype=torch.float64)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains non-finite values")
    return t.to(device)


def _validate_inputs(g: Gaussians, extra_features: torch.Tensor | None) -> None:
    n = len(g)
    expected = {"means": (n, 3), "quats": (n, 4), "scales": (n, 3), "opacities": (n,), "colors": (n, 3),
                "instance_ids": (n,)}
    for name, shape in expected.items():
        t = getattr(g, name)
        if tuple(t.shape) != shape:
            raise ValueError(f"gaussians.{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != g.device:
            raise ValueError(f"gaussians.{name} is on {t.device}, means on {g.device}")
        if name != "instance_ids" and not torch.isfinite(t).all():
            raise ValueError(f"gaussians.{name} contains non-finite values")
    if n and (g.quats.norm(dim=-1) < 1e-12).any():
        raise ValueError("gaussians.quats contains zero quaternions")
    if n and (g.scales < 0).any():
        raise ValueError("gaussians.scales must be >= 0 (linear standard deviations in metres)")
    if extra_features is not None:
        if extra_features.ndim != 2 or extra_features.shape[0] != n:
            raise ValueError(f"extra_features must have shape (N={n}, F), got {tuple(extra_features.shape)}")
        if extra_features.device != g.device:
            raise ValueError(f"extra_features is on {extra_features.device}, gaussians on {g.device}")
        if not torch.isfinite(extra_features).all():
            raise ValueError("extra_features contains non-finite values")


def _camera(world_from_camera: torch.Tensor | np.ndarray, intrinsics: torch.Tensor | np.ndarray,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(camera_from_world (4,4), K shifted to gsplat's half-pixel convention (3,3)), float32 on ``device``."""
    T = _as_tensor(world_from_camera, torch.device("cpu"), "world_from_camera", (4, 4))
    K = _as_tensor(intrinsics, torch.device("cpu"), "intrinsics", (3, 3))
    if not torch.allclose(T[3], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)):
        raise ValueError("world_from_camera must be a homogeneous transform (last row 0 0 0 1)")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError("intrinsics must have positive focal lengths fx, fy")
    viewmat = torch.linalg.inv(T)
    K = K.clone()
    K[0, 2] += 0.5
    K[1, 2] += 0.5
    return viewmat.to(device=device, dtype=torch.float32), K.to(device=device, dtype=torch.float32)


@torch.no_grad()
def project_gaussians(gaussians: Gaussians, camera_from_world: torch.Tensor, K_gsplat: torch.Tensor, width: int,
                      height: int, near: float, far: float, eps2d: float = 0.3,
                      chunk: int = 1 << 18) -> ProjectedGaussians:
    """EWA-project Gaussians into a pinhole view with gsplat's PyTorch reference functions.

    Args:
        gaussians: N Gaussians (activated parameters).
        camera_from_world: (4, 4) float32 world-to-camera transform (gsplat ``viewmat``).
        K_gsplat: (3, 3) float32 intrinsics in gsplat's convention (pixel centres at half-integers).
        width, height: image size in pixels.
        near, far: clipping range on camera z of the means, metres.
        eps2d: dilation added to the 2D covariance diagonal (pixels², gsplat default 0.3).
        chunk: Gaussians projected per call (bounds the (N, 3, 3) temporaries).

    Returns:
        The visible subset (inside the image box, ``near < z < far``, opacity >= 1/255).
    """
    from gsplat.cuda._torch_impl import (  # gsplat import takes ~1.5 s
        _fully_fused_projection,
        _quat_scale_to_covar_preci,
    )

    dev = gaussians.device
    parts: list[tuple[torch.Tensor, ...]] = []
    n = len(gaussians)
    for s in range(0, n, chunk):
        sl = slice(s, min(n, s + chunk))
        covars, _ = _quat_scale_to_covar_preci(gaussians.quats[sl].float(), gaussians.scales[sl].float(),
                                               compute_covar=True, compute_preci=False)
        radii, means2d, depths, conics, _ = _fully_fused_projection(
            gaussians.means[sl].float(), covars, camera_from_world[None], K_gsplat[None], width, height,
            eps2d=eps2d, near_plane=near, far_plane=far)
        radii, means2d, depths, conics = radii[0], means2d[0], depths[0], conics[0]
        op = gaussians.opacities[sl].float()
        vis = (radii > 0).all(dim=-1) & (op >= ALPHA_MIN)
        idx = torch.nonzero(vis).squeeze(1)
        parts.append((idx + s, means2d[idx], conics[idx], depths[idx], radii[idx], op[idx]))
    if not parts:
        z = torch.zeros(0, device=dev)
        return ProjectedGaussians(torch.zeros(0, dtype=torch.int64, device=dev), z.reshape(0, 2), z.reshape(0, 3), z,
                                  torch.zeros(0, 2, dtype=torch.int32, device=dev), z)
    cols = [torch.cat(c) for c in zip(*parts)]
    return ProjectedGaussians(*cols)


def tile_pairs(p: ProjectedGaussians, tiles_x: int, tiles_y: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All (tile, Gaussian) overlaps, sorted by tile and then front to back.

    Returns:
        tile_ids: (P,) int64 tile index ``ty * tiles_x + tx`` (non-decreasing).
        gauss: (P,) int64 index into ``p`` (depth order within a tile; ties keep input order).
    """
    dev = p.means2d.device
    order = torch.sort(p.depths, stable=True).indices  # front to back
    m = p.means2d[order] / TILE_SIZE
    r = p.radii[order].float() / TILE_SIZE
    lo = torch.floor(m - r).long()
    hi = torch.ceil(m + r).long()
    lo[:, 0].clamp_(0, tiles_x)
    lo[:, 1].clamp_(0, tiles_y)
    hi[:, 0].clamp_(0, tiles_x)
    hi[:, 1].clamp_(0, tiles_y)
    nx = (hi[:, 0] - lo[:, 0]).clamp(min=0)
    ny = (hi[:, 1] - lo[:, 1]).clamp(min=0)
    cnt = nx * ny
    total = int(cnt.sum())
    if total == 0:
        e = torch.zeros(0, dtype=torch.int64, device=dev)
        return e, e
    g = torch.repeat_interleave(torch.arange(len(cnt), device=dev), cnt)
    start = torch.cumsum(cnt, 0) - cnt
    off = torch.arange(total, device=dev) - start[g]
    nxg = nx[g]
    tx = lo[g, 0] + off % nxg
    ty = lo[g, 1] + torch.div(off, nxg, rounding_mode="floor")
    tile = ty * tiles_x + tx
    tile, perm = torch.sort(tile, stable=True)
    return tile, order[g[perm]]


@torch.no_grad()
def _composite_torch(p: ProjectedGaussians, values: torch.Tensor, classes: torch.Tensor | None, width: int,
                     height: int, batch: int, max_chunk_elements: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Tiled front-to-back compositing.

    Args:
        p: visible projected Gaussians (M).
        values: (M, C) float32 per-Gaussian values to accumulate with the blending weights.
        classes: optional (M,) int64 class index (0..K-1) per Gaussian for the arg-max of summed weights.
        width, height: image size.
        batch: depth-ordered Gaussians composited per step and tile.
        max_chunk_elements: bound on tiles x 256 x batch elements per step.

    Returns:
        accum: (H, W, C) ``Σ w_i v_i``; transmittance: (H, W) ``T_final``; best_class: (H, W) int64 class with the
        largest summed weight (``-1`` where no Gaussian contributed) or ``None``.
    """
    dev = values.device
    C = values.shape[1]
    tiles_x = math.ceil(width / TILE_SIZE)
    tiles_y = math.ceil(height / TILE_SIZE)
    n_tiles = tiles_x * tiles_y
    P = TILE_SIZE * TILE_SIZE

    acc = torch.zeros(n_tiles, P, C, device=dev)
    trans = torch.ones(n_tiles, P, device=dev)
    best = torch.full((n_tiles, P), -1, dtype=torch.int64, device=dev) if classes is not None else None

    tile_ids, gauss = tile_pairs(p, tiles_x, tiles_y)
    if len(tile_ids):
        counts = torch.bincount(tile_ids, minlength=n_tiles)
        starts = torch.cumsum(counts, 0) - counts
        local_cls = None
        k_per_tile = None
        uniq_keys = None
        if classes is not None:
            # Compact (tile, class) pairs: local class slot per overlap, so per-tile accumulators stay small.
            K = int(classes.max()) + 1
            keys = tile_ids * K + classes[gauss]
            uniq_keys, inv = torch.unique(keys, return_inverse=True)
            ukey_tile = torch.div(uniq_keys, K, rounding_mode="floor")
            first = torch.searchsorted(ukey_tile, torch.arange(n_tiles, device=dev))
            local_cls = inv - first[tile_ids]
            k_per_tile = torch.bincount(ukey_tile, minlength=n_tiles)

        # Pixel centres of each tile's 16x16 block (gsplat coordinates).
        lp = torch.arange(P, device=dev)
        off_x = (lp % TILE_SIZE).float() + 0.5
        off_y = torch.div(lp, TILE_SIZE, rounding_mode="floor").float() + 0.5

        mx, my = p.means2d[:, 0], p.means2d[:, 1]
        ca, cb, cc = p.conics[:, 0], p.conics[:, 1], p.conics[:, 2]
        op = p.opacities

        # Process tiles with overlaps in groups sized by the memory bound (longest lists first).
        busy = torch.nonzero(counts > 0).squeeze(1)
        busy = busy[torch.argsort(counts[busy], descending=True)]
        tiles_per_group = max(1, max_chunk_elements // (P * batch))
        for gs in range(0, len(busy), tiles_per_group):
            grp = busy[gs:gs + tiles_per_group]
            G = len(grp)
            g_start, g_count = starts[grp], counts[grp]
            px = (grp % tiles_x).float()[:, None] * TILE_SIZE + off_x[None]  # (G, P)
            py = torch.div(grp, tiles_x, rounding_mode="floor").float()[:, None] * TILE_SIZE + off_y[None]
            T = torch.ones(G, P, device=dev)
            # Pixels of edge tiles outside the image start "done" so they do not delay early termination.
            done = (px >= width) | (py >= height)
            a_acc = torch.zeros(G, P, C, device=dev)
            if classes is not None:
                kmax = int(k_per_tile[grp].max())
                c_acc = torch.zeros(G, P, kmax, device=dev)
            active = torch.arange(G, device=dev)
            k = 0
            while len(active):
                # Gaussians [k, k + batch) of every active tile, padded with -1.
                pos = g_start[active, None] + k + torch.arange(batch, device=dev)[None]
                valid_slot = (k + torch.arange(batch, device=dev))[None] < g_count[active, None]  # (A, B)
                pos = torch.where(valid_slot, pos, torch.zeros_like(pos))
                gi = gauss[pos]  # (A, B)
                # σ = ½ a dx² + b dx dy + ½ c dy² (in place, few temporaries: this loop is the hot spot).
                dx = mx[gi][:, None, :] - px[active][:, :, None]  # (A, P, B)
                dy = my[gi][:, None, :] - py[active][:, :, None]
                sigma = torch.mul(dx, dx).mul_(0.5 * ca[gi][:, None, :])
                sigma.add_(dx.mul_(dy).mul_(cb[gi][:, None, :]))
                sigma.add_(dy.mul_(dy).mul_(0.5 * cc[gi][:, None, :]))
                del dx, dy
                usable = (sigma >= 0) & ~done[active][:, :, None] & valid_slot[:, None, :]
                # α = min(0.999, o exp(-σ)); exp(-min(σ, 30)): beyond σ = 30, α < 1/255 anyway (skipped), and the
                # clamp avoids float32 denormals from exp(-σ) for σ in (87, 104), which are very slow on x86 CPUs.
                alpha = sigma.clamp_max_(30.0).neg_().exp_().mul_(op[gi][:, None, :]).clamp_max_(ALPHA_MAX)
                usable &= alpha >= ALPHA_MIN
                alpha.mul_(usable)
                del sigma, usable
                T0 = T[active]  # (A, P)
                t_incl = torch.cumprod(torch.sub(1.0, alpha), dim=-1).mul_(T0[:, :, None])  # T after each
                keep = t_incl > TRANSMITTANCE_MIN  # a prefix along B (t_incl is non-increasing)
                w = torch.cat([T0[:, :, None], t_incl[:, :, :-1]], dim=-1).mul_(alpha).mul_(keep)  # α_i T_i
                # Transmittance after the kept prefix; pixels that reached the threshold are done.
                done[active] |= t_incl[:, :, -1] <= TRANSMITTANCE_MIN
                T[active] = torch.minimum(T0, t_incl.masked_fill_(~keep, 1.0).amin(dim=-1))
                a_acc[active] += torch.bmm(w, values[gi])
                if classes is not None:
                    lc = local_cls[pos].masked_fill(~valid_slot, 0)  # (A, B)
                    c_acc[active] = c_acc[active].scatter_add_(2, lc[:, None, :].expand_as(w), w)
                del alpha, t_incl, keep, w
                k += batch
                still = (g_count[active] > k) & ~done[active].all(dim=1)
                active = active[still]
            acc[grp] = a_acc
            trans[grp] = T
            if classes is not None:
                wmax, arg = c_acc.max(dim=-1)
                slot = (first[grp][:, None] + arg).clamp(max=len(uniq_keys) - 1)
                cls = uniq_keys[slot] % K
                best[grp] = torch.where(wmax > 0, cls, torch.full_like(cls, -1))

    def untile(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(tiles_y, tiles_x, TILE_SIZE, TILE_SIZE, *x.shape[2:])
        x = x.transpose(1, 2).reshape(tiles_y * TILE_SIZE, tiles_x * TILE_SIZE, *x.shape[4:])
        return x[:height, :width]

    return untile(acc), untile(trans), (untile(best) if best is not None else None)


def plane_features(g: Gaussians, camera_from_world: torch.Tensor) -> torch.Tensor:
    """Per-Gaussian tangent plane in the camera frame, for :func:`planar_depth` (PGSR, Chen et al., IEEE TVCG 2024,
    Sec. 3.1).

    Args:
        g: N Gaussians (quats wxyz, scales); the normal is the axis of the smallest scale.
        camera_from_world: (4, 4) float world-to-camera transform.

    Returns:
        (N, 4) float32: the unit normal ``n`` in the camera frame, oriented towards the camera (``n · μ_c <= 0``),
        and the plane offset ``n · μ_c`` (metres, <= 0), where ``μ_c`` is the mean in the camera frame.
    """
    from langgs_ros.geometry import quat_to_rotmat

    R = quat_to_rotmat(g.quats.float())  # (N, 3, 3), columns = local axes in the world
    axis = g.scales.float().argmin(dim=1)
    n_w = torch.gather(R, 2, axis[:, None, None].expand(-1, 3, 1)).squeeze(2)
    Rc, tc = camera_from_world[:3, :3].float(), camera_from_world[:3, 3].float()
    n_c = n_w @ Rc.T
    mu_c = g.means.float() @ Rc.T + tc
    off = (n_c * mu_c).sum(-1)
    flip = torch.where(off > 0, -1.0, 1.0)
    return torch.cat((n_c * flip[:, None], (off * flip)[:, None]), dim=1)


PLANAR_MIN_COS = 0.2
""":func:`planar_depth` falls back to the expected depth where the blended normal meets the ray at a cosine below
this (grazing planes, or normals that cancel out at a crease)."""


def planar_depth(plane_acc: torch.Tensor, alpha: torch.Tensor, K_gsplat: torch.Tensor,
                 expected: torch.Tensor) -> torch.Tensor:
    """Depth where each pixel's ray meets its alpha-blended tangent plane (PGSR, Chen et al. 2024, Sec. 3.1: the
    "unbiased depth" ``D / (N · K⁻¹ p̃)`` of a rendered normal map ``N`` and distance map ``D``).

    Expected depth blends the z of the Gaussians' *means*, so a wide splat on a slanted surface (a floor seen at a
    grazing angle, a coarse Gaussian of a wall) reports its centre's depth at every pixel it covers. Intersecting
    the ray with the blended plane gives the depth of the surface the splats describe instead.

    Args:
        plane_acc: (H, W, 4) float alpha-weighted sums of :func:`plane_features` (``Σ w_i [n_i, n_i · μ_i]``).
        alpha: (H, W) float accumulated opacity.
        K_gsplat: (3, 3) float intrinsics with pixel centres at half-integers (as the compositors use).
        expected: (H, W) float expected depth (metres), used where the plane meets the ray at a cosine below
            :data:`PLANAR_MIN_COS` or does not lie in front of the camera.

    Returns:
        (H, W) float32 z-depth in metres (0 where ``expected`` is 0).
    """
    H, W = alpha.shape
    dev = alpha.device
    u = torch.arange(W, device=dev, dtype=torch.float32) + 0.5
    v = torch.arange(H, device=dev, dtype=torch.float32) + 0.5
    y = ((v - K_gsplat[1, 2]) / K_gsplat[1, 1])[:, None].expand(H, W)
    x = (u[None, :] - K_gsplat[0, 2] - K_gsplat[0, 1] * y) / K_gsplat[0, 0]
    n = plane_acc[..., :3].float()
    den = n[..., 0] * x + n[..., 1] * y + n[..., 2]  # n · r with r = (x, y, 1)
    ray_norm = torch.sqrt(x * x + y * y + 1.0)
    cos = -den / (n.norm(dim=-1) * ray_norm).clamp_min(1e-12)
    z = plane_acc[..., 3].float() / torch.where(den.abs() > 1e-12, den, torch.full_like(den, -1e-12))
    ok = (cos >= PLANAR_MIN_COS) & (z > 0) & (expected > 0)
    return torch.where(ok, z, expected).float().contiguous()


def _finish(rgb_acc: torch.Tensor, z_acc: torch.Tensor, alpha: torch.Tensor, background: torch.Tensor,
            alpha_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    rgb = (rgb_acc + (1.0 - alpha)[..., None] * background).clamp(0.0, 1.0)
    depth = torch.where(alpha >= alpha_threshold, z_acc / alpha.clamp(min=1e-10), torch.zeros_like(alpha))
    return rgb.float().contiguous(), depth.float().contiguous()


def _render_torch(g: Gaussians, viewmat: torch.Tensor, K: torch.Tensor, width: int, height: int, near: float,
                  far: float, background: torch.Tensor, render_instances: bool, extra_features: torch.Tensor | None,
                  alpha_threshold: float, eps2d: float, batch: int, max_chunk_elements: int,
                  depth_mode: DepthMode = "expected") -> RenderOutput:
    p = project_gaussians(g, viewmat, K, width, height, near, far, eps2d=eps2d)
    vals = [g.colors[p.index].float(), p.depths[:, None]]
    if extra_features is not None:
        vals.append(extra_features[p.index].float())
    if depth_mode == "planar":
        vals.append(plane_features(g.select(p.index), viewmat))
    values = torch.cat(vals, dim=1)
    classes = uniq = None
    if render_instances and len(p.index):
        uniq, classes = torch.unique(g.instance_ids[p.index].long(), return_inverse=True)
    acc, trans, best = _composite_torch(p, values, classes, width, height, batch, max_chunk_elements)
    alpha = (1.0 - trans).clamp(0.0, 1.0)
    rgb, depth = _finish(acc[..., :3], acc[..., 3], alpha, background, alpha_threshold)
    nf = extra_features.shape[1] if extra_features is not None else 0
    if depth_mode == "planar":
        depth = planar_depth(acc[..., 4 + nf:8 + nf], alpha, K, depth)
    feats = acc[..., 4:4 + nf].contiguous() if extra_features is not None else None
    inst = None
    if render_instances:
        inst = torch.full((height, width), NO_INSTANCE, dtype=torch.int32, device=g.device)
        if best is not None and uniq is not None:
            ok = (best >= 0) & (alpha >= alpha_threshold)
            inst[ok] = uniq[best[ok]].to(torch.int32)
    return RenderOutput(rgb=rgb, depth=depth, alpha=alpha.contiguous(), instance_ids=inst, features=feats,
                        backend="torch")


def _render_gsplat(g: Gaussians, viewmat: torch.Tensor, K: torch.Tensor, width: int, height: int, near: float,
                   far: float, background: torch.Tensor, render_instances: bool,
                   extra_features: torch.Tensor | None, alpha_threshold: float, eps2d: float,
                   depth_mode: DepthMode = "expected") -> RenderOutput:
    from gsplat import rasterization

    common = dict(viewmats=viewmat[None], Ks=K[None], width=width, height=height, near_plane=near,
                  far_plane=far, eps2d=eps2d, packed=False, rasterize_mode="classic")
    means, quats = g.means.float(), g.quats.float()
    scales, opac = g.scales.float(), g.opacities.float()
    colors = g.colors.float()
    nf = extra_features.shape[1] if extra_features is not None else 0
    if extra_features is not None:
        colors = torch.cat([colors, extra_features.float()], dim=1)
    if depth_mode == "planar":
        colors = torch.cat([colors, plane_features(g, viewmat)], dim=1)
    out, alphas, _ = rasterization(means, quats, scales, opac, colors, render_mode="RGB+ED",
                                   channel_chunk=32, **common)
    out, alpha = out[0], alphas[0, ..., 0].clamp(0.0, 1.0)
    # gsplat's ED channel is already Σ w z / alpha; undo to share _finish.
    rgb, depth = _finish(out[..., :3], out[..., -1] * alpha.clamp(min=1e-10), alpha, background, alpha_threshold)
    if depth_mode == "planar":
        depth = planar_depth(out[..., 3 + nf:7 + nf], alpha, K, depth)
    feats = out[..., 3:3 + nf].contiguous() if extra_features is not None else None
    inst = None
    if render_instances:
        inst = torch.full((height, width), NO_INSTANCE, dtype=torch.int32, device=g.device)
        if len(g):
            uniq, cls = torch.unique(g.instance_ids.long(), return_inverse=True)
            best_w = torch.zeros(height, width, device=g.device)
            best_c = torch.full((height, width), -1, dtype=torch.int64, device=g.device)
            for c0 in range(0, len(uniq), INSTANCE_CLASS_CHUNK):
                c1 = min(len(uniq), c0 + INSTANCE_CLASS_CHUNK)
                onehot = (cls[:, None] == torch.arange(c0, c1, device=g.device)[None]).float()
                wsum, _, _ = rasterization(means, quats, scales, opac, onehot, render_mode="RGB",
                                           channel_chunk=INSTANCE_CLASS_CHUNK, **common)
                wmax, arg = wsum[0].max(dim=-1)
                better = wmax > best_w
                best_w = torch.where(better, wmax, best_w)
                best_c = torch.where(better, arg + c0, best_c)
            ok = (best_c >= 0) & (alpha >= alpha_threshold)
            inst[ok] = uniq[best_c[ok]].to(torch.int32)
    return RenderOutput(rgb=rgb, depth=depth, alpha=alpha.contiguous(), instance_ids=inst, features=feats,
                        backend="gsplat")


@torch.no_grad()  # not inference_mode: callers may edit the returned tensors in place
def render_gaussians(
    gaussians: Gaussians,
    world_from_camera: torch.Tensor | np.ndarray,
    intrinsics: torch.Tensor | np.ndarray,
    width: int,
    height: int,
    *,
    near: float = 0.05,
    far: float = 100.0,
    background: Sequence[float] | torch.Tensor = (0.0, 0.0, 0.0),
    render_instances: bool = True,
    extra_features: torch.Tensor | None = None,
    backend: Backend = "auto",
    alpha_threshold: float = 0.5,
    eps2d: float = 0.3,
    batch: int = 32,
    max_chunk_elements: int = 1 << 21,
    depth_mode: DepthMode = "expected",
) -> RenderOutput:
    """Render colour, expected depth, opacity, instance ids and optional features of Gaussians in a pinhole view.

    3DGS alpha compositing (Kerbl et al., SIGGRAPH 2023, Eq. 2-3 and Sec. 6) with EWA projection (Zwicker et al.
    2002); exact rules in the module docstring.

    Args:
        gaussians: N Gaussians (activated parameters, see :class:`~langgs_ros.types.Gaussians`); their device sets
            where rendering runs and where outputs live.
        world_from_camera: (4, 4) camera-to-world pose (OpenCV optical axes), metres.
        intrinsics: (3, 3) pinhole K in pixels for the (height, width) grid, pixel centres at integers.
        width, height: image size in pixels (> 0).
        near, far: only Gaussians whose mean has camera z in (near, far) metres are rendered.
        background: RGB in [0, 1] composited behind the Gaussians.
        render_instances: also compute the instance-id map (extra passes on gsplat).
        extra_features: optional (N, F) float features to composite (e.g. semantic embeddings), same device.
        backend: ``"gsplat"`` (CUDA extension; error if unavailable), ``"torch"`` (any device), or ``"auto"``
            (gsplat when the Gaussians are on CUDA and the extension loads, else torch).
        alpha_threshold: depth is 0 and instance id -1 where accumulated alpha is below this.
        eps2d: 2D covariance dilation in pixels² (gsplat's default 0.3; 3DGS's low-pass filter).
        batch: torch backend: Gaussians per tile composited per vectorised step.
        max_chunk_elements: torch backend: bound on the (tiles, 256, batch) temporaries (memory ~ 20x this x 4 B).
        depth_mode: ``"expected"``: ``Σ w_i z_i / Σ w_i`` of the means' camera z (3DGS / gsplat ``ED``);
            ``"planar"``: where the pixel's ray meets the alpha-blended tangent plane of the splats
            (:func:`planar_depth`, PGSR's unbiased depth), which follows slanted surfaces under wide splats.

    Returns:
        :class:`RenderOutput` on the Gaussians' device.

    Raises:
        ValueError: malformed shapes, non-finite values, bad camera or sizes, unknown backend.
        RuntimeError: ``backend="gsplat"`` but gsplat's CUDA extension or a CUDA device is not available, or the
            Gaussians are not on a CUDA device.
    """
    if not (isinstance(width, int | np.integer) and isinstance(height, int | np.integer)) or width <= 0 \
            or height <= 0:
        raise ValueError(f"width and height must be positive integers, got {width}x{height}")
    width, height = int(width), int(height)
    if not (0.0 < near < far):
        raise ValueError(f"need 0 < near < far, got near={near}, far={far}")
    if not 0.0 <= alpha_threshold <= 1.0:
        raise ValueError(f"alpha_threshold must be in [0, 1], got {alpha_threshold}")
    if batch < 1 or max_chunk_elements < 1:
        raise ValueError("batch and max_chunk_elements must be positive")
    if backend not in ("auto", "gsplat", "torch"):
        raise ValueError(f"backend must be 'auto', 'gsplat' or 'torch', got {backend!r}")
    if depth_mode not in ("expected", "planar"):
        raise ValueError(f"depth_mode must be 'expected' or 'planar', got {depth_mode!r}")
    _validate_inputs(gaussians, extra_features)
    dev = gaussians.device
    bg = torch.as_tensor(np.asarray(background.detach().cpu() if isinstance(background, torch.Tensor)
                                    else background, dtype=np.float32)).to(dev)
    if bg.shape != (3,) or not torch.isfinite(bg).all():
        raise ValueError(f"background must be 3 finite floats, got {background!r}")
    viewmat, K = _camera(world_from_camera, intrinsics, dev)

    if backend == "gsplat" or (backend == "auto" and dev.type == "cuda"):
        usable = dev.type == "cuda" and gsplat_cuda_available()
        if backend == "gsplat" and not usable:
            raise RuntimeError(
                "backend='gsplat' needs Gaussians on a CUDA device and gsplat's CUDA extension "
                f"(device={dev}, torch.cuda.is_available()={torch.cuda.is_available()}); use backend='torch' "
                "or 'auto' to render with the PyTorch compositor")
        if usable:
            if len(gaussians) == 0:
                return _empty(height, width, bg, render_instances, extra_features, dev, "gsplat")
            return _render_gsplat(gaussians, viewmat, K, width, height, near, far, bg, render_instances,
                                  extra_features, alpha_threshold, eps2d, depth_mode)
    if len(gaussians) == 0:
        return _empty(height, width, bg, render_instances, extra_features, dev, "torch")
    return _render_torch(gaussians, viewmat, K, width, height, near, far, bg, render_instances, extra_features,
                         alpha_threshold, eps2d, batch, max_chunk_elements, depth_mode)


def _empty(height: int, width: int, bg: torch.Tensor, render_instances: bool, extra_features: torch.Tensor | None,
           dev: torch.device, backend: str) -> RenderOutput:
    z = torch.zeros(height, width, device=dev)
    return RenderOutput(
        rgb=bg.expand(height, width, 3).clone(), depth=z.clone(), alpha=z.clone(),
        instance_ids=torch.full((height, width), NO_INSTANCE, dtype=torch.int32, device=dev)
        if render_instances else None,
        features=torch.zeros(height, width, extra_features.shape[1], device=dev)
        if extra_features is not None else None,
        backend=backend)
