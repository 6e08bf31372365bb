"""Photometric refinement of a window's Gaussians against the window's frames (optional, off by default).

A few hundred Adam steps on colour, opacity, scale, rotation and mean, rendering the window's frames with the
differentiable rasteriser (:func:`langgs_ros.diff_render.rasterize`: gsplat on CUDA, the PyTorch tiled compositor
elsewhere, one code path), as the mapping step of SplaTAM (Keetha et al., CVPR 2024, Sec. 3.4) and MonoGS
(Matsuki et al., CVPR 2024, Sec. 3.3) does. The loss per step, on one frame (frames taken in turn), over its
pixels with valid sensor depth ``V``:

``L = mean_V |rgb − I| + depth_weight · mean_{V ∩ {alpha > 0.5}} |depth − D|``  (colour in [0, 1], depth in m),

i.e. SplaTAM's L1 colour + L1 depth (their silhouette mask is our ``alpha > 0.5``). With ``exposure`` on, the
rendered colour of frame ``i > 0`` is first mapped by a per-frame, per-channel affine ``a_i ⊙ rgb + b_i``
(optimised with the Gaussians; frame 0 of the window is the reference, ``a_0 = 1, b_0 = 0``), so auto-exposure
changes between frames are absorbed there instead of being baked into the colours (the per-image exposure
compensation of Mip-NeRF 360-style appearance codes / MonoGS's affine brightness). Parameters are optimised in
unconstrained form (logit opacity, log scale, raw quaternion, clamped colour) and kept within bounds after each
step: each mean within ``max_mean_shift`` metres of where it started (the map's voxel keys stay meaningful),
scales ≥ ``min_scale``. Instance ids and merge weights are not touched. The loop stops after ``steps`` steps or
``max_seconds``, whichever comes first (checked before each step), so a window's time is bounded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from langgs_ros.diff_render import rasterize
from langgs_ros.gaussians import rgb_on_grid
from langgs_ros.types import Gaussians, WindowReconstruction

if TYPE_CHECKING:
    from langgs_ros.fusion import SemanticGaussianMap

__all__ = ["RefineConfig", "RefineStats", "refine_gaussians", "refine_window", "view_counts"]


@dataclass
class RefineConfig:
    """Photometric refinement settings (:mod:`langgs_ros.refine`).

    Attributes:
        steps: Adam steps per window; 0 turns refinement off (the default).
        max_seconds: wall-clock bound per window, seconds (checked before each step).
        lr_means: learning rate of the means, metres per step (Adam's step size).
        lr_colors: learning rate of the RGB colours (in [0, 1]).
        lr_opacities: learning rate of the opacity logits.
        lr_scales: learning rate of the log scales.
        lr_quats: learning rate of the (unnormalised) quaternions.
        depth_weight: weight of the L1 depth term (per metre) against the L1 colour term.
        exposure: optimise a per-frame affine colour (exposure) for every frame but the first (see the module
            docstring); ``lr_exposure`` its learning rate.
        max_mean_shift: a mean stays within this many metres of its starting point (per axis).
        min_scale: lower bound on every scale, metres.
        downscale: render at 1/downscale of the frames' resolution (area-averaged images, scaled intrinsics;
            integer ≥ 1): the CPU path's cost is linear in pixels.
        max_gaussians: at most this many Gaussians are refined per window (the ones seen by most frames are
            kept; the rest are left as they are), bounding memory.
    """

    steps: int = 0
    max_seconds: float = 2.0
    lr_means: float = 2e-4
    lr_colors: float = 0.01
    lr_opacities: float = 0.05
    lr_scales: float = 0.01
    lr_quats: float = 0.002
    depth_weight: float = 1.0
    exposure: bool = True
    lr_exposure: float = 0.01
    max_mean_shift: float = 0.02
    min_scale: float = 1e-4
    downscale: int = 1
    max_gaussians: int = 300_000

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")
        for name in ("lr_means", "lr_colors", "lr_opacities", "lr_scales", "lr_quats", "lr_exposure", "depth_weight",
                     "max_mean_shift", "min_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")
        if int(self.downscale) != self.downscale or self.downscale < 1:
            raise ValueError(f"downscale must be an integer >= 1, got {self.downscale}")
        if self.max_gaussians < 1:
            raise ValueError(f"max_gaussians must be >= 1, got {self.max_gaussians}")


@dataclass
class RefineStats:
    """What one refinement did.

    Attributes:
        steps: Adam steps taken.
        seconds: wall-clock time, seconds.
        gaussians: Gaussians optimised.
        loss_first: mean loss of the first pass over the frames (first ``S`` steps).
        loss_last: mean loss of the last pass over the frames.
        skipped: why nothing was written back ("" when the refinement was applied): ``"diverged"`` (a
            non-finite loss or parameter: the input is returned unchanged) or ``"out of memory"``.
    """

    steps: int = 0
    seconds: float = 0.0
    gaussians: int = 0
    loss_first: float = float("nan")
    loss_last: float = float("nan")
    skipped: str = ""


def _tensor(x: torch.Tensor | np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A copy of ``x`` as a ``dtype`` tensor on ``device`` (never an inference-mode tensor of the caller's)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float64))
    return t.to(device=device, dtype=dtype).clone()


def _downscale(images: torch.Tensor, depths: torch.Tensor, intrinsics: torch.Tensor,
               factor: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Area-average images, average valid depths, and scale intrinsics (pixel centres at integers)."""
    if factor == 1:
        return images, depths, intrinsics
    img = F.avg_pool2d(images.permute(0, 3, 1, 2), factor).permute(0, 2, 3, 1)
    valid = (depths > 0).float()[:, None]
    cnt = F.avg_pool2d(valid, factor)
    dep = torch.where(cnt > 0.5, F.avg_pool2d(depths[:, None] * valid, factor) / cnt.clamp(min=1e-6),
                      torch.zeros_like(cnt))[:, 0]
    K = intrinsics.clone()
    K[:, :2, :2] /= factor
    K[:, :2, 2] = (K[:, :2, 2] + 0.5) / factor - 0.5
    return img, dep, K


