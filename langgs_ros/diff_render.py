"""Differentiable rasterisation of 3D Gaussians (colour, expected depth, alpha) for photometric refinement.

One function, :func:`rasterize`, with two backends that compute the same image formation as
:func:`langgs_ros.render.render_gaussians` (3DGS, Kerbl et al., SIGGRAPH 2023, Eq. 2-3; EWA projection, Zwicker
et al. 2002) and keep the autograd graph to means, quaternions, scales, opacities and colours:

- ``"gsplat"`` (CUDA): ``gsplat.rasterization(render_mode="RGB+ED", rasterize_mode="classic")`` and its CUDA
  backward pass.
- ``"torch"`` (any device, the CPU path): gsplat's pure-PyTorch projection (``_quat_scale_to_covar_preci``,
  ``_fully_fused_projection``, differentiable) and a tiled compositor in plain tensor operations: each 16x16 tile
  takes the Gaussians whose 3.33-sigma box overlaps it (front to back by camera z of the mean, the same binning
  as :mod:`langgs_ros.render`), padded per group of tiles with similar list lengths; per pixel and Gaussian
  ``α = min(0.999, o exp(-½ dᵀ Σ'⁻¹ d))`` (0 where below 1/255 or σ < 0), ``T_i = Π_{j<i} (1 - α_j)``,
  ``w_i = α_i T_i``; a pixel stops at the first Gaussian that would bring ``T`` to ``<= 1e-4``. Autograd
  differentiates it. Memory grows with (pixels x Gaussians per tile); it is meant for the small images and
  windows a CPU can refine (tests, a down-scaled frame), the CUDA backend for robots.

Conventions: OpenCV camera axes, ``camera_from_world`` maps world points into the camera, intrinsics with pixel
centres at integer coordinates (shifted by +0.5 internally to gsplat's convention, as :mod:`langgs_ros.render`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from langgs_ros.render import (
    ALPHA_MAX,
    ALPHA_MIN,
    TILE_SIZE,
    TRANSMITTANCE_MIN,
    ProjectedGaussians,
    gsplat_cuda_available,
    tile_pairs,
)

__all__ = ["RasterOutput", "rasterize"]


@dataclass
class RasterOutput:
    """Differentiable render of one view.

    Attributes:
        rgb: (H, W, 3) float32 ``Σ w_i c_i`` (black background).
        depth: (H, W) float32 expected z-depth ``Σ w_i z_i / Σ w_i`` in metres (0 where nothing is rendered).
        alpha: (H, W) float32 accumulated opacity ``Σ w_i`` in [0, 1].
    """

    rgb: torch.Tensor
    depth: torch.Tensor
    alpha: torch.Tensor


def rasterize(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    camera_from_world: torch.Tensor,
    intrinsics: torch.Tensor,
    width: int,
    height: int,
    *,
    near: float = 0.05,
    far: float = 100.0,
    eps2d: float = 0.3,
    backend: Literal["auto", "gsplat", "torch"] = "auto",
    max_chunk_elements: int = 1 << 22,
) -> RasterOutput:
    """Render N Gaussians into one pinhole view, differentiably.

    Args:
        means: (N, 3) float32 centres in the world frame, metres.
        quats: (N, 4) float32 rotations, w-x-y-z, need not be normalised (normalised here).
        scales: (N, 3) float32 standard deviations, metres (> 0).
        opacities: (N,) float32 in [0, 1].
        colors: (N, 3) float32 RGB in [0, 1].
        camera_from_world: (4, 4) float32 world-to-camera rigid transform (OpenCV axes), same device.
        intrinsics: (3, 3) float32 pinhole K in pixels (pixel centres at integers), same device.
        width, height: image size in pixels.
        near, far: Gaussians whose mean has camera z outside (near, far) metres are not rendered.
        eps2d: 2D covariance dilation, pixels² (gsplat's low-pass filter).
        backend: ``"gsplat"`` (CUDA), ``"torch"`` (any device) or ``"auto"`` (gsplat on CUDA when its extension
            loads, else torch).
        max_chunk_elements: torch backend: bound on the (tiles, 256, Gaussians) elements of one step.

    Returns:
        :class:`RasterOutput`; gradients flow to every input that requires them.

    Raises:
        ValueError: inconsistent shapes or an unknown backend.
        RuntimeError: ``backend="gsplat"`` without CUDA or without gsplat's CUDA extension.
    """
    n = means.shape[0]
    for name, t, shape in (("means", means, (n, 3)), ("quats", quats, (n, 4)), ("scales", scales, (n, 3)),
                           ("opacities", opacities, (n,)), ("colors", colors, (n, 3)),
                           ("camera_from_world", camera_from_world, (4, 4)), ("intrinsics", intrinsics, (3, 3))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if backend not in ("auto", "gsplat", "torch"):
        raise ValueError(f"backend must be 'auto', 'gsplat' or 'torch', got {backend!r}")
    K = intrinsics.clone()
    K[0, 2] = K[0, 2] + 0.5
    K[1, 2] = K[1, 2] + 0.5
    use_gsplat = backend == "gsplat" or (backend == "auto" and means.is_cuda)
    if use_gsplat:
        ok = means.is_cuda and gsplat_cuda_available()
        if backend == "gsplat" and not ok:
            raise RuntimeError("backend='gsplat' needs tensors on a CUDA device and gsplat's CUDA extension")
        if ok:
            return _rasterize_gsplat(means, quats, scales, opacities, colors, camera_from_world, K, width, height,
                                     near, far, eps2d)
    return _rasterize_torch(means, quats, scales, opacities, colors, camera_from_world, K, width, height, near,
                            far, eps2d, max_chunk_elements)


def _rasterize_gsplat(means, quats, scales, opacities, colors, viewmat, K, width, height, near, far,
                      eps2d) -> RasterOutput:
    from gsplat import rasterization

    out, alphas, _ = rasterization(means, quats, scales, opacities, colors, viewmat[None], K[None], width, height,
                                   near_plane=near, far_plane=far, eps2d=eps2d, packed=False,
                                   rasterize_mode="classic", render_mode="RGB+ED")
    alpha = alphas[0, ..., 0]
    return RasterOutput(rgb=out[0, ..., :3], depth=out[0, ..., 3] * (alpha > 1e-6), alpha=alpha)


def _rasterize_torch(means, quats, scales, opacities, colors, viewmat, K, width, height, near, far, eps2d,
                     max_chunk_elements) -> RasterOutput:
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    dev = means.device
    tiles_x, tiles_y = math.ceil(width / TILE_SIZE), math.ceil(height / TILE_SIZE)
    n_tiles, P = tiles_x * tiles_y, TILE_SIZE * TILE_SIZE
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(means, covars, viewmat[None], K[None], width, height,
                                                                eps2d=eps2d, near_plane=near, far_plane=far)
    radii, means2d, depths, conics = radii[0], means2d[0], depths[0], conics[0]
    with torch.no_grad():
        vis = torch.nonzero((radii > 0).all(dim=-1) & (opacities >= ALPHA_MIN)).squeeze(1)
        p = ProjectedGaussians(vis, means2d[vis].detach(), conics[vis].detach(), depths[vis].detach(), radii[vis],
                               opacities[vis].detach())
        tile_ids, order = tile_pairs(p, tiles_x, tiles_y)
        counts = torch.bincount(tile_ids, minlength=n_tiles)
        starts = torch.cumsum(counts, 0) - counts
        busy = torch.nonzero(counts > 0).squeeze(1)
        busy = busy[torch.argsort(counts[busy], descending=True)]
    gi_all = vis[order]  # (pairs,) Gaussian index per (tile, Gaussian) pair
    vals = torch.cat([colors, depths[:, None]], dim=1)  # (N, 4): colour and camera z
    lp = torch.arange(P, device=dev)
    off_x = (lp % TILE_SIZE).float() + 0.5
    off_y = torch.div(lp, TILE_SIZE, rounding_mode="floor").float() + 0.5
    tiles_out: list[torch.Tensor] = []
    accs: list[torch.Tensor] = []
    g0 = 0
    while g0 < len(busy):
        kmax = int(counts[busy[g0]])
        G = max(1, min(len(busy) - g0, max_chunk_elements // (P * kmax)))
        grp = busy[g0:g0 + G]
        g0 += G
        slot = torch.arange(kmax, device=dev)[None]
        valid = slot < counts[grp, None]  # (G, K)
        gi = gi_all[torch.where(valid, starts[grp, None] + slot, torch.zeros_like(slot))]  # (G, K)
        px = (grp % tiles_x).float()[:, None] * TILE_SIZE + off_x[None]  # (G, P)
        py = torch.div(grp, tiles_x, rounding_mode="floor").float()[:, None] * TILE_SIZE + off_y[None]
        dx = means2d[gi, 0][:, None, :] - px[:, :, None]  # (G, P, K)
        dy = means2d[gi, 1][:, None, :] - py[:, :, None]
        c = conics[gi]
        sigma = 0.5 * c[:, None, :, 0] * dx * dx + c[:, None, :, 1] * dx * dy + 0.5 * c[:, None, :, 2] * dy * dy
        alpha = (opacities[gi][:, None, :] * torch.exp(-sigma.clamp(max=30.0))).clamp(max=ALPHA_MAX)
        with torch.no_grad():
            inside = (px < width) & (py < height)
            use = (sigma >= 0) & (alpha >= ALPHA_MIN) & valid[:, None, :] & inside[:, :, None]
        alpha = alpha * use
        t_incl = torch.cumprod(1.0 - alpha, dim=-1)
        t_excl = torch.cat([torch.ones_like(t_incl[..., :1]), t_incl[..., :-1]], dim=-1)
        with torch.no_grad():
            keep = t_incl > TRANSMITTANCE_MIN  # a prefix along K
        w = alpha * t_excl * keep  # (G, P, K)
        acc = torch.einsum("gpk,gkc->gpc", w, vals[gi])
        a = w.sum(dim=-1, keepdim=True)
        tiles_out.append(grp)
        accs.append(torch.cat([acc, a], dim=-1))
    out = torch.zeros(n_tiles, P, 5, device=dev, dtype=means.dtype)
    if accs:
        out = out.index_put((torch.cat(tiles_out),), torch.cat(accs))
    out = out.reshape(tiles_y, tiles_x, TILE_SIZE, TILE_SIZE, 5).transpose(1, 2)
    out = out.reshape(tiles_y * TILE_SIZE, tiles_x * TILE_SIZE, 5)[:height, :width]
    alpha_img = out[..., 4].clamp(0.0, 1.0)
    depth = torch.where(alpha_img > 1e-6, out[..., 3] / alpha_img.clamp(min=1e-6), torch.zeros_like(alpha_img))
    return RasterOutput(rgb=out[..., :3], depth=depth, alpha=alpha_img)
