"""Conversions between ROS 2 messages and the core's numpy/torch types.

Images: colour through ``cv_bridge`` (the robot's apt package, or the PyPI repackaging here); depth and label
images (``16UC1``/``mono16`` millimetres or ids, ``32FC1`` metres, REP-118) are decoded directly with numpy,
because the PyPI ``cv-bridge`` 1.13 returns 16-bit single-channel images as uint8 (seen here) and a depth
image must never be silently truncated.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Point, Pose, PoseStamped, Quaternion, Vector3
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from langgs_ros.types import MapSnapshot

COLOR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")
DEPTH_ENCODINGS = ("16UC1", "mono16", "32FC1")
LABEL_ENCODINGS = ("16UC1", "mono16", "mono8", "8UC1", "32SC1")
SH_C0 = 0.28209479177387814


class ConversionError(ValueError):
    """A message that cannot be converted (unsupported encoding, inconsistent sizes); the message says why."""


def stamp_to_sec(stamp: Time) -> float:
    """``builtin_interfaces/Time`` -> seconds (float)."""
    return float(stamp.sec) + 1e-9 * float(stamp.nanosec)


def sec_to_stamp(t: float) -> Time:
    """Seconds -> ``builtin_interfaces/Time``."""
    sec = math.floor(t)
    return Time(sec=int(sec), nanosec=min(round((t - sec) * 1e9), 999_999_999))


def _check_image(msg: Image, bytes_per_pixel: int) -> None:
    if msg.height == 0 or msg.width == 0:
        raise ConversionError(f"zero-size image ({msg.width}x{msg.height})")
    if msg.step < msg.width * bytes_per_pixel or len(msg.data) < msg.step * msg.height:
        raise ConversionError(f"image data too short: {len(msg.data)} bytes for {msg.width}x{msg.height} "
                              f"{msg.encoding} with step {msg.step}")


def _plane(msg: Image, dtype: np.dtype) -> np.ndarray:
    """(H, W) view of a single-channel image honouring step and endianness."""
    dt = np.dtype(dtype).newbyteorder(">" if msg.is_bigendian else "<")
    _check_image(msg, dt.itemsize)
    rows = np.frombuffer(bytes(msg.data), dtype=np.uint8, count=msg.step * msg.height).reshape(msg.height, msg.step)
    plane = rows[:, : msg.width * dt.itemsize].copy().view(dt).reshape(msg.height, msg.width)
    return plane.astype(dtype.newbyteorder("="))


def image_to_rgb(msg: Image, bridge: Any | None = None) -> np.ndarray:
    """Colour ``sensor_msgs/Image`` -> (H, W, 3) uint8 RGB.

    Raises:
        ConversionError: unsupported encoding (supported: rgb8, bgr8, rgba8, bgra8, mono8) or bad sizes.
    """
    if msg.encoding not in COLOR_ENCODINGS:
        raise ConversionError(f"unsupported colour encoding {msg.encoding!r}; supported: {', '.join(COLOR_ENCODINGS)}")
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}[msg.encoding]
    _check_image(msg, channels)
    if bridge is None:
        from cv_bridge import CvBridge

        bridge = CvBridge()
    try:
        out = bridge.imgmsg_to_cv2(msg, desired_encoding="rgb8")
    except Exception as exc:  # cv_bridge raises its own error types
        raise ConversionError(f"cv_bridge could not convert a {msg.encoding} image: {exc}") from exc
    out = np.ascontiguousarray(out)
    if out.shape != (msg.height, msg.width, 3) or out.dtype != np.uint8:
        raise ConversionError(f"colour conversion gave {out.shape} {out.dtype}")
    return out


def image_to_depth(msg: Image) -> np.ndarray:
    """Depth ``sensor_msgs/Image`` -> (H, W) float32 metres; 0 where invalid (0, NaN, inf, negative).

    ``16UC1``/``mono16`` are millimetres, ``32FC1`` metres (REP-118).

    Raises:
        ConversionError: unsupported encoding or bad sizes.
    """
    if msg.encoding in ("16UC1", "mono16"):
        depth = _plane(msg, np.dtype(np.uint16)).astype(np.float32) * 1e-3
    elif msg.encoding == "32FC1":
        depth = _plane(msg, np.dtype(np.float32))
    else:
        raise ConversionError(f"unsupported depth encoding {msg.encoding!r}; supported: {', '.join(DEPTH_ENCODINGS)}")
    depth = depth.astype(np.float32, copy=False)
    depth[~np.isfinite(depth) | (depth < 0)] = 0.0
    return depth


def image_to_labels(msg: Image) -> np.ndarray:
    """Label ``sensor_msgs/Image`` -> (H, W) int32 ids (0 = unlabelled).

    Raises:
        ConversionError: unsupported encoding (16UC1, mono16, mono8, 8UC1, 32SC1) or bad sizes.
    """
    dtypes = {"16UC1": np.uint16, "mono16": np.uint16, "mono8": np.uint8, "8UC1": np.uint8, "32SC1": np.int32}
    if msg.encoding not in dtypes:
        raise ConversionError(f"unsupported label encoding {msg.encoding!r}; supported: {', '.join(LABEL_ENCODINGS)}")
    return _plane(msg, np.dtype(dtypes[msg.encoding])).astype(np.int32)


def camera_info_to_k(msg: CameraInfo) -> np.ndarray:
    """``sensor_msgs/CameraInfo`` -> (3, 3) float64 K (pixels).

    Raises:
        ConversionError: zero size, non-finite or non-positive focal lengths.
    """
    K = np.asarray(msg.k, dtype=np.float64).reshape(3, 3)
    if msg.width == 0 or msg.height == 0:
        raise ConversionError("CameraInfo has zero width/height")
    if not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ConversionError(f"CameraInfo K is not a valid pinhole matrix: {K.tolist()}")
    return K


def pose_to_matrix(pose: Pose) -> np.ndarray:
    """``geometry_msgs/Pose`` -> (4, 4) float64 homogeneous transform (parent_from_child).

    Raises:
        ConversionError: non-finite values or a zero quaternion.
    """
    q = np.array([pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w], dtype=np.float64)
    t = np.array([pose.position.x, pose.position.y, pose.position.z], dtype=np.float64)
    if not (np.all(np.isfinite(q)) and np.all(np.isfinite(t))) or np.linalg.norm(q) < 1e-9:
        raise ConversionError("pose has non-finite values or a zero quaternion")
    T = np.eye(4)
    T[:3, :3] = Rotation.from_quat(q).as_matrix()  # scipy and ROS: x, y, z, w order
    T[:3, 3] = t
    return T


def matrix_to_pose(T: np.ndarray) -> Pose:
    """(4, 4) transform -> ``geometry_msgs/Pose``."""
    q = Rotation.from_matrix(np.asarray(T, dtype=np.float64)[:3, :3]).as_quat()  # x, y, z, w
    return Pose(position=Point(x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])),
                orientation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])))


def yaw_to_quaternion(yaw: float, up: np.ndarray | None = None) -> Quaternion:
    """Rotation by ``yaw`` radians about ``up`` (default map +z) as a ``geometry_msgs/Quaternion``."""
    axis = np.array([0.0, 0.0, 1.0]) if up is None else np.asarray(up, dtype=np.float64) / np.linalg.norm(up)
    q = Rotation.from_rotvec(axis * float(yaw)).as_quat()
    return Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3]))


def xyz_rpy_to_matrix(xyz: list[float], rpy: list[float]) -> np.ndarray:
    """Translation (m) + roll/pitch/yaw (rad, fixed-axis x-y-z as in URDF) -> (4, 4) parent_from_child."""
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler("xyz", rpy).as_matrix()
    T[:3, 3] = xyz
    return T


# ---------------------------------------------------------------------------------------------- PointCloud2

GAUSSIAN_FIELDS: list[tuple[str, int, type]] = [
    ("x", PointField.FLOAT32, np.float32), ("y", PointField.FLOAT32, np.float32), ("z", PointField.FLOAT32, np.float32),
    ("scale_0", PointField.FLOAT32, np.float32), ("scale_1", PointField.FLOAT32, np.float32),
    ("scale_2", PointField.FLOAT32, np.float32),
    ("rot_0", PointField.FLOAT32, np.float32), ("rot_1", PointField.FLOAT32, np.float32),
    ("rot_2", PointField.FLOAT32, np.float32), ("rot_3", PointField.FLOAT32, np.float32),
    ("opacity", PointField.FLOAT32, np.float32),
    ("f_dc_0", PointField.FLOAT32, np.float32), ("f_dc_1", PointField.FLOAT32, np.float32),
    ("f_dc_2", PointField.FLOAT32, np.float32),
    ("rgb", PointField.FLOAT32, np.float32),
    ("instance_id", PointField.INT32, np.int32),
]
"""The ``~/gaussians`` PointCloud2 layout, in order, 4 bytes each (point_step 64).

