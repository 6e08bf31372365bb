"""Data types shared by the pipeline stages (the contracts between modules).

Data flows one way::

    Frame ─► FrameBuffer ─► window (list[Frame]) ─► Reconstructor ─► WindowReconstruction
          ─► gaussians_from_depth ─► Gaussians (per pixel, window/map frame)
          ─► SemanticSource ─► FrameSegmentation (per frame)
          ─► sparsify ─► SemanticGaussianMap.integrate ─► QueryEngine

Conventions used everywhere in the core:

- Units: metres, radians, seconds.
- Camera axes: OpenCV optical frame (x right, y down, z forward), as in REP-103 ``*_optical_frame``.
- Poses are named by the direction they map: ``world_from_camera`` (a.k.a. camera-to-world, ``T_map_cam``)
  maps camera coordinates into the world/map frame; ``camera_from_world`` is its inverse (VGGT's
  ``extrinsic``). Homogeneous 4x4 float64 numpy arrays on the CPU side, float32 torch tensors on devices.
- Intrinsics: 3x3 pinhole matrix ``K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` in pixels, for the image's own
  pixel grid (pixel centres at integer coordinates).
- Depth: z-depth along the optical axis in metres, float32; 0, NaN or inf mean "no measurement".
- 3DGS parameters (see ``../shared/docs/conventions.md``): ``means`` (N,3) metres, ``quats`` (N,4) unit
  quaternions in **w, x, y, z** order, ``scales`` (N,3) standard deviations in metres (linear, activated),
  ``opacities`` (N,) in [0, 1] (activated), ``colors`` (N,3) linear RGB in [0, 1] (the band-0 SH value is
  ``(rgb - 0.5) / C0``; conversion happens only at the PLY boundary).
- Instance ids: int32, ``-1`` = no instance (background / unlabelled).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

NO_INSTANCE = -1
"""Instance id of Gaussians/pixels that belong to no object instance."""


@dataclass
class Frame:
    """One camera frame as it enters the pipeline.

    Attributes:
        rgb: (H, W, 3) uint8 colour image, RGB order.
        stamp: capture time in seconds (ROS time or dataset time).
        frame_id: a name for the frame (image file stem, or ``<camera frame>@<stamp>`` from ROS).
        depth: optional (H, W) float32 z-depth in metres on the colour image's pixel grid; 0/NaN/inf invalid.
        intrinsics: optional (3, 3) float64 pinhole matrix K in pixels for the colour image.
        world_from_camera: optional (4, 4) float64 camera-to-world pose (OpenCV optical axes) in the map /
            odometry frame; ``None`` in unposed mode.
        labels: optional (H, W) int32 label image aligned with ``rgb`` (0 = unlabelled, i = label id), for the
            ``labels`` semantic source.
        label_names: optional mapping label id -> name for ``labels``.
    """

    rgb: np.ndarray
    stamp: float
    frame_id: str = ""
    depth: np.ndarray | None = None
    intrinsics: np.ndarray | None = None
    world_from_camera: np.ndarray | None = None
    labels: np.ndarray | None = None
    label_names: dict[int, str] | None = None

    @property
    def height(self) -> int:
        """Image height in pixels."""
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        """Image width in pixels."""
        return int(self.rgb.shape[1])


@dataclass
class WindowReconstruction:
    """Output of a :class:`~langgs_ros.reconstruction.base.Reconstructor` for a window of S frames.

    All tensors are on the reconstructor's device, float32.

    Attributes:
        frames: the S input frames (images are taken from here for colour and semantics).
        depth: (S, H, W) z-depth in metres (or in the window's arbitrary scale before alignment); 0 invalid.
        confidence: (S, H, W) per-pixel confidence in [0, 1] (1 = fully trusted); 0 where depth is invalid.
        intrinsics: (S, 3, 3) pinhole matrices in pixels for the (H, W) grid of ``depth``.
        world_from_camera: (S, 4, 4) camera-to-world poses of the frames in the window's frame ``frame``.
        frame: name of the frame the poses are expressed in (``"map"`` once aligned; ``"window"`` for an
            unposed window before alignment).
        scale_is_metric: whether depth and translations are in metres.
        residuals: optional diagnostics from alignment (e.g. ``{"ate_m": ..., "scale": ...}``).
        scale_source: where the scale comes from: ``"depth_sensor"``, ``"odometry"``, ``"camera_height"`` (a
            declared prior: metres if the prior is right), ``"none"`` (arbitrary units) or ``"unknown"``.
        map_correction: optional (4, 4) float64 similarity ``map_new <- map_old`` (``[[s R, t], [0, 1]]``, t in
            metres) that must be applied to the existing map before this window is fused: the backend re-levelled
            and re-scaled an unposed map (new floor / up / camera-height estimate). This window's poses and depth
            are already in ``map_new``.
    """

    frames: list[Frame]
    depth: torch.Tensor
    confidence: torch.Tensor
    intrinsics: torch.Tensor
    world_from_camera: torch.Tensor
    frame: str = "map"
    scale_is_metric: bool = True
    residuals: dict[str, float] = field(default_factory=dict)
    scale_source: str = "unknown"
    map_correction: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.depth.shape[0])


@dataclass
class Gaussians:
    """A set of N 3D Gaussians with semantics (3DGS parameterisation, activated values).

    Attributes:
        means: (N, 3) float32 centres in metres (map/window frame).
        quats: (N, 4) float32 unit rotation quaternions, **w, x, y, z** order (world-from-Gaussian rotation).
        scales: (N, 3) float32 standard deviations along the Gaussian's local axes, metres (linear, not log).
        opacities: (N,) float32 in [0, 1].
        colors: (N, 3) float32 RGB in [0, 1].
        instance_ids: (N,) int32 instance ids; ``NO_INSTANCE`` (-1) for none. In per-frame Gaussians these are
            the frame segmentation's local ids; in the map they are map instance ids.
        weights: optional (N,) float32 accumulated merge weights (moment-matching mass) used by fusion.
    """

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor
    instance_ids: torch.Tensor
    weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.means.shape[0])

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.means.device

    def to(self, device: torch.device | str) -> Gaussians:
        """Copy to ``device``."""
        return Gaussians(
            *(t.to(device) for t in (self.means, self.quats, self.scales, self.opacities, self.colors,
                                     self.instance_ids)),
            weights=None if self.weights is None else self.weights.to(device),
        )

    def select(self, index: torch.Tensor) -> Gaussians:
        """Subset by a boolean mask or integer index tensor."""
        return Gaussians(
            self.means[index], self.quats[index], self.scales[index], self.opacities[index],
            self.colors[index], self.instance_ids[index],
            weights=None if self.weights is None else self.weights[index],
        )

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> Gaussians:
        """A set with N = 0."""
        f = dict(dtype=torch.float32, device=device)
        return Gaussians(
            torch.zeros(0, 3, **f), torch.zeros(0, 4, **f), torch.zeros(0, 3, **f), torch.zeros(0, **f),
            torch.zeros(0, 3, **f), torch.zeros(0, dtype=torch.int32, device=device),
            weights=torch.zeros(0, **f),
        )

    @staticmethod
    def cat(parts: list[Gaussians]) -> Gaussians:
        """Concatenate sets (weights kept only if every part has them)."""
        if not parts:
            return Gaussians.empty()
        has_w = all(p.weights is not None for p in parts)
        return Gaussians(
            torch.cat([p.means for p in parts]), torch.cat([p.quats for p in parts]),
            torch.cat([p.scales for p in parts]), torch.cat([p.opacities for p in parts]),
            torch.cat([p.colors for p in parts]), torch.cat([p.instance_ids for p in parts]),
            weights=torch.cat([p.weights for p in parts]) if has_w else None,  # type: ignore[misc]
        )


@dataclass
class FrameSegmentation:
    """Semantic lifting result for one frame: per-pixel instance ids and per-instance embeddings.

    Attributes:
        instance_ids: (H, W) int32 local instance id per pixel (0..K-1), ``NO_INSTANCE`` (-1) for none.
        embeddings: (K, D) float32 L2-normalised embeddings in the query encoder's space; row k = instance k.
        names: K names (``None`` when unknown, e.g. SAM masks).
        class_ids: optional K ints, the source's label/class id per instance (``labels`` source).
    """

    instance_ids: np.ndarray
    embeddings: torch.Tensor
    names: list[str | None]
    class_ids: list[int] | None = None

    @property
    def num_instances(self) -> int:
        """K, the number of instances."""
        return int(self.embeddings.shape[0])


@dataclass
class InstanceTable:
    """The object instances of a map (the semantic half of FLEG's hierarchy: embeddings per instance).

    K instances; row k describes instance ``ids[k]``. Boxes are gravity-aligned: yaw about the map's
    ``up`` axis. All arrays are CPU numpy unless stated.

    Attributes:
        ids: (K,) int32 map instance ids (>= 0, unique, stable while the instance exists).
        embeddings: (K, D) float32 torch tensor, L2-normalised, in the map's encoder space.
        names: K names (``None`` when unknown).
        centers: (K, 3) float64 opacity-weighted centroids in the map frame, metres.
        sizes: (K, 3) float64 box extents along box x, box y (horizontal) and up (vertical), metres.
        yaws: (K,) float64 box yaw about ``up`` in radians (see :func:`langgs_ros.geometry.yaw_frame`).
        num_gaussians: (K,) int64 supporting map Gaussians.
        observations: (K,) float64 accumulated observation weight (how often / how much it was seen).
    """

    ids: np.ndarray
    embeddings: torch.Tensor
    names: list[str | None]
    centers: np.ndarray
    sizes: np.ndarray
    yaws: np.ndarray
    num_gaussians: np.ndarray
    observations: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @staticmethod
    def empty(dim: int) -> InstanceTable:
        """A table with K = 0 and embedding dimension ``dim``."""
        return InstanceTable(
            ids=np.zeros(0, np.int32), embeddings=torch.zeros(0, dim), names=[],
            centers=np.zeros((0, 3)), sizes=np.zeros((0, 3)), yaws=np.zeros(0),
            num_gaussians=np.zeros(0, np.int64), observations=np.zeros(0),
        )


@dataclass
class MapSnapshot:
    """An immutable, self-consistent copy of the map for readers (query engine, publishers, persistence).

    Attributes:
        gaussians: the map Gaussians (CPU tensors), ``instance_ids`` = map instance ids.
        instances: the instance table.
        encoder_id: embedding space of ``instances.embeddings`` (see :class:`TextEncoder`).
        up: (3,) float64 unit gravity-up vector in the map frame (``[0, 0, 1]`` for a REP-103 ``map``).
        frame_id: name of the map frame (``"map"``).
        camera_positions: (P, 3) float64 camera centres visited, map frame, metres (for approach poses).
        floor_height: height of the floor along ``up`` (``up · p`` at the floor), metres, or ``None``.
        stamp: time of the last update in seconds.
        version: increments with each map update.
        scale_is_metric: whether the map's units are metres measured by a sensor (depth, odometry/tf); False for
            unposed maps scaled by a prior or not at all.
        scale_source: see :attr:`WindowReconstruction.scale_source` (``"unknown"`` for maps saved before it
            was recorded).
    """

    gaussians: Gaussians
    instances: InstanceTable
    encoder_id: str
    up: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))
    frame_id: str = "map"
    camera_positions: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    floor_height: float | None = None
    stamp: float = 0.0
    version: int = 0
    scale_is_metric: bool = True
    scale_source: str = "unknown"
