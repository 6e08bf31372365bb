"""Frame validation, keyframe selection and windowing (the first pipeline stage).

A :class:`FrameBuffer` receives every incoming :class:`~langgs_ros.types.Frame`, keeps the *keyframes* (enough
camera motion, time or image change since the last keyframe) and emits *windows* of ``size`` keyframes; the
last ``overlap`` keyframes of a window start the next one, so consecutive windows share frames (needed to
align unposed windows, and harmless for posed ones).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

from langgs_ros.types import Frame


class FrameError(ValueError):
    """A frame that cannot be used (bad shapes, dtypes, values or stamps); the message says why."""


@dataclass
class KeyframeConfig:
    """When a frame becomes a keyframe. A frame is kept if it is the first one, or if at least
    ``min_interval`` s passed since the last keyframe and any of these holds: the camera moved
    ``min_translation`` m or turned ``min_rotation`` rad (posed frames), the image changed by
    ``min_image_change`` (mean absolute grey difference in [0, 1] on a 64-px-wide thumbnail; unposed frames),
    or ``max_interval`` s passed.
    """

    min_translation: float = 0.10
    min_rotation: float = math.radians(8.0)
    min_image_change: float = 0.06
    min_interval: float = 0.0
    max_interval: float = 5.0


@dataclass
class WindowConfig:
    """Window size S (keyframes per reconstruction) and overlap (keyframes shared with the previous window)."""

    size: int = 8
    overlap: int = 2

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"window size must be >= 1, got {self.size}")
        if not 0 <= self.overlap < self.size:
            raise ValueError(f"window overlap must be in [0, size), got {self.overlap} for size {self.size}")


def validate_frame(frame: Frame) -> Frame:
    """Check a frame's arrays and return it with depth cleaned (NaN/inf/negative -> 0, float32).

    Raises:
        FrameError: rgb not (H, W, 3) uint8 with H, W > 0; depth/labels not (H, W); intrinsics not a finite
            (3, 3) matrix with positive focal lengths; pose not a finite rigid (4, 4) transform; stamp not finite.
    """
    rgb = frame.rgb
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise FrameError(f"rgb must be an (H, W, 3) uint8 array, got {getattr(rgb, 'shape', None)} "
                         f"{getattr(rgb, 'dtype', type(rgb).__name__)}")
    h, w = rgb.shape[:2]
    if h == 0 or w == 0:
        raise FrameError(f"empty image ({h}x{w})")
    if not math.isfinite(frame.stamp):
        raise FrameError(f"stamp must be finite, got {frame.stamp}")
    depth = frame.depth
    if depth is not None:
        depth = np.asarray(depth)
        if depth.shape != (h, w):
            raise FrameError(f"depth shape {depth.shape} does not match the colour image ({h}, {w})")
        depth = depth.astype(np.float32, copy=True)
        bad = ~np.isfinite(depth) | (depth < 0)
        depth[bad] = 0.0
    if frame.labels is not None and np.asarray(frame.labels).shape != (h, w):
        raise FrameError(f"label image shape {np.asarray(frame.labels).shape} does not match the colour image "
                         f"({h}, {w})")
    K = frame.intrinsics
    if K is not None:
        K = np.asarray(K, dtype=np.float64)
        if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
            raise FrameError(f"intrinsics must be a finite 3x3 matrix with fx, fy > 0, got {K.tolist()}")
    T = frame.world_from_camera
    if T is not None:
        T = np.asarray(T, dtype=np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise FrameError("world_from_camera must be a finite 4x4 matrix")
        R = T[:3, :3]
        if np.abs(R @ R.T - np.eye(3)).max() > 1e-3 or abs(np.linalg.det(R) - 1.0) > 1e-3:
            raise FrameError("world_from_camera rotation is not orthonormal with det +1")
    return Frame(rgb=rgb, stamp=float(frame.stamp), frame_id=frame.frame_id, depth=depth, intrinsics=K,
                 world_from_camera=T, labels=frame.labels, label_names=frame.label_names)


def _thumbnail(rgb: np.ndarray) -> np.ndarray:
    """(h, 64) float32 grey thumbnail in [0, 1] used for image-change keyframing."""
    h, w = rgb.shape[:2]
    tw = 64
    th = max(1, round(h * tw / w))
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, (tw, th), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def relative_motion(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Translation (m) and rotation angle (rad) between two (4, 4) world_from_camera poses."""
    delta = np.linalg.inv(a) @ b
    trans = float(np.linalg.norm(delta[:3, 3]))
    cos = (np.trace(delta[:3, :3]) - 1.0) / 2.0
    return trans, float(math.acos(max(-1.0, min(1.0, cos))))


