"""The ``clip_sam`` semantic source: segment-anything automatic masks + one open_clip embedding per mask.

Per frame (the object-level lifting of FMGS / FLEG-style pipelines, with LERF's CLIP space for queries):

1. ``segment_anything.SamAutomaticMaskGenerator`` (Kirillov et al., ICCV 2023, Sec. 7 / App. "automatic mask
   generation": a point grid prompts SAM, masks filtered by predicted IoU and stability, box NMS) proposes masks.
2. :func:`resolve_masks` turns the overlapping masks into a per-pixel instance id map. Default ``overlap="area"``:
   masks are painted from the largest to the smallest, so smaller masks overwrite larger ones (parts and objects
   lying on large surfaces stay visible; a table top keeps the pixels that no smaller mask claims). With
   ``overlap="iou"`` masks are painted by increasing SAM predicted IoU (the most confident mask wins a pixel).
   Masks left with fewer than ``min_pixels`` visible pixels are dropped and the map repainted without them; at most
   ``max_masks`` masks (largest visible area) are kept. Local ids 0..K-1 follow the painting order.
3. For each kept mask, :func:`masked_crops` cuts a square crop around the mask's box (box grown by
   ``crop_context`` of its larger side on each side, padded with open_clip's mean colour outside the image) and
   greys the background: outside the mask a pixel becomes ``background_keep * pixel + (1 - background_keep) *
   mean colour`` (faint context, object dominant). The crop is resampled straight to the CLIP input size with
   ``torchvision.ops.roi_align`` (area-averaging, i.e. anti-aliased) and normalised with open_clip's preprocess
   mean/std, then batched through the CLIP image tower (:meth:`OpenClipModel.encode_image`) and L2-normalised.
   The crop uses the mask as SAM predicted it (not only its visible part after step 2).

The text side (:attr:`ClipSamSemanticSource.text_encoder`) is the same CLIP model's text tower, so query text
and mask embeddings share the space (LERF relevancy, Kerr et al., ICCV 2023, Eq. 1, is computed by the query engine).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from langgs_ros.semantics.base import SemanticSource, register_semantic_source
from langgs_ros.semantics.presets import load_sam
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
    idx = torch.arange(K, dtype=torch.float32, device=img.device)[:, None]
    # roi_align samples 0 outside the image: sample (image - fill) and add fill back -> fill outside.
    crops = roi_align((img[None] - fill_t), torch.cat([torch.zeros_like(idx), boxes], 1), (h, w),
                      spatial_scale=1.0, sampling_ratio=-1, aligned=True) + fill_t
    soft = roi_align(masks[:, None].float(), torch.cat([idx, boxes], 1), (h, w),
                     spatial_scale=1.0, sampling_ratio=-1, aligned=True).clamp(0, 1)
    background = background_keep * crops + (1.0 - background_keep) * fill_t
    return (soft * crops + (1.0 - soft) * background).clamp(0, 1)


@register_semantic_source("clip_sam")
class ClipSamSemanticSource(SemanticSource):
    """SAM automatic masks + open_clip mask embeddings (see the module docstring for the method).

    Args:
        sam_model_type: "vit_b" | "vit_l" | "vit_h" (full preset).
        sam_checkpoint: SAM checkpoint file (full preset: else searched, see
            :func:`langgs_ros.semantics.presets.resolve_sam_checkpoint`; tiny: optional tiny state dict).
        points_per_side: SAM point grid size (points_per_side² prompts per image).
        points_per_batch: prompts per SAM decoder batch.
        pred_iou_thresh, stability_score_thresh, box_nms_thresh, min_mask_region_area: SamAutomaticMaskGenerator
            filters (library defaults 0.88 / 0.95 / 0.7 / 0).
        clip_model, clip_pretrained, clip_checkpoint: open_clip architecture, pretrained tag, optional weights file.
        device: torch device for SAM and CLIP ("cpu", "cuda", ...).
        preset: "full" (real weights; missing weights raise FileNotFoundError naming the file and the
            ``langgs-download-weights`` command) or "tiny" (small random-init SAM + CLIP of the same
            architectures; tests only, meaningless output).
        crop_context: crop box growth per side (fraction of the mask box's larger side).
        background_keep: weight of the original pixel outside the mask in a crop (rest is open_clip's mean colour).
        batch_size: crops per CLIP forward pass.
        max_masks: at most this many instances per frame (largest visible area kept).
        min_pixels: minimum visible pixels for an instance.
        overlap: "area" (smaller masks overwrite larger) or "iou" (higher predicted IoU wins); see
            :func:`resolve_masks`.
        seed: initialisation seed of the tiny preset.
        clip: a prebuilt shared :class:`OpenClipModel` (then ``clip_*`` / preset are not used for CLIP).
        sam: a prebuilt ``segment_anything.modeling.Sam`` (then ``sam_*`` / preset are not used for SAM).
        generator_kwargs: further ``SamAutomaticMaskGenerator`` arguments (e.g. ``crop_n_layers``).

    Attributes:
        text_encoder: :class:`OpenClipTextEncoder` over the same CLIP model.
        last_timings: seconds spent in SAM and CLIP for the last :meth:`segment` call (``{"sam": s, "clip": s}``).

    Raises:
        FileNotFoundError: missing weights (full preset). ValueError: bad arguments.
    """

    name = "clip_sam"

    def __init__(self, sam_model_type: str = "vit_b", sam_checkpoint: str | Path | None = None,
                 points_per_side: int = 16, points_per_batch: int = 64, pred_iou_thresh: float = 0.88,
                 stability_score_thresh: float = 0.95, box_nms_thresh: float = 0.7, min_mask_region_area: int = 0,
                 clip_model: str = DEFAULT_CLIP_MODEL, clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
                 clip_checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
                 preset: str = "full", crop_context: float = 0.1, background_keep: float = 0.3,
                 batch_size: int = 32, max_masks: int = 100, min_pixels: int = 50, overlap: str = "area",
                 seed: int = 0, clip: OpenClipModel | None = None, sam: torch.nn.Module | None = None,
                 generator_kwargs: dict[str, Any] | None = None) -> None:
        if preset not in ("full", "tiny"):
            raise ValueError(f"preset must be 'full' or 'tiny', got {preset!r}")
        if overlap not in ("area", "iou"):
            raise ValueError(f"overlap must be 'area' or 'iou', got {overlap!r}")
        if points_per_side < 1 or batch_size < 1 or max_masks < 0 or min_pixels < 1 or crop_context < 0:
            raise ValueError("points_per_side, batch_size, min_pixels must be >= 1; max_masks, crop_context >= 0")
        if not 0.0 <= background_keep <= 1.0:
            raise ValueError(f"background_keep must be in [0, 1], got {background_keep}")
        from segment_anything import SamAutomaticMaskGenerator

        # Empty strings (unset ROS/YAML parameters) mean "not given".
        sam_checkpoint = sam_checkpoint or None
        clip_checkpoint = clip_checkpoint or None
        clip_pretrained = clip_pretrained or None

        self.device = torch.device(device)
        self.preset = preset
        self.crop_context = float(crop_context)
        self.background_keep = float(background_keep)
        self.batch_size = int(batch_size)
        self.max_masks = int(max_masks)
        self.min_pixels = int(min_pixels)
        self.overlap = overlap
        self.sam = sam.to(self.device).eval() if sam is not None else load_sam(
            sam_model_type, sam_checkpoint, preset=preset, device=self.device, seed=seed)
        self.clip = clip if clip is not None else load_open_clip_model(
            clip_model, clip_pretrained, checkpoint=clip_checkpoint, device=self.device, preset=preset, seed=seed)
        self.text_encoder = OpenClipTextEncoder(self.clip)
        self.generator = SamAutomaticMaskGenerator(
            self.sam, points_per_side=int(points_per_side), points_per_batch=int(points_per_batch),
            pred_iou_thresh=float(pred_iou_thresh), stability_score_thresh=float(stability_score_thresh),
            box_nms_thresh=float(box_nms_thresh), min_mask_region_area=int(min_mask_region_area),
            output_mode="binary_mask", **(generator_kwargs or {}))
        self.last_timings: dict[str, float] = {"sam": 0.0, "clip": 0.0}

    def generate_masks(self, rgb: np.ndarray) -> list[dict[str, Any]]:
        """Run SAM's automatic mask generator on one image.

        Args:
            rgb: (H, W, 3) uint8 RGB.

        Returns:
            SamAutomaticMaskGenerator records (``segmentation`` (H, W) bool, ``area``, ``bbox`` XYWH,
            ``predicted_iou``, ``stability_score``, ...), possibly empty.
        """
        with torch.inference_mode():
            return self.generator.generate(rgb)

    def embed_masks(self, rgb: np.ndarray, masks: np.ndarray) -> torch.Tensor:
        """CLIP embeddings of masked crops (see :func:`masked_crops`).

        Args:
            rgb: (H, W, 3) uint8 RGB.
            masks: (K, H, W) bool, each non-empty.

        Returns:
            (K, D) float32 L2-normalised on the CPU.
        """
        K = int(masks.shape[0])
        if K == 0:
            return torch.zeros(0, self.clip.dim, dtype=torch.float32)
        with torch.inference_mode():
            image = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device).permute(2, 0, 1).float() / 255.0
            out = []
            for i in range(0, K, self.batch_size):
                m = torch.from_numpy(np.ascontiguousarray(masks[i:i + self.batch_size])).to(self.device)
                crops = masked_crops(image, m, self.clip.image_size, context=self.crop_context,
                                     background_keep=self.background_keep, fill=self.clip.mean)
                out.append(self.clip.encode_image(crops, batch_size=self.batch_size))
            return torch.cat(out)

    def segment_one(self, frame: Frame) -> FrameSegmentation:
        """Segment one frame (see :meth:`segment`)."""
        rgb = frame.rgb
        if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"frame {frame.frame_id!r}: rgb must be (H, W, 3) uint8, got "
                             f"{getattr(rgb, 'shape', None)} {getattr(rgb, 'dtype', None)}")
        H, W = rgb.shape[:2]
        t0 = time.perf_counter()
        records = self.generate_masks(rgb)
        t1 = time.perf_counter()
        if records:
            masks = np.stack([np.asarray(r["segmentation"], bool) for r in records])
            areas = np.array([int(r["area"]) for r in records], np.int64)
            scores = np.array([float(r["predicted_iou"]) for r in records], np.float64)
        else:
            masks = np.zeros((0, H, W), bool)
            areas = np.zeros(0, np.int64)
            scores = np.zeros(0, np.float64)
        instance_ids, kept = resolve_masks(masks, areas, scores, overlap=self.overlap, min_pixels=self.min_pixels,
                                           max_masks=self.max_masks)
        emb = self.embed_masks(rgb, masks[kept])
        t2 = time.perf_counter()
        self.last_timings["sam"] += t1 - t0
        self.last_timings["clip"] += t2 - t1
        return FrameSegmentation(instance_ids=instance_ids, embeddings=emb, names=[None] * len(kept),
                                 class_ids=None)

    def segment(self, frames: Sequence[Frame]) -> list[FrameSegmentation]:
        """Segment each frame: SAM masks -> per-pixel instance ids -> one CLIP embedding per instance.

        Returns:
            One :class:`FrameSegmentation` per frame: ``instance_ids`` (H, W) int32 in 0..K-1 or -1,
            ``embeddings`` (K, D) float32 unit rows on the CPU (K may be 0), ``names`` K ``None``.

        Raises:
            ValueError: a frame's ``rgb`` is not (H, W, 3) uint8.
        """
        self.last_timings = {"sam": 0.0, "clip": 0.0}
        return [self.segment_one(f) for f in frames]
