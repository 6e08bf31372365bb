"""The ``clip_sam`` semantic source: multi-level SAM masks + multi-crop open_clip embeddings per mask.

The object-level lifting of LangSplat / OpenMask3D / ConceptGraphs-style pipelines, with LERF's CLIP space for
queries. Per :meth:`ClipSamSemanticSource.segment` call (a window, or only its new frames):

1. **Masks, per frame.** SAM's automatic mask generator (Kirillov et al., ICCV 2023, App. "automatic mask
   generation": a point grid prompts SAM, masks filtered by predicted IoU and stability) with the three multimask
   outputs kept as levels whole / part / subpart and box NMS within each level (LangSplat, Qin et al., CVPR 2024,
   §3.2; :mod:`.sam_levels`); ``mask_levels`` selects the levels.
2. **Stuff.** Large planar masks (:mod:`.stuff`, from depth) become ``wall`` / ``floor`` / ``ceiling``
   instances embedded from that word by the CLIP text tower (``stuff="label"``), are dropped (``"drop"``), or are
   treated as objects (``"keep"``) (ConceptGraphs, Gu et al., ICRA 2024, §III-B, separates background classes).
3. :func:`resolve_masks` turns the overlapping masks into one instance id per pixel. Default ``overlap="area"``:
   masks are painted from the largest to the smallest, so smaller masks overwrite larger ones (parts and objects
   lying on large surfaces stay visible). With ``overlap="iou"`` masks are painted by increasing SAM predicted IoU.
   Masks left with fewer than ``min_pixels`` visible pixels are dropped and the map repainted without them; at most
   ``max_masks`` masks (largest visible area) are kept.
4. **Multi-crop CLIP features** (OpenMask3D, Takmaz et al., NeurIPS 2023, §3.2): for each object mask,
   :func:`masked_crops` cuts one square crop per ``crop_contexts`` level around the mask's box (grown by that
   fraction of its larger side per side, padded with open_clip's mean colour outside the image) and greys the
   background (``background_keep * pixel + (1 - background_keep) * mean colour``). The mask used is the mask's
   own visible pixels after step 3 (``subtract_smaller``: the smaller objects painted over a table top are greyed
   out of the table's crops). Crops are resampled to the CLIP input size with ``torchvision.ops.roi_align``
   (area-averaging, from the level of a 2x average-pooled pyramid whose pixels are at most half an output pixel)
   and normalised with open_clip's preprocess mean/std; the crops of **all frames of the call**
   go through the CLIP image tower in one batched pass; a mask's feature is the renormalised mean of its crops'
   unit embeddings.

SAM and CLIP run under ``torch.autocast`` in ``precision`` (bf16 / fp16 on CUDA by default, fp32 on CPU).
The text side (:attr:`ClipSamSemanticSource.text_encoder`) is the same CLIP model's text tower, so query text and
mask embeddings share the space (LERF relevancy, Kerr et al., ICCV 2023, Eq. 1, is computed by the query engine).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from langgs_ros.semantics.base import SemanticSource, register_semantic_source
from langgs_ros.semantics.presets import load_sam
from langgs_ros.semantics.sam_levels import level_indices, make_level_generator
from langgs_ros.semantics.stuff import StuffConfig, camera_up, classify_stuff
from langgs_ros.semantics.text import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_CLIP_PRETRAINED,
    OpenClipModel,
    OpenClipTextEncoder,
    load_open_clip_model,
)
from langgs_ros.types import NO_INSTANCE, Frame, FrameSegmentation

log = logging.getLogger(__name__)


def resolve_masks(masks: np.ndarray, areas: np.ndarray | None = None, scores: np.ndarray | None = None,
                  overlap: str = "area", min_pixels: int = 50, max_masks: int | None = None,
                  max_rounds: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Resolve overlapping binary masks into one instance id per pixel.

    Args:
        masks: (M, H, W) bool masks.
        areas: (M,) mask areas in pixels (computed from ``masks`` if None).
        scores: (M,) confidence (SAM predicted IoU) used by ``overlap="iou"``.
        overlap: "area" — paint largest first, smaller masks overwrite; "iou" — paint by increasing score, the
            higher-scoring mask wins a pixel. Ties keep the input order.
        min_pixels: masks with fewer visible pixels are dropped (the map is repainted without them).
        max_masks: keep at most this many masks (the ones with the most visible pixels); None = no limit.
        max_rounds: repaint iterations until the kept set is stable (pixels of masks still below ``min_pixels``
            after that become ``NO_INSTANCE``).

    Returns:
        instance_ids: (H, W) int32, local id 0..K-1 or ``NO_INSTANCE`` (-1).
        kept: (K,) int64 indices into ``masks``; local id k is mask ``kept[k]`` (ids follow painting order).

    Raises:
        ValueError: bad shapes or unknown ``overlap``.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (M, H, W), got shape {masks.shape}")
    M, H, W = masks.shape
    masks = masks.astype(bool, copy=False)
    if overlap not in ("area", "iou"):
        raise ValueError(f"overlap must be 'area' or 'iou', got {overlap!r}")
    if M == 0:
        return np.full((H, W), NO_INSTANCE, np.int32), np.zeros(0, np.int64)
    areas = masks.reshape(M, -1).sum(1) if areas is None else np.asarray(areas)
    if areas.shape != (M,):
        raise ValueError(f"areas must have shape ({M},), got {areas.shape}")
    if overlap == "area":
        order = np.argsort(-areas, kind="stable")
    else:
        if scores is None or np.asarray(scores).shape != (M,):
            raise ValueError(f"overlap='iou' needs scores of shape ({M},)")
        order = np.argsort(np.asarray(scores, np.float64), kind="stable")
    active = [int(i) for i in order if areas[i] >= min_pixels]

    def paint(idx: list[int]) -> np.ndarray:
        owner = np.full((H, W), -1, np.int64)
        for i in idx:
            owner[masks[i]] = i
        return owner

    owner = paint(active)
    for _ in range(max_rounds):
        vis = np.bincount(owner[owner >= 0].ravel(), minlength=M)
        keep = [i for i in active if vis[i] >= min_pixels]
        if max_masks is not None and len(keep) > max_masks:
            top = set(sorted(keep, key=lambda i: -int(vis[i]))[:max(0, int(max_masks))])
            keep = [i for i in keep if i in top]
        if keep == active:
            break
        active = keep
        owner = paint(active)
    vis = np.bincount(owner[owner >= 0].ravel(), minlength=M)
    kept = np.array([i for i in active if vis[i] >= min_pixels], np.int64)
    lut = np.full(M + 1, NO_INSTANCE, np.int32)  # owner -1 indexes the last entry (NO_INSTANCE)
    lut[kept] = np.arange(len(kept), dtype=np.int32)
    instance_ids = lut[owner]
    return instance_ids.astype(np.int32, copy=False), kept


def square_context_boxes(masks: torch.Tensor, context: float = 0.1) -> torch.Tensor:
    """Square crop boxes around masks.

    Args:
        masks: (K, H, W) bool, each non-empty.
        context: growth of the mask's tight box on each side, as a fraction of its larger side (>= 0).

    Returns:
        (K, 4) float32 boxes ``x1, y1, x2, y2`` in pixel-edge coordinates (pixel i spans [i, i + 1)); squares
        centred on the tight box, side ``max(w, h) * (1 + 2 * context)``; may extend beyond the image.
    """
    from torchvision.ops import masks_to_boxes

    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    if masks.shape[0] == 0:
        return torch.zeros(0, 4, dtype=torch.float32, device=masks.device)
    b = masks_to_boxes(masks).float()  # inclusive pixel indices
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2] + 1.0, b[:, 3] + 1.0
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    side = torch.maximum(x2 - x1, y2 - y1) * (1.0 + 2.0 * context)
    return torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dim=1)


def masked_crops(image: torch.Tensor, masks: torch.Tensor, out_size: tuple[int, int], context: float = 0.1,
                 background_keep: float = 0.3, fill: Sequence[float] = (0.5, 0.5, 0.5)) -> torch.Tensor:
    """Masked object crops with context, resampled to ``out_size``.

    Args:
        image: (3, H, W) float RGB in [0, 1].
        masks: (K, H, W) bool, each non-empty, same device as ``image``.
        out_size: (h, w) output size in pixels (the CLIP input size).
        context: box growth per side as a fraction of the mask box's larger side (:func:`square_context_boxes`).
        background_keep: weight of the original pixel outside the mask (0 = flat ``fill``, 1 = no greying).
        fill: (3,) RGB in [0, 1] for the greyed background and for the area outside the image.

    Returns:
        (K, 3, h, w) float32 crops in [0, 1] on ``image``'s device.

    Raises:
        ValueError: shape mismatch or ``background_keep`` outside [0, 1].
    """
    from torchvision.ops import roi_align

    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[1:]:
        raise ValueError(f"masks must be (K, H, W) = (K, {image.shape[1]}, {image.shape[2]}), got "
                         f"{tuple(masks.shape)}")
    if not 0.0 <= background_keep <= 1.0:
        raise ValueError(f"background_keep must be in [0, 1], got {background_keep}")
    K = masks.shape[0]
    h, w = int(out_size[0]), int(out_size[1])
    if K == 0:
        return torch.zeros(0, 3, h, w, dtype=torch.float32, device=image.device)
    img = image.float()
    fill_t = torch.as_tensor(fill, dtype=torch.float32, device=img.device).view(1, 3, 1, 1)
    boxes = square_context_boxes(masks, context)
    # Area averaging through a 2x pyramid: each crop is sampled (2-4 samples per output pixel and axis) from the
    # level whose pixels are at most half an output pixel, so the cost is ~16 samples per output pixel instead of
    # the crop's whole area (roi_align with sampling_ratio=-1 on the full image: 80 masks x 3 crops took ~12 s per
    # hololens frame on 2 CPU cores).
    side = (boxes[:, 2] - boxes[:, 0]).clamp_min(1.0)
    n_levels = max(1, math.floor(math.log2(max(1, min(img.shape[1:]) // 4))) + 1)
    level = torch.floor(torch.log2(side / (2.0 * max(h, w)))).clamp(0, n_levels - 1).to(torch.int64)
    # roi_align samples 0 outside the image: sample (image - fill) and add fill back -> fill outside.
    pyr_img, pyr_mask = [img[None] - fill_t], [masks[:, None].float()]
    for _ in range(1, int(level.max()) + 1):
        pyr_img.append(F.avg_pool2d(pyr_img[-1], 2, ceil_mode=True))
        pyr_mask.append(F.avg_pool2d(pyr_mask[-1], 2, ceil_mode=True))
    crops = torch.empty(K, 3, h, w, dtype=torch.float32, device=img.device)
    soft = torch.empty(K, 1, h, w, dtype=torch.float32, device=img.device)
    for lv in torch.unique(level).tolist():
        sel = (level == lv).nonzero().squeeze(1)
        b = boxes[sel]
        scale = 1.0 / (1 << lv)
        zero = torch.zeros(sel.numel(), 1, dtype=torch.float32, device=img.device)
        crops[sel] = roi_align(pyr_img[lv], torch.cat([zero, b], 1), (h, w), spatial_scale=scale,
                               sampling_ratio=-1, aligned=True)
        soft[sel] = roi_align(pyr_mask[lv][sel], torch.cat([torch.arange(sel.numel(), dtype=torch.float32,
                                                                         device=img.device)[:, None], b], 1),
                              (h, w), spatial_scale=scale, sampling_ratio=-1, aligned=True)
    crops = crops + fill_t
    soft = soft.clamp(0, 1)
    background = background_keep * crops + (1.0 - background_keep) * fill_t
    return (soft * crops + (1.0 - soft) * background).clamp(0, 1)


PRECISIONS = ("auto", "fp32", "fp16", "bf16")
STUFF_POLICIES = ("label", "drop", "keep")


@dataclass
class ClipSamConfig:
    """Every knob of the ``clip_sam`` source (one node parameter ``semantic.<name>`` each).

    Attributes:
        sam_model_type: "vit_b" | "vit_l" | "vit_h" (full preset).
        sam_checkpoint: SAM checkpoint file ("" / None: searched, see
            :func:`langgs_ros.semantics.presets.resolve_sam_checkpoint`; tiny: optional tiny state dict).
        points_per_side: SAM point grid size (points_per_side² prompts per image).
        points_per_batch: prompts per SAM decoder batch.
        pred_iou_thresh, stability_score_thresh, box_nms_thresh, min_mask_region_area: SamAutomaticMaskGenerator
            filters (library defaults 0.88 / 0.95 / 0.7 / 0); the NMS runs within each mask level.
        crop_n_layers: SAM's extra image-crop layers (0 = whole image only).
        mask_levels: SAM multimask levels kept, a subset of ("whole", "part", "subpart") (:mod:`.sam_levels`).
        clip_model, clip_pretrained, clip_checkpoint: open_clip architecture, pretrained tag, optional weights file.
        device: torch device for SAM and CLIP.
        preset: "full" (real weights) or "tiny" (random-init models of the same architectures; tests only).
        precision: "auto" (bf16 on CUDA where supported, else fp16 on CUDA; fp32 on CPU), "fp32", "fp16", "bf16":
            autocast dtype of the SAM and CLIP forward passes (embeddings are returned as float32).
        crop_contexts: context levels of the multi-crop CLIP feature: one crop per value, the mask's box grown by
            that fraction of its larger side on each side; the crops' embeddings are averaged (OpenMask3D,
            Takmaz et al., NeurIPS 2023, §3.2, multi-scale crops).
        background_keep: weight of the original pixel outside the mask in a crop (rest is open_clip's mean colour).
        subtract_smaller: crops keep only the mask's own visible pixels (smaller masks painted over it greyed as
            background); False: the mask as SAM predicted it.
        batch_size: crops per CLIP forward pass (crops of all frames of a :meth:`segment` call are batched).
        max_masks: at most this many instances per frame (largest visible area kept).
        min_pixels: minimum visible pixels for an instance.
        overlap: "area" (smaller masks overwrite larger) or "iou" (higher predicted IoU wins); :func:`resolve_masks`.
        stuff: background policy for large planar masks (:mod:`.stuff`): "label" (instance named wall / floor /
            ceiling, embedded from that word by the CLIP text tower), "drop" (pixels become no instance), "keep"
            (treated like objects).
        stuff_min_area, stuff_inlier_distance, stuff_inlier_fraction, stuff_normal_cos, stuff_floor_below,
            stuff_ceiling_above: :class:`~langgs_ros.semantics.stuff.StuffConfig` thresholds.
        world_up: (3,) world up used with the frame's pose to orient stuff planes (None: camera −y).
        seed: initialisation seed of the tiny preset.
    """

    sam_model_type: str = "vit_b"
    sam_checkpoint: str | None = None
    points_per_side: int = 16
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    crop_n_layers: int = 0
    mask_levels: tuple[str, ...] = ("whole", "part")
    clip_model: str = DEFAULT_CLIP_MODEL
    clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED
    clip_checkpoint: str | None = None
    device: str = "cpu"
    preset: str = "full"
    precision: str = "auto"
    crop_contexts: tuple[float, ...] = (0.1, 0.4, 1.0)
    background_keep: float = 0.3
    subtract_smaller: bool = True
    batch_size: int = 32
    max_masks: int = 100
    min_pixels: int = 50
    overlap: str = "area"
    stuff: str = "label"
    stuff_min_area: float = 0.08
    stuff_inlier_distance: float = 0.03
    stuff_inlier_fraction: float = 0.85
    stuff_normal_cos: float = 0.9
    stuff_floor_below: float = 0.9
    stuff_ceiling_above: float = 0.5
    world_up: tuple[float, float, float] | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raises ValueError on an out-of-range or unknown value."""
        if self.preset not in ("full", "tiny"):
            raise ValueError(f"preset must be 'full' or 'tiny', got {self.preset!r}")
        if self.overlap not in ("area", "iou"):
            raise ValueError(f"overlap must be 'area' or 'iou', got {self.overlap!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.stuff not in STUFF_POLICIES:
            raise ValueError(f"stuff must be one of {STUFF_POLICIES}, got {self.stuff!r}")
        if (self.points_per_side < 1 or self.batch_size < 1 or self.max_masks < 0 or self.min_pixels < 1
                or not self.crop_contexts or min(self.crop_contexts) < 0):
            raise ValueError("points_per_side, batch_size, min_pixels must be >= 1; max_masks >= 0; crop_contexts "
                             "a non-empty list of values >= 0")
        if not 0.0 <= self.background_keep <= 1.0:
            raise ValueError(f"background_keep must be in [0, 1], got {self.background_keep}")
        level_indices(self.mask_levels)

    def stuff_config(self) -> StuffConfig:
        """The :class:`StuffConfig` of the ``stuff_*`` fields."""
        return StuffConfig(min_area=self.stuff_min_area, inlier_distance=self.stuff_inlier_distance,
                           inlier_fraction=self.stuff_inlier_fraction, normal_cos=self.stuff_normal_cos,
                           floor_below=self.stuff_floor_below, ceiling_above=self.stuff_ceiling_above)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


@dataclass
class _FramePlan:
    """One frame's masks awaiting CLIP: the kept masks and the instance map (internal)."""

    rgb: np.ndarray
    instance_ids: np.ndarray
    crop_masks: np.ndarray
    names: list[str | None]


@register_semantic_source("clip_sam")
class ClipSamSemanticSource(SemanticSource):
    """SAM multi-level masks + multi-crop open_clip mask embeddings (see the module docstring for the method).

    Args:
        config: :class:`ClipSamConfig`; keyword arguments override its fields (``ClipSamSemanticSource(
            preset="tiny", points_per_side=4)``). Empty strings for ``sam_checkpoint`` / ``clip_checkpoint`` /
            ``clip_pretrained`` (unset ROS parameters) mean "not given".
        clip: a prebuilt shared :class:`OpenClipModel` (then ``clip_*`` / preset are not used for CLIP).
        sam: a prebuilt ``segment_anything.modeling.Sam`` (then ``sam_*`` / preset are not used for SAM).
        generator_kwargs: further ``SamAutomaticMaskGenerator`` arguments.

    Attributes:
        config: the effective configuration.
        text_encoder: :class:`OpenClipTextEncoder` over the same CLIP model.
        last_timings: seconds per stage for the last :meth:`segment` call, summed over its frames: ``sam`` (mask
            generation), ``resolve`` (overlap resolution), ``stuff`` (plane tests), ``crops`` (crop sampling) and
            ``clip`` (image tower), plus ``frames``.

    Raises:
        FileNotFoundError: missing weights (full preset). ValueError: bad arguments.
    """

    name = "clip_sam"

    def __init__(self, config: ClipSamConfig | None = None, *, clip: OpenClipModel | None = None,
                 sam: torch.nn.Module | None = None, generator_kwargs: dict[str, Any] | None = None,
                 **overrides: Any) -> None:
        cfg = replace(config or ClipSamConfig(), **overrides)
        for key in ("sam_checkpoint", "clip_checkpoint", "clip_pretrained"):
            if not getattr(cfg, key):
                setattr(cfg, key, None)
        cfg.mask_levels = tuple(cfg.mask_levels)
        cfg.crop_contexts = tuple(float(c) for c in cfg.crop_contexts)
        cfg.validate()
        self.config = cfg
        self.device = torch.device(cfg.device)
        self._amp = autocast_dtype(cfg.precision, self.device)
        self.sam = sam.to(self.device).eval() if sam is not None else load_sam(
            cfg.sam_model_type, cfg.sam_checkpoint, preset=cfg.preset, device=self.device, seed=cfg.seed)
        self.clip = clip if clip is not None else load_open_clip_model(
            cfg.clip_model, cfg.clip_pretrained, checkpoint=cfg.clip_checkpoint, device=self.device,
            preset=cfg.preset, seed=cfg.seed)
        self.text_encoder = OpenClipTextEncoder(self.clip)
        self.generator = make_level_generator(
            self.sam, cfg.mask_levels, points_per_side=int(cfg.points_per_side),
            points_per_batch=int(cfg.points_per_batch), pred_iou_thresh=float(cfg.pred_iou_thresh),
            stability_score_thresh=float(cfg.stability_score_thresh), box_nms_thresh=float(cfg.box_nms_thresh),
            min_mask_region_area=int(cfg.min_mask_region_area), crop_n_layers=int(cfg.crop_n_layers),
            output_mode="binary_mask", **(generator_kwargs or {}))
        self.last_timings: dict[str, float] = {}
        self._warned_no_depth = False

    def _autocast(self) -> Any:
        if self._amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._amp)

    def generate_masks(self, rgb: np.ndarray) -> list[dict[str, Any]]:
        """Run the multi-level SAM automatic mask generator on one image.

        Args:
            rgb: (H, W, 3) uint8 RGB.

        Returns:
            Records (``segmentation`` (H, W) bool, ``area``, ``predicted_iou``, ``stability_score``, ``level``),
            possibly empty.
        """
        with torch.inference_mode(), self._autocast():
            return self.generator.generate_levels(rgb)

    def _crops(self, rgb: np.ndarray, masks: np.ndarray) -> torch.Tensor:
        """(K * C, 3, h, w) crops of ``masks`` at every context level (mask-major: rows k*C .. k*C + C - 1)."""
        image = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device).permute(2, 0, 1).float() / 255.0
        m = torch.from_numpy(np.ascontiguousarray(masks)).to(self.device)
        per_ctx = [masked_crops(image, m, self.clip.image_size, context=c, background_keep=self.config.background_keep,
                                fill=self.clip.mean) for c in self.config.crop_contexts]
        return torch.stack(per_ctx, dim=1).flatten(0, 1)

    def embed_masks(self, rgb: np.ndarray, masks: np.ndarray) -> torch.Tensor:
        """Multi-crop CLIP embeddings of masks (mean of the unit embeddings of the ``crop_contexts`` crops,
        renormalised).

        Args:
            rgb: (H, W, 3) uint8 RGB.
            masks: (K, H, W) bool, each non-empty (the pixels a crop keeps; see ``subtract_smaller``).

        Returns:
            (K, D) float32 L2-normalised on the CPU.
        """
        return self._embed_plans([_FramePlan(rgb, np.zeros(rgb.shape[:2], np.int32), masks, [None] * len(masks))])[0]

    def _embed_plans(self, plans: Sequence[_FramePlan]) -> list[torch.Tensor]:
        """One batched CLIP pass over the crops of all ``plans`` (batches of ``batch_size`` span frames)."""
        C = len(self.config.crop_contexts)
        bs = max(1, self.config.batch_size // C) * C  # whole masks per batch
        jobs = [(i, k) for i, p in enumerate(plans) for k in range(len(p.crop_masks))]
        feats: list[torch.Tensor] = []
        t_crop = t_clip = 0.0
        with torch.inference_mode():
            for s in range(0, len(jobs), bs // C):
                chunk = jobs[s:s + bs // C]
                t0 = time.perf_counter()
                crops = []
                for i in dict.fromkeys(i for i, _ in chunk):
                    ks = [k for j, k in chunk if j == i]
                    crops.append(self._crops(plans[i].rgb, plans[i].crop_masks[ks]))
                batch = torch.cat(crops)
                t1 = time.perf_counter()
                with self._autocast():
                    e = self.clip.encode_image(batch, batch_size=bs)
                feats.append(F.normalize(e.view(-1, C, e.shape[-1]).mean(dim=1), dim=-1))
                t2 = time.perf_counter()
                t_crop += t1 - t0
                t_clip += t2 - t1
        self.last_timings["crops"] = self.last_timings.get("crops", 0.0) + t_crop
        self.last_timings["clip"] = self.last_timings.get("clip", 0.0) + t_clip
        allf = torch.cat(feats) if feats else torch.zeros(0, self.clip.dim)
        out, start = [], 0
        for p in plans:
            n = len(p.crop_masks)
            out.append(allf[start:start + n].float().cpu())
            start += n
        return out

    def _plan(self, frame: Frame) -> _FramePlan:
        rgb = frame.rgb
        if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"frame {frame.frame_id!r}: rgb must be (H, W, 3) uint8, got "
                             f"{getattr(rgb, 'shape', None)} {getattr(rgb, 'dtype', None)}")
        H, W = rgb.shape[:2]
        cfg = self.config
        t0 = time.perf_counter()
        records = self.generate_masks(rgb)
        t1 = time.perf_counter()
        if records:
            masks = np.stack([np.asarray(r["segmentation"], bool) for r in records])
            areas = np.array([int(r["area"]) for r in records], np.int64)
            scores = np.array([float(r["predicted_iou"]) for r in records], np.float64)
        else:
            masks, areas, scores = np.zeros((0, H, W), bool), np.zeros(0, np.int64), np.zeros(0, np.float64)
        names: list[str | None] = [None] * len(masks)
        t2 = time.perf_counter()
        if cfg.stuff != "keep" and len(masks):
            if (frame.depth is None or frame.intrinsics is None) and not self._warned_no_depth:
                log.warning("clip_sam: frame %r has no depth/intrinsics; the stuff policy (%s) needs them and is "
                            "skipped for such frames", frame.frame_id, cfg.stuff)
                self._warned_no_depth = True
            up = camera_up(frame.world_from_camera, cfg.world_up)
            names = classify_stuff(masks, frame.depth, frame.intrinsics, up, cfg.stuff_config())
            if cfg.stuff == "drop":
                keep = np.array([n is None for n in names], bool)
                masks, areas, scores = masks[keep], areas[keep], scores[keep]
                names = [None] * len(masks)
        t3 = time.perf_counter()
        instance_ids, kept = resolve_masks(masks, areas, scores, overlap=cfg.overlap, min_pixels=cfg.min_pixels,
                                           max_masks=cfg.max_masks)
        if cfg.subtract_smaller:
            crop_masks = instance_ids[None] == np.arange(len(kept), dtype=np.int32)[:, None, None]
        else:
            crop_masks = masks[kept]
        t4 = time.perf_counter()
        lt = self.last_timings
        lt["sam"] = lt.get("sam", 0.0) + t1 - t0
        lt["stuff"] = lt.get("stuff", 0.0) + t3 - t2
        lt["resolve"] = lt.get("resolve", 0.0) + (t2 - t1) + (t4 - t3)
        return _FramePlan(rgb, instance_ids, crop_masks, [names[i] for i in kept.tolist()])

    def segment_one(self, frame: Frame) -> FrameSegmentation:
        """Segment one frame (see :meth:`segment`)."""
        return self.segment([frame])[0]

    def segment(self, frames: Sequence[Frame]) -> list[FrameSegmentation]:
        """Segment frames: SAM masks per frame -> per-pixel instance ids -> one multi-crop CLIP embedding per
        object instance, the crops of all ``frames`` in one batched CLIP pass; stuff instances (policy "label")
        get the CLIP text embedding of their name.

        Works on any subset of frames (call it on the new frames of a window only, so that each frame is
        segmented once).

        Returns:
            One :class:`FrameSegmentation` per frame: ``instance_ids`` (H, W) int32 in 0..K-1 or -1,
            ``embeddings`` (K, D) float32 unit rows on the CPU (K may be 0), ``names`` K entries ("wall",
            "floor", "ceiling" for stuff, else ``None``).

        Raises:
            ValueError: a frame's ``rgb`` is not (H, W, 3) uint8.
        """
        self.last_timings = {"sam": 0.0, "resolve": 0.0, "stuff": 0.0, "crops": 0.0, "clip": 0.0,
                             "frames": float(len(frames))}
        plans = [self._plan(f) for f in frames]
        # Stuff instances (named) take their name's text embedding; only object instances are cropped.
        obj_plans = []
        for p in plans:
            obj = [k for k, n in enumerate(p.names) if n is None]
            obj_plans.append(_FramePlan(p.rgb, p.instance_ids, p.crop_masks[obj], [None] * len(obj)))
        feats = self._embed_plans(obj_plans)
        stuff_words = sorted({n for p in plans for n in p.names if n is not None})
        word_emb = dict(zip(stuff_words, self.text_encoder.encode_text(stuff_words))) if stuff_words else {}
        out = []
        for p, f in zip(plans, feats):
            K = len(p.names)
            emb = torch.zeros(K, self.clip.dim, dtype=torch.float32)
            obj = [k for k, n in enumerate(p.names) if n is None]
            if obj:
                emb[obj] = f
            for k, n in enumerate(p.names):
                if n is not None:
                    emb[k] = word_emb[n]
            out.append(FrameSegmentation(instance_ids=p.instance_ids, embeddings=emb, names=list(p.names),
                                         class_ids=None))
        return out
