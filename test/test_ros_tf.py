"""``pose_source: tf`` with the real tf2_ros, against odometry poses, over loopback DDS in two processes.

The replay publishes the ground-truth poses both as ``nav_msgs/Odometry`` and as tf (REP-105): ``/tf``
``odom -> base_link`` per frame, ``/tf_static`` ``base_link -> camera_color_optical_frame`` (a camera mounted
0.3 m up and 0.1 m forward, looking ahead) and a non-identity ``map -> odom`` (what localisation publishes). The
tf-posed map must equal the odometry-posed map moved by ``map <- odom``, and so must the ``/find_object`` answers
and their Nav2 approach poses; results are stamped in the frame they are in (``odom`` vs ``map``).
"""

from __future__ import annotations

import numpy as np
import pytest
from ros_helpers import DiagnosticsWatcher, call_service, start_node_process, stop_process
from scipy.spatial.transform import Rotation

pytest.importorskip("tf2_ros", reason="tf2_ros is built from ../shared/vendor/ros2 by scripts/setup_env.sh")

pytestmark = [pytest.mark.ros, pytest.mark.slow]

FRAMES = list(range(4, 14))


def _matrix(rotvec, t) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
    T[:3, 3] = t
    return T


# camera optical frame in base_link (x forward, z up): optical z (view) = base x, optical x = -base y, y = -base z
BASE_FROM_CAMERA = np.array([[0.0, 0.0, 1.0, 0.1], [-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.3], [0, 0, 0, 1.0]])
MAP_FROM_ODOM = _matrix([0.0, 0.0, np.pi / 2], [1.0, -2.0, 0.0])


def _params(hololens, pose_source: str) -> dict:
    return {
        "backend": "rgbd", "semantic_source": "labels", "pose_source": pose_source,
        "label_names_file": str(hololens / "annotations" / "objects.json"),
        "window.size": 4, "window.overlap": 1, "window_period": 1.0, "publish.gaussians_period": 0.5,
        "queue.max_frames": 40, "queue.max_windows": 16, "sync_timeout": 10.0,
    }


def _run(spinning_executor, hololens_dir, tmp_path, pose_source: str, name: str):
    """Map FRAMES with one pose source; returns (diagnostics values, backpack answer, the client)."""
    from rclpy.node import Node

    from langgs_ros.datasets import open_sequence
    from langgs_ros.ros.replay import FolderReplay
    from langgs_ros.srv import FindObject

    ctx = spinning_executor.executor.context
    client = spinning_executor.add(Node(f"tf_client_{name}", context=ctx))
    client.diag = DiagnosticsWatcher(client)
    replay = spinning_executor.add(FolderReplay(open_sequence(hololens_dir), node_name=f"tf_replay_{name}",
                                                context=ctx, publish_tf=True, base_from_camera=BASE_FROM_CAMERA,
                                                map_from_odom=MAP_FROM_ODOM))
    node = f"mapping_{name}"
    proc = start_node_process(_params(hololens_dir, pose_source), node_name=node,
                              log_path=tmp_path / f"{name}.log")
    try:
        assert replay.wait_for_subscribers(60)
        replay.run(rate=4.0, indices=FRAMES)
        values = client.diag.wait_idle(min_windows=2)
        resp = call_service(client, FindObject, "/find_object", FindObject.Request(query="red backpack"))
        assert resp.success and resp.objects, resp.message
        if pose_source == "tf":
            # a frame whose optical frame tf does not know (its camera_info, depth, labels and colour all
            # present): counted with tf's reason, the node keeps mapping
            t = replay.stamp_of(FRAMES[-1]) + 0.5
            for topic, msg in replay.frame_messages(FRAMES[-1], t):
                if topic in ("odom", "tf"):
                    continue
                msg.header.frame_id = "unknown_optical_frame"
                replay.publish(topic, msg)
            import time

            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(
                    k.startswith("sync.unmatched") and "pose" in k and client.diag.get(k) > 0
                    for k in client.diag.values):
                time.sleep(0.2)
            keys = [k for k in client.diag.values if k.startswith("sync.unmatched") and "pose" in k]
            assert keys and client.diag.get(keys[0]) >= 1, client.diag.values
            reason = client.diag.values.get("sync.last_unmatched_reason", "")
            assert "unknown_optical_frame" in reason, client.diag.values
        assert proc.poll() is None
        return values, resp.objects[0]
    finally:
        assert stop_process(proc) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]


