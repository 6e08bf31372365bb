"""The ``rgbd`` backend: posed RGB-D input, reconstruction taken from the sensors.

Depth comes from the depth image (metres), intrinsics from CameraInfo / ``K.txt`` and camera-to-world poses
from TF, odometry or the dataset. Confidence is 1 for valid depth, lowered linearly beyond
``confidence_falloff_start`` metres (depth noise of structured-light / ToF sensors grows with range), 0 where
depth is invalid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from langgs_ros.reconstruction.base import Reconstructor, register_reconstructor
from langgs_ros.types import Frame, WindowReconstruction


@register_reconstructor("rgbd")
class RGBDReconstructor(Reconstructor):
    """Posed RGB-D backend.

    Args:
        device: torch device for the output tensors ("cpu", "cuda", "cuda:1", ...).
        min_depth, max_depth: valid depth range in metres; outside it confidence is 0.
        confidence_falloff_start: depth (m) beyond which confidence decreases linearly to 0.5 at ``max_depth``.
    """

    name = "rgbd"

    def __init__(self, device: str | torch.device = "cpu", min_depth: float = 0.1, max_depth: float = 10.0,
                 confidence_falloff_start: float = 4.0) -> None:
        self.device = torch.device(device)
        self.min_depth = float(min_depth)
        self.max_depth = float(max_depth)
        self.falloff = float(confidence_falloff_start)

    def reconstruct(self, frames: Sequence[Frame]) -> WindowReconstruction:
        """See :meth:`Reconstructor.reconstruct`.

        Raises:
            ValueError: empty window, mixed image sizes, or a frame without depth, intrinsics or pose.
        """
        if len(frames) == 0:
            raise ValueError("empty window: the rgbd backend needs at least one frame")
        h, w = frames[0].height, frames[0].width
        depths, Ks, poses = [], [], []
        for f in frames:
            if (f.height, f.width) != (h, w):
                raise ValueError(f"mixed image sizes in one window: {(h, w)} and {(f.height, f.width)}")
            missing = [n for n, v in (("depth", f.depth), ("intrinsics", f.intrinsics),
                                      ("world_from_camera pose", f.world_from_camera)) if v is None]
            if missing:
                raise ValueError(f"frame {f.frame_id!r}: the rgbd backend needs {', '.join(missing)}")
            d = np.asarray(f.depth, dtype=np.float32)
            if d.shape != (h, w):
                raise ValueError(f"frame {f.frame_id!r}: depth {d.shape} does not match image {(h, w)}")
            depths.append(d)
            Ks.append(np.asarray(f.intrinsics, dtype=np.float64))
            poses.append(np.asarray(f.world_from_camera, dtype=np.float64))
        depth = torch.from_numpy(np.stack(depths)).to(self.device)
        depth = torch.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0)
        valid = (depth >= self.min_depth) & (depth <= self.max_depth)
        depth = torch.where(valid, depth, torch.zeros_like(depth))
        span = max(self.max_depth - self.falloff, 1e-6)
        conf = 1.0 - 0.5 * ((depth - self.falloff) / span).clamp(0.0, 1.0)
        conf = torch.where(valid, conf, torch.zeros_like(conf))
        return WindowReconstruction(
            frames=list(frames), depth=depth, confidence=conf,
            intrinsics=torch.from_numpy(np.stack(Ks)).float().to(self.device),
            world_from_camera=torch.from_numpy(np.stack(poses)).float().to(self.device),
            frame="map", scale_is_metric=True, scale_source="depth_sensor",
        )
