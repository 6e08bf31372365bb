"""Parameter table of ``mapping_node``: defaults, units, ranges, and when each parameter may change.

Every parameter is declared with a :class:`rcl_interfaces.msg.ParameterDescriptor` (description with units,
``FloatingPointRange`` / ``IntegerRange`` where numeric, ``read_only`` where it must never change after start),
as Nav2's servers do. Three kinds of change:

- ``RUNTIME``: applied while the node runs (``ros2 param set``), e.g. ``sync_tolerance``, ``query.min_score``.
- ``CONFIGURE``: read in ``on_configure`` (models, backend, frames, queue sizes); a set is accepted only while the
  node is *unconfigured* and rejected with a reason otherwise (``deactivate`` + ``cleanup`` first).
- ``READ_ONLY``: fixed at start (``read_only=True`` in the descriptor: file confinement and ``autostart``).

Invalid values (out of range, unknown choice) are refused and never stored: ranges by rclpy itself, choices and
cross-checks by :func:`validate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

RUNTIME, CONFIGURE, READ_ONLY = "runtime", "configure", "read_only"

DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: default value (its type is the parameter's type), description with units, change kind,
    an inclusive numeric range ``(low, high)`` and, for strings, the allowed choices."""

    default: Any
    description: str
    change: str = CONFIGURE
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None


INT_MAX = 2**31 - 1
_BIG = 1e9