x y z: mean (map frame, m); scale_0..2: standard deviations in metres (linear, *not* log, so RViz-side tools
can use them directly); rot_0..3: unit quaternion w x y z; opacity: alpha in [0, 1] (activated, not a logit);
f_dc_0..2: 3DGS band-0 SH coefficients ``(rgb - 0.5) / C0``; rgb: packed ``(r << 16) | (g << 8) | b`` uint32
stored in a FLOAT32 field (RViz's convention); instance_id: map instance id, -1 = none.
"""


def snapshot_to_pointcloud2(snapshot: MapSnapshot, stamp: Time, frame_id: str | None = None) -> PointCloud2:
    """Map snapshot -> unordered ``sensor_msgs/PointCloud2`` with :data:`GAUSSIAN_FIELDS` (height 1)."""
    g = snapshot.gaussians
    n = len(g)
    dtype = np.dtype([(name, np_t) for name, _, np_t in GAUSSIAN_FIELDS])
    arr = np.empty(n, dtype=dtype)
    if n:
        means = g.means.detach().cpu().numpy()
        scales = g.scales.detach().cpu().numpy()
        quats = g.quats.detach().cpu().numpy()
        colors = g.colors.detach().cpu().numpy().clip(0.0, 1.0)
        for i, c in enumerate("xyz"):
            arr[c] = means[:, i]
        for i in range(3):
            arr[f"scale_{i}"] = scales[:, i]
            arr[f"f_dc_{i}"] = (colors[:, i] - 0.5) / SH_C0
        for i in range(4):
            arr[f"rot_{i}"] = quats[:, i]
        arr["opacity"] = g.opacities.detach().cpu().numpy()
        rgb8 = np.round(colors * 255.0).astype(np.uint32)
        arr["rgb"] = ((rgb8[:, 0] << 16) | (rgb8[:, 1] << 8) | rgb8[:, 2]).view(np.float32)
        arr["instance_id"] = g.instance_ids.detach().cpu().numpy().astype(np.int32)
    fields = [PointField(name=name, offset=dtype.fields[name][1], datatype=dt, count=1)
              for name, dt, _ in GAUSSIAN_FIELDS]
    return PointCloud2(
        header=Header(stamp=stamp, frame_id=frame_id or snapshot.frame_id), height=1, width=n, fields=fields,
        is_bigendian=False, point_step=dtype.itemsize, row_step=dtype.itemsize * n, data=arr.tobytes(),
        is_dense=True,
    )


def pointcloud2_to_array(msg: PointCloud2) -> np.ndarray:
    """Unordered PointCloud2 -> numpy structured array with the message's own fields (for tests and tools)."""
    np_types = {PointField.FLOAT32: np.float32, PointField.INT32: np.int32, PointField.UINT32: np.uint32,
                PointField.FLOAT64: np.float64, PointField.UINT8: np.uint8, PointField.INT8: np.int8,
                PointField.UINT16: np.uint16, PointField.INT16: np.int16}
    dtype = np.dtype({"names": [f.name for f in msg.fields], "formats": [np_types[f.datatype] for f in msg.fields],
                      "offsets": [f.offset for f in msg.fields], "itemsize": msg.point_step})
    return np.frombuffer(bytes(msg.data), dtype=dtype, count=msg.width * msg.height)


# ---------------------------------------------------------------------------------------------- markers

def _label_color(instance_id: int) -> ColorRGBA:
    rng = np.random.default_rng(int(instance_id) + 12345)
    r, g, b = rng.uniform(0.3, 1.0, size=3)
    return ColorRGBA(r=float(r), g=float(g), b=float(b), a=0.6)


def rotation_to_quaternion(R: np.ndarray) -> Quaternion:
    """(3, 3) rotation matrix -> ``geometry_msgs/Quaternion`` (x, y, z, w)."""
    q = Rotation.from_matrix(np.asarray(R, dtype=np.float64)).as_quat()
    return Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3]))


