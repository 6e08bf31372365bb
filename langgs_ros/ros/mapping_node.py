"""``mapping_node``: camera stream in, semantic Gaussian map and ``/find_object`` out.

Threading model: subscription callbacks only convert messages (cv_bridge / numpy) and hand matched frames to a
:class:`~langgs_ros.pipeline.MappingWorker`, whose single thread owns the device (GPU) and runs the pipeline per
window. Services and publishers read immutable map snapshots, so they never wait for a window to finish.

Topics (relative names, remap them in the launch file):

========================  ===========================================  =========================================
topic                     type                                         notes
========================  ===========================================  =========================================
``image``                 sensor_msgs/Image (rgb8, bgr8, rgba8, ...)   sensor-data QoS
``camera_info``           sensor_msgs/CameraInfo                       sensor-data QoS
``depth``                 sensor_msgs/Image (16UC1 mm, 32FC1 m)        optional (``rgbd`` backend)
``labels``                sensor_msgs/Image (16UC1/mono8/32SC1 ids)    optional (``labels`` semantic source)
``odom``                  nav_msgs/Odometry                            ``pose_source: odometry``
``~/gaussians``           sensor_msgs/PointCloud2                      reliable + transient local, rate-limited
``~/objects``             visualization_msgs/MarkerArray               reliable + transient local
``~/query_markers``       visualization_msgs/MarkerArray               last query's results
``~/camera_path``         nav_msgs/Path                                reconstructed camera centres
``/diagnostics``          diagnostic_msgs/DiagnosticArray              1 Hz
========================  ===========================================  =========================================

Services: ``find_object`` (langgs_ros/srv/FindObject), ``~/save_map``, ``~/load_map`` (langgs_ros/srv),
``~/reset`` (std_srvs/Trigger). Parameters: see ``config/mapping.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Vector3
from nav_msgs.msg import Odometry
from nav_msgs.msg import Path as PathMsg
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from langgs_ros.msg import ObjectLocation
from langgs_ros.ros.conversions import (
    ConversionError,
    box_markers,
    camera_info_to_k,
    image_to_depth,
    image_to_labels,
    image_to_rgb,
    pose_stamped,
    pose_to_matrix,
    rotation_to_quaternion,
    sec_to_stamp,
    snapshot_to_pointcloud2,
    stamp_to_sec,
    xyz_rpy_to_matrix,
)
from langgs_ros.ros.frame_sync import FrameSynchronizer, OdometryPoseBuffer, PoseLookup, StampOrderError
from langgs_ros.srv import FindObject, LoadMap, SaveMap
from langgs_ros.types import Frame, MapSnapshot

MAX_QUERY_CHARS = 1000

# name -> (default, description). Units in the descriptions. Mirrors config/mapping.yaml.
PARAMETERS: dict[str, tuple[Any, str]] = {
    "map_frame": ("map", "Frame of the published map and object poses (REP-105 map)."),
    "camera_frame": ("", "Camera optical frame; empty = the image header's frame_id."),
    "device": ("cpu", "Torch device of the pipeline: cpu, cuda, cuda:N."),
    "pose_source": ("auto", "Camera poses: tf (tf2_ros lookup map_frame<-camera), odometry (odom topic + "
                            "camera_extrinsic), none (unposed: feedforward backend), auto (tf if installed, "
                            "else odometry)."),
    "camera_extrinsic_xyz": ([0.0, 0.0, 0.0], "Odometry child frame -> camera optical frame translation, m."),
    "camera_extrinsic_rpy": ([0.0, 0.0, 0.0], "Odometry child frame -> camera optical frame roll/pitch/yaw, rad."),
    "sync_tolerance": (0.05, "Max stamp difference (s) when matching colour, depth, labels and poses."),
    "sync_timeout": (3.0, "s (wall clock) a colour image waits for its depth, labels and pose before it is dropped."),
    "backend": ("rgbd", "Reconstruction backend: rgbd or feedforward."),
    "semantic_source": ("labels", "Semantic source: labels (label image topic) or clip_sam."),
    "label_names_file": ("", "JSON with label id -> name (objects.json layout or a plain {id: name} map)."),
    "window.size": (8, "Keyframes per reconstruction window."),
    "window.overlap": (2, "Keyframes shared by consecutive windows."),
    "window_period": (5.0, "s: a partial window is processed after this long without a full one (0 = never)."),
    "keyframe.min_translation": (0.10, "m of camera motion that makes a keyframe."),
    "keyframe.min_rotation": (0.14, "rad of camera rotation that makes a keyframe."),
    "keyframe.min_image_change": (0.06, "Mean grey change in [0,1] that makes a keyframe (unposed)."),
    "keyframe.max_interval": (5.0, "s after which a frame is a keyframe regardless of motion."),
    "max_depth": (10.0, "m; depth beyond this is invalid."),
    "max_gaussians": (2_000_000, "Bound of the map's Gaussian count (eviction policy: see fusion docs)."),
    "voxel_size": (0.02, "m; base voxel size of the geometric sparsification."),
    "queue.max_frames": (30, "Frames waiting for the worker; oldest dropped beyond."),
    "queue.sync_frames": (40, "Colour/depth/label images buffered each while waiting for their partners."),
    "queue.sensor_depth": (10, "History depth of the best-effort camera subscriptions (messages)."),
    "queue.max_windows": (2, "Windows waiting for the worker; oldest dropped (counted) beyond."),
    "publish.gaussians_period": (2.0, "s between ~/gaussians publications (only when the map changed)."),
    "publish.max_points": (2_000_000, "At most this many Gaussians per ~/gaussians message (highest opacity)."),
    "query.top_k": (5, "Default number of /find_object results."),
    "query.min_score": (0.5, "Default minimum relevancy score in [0, 1]."),
    "autosave_period": (0.0, "s between autosaves of a changed map (0 = off)."),
    "autosave_path": ("", "Autosave .ply path (a sidecar is written beside it)."),
    "load_on_start": (False, "Load autosave_path at start when it exists."),
    "semantic.clip_model": ("ViT-B-16", "open_clip model name (clip_sam)."),
    "semantic.clip_pretrained": ("laion2b_s34b_b88k", "open_clip pretrained tag or checkpoint path."),
    "semantic.sam_model_type": ("vit_b", "segment-anything model type (vit_b, vit_l, vit_h)."),
    "semantic.sam_checkpoint": ("", "segment-anything checkpoint path; empty = the download cache."),
    "semantic.points_per_side": (16, "SAM automatic mask generator grid."),
    "semantic.preset": ("full", "full (real weights) or tiny (random-init test models)."),
    "feedforward.preset": ("vggt_1b", "VGGT preset: vggt_1b (released weights) or tiny."),
    "feedforward.weights": ("", "VGGT checkpoint path or Hugging Face repo id; empty = default repo."),
    "feedforward.image_width": (518, "px; model input width (multiple of 14; 518 for the released weights)."),
    "feedforward.camera_info": ("replace", "With CameraInfo: replace predicted intrinsics (rescaling depth), "
                                           "check (log the focal error) or ignore."),
    "feedforward.allow_random_weights": (False, "Run a preset without weights (random init; tests/plumbing only)."),
}


class _TfPoses:
    """:class:`~langgs_ros.ros.frame_sync.PoseProvider` over a tf2 buffer: ``map_frame <- camera_frame`` at the
    image stamp (tf2 interpolates); a failed lookup waits until the synchroniser's timeout, then fails with tf2's
    message as the reason."""

    def __init__(self, buffer: Any, target_frame: str) -> None:
        self.buffer = buffer
        self.target_frame = target_frame

    def pose_at(self, stamp: float, camera_frame: str, timed_out: bool) -> PoseLookup:
        from geometry_msgs.msg import Point, Pose, Quaternion
        from rclpy.time import Time as RclTime

        try:
            tf = self.buffer.lookup_transform(self.target_frame, camera_frame, RclTime(seconds=stamp))
        except Exception as exc:  # tf2 raises several lookup exceptions; the frame waits, then fails
            return PoseLookup("failed" if timed_out else "wait", reason=f"tf: {exc}")
        t, q = tf.transform.translation, tf.transform.rotation
        T = pose_to_matrix(Pose(position=Point(x=t.x, y=t.y, z=t.z), orientation=Quaternion(x=q.x, y=q.y, z=q.z,
                                                                                              w=q.w)))
        return PoseLookup("ready", T, self.target_frame)

    def on_time_jump(self, stamp: float) -> None:
        self.buffer.clear()  # dynamic transforms only; /tf_static survives


def _load_label_names(path: str) -> dict[int, str]:
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "objects" in data:
        return {int(o["id"]): str(o["name"]) for o in data["objects"]}
    return {int(k): str(v) for k, v in data.items()}


class MappingNode(Node):
    """The langgs_ros mapping node (see the module docstring for its interface).

    Args:
        node_name: ROS node name; ``pipeline``: a prebuilt pipeline (tests), else built from parameters.
    """

    def __init__(self, node_name: str = "mapping_node", pipeline=None, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        for name, (default, desc) in PARAMETERS.items():
            self.declare_parameter(name, default, ParameterDescriptor(description=desc))
        p = self._param
        self.map_frame: str = p("map_frame")
        self.sync_tol = float(p("sync_tolerance"))
        self.sync_timeout = float(p("sync_timeout"))
        self.label_names = _load_label_names(p("label_names_file"))
        self.backend: str = p("backend")
        self.semantic_source: str = p("semantic_source")
        self.need_depth = self.backend == "rgbd"
        self.need_labels = self.semantic_source == "labels"
        self.pose_source = self._resolve_pose_source(p("pose_source"))
        self.T_child_camera = xyz_rpy_to_matrix(list(p("camera_extrinsic_xyz")), list(p("camera_extrinsic_rpy")))
        self._errors: dict[str, int] = {}
        self._lock = threading.Lock()
        # Partners wait in bounded buffers: callbacks of different topics can run seconds apart when the CPU is
        # busy, so a colour image may be taken long after its depth/labels (sizes: ~40 frames, ~5 s at 8 Hz).
        # Stamp matching (frame_sync): a partner is taken only when exact, bracketed by a later message of its
        # topic, or at the timeout; CameraInfo is a stamp-matched partner for the rgbd backend.
        n_wait = int(p("queue.sync_frames"))
        self.need_camera_info = self.backend == "rgbd"
        self._camera_info: tuple[np.ndarray, int, int] | None = None  # latest (optional for feedforward)
        self._odom = (OdometryPoseBuffer(self.T_child_camera, tolerance=self.sync_tol, max_samples=1000)
                      if self.pose_source == "odometry" else None)
        self.callback_cost = deque(maxlen=200)  # seconds per colour callback, for diagnostics/bench
        self._bridge = None

        from langgs_ros.pipeline import MappingPipeline, MappingWorker

        self.pipeline = pipeline if pipeline is not None else MappingPipeline(self._pipeline_config())
        self.worker = MappingWorker(
            self.pipeline, window_period=float(p("window_period")), max_queued_frames=int(p("queue.max_frames")),
            max_queued_windows=int(p("queue.max_windows")), on_error=self._worker_error,
            on_update=self._worker_window_done,
        )
        self._published_version = -1
        self._saved_version = -1
        self._last_gaussians_pub = 0.0

        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL, history=HistoryPolicy.KEEP_LAST)
        self.pub_gaussians = self.create_publisher(PointCloud2, "~/gaussians", latched)
        self.pub_objects = self.create_publisher(MarkerArray, "~/objects", latched)
        self.pub_query = self.create_publisher(MarkerArray, "~/query_markers", latched)
        self.pub_path = self.create_publisher(PathMsg, "~/camera_path", latched)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

        self._sub_group = MutuallyExclusiveCallbackGroup()
        self._srv_group = ReentrantCallbackGroup()
        self._timer_group = MutuallyExclusiveCallbackGroup()
        self._save_group = MutuallyExclusiveCallbackGroup()
        # Sensor-data QoS (best effort, volatile) with a deeper history than the preset's 5: colour, depth and
        # label images of one stamp arrive as separate messages and must all survive until they are matched.
        sd = QoSProfile(depth=int(p("queue.sensor_depth")), reliability=qos_profile_sensor_data.reliability,
                        durability=qos_profile_sensor_data.durability, history=HistoryPolicy.KEEP_LAST)
        self.create_subscription(Image, "image", self._on_image, sd, callback_group=self._sub_group)
        self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, sd, callback_group=self._sub_group)
        if self.need_depth:
            self.create_subscription(Image, "depth", partial(self._on_partner, convert=image_to_depth, kind="depth"),
                                     sd, callback_group=self._sub_group)
        if self.need_labels:
            self.create_subscription(Image, "labels", partial(self._on_partner, convert=image_to_labels,
                                                              kind="labels"),
                                     sd, callback_group=self._sub_group)
        if self.pose_source == "odometry":
            odom_pose = partial(self._on_partner, convert=lambda m: pose_to_matrix(m.pose.pose), kind="odom")
            self.create_subscription(Odometry, "odom", odom_pose, 50, callback_group=self._sub_group)
        self._tf_buffer = None
        if self.pose_source == "tf":
            import tf2_ros

            self._tf_buffer = tf2_ros.Buffer()
            self._tf_listener = tf2_ros.TransformListener(self._tf_buffer, self)
        partners = [n for n, need in (("depth", self.need_depth), ("labels", self.need_labels),
                                      ("camera_info", self.need_camera_info)) if need]
        poses = self._odom if self._odom is not None else (
            _TfPoses(self._tf_buffer, self.map_frame) if self._tf_buffer is not None else None)
        self._sync = FrameSynchronizer(partners, tolerance=self.sync_tol, timeout=self.sync_timeout,
                                       max_pending=n_wait, max_partner_buffer=n_wait, pose_provider=poses)
        # timeouts must fire without traffic (the last frames of a stream, a partner that stopped)
        self.create_timer(max(0.02, min(0.1, self.sync_timeout / 4)), self._poll_sync, callback_group=self._sub_group)

        self.create_service(FindObject, "find_object", self._srv_find_object, callback_group=self._srv_group)
        self.create_service(SaveMap, "~/save_map", self._srv_save_map, callback_group=self._save_group)
        self.create_service(LoadMap, "~/load_map", self._srv_load_map, callback_group=self._save_group)
        self.create_service(Trigger, "~/reset", self._srv_reset, callback_group=self._save_group)

        self.create_timer(0.2, self._publish_if_changed, callback_group=self._timer_group)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=self._timer_group)
        period = float(p("autosave_period"))
        if period > 0 and p("autosave_path"):
            self.create_timer(period, self._autosave, callback_group=self._save_group)
        if p("load_on_start") and p("autosave_path") and Path(p("autosave_path")).is_file():
            ok, msg, _, _ = self._load(p("autosave_path"))
            self._saved_version = self.worker.snapshot().version  # the file already holds this map
            (self.get_logger().info if ok else self.get_logger().error)(f"load_on_start: {msg}")
        self.worker.start()
        self.get_logger().info(
            f"mapping_node ready: backend={self.backend}, semantics={self.semantic_source}, "
            f"pose_source={self.pose_source}, device={p('device')}, map_frame={self.map_frame}"
        )

    # ------------------------------------------------------------------------------------------ setup
    def _param(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _resolve_pose_source(self, requested: str) -> str:
        if requested not in ("auto", "tf", "odometry", "none"):
            self.get_logger().error(f"unknown pose_source {requested!r}; using auto")
            requested = "auto"
        if requested in ("auto", "tf"):
            try:
                import tf2_ros  # noqa: F401
                return "tf"
            except ImportError:
                if requested == "tf":
                    self.get_logger().error("pose_source tf requested but tf2_ros is not installed; using odometry")
                return "odometry"
        return requested

    def _pipeline_config(self):
        from langgs_ros.frames import KeyframeConfig, WindowConfig
        from langgs_ros.pipeline import PipelineConfig

        p = self._param
        cfg = PipelineConfig(device=p("device"), backend=self.backend, semantic_source=self.semantic_source)
        cfg.window = WindowConfig(size=int(p("window.size")), overlap=int(p("window.overlap")))
        cfg.keyframes = KeyframeConfig(
            min_translation=float(p("keyframe.min_translation")), min_rotation=float(p("keyframe.min_rotation")),
            min_image_change=float(p("keyframe.min_image_change")), max_interval=float(p("keyframe.max_interval")),
        )
        cfg.fusion.max_gaussians = int(p("max_gaussians"))
        cfg.sparsify.base_voxel_size = float(p("voxel_size"))
        cfg.query.top_k = int(p("query.top_k"))
        cfg.query.min_score = float(p("query.min_score"))
        if self.backend == "rgbd":
            cfg.backend_args = {"max_depth": float(p("max_depth"))}
        elif self.backend == "feedforward":
            cfg.backend_args = {
                "preset": p("feedforward.preset"), "image_width": int(p("feedforward.image_width")),
                "camera_info": p("feedforward.camera_info"),
                "allow_random_weights": bool(p("feedforward.allow_random_weights")),
            }
            if p("feedforward.weights"):
                cfg.backend_args["weights"] = p("feedforward.weights")
        if self.semantic_source == "labels":
            cfg.semantic_args = {"label_names": self.label_names or None}
        elif self.semantic_source == "clip_sam":
            cfg.semantic_args = {
                "clip_model": p("semantic.clip_model"), "clip_pretrained": p("semantic.clip_pretrained"),
                "sam_model_type": p("semantic.sam_model_type"),
                "sam_checkpoint": p("semantic.sam_checkpoint") or None,
                "points_per_side": int(p("semantic.points_per_side")), "preset": p("semantic.preset"),
            }
        return cfg

    # ------------------------------------------------------------------------------------------ errors
    def _warn(self, key: str, msg: str) -> None:
        """Count an input problem and log it, throttled per problem kind (2 s)."""
        self._errors[key] = self._errors.get(key, 0) + 1
        self.get_logger().warning(f"{msg} [{key}: {self._errors[key]} so far]", throttle_duration_sec=2.0)

    def _worker_error(self, msg: str) -> None:
        self._warn("worker", msg)

    def _worker_window_done(self, snapshot, stats) -> None:
        """One line per processed window (worker thread; rclpy loggers are thread-safe)."""
        self.get_logger().info(
            f"window {self.worker.processed_windows}: {stats.num_frames} frames in {stats.t_total:.2f} s "
            f"(reconstruct {stats.t_reconstruct:.2f}, semantics {stats.t_semantics:.2f}, "
            f"gaussians {stats.t_gaussians:.2f}, fuse {stats.t_fuse:.2f}); map {stats.num_map_gaussians} "
            f"Gaussians, {stats.num_instances} instances; dropped windows {self.worker.dropped_windows}")

    # ------------------------------------------------------------------------------------------ inputs
    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            info = (camera_info_to_k(msg), int(msg.width), int(msg.height))
        except ConversionError as exc:
            self._warn("camera_info", f"CameraInfo ignored: {exc}")
            return
        self._camera_info = info
        if self.need_camera_info:
            self._add_partner("camera_info", stamp_to_sec(msg.header.stamp), info)

    def _on_image(self, msg: Image) -> None:
        t0 = time.perf_counter()
        stamp = stamp_to_sec(msg.header.stamp)
        try:
            if self._bridge is None:
                from cv_bridge import CvBridge

                self._bridge = CvBridge()
            rgb = image_to_rgb(msg, self._bridge)
        except ConversionError as exc:
            self._warn("image", f"colour image dropped: {exc}")
            return
        frame_id = self._param("camera_frame") or msg.header.frame_id
        with self._lock:
            try:
                jump = self._sync.add_primary(stamp, rgb, frame_id, time.monotonic())
            except StampOrderError as exc:
                self._warn("stamp_backwards", f"{exc}; dropped")
                return
        if jump is not None:  # bag loop / simulator reset: pending buffers were cleared, the map is kept
            self.worker.time_jump()
            self.get_logger().warning(
                f"time jump: colour stamps went back {jump.jump:.3f} s (from {jump.previous_stamp:.3f} to "
                f"{jump.stamp:.3f} s); dropped {jump.dropped_frames} waiting frames and {jump.dropped_messages} "
                f"buffered messages, map kept [{self._sync.time_jumps} jump(s) so far]")
        self._poll_sync()
        self.callback_cost.append(time.perf_counter() - t0)

    def _on_partner(self, msg: Any, convert: Any, kind: str) -> None:
        """Convert a depth, label or odometry message, buffer it by stamp and try to complete pending frames."""
        try:
            value = convert(msg)
        except ConversionError as exc:
            self._warn(kind, f"{kind} message dropped: {exc}")
            return
        stamp = stamp_to_sec(msg.header.stamp)
        if kind != "odom":
            self._add_partner(kind, stamp, value)
            return
        try:
            with self._lock:
                self._odom.add(stamp, value, frame_id=msg.header.frame_id, child_frame_id=msg.child_frame_id)
        except ValueError as exc:
            self._warn(kind, f"odometry message dropped: {exc}")
            return
        self._poll_sync()

    def _add_partner(self, kind: str, stamp: float, value: Any) -> None:
        with self._lock:
            self._sync.add_partner(kind, stamp, value, time.monotonic())
        self._poll_sync()

    def _poll_sync(self) -> None:
        """Decide pending frames (after each input and on a timer, for timeouts); submit the complete ones."""
        ready: list[Frame] = []
        with self._lock:
            result = self._sync.poll(time.monotonic())
        for u in result.unmatched:
            self._warn(f"unmatched_color_{u.key}", f"colour image at {u.stamp:.3f} s dropped: "
                                                   + "; ".join(u.reasons.get(n, f"no {n}") for n in u.missing))
        for m in result.matched:
            rgb = m.value
            depth, labels = m.partners.get("depth"), m.partners.get("labels")
            info = m.partners.get("camera_info", self._camera_info)
            K = None
            if info is not None:
                K, w, h = info
                if (w, h) != (rgb.shape[1], rgb.shape[0]):
                    self._warn("size_mismatch", f"CameraInfo is {w}x{h} but the image is "
                                                f"{rgb.shape[1]}x{rgb.shape[0]}; frame dropped")
                    continue
            if depth is not None and depth.shape != rgb.shape[:2]:
                self._warn("size_mismatch", f"depth is {depth.shape[1]}x{depth.shape[0]} but the image is "
                                            f"{rgb.shape[1]}x{rgb.shape[0]}; frame dropped")
                continue
            if labels is not None and labels.shape != rgb.shape[:2]:
                self._warn("size_mismatch", "label image size differs from the colour image; frame dropped")
                continue
            ready.append(Frame(rgb=rgb, stamp=m.stamp, frame_id=m.frame_id, depth=depth, intrinsics=K,
                               world_from_camera=m.world_from_camera, labels=labels,
                               label_names=self.label_names or None))
        for f in ready:
            self.worker.submit(f)

    # ------------------------------------------------------------------------------------------ outputs
    def _publish_if_changed(self) -> None:
        snap = self.worker.snapshot()
        if snap.version == self._published_version:
            return
        now = time.monotonic()
        if now - self._last_gaussians_pub < float(self._param("publish.gaussians_period")):
            return
        self._last_gaussians_pub = now
        self._published_version = snap.version
        stamp = self.get_clock().now().to_msg()
        self.pub_gaussians.publish(snapshot_to_pointcloud2(self._limit_points(snap), stamp, self.map_frame))
        self.pub_objects.publish(box_markers(snap, stamp, frame_id=self.map_frame))
        path = PathMsg(header=Header(stamp=stamp, frame_id=self.map_frame))
        for c in np.asarray(snap.camera_positions).reshape(-1, 3):
            path.poses.append(pose_stamped(c, 0.0, stamp, self.map_frame))
        self.pub_path.publish(path)

    def _limit_points(self, snap: MapSnapshot) -> MapSnapshot:
        limit = int(self._param("publish.max_points"))
        if len(snap.gaussians) <= limit:
            return snap
        import torch

        idx = torch.topk(snap.gaussians.opacities, limit).indices
        return MapSnapshot(gaussians=snap.gaussians.select(idx), instances=snap.instances, encoder_id=snap.encoder_id,
                           up=snap.up, frame_id=snap.frame_id, camera_positions=snap.camera_positions,
                           floor_height=snap.floor_height, stamp=snap.stamp, version=snap.version)

    def _publish_diagnostics(self) -> None:
        snap = self.worker.snapshot()
        w = self.worker
        qf, qw = w.queue_depth
        values = {
            "map_gaussians": len(snap.gaussians), "map_instances": len(snap.instances), "map_version": snap.version,
            "queued_frames": qf, "queued_windows": qw, "dropped_frames": w.dropped_frames,
            "dropped_windows": w.dropped_windows, "rejected_frames": w.rejected_frames,
            "failed_windows": w.failed_windows, "processed_windows": w.processed_windows,
            "keyframes": w.buffer.num_keyframes, "pending_keyframes": w.buffer.num_pending,
            "worker_busy": int(w.busy),
        }
        values.update({f"input_errors.{k}": v for k, v in self._errors.items()})
        with self._lock:
            values.update({f"sync.{k}": v for k, v in self._sync.counters().items()})
            if self._odom is not None:
                values["sync.odom_samples"] = len(self._odom)
                values["sync.odom_time_jumps"] = self._odom.time_jumps
        values["time_jumps_mapped"] = w.time_jumps
        if self.callback_cost:
            values["image_callback_ms_mean"] = round(1e3 * float(np.mean(self.callback_cost)), 3)
        st = w.last_stats
        if st is not None:
            values.update({"t_reconstruct_s": round(st.t_reconstruct, 4), "t_semantics_s": round(st.t_semantics, 4),
                           "t_gaussians_s": round(st.t_gaussians, 4), "t_fuse_s": round(st.t_fuse, 4)})
        import torch

        dev = self.pipeline.device
        if dev.type == "cuda":
            values["device_memory_mb"] = round(torch.cuda.memory_allocated(dev) / 2**20, 1)
        level = DiagnosticStatus.WARN if (w.dropped_windows or self._errors) else DiagnosticStatus.OK
        status = DiagnosticStatus(level=level, name=f"{self.get_name()}: mapping", hardware_id=str(dev),
                                  message="dropping windows" if w.dropped_windows else "ok",
                                  values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        self.pub_diag.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[status]))

    # ------------------------------------------------------------------------------------------ services
    def _srv_find_object(self, request: FindObject.Request, response: FindObject.Response) -> FindObject.Response:
        snap = self.worker.snapshot()
        response.map_stamp = sec_to_stamp(snap.stamp)
        query = request.query
        if not query.strip():
            response.success, response.message = False, "query is empty"
            return response
        if len(query) > MAX_QUERY_CHARS:
            response.success = False
            response.message = f"query is too long ({len(query)} characters; at most {MAX_QUERY_CHARS})"
            return response
        if len(snap.instances) == 0:
            response.success, response.message = False, "map is empty"
            return response
        if not 0.0 <= request.min_score <= 1.0 or not math.isfinite(request.min_score):
            response.success, response.message = False, f"min_score must be in [0, 1], got {request.min_score}"
            return response
        try:
            results = self.pipeline.query_engine.query(
                snap, query, top_k=int(request.max_results) or None, min_score=float(request.min_score) or None,
                negatives=[n for n in request.negatives if n.strip()],
            )
        except ValueError as exc:
            response.success, response.message = False, str(exc)
            return response
        stamp = self.get_clock().now().to_msg()
        for r in results:
            pose = pose_stamped(r.centroid, 0.0, stamp, self.map_frame, snap.up)
            pose.pose.orientation = rotation_to_quaternion(r.box_rotation)
            response.objects.append(ObjectLocation(
                instance_id=int(r.instance_id), label=r.name or query, score=float(r.score), pose=pose,
                size=Vector3(x=float(r.size[0]), y=float(r.size[1]), z=float(r.size[2])),
                num_gaussians=int(r.num_gaussians),
                approach_pose=pose_stamped(r.approach_position, r.approach_yaw, stamp, self.map_frame, snap.up),
            ))
        response.success = True
        response.message = f"{len(results)} object(s) for {query!r}" if results else f"no object matches {query!r}"
        hits = {int(r.instance_id): float(r.score) for r in results}
        self.pub_query.publish(box_markers(snap, stamp, namespace="query", highlight=hits, frame_id=self.map_frame,
                                           boxes=self.pipeline.query_engine.boxes(snap, list(hits))))
        return response

    def _save(self, path: str) -> tuple[bool, str, int, int]:
        from langgs_ros.persistence import save_map

        snap = self.worker.snapshot()
        try:
            save_map(snap, path)
        except (OSError, ValueError) as exc:
            return False, f"save failed: {exc}", 0, 0
        return True, f"saved {len(snap.gaussians)} Gaussians, {len(snap.instances)} instances to {path}", \
            len(snap.gaussians), len(snap.instances)

    def _load(self, path: str) -> tuple[bool, str, int, int]:
        from langgs_ros.persistence import load_map

        try:
            snap = load_map(path, expected_encoder_id=self.pipeline.text_encoder.encoder_id)
        except (OSError, ValueError) as exc:
            return False, f"load failed, map unchanged: {exc}", 0, 0

        def replace() -> None:
            self.pipeline.replace_map(snap)
            self.worker.buffer.reset()
            self.worker.publish_snapshot()

        self.worker.run_on_worker(replace)
        return True, f"loaded {len(snap.gaussians)} Gaussians, {len(snap.instances)} instances from {path}", \
            len(snap.gaussians), len(snap.instances)

    def _srv_map_file(self, request, response, action: Callable[[str], tuple[bool, str, int, int]]):
        """Shared body of save_map/load_map: an empty request path means ``autosave_path``."""
        path = request.path or self._param("autosave_path")
        if not path:
            response.success, response.message = False, "no path given and autosave_path is not set"
            return response
        response.success, response.message, response.num_gaussians, response.num_instances = action(path)
        return response

    def _srv_save_map(self, request: SaveMap.Request, response: SaveMap.Response) -> SaveMap.Response:
        return self._srv_map_file(request, response, self._save)

    def _srv_load_map(self, request: LoadMap.Request, response: LoadMap.Response) -> LoadMap.Response:
        return self._srv_map_file(request, response, self._load)

    def _srv_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        def reset() -> None:
            self.pipeline.reset()
            self.worker.buffer.reset()
            self.worker.publish_snapshot()

        self.worker.run_on_worker(reset)
        with self._lock:
            self._sync.reset()
            if self._odom is not None:
                self._odom.reset()
        response.success, response.message = True, "map cleared"
        return response

    def _autosave(self) -> None:
        snap = self.worker.snapshot()
        if snap.version == self._saved_version or len(snap.gaussians) == 0:
            return
        ok, msg, _, _ = self._save(self._param("autosave_path"))
        if ok:
            self._saved_version = snap.version
            self.get_logger().info(f"autosave: {msg}")
        else:
            self._warn("autosave", msg)

    def destroy_node(self) -> None:
        """Stop the worker thread, then destroy the node."""
        self.worker.stop()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """Entry point (``ros2 run langgs_ros mapping_node`` / ``langgs-mapping-node``)."""
    logging.basicConfig(level=os.environ.get("LANGGS_LOG_LEVEL", "INFO"))
    rclpy.init(args=args if args is not None else sys.argv)
    node = None
    executor = MultiThreadedExecutor(num_threads=4)
    try:
        node = MappingNode()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
