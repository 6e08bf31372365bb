"""FrameSynchronizer / OdometryPoseBuffer / TimeJumpDetector (langgs_ros/ros/frame_sync.py): stamp matching that
is right at camera rates, pose interpolation, bounded memory and time jumps. ROS-free; ``now`` is driven here."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from langgs_ros.ros.frame_sync import (
    FrameSynchronizer,
    OdometryPoseBuffer,
    PoseLookup,
    StampOrderError,
    TimeJumpDetector,
)

DT = 1.0 / 30.0  # a 30 Hz camera
T0 = 1000.0


def stamp(k: int) -> float:
    return T0 + k * DT


def sync(partners=("depth",), **kw) -> FrameSynchronizer:
    kw.setdefault("tolerance", 0.05)  # larger than half the frame period: the case of the issue
    kw.setdefault("timeout", 3.0)
    return FrameSynchronizer(partners, **kw)


def test_exact_match_waits_for_the_partner_then_releases_once() -> None:
    s = sync(("depth", "labels"))
    s.add_primary(stamp(0), "rgb0", "cam", now=0.0)
    assert s.poll(0.0).matched == []
    s.add_partner("depth", stamp(0), "d0", now=0.0)
    assert s.poll(0.0).matched == []  # labels still undecided
    s.add_partner("labels", stamp(0), "l0", now=0.0)
    out = s.poll(0.01)
    assert [(m.value, m.partners) for m in out.matched] == [("rgb0", {"depth": "d0", "labels": "l0"})]
    assert out.matched[0].partner_stamps == {"depth": stamp(0), "labels": stamp(0)}
    assert not out.matched[0].timed_out and out.matched[0].world_from_camera is None
    assert s.poll(0.02).matched == [] and s.pending_count == 0
    assert s.counters()["matched"] == 1


def test_late_partner_at_30_hz_is_not_replaced_by_the_previous_frames() -> None:
    """The bug of issue 8: the previous frame's depth (33 ms earlier, within 0.05 s) is buffered when a colour image
    arrives before its own depth; it must wait for its own."""
    s = sync()
    s.add_partner("depth", stamp(0), "d0", now=0.0)
    s.add_primary(stamp(0), "rgb0", "cam", now=0.0)
    assert [m.partners["depth"] for m in s.poll(0.0).matched] == ["d0"]
    s.add_primary(stamp(1), "rgb1", "cam", now=0.033)
    assert s.poll(0.033).matched == []  # d0 is within tolerance but not final: d1 can still arrive
    s.add_primary(stamp(2), "rgb2", "cam", now=0.066)
    assert s.poll(0.066).matched == []
    s.add_partner("depth", stamp(1), "d1", now=0.07)
    out = s.poll(0.07)
    assert [(m.value, m.partners["depth"]) for m in out.matched] == [("rgb1", "d1")]
    s.add_partner("depth", stamp(2), "d2", now=0.08)
    assert [(m.value, m.partners["depth"]) for m in s.poll(0.08).matched] == [("rgb2", "d2")]
    c = s.counters()
    assert c["matched"] == 3 and "inexact_depth" not in c and c["timeouts"] == 0


def test_bracketed_offset_partner_takes_the_nearest_that_belongs_to_the_frame() -> None:
    """Depth stamped 12 ms after colour (unsynchronised sensors): d_k is nearer to c_k than d_{k-1}; it is decided
    once d_k brackets c_k and c_{k+1} shows that d_k is not nearer to the next frame."""
    s = sync()
    off = 0.012
    s.add_primary(stamp(0), "rgb0", "cam", now=0.0)
    s.add_partner("depth", stamp(0) + off, "d0", now=0.0)
    assert s.poll(0.0).matched == []  # d0 might belong to the next colour frame
    s.add_primary(stamp(1), "rgb1", "cam", now=0.033)
    out = s.poll(0.033)
    assert [(m.value, m.partners["depth"]) for m in out.matched] == [("rgb0", "d0")]
    assert out.matched[0].partner_stamps["depth"] == pytest.approx(stamp(0) + off)
    s.add_partner("depth", stamp(1) + off, "d1", now=0.04)
    s.add_primary(stamp(2), "rgb2", "cam", now=0.066)
    assert [m.partners["depth"] for m in s.poll(0.066).matched] == ["d1"]
    assert s.counters()["inexact_depth"] == 2


def test_lost_partner_makes_the_frame_unmatched_instead_of_borrowing_a_neighbours() -> None:
    s = sync()
    for k in (0, 1, 2):
        s.add_primary(stamp(k), f"rgb{k}", "cam", now=0.0)
    s.add_partner("depth", stamp(0), "d0", now=0.0)
    s.add_partner("depth", stamp(2), "d2", now=0.0)  # d1 was lost (best-effort QoS)
    out = s.poll(0.0)  # no timeout needed: d2 brackets c1, and both candidates belong to other frames
    assert [(m.value, m.partners["depth"]) for m in out.matched] == [("rgb0", "d0"), ("rgb2", "d2")]
    assert [(u.stamp, u.key, u.timed_out) for u in out.unmatched] == [(stamp(1), "no_depth", False)]
    assert "depth" in out.unmatched[0].reasons["depth"]
    assert s.counters()["unmatched_no_depth"] == 1


def test_messages_reordered_across_topics_all_get_their_own_partners() -> None:
    rng = np.random.default_rng(0)
    n = 60
    topics = {"image": 0.0, "depth": 2.5 * DT, "labels": 4.0 * DT, "camera_info": -1.0 * DT}
    events = []
    for name, delay in topics.items():
        t_arrive = np.maximum.accumulate(np.arange(n) * DT + delay + rng.uniform(0, 3 * DT, n))  # per-topic order
        events += [(float(t_arrive[k]), name, k) for k in range(n)]
    events.sort()
    s = sync(("depth", "labels", "camera_info"))
    got = []
    for t, name, k in events:
        if name == "image":
            s.add_primary(stamp(k), k, "cam", now=t)
        else:
            s.add_partner(name, stamp(k), (name, k), now=t)
        got += s.poll(t).matched
    got += s.poll(events[-1][0] + 0.5).matched
    assert [m.value for m in got] == list(range(n))  # every frame, in stamp order
    for m in got:
        assert m.partners == {p: (p, m.value) for p in ("depth", "labels", "camera_info")}
        assert not m.timed_out
    c = s.counters()
    bad = ("unmatched", "inexact", "evicted", "stale")
    assert c["matched"] == n and not any(v for k, v in c.items() if k.startswith(bad))


def test_timeout_takes_the_nearest_within_tolerance_or_counts_the_frame_unmatched() -> None:
    s = sync(("depth",), timeout=1.0)
    s.add_partner("depth", stamp(0) - 0.02, "d_early", now=0.0)  # nothing will ever bracket it
    s.add_primary(stamp(0), "rgb0", "cam", now=0.0)
    assert s.poll(0.99).matched == []
    out = s.poll(1.0)
    assert [(m.value, m.partners["depth"], m.timed_out) for m in out.matched] == [("rgb0", "d_early", True)]
    assert out.matched[0].waited == pytest.approx(1.0)
    s.add_primary(stamp(10), "rgb10", "cam", now=2.0)  # no depth within tolerance at all
    assert s.poll(2.5).unmatched == []
    out = s.poll(3.0)
    assert [(u.key, u.timed_out) for u in out.unmatched] == [("no_depth", True)]
    c = s.counters()
    assert c["timeouts"] == 2 and c["unmatched_no_depth"] == 1 and c["inexact_depth"] == 1


def test_complete_frames_are_released_in_stamp_order() -> None:
    s = sync(("depth",), timeout=1.0)
    s.add_primary(stamp(0), "rgb0", "cam", now=0.0)
    s.add_primary(stamp(1), "rgb1", "cam", now=0.0)
    s.add_partner("depth", stamp(1), "d1", now=0.0)  # c1 complete; c0 undecided (d0 could still arrive? no:
    # d1 brackets c0, but d1 is c1's own; the earlier candidate is missing) -> c0 unmatched, c1 released
    out = s.poll(0.0)
    assert [m.value for m in out.matched] == ["rgb1"] and [u.stamp for u in out.unmatched] == [stamp(0)]
    s2 = sync(("depth",), timeout=1.0)
    s2.add_partner("depth", stamp(0) - 0.03, "d_prev", now=0.0)
    s2.add_primary(stamp(0), "rgb0", "cam", now=0.0)  # waits: nothing later than it yet
    s2.add_primary(stamp(3), "rgb3", "cam", now=0.1)
    s2.add_partner("depth", stamp(3), "d3", now=0.1)  # c3 complete; d3 brackets c0 but is c3's -> c0 keeps d_prev
    out = s2.poll(0.1)
    assert [(m.value, m.partners["depth"]) for m in out.matched] == [("rgb0", "d_prev"), ("rgb3", "d3")]


class ScriptedPoses:
    """Test double of a pose source (a tf buffer) whose answers the test sets per stamp; unknown stamps wait."""

    def __init__(self) -> None:
        self.ready: dict[float, np.ndarray] = {}
        self.jumps: list[float] = []

    def pose_at(self, stamp: float, camera_frame: str, timed_out: bool) -> PoseLookup:
        if stamp in self.ready:
            return PoseLookup("ready", self.ready[stamp], "map")
        return PoseLookup("failed" if timed_out else "wait", reason=f"no transform for {camera_frame} yet")

    def on_time_jump(self, stamp: float) -> None:
        self.jumps.append(stamp)


def test_a_complete_frame_waits_behind_an_undecided_earlier_one() -> None:
    poses = ScriptedPoses()
    s = sync(("depth",), timeout=1.0, pose_provider=poses)
    for k in (0, 1):
        s.add_primary(stamp(k), f"rgb{k}", "cam", now=0.0)
        s.add_partner("depth", stamp(k), f"d{k}", now=0.0)
    poses.ready[stamp(1)] = np.eye(4)  # frame 1 complete, frame 0's pose not yet
    assert s.poll(0.5).matched == [] and s.pending_count == 2
    poses.ready[stamp(0)] = np.eye(4)
    out = s.poll(0.6)
    assert [m.value for m in out.matched] == ["rgb0", "rgb1"] and out.matched[0].pose_frame_id == "map"
    s.add_primary(stamp(2), "rgb2", "cam", now=1.0)
    s.add_partner("depth", stamp(2), "d2", now=1.0)
    assert s.poll(1.9).unmatched == []
    (u,) = s.poll(2.0).unmatched  # the pose never came: the reason of the provider is kept
    assert u.key == "no_pose" and "no transform for cam" in u.reasons["pose"]


# ------------------------------------------------------------------------------------------ poses
def _trajectory(t: np.ndarray) -> np.ndarray:
    """world_from_child at times t (s): constant angular velocity about a fixed axis + constant velocity."""
    axis = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    T = np.tile(np.eye(4), (len(t), 1, 1))
    T[:, :3, :3] = Rotation.from_rotvec(np.outer(0.9 * (t - T0), axis)).as_matrix()
    T[:, :3, 3] = np.outer(t - T0, [0.4, -0.2, 0.1]) + np.array([1.0, 2.0, 0.5])
    return T


def test_odometry_interpolation_is_exact_on_a_constant_twist_and_applies_the_extrinsic() -> None:
    ext = np.eye(4)
    ext[:3, :3] = Rotation.from_euler("xyz", [-np.pi / 2, 0, -np.pi / 2]).as_matrix()  # base -> optical
    ext[:3, 3] = [0.1, 0.0, 0.3]
    buf = OdometryPoseBuffer(child_from_camera=ext, tolerance=0.05, max_gap=0.2)
    ts = T0 + np.arange(0, 1.0, 0.1)  # 10 Hz odometry
    for t, T in zip(ts, _trajectory(ts), strict=True):
        buf.add(float(t), T, frame_id="odom", child_frame_id="base_link")
    query = T0 + np.array([0.0, 0.05, 0.137, 0.5, 0.8999])
    for q, T_true in zip(query, _trajectory(query), strict=True):
        look = buf.pose_at(float(q), "cam")
        assert look.status == "ready" and look.frame_id == "odom"
        np.testing.assert_allclose(look.world_from_camera, T_true @ ext, atol=1e-9)
    assert buf.child_frame_id == "base_link"
    assert buf.pose_at(T0 + 0.93, "cam").status == "wait"  # newer than every sample: the next one may bracket it
    held = buf.pose_at(T0 + 0.93, "cam", timed_out=True)  # 30 ms after the latest sample: held
    assert held.status == "ready"
    np.testing.assert_allclose(held.world_from_camera, _trajectory(ts[-1:])[0] @ ext, atol=1e-12)
    late = buf.pose_at(T0 + 1.2, "cam", timed_out=True)
    assert late.status == "failed" and "older than the image" in late.reason
    old = buf.pose_at(T0 - 1.0, "cam")  # older than the buffer: final at once
    assert old.status == "failed" and "oldest" in old.reason


def test_odometry_gap_wider_than_max_gap_is_not_interpolated() -> None:
    buf = OdometryPoseBuffer(tolerance=0.05, max_gap=0.2)
    ts = np.array([T0, T0 + 1.0])
    for t, T in zip(ts, _trajectory(ts), strict=True):
        buf.add(float(t), T, frame_id="odom")
    assert buf.pose_at(T0 + 0.5, "cam").status == "failed"
    near = buf.pose_at(T0 + 0.04, "cam")
    assert near.status == "ready"
    np.testing.assert_allclose(near.world_from_camera, _trajectory(ts[:1])[0], atol=1e-12)


def test_odometry_rejects_bad_poses_and_restarts_on_a_frame_change() -> None:
    buf = OdometryPoseBuffer()
    with pytest.raises(ValueError):
        buf.add(T0, np.full((4, 4), np.nan))
    with pytest.raises(ValueError):
        buf.add(T0, np.diag([2.0, 1.0, 1.0, 1.0]))
    buf.add(T0, np.eye(4), frame_id="odom")
    buf.add(T0 + 0.1, np.eye(4), frame_id="map")
    assert len(buf) == 1 and buf.frame_id == "map" and buf.frame_changes == 1


def test_synchronizer_waits_for_odometry_that_brackets_the_image_and_interpolates() -> None:
    odom = OdometryPoseBuffer(tolerance=0.05, max_gap=0.2)
    s = sync(("depth",), pose_provider=odom)
    ts = T0 + np.arange(0, 0.2, 0.02)
    traj = _trajectory(ts)
    for t, T in zip(ts[:3], traj[:3], strict=True):
        odom.add(float(t), T, frame_id="odom")
    t_img = T0 + 0.047  # between samples 2 (0.04) and 3 (0.06)
    s.add_primary(t_img, "rgb", "cam", now=0.0)
    s.add_partner("depth", t_img, "d", now=0.0)
    assert s.poll(0.0).matched == []  # sample 2 is 7 ms away, but sample 3 may be closer: wait
    odom.add(float(ts[3]), traj[3], frame_id="odom")
    (m,) = s.poll(0.01).matched
    assert m.pose_frame_id == "odom"
    np.testing.assert_allclose(m.world_from_camera, _trajectory(np.array([t_img]))[0], atol=1e-9)


def test_pose_failure_is_reported_with_its_reason() -> None:
    odom = OdometryPoseBuffer(tolerance=0.05)
    s = sync((), pose_provider=odom, timeout=1.0)
    s.add_primary(T0, "rgb", "cam", now=0.0)
    assert s.poll(0.5).unmatched == []
    (u,) = s.poll(1.0).unmatched
    assert u.key == "no_pose" and u.reasons["pose"] == "no odometry received" and u.timed_out


# ------------------------------------------------------------------------------------------ bounds
def test_buffers_stay_bounded_and_evictions_are_counted() -> None:
    s = sync(("depth",), max_pending=5, max_partner_buffer=8)
    for k in range(100):  # partners without colour: bounded by max_partner_buffer
        s.add_partner("depth", stamp(k), k, now=0.0)
    assert s.buffered("depth") == 8 and s.counters()["evicted_depth"] == 92
    s.reset()
    for k in range(100):  # colour without partners: bounded by max_pending
        s.add_primary(stamp(k), k, "cam", now=0.0)
        s.poll(0.0)
    assert s.pending_count == 5 and s.counters()["evicted_frames"] == 95
    s.reset()
    s.add_primary(stamp(0), "rgb0", "cam", now=0.0)
    s.add_partner("depth", stamp(0), "d0", now=0.0)
    s.poll(0.0)
    for k in range(1, 200):  # a matched stream: buffers are pruned as frames are decided, nothing evicted
        s.add_primary(stamp(k), k, "cam", now=0.0)
        s.add_partner("depth", stamp(k), k, now=0.0)
        s.poll(0.0)
        assert s.buffered("depth") <= 3 and s.pending_count == 0
    s.add_partner("depth", stamp(190), "too late", now=0.0)  # its frame was decided long ago
    c = s.counters()
    assert c["stale_depth"] == 1 and c["matched"] == 200


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        FrameSynchronizer(("depth", "depth"))
    with pytest.raises(ValueError):
        FrameSynchronizer(("pose",))
    with pytest.raises(ValueError):
        FrameSynchronizer(("depth",), timeout=0.0)
    s = sync()
    with pytest.raises(KeyError):
        s.add_partner("labels", T0, None, now=0.0)
    with pytest.raises(ValueError):
        s.add_primary(float("nan"), None, "cam", now=0.0)


# ------------------------------------------------------------------------------------------ time
def test_time_jump_detector_classifies_stamps() -> None:
    d = TimeJumpDetector(threshold=1.0)
    assert [d.check(t) for t in (10.0, 10.5, 10.5, 10.2, 8.0, 8.1)] == \
        ["first", "forward", "same", "backwards", "jump", "forward"]
    with pytest.raises(ValueError):
        TimeJumpDetector(0.0)


def test_small_step_back_on_the_primary_is_refused_and_counted() -> None:
    s = sync()
    s.add_primary(stamp(5), "rgb5", "cam", now=0.0)
    with pytest.raises(StampOrderError):
        s.add_primary(stamp(4), "rgb4", "cam", now=0.0)
    with pytest.raises(StampOrderError):
        s.add_primary(stamp(5), "dup", "cam", now=0.0)
    assert s.counters()["stamp_backwards"] == 2 and s.pending_count == 1


def test_time_jump_clears_the_old_time_line_and_matching_goes_on() -> None:
    """A bag loop: stamps restart 10 s earlier. Old pending frames and old partner messages are dropped; the new
    time line's depth and odometry that arrived before its first colour image are kept and used."""
    odom = OdometryPoseBuffer(tolerance=0.05)
    s = sync(("depth",), pose_provider=odom)
    loop = 300  # frames per loop (10 s)

    def feed_odom(k: int) -> None:
        odom.add(stamp(k), _trajectory(np.array([stamp(k)]))[0], frame_id="odom")

    s2 = s
    for k in range(loop - 5, loop):  # end of the first pass; the last two frames' depth never arrives
        feed_odom(k)
        s2.add_primary(stamp(k), f"old{k}", "cam", now=0.0)
        if k < loop - 2:
            s2.add_partner("depth", stamp(k), f"d_old{k}", now=0.0)
    out = s2.poll(0.0)
    assert [m.value for m in out.matched] == [f"old{k}" for k in range(loop - 5, loop - 2)]  # the last two wait
    assert s2.pending_count == 2
    # The loop restarts at stamp(0): depth and odometry of the new pass arrive first, then colour.
    feed_odom(0)  # odometry jumps back: its buffer restarts on its own
    assert odom.time_jumps == 1 and len(odom) == 1
    jump_d = s2.add_partner("depth", stamp(0), "d_new0", now=1.0)
    assert jump_d is not None and jump_d.topic == "depth" and jump_d.jump == pytest.approx((loop - 3) * DT)
    s2.add_partner("depth", stamp(1), "d_new1", now=1.0)  # still ahead of colour: kept, not stale
    assert s2.buffered("depth") == 2
    feed_odom(1)
    jump = s2.add_primary(stamp(0), "new0", "cam", now=1.0)
    assert jump is not None and jump.topic == "primary" and jump.dropped_frames == 2
    assert jump.previous_stamp == pytest.approx(stamp(loop - 1)) and jump.stamp == pytest.approx(stamp(0))
    out = s2.poll(1.0)
    assert [(m.value, m.partners["depth"]) for m in out.matched] == [("new0", "d_new0")]
    np.testing.assert_allclose(out.matched[0].world_from_camera, _trajectory(np.array([stamp(0)]))[0], atol=1e-12)
    for k in range(1, 5):  # the new pass maps on
        feed_odom(k + 1)
        if k > 1:
            s2.add_partner("depth", stamp(k), f"d_new{k}", now=1.0)
        s2.add_primary(stamp(k), f"new{k}", "cam", now=1.0)
        assert [m.partners["depth"] for m in s2.poll(1.0).matched] == [f"d_new{k}"]
    c = s2.counters()
    assert c["time_jumps"] == 1 and c["dropped_on_jump"] == 2 and c["partner_jumps_depth"] == 1
    assert "stale_depth" not in c and "unmatched_no_depth" not in c


def test_time_jump_on_the_primary_first_drops_old_partner_messages() -> None:
    """Colour of the new pass arrives before its depth: old depth messages (far later stamps) must not bracket the
    new frames and make them unmatched."""
    odom = OdometryPoseBuffer(tolerance=0.05)
    s = sync(("depth",), pose_provider=odom)
    for k in range(100, 105):
        odom.add(stamp(k), np.eye(4), frame_id="odom")
        s.add_partner("depth", stamp(k), k, now=0.0)
    s.add_primary(stamp(100), "old100", "cam", now=0.0)
    assert [m.value for m in s.poll(0.0).matched] == ["old100"]
    jump = s.add_primary(stamp(0), "new0", "cam", now=1.0)
    assert jump is not None and jump.dropped_messages > 0 and s.buffered("depth") == 0
    assert len(odom) == 0  # the provider dropped its old time line too
    out = s.poll(1.0)
    assert out.matched == [] and out.unmatched == []  # waits for its own depth and pose
    s.add_partner("depth", stamp(0), "d0", now=1.1)
    odom.add(stamp(0), np.eye(4), frame_id="odom")
    assert [m.partners["depth"] for m in s.poll(1.1).matched] == ["d0"]
