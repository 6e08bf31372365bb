"""Publishers of the mapping node: the Gaussian cloud, object boxes (markers and ``vision_msgs``), camera path.

Created on ``activate`` and destroyed on ``deactivate`` (lifecycle). Every message is stamped in the frame the map
is really in (``map`` with tf poses, the odometry frame with odometry poses: REP-105).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from nav_msgs.msg import Path as PathMsg
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import Header
from visualization_msgs.msg import MarkerArray

from langgs_ros.ros.conversions import box_markers, pose_stamped, rotation_to_quaternion, snapshot_to_pointcloud2
from langgs_ros.types import MapSnapshot

LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                     history=HistoryPolicy.KEEP_LAST)


def detections_from_boxes(boxes: dict, names: dict[int, str], scores: dict[int, float], stamp: Any,
                          frame_id: str):
    """``vision_msgs/Detection3DArray`` of instance boxes.

    Args:
        boxes: ``{instance id: GravityBox}`` (centre (3,) m, size (3,) m, rotation (3, 3); gravity-aligned).
        names: instance id -> class name (``results[0].hypothesis.class_id``).
        scores: instance id -> score in [0, 1] (``results[0].hypothesis.score``; 1.0 when absent).
        stamp, frame_id: the header (the map's frame).

    Raises:
        ImportError: vision_msgs is not installed.
    """
    from geometry_msgs.msg import Point, Pose, Vector3
    from vision_msgs.msg import BoundingBox3D, Detection3D, Detection3DArray, ObjectHypothesisWithPose

    header = Header(stamp=stamp, frame_id=frame_id)
    out = Detection3DArray(header=header)
    for iid, box in boxes.items():
        c = np.asarray(box.center, dtype=np.float64)
        pose = Pose(position=Point(x=float(c[0]), y=float(c[1]), z=float(c[2])),
                    orientation=rotation_to_quaternion(box.rotation))
        size = np.asarray(box.size, dtype=np.float64)
        hyp = ObjectHypothesisWithPose()
        hyp.hypothesis.class_id = names.get(int(iid)) or f"instance {int(iid)}"
        hyp.hypothesis.score = float(scores.get(int(iid), 1.0))
        hyp.pose.pose = pose
        det = Detection3D(header=header, id=str(int(iid)), results=[hyp],
                          bbox=BoundingBox3D(center=pose, size=Vector3(x=float(size[0]), y=float(size[1]),
                                                                       z=float(size[2]))))
        out.detections.append(det)
    return out


class MapPublishers:
    """The node's map outputs (all reliable + transient local so late RViz / Nav2 clients get the last one).

    ``~/gaussians`` (PointCloud2), ``~/objects`` (MarkerArray), ``~/detections`` (vision_msgs/Detection3DArray),
    ``~/camera_path`` (Path), ``~/query_markers`` and ``~/query_detections`` (the last query's results).
    """

    def __init__(self, node: Any) -> None:
        self.node = node
        self.gaussians = node.create_publisher(PointCloud2, "~/gaussians", LATCHED)
        self.objects = node.create_publisher(MarkerArray, "~/objects", LATCHED)
        self.query_markers = node.create_publisher(MarkerArray, "~/query_markers", LATCHED)
        self.path = node.create_publisher(PathMsg, "~/camera_path", LATCHED)
        self.detections = self.query_detections = None
        try:
            from vision_msgs.msg import Detection3DArray

            self.detections = node.create_publisher(Detection3DArray, "~/detections", LATCHED)
            self.query_detections = node.create_publisher(Detection3DArray, "~/query_detections", LATCHED)
        except ImportError:
            node.get_logger().warning("vision_msgs is not installed: ~/detections is not published")

    def publish_map(self, snap: MapSnapshot, cloud_snap: MapSnapshot, boxes: dict, stamp: Any, frame_id: str) -> None:
        """Publish the cloud (``cloud_snap``: possibly limited to fewer points), boxes and the camera path."""
        self.gaussians.publish(snapshot_to_pointcloud2(cloud_snap, stamp, frame_id))
        self.objects.publish(box_markers(snap, stamp, frame_id=frame_id, boxes=boxes))
        if self.detections is not None:
            names = {int(i): n for i, n in zip(snap.instances.ids, snap.instances.names)}
            self.detections.publish(detections_from_boxes(boxes, names, {}, stamp, frame_id))
        path = PathMsg(header=Header(stamp=stamp, frame_id=frame_id))
        for c in np.asarray(snap.camera_positions).reshape(-1, 3):
            path.poses.append(pose_stamped(c, 0.0, stamp, frame_id))
        self.path.publish(path)

    def publish_query(self, snap: MapSnapshot, hits: dict[int, float], names: dict[int, str], boxes: dict,
                      stamp: Any, frame_id: str) -> None:
        """Publish the last query's results (``hits``: instance id -> relevancy score)."""
        self.query_markers.publish(box_markers(snap, stamp, namespace="query", highlight=hits, frame_id=frame_id,
                                               boxes=boxes))
        if self.query_detections is not None:
            self.query_detections.publish(detections_from_boxes(boxes, names, hits, stamp, frame_id))

    def destroy(self) -> None:
        """Destroy every publisher (deactivate)."""
        for pub in (self.gaussians, self.objects, self.query_markers, self.path, self.detections,
                    self.query_detections):
            if pub is not None:
                self.node.destroy_publisher(pub)