def refine_gaussians(
    gaussians: Gaussians,
    images: torch.Tensor,
    depths: torch.Tensor,
    world_from_camera: torch.Tensor | np.ndarray,
    intrinsics: torch.Tensor | np.ndarray,
    config: RefineConfig,
    *,
    backend: str = "auto",
) -> tuple[Gaussians, RefineStats]:
    """Refine Gaussians photometrically against S posed RGB-D frames (see the module docstring for the loss).

    Args:
        gaussians: N Gaussians in the frames' world frame (activated parameters); their device sets where the
            optimisation runs.
        images: (S, H, W, 3) float RGB in [0, 1] (uint8 0..255 accepted).
        depths: (S, H, W) float z-depth in metres, 0 where invalid (only valid pixels enter the loss).
        world_from_camera: (S, 4, 4) camera-to-world rigid poses (OpenCV optical axes), metres.
        intrinsics: (S, 3, 3) pinhole K in pixels of the (H, W) grid.
        config: :class:`RefineConfig` (``steps == 0`` returns the input unchanged).
        backend: rasteriser backend of :func:`~langgs_ros.diff_render.rasterize`.

    Returns:
        ``(refined, stats)``: new :class:`~langgs_ros.types.Gaussians` (same order, instance ids and weights as
        the input; detached tensors) and :class:`RefineStats`. If the optimisation diverges (a non-finite loss or
        parameter) the input itself is returned and ``stats.skipped == "diverged"``.

    Raises:
        ValueError: inconsistent shapes or non-finite inputs.
    """
    dev = gaussians.device
    imgs = torch.as_tensor(images).to(dev)
    imgs = imgs.float() / 255.0 if imgs.dtype == torch.uint8 else imgs.float().clone()
    deps = _tensor(depths, dev, torch.float32)
    T = _tensor(world_from_camera, dev, torch.float64)
    K = _tensor(intrinsics, dev, torch.float32)
    if imgs.ndim != 4 or imgs.shape[-1] != 3:
        raise ValueError(f"images must be (S, H, W, 3), got {tuple(imgs.shape)}")
    S, H, W = imgs.shape[:3]
    if deps.shape != (S, H, W) or T.shape != (S, 4, 4) or K.shape != (S, 3, 3):
        raise ValueError(f"depths (S, H, W), world_from_camera (S, 4, 4) and intrinsics (S, 3, 3) must match "
                         f"images {tuple(imgs.shape)}; got {tuple(deps.shape)}, {tuple(T.shape)}, {tuple(K.shape)}")
    if not (torch.isfinite(imgs).all() and torch.isfinite(deps).all() and torch.isfinite(T).all()
            and torch.isfinite(K).all()):
        raise ValueError("images, depths, poses and intrinsics must be finite")
    stats = RefineStats(gaussians=len(gaussians))
    if config.steps == 0 or len(gaussians) == 0 or S == 0:
        stats.gaussians = 0
        return gaussians, stats
    t0 = time.perf_counter()
    imgs, deps, K = _downscale(imgs, deps, K, int(config.downscale))
    H, W = imgs.shape[1:3]
    viewmats = torch.linalg.inv(T).float()
    valid = deps > 0

    with torch.enable_grad():
        means0 = gaussians.means.detach().clone().float()
        means = means0.clone().requires_grad_()
        quats = gaussians.quats.detach().clone().float().requires_grad_()
        log_scales = gaussians.scales.detach().float().clamp(min=config.min_scale).log().requires_grad_()
        logit_op = torch.logit(gaussians.opacities.detach().float().clamp(1e-4, 1 - 1e-4)).requires_grad_()
        colors = gaussians.colors.detach().clone().float().requires_grad_()
        gain = torch.ones(S, 3, device=dev).requires_grad_()  # per-frame exposure a_i, b_i (frame 0 fixed)
        bias = torch.zeros(S, 3, device=dev).requires_grad_()
        groups = [
            {"params": [means], "lr": config.lr_means},
            {"params": [quats], "lr": config.lr_quats},
            {"params": [log_scales], "lr": config.lr_scales},
            {"params": [logit_op], "lr": config.lr_opacities},
            {"params": [colors], "lr": config.lr_colors},
        ]
        use_exposure = config.exposure and S > 1
        if use_exposure:
            groups.append({"params": [gain, bias], "lr": config.lr_exposure})
        opt = torch.optim.Adam(groups, eps=1e-15)
        losses: list[float] = []
        log_min = math.log(config.min_scale)
        for step in range(config.steps):
            if time.perf_counter() - t0 > config.max_seconds:
                break
            i = step % S
            out = rasterize(means, quats, log_scales.exp(), torch.sigmoid(logit_op), colors, viewmats[i], K[i], W, H,
                            backend=backend)  # type: ignore[arg-type]
            v = valid[i]
            if not bool(v.any()):
                continue
            rgb = out.rgb * gain[i] + bias[i] if use_exposure and i > 0 else out.rgb
            loss = (rgb[v] - imgs[i][v]).abs().mean()
            dm = v & (out.alpha > 0.5)
            if config.depth_weight > 0 and bool(dm.any()):
                loss = loss + config.depth_weight * (out.depth[dm] - deps[i][dm]).abs().mean()
            if not bool(torch.isfinite(loss)):
                stats.skipped = "diverged"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                means.copy_(torch.maximum(torch.minimum(means, means0 + config.max_mean_shift),
                                          means0 - config.max_mean_shift))
                log_scales.clamp_(min=log_min)
                colors.clamp_(0.0, 1.0)
            losses.append(float(loss.detach()))
            stats.steps += 1
    if losses:
        k = min(S, len(losses))
        stats.loss_first = float(np.mean(losses[:k]))
        stats.loss_last = float(np.mean(losses[-k:]))
    with torch.no_grad():
        q = quats.detach()
        q = q / q.norm(dim=1, keepdim=True).clamp(min=1e-12)
        q = torch.where(q[:, :1] < 0, -q, q)
        refined = Gaussians(means.detach().clone(), q, log_scales.detach().exp(),
                            torch.sigmoid(logit_op.detach()), colors.detach().clone(), gaussians.instance_ids.clone(),
                            weights=None if gaussians.weights is None else gaussians.weights.clone())
        finite = all(bool(torch.isfinite(t).all()) for t in (refined.means, refined.quats, refined.scales,
                                                               refined.opacities, refined.colors))
    stats.seconds = time.perf_counter() - t0
    if stats.skipped or not finite:
        stats.skipped = "diverged"
        return gaussians, stats
    return refined, stats