def _xyz(p) -> np.ndarray:
    return np.array([p.x, p.y, p.z])


def test_tf_poses_equal_odometry_poses_moved_by_map_from_odom(spinning_executor, hololens_dir, tmp_path) -> None:
    odo_values, odo = _run(spinning_executor, hololens_dir, tmp_path, "odometry", "odo")
    tf_values, tf = _run(spinning_executor, hololens_dir, tmp_path, "tf", "tf")
    n_odo, n_tf = int(odo_values["map_gaussians"]), int(tf_values["map_gaussians"])
    assert abs(n_tf - n_odo) <= 0.01 * n_odo, (n_odo, n_tf)
    assert tf_values["map_instances"] == odo_values["map_instances"]
    # REP-105: the odometry-posed map is in odom, the tf-posed one in map
    assert odo.pose.header.frame_id == "odom" and odo.approach_pose.header.frame_id == "odom"
    assert tf.pose.header.frame_id == "map" and tf.approach_pose.header.frame_id == "map"
    assert tf_values["map_frame"] == "map" and odo_values["map_frame"] == "odom"
    moved = MAP_FROM_ODOM[:3, :3] @ _xyz(odo.pose.pose.position) + MAP_FROM_ODOM[:3, 3]
    assert np.linalg.norm(_xyz(tf.pose.pose.position) - moved) < 0.05
    moved_goal = MAP_FROM_ODOM[:3, :3] @ _xyz(odo.approach_pose.pose.position) + MAP_FROM_ODOM[:3, 3]
    assert np.linalg.norm(_xyz(tf.approach_pose.pose.position) - moved_goal) < 0.10
    # the answer really moved (the transform is not the identity)
    assert np.linalg.norm(_xyz(tf.pose.pose.position) - _xyz(odo.pose.pose.position)) > 1.0


def test_tf_lookup_at_the_published_stamp_despite_float_seconds(ros_context) -> None:
    """A transform published at an image's own stamp is found for that image although the stamp travels as float
    seconds (~0.2 µs resolution at 1.8e9 s: rounded back it can land after the transform; tf2 would refuse)."""
    from geometry_msgs.msg import TransformStamped
    from rclpy.node import Node

    from langgs_ros.ros.conversions import stamp_to_sec
    from langgs_ros.ros.pose_sources import TfPoseSource

    node = Node("tf_float_stamps", context=ros_context)
    try:
        source = TfPoseSource(node, "map")
        late = 0
        for i in range(200):  # stamps of a 30 Hz camera ~57 years after the epoch
            msg = TransformStamped()
            msg.header.stamp.sec, msg.header.stamp.nanosec = 1_796_303_166 + i, 916_552_123 + 333 * i
            msg.header.frame_id, msg.child_frame_id = "map", f"cam{i}"
            msg.transform.translation.x = float(i)
            msg.transform.rotation.w = 1.0
            source.buffer.set_transform(msg, "test")
            t = stamp_to_sec(msg.header.stamp)
            late += round(t * 1e9) > msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
            look = source.pose_at(t, f"cam{i}")
            assert look.status == "ready", look.reason
            assert look.world_from_camera[0, 3] == pytest.approx(i)
            # a stamp really after the transform still waits for a later one
            assert source.pose_at(t + 0.01, f"cam{i}").status == "wait"
        assert late > 0  # the rounding this guards against does happen on these stamps
    finally:
        node.destroy_node()
