"""Replay an RGB-D folder or a rosbag2 file as camera topics (for demos, tests and users without a robot).

Folder replay (hololens, TUM or image-folder layout, :mod:`langgs_ros.datasets`) publishes per frame:
``image`` (rgb8), ``camera_info``, ``depth`` (16UC1 mm), ``labels`` (16UC1 ids, when annotated) with
sensor-data QoS, and ``odom`` (nav_msgs/Odometry of the camera optical frame in ``odom``), all with the same
stamp. Dataset worlds are not always z-up (the hololens world is y-up): when the dataset knows its ``up``
vector the poses are rotated by ``R_odom_world`` so that ``odom`` is z-up as REP-103 asks; the same rotation
is printed and available from :func:`gravity_alignment` so ground truth can be compared in ``odom``.

Bag replay (``--bag``) republishes the recorded messages of the chosen topics, serialized as they are, through
the ``rosbags`` reader, at the recorded rate scaled by ``--rate``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path

import numpy as np
import rclpy
from geometry_msgs.msg import Point, Pose, Quaternion
from nav_msgs.msg import Odometry
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header

from langgs_ros.datasets import RGBDSequence, open_sequence
from langgs_ros.ros.conversions import sec_to_stamp

log = logging.getLogger(__name__)


def gravity_alignment(up: np.ndarray | None) -> np.ndarray:
    """(4, 4) ``odom_from_world`` rotation taking the dataset's ``up`` vector to +z (identity if unknown)."""
    T = np.eye(4)
    if up is None:
        return T
    u = np.asarray(up, dtype=np.float64)
    u = u / np.linalg.norm(u)
    rot, _ = Rotation.align_vectors([[0.0, 0.0, 1.0]], [u])
    T[:3, :3] = rot.as_matrix()
    return T


def _image(arr: np.ndarray, encoding: str, header: Header) -> Image:
    arr = np.ascontiguousarray(arr)
    return Image(header=header, height=arr.shape[0], width=arr.shape[1], encoding=encoding, is_bigendian=0,
                 step=arr.shape[1] * arr.itemsize * (arr.shape[2] if arr.ndim == 3 else 1), data=arr.tobytes())


