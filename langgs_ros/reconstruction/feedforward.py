"""The ``feedforward`` backend: unposed, uncalibrated frames through a VGGT-class network, aligned into the map.

Per window of S frames (:meth:`FeedForwardReconstructor.reconstruct`):

1. **Preprocess** as VGGT's own ``load_and_preprocess_images`` (mode ``"crop"``, facebookresearch/vggt
   ``vggt/utils/load_fn.py``): resize to width ``image_width`` (518 for the released model) and height
   ``round(H · image_width / W / 14) · 14`` (bicubic, antialiased), centre-crop the height to ``image_width``
   if it is larger (portrait images); RGB in [0, 1].
2. **Backbone** (:class:`Backbone` protocol; :class:`VGGTBackbone` wraps :class:`~langgs_ros.models.vggt.VGGT`)
   under ``torch.inference_mode()`` (autocast to bfloat16/float16 on CUDA; the heads run in float32): camera-
   from-window extrinsics, pixel intrinsics, depth and depth confidence at the model resolution.
3. **Back to the input grid**: depth by validity-normalised bilinear interpolation (pixels whose 3x3 model-pixel
   neighbourhood spans a relative depth jump above ``max_depth_jump`` are invalidated: no "flying pixels"
   across depth edges), confidence bilinearly, intrinsics by the inverse resize
   (``f = f' / s``, ``c = (c' + 0.5 + crop) / s - 0.5`` per axis, pixel centres at integer coordinates).
4. **Camera info** (``camera_info``): ``"replace"`` (default) — where a frame has a CameraInfo K, it replaces the
   predicted intrinsics and the predicted depth is multiplied by the focal ratio ``f_real / f_pred`` (mean of
   x and y). Under a pinhole model the lateral extent of the depth map, ``X = (u - c_x) z / f``, is then
   preserved: image-plane sizes are well determined by the network, while focal length and depth are
   correlated (the focal-depth ambiguity of single views). ``"check"`` keeps the prediction and only logs the
   relative focal error; ``"ignore"`` uses the prediction silently. The relative error is reported in the
   residuals (``focal_rel_err``) in every mode.
5. **Confidence** to [0, 1]: VGGT's ``depth_conf = 1 + exp(x) > 1`` (arXiv 2503.11651, Sec. 3.3, aleatoric
   uncertainty); with ``c = depth_conf - 1 > 0`` and ``m`` the median of ``c`` over the window's valid pixels,
   ``confidence = min(1, c / m)`` (per-window normalised: the better half of the pixels is fully trusted, the
   rest down-weighted in proportion; the network's confidence has no absolute unit). Pixels below
   ``min_confidence`` get depth 0 and confidence 0.
6. **Poses**: extrinsics are inverted to camera-to-window poses, then placed into the map frame by a
   :class:`~langgs_ros.reconstruction.alignment.WindowAligner` (Sim(3) through shared frames; metric scale and
   gravity from odometry when frames carry ``world_from_camera`` poses). Depth is multiplied by the Sim(3) scale.

Memory: intermediates are released after each window (``torch.cuda.empty_cache()`` on CUDA). On
``torch.OutOfMemoryError`` the window is split into two halves sharing one frame (recursively), each half is
reconstructed on its own and the second is aligned to the first through the shared frame; counted in
:attr:`FeedForwardReconstructor.oom_fallbacks`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from langgs_ros.reconstruction.alignment import (
    AlignerConfig,
    AlignmentError,
    WindowAligner,
    WindowAlignment,
    fit_shared_frames,
    frame_key,
    sample_frame_geometry,
)
from langgs_ros.reconstruction.base import Reconstructor, register_reconstructor
from langgs_ros.types import Frame, WindowReconstruction

log = logging.getLogger(__name__)

__all__ = [
    "Backbone",
    "FeedForwardReconstructor",
    "PreprocessInfo",
    "VGGTBackbone",
    "confidence_to_unit",
    "intrinsics_to_input",
    "intrinsics_to_model",
    "plan_preprocess",
    "preprocess_images",
    "resample_depth_to_input",
    "resample_to_input",
]

PATCH_SIZE = 14
"""VGGT's patch size in pixels: model image sides must be multiples of it."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class PreprocessInfo:
    """Geometry of the input -> model image mapping (pixel centres at integer coordinates).

    Attributes:
        input_hw: (H, W) of the input images.
        resized_hw: (h_r, w) after resizing, before the centre crop.
        crop_top: rows removed at the top by the centre crop (0 for landscape images).
        model_hw: (h, w) of the model input (``h = min(h_r, max_height)``), multiples of 14.
    """

    input_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    crop_top: int
    model_hw: tuple[int, int]

    @property
    def sx(self) -> float:
        """Horizontal resize factor (model pixels per input pixel)."""
        return self.resized_hw[1] / self.input_hw[1]

    @property
    def sy(self) -> float:
        """Vertical resize factor (model pixels per input pixel)."""
        return self.resized_hw[0] / self.input_hw[0]