def view_counts(means: torch.Tensor, world_from_camera: np.ndarray | torch.Tensor,
                intrinsics: np.ndarray | torch.Tensor, width: int, height: int, near: float = 0.05,
                far: float = 100.0) -> torch.Tensor:
    """How many of S camera frusta each mean lies in.

    Args:
        means: (N, 3) float32 world points, metres.
        world_from_camera: (S, 4, 4) camera-to-world poses (OpenCV axes), metres.
        intrinsics: (S, 3, 3) pinhole K of the (height, width) images, pixel centres at integers.
        width, height: image size in pixels.
        near, far: camera z range, metres.

    Returns:
        (N,) int32 counts on ``means``' device.
    """
    dev = means.device
    T = _tensor(world_from_camera, dev, torch.float64)
    K = _tensor(intrinsics, dev, torch.float64)
    counts = torch.zeros(means.shape[0], dtype=torch.int32, device=dev)
    m = means.double()
    for i in range(T.shape[0]):
        cam = (m - T[i, :3, 3]) @ T[i, :3, :3]
        z = cam[:, 2]
        u = K[i, 0, 0] * cam[:, 0] / z.clamp(min=1e-9) + K[i, 0, 2]
        v = K[i, 1, 1] * cam[:, 1] / z.clamp(min=1e-9) + K[i, 1, 2]
        counts += ((z > near) & (z < far) & (u > -0.5) & (u < width - 0.5) & (v > -0.5)
                   & (v < height - 0.5)).int()
    return counts


