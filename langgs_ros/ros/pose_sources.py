"""Camera pose look-ups of the mapping node through tf2 (``pose_source: tf``) and odometry extrinsics.

A robot publishes ``map -> odom`` (localisation), ``odom -> base_link`` (odometry) on ``/tf`` and
``base_link -> camera_*_optical_frame`` on ``/tf_static`` (REP-105). The node needs ``map_frame <- camera optical
frame`` at each image stamp: :class:`TfPoseSource` asks tf2 for it without blocking the callback and says whether
the frame should wait (the transform for that stamp has not arrived yet) or is lost (older than tf's cache,
frames not connected), with tf2's own reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from langgs_ros.ros.frame_sync import EXACT_STAMP, PoseLookup


def transform_to_matrix(transform: Any) -> np.ndarray:
    """(4, 4) float64 matrix of a ``geometry_msgs/Transform`` (target_from_source: maps source-frame points into
    the target frame)."""
    from scipy.spatial.transform import Rotation

    t, q = transform.translation, transform.rotation
    T = np.eye(4)
    T[:3, :3] = Rotation.from_quat([q.x, q.y, q.z, q.w]).as_matrix()  # scipy: scalar-last (x, y, z, w)
    T[:3, 3] = (t.x, t.y, t.z)
    return T


class TfPoseSource:
    """``world_from_camera`` at an image stamp from tf2 (``tf2_ros.Buffer`` + ``TransformListener``).

    Args:
        node: the rclpy node the listener subscribes with (``/tf``, ``/tf_static``).
        target_frame: the map frame (``map_frame``).
        cache_time: seconds of tf history kept.
    """

    def __init__(self, node: Any, target_frame: str, cache_time: float = 30.0) -> None:
        import tf2_ros
        from rclpy.duration import Duration

        self.target_frame = target_frame
        self.buffer = tf2_ros.Buffer(cache_time=Duration(seconds=cache_time))
        self.listener = tf2_ros.TransformListener(self.buffer, node, spin_thread=False)
        self.lookups = 0
        self.failures = 0
        self.last_error = ""

    def lookup(self, target: str, source: str, stamp: float | None) -> np.ndarray:
        """``target_from_source`` (4, 4) at ``stamp`` seconds (None: the latest).

        Raises:
            tf2_ros.TransformException: (LookupException, ConnectivityException, ExtrapolationException) as tf2.
        """
        return self._lookup_stamped(target, source, stamp)[1]

    def _lookup_stamped(self, target: str, source: str, stamp: float | None) -> tuple[float, np.ndarray]:
        """(stamp of the transform tf2 gave, s; ``target_from_source`` (4, 4)); raises as :meth:`lookup`."""
        from rclpy.time import Time

        from langgs_ros.ros.conversions import stamp_to_sec

        t = Time() if stamp is None else Time(nanoseconds=round(stamp * 1e9))
        tf = self.buffer.lookup_transform(target, source, t)
        return stamp_to_sec(tf.header.stamp), transform_to_matrix(tf.transform)

    def pose_at(self, stamp: float, camera_frame: str, timed_out: bool = False) -> PoseLookup:
        """``map_frame <- camera_frame`` at ``stamp``: ready, wait (not yet in tf: later data can still complete
        it) or failed (tf2's reason; also any wait once the frame has ``timed_out``)."""
        import tf2_ros

        self.lookups += 1
        try:
            return PoseLookup("ready", self.lookup(self.target_frame, camera_frame, stamp), self.target_frame)
        except tf2_ros.ExtrapolationException as exc:
            reason = f"tf: {exc}"
            latest_stamp, latest = self._latest(camera_frame)
            if latest is not None and abs(latest_stamp - stamp) <= EXACT_STAMP:
                return PoseLookup("ready", latest, self.target_frame)
            future = stamp > latest_stamp if latest is not None else "future" in reason
            if future and not timed_out:  # the transform for this stamp is still to come
                return PoseLookup("wait", None, reason=reason)
        except tf2_ros.TransformException as exc:  # unknown or unconnected frames: they may still appear
            reason = f"tf: {type(exc).__name__}: {exc}"
            if not timed_out:
                return PoseLookup("wait", None, reason=reason)
        self._fail(reason)
        return PoseLookup("failed", None, reason=reason)

    def _latest(self, camera_frame: str) -> tuple[float, np.ndarray | None]:
        """Stamp (s) and matrix of the newest ``map_frame <- camera_frame`` tf2 can give, or (nan, None).

        Stamps reach :meth:`pose_at` as float seconds, which keep only ~0.2 µs at 1.7e9 s: an image stamp rounded
        back to nanoseconds can lie a few hundred ns after the transform published for that very stamp, and tf2
        refuses to extrapolate even that far. Comparing with the newest transform up to :data:`EXACT_STAMP`
        keeps the last frame before a pause from waiting for a later transform that never comes."""
        import tf2_ros

        try:
            return self._lookup_stamped(self.target_frame, camera_frame, None)
        except tf2_ros.TransformException:
            return float("nan"), None

    def on_time_jump(self, stamp: float) -> None:
        """Stamps jumped back: forget the dynamic transforms of the old time line (``/tf_static`` is kept)."""
        self.buffer.clear()

    def _fail(self, reason: str) -> None:
        self.failures += 1
        self.last_error = reason

    def close(self, node: Any) -> None:
        """Unsubscribe the listener from ``/tf`` and ``/tf_static``."""
        try:
            self.listener.unregister()
        except Exception:  # tf2_ros versions differ; destroying the subscriptions is best effort
            pass