class FolderReplay(Node):
    """Publishes an :class:`RGBDSequence` frame by frame (call :meth:`publish_frame` or :meth:`run`).

    Args:
        sequence: the opened folder; ``camera_frame``: optical frame id; ``odom_frame``: odometry frame id.
        publish_tf: also publish the poses as tf (REP-105), with tf2_ros' broadcasters: ``/tf``
            ``odom_frame -> base_frame`` per frame and ``/tf_static`` ``base_frame -> camera_frame``
            (``base_from_camera``) plus, when ``map_from_odom`` is given, ``map_frame -> odom_frame``.
        base_from_camera: (4, 4) camera optical frame in the robot base frame (identity when None).
        map_from_odom: (4, 4) static ``map <- odom`` transform to publish (localisation's correction), or None.
    """

    def __init__(self, sequence: RGBDSequence, camera_frame: str = "camera_color_optical_frame",
                 odom_frame: str = "odom", node_name: str = "langgs_replay", publish_tf: bool = False,
                 base_frame: str = "base_link", base_from_camera: np.ndarray | None = None,
                 map_frame: str = "map", map_from_odom: np.ndarray | None = None, **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        self.seq = sequence
        self.camera_frame = camera_frame
        self.odom_frame = odom_frame
        self.base_frame = base_frame
        self.base_from_camera = np.eye(4) if base_from_camera is None else np.asarray(base_from_camera, float)
        self.tf_broadcaster = None
        if publish_tf:
            import tf2_ros

            self.tf_broadcaster = tf2_ros.TransformBroadcaster(self)
            self.tf_static = tf2_ros.StaticTransformBroadcaster(self)
            statics = [self._transform(self.base_from_camera, base_frame, camera_frame, 0.0)]
            if map_from_odom is not None:
                statics.append(self._transform(np.asarray(map_from_odom, float), map_frame, odom_frame, 0.0))
            self.tf_static.sendTransform(statics)
        self.odom_from_world = gravity_alignment(sequence.up)
        sd = qos_profile_sensor_data
        self.pub_image = self.create_publisher(Image, "image", sd)
        self.pub_info = self.create_publisher(CameraInfo, "camera_info", sd)
        self.pub_depth = self.create_publisher(Image, "depth", sd)
        self.pub_labels = self.create_publisher(Image, "labels", sd)
        self.pub_odom = self.create_publisher(Odometry, "odom", 50)
        self.t0 = self.get_clock().now().nanoseconds * 1e-9

    def wait_for_subscribers(self, timeout: float = 30.0) -> bool:
        """Wait until every topic this sequence will publish has a subscriber (so no first frame is lost).

        With ``publish_tf`` the poses count as delivered once ``/tf`` or the odometry topic has a subscriber (a
        node posed by tf does not subscribe to odometry). Returns False after ``timeout`` seconds.
        """
        pubs = [self.pub_image]
        if self.seq.intrinsics is not None:
            pubs.append(self.pub_info)
        if any(p is not None for p in self.seq.depth_paths):
            pubs.append(self.pub_depth)
        if any(p is not None for p in self.seq.label_paths):
            pubs.append(self.pub_labels)
        pose_pubs = [self.pub_odom] if self.seq.poses is not None else []
        if pose_pubs and self.tf_broadcaster is not None:
            pose_pubs.append(self.tf_broadcaster.pub_tf)
        deadline = time.monotonic() + timeout
        while any(p.get_subscription_count() == 0 for p in pubs) or (
                pose_pubs and all(p.get_subscription_count() == 0 for p in pose_pubs)):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def odometry(self, world_from_camera: np.ndarray, t: float) -> Odometry:
        """``nav_msgs/Odometry`` of the camera at time ``t`` (s) in the z-up ``odom`` frame."""
        T = self.odom_from_world @ world_from_camera
        q = Rotation.from_matrix(T[:3, :3]).as_quat()  # x, y, z, w
        odom = Odometry(header=Header(stamp=sec_to_stamp(t), frame_id=self.odom_frame),
                        child_frame_id=self.camera_frame)
        odom.pose.pose = Pose(position=Point(x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])),
                              orientation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])))
        return odom

    @staticmethod
    def _transform(parent_from_child: np.ndarray, parent: str, child: str, t: float):
        from geometry_msgs.msg import TransformStamped

        q = Rotation.from_matrix(parent_from_child[:3, :3]).as_quat()  # x, y, z, w
        msg = TransformStamped(header=Header(stamp=sec_to_stamp(t), frame_id=parent), child_frame_id=child)
        tr = msg.transform
        tr.translation.x, tr.translation.y, tr.translation.z = (float(v) for v in parent_from_child[:3, 3])
        tr.rotation.x, tr.rotation.y, tr.rotation.z, tr.rotation.w = (float(v) for v in q)
        return msg

    def stamp_of(self, i: int) -> float:
        """Published stamp (s) of frame ``i``."""
        return self.t0 + float(self.seq.stamps[i] - self.seq.stamps[0])

    def frame_messages(self, i: int, t: float) -> list[tuple[str, object]]:
        """Messages of frame ``i`` stamped ``t`` (s), as (topic, message) in publication order: ``odom`` (and
        ``tf``: ``odom -> base_link`` when publishing tf), ``camera_info``, ``depth``, ``labels``, ``image`` (those
        the sequence has)."""
        f = self.seq.frame(i)
        header = Header(stamp=sec_to_stamp(t), frame_id=self.camera_frame)
        out: list[tuple[str, object]] = []
        if f.world_from_camera is not None:
            out.append(("odom", self.odometry(f.world_from_camera, t)))
            if self.tf_broadcaster is not None:
                odom_from_base = self.odom_from_world @ f.world_from_camera @ np.linalg.inv(self.base_from_camera)
                out.append(("tf", self._transform(odom_from_base, self.odom_frame, self.base_frame, t)))
        if f.intrinsics is not None:
            K = f.intrinsics
            out.append(("camera_info", CameraInfo(
                header=header, height=f.height, width=f.width, distortion_model="plumb_bob", d=[0.0] * 5,
                k=K.reshape(-1).tolist(), r=np.eye(3).reshape(-1).tolist(),
                p=np.hstack([K, np.zeros((3, 1))]).reshape(-1).tolist())))
        if f.depth is not None:
            out.append(("depth", _image(np.round(f.depth * 1000.0).clip(0, 65535).astype(np.uint16), "16UC1",
                                        header)))
        if f.labels is not None:
            out.append(("labels", _image(f.labels.clip(0, 65535).astype(np.uint16), "16UC1", header)))
        out.append(("image", _image(f.rgb, "rgb8", header)))
        return out

    def publish(self, topic: str, msg: object) -> None:
        """Publish one message of :meth:`frame_messages` on its topic (``tf`` through the tf broadcaster)."""
        if topic == "tf":
            self.tf_broadcaster.sendTransform(msg)
            return
        {"image": self.pub_image, "camera_info": self.pub_info, "depth": self.pub_depth,
         "labels": self.pub_labels, "odom": self.pub_odom}[topic].publish(msg)

    def publish_frame(self, i: int) -> float:
        """Publish frame ``i`` (odometry/tf first, then camera info, depth, labels and colour); returns its stamp."""
        t = self.stamp_of(i)
        for topic, msg in self.frame_messages(i, t):
            self.publish(topic, msg)
        return t

    def run(self, rate: float = 2.0, indices: list[int] | None = None) -> int:
        """Publish frames at ``rate`` Hz (wall clock); returns the number published."""
        n = 0
        period = 1.0 / rate if rate > 0 else 0.0
        for i in indices if indices is not None else range(len(self.seq)):
            start = time.monotonic()
            self.publish_frame(i)
            n += 1
            rest = period - (time.monotonic() - start)
            if rest > 0:
                time.sleep(rest)
        return n