def box_markers(snapshot: MapSnapshot, stamp: Time, namespace: str = "objects",
                highlight: dict[int, float] | None = None, frame_id: str | None = None,
                boxes: dict | None = None) -> MarkerArray:
    """Instance boxes (CUBE, gravity-aligned, fitted by :func:`langgs_ros.query.instance_boxes`) and text labels.

    Args:
        highlight: instance id -> score; when given only those instances are drawn, coloured by score
            (red = 1) with the score in the label (query results).
        boxes: precomputed ``{instance id: GravityBox}`` (e.g. :meth:`QueryEngine.boxes`, cached per snapshot);
            fitted here when None.
    """
    from langgs_ros.query import instance_boxes

    inst = snapshot.instances
    header = Header(stamp=stamp, frame_id=frame_id or snapshot.frame_id)
    out = MarkerArray()
    out.markers.append(Marker(header=header, ns=namespace, id=0, action=Marker.DELETEALL))
    wanted = [int(i) for i in inst.ids if highlight is None or int(i) in highlight]
    if boxes is None:
        boxes = instance_boxes(snapshot, wanted)
    else:
        boxes = {i: boxes[i] for i in wanted if i in boxes}
    names = {int(i): n for i, n in zip(inst.ids, inst.names)}
    up = np.asarray(snapshot.up, dtype=np.float64)
    for iid, box in boxes.items():
        c = box.center
        pose = Pose(position=Point(x=float(c[0]), y=float(c[1]), z=float(c[2])),
                    orientation=rotation_to_quaternion(box.rotation))
        size = np.maximum(box.size, 0.01)
        if highlight is not None:
            s = float(highlight[iid])
            color = ColorRGBA(r=1.0, g=float(1.0 - s), b=0.0, a=0.7)
        else:
            color = _label_color(iid)
        out.markers.append(Marker(header=header, ns=namespace, id=2 * iid + 1, type=Marker.CUBE, action=Marker.ADD,
                                  pose=pose, scale=Vector3(x=float(size[0]), y=float(size[1]), z=float(size[2])),
                                  color=color))
        name = names.get(iid) or f"instance {iid}"
        text = f"{name} ({highlight[iid]:.2f})" if highlight is not None else name
        tp = c + up * (float(size[2]) / 2 + 0.1)
        out.markers.append(Marker(header=header, ns=f"{namespace}_labels", id=2 * iid + 2,
                                  type=Marker.TEXT_VIEW_FACING, action=Marker.ADD,
                                  pose=Pose(position=Point(x=float(tp[0]), y=float(tp[1]), z=float(tp[2]))),
                                  scale=Vector3(z=0.12), color=ColorRGBA(r=1.0, g=1.0, b=1.0, a=1.0), text=text))
    return out


def pose_stamped(position: np.ndarray, yaw: float, stamp: Time, frame_id: str,
                 up: np.ndarray | None = None) -> PoseStamped:
    """A ``PoseStamped`` at ``position`` (m) with a yaw-only orientation about ``up``."""
    p = np.asarray(position, dtype=np.float64)
    return PoseStamped(header=Header(stamp=stamp, frame_id=frame_id),
                       pose=Pose(position=Point(x=float(p[0]), y=float(p[1]), z=float(p[2])),
                                 orientation=yaw_to_quaternion(yaw, up)))
