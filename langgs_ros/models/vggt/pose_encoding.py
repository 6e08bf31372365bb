"""Decoding of VGGT's 9-D camera encoding into extrinsics and intrinsics (VGGT arXiv 2503.11651, Sec. 3.1).

Encoding ``absT_quaR_FoV`` (per frame, 9 values)::

    [t_x, t_y, t_z,  q_x, q_y, q_z, q_w,  fov_h, fov_w]

* ``t``: translation of the **camera-from-world** transform ``x_cam = R @ x_world + t``.
* ``q``: rotation ``R`` of the same transform as a quaternion in **(x, y, z, w)** order, scalar last.
  It is *not* normalised by the network; decoding normalises it implicitly.
* ``fov_h`` / ``fov_w``: vertical / horizontal field of view in **radians**.

Camera axes follow OpenCV: x right, y down, z forward. With trained weights the world frame is the
first frame's camera frame (learned, not enforced by the code). Intrinsics are in pixels with the
principal point at the image centre: ``fx = (W/2) / tan(fov_w/2)``, ``fy = (H/2) / tan(fov_h/2)``,
``cx = W/2``, ``cy = H/2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["pose_encoding_to_extri_intri", "quaternion_xyzw_to_matrix"]


def quaternion_xyzw_to_matrix(quat: Tensor) -> Tensor:
    """Rotation matrices from (not necessarily unit) scalar-last quaternions.

    Args:
        quat: (..., 4) quaternions ``(x, y, z, w)``; any non-zero norm (normalised here).

    Returns:
        (..., 3, 3) rotation matrices, same dtype/device, orthonormal to rounding error. A zero
        quaternion yields non-finite entries.

    Source: standard Hamilton quaternion-to-matrix formula; VGGT arXiv 2503.11651, Sec. 3.1
    (camera rotation parameterised by a quaternion).
    """
    x, y, z, w = quat.unbind(-1)
    s = 2.0 / (quat * quat).sum(-1)
    xx, yy, zz = s * x * x, s * y * y, s * z * z
    xy, xz, yz = s * x * y, s * x * z, s * y * z
    wx, wy, wz = s * w * x, s * w * y, s * w * z
    rows = (
        1.0 - (yy + zz), xy - wz, xz + wy,
        xy + wz, 1.0 - (xx + zz), yz - wx,
        xz - wy, yz + wx, 1.0 - (xx + yy),
    )  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*quat.shape[:-1], 3, 3)


def pose_encoding_to_extri_intri(
    pose_enc: Tensor, image_hw: Sequence[int] | torch.Size, build_intrinsics: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Decode VGGT pose encodings into camera-from-world extrinsics and pixel intrinsics.

    Args:
        pose_enc: (B, S, 9) (or any (..., 9)) ``absT_quaR_FoV`` encodings, see the module docstring.
        image_hw: (H, W) in pixels of the images the encoding refers to (e.g. ``images.shape[-2:]``).
        build_intrinsics: If False, return ``None`` for the intrinsics.

    Returns:
        ``(extrinsic, intrinsic)``:

        * extrinsic (..., 3, 4) ``[R | t]`` mapping world points to OpenCV camera coordinates
          (camera-from-world), same dtype as ``pose_enc``;
        * intrinsic (..., 3, 3) ``[[fx, 0, W/2], [0, fy, H/2], [0, 0, 1]]`` in pixels, or ``None``.

    Raises:
        ValueError: If the last axis is not 9 or ``image_hw`` does not have two entries.

    Source: VGGT arXiv 2503.11651, Sec. 3.1 (camera parameters g = [q, t, f]) and the reference
    ``vggt.utils.pose_enc`` conventions.
    """
    if pose_enc.shape[-1] != 9:
        raise ValueError(f"pose_enc must have 9 entries on its last axis, got {tuple(pose_enc.shape)}")
    if len(image_hw) != 2:
        raise ValueError(f"image_hw must be (H, W), got {image_hw!r}")
    H, W = (float(v) for v in image_hw)
    t = pose_enc[..., :3]
    R = quaternion_xyzw_to_matrix(pose_enc[..., 3:7])
    extrinsic = torch.cat((R, t[..., None]), dim=-1)
    if not build_intrinsics:
        return extrinsic, None
    fy = (H / 2.0) / torch.tan(pose_enc[..., 7] / 2.0)
    fx = (W / 2.0) / torch.tan(pose_enc[..., 8] / 2.0)
    zeros = torch.zeros_like(fx)
    ones = torch.ones_like(fx)
    intrinsic = torch.stack(
        (
            fx, zeros, zeros + W / 2.0,
            zeros, fy, zeros + H / 2.0,
            zeros, zeros, ones,
        ),
        dim=-1,
    ).reshape(*pose_enc.shape[:-1], 3, 3)  # fmt: skip
    return extrinsic, intrinsic