def _msg_class(msgtype: str):
    pkg, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.{kind}"), name)


class BagReplay(Node):
    """Republishes topics of a rosbag2 file (sqlite3 or mcap) read with the ``rosbags`` library.

    Args:
        bag: the bag folder; ``topics``: recorded topic -> published topic (all image/camera/odometry topics
            when None, published under their recorded names).
    """

    def __init__(self, bag: str | Path, topics: dict[str, str] | None = None, node_name: str = "langgs_bag_replay",
                 **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        from rosbags.highlevel import AnyReader

        self.reader = AnyReader([Path(bag)])
        self.reader.open()
        wanted = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CameraInfo", "nav_msgs/msg/Odometry")
        self.connections = [c for c in self.reader.connections
                            if (topics is not None and c.topic in topics) or (topics is None and c.msgtype in wanted)]
        if not self.connections:
            self.reader.close()
            raise ValueError(f"{bag}: none of the requested topics are in the bag "
                             f"(it has {sorted({c.topic for c in self.reader.connections})})")
        self.pubs = {}
        for c in self.connections:
            out = topics.get(c.topic, c.topic) if topics else c.topic
            qos = qos_profile_sensor_data if c.msgtype != "nav_msgs/msg/Odometry" else 50
            self.pubs[c.id] = self.create_publisher(_msg_class(c.msgtype), out, qos)

    def run(self, rate: float = 1.0) -> int:
        """Publish all messages, pacing by recorded time divided by ``rate`` (0 = as fast as possible)."""
        n = 0
        first_bag = first_wall = None
        for conn, t_ns, raw in self.reader.messages(connections=self.connections):
            if rate > 0:
                if first_bag is None:
                    first_bag, first_wall = t_ns, time.monotonic()
                wait = (t_ns - first_bag) * 1e-9 / rate - (time.monotonic() - first_wall)
                if wait > 0:
                    time.sleep(wait)
            self.pubs[conn.id].publish(bytes(raw))  # CDR bytes as recorded
            n += 1
        return n

    def destroy_node(self) -> None:
        """Close the bag and destroy the node."""
        self.reader.close()
        super().destroy_node()


def main(argv: list[str] | None = None) -> int:
    """``langgs-replay DIR|--bag BAG [--rate HZ]``: publish a dataset folder or a bag."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", help="RGB-D folder (hololens, TUM or image-folder layout)")
    parser.add_argument("--bag", help="rosbag2 folder instead of a dataset folder")
    parser.add_argument("--rate", type=float, default=2.0, help="frames per second (folder) or speed factor (bag)")
    parser.add_argument("--max-depth", type=float, default=10.0, help="m; farther depth is invalid")
    parser.add_argument("--camera-frame", default="camera_color_optical_frame")
    parser.add_argument("--wait-subscribers", type=float, default=10.0,
                        help="s to wait for a subscriber on the image topic before starting")
    args, ros_args = parser.parse_known_args(argv if argv is not None else sys.argv[1:])
    if not args.folder and not args.bag:
        parser.error("give a dataset folder or --bag")
    logging.basicConfig(level=logging.INFO)
    rclpy.init(args=["replay", *ros_args])
    node = None
    try:
        if args.bag:
            node = BagReplay(args.bag)
            n = node.run(args.rate)
        else:
            seq = open_sequence(args.folder, max_depth=args.max_depth)
            for line in seq.report:
                print(f"[replay] {line}", flush=True)
            node = FolderReplay(seq, camera_frame=args.camera_frame)
            node.wait_for_subscribers(args.wait_subscribers)
            n = node.run(args.rate)
        print(f"[replay] published {n} frames", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
