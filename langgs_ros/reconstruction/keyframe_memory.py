"""Keyframe memory of the map for unposed mapping: stored keyframes, anchor selection and relocalisation order.

Every frame placed in the map by the :class:`~langgs_ros.reconstruction.alignment.WindowAligner` is kept here (up
to ``capacity``) with what is needed to register later windows against the map rather than against the previous
window:

* its colour image and CameraInfo (so it can be fed to the network again as an *anchor*);
* its :class:`~langgs_ros.reconstruction.alignment.FrameGeometry` in the reconstruction frame ``R`` (a sparse grid of
  3-D points from its first placement, the target of the window-to-map Sim(3) fit);
* a global image descriptor (:func:`image_descriptor`) to find keyframes that look like the newest frames.

Each new window is reconstructed together with ``k`` anchor keyframes chosen by :meth:`KeyframeMemory.anchor_sets`
(the keyframes most similar to the window's newest frames), so a window whose predecessor was dropped or failed is
still placed through its anchors; this is the submap-anchoring of VGGT-Long (arXiv 2507.16443, Sec. 3.2) and
VGGT-SLAM (arXiv 2505.12549, Sec. 3), with the anchors chosen by image retrieval instead of by time. When the
first anchors fail, later candidate sets give *relocalisation* attempts: the next most similar keyframes, then
keyframes spread over the whole memory.

When full, the most redundant keyframe (highest descriptor similarity to another stored one, the newest
``keep_recent`` excepted) is evicted, so the memory keeps covering the whole map rather than only its recent part.

Not thread-safe (owned by the aligner, i.e. the mapping worker thread). ROS-free, numpy + OpenCV.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from langgs_ros.types import Frame

__all__ = ["DESCRIPTOR_BINS", "Keyframe", "KeyframeMemory", "image_descriptor"]

DESCRIPTOR_BINS = (12, 6)
"""(hue, saturation) bins per quadrant of :func:`image_descriptor`."""

FrameKey = tuple[str, float]


def image_descriptor(rgb: np.ndarray) -> np.ndarray:
    """A global image descriptor: hue-saturation histograms of the image's 2x2 quadrants (Hellinger-normalised).

    Per quadrant a 2-D histogram of hue (12 bins over OpenCV's 0..180) and saturation (6 bins), as in colour
    indexing (Swain & Ballard, "Color indexing", IJCV 7(1), 1991) with the spatial 2x2 pyramid level of Lazebnik
    et al. (CVPR 2006); square-rooted and L2-normalised, so the dot product of two descriptors is the Bhattacharyya
    coefficient of the histograms, in [0, 1]. Value (brightness) is not used. On the hololens sequence the
    previous frame is the best match of a frame among all earlier ones (median rank 0; a grey 32x24 thumbnail
    gives median rank 10).

    Args:
        rgb: (H, W, 3) uint8 RGB image.

    Returns:
        (288,) float32 unit vector (zeros for an empty histogram).

    Raises:
        ValueError: not an (H, W, 3) uint8 image.
    """
    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or a.shape[0] < 2 or a.shape[1] < 2:
        raise ValueError(f"rgb must be an (H, W, 3) uint8 image, got {a.shape} {a.dtype}")
    hsv = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGB2HSV)
    H, W = hsv.shape[:2]
    parts = []
    for r in range(2):
        for c in range(2):
            q = np.ascontiguousarray(hsv[r * H // 2:(r + 1) * H // 2, c * W // 2:(c + 1) * W // 2])
            parts.append(cv2.calcHist([q], [0, 1], None, list(DESCRIPTOR_BINS), [0, 180, 0, 256]).reshape(-1))
    v = np.sqrt(np.concatenate(parts).astype(np.float64))
    n = float(np.linalg.norm(v))
    return (v / n).astype(np.float32) if n > 0 else np.zeros(v.shape, np.float32)


@dataclass
class Keyframe:
    """One keyframe of the map.

    Attributes:
        key: ``(frame_id, stamp)`` identity (:func:`~langgs_ros.reconstruction.alignment.frame_key`).
        frame: the frame as fed to the network again: ``rgb``, ``stamp``, ``frame_id`` and ``intrinsics``
            (CameraInfo) only (no depth, labels or pose: an anchor is an image).
        geometry: its :class:`~langgs_ros.reconstruction.alignment.FrameGeometry` in the reconstruction frame.
        descriptor: (288,) float32 :func:`image_descriptor`.
        window_index: index of the window that placed it (0-based, counted by the aligner).
    """

    key: FrameKey
    frame: Frame
    geometry: object
    descriptor: np.ndarray
    window_index: int


class KeyframeMemory:
    """Bounded store of map keyframes with anchor selection (see the module docstring).

    Args:
        capacity: most keyframes kept (>= 1).
        keep_recent: the newest this many keyframes are never evicted.

    Raises:
        ValueError: ``capacity < 1`` or ``keep_recent < 0``.
    """

    def __init__(self, capacity: int = 128, keep_recent: int = 16) -> None:
        if capacity < 1 or keep_recent < 0:
            raise ValueError(f"capacity must be >= 1 and keep_recent >= 0, got {capacity}, {keep_recent}")
        self.capacity = int(capacity)
        self.keep_recent = int(keep_recent)
        self._items: OrderedDict[FrameKey, Keyframe] = OrderedDict()
        self.evicted = 0

    # ------------------------------------------------------------------ container
    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __getitem__(self, key: FrameKey) -> Keyframe:
        return self._items[key]

    def __iter__(self) -> Iterator[Keyframe]:
        return iter(list(self._items.values()))

    def keys(self) -> list[FrameKey]:
        """Keys, oldest first."""
        return list(self._items)

    def clear(self) -> None:
        """Forget every keyframe (the eviction counter is kept)."""
        self._items.clear()

    def add(self, key: FrameKey, frame: Frame, geometry: object, window_index: int) -> bool:
        """Store a keyframe (first placement wins: an existing key is left unchanged).

        Args:
            key: the frame's key.
            frame: the frame (only ``rgb``, ``stamp``, ``frame_id``, ``intrinsics`` are kept).
            geometry: its geometry in the reconstruction frame.
            window_index: the placing window's index.

        Returns:
            True when stored, False when the key was already present.
        """
        if key in self._items:
            return False
        slim = Frame(rgb=frame.rgb, stamp=float(frame.stamp), frame_id=frame.frame_id, intrinsics=frame.intrinsics)
        self._items[key] = Keyframe(key, slim, geometry, image_descriptor(frame.rgb), int(window_index))
        while len(self._items) > self.capacity:
            self._evict_one()
        return True

    def _evict_one(self) -> None:
        keys = list(self._items)
        old = keys[: max(1, len(keys) - self.keep_recent)]
        if len(keys) < 2:
            self._items.popitem(last=False)
        else:
            D = np.stack([self._items[k].descriptor for k in keys])
            sim = D @ D.T
            np.fill_diagonal(sim, -np.inf)
            red = sim.max(axis=1)[: len(old)]
            del self._items[old[int(np.argmax(red))]]
        self.evicted += 1

    # ------------------------------------------------------------------ anchors
    def similarity(self, frames: Sequence[Frame]) -> dict[FrameKey, float]:
        """Per stored keyframe, the highest descriptor cosine to any of ``frames`` (in [-1, 1])."""
        if not self._items or not frames:
            return {}
        Q = np.stack([image_descriptor(f.rgb) for f in frames])
        keys = list(self._items)
        D = np.stack([self._items[k].descriptor for k in keys])
        best = (D @ Q.T).max(axis=1)
        return {k: float(s) for k, s in zip(keys, best)}

    def anchor_sets(self, frames: Sequence[Frame], k: int, exclude: set[FrameKey] | None = None,
                    attempts: int = 3) -> list[list[Keyframe]]:
        """Candidate anchor sets for a window, in the order they should be tried.

        Set 0 holds the ``k`` keyframes whose descriptors are most similar to the window's frames that are not in
        the memory (its newest frames; all of them when every frame is known); set 1 the next ``k`` by
        similarity (relocalisation with other anchors); later sets ``k`` keyframes spread evenly over the memory
        in time, not used before (relocalisation against any keyframe). Keys in ``exclude`` (the window's own
        frames) are never anchors.

        Args:
            frames: the window's frames.
            k: anchors per set (0: a single empty set).
            exclude: keys that must not be anchors.
            attempts: most sets returned (>= 1).

        Returns:
            Up to ``attempts`` non-empty lists of :class:`Keyframe` (a single empty list when the memory has no
            candidate or ``k == 0``).
        """
        exclude = exclude or set()
        cand = [key for key in self._items if key not in exclude]
        if k <= 0 or not cand:
            return [[]]
        from langgs_ros.reconstruction.alignment import frame_key  # local: alignment imports this module

        newest = [f for f in frames if frame_key(f) not in self._items] or list(frames)
        sim = self.similarity(newest)
        ranked = sorted(cand, key=lambda key: -sim.get(key, -1.0))
        sets: list[list[FrameKey]] = []
        used: set[FrameKey] = set()
        for _ in range(min(2, max(1, attempts))):
            nxt = [key for key in ranked if key not in used][:k]
            if not nxt:
                break
            sets.append(nxt)
            used.update(nxt)
        while len(sets) < max(1, attempts):
            rest = [key for key in cand if key not in used]  # time order
            if not rest:
                break
            pick = [rest[int(i)] for i in np.unique(np.linspace(0, len(rest) - 1, min(k, len(rest))).round())]
            sets.append(pick)
            used.update(pick)
        return [[self._items[key] for key in s] for s in sets]