def refine_window(gaussian_map: SemanticGaussianMap, rec: WindowReconstruction, config: RefineConfig, *,
                  backend: str = "auto") -> RefineStats:
    """Refine the map's Gaussians seen by a fused window against that window's frames, in place.

    Takes the Gaussians whose means lie in at least one of the window's views (at most ``config.max_gaussians``,
    those seen by the most frames first) with :meth:`SemanticGaussianMap.gaussians_in_view`, runs
    :func:`refine_gaussians` on the window's colour images (resized to the depth grid when they differ) and depth
    (``rec.depth``: the sensor's, or the reconstructor's aligned prediction) at ``rec.world_from_camera``, and
    writes the result back with :meth:`SemanticGaussianMap.update_gaussians` (voxel keys, instance ids and merge
    weights unchanged; means move at most ``config.max_mean_shift``).

    Args:
        gaussian_map: the map the window was just fused into.
        rec: the window's reconstruction (map frame), as fused.
        config: :class:`RefineConfig`; ``steps == 0`` does nothing.
        backend: rasteriser backend (:func:`~langgs_ros.diff_render.rasterize`).

    Returns:
        :class:`RefineStats`; a diverged or out-of-memory refinement leaves the map as fused (``skipped`` says
        which), it never raises for it.
    """
    if config.steps == 0 or len(rec) == 0:
        return RefineStats()
    H, W = int(rec.depth.shape[1]), int(rec.depth.shape[2])
    rows, g = gaussian_map.gaussians_in_view(rec.world_from_camera, rec.intrinsics, W, H, config.max_gaussians)
    if len(rows) == 0:
        return RefineStats()
    dev = g.device
    imgs = [rgb_on_grid(f.rgb, H, W, dev) for f in rec.frames]
    imgs = [t.float() / 255.0 if t.dtype == torch.uint8 else t.float() for t in imgs]
    try:
        refined, stats = refine_gaussians(g, torch.stack(imgs), rec.depth.to(dev), rec.world_from_camera.to(dev),
                                          rec.intrinsics.to(dev), config, backend=backend)
    except torch.OutOfMemoryError:  # the window is fused already; it just stays unrefined
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return RefineStats(gaussians=len(rows), skipped="out of memory")
    if stats.steps and not stats.skipped:
        gaussian_map.update_gaussians(rows, refined)
    return stats
