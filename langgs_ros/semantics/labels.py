"""The ``labels`` semantic source: a label image aligned with the colour image + label id -> name.

Each label id present in a frame (id > 0, at least ``min_pixels`` pixels) becomes an instance whose embedding is
its name embedded by the source's text encoder, so instance embeddings and query embeddings come from the same
:meth:`TextEncoder.encode_text` (identical text -> identical vector). This is an oracle 2D segmenter on real
geometry (e.g. the hand-made labels of ``../shared/data/hololens_office/annotations``), or the adapter for any
external segmenter that publishes label images.

Label ids are either instance ids (``ids_are_instances=True``, default: one instance per id) or class ids
(``False``). Class ids are split into instances by 3D connectivity (:func:`split_by_3d_connectivity`): the class's
pixels with valid depth are back-projected with the frame's depth and intrinsics and clustered by single linkage at
``link_distance`` (connected components of a voxelised cloud, :func:`link_components`), so two chairs of one class
far apart in space become two instances even when they touch in the image. Fragments smaller than ``min_fraction``
of the class's largest part (depth holes cutting an object, flying pixels at depth edges, background inside a
labelled box) are merged into the nearest large part; class pixels without valid depth join the part of the nearest
(2D) class pixel that has depth. A class with no valid depth at all — or a frame without depth/intrinsics — falls
back to 8-connected 2D components (logged once). Limits: two objects of one class closer than ``link_distance``
(default 0.25 m) stay one instance; an object whose visible depth has a gap wider than that (oblique views with
depth holes) may split; a genuinely separate instance smaller than ``min_fraction`` of the largest is merged.
Parts with fewer than ``min_pixels`` pixels are dropped (pixels -> ``NO_INSTANCE``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from langgs_ros.semantics.base import SemanticSource, TextEncoder, register_semantic_source
from langgs_ros.semantics.text import make_text_encoder
from langgs_ros.types import NO_INSTANCE, Frame, FrameSegmentation

log = logging.getLogger(__name__)


def load_label_names(path: str | Path) -> dict[int, str]:
    """Read label id -> name from JSON.

    Accepts the hololens ``annotations/objects.json`` layout (``{"objects": [{"id": 1, "name": "sofa"}, ...]}``),
    a list of such objects, or a plain mapping ``{"1": "sofa", ...}``.

    Raises:
        ValueError: unreadable layout or non-integer ids. FileNotFoundError: no such file.
    """
    data: Any = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "objects" in data:
        data = data["objects"]
    try:
        if isinstance(data, list):
            return {int(o["id"]): str(o["name"]) for o in data}
        if isinstance(data, dict):
            return {int(k): str(v) for k, v in data.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read label names ({exc})") from exc
    raise ValueError(f"{path}: expected a mapping id -> name or a list of objects with 'id' and 'name'")


def _valid_depth(depth: np.ndarray) -> np.ndarray:
    return np.isfinite(depth) & (depth > 0)


def link_components(points: np.ndarray, link_distance: float) -> np.ndarray:
    """Single-linkage clusters of a point cloud at about ``link_distance``.

    Points are averaged per voxel of edge ``link_distance / 4``; voxel centroids closer than ``link_distance`` are
    linked and the connected components of that graph are the clusters (DBSCAN with ``min_samples=1`` on the
    voxelised cloud). Gaps shorter than about ``link_distance`` are bridged (exact up to the centroid shift within
    a voxel, typically a few centimetres).

    Args:
        points: (N, 3) float points in metres (any frame).
        link_distance: linking distance in metres (> 0).

    Returns:
        (N,) int64 cluster label per point, 0..C-1, numbered by first appearance in ``points``.

    Raises:
        ValueError: ``link_distance`` <= 0.
    """
    if link_distance <= 0:
        raise ValueError(f"link_distance must be > 0, got {link_distance}")
    if len(points) == 0:
        return np.zeros(0, np.int64)
    pts = np.asarray(points, np.float64)
    vox = np.floor(pts / (0.25 * link_distance)).astype(np.int64)
    _, inverse, counts = np.unique(vox, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    n = len(counts)
    centroids = np.zeros((n, 3))
    np.add.at(centroids, inverse, pts)
    centroids /= counts[:, None]
    pairs = cKDTree(centroids).query_pairs(r=link_distance, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    labels = comp[inverse]
    # Renumber by first appearance, independent of scipy's numbering.
    _, first, relabel = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    return rank[relabel.reshape(-1)].astype(np.int64)


def split_by_3d_connectivity(mask: np.ndarray, depth: np.ndarray | None, intrinsics: np.ndarray | None,
                             link_distance: float = 0.25, min_fraction: float = 0.05,
                             min_pixels: int = 50) -> tuple[np.ndarray, int]:
    """Split one class's pixels into spatially separate parts (instances).

    1. The class's pixels with valid depth are back-projected (camera frame) and clustered by single linkage at
       ``link_distance`` (:func:`link_components`).
    2. Fragments with fewer than ``max(min_pixels, min_fraction * largest part)`` pixels (depth holes cutting an
       object, flying pixels, background inside a labelled box) are merged into the nearest (3D) large part.
    3. Class pixels without valid depth take the part of the nearest (2D) class pixel that has depth.

    If no class pixel has valid depth, or ``depth``/``intrinsics`` is None, the 8-connected 2D components of
    ``mask`` are returned instead.

    Args:
        mask: (H, W) bool pixels of the class.
        depth: (H, W) float z-depth in metres (0/NaN/inf invalid) or None.
        intrinsics: (3, 3) pinhole K in pixels or None.
        link_distance: metres; parts closer than this are one instance.
        min_fraction, min_pixels: fragment size rule of step 2.

    Returns:
        (parts, C): (H, W) int32 part id 0..C-1 on ``mask`` pixels, -1 elsewhere; C parts (largest-first order is
        not guaranteed; ids follow first appearance in row-major pixel order).

    Raises:
        ValueError: shape mismatch or bad parameters.
    """
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got {mask.shape}")
    H, W = mask.shape
    out = np.full((H, W), -1, np.int32)
    if not mask.any():
        return out, 0
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    sub = mask[y0:y1, x0:x1]
    valid = np.zeros_like(sub)
    if depth is not None and intrinsics is not None:
        depth = np.asarray(depth)
        if depth.shape != (H, W):
            raise ValueError(f"depth shape {depth.shape} != mask shape {(H, W)}")
        dsub = depth[y0:y1, x0:x1]
        valid = sub & _valid_depth(dsub)
    if not valid.any():
        comp2d, n = ndimage.label(sub, structure=np.ones((3, 3), bool))
        out[y0:y1, x0:x1] = comp2d - 1
        return out, int(n)
    K = np.asarray(intrinsics, np.float64)
    vy, vx = np.nonzero(valid)
    z = dsub[vy, vx].astype(np.float64)
    pts = np.stack([(vx + x0 - K[0, 2]) * z / K[0, 0], (vy + y0 - K[1, 2]) * z / K[1, 1], z], axis=1)
    comp = link_components(pts, link_distance)
    sizes = np.bincount(comp)
    big = sizes >= max(float(min_pixels), float(min_fraction) * float(sizes.max()))
    big[int(np.argmax(sizes))] = True  # the largest part always stays (even below min_pixels)
    if not big.all():
        big_pts = big[comp]
        small_pts = ~big_pts
        _, nearest = cKDTree(pts[big_pts]).query(pts[small_pts])
        comp[small_pts] = comp[big_pts][nearest]
    # Compact ids 0..C-1 in first-appearance order.
    _, first, relabel = np.unique(comp, return_index=True, return_inverse=True)
    comp = np.argsort(np.argsort(first))[relabel.reshape(-1)]
    lab = np.full(sub.shape, -1, np.int32)
    lab[vy, vx] = comp.astype(np.int32)
    missing = sub & (lab < 0)
    if missing.any():
        _, (iy, ix) = ndimage.distance_transform_edt(lab < 0, return_indices=True)
        lab[missing] = lab[iy[missing], ix[missing]]
    out[y0:y1, x0:x1] = lab
    return out, int(comp.max()) + 1


@register_semantic_source("labels")
class LabelSemanticSource(SemanticSource):
    """Label image + names -> instances embedded from their names.

    Args:
        label_names: label id -> name; used for ids the frame's own ``Frame.label_names`` does not name (the
            frame's names take precedence). Or a path to a JSON file (:func:`load_label_names`).
        text_encoder: a :class:`TextEncoder`, or a kind for :func:`~langgs_ros.semantics.text.make_text_encoder`
            ("minilm", "open_clip"), or None: the CLIP text tower when CLIP weights are configured
            (``clip_pretrained`` or ``clip_checkpoint`` given), otherwise MiniLM.
        ids_are_instances: True — each id is one instance; False — ids are classes, split by 3D connectivity.
        min_pixels: ids (and class components) with fewer pixels are ignored (pixels -> ``NO_INSTANCE``).
        link_distance: metres; class parts closer than this are one instance (``ids_are_instances`` False).
        min_fraction: class fragments smaller than this fraction of the largest part are merged into the nearest
            large part (``ids_are_instances`` False).
        device: torch device of the text encoder when one is built here.
        clip_model, clip_pretrained, clip_checkpoint: CLIP text encoder configuration (see above).

    Attributes:
        text_encoder: the encoder used for names (and for queries by the query engine).

    Raises:
        ValueError: bad arguments. FileNotFoundError: weights of the chosen encoder missing.
    """

    name = "labels"

    def __init__(self, label_names: Mapping[int, str] | str | Path | None = None,
                 text_encoder: TextEncoder | str | None = None, ids_are_instances: bool = True,
                 min_pixels: int = 50, link_distance: float = 0.25,
                 min_fraction: float = 0.05, device: str | torch.device = "cpu",
                 clip_model: str = "ViT-B-16", clip_pretrained: str | None = None,
                 clip_checkpoint: str | Path | None = None) -> None:
        if min_pixels < 1:
            raise ValueError(f"min_pixels must be >= 1, got {min_pixels}")
        if link_distance <= 0 or not 0.0 <= min_fraction <= 1.0:
            raise ValueError(f"need link_distance > 0 and 0 <= min_fraction <= 1, got {link_distance}, {min_fraction}")
        if isinstance(label_names, (str, Path)):
            label_names = load_label_names(label_names)
        self.label_names: dict[int, str] = {int(k): str(v) for k, v in (label_names or {}).items()}
        self.ids_are_instances = bool(ids_are_instances)
        self.min_pixels = int(min_pixels)
        self.link_distance = float(link_distance)
        self.min_fraction = float(min_fraction)
        if isinstance(text_encoder, TextEncoder):
            self.text_encoder = text_encoder
        else:
            kind = text_encoder
            clip_kwargs = dict(model_name=clip_model, pretrained=clip_pretrained, checkpoint=clip_checkpoint)
            if kind is None:
                kind = "open_clip" if (clip_pretrained or clip_checkpoint) else "minilm"
            if kind in ("open_clip", "clip"):
                if clip_pretrained is None and clip_checkpoint is None:
                    clip_kwargs["pretrained"] = "laion2b_s34b_b88k"
                self.text_encoder = make_text_encoder(kind, device=device, **clip_kwargs)
            else:
                self.text_encoder = make_text_encoder(kind, device=device)
        self._warned: set[int] = set()
        self._warned_no_depth = False

    def _names_for(self, frame: Frame) -> dict[int, str]:
        names = dict(self.label_names)
        if frame.label_names:
            names.update({int(k): str(v) for k, v in frame.label_names.items()})
        return names

    def _check(self, frame: Frame) -> np.ndarray:
        if frame.labels is None:
            raise ValueError(f"frame {frame.frame_id!r} has no label image (the 'labels' source needs Frame.labels)")
        labels = np.asarray(frame.labels)
        if labels.shape != tuple(frame.rgb.shape[:2]):
            raise ValueError(f"frame {frame.frame_id!r}: label image shape {labels.shape} != rgb shape "
                             f"{tuple(frame.rgb.shape[:2])}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"frame {frame.frame_id!r}: label image must be integer, got {labels.dtype}")
        return labels

    def segment_one(self, frame: Frame) -> FrameSegmentation:
        """Segment one frame (see :meth:`segment`)."""
        labels = self._check(frame)
        H, W = labels.shape
        names = self._names_for(frame)
        ids, counts = np.unique(labels, return_counts=True)
        instance_ids = np.full((H, W), NO_INSTANCE, np.int32)
        inst_names: list[str | None] = []
        class_ids: list[int] = []
        for lid, cnt in zip(ids.tolist(), counts.tolist()):
            if lid <= 0 or cnt < self.min_pixels:
                continue
            name = names.get(int(lid))
            if name is None:
                if lid not in self._warned:
                    log.warning("labels source: label id %d has no name (frame %r); its pixels are skipped",
                                lid, frame.frame_id)
                    self._warned.add(int(lid))
                continue
            mask = labels == lid
            if self.ids_are_instances:
                parts = [mask]
            else:
                depth, K = frame.depth, frame.intrinsics
                if (depth is None or K is None) and not self._warned_no_depth:
                    log.warning("labels source: frame %r lacks depth or intrinsics; class ids are split by 2D "
                                "connectivity instead of 3D", frame.frame_id)
                    self._warned_no_depth = True
                comp, n = split_by_3d_connectivity(mask, depth, K, self.link_distance, self.min_fraction,
                                                   self.min_pixels)
                parts = [comp == c for c in range(n)]
            for part in parts:
                if int(part.sum()) < self.min_pixels:
                    continue
                instance_ids[part] = len(inst_names)
                inst_names.append(name)
                class_ids.append(int(lid))
        if inst_names:
            unique = sorted(set(n for n in inst_names if n is not None))
            table = dict(zip(unique, self.text_encoder.encode_text(unique)))
            emb = torch.stack([table[n] for n in inst_names]).float()
        else:
            emb = torch.zeros(0, self.text_encoder.dim, dtype=torch.float32)
        return FrameSegmentation(instance_ids=instance_ids, embeddings=emb, names=inst_names, class_ids=class_ids)

    def segment(self, frames: Sequence[Frame]) -> list[FrameSegmentation]:
        """Instances from each frame's label image.

        Returns:
            Per frame: ``instance_ids`` (H, W) int32 (0..K-1, -1 for background/unnamed/small ids), ``embeddings``
            (K, D) float32 unit rows = ``text_encoder.encode_text(names)``, ``names`` (K,), ``class_ids`` (K,) the
            label id of each instance. Instances are ordered by label id (and, for class splitting, by component).

        Raises:
            ValueError: a frame has no label image, or its shape differs from the rgb image's.
        """
        return [self.segment_one(f) for f in frames]