class FrameBuffer:
    """Keyframe selection and overlapping windows.

    Not thread-safe: one producer (the node's worker side or a dataset loop) owns it.

    Args:
        keyframes: keyframe thresholds.
        window: window size and overlap.
        max_pending: at most this many keyframes wait for a window; older ones are dropped (counted in
            :attr:`dropped`) so memory stays bounded when windows are not consumed.
    """

    def __init__(self, keyframes: KeyframeConfig | None = None, window: WindowConfig | None = None,
                 max_pending: int = 64) -> None:
        self.keyframes = keyframes or KeyframeConfig()
        self.window = window or WindowConfig()
        self.max_pending = max(self.window.size, max_pending)
        self._pending: deque[Frame] = deque()
        self._carry: list[Frame] = []
        self._last_key: Frame | None = None
        self._last_thumb: np.ndarray | None = None
        self._last_stamp: float | None = None
        self.num_received = 0
        self.num_keyframes = 0
        self.dropped = 0

    @property
    def last_stamp(self) -> float | None:
        """Stamp (s) of the last frame offered, or None after a reset."""
        return self._last_stamp

    @property
    def num_pending(self) -> int:
        """Keyframes waiting for the next window (not counting the overlap carried over)."""
        return len(self._pending)

    def is_keyframe(self, frame: Frame, thumb: np.ndarray | None = None) -> bool:
        """Whether ``frame`` would be a keyframe relative to the last accepted keyframe (see KeyframeConfig)."""
        last = self._last_key
        if last is None:
            return True
        cfg = self.keyframes
        dt = frame.stamp - last.stamp
        if dt < cfg.min_interval:
            return False
        if dt >= cfg.max_interval:
            return True
        if frame.world_from_camera is not None and last.world_from_camera is not None:
            trans, rot = relative_motion(last.world_from_camera, frame.world_from_camera)
            if trans >= cfg.min_translation or rot >= cfg.min_rotation:
                return True
            return False
        if self._last_thumb is not None:
            thumb = _thumbnail(frame.rgb) if thumb is None else thumb
            if thumb.shape == self._last_thumb.shape:
                return float(np.abs(thumb - self._last_thumb).mean()) >= cfg.min_image_change
            return True
        return False

    def add(self, frame: Frame) -> bool:
        """Validate and offer a frame; returns True if it became a keyframe.

        Raises:
            FrameError: invalid frame (see :func:`validate_frame`), or a stamp older than the last frame's
                (stamps going backwards, e.g. a replayed bag restarting: call :meth:`on_time_jump` to accept it).
        """
        frame = validate_frame(frame)
        if self._last_stamp is not None and frame.stamp < self._last_stamp:
            raise FrameError(f"stamp {frame.stamp:.6f} s is older than the previous frame's {self._last_stamp:.6f} s")
        if self._last_key is not None and (frame.rgb.shape != self._last_key.rgb.shape):
            raise FrameError(f"image size changed from {self._last_key.rgb.shape[:2]} to {frame.rgb.shape[:2]}; "
                             "reset the buffer to change resolution")
        self._last_stamp = frame.stamp
        self.num_received += 1
        thumb = _thumbnail(frame.rgb) if frame.world_from_camera is None else None
        if not self.is_keyframe(frame, thumb):
            return False
        self._last_key = frame
        self._last_thumb = thumb
        self._pending.append(frame)
        self.num_keyframes += 1
        while len(self._pending) > self.max_pending:
            self._pending.popleft()
            self.dropped += 1
        return True

    def window_ready(self) -> bool:
        """True when enough keyframes wait to fill a window (with the carried overlap)."""
        return len(self._carry) + len(self._pending) >= self.window.size and len(self._pending) > 0

    def pop_window(self, force: bool = False) -> list[Frame] | None:
        """Emit the next window, or ``None`` if not ready.

        Args:
            force: emit a (possibly short) window from whatever keyframes are pending (at least one new one),
                e.g. on a timer or at the end of a sequence.

        Returns:
            Up to ``size`` frames in time order: the carried overlap, then new keyframes.
        """
        if not self._pending or (not force and not self.window_ready()):
            return None
        n_new = min(len(self._pending), self.window.size - len(self._carry))
        n_new = max(n_new, 1)
        new = [self._pending.popleft() for _ in range(n_new)]
        window = (self._carry + new)[-self.window.size:]
        self._carry = window[len(window) - self.window.overlap:] if self.window.overlap > 0 else []
        return window

    def on_time_jump(self) -> list[list[Frame]]:
        """Stamps jumped back (a bag loop, a simulator reset): close the old time line and accept the new one.

        The keyframes still pending are returned as (possibly short) windows, so nothing received before the
        jump is lost; then the last stamp, the last keyframe and the overlap are forgotten, so the next frame is a
        keyframe and starts a fresh window (frames of two time lines never share a window: after a loop or a
        reset the camera is somewhere else). Counters are kept.

        Returns:
            The windows of the pending keyframes, oldest first (empty when none were pending).
        """
        windows = []
        while self._pending:
            w = self.pop_window(force=True)
            if w:
                windows.append(w)
        self._carry = []
        self._last_key = None
        self._last_thumb = None
        self._last_stamp = None
        return windows

    def reset(self) -> None:
        """Forget all state (pending keyframes, overlap, last stamp); counters are kept."""
        self._pending.clear()
        self._carry = []
        self._last_key = None
        self._last_thumb = None
        self._last_stamp = None
