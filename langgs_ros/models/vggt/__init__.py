"""VGGT-compatible feed-forward 3-D reconstruction backbone (VGGT, arXiv 2503.11651).

Public API:

* :class:`VGGT`, :class:`VGGTConfig` (presets :meth:`VGGTConfig.vggt_1b`, :meth:`VGGTConfig.tiny`);
* :func:`pose_encoding_to_extri_intri` (camera-from-world extrinsics, pixel intrinsics);
* :func:`load_vggt_weights`, :func:`build_vggt`, :class:`WeightsNotFoundError`.

The track head of the reference is not implemented; ``track_head.*`` checkpoint keys are ignored.
"""

from langgs_ros.models.vggt.model import VGGT, VGGTConfig
from langgs_ros.models.vggt.pose_encoding import pose_encoding_to_extri_intri, quaternion_xyzw_to_matrix
from langgs_ros.models.vggt.weights import (
    DEFAULT_REPO_ID,
    IGNORED_KEY_PREFIXES,
    WeightsNotFoundError,
    build_vggt,
    load_vggt_weights,
    read_state_dict,
    resolve_checkpoint,
)

__all__ = [
    "DEFAULT_REPO_ID",
    "IGNORED_KEY_PREFIXES",
    "VGGT",
    "VGGTConfig",
    "WeightsNotFoundError",
    "build_vggt",
    "load_vggt_weights",
    "pose_encoding_to_extri_intri",
    "quaternion_xyzw_to_matrix",
    "read_state_dict",
    "resolve_checkpoint",
]
