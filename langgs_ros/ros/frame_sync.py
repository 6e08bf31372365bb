"""Stamp matching of a camera stream with its partners (ROS-free; the mapping node drives it).

A colour image (the *primary*) needs partners of the same instant: depth, labels, CameraInfo (stamp-matched
topics) and a camera pose (a :class:`PoseProvider`: odometry interpolation or a tf lookup). Messages of different
topics arrive delayed and in any order relative to each other, so the nearest partner buffered *now* is not
necessarily the right one: at 30 Hz the previous frame's depth (33 ms earlier) lies within a 50 ms tolerance and
would be taken when the frame's own depth arrives after its colour.

Finality rule (message_filters' ApproximateTime semantics, Open Robotics ``message_filters`` package, and tf2's
"wait until the transform is available"): a partner is decided for a frame only when

* a message of that topic has exactly the frame's stamp (``|dt| <= EXACT_STAMP``), or
* the frame is *bracketed*: a message of that topic with a later stamp has arrived. Stamps of one topic are
  assumed monotone, so no closer message can still come; the nearest candidate within ``tolerance`` is taken, or
  the partner is missing, or
* the frame waited ``timeout`` seconds of wall clock: the nearest candidate within ``tolerance`` is taken, or the
  partner is missing.

Each stamp-matched message belongs to the primary frame it is nearest to (as in ApproximateTime, where sets are
disjoint): a candidate nearer to another colour frame's stamp is not taken. When a frame's own partner was lost
this makes it unmatched instead of silently paired with its neighbour's. Whether a candidate later than the frame
belongs to the next colour frame is known once that frame has arrived; until then (or the timeout) it waits.

Matched frames are released in stamp order (the keyframe buffer needs monotone stamps): a complete frame waits
behind an earlier one that is still undecided (at most ``timeout``). Unmatched frames are reported at once.

Time: ``now`` is a monotonic wall clock in seconds passed by the caller (``time.monotonic()`` in the node); stamps
are message header stamps in seconds (any clock: ROS, sim or bag time). A primary stamp more than
``jump_threshold`` seconds older than the previous one is a *time jump* (a bag loop, a simulator reset): pending
frames are dropped, partner messages of the old time line are dropped, the pose provider is told, and matching
goes on with the new stamps (:class:`TimeJump` is returned for the caller to log; the map is kept by the caller).
A smaller step back on the primary topic is an out-of-order message and is refused (:class:`StampOrderError`).

Memory is bounded everywhere: ``max_pending`` frames, ``max_partner_buffer`` messages per partner topic,
``max_samples`` odometry samples; evictions are counted (:meth:`FrameSynchronizer.counters`).

Not thread-safe: the caller serialises calls (the node holds one lock around them).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

__all__ = [
    "EXACT_STAMP",
    "FrameSynchronizer",
    "Matched",
    "OdometryPoseBuffer",
    "PollResult",
    "PoseLookup",
    "PoseProvider",
    "StampOrderError",
    "TimeJump",
    "TimeJumpDetector",
    "Unmatched",
]

EXACT_STAMP = 1e-6
"""s: stamps closer than this are the same instant (header stamps are integer ns; float64 keeps ~0.2 µs at 1.7e9 s)."""

POSE = "pose"
"""Name of the pose partner in :attr:`Unmatched.missing` and in counter keys."""


class StampOrderError(ValueError):
    """A primary (colour) stamp not later than the previous one, by less than the jump threshold; message dropped."""


@dataclass(frozen=True)
class TimeJump:
    """A jump back in stamps on one topic (bag loop, simulator reset).

    Attributes:
        topic: ``"primary"``, a partner name or ``"odometry"``.
        previous_stamp: latest stamp before the jump, s; ``stamp``: the new stamp, s.
        dropped_frames: pending primary frames dropped (old time line); ``dropped_messages``: buffered partner
            messages / odometry samples dropped.
    """

    topic: str
    previous_stamp: float
    stamp: float
    dropped_frames: int = 0
    dropped_messages: int = 0

    @property
    def jump(self) -> float:
        """How far back the stamps went, s (positive)."""
        return self.previous_stamp - self.stamp


class TimeJumpDetector:
    """Classifies each new stamp of one topic against the latest one seen.

    Args:
        threshold: s; a stamp more than this older than the latest is a jump (> 0).

    Raises:
        ValueError: ``threshold`` not positive and finite.
    """

    def __init__(self, threshold: float = 1.0) -> None:
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"time jump threshold must be > 0 s, got {threshold}")
        self.threshold = float(threshold)
        self.latest: float | None = None

    def check(self, stamp: float) -> Literal["first", "forward", "same", "backwards", "jump"]:
        """Classify ``stamp`` (s) and update :attr:`latest` (not for ``"backwards"``).

        Returns:
            ``first`` (no stamp yet), ``forward`` (later), ``same`` (within :data:`EXACT_STAMP`), ``backwards``
            (older by at most ``threshold``) or ``jump`` (older by more: :attr:`latest` restarts at ``stamp``).
        """
        last = self.latest
        if last is None:
            self.latest = stamp
            return "first"
        if stamp > last + EXACT_STAMP:
            self.latest = stamp
            return "forward"
        if stamp >= last - EXACT_STAMP:
            return "same"
        if stamp < last - self.threshold:
            self.latest = stamp
            return "jump"
        return "backwards"

    def reset(self) -> None:
        """Forget the latest stamp."""
        self.latest = None


# ---------------------------------------------------------------------------------------------------- poses
@dataclass(frozen=True)
class PoseLookup:
    """Answer of a :class:`PoseProvider` for one image stamp.

    Attributes:
        status: ``ready`` (``world_from_camera`` is set), ``wait`` (may become available: ask again later) or
            ``failed`` (will not become available; ``reason`` says why).
        world_from_camera: (4, 4) float64 camera-optical-to-world transform (``p_world = T @ p_camera``).
        frame_id: the frame ``world_from_camera`` is expressed in (the odometry message's ``header.frame_id`` or
            the tf target frame), so results can be stamped in the frame they are really in (REP-105).
        reason: why it waits or failed (for throttled logs and diagnostics).
    """

    status: Literal["ready", "wait", "failed"]
    world_from_camera: np.ndarray | None = None
    frame_id: str = ""
    reason: str = ""


class PoseProvider(Protocol):
    """Source of camera poses at image stamps (odometry buffer here; the node implements one over tf2)."""

    def pose_at(self, stamp: float, camera_frame: str, timed_out: bool) -> PoseLookup:
        """Pose of ``camera_frame`` at ``stamp`` (s).

        ``timed_out`` is True when the frame waited ``timeout`` s: answer ``ready`` with the best pose allowed
        (e.g. the nearest within tolerance) or ``failed``; a ``wait`` answer then counts as failed.
        """
        ...

    def on_time_jump(self, stamp: float) -> None:
        """Stamps jumped back to ``stamp`` (s): forget what belongs to the old time line."""
        ...


def _check_transform(T: np.ndarray) -> np.ndarray:
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise ValueError(f"a pose must be a finite 4x4 matrix, got shape {T.shape}")
    R = T[:3, :3]
    if np.abs(R @ R.T - np.eye(3)).max() > 1e-3 or abs(np.linalg.det(R) - 1.0) > 1e-3:
        raise ValueError("pose rotation is not orthonormal with det +1")
    return T


class OdometryPoseBuffer:
    """Camera poses from odometry: a bounded buffer of ``world_from_child`` samples, interpolated in SE(3).

    The pose at an image stamp is ``world_from_child(stamp) @ child_from_camera``, with ``child_from_camera`` the
    static extrinsic (odometry child frame -> camera optical frame, the node's ``camera_extrinsic_*``).
    ``world_from_child(stamp)`` is interpolated between the two samples that bracket the stamp (rotation by slerp,
    ``scipy.spatial.transform.Slerp``; translation linearly), as tf2 interpolates transforms.

    Decision (:meth:`pose_at`): a sample within :data:`EXACT_STAMP` -> that sample; bracketed by samples at most
    ``max_gap`` s apart -> interpolated; bracketed by a wider gap, or only samples later than the stamp (an older
    one cannot arrive any more) -> the nearest sample within ``tolerance``, else ``failed``; only samples older
    than the stamp -> ``wait`` (the next sample may bracket it), at the timeout the latest sample if within
    ``tolerance`` (held, no extrapolation), else ``failed``.

    Samples in another odometry frame than the buffered ones (``frame_id`` changes) restart the buffer; a sample
    more than ``jump_threshold`` s older than the latest restarts it too (time jump); a smaller step back is
    inserted in stamp order (counted in :attr:`out_of_order`).

    Args:
        child_from_camera: (4, 4) extrinsic; identity when None (the odometry child frame is the camera frame).
        tolerance: s; largest stamp difference for a non-interpolated pose.
        max_gap: s; largest gap between two samples that are interpolated.
        max_samples: bound of the buffer (oldest samples dropped, counted in :attr:`evicted`).
        jump_threshold: s; see above.

    Raises:
        ValueError: a non-rigid extrinsic or a non-positive bound.
    """

    def __init__(self, child_from_camera: np.ndarray | None = None, tolerance: float = 0.05, max_gap: float = 0.5,
                 max_samples: int = 1000, jump_threshold: float = 1.0) -> None:
        if tolerance < 0 or max_gap < 0 or max_samples < 2:
            raise ValueError(f"need tolerance >= 0, max_gap >= 0 and max_samples >= 2; got {tolerance}, {max_gap}, "
                             f"{max_samples}")
        self.child_from_camera = _check_transform(np.eye(4) if child_from_camera is None else child_from_camera)
        self.tolerance = float(tolerance)
        self.max_gap = float(max_gap)
        self.max_samples = int(max_samples)
        self._jumps = TimeJumpDetector(jump_threshold)
        self._stamps: list[float] = []
        self._poses: list[np.ndarray] = []  # world_from_child (4, 4)
        self.frame_id = ""
        """``header.frame_id`` of the buffered samples (the frame poses are expressed in)."""
        self.child_frame_id = ""
        """``child_frame_id`` of the latest sample."""
        self.evicted = 0
        self.out_of_order = 0
        self.time_jumps = 0
        self.frame_changes = 0

    def __len__(self) -> int:
        return len(self._stamps)

    def add(self, stamp: float, world_from_child: np.ndarray, frame_id: str = "",
            child_frame_id: str = "") -> TimeJump | None:
        """Buffer one odometry sample.

        Args:
            stamp: header stamp, s. ``world_from_child``: (4, 4) pose of the child frame in ``frame_id``.

        Returns:
            A :class:`TimeJump` when the stamp jumped back (the buffer restarted with this sample), else None.

        Raises:
            ValueError: non-finite stamp or a pose that is not a finite rigid transform.
        """
        if not math.isfinite(stamp):
            raise ValueError(f"odometry stamp must be finite, got {stamp}")
        T = _check_transform(world_from_child)
        jump = None
        if self._stamps and frame_id != self.frame_id:
            self.frame_changes += 1
            self._clear()
        kind = self._jumps.check(stamp)
        if kind == "jump":
            jump = TimeJump("odometry", self._stamps[-1] if self._stamps else stamp, stamp,
                            dropped_messages=len(self._stamps))
            self.time_jumps += 1
            self._clear()
        self.frame_id = frame_id
        self.child_frame_id = child_frame_id
        if kind == "backwards":
            self.out_of_order += 1
        i = bisect.bisect_right(self._stamps, stamp)
        self._stamps.insert(i, float(stamp))
        self._poses.insert(i, T)
        while len(self._stamps) > self.max_samples:
            del self._stamps[0], self._poses[0]
            self.evicted += 1
        return jump

    def _clear(self) -> None:
        self._stamps.clear()
        self._poses.clear()

    def reset(self) -> None:
        """Drop every sample and the stamp history (counters are kept)."""
        self._clear()
        self._jumps.reset()

    def on_time_jump(self, stamp: float) -> None:
        """Drop samples later than ``stamp + jump_threshold`` (the old time line); newer-time-line samples stay."""
        cut = bisect.bisect_right(self._stamps, stamp + self._jumps.threshold)
        del self._stamps[cut:], self._poses[cut:]
        self._jumps.latest = self._stamps[-1] if self._stamps else None

    def _ready(self, T_world_child: np.ndarray) -> PoseLookup:
        return PoseLookup("ready", T_world_child @ self.child_from_camera, self.frame_id)

    def interpolate(self, stamp: float, i0: int, i1: int) -> np.ndarray:
        """(4, 4) ``world_from_child`` at ``stamp`` between samples ``i0`` and ``i1`` (slerp + linear)."""
        t0, t1 = self._stamps[i0], self._stamps[i1]
        if t1 - t0 <= EXACT_STAMP:
            return self._poses[i0].copy()
        a = (stamp - t0) / (t1 - t0)
        T0, T1 = self._poses[i0], self._poses[i1]
        slerp = Slerp([0.0, 1.0], Rotation.from_matrix(np.stack([T0[:3, :3], T1[:3, :3]])))
        T = np.eye(4)
        T[:3, :3] = slerp([a]).as_matrix()[0]
        T[:3, 3] = (1.0 - a) * T0[:3, 3] + a * T1[:3, 3]
        return T

    def pose_at(self, stamp: float, camera_frame: str = "", timed_out: bool = False) -> PoseLookup:
        """The camera pose at ``stamp`` (see the class docstring); ``camera_frame`` is not used (static
        extrinsic)."""
        st = self._stamps
        n = len(st)
        if n == 0:
            return PoseLookup("failed", reason="no odometry received") if timed_out else \
                PoseLookup("wait", reason="no odometry yet")
        i = bisect.bisect_left(st, stamp - EXACT_STAMP)
        if i < n and abs(st[i] - stamp) <= EXACT_STAMP:
            return self._ready(self._poses[i])
        if 0 < i < n:  # bracketed: st[i-1] < stamp < st[i]
            gap = st[i] - st[i - 1]
            if gap <= self.max_gap:
                return self._ready(self.interpolate(stamp, i - 1, i))
            j = i - 1 if stamp - st[i - 1] <= st[i] - stamp else i
            if abs(st[j] - stamp) <= self.tolerance:
                return self._ready(self._poses[j])
            return PoseLookup("failed", reason=f"odometry gap of {gap:.3f} s around the image stamp exceeds "
                                               f"max_gap {self.max_gap:.3f} s")
        if i == 0:  # every sample is later than the image: an older one cannot arrive
            if st[0] - stamp <= self.tolerance:
                return self._ready(self._poses[0])
            return PoseLookup("failed", reason=f"image is {st[0] - stamp:.3f} s older than the oldest buffered "
                                               "odometry")
        if not timed_out:  # every sample is older: the next one may bracket the stamp
            return PoseLookup("wait", reason=f"latest odometry is {stamp - st[-1]:.3f} s older than the image")
        if stamp - st[-1] <= self.tolerance:
            return self._ready(self._poses[-1])
        return PoseLookup("failed", reason=f"latest odometry is {stamp - st[-1]:.3f} s older than the image "
                                           f"(tolerance {self.tolerance:.3f} s) after the timeout")


# ---------------------------------------------------------------------------------------------------- frames
@dataclass
class Matched:
    """A primary message with all its partners decided.

    Attributes:
        stamp: primary stamp, s; ``value``: the primary payload (e.g. the (H, W, 3) uint8 image); ``frame_id``:
            its camera frame.
        partners: partner name -> payload; ``partner_stamps``: partner name -> the stamp of the message taken, s.
        world_from_camera: (4, 4) float64 pose from the pose provider, or None without one; ``pose_frame_id``:
            the frame it is expressed in ("" without a provider).
        waited: wall-clock seconds from :meth:`FrameSynchronizer.add_primary` to release.
        timed_out: True when a partner was decided by the timeout (nearest within tolerance).
    """

    stamp: float
    value: Any
    frame_id: str
    partners: dict[str, Any]
    partner_stamps: dict[str, float]
    world_from_camera: np.ndarray | None
    pose_frame_id: str
    waited: float
    timed_out: bool


@dataclass
class Unmatched:
    """A primary message dropped because partners are missing.

    Attributes:
        stamp, frame_id: of the primary; ``missing``: the partners found missing (in the synchroniser's partner
        order, ``"pose"`` last); ``reasons``: partner -> why; ``timed_out``: decided by the timeout.
    """

    stamp: float
    frame_id: str
    missing: tuple[str, ...]
    reasons: dict[str, str]
    timed_out: bool

    @property
    def key(self) -> str:
        """Counter key, e.g. ``no_depth`` or ``no_depth+pose``."""
        return "no_" + "+".join(self.missing)


@dataclass
class PollResult:
    """What one :meth:`FrameSynchronizer.poll` decided: frames to map (stamp order) and frames dropped."""

    matched: list[Matched] = field(default_factory=list)
    unmatched: list[Unmatched] = field(default_factory=list)


_MISSING = object()


@dataclass
class _Pending:
    stamp: float
    value: Any
    frame_id: str
    received: float
    decided: dict[str, tuple[float, Any] | object] = field(default_factory=dict)  # name -> (stamp, value)|_MISSING
    reasons: dict[str, str] = field(default_factory=dict)
    pose: np.ndarray | None = None
    pose_frame_id: str = ""
    timed_out: bool = False


class _PartnerBuffer:
    """Stamp-sorted (stamp, value) messages of one partner topic."""

    def __init__(self, name: str, jump_threshold: float) -> None:
        self.name = name
        self.stamps: list[float] = []
        self.values: list[Any] = []
        self.jumps = TimeJumpDetector(jump_threshold)

    def insert(self, stamp: float, value: Any) -> None:
        i = bisect.bisect_right(self.stamps, stamp)
        self.stamps.insert(i, stamp)
        self.values.insert(i, value)

    def drop_before(self, stamp: float) -> int:
        i = bisect.bisect_left(self.stamps, stamp)
        del self.stamps[:i], self.values[:i]
        return i

    def drop_after(self, stamp: float) -> int:
        i = bisect.bisect_right(self.stamps, stamp)
        n = len(self.stamps) - i
        del self.stamps[i:], self.values[i:]
        return n

    def clear(self) -> None:
        self.stamps.clear()
        self.values.clear()


class FrameSynchronizer:
    """Matches primary (colour) messages with stamp-matched partners and a pose (see the module docstring).

    Typical use (the node): ``add_primary`` from the colour callback, ``add_partner`` from the depth / labels /
    CameraInfo callbacks (odometry goes into the :class:`OdometryPoseBuffer` passed as ``pose_provider``), and
    ``poll`` after each of them and from a timer (so that timeouts fire without traffic).

    Args:
        partners: names of the stamp-matched partner topics (e.g. ``("depth", "labels", "camera_info")``).
        tolerance: s; largest stamp difference of a non-exact partner. A value above half the frame period is
            safe: a message nearer to another colour frame is never taken.
        timeout: s of wall clock a frame waits for undecided partners.
        max_pending: bound of the frames waiting (oldest dropped, counted ``evicted_frames``).
        max_partner_buffer: bound of each partner buffer (oldest dropped, counted ``evicted_<name>``).
        pose_provider: camera poses, or None (frames carry no pose).
        jump_threshold: s; a primary stamp this much older than the previous one is a time jump.

    Raises:
        ValueError: negative tolerance, non-positive timeout or bounds, duplicate or reserved partner names.
    """

    def __init__(self, partners: Sequence[str], tolerance: float = 0.05, timeout: float = 3.0, max_pending: int = 40,
                 max_partner_buffer: int = 40, pose_provider: PoseProvider | None = None,
                 jump_threshold: float = 1.0) -> None:
        names = list(partners)
        if len(set(names)) != len(names) or POSE in names or "primary" in names:
            raise ValueError(f"partner names must be unique and not 'pose'/'primary', got {names}")
        if not (tolerance >= 0 and timeout > 0 and max_pending >= 1 and max_partner_buffer >= 2):
            raise ValueError(f"need tolerance >= 0, timeout > 0, max_pending >= 1, max_partner_buffer >= 2; got "
                             f"{tolerance}, {timeout}, {max_pending}, {max_partner_buffer}")
        self.partners = tuple(names)
        self.tolerance = float(tolerance)
        self.timeout = float(timeout)
        self.max_pending = int(max_pending)
        self.max_partner_buffer = int(max_partner_buffer)
        self.pose_provider = pose_provider
        self.jump_threshold = float(jump_threshold)
        self._jumps = TimeJumpDetector(jump_threshold)
        self._buffers = {n: _PartnerBuffer(n, jump_threshold) for n in names}
        self._pending: deque[_Pending] = deque()
        # Recent primary stamps (monotone): which colour frame a partner message is nearest to.
        self._primary_stamps: deque[float] = deque(maxlen=max(16, 2 * self.max_pending))
        self.matched = 0
        self.timeouts = 0
        self.evicted_frames = 0
        self.stamp_backwards = 0
        self.time_jumps = 0
        self.dropped_on_jump = 0
        self.unmatched: dict[str, int] = {}
        self.inexact: dict[str, int] = dict.fromkeys(names, 0)
        self.evicted: dict[str, int] = dict.fromkeys(names, 0)
        self.stale: dict[str, int] = dict.fromkeys(names, 0)
        self.partner_jumps: dict[str, int] = dict.fromkeys(names, 0)
        self.out_of_order: dict[str, int] = dict.fromkeys(names, 0)

    # ------------------------------------------------------------------------------------------ state
    @property
    def pending_count(self) -> int:
        """Frames waiting (undecided, or decided and waiting behind an undecided earlier one)."""
        return len(self._pending)

    def buffered(self, name: str) -> int:
        """Messages buffered for partner ``name``."""
        return len(self._buffers[name].stamps)

    def counters(self) -> dict[str, int]:
        """Flat counters for diagnostics (keys: ``matched``, ``unmatched_no_<partners>``, ``inexact_<name>``,
        ``timeouts``, ``evicted_frames``, ``evicted_<name>``, ``stale_<name>``, ``stamp_backwards``,
        ``time_jumps``, ``dropped_on_jump``, ``partner_jumps_<name>``, ``out_of_order_<name>``, ``pending``)."""
        out = {"matched": self.matched, "timeouts": self.timeouts, "evicted_frames": self.evicted_frames,
               "stamp_backwards": self.stamp_backwards, "time_jumps": self.time_jumps,
               "dropped_on_jump": self.dropped_on_jump, "pending": len(self._pending)}
        out.update({f"unmatched_{k}": v for k, v in self.unmatched.items()})
        for prefix, counts in (("inexact", self.inexact), ("evicted", self.evicted), ("stale", self.stale),
                               ("partner_jumps", self.partner_jumps), ("out_of_order", self.out_of_order)):
            out.update({f"{prefix}_{k}": v for k, v in counts.items() if v})
        return out

    def reset(self) -> None:
        """Drop pending frames, partner messages and stamp history (counters are kept; the pose provider is
        not touched: reset it yourself if needed)."""
        self._pending.clear()
        for b in self._buffers.values():
            b.clear()
            b.jumps.reset()
        self._primary_stamps.clear()
        self._jumps.reset()

    # ------------------------------------------------------------------------------------------ input
    def add_primary(self, stamp: float, value: Any, frame_id: str, now: float) -> TimeJump | None:
        """Queue a primary (colour) message.

        Args:
            stamp: header stamp, s; ``value``: payload passed through; ``frame_id``: camera frame (for the pose
                lookup); ``now``: monotonic wall clock, s.

        Returns:
            A :class:`TimeJump` when ``stamp`` jumped back by more than ``jump_threshold`` (pending frames and
            old-time-line partner messages were dropped, the pose provider told; this frame is queued).

        Raises:
            StampOrderError: ``stamp`` is not later than the previous primary stamp (and not a jump); dropped.
            ValueError: non-finite stamp.
        """
        if not math.isfinite(stamp):
            raise ValueError(f"stamp must be finite, got {stamp}")
        previous = self._jumps.latest
        kind = self._jumps.check(stamp)
        jump = None
        if kind in ("same", "backwards"):
            self.stamp_backwards += 1
            raise StampOrderError(f"colour stamp {stamp:.6f} s is not later than the previous {previous:.6f} s")
        if kind == "jump":
            jump = self._time_jump(previous, stamp)
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self.evicted_frames += 1
        self._pending.append(_Pending(float(stamp), value, frame_id, float(now)))
        self._primary_stamps.append(float(stamp))
        return jump

    def _time_jump(self, previous: float, stamp: float) -> TimeJump:
        n_frames = len(self._pending)
        self._pending.clear()
        self._primary_stamps.clear()
        # Messages of the old time line lie far later than the new stamp; those of the new one (already arrived
        # on their own topic) lie near it and stay.
        n_msgs = sum(b.drop_after(stamp + self.jump_threshold) for b in self._buffers.values())
        for b in self._buffers.values():
            b.jumps.latest = b.stamps[-1] if b.stamps else None
        if self.pose_provider is not None:
            self.pose_provider.on_time_jump(stamp)
        self.time_jumps += 1
        self.dropped_on_jump += n_frames
        return TimeJump("primary", previous, stamp, dropped_frames=n_frames, dropped_messages=n_msgs)

    def add_partner(self, name: str, stamp: float, value: Any, now: float) -> TimeJump | None:
        """Buffer a partner message (``now``: monotonic wall clock, s, unused today but part of the contract).

        A message older than anything that can still use it is dropped (counted ``stale_<name>``: it arrived after
        its frame was decided). A stamp more than ``jump_threshold`` older than the latest of this topic restarts
        this topic's buffer (returned :class:`TimeJump`); a smaller step back is inserted in order
        (``out_of_order_<name>``).

        Raises:
            KeyError: unknown partner name. ValueError: non-finite stamp.
        """
        buf = self._buffers[name]
        if not math.isfinite(stamp):
            raise ValueError(f"stamp must be finite, got {stamp}")
        previous = buf.jumps.latest
        kind = buf.jumps.check(stamp)
        jump = None
        if kind == "jump":
            jump = TimeJump(name, previous, stamp, dropped_messages=len(buf.stamps))
            self.partner_jumps[name] += 1
            buf.clear()
        elif kind == "backwards":
            self.out_of_order[name] += 1
        floor = self._floor()
        if floor is not None and not self._ahead(buf) and stamp < floor - self.tolerance - EXACT_STAMP:
            self.stale[name] += 1
            return None
        buf.insert(float(stamp), value)
        self._prune(buf, floor)
        while len(buf.stamps) > self.max_partner_buffer:
            del buf.stamps[0], buf.values[0]
            self.evicted[name] += 1
        return jump

    def _floor(self) -> float | None:
        """Oldest stamp a partner message can still be needed for (undecided frames and future primaries)."""
        if not self._primary_stamps:
            return None
        floor = self._primary_stamps[-1]
        for p in self._pending:
            if not self._complete(p):
                floor = min(floor, p.stamp)
                break  # pending frames are in stamp order
        return floor

    # ------------------------------------------------------------------------------------------ decisions
    def _complete(self, p: _Pending) -> bool:
        return len(p.decided) == len(self.partners) and (self.pose_provider is None or p.pose is not None)

    def _owner(self, cand: float, stamp: float) -> Literal["self", "other", "unknown"]:
        """Whether the message at ``cand`` is nearest to the frame at ``stamp`` among the colour frames."""
        ps = self._primary_stamps
        if cand > stamp:
            i = bisect.bisect_right(ps, stamp + EXACT_STAMP)
            if i >= len(ps):
                return "unknown"  # the next colour frame, possibly nearer, has not arrived yet
            return "other" if abs(ps[i] - cand) < abs(cand - stamp) else "self"
        i = bisect.bisect_left(ps, stamp - EXACT_STAMP) - 1
        if i < 0:
            return "self"  # no earlier colour frame known (the first one, or older than the history)
        return "other" if abs(cand - ps[i]) < abs(stamp - cand) else "self"

    def _decide(self, p: _Pending, buf: _PartnerBuffer, timed_out: bool) -> tuple[float, Any] | object | None:
        """(stamp, value), _MISSING, or None (undecided) for partner ``buf`` of frame ``p``."""
        st = buf.stamps
        i = bisect.bisect_left(st, p.stamp - EXACT_STAMP)
        if i < len(st) and abs(st[i] - p.stamp) <= EXACT_STAMP:
            return st[i], buf.values[i]
        bracketed = i < len(st)
        if not bracketed and not timed_out:
            return None
        cands = sorted((abs(st[j] - p.stamp), j) for j in (i - 1, i)
                       if 0 <= j < len(st) and abs(st[j] - p.stamp) <= self.tolerance + EXACT_STAMP)
        for _, j in cands:
            owner = self._owner(st[j], p.stamp)
            if owner == "self" or (owner == "unknown" and timed_out):
                return st[j], buf.values[j]
            if owner == "unknown":
                return None
        near = f"nearest {buf.name} {min(abs(s - p.stamp) for s in st[max(0, i - 1):i + 1]):.3f} s away" if st \
            else f"no {buf.name} buffered"
        p.reasons[buf.name] = f"no {buf.name} of this frame within {self.tolerance:.3f} s ({near})"
        return _MISSING

    def poll(self, now: float) -> PollResult:
        """Decide what can be decided at wall-clock time ``now`` (s) and release frames.

        Returns:
            :class:`PollResult`: complete frames in stamp order (each returned once) and frames dropped for
            missing partners (counted in ``unmatched_no_<names>``).
        """
        out = PollResult()
        keep: deque[_Pending] = deque()
        for p in self._pending:
            timed_out = now - p.received >= self.timeout
            if timed_out and not self._complete(p):
                p.timed_out = True
            missing = False
            for name in self.partners:
                if name in p.decided:
                    continue
                d = self._decide(p, self._buffers[name], timed_out)
                if d is None:
                    continue
                p.decided[name] = d
                missing = missing or d is _MISSING
            if (not missing and self.pose_provider is not None and p.pose is None and POSE not in p.reasons
                    and len(p.decided) == len(self.partners)):  # pose last: a tf lookup costs more than a bisect
                look = self.pose_provider.pose_at(p.stamp, p.frame_id, timed_out)
                if look.status == "ready" and look.world_from_camera is not None:
                    p.pose, p.pose_frame_id = np.asarray(look.world_from_camera, dtype=np.float64), look.frame_id
                elif look.status == "failed" or timed_out:
                    p.reasons[POSE] = look.reason or "pose lookup timed out"
                    missing = True
            if missing or any(v is _MISSING for v in p.decided.values()):
                names = tuple(n for n in self.partners if p.decided.get(n) is _MISSING)
                names += (POSE,) if POSE in p.reasons else ()
                u = Unmatched(p.stamp, p.frame_id, names, dict(p.reasons), p.timed_out)
                self.unmatched[u.key] = self.unmatched.get(u.key, 0) + 1
                self.timeouts += p.timed_out
                out.unmatched.append(u)
                continue
            keep.append(p)
        # Release complete frames in stamp order; an undecided frame holds back the later ones.
        while keep:
            p = keep[0]
            if not self._complete(p):
                break
            keep.popleft()
            partners = {n: p.decided[n][1] for n in self.partners}  # type: ignore[index]
            stamps = {n: float(p.decided[n][0]) for n in self.partners}  # type: ignore[index]
            for n, s in stamps.items():
                if abs(s - p.stamp) > EXACT_STAMP:
                    self.inexact[n] += 1
            self.matched += 1
            self.timeouts += p.timed_out
            out.matched.append(Matched(p.stamp, p.value, p.frame_id, partners, stamps, p.pose, p.pose_frame_id,
                                       now - p.received, p.timed_out))
        self._pending = keep
        floor = self._floor()
        for b in self._buffers.values():
            self._prune(b, floor)
        return out

    def _ahead(self, buf: _PartnerBuffer) -> bool:
        """Whether ``buf``'s topic already jumped back to a new time line that the primary has not reached."""
        latest = buf.jumps.latest
        return bool(self._primary_stamps) and latest is not None and \
            latest < self._primary_stamps[-1] - self.jump_threshold

    def _prune(self, buf: _PartnerBuffer, floor: float | None) -> None:
        """Drop messages too old for any undecided or future frame (not on a topic that is ahead in a jump)."""
        if floor is not None and not self._ahead(buf):
            buf.drop_before(floor - self.tolerance - EXACT_STAMP)
