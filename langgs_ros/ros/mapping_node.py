"""``mapping_node``: camera stream in, semantic Gaussian map and ``/find_object`` out (a managed lifecycle node).

Lifecycle (``rclpy.lifecycle``, as Nav2's servers): *configure* validates the parameters, loads the models and
weights and starts the worker thread (and ``load_on_start``); *activate* creates the subscriptions, publishers,
services, timers and the tf listener; *deactivate* destroys them (the map is kept); *cleanup* stops the worker and
releases the models; an exception in a transition goes to the error transition, which releases everything and
returns to *unconfigured*. With ``autostart`` (default) the node configures and activates itself.

Threading model: subscription callbacks only convert messages and hand matched frames to a
:class:`~langgs_ros.pipeline.MappingWorker`, whose single thread owns the device (GPU) and runs the pipeline per
window. Services and publishers read immutable map snapshots. Every callback runs inside
:meth:`~langgs_ros.ros.health.Health.guard`: nothing a peer sends ends the node.

Topics (relative names, remap them in the launch file):

========================  ===========================================  =========================================
topic                     type                                         notes
========================  ===========================================  =========================================
``image``                 sensor_msgs/Image (rgb8, bgr8, rgba8, ...)   sensor-data QoS
``camera_info``           sensor_msgs/CameraInfo                       sensor-data QoS
``depth``                 sensor_msgs/Image (16UC1 mm, 32FC1 m)        ``rgbd`` backend
``labels``                sensor_msgs/Image (16UC1/mono8/32SC1 ids)    ``labels`` semantic source
``odom``                  nav_msgs/Odometry                            ``pose_source: odometry``
``/tf``, ``/tf_static``   tf2_msgs/TFMessage                           ``pose_source: tf``
``~/gaussians``           sensor_msgs/PointCloud2                      reliable + transient local, rate-limited
``~/objects``             visualization_msgs/MarkerArray               reliable + transient local
``~/detections``          vision_msgs/Detection3DArray                 object boxes, class name + score
``~/query_markers``       visualization_msgs/MarkerArray               last query's results
``~/query_detections``    vision_msgs/Detection3DArray                 last query's results
``~/camera_path``         nav_msgs/Path                                reconstructed camera centres
``/diagnostics``          diagnostic_msgs/DiagnosticArray              1 Hz, also when not active
========================  ===========================================  =========================================

Services: ``find_object`` (langgs_ros/srv/FindObject), ``~/save_map``, ``~/load_map`` (langgs_ros/srv, names
relative to ``map_dir``), ``~/reset`` (std_srvs/Trigger); the lifecycle services (``ros2 lifecycle``).
Parameters: :mod:`langgs_ros.ros.parameters` and ``config/mapping.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Vector3
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
from std_srvs.srv import Trigger

from langgs_ros.msg import ObjectLocation
from langgs_ros.ros.conversions import (
    ConversionError,
    camera_info_to_k,
    image_to_depth,
    image_to_labels,
    image_to_rgb,
    pose_stamped,
    pose_to_matrix,
    rotation_to_quaternion,
    sec_to_stamp,
    stamp_to_sec,
    xyz_rpy_to_matrix,
)
from langgs_ros.ros.frame_sync import FrameSynchronizer, OdometryPoseBuffer, StampOrderError, TimeJump
from langgs_ros.ros.health import Health
from langgs_ros.ros.outputs import MapPublishers
from langgs_ros.ros.parameters import CONFIGURE, PARAMETERS, descriptor, resolve_device, validate
from langgs_ros.srv import FindObject, LoadMap, SaveMap
from langgs_ros.types import Frame, MapSnapshot

# Kept for importers of the old module-level constant; the limit is the parameter limits.max_query_chars.
MAX_QUERY_CHARS = PARAMETERS["limits.max_query_chars"].default


def _load_label_names(path: str) -> dict[int, str]:
    """Label id -> name from an objects.json (``{"objects": [{"id", "name"}]}``) or a plain ``{id: name}`` file.

    Raises:
        OSError, ValueError: unreadable or malformed file.
    """
    if not path:
        return {}
    data = json.loads(Path(path).expanduser().read_text())
    try:
        if isinstance(data, dict) and "objects" in data:
            return {int(o["id"]): str(o["name"]) for o in data["objects"]}
        return {int(k): str(v) for k, v in data.items()}
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"label_names_file {path}: expected objects.json or {{id: name}}: {exc}") from exc


class MappingNode(LifecycleNode):
    """The langgs_ros mapping node (see the module docstring for its interface).

    Args:
        node_name: ROS node name.
        pipeline: a prebuilt :class:`~langgs_ros.pipeline.MappingPipeline` used instead of building one from the
            parameters on configure (tests, benchmarks).
    """

    def __init__(self, node_name: str = "mapping_node", pipeline: Any = None, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self.health = Health(self.get_logger())
        self._declare_parameters()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)
        self._given_pipeline = pipeline
        self.pipeline = None
        self.worker = None
        self.sync: FrameSynchronizer | None = None
        self._odom: OdometryPoseBuffer | None = None
        self._tf = None
        self._active_entities: list[tuple[str, Any]] = []
        self._outputs: MapPublishers | None = None
        self._camera_info: tuple[np.ndarray, int, int] | None = None
        self._first_image_wall: float | None = None
        self._bridge = None
        self._lock = threading.Lock()
        self.world_frame: str = self._param("map_frame")
        self.callback_cost: list[float] = []
        self._published_version = -1
        self._saved_version = -1
        self._last_gaussians_pub = 0.0
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_group = MutuallyExclusiveCallbackGroup()
        self.create_timer(1.0, self.health.guard("diagnostics", self._publish_diagnostics),
                          callback_group=self._diag_group)
        if self._param("autostart"):
            if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                self.trigger_activate()

    @property
    def lifecycle_state(self) -> str:
        """Label of the current lifecycle state (unconfigured, configuring, inactive, active, ...)."""
        return self._state_machine.current_state[1]

    # ------------------------------------------------------------------------------------------ parameters
    def _declare_parameters(self) -> None:
        for name, spec in PARAMETERS.items():
            d = descriptor(name, spec)
            try:
                self.declare_parameter(name, spec.default, d)
            except Exception as exc:  # an invalid override (range/type) must not end the node
                self.health.fault("parameter override", exc)
                self.get_logger().error(f"parameter {name}: invalid value given ({exc}); using the default "
                                        f"{spec.default!r}")
                self.declare_parameter(name, spec.default, d, ignore_override=True)

    def _param(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _params(self) -> dict[str, Any]:
        return {name: self._param(name) for name in PARAMETERS}

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Refuse invalid values and configure-time parameters while configured (with the reason)."""
        current = self._params()
        current.update({p.name: p.value for p in params})
        for p in params:
            spec = PARAMETERS.get(p.name)
            if spec is None:
                continue
            if spec.change == CONFIGURE and self.lifecycle_state not in ("unconfigured", "configuring"):
                return SetParametersResult(successful=False, reason=(
                    f"{p.name} is applied on configure; the node is {self.lifecycle_state}: deactivate and clean it "
                    f"up first (ros2 lifecycle set {self.get_fully_qualified_name()} deactivate, then cleanup)"))
            reason = validate(p.name, p.value, current)
            if reason is not None:
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _after_set_parameters(self, params: list[Parameter]) -> None:
        """Apply run-time parameters that live in objects (the others are read where they are used)."""
        names = {p.name for p in params}
        if self.sync is not None and names & {"sync_tolerance", "sync_timeout", "time_jump_threshold"}:
            self.sync.tolerance = float(self._param("sync_tolerance"))
            self.sync.timeout = float(self._param("sync_timeout"))
            self.sync.jump_threshold = float(self._param("time_jump_threshold"))
            if self._odom is not None:
                self._odom.tolerance = self.sync.tolerance
        if self.worker is not None:
            kf = self.worker.buffer.keyframes
            for n in names:
                if n.startswith("keyframe."):
                    setattr(kf, n.split(".", 1)[1], float(self._param(n)))
            if "window_period" in names:
                self.worker.window_period = float(self._param("window_period"))
        if "query.top_k" in names and self.pipeline is not None:
            self.pipeline.query_engine.config.top_k = int(self._param("query.top_k"))
        if "query.min_score" in names and self.pipeline is not None:
            self.pipeline.query_engine.config.min_score = float(self._param("query.min_score"))
        if "autosave_period" in names and self.lifecycle_state == "active":
            self._make_autosave_timer()

    # ------------------------------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Validate parameters, build the pipeline (models, weights), start the worker; ERROR on failure."""
        try:
            self._configure()
        except Exception as exc:  # reported, then the error transition releases everything
            self.health.fault("configure", exc)
            return TransitionCallbackReturn.ERROR
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        params = self._params()
        for name, value in params.items():
            reason = validate(name, value, params)
            if reason is not None:
                raise ValueError(f"invalid parameter: {reason}")
        from langgs_ros.pipeline import MappingPipeline, MappingWorker

        self.label_names = _load_label_names(params["label_names_file"])
        self.backend, self.semantic_source = params["backend"], params["semantic_source"]
        self.need_depth = self.backend == "rgbd"
        self.need_labels = self.semantic_source == "labels"
        self.pose_source = self._resolve_pose_source(params["pose_source"])
        if self.pose_source == "none" and self.backend == "rgbd":
            raise ValueError("pose_source none (unposed) needs backend feedforward; rgbd needs poses")
        self.T_child_camera = xyz_rpy_to_matrix(list(params["camera_extrinsic_xyz"]),
                                                list(params["camera_extrinsic_rpy"]))
        self.world_frame = params["map_frame"]
        self._map_directory()  # refuses an empty map_dir or a bad limit now, not at the first save
        self.pipeline = (self._given_pipeline if self._given_pipeline is not None
                         else MappingPipeline(self._pipeline_config(params)))
        self.worker = MappingWorker(
            self.pipeline, window_period=float(params["window_period"]),
            max_queued_frames=int(params["queue.max_frames"]), max_queued_windows=int(params["queue.max_windows"]),
            on_error=lambda msg: self.health.warn("worker", msg), on_update=self._worker_window_done,
            on_fault=lambda where, exc: self.health.fault(where, exc),
        )
        # Stamp matching (frame_sync): a partner is final only when exact, bracketed by a later message of its
        # topic, or at the timeout. CameraInfo is a stamp-matched partner of the rgbd backend (frames without one
        # wait, bounded by queue.sync_frames, and are counted unmatched_no_camera_info).
        self.need_camera_info = self.backend == "rgbd"
        partners = [n for n, need in (("depth", self.need_depth), ("labels", self.need_labels),
                                      ("camera_info", self.need_camera_info)) if need]
        self._odom = None
        if self.pose_source == "odometry":
            self._odom = OdometryPoseBuffer(self.T_child_camera, tolerance=float(params["sync_tolerance"]),
                                            max_samples=1000, jump_threshold=float(params["time_jump_threshold"]))
        self.sync = FrameSynchronizer(
            partners, tolerance=float(params["sync_tolerance"]), timeout=float(params["sync_timeout"]),
            max_pending=int(params["queue.sync_frames"]), max_partner_buffer=max(2, int(params["queue.sync_frames"])),
            pose_provider=self._odom, jump_threshold=float(params["time_jump_threshold"]),
        )
        self._last_unmatched_reason = ""
        self._published_version = self._saved_version = -1
        if params["load_on_start"] and params["autosave_path"] and self._map_file_exists(params["autosave_path"]):
            ok, msg, _, _ = self._load(params["autosave_path"])
            if ok:
                self._saved_version = self.worker.snapshot().version  # the file already holds this map
            (self.get_logger().info if ok else self.get_logger().error)(f"load_on_start: {msg}")
        self.worker.start()
        self.get_logger().info(
            f"configured: backend={self.backend}, semantics={self.semantic_source}, pose_source={self.pose_source}, "
            f"device={self.pipeline.device}, map_frame={self.world_frame}, map_dir={self._map_directory().root}")

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Create subscriptions, publishers, services, timers and the tf listener."""
        try:
            self._activate()
        except Exception as exc:
            self.health.fault("activate", exc)
            self._deactivate()
            return TransitionCallbackReturn.ERROR
        self.get_logger().info("active")
        return TransitionCallbackReturn.SUCCESS

    def _activate(self) -> None:
        p = self._param
        self._outputs = MapPublishers(self)
        sub_group, srv_group = MutuallyExclusiveCallbackGroup(), ReentrantCallbackGroup()
        timer_group, file_group = MutuallyExclusiveCallbackGroup(), MutuallyExclusiveCallbackGroup()
        g = self.health.guard
        # Sensor-data QoS (best effort, volatile) with a deeper history than the preset's 5: colour, depth and label
        # images of one stamp arrive as separate messages and must all survive until they are matched.
        sd = QoSProfile(depth=int(p("queue.sensor_depth")), reliability=qos_profile_sensor_data.reliability,
                        durability=qos_profile_sensor_data.durability, history=HistoryPolicy.KEEP_LAST)
        ent = self._active_entities
        ent.append(("sub", self.create_subscription(Image, "image", g("image callback", self._on_image), sd,
                                                    callback_group=sub_group)))
        ent.append(("sub", self.create_subscription(CameraInfo, "camera_info",
                                                    g("camera_info callback", self._on_camera_info), sd,
                                                    callback_group=sub_group)))
        if self.need_depth:
            ent.append(("sub", self.create_subscription(
                Image, "depth", g("depth callback", lambda m: self._on_partner_image(m, "depth", image_to_depth)),
                sd, callback_group=sub_group)))
        if self.need_labels:
            ent.append(("sub", self.create_subscription(
                Image, "labels", g("labels callback",
                                   lambda m: self._on_partner_image(m, "labels", image_to_labels)),
                sd, callback_group=sub_group)))
        if self.pose_source == "odometry":
            ent.append(("sub", self.create_subscription(Odometry, "odom", g("odom callback", self._on_odometry), 50,
                                                        callback_group=sub_group)))
        if self.pose_source == "tf":
            from langgs_ros.ros.pose_sources import TfPoseSource

            self._tf = TfPoseSource(self, self.world_frame)
            self.sync.pose_provider = self._tf
        ent.append(("srv", self.create_service(FindObject, "find_object",
                                               g("find_object", self._srv_find_object, response_index=1),
                                               callback_group=srv_group)))
        ent.append(("srv", self.create_service(SaveMap, "~/save_map", g("save_map", self._srv_save_map, 1),
                                               callback_group=file_group)))
        ent.append(("srv", self.create_service(LoadMap, "~/load_map", g("load_map", self._srv_load_map, 1),
                                               callback_group=file_group)))
        ent.append(("srv", self.create_service(Trigger, "~/reset", g("reset", self._srv_reset, 1),
                                               callback_group=file_group)))
        ent.append(("timer", self.create_timer(0.2, g("publish", self._publish_if_changed),
                                               callback_group=timer_group)))
        ent.append(("timer", self.create_timer(0.1, g("sync timer", self._poll_sync), callback_group=sub_group)))
        self._file_group = file_group
        self._autosave_timer = None
        self._make_autosave_timer()
        self._published_version = -1  # new publishers: send the map again

    def _make_autosave_timer(self) -> None:
        if getattr(self, "_autosave_timer", None) is not None:
            self.destroy_timer(self._autosave_timer)
            self._autosave_timer = None
        period = float(self._param("autosave_period"))
        if period > 0 and self._param("autosave_path"):
            self._autosave_timer = self.create_timer(period, self.health.guard("autosave", self._autosave),
                                                     callback_group=self._file_group)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Destroy subscriptions, publishers, services, timers and the tf listener; the map is kept."""
        self._deactivate()
        return TransitionCallbackReturn.SUCCESS

    def _deactivate(self) -> None:
        for kind, entity in self._active_entities:
            try:
                {"sub": self.destroy_subscription, "srv": self.destroy_service,
                 "timer": self.destroy_timer}[kind](entity)
            except Exception as exc:
                self.health.fault("deactivate", exc)
        self._active_entities = []
        if getattr(self, "_autosave_timer", None) is not None:
            self.destroy_timer(self._autosave_timer)
            self._autosave_timer = None
        if self._outputs is not None:
            self._outputs.destroy()
            self._outputs = None
        if self._tf is not None:
            self._tf.close(self)
            self._tf = None
            if self.sync is not None:
                self.sync.pose_provider = None
        if self.sync is not None:
            self.sync.reset()

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop the worker and release the models (the map is dropped: save it first)."""
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _release(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.worker = self.pipeline = self.sync = self._odom = None
        self._camera_info = None
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # best effort
            pass

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release everything."""
        self._deactivate()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Error transition: release everything and go back to unconfigured (configure can be retried)."""
        self._deactivate()
        self._release()
        self.get_logger().error(f"error transition: released everything; last fault: {self.health.last_fault}")
        return TransitionCallbackReturn.SUCCESS

    # ------------------------------------------------------------------------------------------ setup helpers
    def _resolve_pose_source(self, requested: str) -> str:
        if requested in ("auto", "tf"):
            try:
                import tf2_ros  # noqa: F401

                return "tf"
            except ImportError:
                if requested == "tf":
                    raise ValueError("pose_source tf requested but tf2_ros is not installed") from None
                return "odometry"
        return requested

    def _pipeline_config(self, p: dict[str, Any]):
        from langgs_ros.frames import KeyframeConfig, WindowConfig
        from langgs_ros.pipeline import PipelineConfig, UnposedConfig
        from langgs_ros.refine import RefineConfig

        cfg = PipelineConfig(device=resolve_device(p["device"]), backend=self.backend,
                             semantic_source=self.semantic_source)
        cfg.window = WindowConfig(size=int(p["window.size"]), overlap=int(p["window.overlap"]))
        cfg.keyframes = KeyframeConfig(
            min_translation=float(p["keyframe.min_translation"]), min_rotation=float(p["keyframe.min_rotation"]),
            min_image_change=float(p["keyframe.min_image_change"]), max_interval=float(p["keyframe.max_interval"]),
        )
        cfg.fusion.max_gaussians = int(p["max_gaussians"])
        cfg.sparsify.base_voxel_size = float(p["voxel_size"])
        cfg.gaussians.block = int(p["pixel_block"])
        cfg.query.top_k = int(p["query.top_k"])
        cfg.refine = RefineConfig(steps=int(p["refine.steps"]), max_seconds=float(p["refine.max_seconds"]),
                                  downscale=int(p["refine.downscale"]))
        cfg.query.min_score = float(p["query.min_score"])
        if self.backend == "rgbd":
            cfg.backend_args = {"max_depth": float(p["max_depth"])}
        else:
            cfg.backend_args = {
                "preset": p["feedforward.preset"], "image_width": int(p["feedforward.image_width"]),
                "camera_info": p["feedforward.camera_info"],
                "allow_random_weights": bool(p["feedforward.allow_random_weights"]),
            }
            if p["feedforward.weights"]:
                cfg.backend_args["weights"] = p["feedforward.weights"]
            cfg.unposed = UnposedConfig(camera_height=float(p["unposed.camera_height"]) or None,
                                        anchors=int(p["unposed.anchors"]),
                                        max_relocalisations=int(p["unposed.max_relocalisations"]),
                                        relevel_every=int(p["unposed.relevel_every"]))
        if self.semantic_source == "labels":
            cfg.semantic_args = {"label_names": self.label_names or None}
        else:
            # Every semantic.<name> parameter is the ClipSamConfig field <name> (empty paths: none; arrays, which
            # rclpy gives as lists or array.array: tuples).
            cfg.semantic_args = {
                key[len("semantic."):]: (v or None) if isinstance(v, str)
                else v if isinstance(v, bool | int | float) else tuple(v)
                for key, v in p.items() if key.startswith("semantic.")}
        return cfg

    def _worker_window_done(self, snapshot: MapSnapshot, stats: Any) -> None:
        """One line per processed window (worker thread; rclpy loggers are thread-safe)."""
        w = self.worker
        self.get_logger().info(
            f"window {w.processed_windows}: {stats.num_frames} frames in {stats.t_total:.2f} s "
            f"(reconstruct {stats.t_reconstruct:.2f}, semantics {stats.t_semantics:.2f}, "
            f"gaussians {stats.t_gaussians:.2f}, fuse {stats.t_fuse:.2f}, refine {stats.t_refine:.2f}); "
            f"map {stats.num_map_gaussians} "
            f"Gaussians, {stats.num_instances} instances; dropped windows {w.dropped_windows}")

    # ------------------------------------------------------------------------------------------ inputs
    def _check_size(self, msg: Image, kind: str) -> bool:
        limit = int(self._param("limits.max_image_pixels"))
        if int(msg.width) * int(msg.height) > limit:
            self.health.warn(f"{kind}_too_large", f"{kind} image {msg.width}x{msg.height} exceeds "
                                                  f"limits.max_image_pixels={limit}; dropped")
            return False
        return True

    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            info = (camera_info_to_k(msg), int(msg.width), int(msg.height))
        except ConversionError as exc:
            self.health.warn("camera_info", f"CameraInfo ignored: {exc}")
            return
        self._camera_info = info  # the latest (feedforward uses it when present)
        if self.need_camera_info:
            self._add_partner("camera_info", stamp_to_sec(msg.header.stamp), info)

    def _on_image(self, msg: Image) -> None:
        t0 = time.perf_counter()
        if not self._check_size(msg, "image"):
            return
        if self._camera_info is None and self._first_image_wall is None:
            self._first_image_wall = time.monotonic()
        try:
            if self._bridge is None:
                from cv_bridge import CvBridge

                self._bridge = CvBridge()
            rgb = image_to_rgb(msg, self._bridge)
        except ConversionError as exc:
            self.health.warn("image", f"colour image dropped: {exc}")
            return
        frame_id = self._param("camera_frame") or msg.header.frame_id
        try:
            with self._lock:
                jump = self.sync.add_primary(stamp_to_sec(msg.header.stamp), rgb, frame_id, time.monotonic())
        except (StampOrderError, ValueError) as exc:
            self.health.warn("stamp_backwards", f"colour image dropped: {exc}")
            return
        self._on_time_jump(jump)
        self._poll_sync()
        self.callback_cost.append(time.perf_counter() - t0)
        del self.callback_cost[:-200]

    def _on_partner_image(self, msg: Image, kind: str, convert: Any) -> None:
        if not self._check_size(msg, kind):
            return
        try:
            value = convert(msg)
        except ConversionError as exc:
            self.health.warn(kind, f"{kind} message dropped: {exc}")
            return
        self._add_partner(kind, stamp_to_sec(msg.header.stamp), value)

    def _add_partner(self, kind: str, stamp: float, value: Any) -> None:
        try:
            with self._lock:
                jump = self.sync.add_partner(kind, stamp, value, time.monotonic())
        except ValueError as exc:
            self.health.warn(kind, f"{kind} message dropped: {exc}")
            return
        if jump is not None:
            self.health.warn(f"time_jumps_{kind}", f"{kind} stamps jumped back {jump.jump:.3f} s; its buffer "
                                                   "restarted")
        self._poll_sync()

    def _on_odometry(self, msg: Odometry) -> None:
        frame = msg.header.frame_id or self._param("map_frame")
        try:
            T = pose_to_matrix(msg.pose.pose)
            with self._lock:
                if frame != self.world_frame:
                    if self.worker is not None and len(self.worker.snapshot().gaussians) > 0:
                        self.health.warn("odom_frame", f"odometry frame {frame!r} differs from the map's "
                                                       f"{self.world_frame!r}; message dropped (reset to change)")
                        return
                    self.world_frame = frame  # REP-105: an odometry-posed map lives in the odometry frame
                self._odom.add(stamp_to_sec(msg.header.stamp), T, frame_id=frame, child_frame_id=msg.child_frame_id)
        except (ConversionError, ValueError) as exc:
            self.health.warn("odom", f"odometry message dropped: {exc}")
            return
        self._poll_sync()

    def _on_time_jump(self, jump: TimeJump | None) -> None:
        """A jump back in colour stamps (bag loop, simulator reset): the synchronizer already dropped the old time
        line's pending frames; the worker maps its pending keyframes and starts a new time line; the map is kept."""
        if jump is None:
            return
        self.worker.time_jump()
        self.health.warn("time_jumps", f"time jump: colour stamps went back {jump.jump:.3f} s (from "
                                       f"{jump.previous_stamp:.3f} to {jump.stamp:.3f} s); dropped "
                                       f"{jump.dropped_frames} waiting frames and {jump.dropped_messages} buffered "
                                       "messages, map kept")

    def _poll_sync(self) -> None:
        """Decide pending frames (after each input and on a timer, for timeouts); submit the complete ones."""
        if self.sync is None or self.worker is None:
            return
        with self._lock:
            result = self.sync.poll(time.monotonic())
        for u in result.unmatched:
            reasons = "; ".join(f"{k}: {v}" for k, v in u.reasons.items())
            self._last_unmatched_reason = f"{u.key}: {reasons}"[:300]
            self.health.warn(f"unmatched_{u.key}", f"colour frame {u.stamp:.3f} s dropped, partners missing "
                                                   f"({reasons or ', '.join(u.missing)})")
        for m in result.matched:
            frame = self._make_frame(m)
            if frame is not None:
                self.worker.submit(frame)

    def _make_frame(self, m: Any) -> Frame | None:
        rgb = m.value
        K = None
        info = m.partners.get("camera_info", self._camera_info)
        if info is not None:
            K, w, h = info
            if (w, h) != (rgb.shape[1], rgb.shape[0]):
                self.health.warn("size_mismatch", f"CameraInfo is {w}x{h} but the image is "
                                                  f"{rgb.shape[1]}x{rgb.shape[0]}; frame dropped")
                return None
        depth, labels = m.partners.get("depth"), m.partners.get("labels")
        for name, arr in (("depth", depth), ("labels", labels)):
            if arr is not None and arr.shape != rgb.shape[:2]:
                self.health.warn("size_mismatch", f"{name} is {arr.shape[1]}x{arr.shape[0]} but the image is "
                                                  f"{rgb.shape[1]}x{rgb.shape[0]}; frame dropped")
                return None
        return Frame(rgb=rgb, stamp=m.stamp, frame_id=m.frame_id, depth=depth, intrinsics=K,
                     world_from_camera=m.world_from_camera, labels=labels, label_names=self.label_names or None)

    # ------------------------------------------------------------------------------------------ outputs
    def _publish_if_changed(self) -> None:
        snap = self.worker.snapshot()
        if snap.version == self._published_version or self._outputs is None:
            return
        now = time.monotonic()
        if now - self._last_gaussians_pub < float(self._param("publish.gaussians_period")):
            return
        self._last_gaussians_pub = now
        self._published_version = snap.version
        stamp = self.get_clock().now().to_msg()
        boxes = self.pipeline.query_engine.boxes(snap, [int(i) for i in snap.instances.ids])
        self._outputs.publish_map(snap, self._limit_points(snap), boxes, stamp, self.world_frame)

    def _limit_points(self, snap: MapSnapshot) -> MapSnapshot:
        limit = int(self._param("publish.max_points"))
        if len(snap.gaussians) <= limit:
            return snap
        import torch

        idx = torch.topk(snap.gaussians.opacities, limit).indices
        return MapSnapshot(gaussians=snap.gaussians.select(idx), instances=snap.instances, encoder_id=snap.encoder_id,
                           up=snap.up, frame_id=snap.frame_id, camera_positions=snap.camera_positions,
                           floor_height=snap.floor_height, stamp=snap.stamp, version=snap.version)

    def _diagnostic_values(self) -> tuple[int, str, dict[str, Any]]:
        h = self.health
        values: dict[str, Any] = {"lifecycle_state": self.lifecycle_state, "map_frame": self.world_frame}
        level, message = DiagnosticStatus.OK, "ok"
        w = self.worker
        if w is not None:
            snap = w.snapshot()
            qf, qw = w.queue_depth
            values.update({
                "map_gaussians": len(snap.gaussians), "map_instances": len(snap.instances),
                "map_version": snap.version, "queued_frames": qf, "queued_windows": qw,
                "dropped_frames": w.dropped_frames, "dropped_windows": w.dropped_windows,
                "rejected_frames": w.rejected_frames, "failed_windows": w.failed_windows,
                "processed_windows": w.processed_windows, "keyframes": w.buffer.num_keyframes,
                "worker_time_jumps": w.time_jumps, "worker_faults": w.faults, "worker_busy": int(w.busy),
                "pending_keyframes": w.buffer.num_pending,
            })
            if self.pipeline is not None:  # registration / scale of the map (unposed: anchors, relocalisations)
                values.update({f"registration.{k}": (int(v) if isinstance(v, float) else v)
                               for k, v in self.pipeline.registration_stats().items()})
            st = w.last_stats
            if st is not None:
                values.update({"t_reconstruct_s": round(st.t_reconstruct, 4),
                               "t_semantics_s": round(st.t_semantics, 4),
                               "t_gaussians_s": round(st.t_gaussians, 4), "t_fuse_s": round(st.t_fuse, 4),
                               "t_refine_s": round(st.t_refine, 4), "refine_steps": st.refine_steps,
                               "refine_skipped": st.refine_skipped or "no"})
            if w.dropped_windows:
                level, message = DiagnosticStatus.WARN, "dropping windows"
        if self.sync is not None:
            with self._lock:
                values.update({f"sync.{k}": v for k, v in self.sync.counters().items()})
            if self._last_unmatched_reason:
                values["sync.last_unmatched_reason"] = self._last_unmatched_reason
        if self._tf is not None:
            values.update({"tf_lookups": self._tf.lookups, "tf_lookup_failures": self._tf.failures})
            if self._tf.last_error:
                values["tf_last_error"] = self._tf.last_error
        values.update({f"input_errors.{k}": v for k, v in h.warnings.items()})
        values.update({f"faults.{k}": v for k, v in h.faults.items()})
        if h.warnings and level == DiagnosticStatus.OK:
            level, message = DiagnosticStatus.WARN, "input errors (see input_errors.*)"
        if (self.lifecycle_state == "active" and self._camera_info is None and self._first_image_wall is not None
                and self.backend == "rgbd"
                and time.monotonic() - self._first_image_wall > float(self._param("camera_info_timeout"))):
            level = max(level, DiagnosticStatus.WARN)
            message = (f"no CameraInfo received for {time.monotonic() - self._first_image_wall:.0f} s: colour "
                       f"frames wait (at most queue.sync_frames={self._param('queue.sync_frames')})")
        if self.callback_cost:
            values["image_callback_ms_mean"] = round(1e3 * float(np.mean(self.callback_cost)), 3)
        if self.pipeline is not None and self.pipeline.device.type == "cuda":
            import torch

            values["device_memory_mb"] = round(torch.cuda.memory_allocated(self.pipeline.device) / 2**20, 1)
        if h.recent_fault:
            level, message = DiagnosticStatus.ERROR, h.last_fault
            values["last_fault"] = h.last_fault
        if self.lifecycle_state not in ("active", "inactive") and level != DiagnosticStatus.ERROR:
            level, message = DiagnosticStatus.WARN, f"not active ({self.lifecycle_state})"
        return level, message, values

    def _publish_diagnostics(self) -> None:
        level, message, values = self._diagnostic_values()
        dev = str(self.pipeline.device) if self.pipeline is not None else "none"
        status = DiagnosticStatus(level=level, name=f"{self.get_name()}: mapping", hardware_id=dev,
                                  message=message[:500],
                                  values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        self.pub_diag.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[status]))

    # ------------------------------------------------------------------------------------------ services
    def _srv_find_object(self, request: FindObject.Request, response: FindObject.Response) -> FindObject.Response:
        snap = self.worker.snapshot()
        response.map_stamp = sec_to_stamp(snap.stamp)
        query = request.query
        max_chars, max_neg = int(self._param("limits.max_query_chars")), int(self._param("limits.max_negatives"))
        negatives = [n for n in request.negatives if n.strip()]
        error = None
        if not query.strip():
            error = "query is empty"
        elif len(query) > max_chars:
            error = f"query is too long ({len(query)} characters; at most {max_chars}: limits.max_query_chars)"
        elif len(negatives) > max_neg:
            error = f"too many negatives ({len(negatives)}; at most {max_neg}: limits.max_negatives)"
        elif any(len(n) > max_chars for n in negatives):
            error = f"a negative phrase is longer than {max_chars} characters"
        elif not math.isfinite(request.min_score) or not 0.0 <= request.min_score <= 1.0:
            error = f"min_score must be in [0, 1], got {request.min_score}"
        elif len(snap.instances) == 0:
            error = "map is empty"
        if error is not None:
            response.success, response.message = False, error
            return response
        try:
            answer = self.pipeline.query_engine.answer(
                snap, query, top_k=int(request.max_results) or None, min_score=float(request.min_score) or None,
                negatives=negatives,
            )
        except ValueError as exc:
            response.success, response.message = False, str(exc)
            return response
        results = answer.objects
        stamp = self.get_clock().now().to_msg()
        frame = self.world_frame
        for r in results:
            pose = pose_stamped(r.centroid, 0.0, stamp, frame, snap.up)
            pose.pose.orientation = rotation_to_quaternion(r.box_rotation)
            response.objects.append(ObjectLocation(
                instance_id=int(r.instance_id), label=r.name or query, score=float(r.score), pose=pose,
                size=Vector3(x=float(r.size[0]), y=float(r.size[1]), z=float(r.size[2])),
                num_gaussians=int(r.num_gaussians),
                approach_pose=pose_stamped(r.approach_position, r.approach_yaw, stamp, frame, snap.up),
            ))
        response.success = True
        # nothing above min_score is an answer too: the message names the best candidates and their scores
        response.message = f"{len(results)} object(s) for {query!r}" if results else answer.message
        hits = {int(r.instance_id): float(r.score) for r in results}
        if self._outputs is not None:
            names = {int(r.instance_id): r.name or query for r in results}
            self._outputs.publish_query(snap, hits, names, self.pipeline.query_engine.boxes(snap, list(hits)), stamp,
                                        frame)
        return response

    def _map_directory(self):
        """The :class:`~langgs_ros.map_files.MapDirectory` of ``map_dir`` / ``allow_any_path`` and the current
        ``limits.max_map_file_bytes`` (built per request: cheap, and always the current limit).

        Raises:
            MapFileError: invalid values (empty ``map_dir``, a non-positive limit).
        """
        from langgs_ros.map_files import MapDirectory

        return MapDirectory(self._param("map_dir"), allow_any_path=bool(self._param("allow_any_path")),
                            max_file_bytes=int(self._param("limits.max_map_file_bytes")))

    def _map_file_exists(self, name: str) -> bool:
        from langgs_ros.map_files import MapFileError

        try:
            return self._map_directory().resolve(name).is_file()
        except MapFileError as exc:
            self.get_logger().error(f"autosave_path {name!r}: {exc}")
            return False

    def _save(self, name: str) -> tuple[bool, str, int, int]:
        """Save the current map as ``name`` in ``map_dir``; (success, message, Gaussians, instances)."""
        from langgs_ros.map_files import MapFileError

        snap = self.worker.snapshot()
        try:
            path = self._map_directory().save(snap, name)
        except MapFileError as exc:
            return False, f"save failed: {exc}", 0, 0
        return True, f"saved {len(snap.gaussians)} Gaussians, {len(snap.instances)} instances to {path}", \
            len(snap.gaussians), len(snap.instances)

    def _load(self, name: str) -> tuple[bool, str, int, int]:
        """Replace the map by map ``name`` from ``map_dir``; on any failure the map is unchanged."""
        from langgs_ros.map_files import MapFileError

        enc = self.pipeline.text_encoder
        try:
            md = self._map_directory()
            path = md.resolve(name)
            snap = md.load(name, expected_encoder_id=enc.encoder_id, expected_embedding_dim=getattr(enc, "dim", None))
        except MapFileError as exc:
            return False, f"load failed, map unchanged: {exc}", 0, 0

        def replace() -> None:
            self.pipeline.replace_map(snap)
            self.worker.buffer.reset()
            self.worker.publish_snapshot()

        try:
            self.worker.run_on_worker(replace, timeout=float(self._param("limits.worker_command_timeout")))
        except TimeoutError as exc:
            return False, f"load failed, map unchanged: {exc}", 0, 0
        except Exception as exc:  # replace_map validates again; the old map stays until the new one is built
            return False, f"load failed, map unchanged: {type(exc).__name__}: {exc}", 0, 0
        with self._lock:
            if self.sync is not None:
                self.sync.reset()
        return True, f"loaded {len(snap.gaussians)} Gaussians, {len(snap.instances)} instances from {path}", \
            len(snap.gaussians), len(snap.instances)

    def _srv_map_file(self, request: Any, response: Any, action: Any) -> Any:
        """Shared body of save_map/load_map: an empty request path means ``autosave_path``."""
        name = request.path or self._param("autosave_path")
        if not name:
            response.success, response.message = False, "no path given and autosave_path is not set"
            return response
        response.success, response.message, response.num_gaussians, response.num_instances = action(name)
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

        try:
            self.worker.run_on_worker(reset, timeout=float(self._param("limits.worker_command_timeout")))
        except TimeoutError as exc:
            response.success, response.message = False, f"reset failed, map unchanged: {exc}"
            return response
        with self._lock:
            self.sync.reset()
            if self._odom is not None:
                self._odom.reset()
            if self.pose_source == "odometry":
                self.world_frame = self._param("map_frame")
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
            self.health.warn("autosave", msg)

    def destroy_node(self) -> None:
        """Stop the worker thread, then destroy the node."""
        if self.worker is not None:
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