PARAMETERS: dict[str, ParamSpec] = {
    # ------------------------------------------------------------------ lifecycle and frames
    "autostart": ParamSpec(True, "Configure and activate on start (plain runs); false = wait for a lifecycle "
                                 "manager (ros2 lifecycle set).", READ_ONLY),
    "map_frame": ParamSpec("map", "Frame of the map for pose_source tf (REP-105 map). With odometry poses the map "
                                  "is built (and stamped) in the odometry message's header frame instead."),
    "camera_frame": ParamSpec("", "Camera optical frame; empty = the image header's frame_id."),
    "device": ParamSpec("auto", "Torch device of the pipeline: auto (cuda when available, else cpu), cpu, cuda, "
                                "cuda:N."),
    "pose_source": ParamSpec("auto", "Camera poses: tf (tf2 lookup map_frame <- camera at the image stamp), "
                                     "odometry (odom topic, interpolated, + camera extrinsic), none (unposed: "
                                     "feedforward backend), auto (tf if tf2_ros is installed, else odometry).",
                             choices=("auto", "tf", "odometry", "none")),
    "camera_extrinsic_xyz": ParamSpec([0.0, 0.0, 0.0], "Odometry child frame -> camera optical frame translation, "
                                                       "m."),
    "camera_extrinsic_rpy": ParamSpec([0.0, 0.0, 0.0], "Odometry child frame -> camera optical frame roll/pitch/"
                                                       "yaw, rad."),
    # ------------------------------------------------------------------ stamp matching and time
    "sync_tolerance": ParamSpec(0.05, "Max stamp difference (s) between a colour image and its depth, labels and "
                                      "odometry. A partner is final only when exact or bracketed by a later one.",
                                RUNTIME, (0.0, 10.0)),
    "sync_timeout": ParamSpec(3.0, "s (wall clock) a colour image waits for its partners before the nearest "
                                   "within sync_tolerance is taken or the frame is dropped (counted).",
                              RUNTIME, (0.01, 600.0)),
    "time_jump_threshold": ParamSpec(1.0, "s a stamp may go back before it counts as a time jump (bag loop, "
                                          "simulator reset): pending buffers are cleared, the map is kept.",
                                     RUNTIME, (0.0, _BIG)),
    "camera_info_timeout": ParamSpec(5.0, "s without CameraInfo (while images arrive) before a diagnostics "
                                          "warning.", RUNTIME, (0.1, _BIG)),
    # ------------------------------------------------------------------ pipeline
    "backend": ParamSpec("rgbd", "Reconstruction backend: rgbd (depth + poses) or feedforward (VGGT, unposed).",
                         choices=("rgbd", "feedforward")),
    "semantic_source": ParamSpec("clip_sam", "Semantic source: clip_sam (SAM masks + CLIP) or labels (label image "
                                             "topic + text encoder).", choices=("clip_sam", "labels")),
    "label_names_file": ParamSpec("", "JSON with label id -> name (objects.json layout or a plain {id: name} map)."),
    "window.size": ParamSpec(8, "Keyframes per reconstruction window.", range=(1, 256)),
    "window.overlap": ParamSpec(2, "Keyframes shared by consecutive windows (< window.size).", range=(0, 255)),
    "window_period": ParamSpec(5.0, "s: a partial window is processed after this long without a full one "
                                    "(0 = never).", RUNTIME, (0.0, _BIG)),
    "keyframe.min_translation": ParamSpec(0.10, "m of camera motion that makes a keyframe.", RUNTIME, (0.0, _BIG)),
    "keyframe.min_rotation": ParamSpec(0.14, "rad of camera rotation that makes a keyframe.", RUNTIME,
                                       (0.0, math.pi)),
    "keyframe.min_image_change": ParamSpec(0.06, "Mean grey change in [0, 1] that makes a keyframe (unposed).",
                                           RUNTIME, (0.0, 1.0)),
    "keyframe.max_interval": ParamSpec(5.0, "s after which a frame is a keyframe regardless of motion.", RUNTIME,
                                       (0.0, _BIG)),
    "max_depth": ParamSpec(10.0, "m; depth beyond this is invalid.", range=(0.01, 1000.0)),
    "max_gaussians": ParamSpec(2_000_000, "Bound of the map's Gaussian count (eviction policy: see fusion docs).",
                               range=(1, INT_MAX)),
    "voxel_size": ParamSpec(0.02, "m; base voxel size of the geometric sparsification.", range=(1e-4, 10.0)),
    "pixel_block": ParamSpec(1, "b x b pixel blocks averaged into one surfel before fusion (1 = one per pixel; 2 "
                                "halves surfel creation and fusion time).", range=(1, 16)),
    # ------------------------------------------------------------------ queues
    "queue.max_frames": ParamSpec(30, "Frames waiting for the worker; oldest dropped (counted) beyond.",
                                  range=(1, 10_000)),
    "queue.sync_frames": ParamSpec(40, "Colour images (and each partner topic's messages) buffered while waiting "
                                       "for their partners; oldest dropped (counted) beyond.", range=(1, 10_000)),
    "queue.sensor_depth": ParamSpec(10, "History depth of the best-effort camera subscriptions (messages).",
                                    range=(1, 1000)),
    "queue.max_windows": ParamSpec(2, "Windows waiting for the worker; oldest dropped (counted) beyond.",
                                   range=(1, 1000)),
    # ------------------------------------------------------------------ outputs
    "publish.gaussians_period": ParamSpec(2.0, "s between ~/gaussians publications (only when the map changed).",
                                          RUNTIME, (0.0, _BIG)),
    "publish.max_points": ParamSpec(2_000_000, "At most this many Gaussians per ~/gaussians message (highest "
                                               "opacity).", RUNTIME, (1, INT_MAX)),
    "query.top_k": ParamSpec(5, "Default number of /find_object results.", RUNTIME, (1, 1000)),
    "query.min_score": ParamSpec(0.5, "Default minimum relevancy score in [0, 1].", RUNTIME, (0.0, 1.0)),
    # ------------------------------------------------------------------ map files and limits
    "map_dir": ParamSpec("~/.ros/langgs_maps", "Directory of map files: save/load names are relative to it.",
                         READ_ONLY),
    "allow_any_path": ParamSpec(False, "Allow save/load paths outside map_dir (absolute, '..', symlinks out).",
                                READ_ONLY),
    "autosave_period": ParamSpec(0.0, "s between autosaves of a changed map (0 = off).", RUNTIME, (0.0, _BIG)),
    "autosave_path": ParamSpec("", "Autosave map name (relative to map_dir; a sidecar is written beside it)."),
    "load_on_start": ParamSpec(False, "Load autosave_path on configure when it exists."),
    "limits.max_map_file_bytes": ParamSpec(2**30, "Largest map file (PLY or sidecar) that load_map reads, "
                                                      "bytes.", RUNTIME, (1, 2**62)),
    "limits.max_image_pixels": ParamSpec(3840 * 2160, "Largest accepted image (width x height, pixels); larger "
                                                      "images are dropped (counted).", RUNTIME, (1, 2**40)),
    "limits.max_query_chars": ParamSpec(1000, "Longest /find_object query, characters.", RUNTIME, (1, 1_000_000)),
    "limits.worker_command_timeout": ParamSpec(30.0, "s a map edit (load_map, reset) waits for the worker to "
                                                     "finish its current window; then it is refused, map unchanged.",
                                               RUNTIME, (0.001, 3600.0)),
    "limits.max_negatives": ParamSpec(16, "Most negative phrases per /find_object request.", RUNTIME, (0, 10_000)),
    # ------------------------------------------------------------------ models
    "semantic.clip_model": ParamSpec("ViT-B-16", "open_clip model name (clip_sam)."),
    "semantic.clip_pretrained": ParamSpec("laion2b_s34b_b88k", "open_clip pretrained tag or checkpoint path."),
    "semantic.sam_model_type": ParamSpec("vit_b", "segment-anything model type (vit_b, vit_l, vit_h).",
                                         choices=("vit_b", "vit_l", "vit_h")),
    "semantic.sam_checkpoint": ParamSpec("", "segment-anything checkpoint path; empty = the download cache."),
    "semantic.points_per_side": ParamSpec(16, "SAM automatic mask generator grid (points per image side).",
                                          range=(1, 256)),
    "semantic.preset": ParamSpec("full", "full (real weights) or tiny (random-init test models).",
                                 choices=("full", "tiny")),
    "semantic.points_per_batch": ParamSpec(64, "SAM prompts per decoder batch.", range=(1, 4096)),
    "semantic.pred_iou_thresh": ParamSpec(0.88, "SAM mask filter: predicted IoU at least this.", range=(0.0, 1.0)),
    "semantic.stability_score_thresh": ParamSpec(0.95, "SAM mask filter: stability score at least this.",
                                                       range=(0.0, 1.0)),
    "semantic.box_nms_thresh": ParamSpec(0.7, "SAM box NMS IoU threshold (within each mask level).", range=(0.0, 1.0)),
    "semantic.min_mask_region_area": ParamSpec(0, "px; SAM removes holes and islands smaller than this (0 = off).",
                                                  range=(0, 10_000_000)),
    "semantic.crop_n_layers": ParamSpec(0, "SAM extra image-crop layers (0 = whole image only).", range=(0, 4)),
    "semantic.mask_levels": ParamSpec(["whole", "part"], "SAM multimask levels kept: a subset of whole, part, "
                                                         "subpart."),
    "semantic.clip_checkpoint": ParamSpec("", "open_clip weights file; empty = the pretrained tag's cache."),
    "semantic.precision": ParamSpec("auto", "Autocast dtype of SAM and CLIP (auto: bf16, else fp16 on CUDA; fp32 "
                                            "on CPU).", choices=("auto", "fp32", "fp16", "bf16")),
    "semantic.crop_contexts": ParamSpec([0.1, 0.4, 1.0], "Multi-crop CLIP feature: one crop per value, the mask box "
                                                         "grown by that fraction of its larger side; embeddings "
                                                         "averaged."),
    "semantic.background_keep": ParamSpec(0.3, "Weight of the original pixels outside the mask in a crop (rest: CLIP "
                                               "mean colour).", range=(0.0, 1.0)),
    "semantic.subtract_smaller": ParamSpec(True, "Crops show only the mask's own visible pixels (smaller masks over it "
                                                 "greyed)."),
    "semantic.batch_size": ParamSpec(32, "Crops per CLIP forward pass (all frames of a window batched).",
                                         range=(1, 4096)),
    "semantic.max_masks": ParamSpec(100, "Most instances per frame (largest visible area kept).", range=(0, 10_000)),
    "semantic.min_pixels": ParamSpec(50, "px; smallest visible area of an instance.", range=(1, 10_000_000)),
    "semantic.overlap": ParamSpec("area", "Overlapping masks: area (smaller overwrite larger) or iou (higher predicted "
                                          "IoU wins).", choices=("area", "iou")),
    "semantic.stuff": ParamSpec("label", "Large planar masks: label (wall / floor / ceiling instances), drop (no "
                                         "instance) or keep (as objects).", choices=("label", "drop", "keep")),
    "semantic.stuff_min_area": ParamSpec(0.08, "Fraction of the image a mask must cover to be tested as stuff.",
                                               range=(0.0, 1.0)),
    "semantic.stuff_inlier_distance": ParamSpec(0.03, "m; plane-fit inlier distance of a stuff mask.",
                                                      range=(0.0, 10.0)),
    "semantic.stuff_inlier_fraction": ParamSpec(0.85, "Fraction of a mask's points within the inlier distance to be "
                                                      "planar.", range=(0.0, 1.0)),
    "semantic.stuff_normal_cos": ParamSpec(0.9, "|n . up| at least this: horizontal (floor / ceiling); at most "
                                                "sqrt(1 - this^2): vertical (wall).", range=(0.0, 1.0)),
    "semantic.stuff_floor_below": ParamSpec(0.9, "m below the camera for a horizontal plane to be floor.",
                                                 range=(0.0, 100.0)),
    "semantic.stuff_ceiling_above": ParamSpec(0.5, "m above the camera for a horizontal plane to be ceiling.",
                                                   range=(0.0, 100.0)),
    "feedforward.preset": ParamSpec("vggt_1b", "VGGT preset: vggt_1b (released weights) or tiny.",
                                    choices=("vggt_1b", "tiny")),
    "feedforward.weights": ParamSpec("", "VGGT checkpoint path or Hugging Face repo id; empty = default repo."),
    "feedforward.image_width": ParamSpec(518, "px; model input width (multiple of 14; 518 for the released "
                                              "weights).", range=(14, 4096)),
    "feedforward.camera_info": ParamSpec("replace", "With CameraInfo: replace predicted intrinsics (rescaling "
                                                    "depth), check (log the focal error) or ignore.",
                                         choices=("replace", "check", "ignore")),
    "feedforward.allow_random_weights": ParamSpec(False, "Run a preset without weights (random init; tests/"
                                                         "plumbing only)."),
    "unposed.camera_height": ParamSpec(0.0, "m: declared camera height above the floor, the scale prior of unposed "
                                            "maps (pose_source none); 0 = none, the map keeps the network's units.",
                                       range=(0.0, 100.0)),
    "unposed.anchors": ParamSpec(2, "Map keyframes reconstructed with every unposed window to register it "
                                    "against the map (0 = chain through the window overlap only).", range=(0, 16)),
    "unposed.max_relocalisations": ParamSpec(2, "Further anchor sets tried when a window's anchors fail (each "
                                                "costs a network call).", range=(0, 16)),
    "unposed.relevel_every": ParamSpec(4, "Re-estimate the unposed map's floor, up and scale on all its keyframes "
                                          "every N windows (and at windows 2 and 4), moving the map when they "
                                          "change; 0 = keep the first window's estimate.", range=(0, 10000)),
    # ------------------------------------------------------------------ photometric refinement (langgs_ros.refine)
    "refine.steps": ParamSpec(0, "Adam steps of photometric refinement per fused window (colour, opacity, scale, "
                                 "mean against the window's frames; gsplat on CUDA); 0 = off.", range=(0, 100_000)),
    "refine.max_seconds": ParamSpec(2.0, "s; wall-clock bound of one window's refinement.", range=(0.01, 3600.0)),
    "refine.downscale": ParamSpec(1, "Refine on images down-scaled by this integer factor (cost ~ pixels).",
                                  range=(1, 16)),
}


