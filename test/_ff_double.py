"""Test double of a feed-forward reconstruction network, built on ground truth of a real RGB-D sequence.

:class:`GroundTruthBackbone` implements the :class:`~langgs_ros.reconstruction.feedforward.Backbone` protocol. It
recognises which frames it is given from their pixels only (like a network: nearest thumbnail of the model-size
image among the sequence's frames) and returns, per call, the frames' ground-truth cameras and depth expressed in a
fresh random Sim(3) frame (scale log-uniform in ``scale_range``), with multiplicative Gaussian depth noise, and the
ground-truth intrinsics at the model resolution. It is a test double for the geometry pipeline around the network;
it says nothing about the network's accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from langgs_ros.reconstruction.alignment import Sim3
from langgs_ros.reconstruction.feedforward import intrinsics_to_model, preprocess_images
from langgs_ros.types import Frame

THUMB = (12, 16)


class GroundTruthBackbone:
    """Returns ground truth through a random Sim(3) per call (see module docstring).

    Args:
        frames: the sequence's frames with depth, intrinsics and ground-truth ``world_from_camera``.
        width: the model image width the reconstructor uses (for the model-grid ground truth).
        depth_noise: relative standard deviation of the multiplicative depth noise.
        scale_range: (lo, hi) of the per-call random scale.
        seed: random seed.

    Attributes:
        calls: per call, (frame indices recognised, the Sim(3) ground-truth world -> returned window frame).
    """

    def __init__(self, frames: Sequence[Frame], width: int = 518, depth_noise: float = 0.01,
                 scale_range: tuple[float, float] = (0.3, 3.0), seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.depth_noise = float(depth_noise)
        self.scale_range = scale_range
        thumbs, depths, Ks, poses = [], [], [], []
        for f in frames:
            if f.depth is None or f.intrinsics is None or f.world_from_camera is None:
                raise ValueError(f"frame {f.frame_id}: the double needs depth, intrinsics and a ground-truth pose")
            img, info = preprocess_images([f.rgb], width)
            thumbs.append(F.adaptive_avg_pool2d(img, THUMB)[0].flatten())
            d = torch.from_numpy(np.asarray(f.depth, np.float32))[None, None]
            depths.append(F.interpolate(d, size=info.model_hw, mode="nearest-exact")[0, 0])
            Ks.append(intrinsics_to_model(f.intrinsics, info))
            poses.append(np.asarray(f.world_from_camera, np.float64))
        self.thumbs = torch.stack(thumbs)
        self.depths = torch.stack(depths)
        self.Ks = np.stack(Ks)
        self.poses = np.stack(poses)
        self.calls: list[tuple[np.ndarray, Sim3]] = []

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """See :class:`~langgs_ros.reconstruction.feedforward.Backbone`."""
        t = F.adaptive_avg_pool2d(images.float().cpu(), THUMB).flatten(1)
        idx = torch.cdist(t, self.thumbs).argmin(1).numpy()
        if tuple(images.shape[-2:]) != tuple(self.depths.shape[-2:]):
            raise ValueError(f"images {tuple(images.shape)} do not have the model size {tuple(self.depths.shape)}")
        lo, hi = np.log(self.scale_range)
        sim = Sim3(float(np.exp(self.rng.uniform(lo, hi))), Rotation.random(random_state=self.rng).as_matrix(),
                   self.rng.normal(scale=2.0, size=3))
        self.calls.append((idx, sim))
        extrinsic = np.linalg.inv(sim.transform_pose(self.poses[idx]))[:, :3, :]
        d = self.depths[idx].clone()
        valid = d > 0
        noise = 1.0 + self.depth_noise * torch.from_numpy(self.rng.standard_normal(tuple(d.shape))).float()
        d = torch.where(valid, d * sim.s * noise, torch.zeros_like(d))
        conf = 1.0 + valid.float() * float(np.e)  # VGGT-style 1 + exp(x): x = 1 on valid pixels, "no confidence" off
        dev = images.device
        return {"extrinsic": torch.from_numpy(extrinsic).float().to(dev),
                "intrinsic": torch.from_numpy(self.Ks[idx]).float().to(dev),
                "depth": d.to(dev), "depth_conf": conf.to(dev)}


class OutOfMemoryOnce:
    """Wraps a backbone; its first ``predict`` raises ``torch.OutOfMemoryError`` (the real exception type)."""

    def __init__(self, inner: GroundTruthBackbone, failures: int = 1) -> None:
        self.inner = inner
        self.failures = failures
        self.sizes: list[int] = []

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raise on the first ``failures`` calls, then delegate."""
        self.sizes.append(int(images.shape[0]))
        if len(self.sizes) <= self.failures:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test double)")
        return self.inner.predict(images)


def window_indices(n: int, size: int = 8, overlap: int = 2) -> list[list[int]]:
    """Index lists of consecutive windows of ``size`` frames sharing ``overlap`` frames, covering 0..n-1."""
    out, start = [], 0
    while start < n - overlap:
        out.append(list(range(start, min(n, start + size))))
        start += size - overlap
    return out
