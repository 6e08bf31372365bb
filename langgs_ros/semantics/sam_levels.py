"""Multi-level SAM automatic masks: whole / part / subpart from SAM's three multimask outputs.

SAM's mask decoder answers each point prompt with three masks (Kirillov et al., ICCV 2023, §3 "resolving
ambiguity": whole, part, subpart). ``segment_anything.SamAutomaticMaskGenerator`` pools the three outputs of every
grid point and filters them together (one box NMS over all of them), so a part survives only where no overlapping
whole mask scores higher. LangSplat (Qin et al., CVPR 2024, §3.2) instead keeps the three outputs as three levels
(output 0 = subpart, 1 = part, 2 = whole, the order SAM's trained decoder tends to produce) and removes duplicates
**within** each level. :class:`LevelMaskGenerator` does that on top of the library generator: the same point grid,
prediction, predicted-IoU / stability filters, crop-edge filter, crop layers and small-region post-processing; only
the level selection and the per-level NMS are added (``torchvision.ops.batched_nms`` with the level as category).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

MASK_LEVELS = {"subpart": 0, "part": 1, "whole": 2}
"""Level name -> index of SAM's multimask output (LangSplat's reading of the three outputs)."""


def level_indices(levels: Sequence[str]) -> list[int]:
    """Multimask output indices of level names, sorted.

    Raises:
        ValueError: unknown name or no level.
    """
    bad = [lv for lv in levels if lv not in MASK_LEVELS]
    if bad or not levels:
        raise ValueError(f"mask levels must be a non-empty subset of {sorted(MASK_LEVELS)}, got {list(levels)}")
    return sorted({MASK_LEVELS[lv] for lv in levels})


def make_level_generator(sam: torch.nn.Module, levels: Sequence[str], **kwargs: Any) -> Any:
    """A :class:`LevelMaskGenerator` (built lazily so that importing this module does not import segment_anything).

    Args:
        sam: a ``segment_anything.modeling.Sam``.
        levels: level names to keep (:data:`MASK_LEVELS`).
        **kwargs: ``SamAutomaticMaskGenerator`` arguments (points_per_side, pred_iou_thresh, ...).
    """
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.utils.amg import (
        MaskData,
        batch_iterator,
        batched_mask_to_box,
        calculate_stability_score,
        is_box_near_crop_edge,
        mask_to_rle_pytorch,
        rle_to_mask,
        uncrop_boxes_xyxy,
        uncrop_masks,
        uncrop_points,
    )
    from torchvision.ops.boxes import batched_nms

    keep_levels = level_indices(levels)

    class LevelMaskGenerator(SamAutomaticMaskGenerator):
        """``SamAutomaticMaskGenerator`` keeping the selected multimask levels with NMS within each level."""

        levels = keep_levels

        def _process_batch(self, points: np.ndarray, im_size: tuple[int, ...], crop_box: list[int],
                           orig_size: tuple[int, ...]) -> MaskData:
            # segment_anything's _process_batch, plus the level of each mask.
            orig_h, orig_w = orig_size
            transformed = self.predictor.transform.apply_coords(points, im_size)
            in_points = torch.as_tensor(transformed, device=self.predictor.device)
            in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=in_points.device)
            masks, iou_preds, _ = self.predictor.predict_torch(in_points[:, None, :], in_labels[:, None],
                                                               multimask_output=True, return_logits=True)
            sel = torch.as_tensor(self.levels, device=masks.device)
            masks, iou_preds = masks[:, sel], iou_preds[:, sel]
            L = len(self.levels)
            data = MaskData(masks=masks.flatten(0, 1).float(), iou_preds=iou_preds.flatten(0, 1).float(),
                            points=torch.as_tensor(points.repeat(L, axis=0)),  # row b * L + l: point b, level l
                            level=torch.tensor(self.levels).repeat(points.shape[0]))
            del masks
            if self.pred_iou_thresh > 0.0:
                data.filter(data["iou_preds"] > self.pred_iou_thresh)
            data["stability_score"] = calculate_stability_score(
                data["masks"], self.predictor.model.mask_threshold, self.stability_score_offset)
            if self.stability_score_thresh > 0.0:
                data.filter(data["stability_score"] >= self.stability_score_thresh)
            data["masks"] = data["masks"] > self.predictor.model.mask_threshold
            data["boxes"] = batched_mask_to_box(data["masks"])
            keep = ~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
            if not torch.all(keep):
                data.filter(keep)
            data["masks"] = uncrop_masks(data["masks"], crop_box, orig_h, orig_w)
            data["rles"] = mask_to_rle_pytorch(data["masks"])
            del data["masks"]
            return data

        def _process_crop(self, image: np.ndarray, crop_box: list[int], crop_layer_idx: int,
                          orig_size: tuple[int, ...]) -> MaskData:
            # segment_anything's _process_crop with the NMS run per level (category = level).
            x0, y0, x1, y1 = crop_box
            cropped = image[y0:y1, x0:x1, :]
            size = cropped.shape[:2]
            self.predictor.set_image(cropped)
            pts = self.point_grids[crop_layer_idx] * np.array(size)[None, ::-1]
            data = MaskData()
            for (batch,) in batch_iterator(self.points_per_batch, pts):
                data.cat(self._process_batch(batch, size, crop_box, orig_size))
            self.predictor.reset_image()
            keep = batched_nms(data["boxes"].float(), data["iou_preds"], data["level"],
                               iou_threshold=self.box_nms_thresh)
            data.filter(keep)
            data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
            data["points"] = uncrop_points(data["points"], crop_box)
            data["crop_boxes"] = torch.tensor([crop_box for _ in range(len(data["rles"]))])
            return data

        def generate_levels(self, image: np.ndarray) -> list[dict[str, Any]]:
            """Masks of ``image`` with their level.

            Args:
                image: (H, W, 3) uint8 RGB.

            Returns:
                Records like ``SamAutomaticMaskGenerator.generate``'s binary-mask output (``segmentation`` (H, W)
                bool, ``area``, ``predicted_iou``, ``stability_score``) plus ``level`` (0 subpart, 1 part,
                2 whole).
            """
            data = self._generate_masks(image)
            if len(data["rles"]) and self.min_mask_region_area > 0:
                data = self.postprocess_small_regions(data, self.min_mask_region_area,
                                                      max(self.box_nms_thresh, self.crop_nms_thresh))
            out = []
            for i in range(len(data["rles"])):
                m = rle_to_mask(data["rles"][i])
                out.append({"segmentation": m, "area": int(m.sum()), "predicted_iou": float(data["iou_preds"][i]),
                            "stability_score": float(data["stability_score"][i]), "level": int(data["level"][i])})
            return out

    return LevelMaskGenerator(sam, **kwargs)