def descriptor(name: str, spec: ParamSpec):
    """The :class:`rcl_interfaces.msg.ParameterDescriptor` of one parameter (ranges, read-only, description)."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

    desc = spec.description
    if spec.choices:
        desc += f" One of: {', '.join(spec.choices)}."
    if spec.change == CONFIGURE:
        desc += " [applied on configure]"
    elif spec.change == RUNTIME:
        desc += " [changeable at run time]"
    d = ParameterDescriptor(name=name, description=desc, read_only=spec.change == READ_ONLY)
    if spec.range is not None:
        lo, hi = spec.range
        if isinstance(spec.default, bool):
            pass
        elif isinstance(spec.default, int):
            d.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=1)]
        elif isinstance(spec.default, float):
            d.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)]
    return d


def validate(name: str, value: Any, current: dict[str, Any] | None = None) -> str | None:
    """Why ``value`` is not acceptable for parameter ``name`` (None when it is).

    Checks what descriptors cannot express: string choices, devices, the window overlap against the window size,
    finite numbers, 3-vectors. ``current`` holds the other parameters' values for cross-checks.
    """
    spec = PARAMETERS.get(name)
    if spec is None:
        return None
    if spec.choices and value not in spec.choices:
        return f"{name} must be one of {', '.join(spec.choices)}; got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} must be finite; got {value}"
    if spec.range is not None and isinstance(value, int | float) and not isinstance(value, bool):
        lo, hi = spec.range
        if not lo <= value <= hi:
            return f"{name} must be in [{lo:g}, {hi:g}]; got {value}"
    if name == "device":
        v = str(value)
        ok = v in DEVICE_CHOICES or (v.startswith("cuda:") and v[5:].isdigit())
        if not ok:
            return f"device must be auto, cpu, cuda or cuda:N; got {value!r}"
    if name in ("camera_extrinsic_xyz", "camera_extrinsic_rpy"):
        vals = list(value)
        if len(vals) != 3 or not all(math.isfinite(float(x)) for x in vals):
            return f"{name} must be 3 finite numbers; got {vals}"
    if name == "semantic.mask_levels":
        levels = [str(x) for x in value]
        if not levels or any(x not in ("whole", "part", "subpart") for x in levels) or len(set(levels)) < len(levels):
            return f"semantic.mask_levels must be distinct values of whole, part, subpart; got {levels}"
    if name == "semantic.crop_contexts":
        vals = [float(x) for x in value]
        if not vals or any(not math.isfinite(x) or x < 0 for x in vals):
            return f"semantic.crop_contexts must be finite values >= 0; got {vals}"
    if current is not None and name in ("window.size", "window.overlap"):
        size = value if name == "window.size" else current.get("window.size", 8)
        overlap = value if name == "window.overlap" else current.get("window.overlap", 2)
        if overlap >= size:
            return f"window.overlap ({overlap}) must be smaller than window.size ({size})"
    return None


def resolve_device(value: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is usable, else ``cpu``; other values unchanged."""
    if value != "auto":
        return value
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