def plan_preprocess(input_hw: tuple[int, int], width: int = 518, max_height: int | None = None) -> PreprocessInfo:
    """The VGGT "crop" preprocessing geometry for an image size.

    ``w = width``, ``h_r = max(14, round(H · w / W / 14) · 14)``; the height is centre-cropped to ``max_height``
    (default ``width``, as VGGT) when larger.

    Raises:
        ValueError: ``width`` not a positive multiple of 14, or an empty input size.
    """
    H, W = int(input_hw[0]), int(input_hw[1])
    if width < PATCH_SIZE or width % PATCH_SIZE:
        raise ValueError(f"image_width must be a positive multiple of {PATCH_SIZE}, got {width}")
    if H <= 0 or W <= 0:
        raise ValueError(f"empty image size {input_hw}")
    max_h = width if max_height is None else int(max_height)
    h_r = max(PATCH_SIZE, round(H * width / W / PATCH_SIZE) * PATCH_SIZE)
    h = min(h_r, max(PATCH_SIZE, max_h // PATCH_SIZE * PATCH_SIZE))
    return PreprocessInfo((H, W), (h_r, width), (h_r - h) // 2, (h, width))


def preprocess_images(rgbs: Sequence[np.ndarray], width: int = 518, device: str | torch.device = "cpu",
                      max_height: int | None = None) -> tuple[torch.Tensor, PreprocessInfo]:
    """Resize a window's images for VGGT (see :func:`plan_preprocess`).

    Args:
        rgbs: S images (H, W, 3) uint8 RGB of one size.
        width: model image width in pixels (multiple of 14).
        device: where the resize runs and the result lives.
        max_height: crop limit (default ``width``).

    Returns:
        ``(images (S, 3, h, w) float32 in [0, 1] on device, info)``.

    Raises:
        ValueError: no images, mixed sizes, not (H, W, 3) uint8, or a bad width.
    """
    if len(rgbs) == 0:
        raise ValueError("no images to preprocess")
    shape = np.asarray(rgbs[0]).shape
    for im in rgbs:
        a = np.asarray(im)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise ValueError(f"images must be (H, W, 3) uint8, got {a.shape} {a.dtype}")
        if a.shape != shape:
            raise ValueError(f"mixed image sizes in one window: {shape[:2]} and {a.shape[:2]}")
    info = plan_preprocess((shape[0], shape[1]), width, max_height)
    x = torch.from_numpy(np.stack([np.ascontiguousarray(im) for im in rgbs])).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    x = F.interpolate(x, size=info.resized_hw, mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    h = info.model_hw[0]
    if h != info.resized_hw[0]:
        x = x[:, :, info.crop_top:info.crop_top + h]
    return x.contiguous(), info


def intrinsics_to_model(K: np.ndarray, info: PreprocessInfo) -> np.ndarray:
    """Input-grid intrinsics (..., 3, 3) -> model-grid: ``f' = s f``, ``c' = s (c + 0.5) - 0.5 - crop``."""
    K = np.asarray(K, dtype=np.float64)
    out = np.array(K, copy=True)
    out[..., 0, :] *= info.sx
    out[..., 1, :] *= info.sy
    out[..., 0, 2] = info.sx * (K[..., 0, 2] + 0.5) - 0.5
    out[..., 1, 2] = info.sy * (K[..., 1, 2] + 0.5) - 0.5 - info.crop_top
    return out


def intrinsics_to_input(K: np.ndarray, info: PreprocessInfo) -> np.ndarray:
    """Model-grid intrinsics (..., 3, 3) -> input-grid (inverse of :func:`intrinsics_to_model`)."""
    K = np.asarray(K, dtype=np.float64)
    out = np.array(K, copy=True)
    out[..., 0, :] /= info.sx
    out[..., 1, :] /= info.sy
    out[..., 0, 2] = (K[..., 0, 2] + 0.5) / info.sx - 0.5
    out[..., 1, 2] = (K[..., 1, 2] + 0.5 + info.crop_top) / info.sy - 0.5
    return out


def _uncrop(x: torch.Tensor, info: PreprocessInfo) -> torch.Tensor:
    """(S, h, w) model grid -> (S, h_r, w) resized grid, zeros in the cropped rows."""
    pad = info.resized_hw[0] - info.model_hw[0]
    if pad == 0:
        return x
    return F.pad(x, (0, 0, info.crop_top, pad - info.crop_top))


def resample_to_input(x: torch.Tensor, info: PreprocessInfo) -> torch.Tensor:
    """Bilinear (S, h, w) model grid -> (S, H, W) input grid (cropped rows read as 0)."""
    y = _uncrop(x.float(), info)[:, None]
    return F.interpolate(y, size=info.input_hw, mode="bilinear", align_corners=False)[:, 0]


def resample_depth_to_input(depth: torch.Tensor, info: PreprocessInfo, max_depth_jump: float = 0.1) -> torch.Tensor:
    """Depth (S, h, w) model grid -> (S, H, W) input grid without mixing valid and invalid pixels.

    ``z = bilinear(z · v) / bilinear(v)`` where all four bilinear neighbours are valid (``v = 1`` for finite
    positive depth), else 0. Pixels whose nearest model pixel has a 3x3 neighbourhood with ``max / min - 1 >
    max_depth_jump`` lie on a depth edge and are set to 0 (0 disables this test).

    Returns:
        (S, H, W) float32 depth; 0 = invalid.
    """
    d = depth.float()
    v = (torch.isfinite(d) & (d > 0)).float()
    d = torch.where(v > 0, d, torch.zeros_like(d))
    num = resample_to_input(d * v, info)
    den = resample_to_input(v, info)
    out = torch.where(den > 0.999, num / den.clamp_min(1e-6), torch.zeros_like(num))
    if max_depth_jump > 0:
        big = torch.where(v > 0, d, torch.full_like(d, float("inf")))
        dmax = F.max_pool2d(d[:, None], 3, stride=1, padding=1)[:, 0]
        dmin = -F.max_pool2d(-big[:, None], 3, stride=1, padding=1)[:, 0]
        edge = ((dmax > dmin * (1.0 + max_depth_jump)) & (v > 0)).float()
        edge_in = F.interpolate(_uncrop(edge, info)[:, None], size=info.input_hw, mode="nearest-exact")[:, 0]
        out = torch.where(edge_in > 0, torch.zeros_like(out), out)
    return out


def confidence_to_unit(depth_conf: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """VGGT confidence ``1 + exp(x)`` -> [0, 1], normalised per window.

    ``c = depth_conf - 1`` (> 0), ``m = median(c[valid])``, ``conf = clamp(c / m, 0, 1)``; 0 where not
    ``valid`` or where ``c`` is not finite.

    Args:
        depth_conf: (S, H, W) VGGT-style confidence (> 1 where meaningful).
        valid: (S, H, W) bool mask of pixels with valid depth.

    Returns:
        (S, H, W) float32 in [0, 1].
    """
    c = (depth_conf.float() - 1.0).clamp_min(0.0)
    ok = valid & torch.isfinite(c)
    c = torch.where(ok, c, torch.zeros_like(c))
    if not bool(ok.any()):
        return torch.zeros_like(c)
    vals = c[ok]
    if vals.numel() > 2_000_000:  # median of a strided sample: same value for practical purposes, bounded cost
        vals = vals[:: vals.numel() // 1_000_000]
    m = float(vals.median())
    if not m > 0:
        m = float(vals.max()) if float(vals.max()) > 0 else 1.0
    return (c / m).clamp_(0.0, 1.0)


# ---------------------------------------------------------------------------------------------- backbones
@runtime_checkable
class Backbone(Protocol):
    """What :class:`FeedForwardReconstructor` needs from a network.

    ``predict(images)`` with ``images`` (S, 3, h, w) float32 RGB in [0, 1] on the reconstructor's device (h, w
    multiples of 14) returns a dict of tensors on that device:

    * ``extrinsic`` (S, 3, 4): camera-from-window ``[R | t]`` (OpenCV axes; window units);
    * ``intrinsic`` (S, 3, 3): pinhole K in pixels of the (h, w) grid;
    * ``depth`` (S, h, w): z-depth in window units (0/NaN invalid);
    * ``depth_conf`` (S, h, w): VGGT-style confidence ``1 + exp(x)`` (values <= 1 mean "no confidence");
    * ``world_points`` (S, h, w, 3), optional (not used: depth + cameras are more accurate, VGGT Sec. 4.3).

    It may raise ``torch.OutOfMemoryError``; the reconstructor then retries with smaller windows.
    """

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the network on one window (see the class docstring)."""
        ...


class VGGTBackbone:
    """:class:`Backbone` adapter for :class:`langgs_ros.models.vggt.VGGT`.

    Runs ``model(images[None])`` (autocast to ``dtype`` on CUDA when it is not float32; the model's heads disable
    autocast and run in float32) and decodes ``pose_enc`` with
    :func:`~langgs_ros.models.vggt.pose_encoding_to_extri_intri`.

    Args:
        model: a VGGT model in eval mode (any device; inputs are moved to it).
        dtype: autocast dtype on CUDA (ignored on CPU).
        frames_chunk_size: frames per DPT-head chunk (None: the model's default).
    """

    def __init__(self, model: Any, dtype: torch.dtype = torch.float32, frames_chunk_size: int | None = None) -> None:
        self.model = model
        self.dtype = dtype
        self.frames_chunk_size = frames_chunk_size

    @property
    def device(self) -> torch.device:
        """Device of the model parameters."""
        return next(self.model.parameters()).device

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """See :class:`Backbone`. Raises ``ValueError`` for images that are not (S, 3, h, w) multiples of 14."""
        from langgs_ros.models.vggt import pose_encoding_to_extri_intri

        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (S, 3, h, w), got {tuple(images.shape)}")
        h, w = int(images.shape[-2]), int(images.shape[-1])
        if h % PATCH_SIZE or w % PATCH_SIZE:
            raise ValueError(f"image sides must be multiples of {PATCH_SIZE}, got {h}x{w}")
        dev = self.device
        x = images.to(dev, torch.float32)[None]
        use_autocast = dev.type == "cuda" and self.dtype != torch.float32
        with torch.inference_mode(), torch.autocast(device_type=dev.type, dtype=self.dtype, enabled=use_autocast):
            out = self.model(x, frames_chunk_size=self.frames_chunk_size)
        pose_enc = out["pose_enc"].float()
        extrinsic, intrinsic = pose_encoding_to_extri_intri(pose_enc, (h, w))
        result = {
            "extrinsic": extrinsic[0].float(),
            "intrinsic": intrinsic[0].float(),  # type: ignore[index]
            "depth": out["depth"][0, ..., 0].float(),
            "depth_conf": out["depth_conf"][0].float(),
        }
        if "world_points" in out:
            result["world_points"] = out["world_points"][0].float()
            result["world_points_conf"] = out["world_points_conf"][0].float()
        del out
        return result


# ---------------------------------------------------------------------------------------------- reconstructor
@dataclass
class _Prediction:
    """A window (or half window) in its own frame, on the input grid."""

    world_from_camera: np.ndarray  # (S, 4, 4) float64 camera-to-window
    intrinsics: np.ndarray  # (S, 3, 3) float64, input grid
    depth: torch.Tensor  # (S, H, W) float32, window units, 0 invalid
    conf_raw: torch.Tensor  # (S, H, W) float32 = depth_conf - 1 >= 0, 0 invalid
    focal_rel_err: list[float]


def _invert_extrinsics(extrinsic: np.ndarray) -> np.ndarray:
    """(S, 3, 4) camera-from-world -> (S, 4, 4) world-from-camera, rotations projected onto SO(3)."""
    E = np.asarray(extrinsic, dtype=np.float64)
    out = np.tile(np.eye(4), (E.shape[0], 1, 1))
    for i in range(E.shape[0]):
        U, _, Vt = np.linalg.svd(E[i, :3, :3])
        R = U @ np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt)) or 1.0]) @ Vt
        out[i, :3, :3] = R.T
        out[i, :3, 3] = -R.T @ E[i, :3, 3]
    return out


@register_reconstructor("feedforward")
class FeedForwardReconstructor(Reconstructor):
    """Feed-forward unposed reconstruction (VGGT, arXiv 2503.11651) aligned into the map (see module docstring).

    Args:
        preset: VGGT preset when no ``backbone`` is given: ``"vggt_1b"`` (released weights) or ``"tiny"``.
        weights: checkpoint path or Hugging Face repo id for :func:`~langgs_ros.models.vggt.build_vggt`
            (``None``: the default repo ``facebook/VGGT-1B-Commercial`` from the local cache; never downloads).
        device: torch device ("cpu", "cuda", "cuda:1", ...).
        dtype: trunk precision on CUDA: "auto" (bfloat16 where supported, else float16), "bfloat16", "float16"
            or "float32". Always float32 on CPU. The heads run in float32.
        image_width: model input width in pixels (multiple of 14; 518 for the released model).
        min_confidence: pixels with normalised confidence (see :func:`confidence_to_unit`) below this get depth 0.
        camera_info: "replace" (default), "check" or "ignore" — what to do with a frame's CameraInfo K (see the
            module docstring).
        max_depth_jump: relative depth jump marking depth edges when resampling (see
            :func:`resample_depth_to_input`; 0 disables).
        backbone: a prebuilt :class:`Backbone` (tests, other networks); then ``preset``/``weights``/``dtype`` are
            not used to build one.
        aligner: a :class:`WindowAligner` (default: a new one with :class:`AlignerConfig` defaults).
        allow_random_weights: with ``weights=None``, build a randomly initialised network instead of loading the
            default checkpoint (tests and benchmarks only; its outputs are meaningless geometry).
        anchors: keyframes from the map's keyframe memory reconstructed with every window (``k``, chosen by
            image similarity to the window's newest frames, see
            :meth:`~langgs_ros.reconstruction.keyframe_memory.KeyframeMemory.anchor_sets`); the window is
            registered through them, so a dropped or failed window never disconnects the map. 0 = chain through
            the window overlap only.
        max_relocalisations: further anchor sets tried when the first fails (other similar keyframes, then
            keyframes spread over the map); each costs one more network call.
        camera_height: declared camera height above the floor, metres, for the scale of unposed maps without
            odometry (``unposed.camera_height``; sets ``aligner.config.gravity.camera_height`` when given).
        relevel_every: re-estimate the unposed map's floor, up and scale on its keyframes every this many windows
            (``unposed.relevel_every``; sets ``aligner.config.gravity.relevel_every`` when given; 0 = never).

    Raises:
        ValueError: bad ``dtype``, ``camera_info``, ``image_width`` or ``min_confidence``.
        WeightsNotFoundError: (FileNotFoundError) the checkpoint is not available locally.
    """

    name = "feedforward"

    def __init__(self, preset: str = "vggt_1b", weights: str | None = None, device: str | torch.device = "cpu",
                 dtype: str = "auto", image_width: int = 518, min_confidence: float = 0.2,
                 camera_info: str = "replace", max_depth_jump: float = 0.1, backbone: Backbone | None = None,
                 aligner: WindowAligner | None = None, allow_random_weights: bool = False, anchors: int = 2,
                 max_relocalisations: int = 2, camera_height: float | None = None,
                 relevel_every: int | None = None) -> None:
        self.device = torch.device(device)
        if camera_info not in ("replace", "check", "ignore"):
            raise ValueError(f"camera_info must be 'replace', 'check' or 'ignore', got {camera_info!r}")
        if not 0.0 <= float(min_confidence) <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
        plan_preprocess((PATCH_SIZE, PATCH_SIZE), int(image_width))  # validates the width
        self.image_width = int(image_width)
        self.min_confidence = float(min_confidence)
        self.camera_info = camera_info
        self.max_depth_jump = float(max_depth_jump)
        self.dtype = self._resolve_dtype(dtype)
        self.aligner = aligner if aligner is not None else WindowAligner(AlignerConfig())
        if camera_height is not None:
            self.aligner.config.gravity.camera_height = float(camera_height)
        if relevel_every is not None:
            self.aligner.config.gravity.relevel_every = int(relevel_every)
        self.aligner.config.validate()
        self.oom_fallbacks = 0
        self.last_alignment: WindowAlignment | None = None
        if anchors < 0 or max_relocalisations < 0:
            raise ValueError(f"anchors and max_relocalisations must be >= 0, got {anchors}, {max_relocalisations}")
        self.anchors = int(anchors)
        self.max_relocalisations = int(max_relocalisations)
        self.windows_registered = self.relocalisations = self.registration_failures = 0
        if backbone is None:
            from langgs_ros.models.vggt import DEFAULT_REPO_ID, build_vggt

            if weights is None and allow_random_weights:
                log.warning("feedforward backend: %s VGGT with RANDOM weights (tests/benchmarks only)", preset)
            elif weights is None:
                weights = DEFAULT_REPO_ID
            model = build_vggt(preset, weights, device=self.device,
                               dtype=self.dtype if self.dtype != torch.float32 else None)
            backbone = VGGTBackbone(model, self.dtype)
        if not callable(getattr(backbone, "predict", None)):
            raise ValueError("backbone must have a predict(images) method (see the Backbone protocol)")
        self.backbone = backbone

    def _resolve_dtype(self, dtype: str) -> torch.dtype:
        if dtype != "auto" and dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto', 'bfloat16', 'float16' or 'float32', got {dtype!r}")
        if self.device.type != "cuda":
            if dtype not in ("auto", "float32"):
                log.info("feedforward backend: dtype %s requested on %s; using float32", dtype, self.device)
            return torch.float32
        if dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return _DTYPES[dtype]

    # ------------------------------------------------------------------ public
    def reconstruct(self, frames: Sequence[Frame]) -> WindowReconstruction:
        """See :meth:`Reconstructor.reconstruct`.

        Returns:
            Depth (S, H, W), confidence in [0, 1], intrinsics (S, 3, 3) on the input grid and camera-to-map poses
            (S, 4, 4), float32 on the device. ``frame`` is ``"map"``; ``scale_is_metric`` is True only when the
            scale came from odometry; ``residuals`` holds the alignment diagnostics (see
            :meth:`WindowAligner.align`) plus ``focal_rel_err`` (mean |f_pred / f_real - 1| over frames with a
            K), ``oom_splits`` and ``t_backbone_s``.

        Raises:
            ValueError: empty window, mixed image sizes or bad images; a window that cannot be placed in the map
                (:class:`AlignmentError`); or frames carrying odometry poses while the metric scale is not yet
                observable (too little camera motion so far) — that window is skipped rather than mixing
                non-metric geometry into a metric map, but its geometry is kept to chain the next windows.
            torch.OutOfMemoryError: a single frame does not fit on the device (or a 2-frame window, which cannot
                be split around a shared frame).
        """
        if len(frames) == 0:
            raise ValueError("empty window: the feedforward backend needs at least one frame")
        h, w = frames[0].height, frames[0].width
        for f in frames:
            if (f.height, f.width) != (h, w):
                raise ValueError(f"mixed image sizes in one window: {(h, w)} and {(f.height, f.width)}")
        keys = [frame_key(f) for f in frames]
        if len(set(keys)) != len(keys):
            raise ValueError("a window contains the same frame (frame_id, stamp) twice")
        splits_before = self.oom_fallbacks
        S = len(frames)
        memory = self.aligner.memory
        if self.anchors > 0 and len(memory):
            anchor_sets = memory.anchor_sets(frames, self.anchors, exclude=set(keys),
                                             attempts=1 + self.max_relocalisations)
        else:
            anchor_sets = [[]]
        t_backbone = 0.0
        errors: list[str] = []
        for attempt, anchors in enumerate(anchor_sets):
            full = list(frames) + [a.frame for a in anchors]
            t0 = time.perf_counter()
            with torch.inference_mode():  # the backbone; outputs below are ordinary tensors (usable outside it)
                pred = self._predict(full)
            t_backbone += time.perf_counter() - t0
            with torch.no_grad():
                depth, conf_raw = pred.depth, pred.conf_raw
                pred.depth = pred.conf_raw = torch.empty(0)  # the window's only references are the locals now
                valid = depth > 0
                conf = confidence_to_unit(conf_raw + 1.0, valid)
                keep = valid & (conf >= self.min_confidence) & (conf > 0)
                depth = torch.where(keep, depth, torch.zeros_like(depth))
                conf = torch.where(keep, conf, torch.zeros_like(conf))
                del conf_raw, valid, keep
                try:
                    alignment = self.aligner.align(full, pred.world_from_camera, depth.cpu().numpy(),
                                                   pred.intrinsics, conf.cpu().numpy())
                except AlignmentError as exc:
                    errors.append(str(exc))
                    del depth, conf, pred
                    self._free()
                    if attempt + 1 < len(anchor_sets):
                        log.warning("feedforward backend: window not registered with anchors %s (%s); relocalising "
                                    "with other keyframes", [a.frame.frame_id for a in anchors], exc)
                    continue
            break
        else:
            self.registration_failures += 1
            raise AlignmentError(f"window of {S} frames not registered against the map after {len(anchor_sets)} "
                                 f"attempt(s) with anchor keyframes [{self.registration_failures} such windows so "
                                 f"far]: {errors[-1]}")
        if attempt > 0:
            self.relocalisations += 1
        self.windows_registered += 1
        self.last_alignment = alignment
        if not alignment.metric and any(f.world_from_camera is not None for f in frames):
            raise ValueError("feedforward backend: frames carry odometry poses but the metric scale is not "
                             "observable yet (too little camera motion); window skipped, its geometry is kept "
                             "for aligning the next windows")
        with torch.no_grad():
            depth = depth[:S] * float(alignment.depth_scale)
            conf = conf[:S]
        residuals = dict(alignment.residuals)
        errs = [e for e in pred.focal_rel_err if math.isfinite(e)]
        if errs:
            residuals["focal_rel_err"] = float(np.mean(errs))
        residuals["oom_splits"] = float(self.oom_fallbacks - splits_before)
        residuals["t_backbone_s"] = float(t_backbone)
        residuals["anchors"] = float(len(anchor_sets[attempt]))
        residuals["registration_attempts"] = float(attempt + 1)
        residuals["relocalised"] = float(attempt > 0)
        rec = WindowReconstruction(
            frames=list(frames), depth=depth.to(self.device, torch.float32).contiguous(),
            confidence=conf.to(self.device, torch.float32).contiguous(),
            intrinsics=torch.from_numpy(pred.intrinsics[:S]).to(self.device, torch.float32),
            world_from_camera=torch.from_numpy(alignment.world_from_camera[:S]).to(self.device, torch.float32),
            frame="map", scale_is_metric=bool(alignment.metric), residuals=residuals,
            scale_source=self.aligner.scale_source,
            map_correction=None if alignment.map_correction is None else alignment.map_correction.matrix(),
        )
        self._free()
        return rec

    def registration_stats(self) -> dict[str, float | str]:
        """Counters of window registration against the keyframe memory (for diagnostics).

        Returns:
            ``windows_registered`` (windows placed in the map, relocalised ones included), ``relocalisations``
            (windows placed only after their first anchor set failed), ``registration_failures`` (windows no
            anchor set could place; they were skipped), ``keyframes`` (in the memory), ``oom_fallbacks``,
            ``relevellings`` (times the unposed map was re-levelled on its keyframes), ``scale_source`` and
            ``up_source`` (see :class:`WindowAligner`).
        """
        return {"windows_registered": float(self.windows_registered), "relocalisations": float(self.relocalisations),
                "registration_failures": float(self.registration_failures),
                "keyframes": float(len(self.aligner.memory)), "oom_fallbacks": float(self.oom_fallbacks),
                "relevellings": float(self.aligner.relevellings), "scale_source": self.aligner.scale_source,
                "up_source": self.aligner.up_source}

    def reset(self) -> None:
        """Forget the map alignment (next window defines the map frame again)."""
        self.aligner.reset()
        self.last_alignment = None
        self.windows_registered = self.relocalisations = self.registration_failures = 0

    # ------------------------------------------------------------------ internals
    def _free(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _predict(self, frames: list[Frame]) -> _Prediction:
        """Backbone on a window, splitting around a shared frame on CUDA out-of-memory (recursively)."""
        try:
            return self._predict_once(frames)
        except torch.OutOfMemoryError as exc:
            if len(frames) < 3:
                self._free()
                raise torch.OutOfMemoryError(
                    f"feedforward backend: {len(frames)} frame(s) do not fit on {self.device} and a window of "
                    f"fewer than 3 frames cannot be split around a shared frame (lower image_width): {exc}"
                ) from exc
            message = str(exc).splitlines()[0] if str(exc) else "out of memory"
        # Outside the except block, so the exception's traceback (and the tensors it references) is released.
        self._free()
        self.oom_fallbacks += 1
        m = len(frames) // 2
        log.warning("feedforward backend: out of memory on a window of %d frames (%s); retrying as two windows of "
                    "%d and %d frames sharing frame %r [%d fallbacks so far]", len(frames), message, m + 1,
                    len(frames) - m, frames[m].frame_id, self.oom_fallbacks)
        first = self._predict(frames[:m + 1])
        second = self._predict(frames[m:])
        return self._merge(first, second)

    def _merge(self, a: _Prediction, b: _Prediction) -> _Prediction:
        """Join two halves whose last/first frame is the same frame: b is aligned into a's frame by Sim(3)."""
        ia, ib = len(a.world_from_camera) - 1, 0
        geo = []
        for p, i in ((a, ia), (b, ib)):
            conf = confidence_to_unit(p.conf_raw[i:i + 1] + 1.0, p.depth[i:i + 1] > 0)[0]
            geo.append(sample_frame_geometry(("shared", 0.0), p.depth[i].cpu().numpy(), p.intrinsics[i],
                                             p.world_from_camera[i], conf.cpu().numpy(),
                                             self.aligner.config.grid_stride))
        try:
            sim, _, _, _ = fit_shared_frames([geo[1]], [geo[0]], self.aligner.config,
                                             np.random.default_rng(self.oom_fallbacks))
        except AlignmentError as exc:
            raise AlignmentError(f"could not join the two halves of an out-of-memory split: {exc}") from exc
        poses_b = sim.transform_pose(b.world_from_camera[1:])
        return _Prediction(
            world_from_camera=np.concatenate([a.world_from_camera, poses_b]),
            intrinsics=np.concatenate([a.intrinsics, b.intrinsics[1:]]),
            depth=torch.cat([a.depth, b.depth[1:] * sim.s]),
            conf_raw=torch.cat([a.conf_raw, b.conf_raw[1:]]),
            focal_rel_err=a.focal_rel_err + b.focal_rel_err[1:],
        )

    def _predict_once(self, frames: list[Frame]) -> _Prediction:
        """One backbone call on the whole list; outputs mapped to the input grid."""
        images, info = preprocess_images([f.rgb for f in frames], self.image_width, self.device)
        out = self.backbone.predict(images)
        del images
        S = len(frames)
        h, w = info.model_hw
        for key, shape in (("extrinsic", (S, 3, 4)), ("intrinsic", (S, 3, 3)), ("depth", (S, h, w)),
                           ("depth_conf", (S, h, w))):
            if key not in out or tuple(out[key].shape) != shape:
                got = tuple(out[key].shape) if key in out else "missing"
                raise ValueError(f"backbone output {key!r} must have shape {shape}, got {got}")
        extrinsic = out["extrinsic"].detach().double().cpu().numpy()
        K_model = out["intrinsic"].detach().double().cpu().numpy()
        if not np.all(np.isfinite(extrinsic)):
            raise ValueError("backbone returned non-finite extrinsics")
        K_ok = (np.all(np.isfinite(K_model), axis=(1, 2)) & (K_model[:, 0, 0] > 0) & (K_model[:, 1, 1] > 0))
        depth_m = out["depth"].detach().float()
        conf_m = out["depth_conf"].detach().float()
        del out
        # Camera info: compare / replace the predicted focal lengths (model grid).
        ratios = np.ones(S)
        errs = [math.nan] * S
        K_in = intrinsics_to_input(np.where(K_ok[:, None, None], K_model, np.eye(3)), info)
        for i, f in enumerate(frames):
            if f.intrinsics is None:
                if not K_ok[i]:
                    raise ValueError(f"backbone predicted invalid intrinsics for frame {f.frame_id!r} "
                                     f"(fx, fy = {K_model[i, 0, 0]}, {K_model[i, 1, 1]}) and it has no CameraInfo")
                continue
            K_real = np.asarray(f.intrinsics, dtype=np.float64)
            if K_ok[i]:
                K_real_m = intrinsics_to_model(K_real, info)
                fx_r = K_real_m[0, 0] / K_model[i, 0, 0]  # f_real / f_pred
                fy_r = K_real_m[1, 1] / K_model[i, 1, 1]
                errs[i] = float(0.5 * (abs(1.0 / fx_r - 1.0) + abs(1.0 / fy_r - 1.0)))
            if self.camera_info == "replace":
                ratios[i] = 0.5 * (fx_r + fy_r) if K_ok[i] else 1.0
                K_in[i] = K_real
            elif not K_ok[i]:
                raise ValueError(f"backbone predicted invalid intrinsics for frame {f.frame_id!r} "
                                 f"(camera_info={self.camera_info!r} keeps the prediction)")
        if self.camera_info == "replace" and not K_ok.all():
            log.warning("feedforward backend: %d frame(s) with invalid predicted focal lengths; CameraInfo used "
                        "without rescaling their depth", int((~K_ok).sum()))
        known = [e for e in errs if math.isfinite(e)]
        if self.camera_info == "check" and known:
            log.info("feedforward backend: predicted focal lengths differ from CameraInfo by %.1f%% on average "
                     "(max %.1f%%) over %d frames", 100 * float(np.mean(known)), 100 * max(known), len(known))
        if np.any(ratios != 1.0):
            depth_m = depth_m * torch.as_tensor(ratios, dtype=torch.float32, device=depth_m.device)[:, None, None]
        depth = resample_depth_to_input(depth_m, info, self.max_depth_jump)
        valid = depth > 0
        conf_raw = resample_to_input((conf_m - 1.0).clamp_min(0.0), info)
        conf_raw = torch.where(valid & torch.isfinite(conf_raw), conf_raw, torch.zeros_like(conf_raw))
        del depth_m, conf_m
        return _Prediction(_invert_extrinsics(extrinsic), K_in, depth, conf_raw, errs)
