"""Message conversions: image decoding (colour via cv_bridge, depth/labels via numpy), poses, PointCloud2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.ros


def _img(arr: np.ndarray, encoding: str, bigendian: bool = False, pad: int = 0):
    from sensor_msgs.msg import Image

    a = np.ascontiguousarray(arr)
    if bigendian:
        a = a.astype(a.dtype.newbyteorder(">"))
    row = a.shape[1] * a.itemsize * (a.shape[2] if a.ndim == 3 else 1)
    data = b"".join(a[i].tobytes() + b"\0" * pad for i in range(a.shape[0]))
    return Image(height=a.shape[0], width=a.shape[1], encoding=encoding, is_bigendian=int(bigendian),
                 step=row + pad, data=data)


def test_colour_encodings_to_rgb() -> None:
    from langgs_ros.ros.conversions import image_to_rgb

    rgb = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(image_to_rgb(_img(rgb, "rgb8")), rgb)
    assert np.array_equal(image_to_rgb(_img(rgb[..., ::-1], "bgr8")), rgb)
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(image_to_rgb(_img(rgba, "rgba8")), rgb)
    grey = image_to_rgb(_img(rgb[..., 0], "mono8"))
    assert grey.shape == (5, 7, 3) and np.array_equal(grey[..., 1], rgb[..., 0])


def test_depth_decoding_units_padding_and_endianness() -> None:
    from langgs_ros.ros.conversions import image_to_depth, image_to_labels

    mm = np.array([[0, 1500, 65535], [250, 7000, 3]], np.uint16)
    assert np.allclose(image_to_depth(_img(mm, "16UC1", pad=3)), mm.astype(np.float32) / 1000.0)
    assert np.allclose(image_to_depth(_img(mm, "16UC1", bigendian=True)), mm / 1000.0)
    m = np.array([[np.nan, 1.25, -2.0], [np.inf, 0.5, 3.0]], np.float32)
    assert image_to_depth(_img(m, "32FC1")).tolist() == [[0.0, 1.25, 0.0], [0.0, 0.5, 3.0]]
    ids = np.array([[0, 3], [15, 300]], np.uint16)
    assert image_to_labels(_img(ids, "16UC1")).tolist() == [[0, 3], [15, 300]]


def test_bad_images_raise_conversion_errors() -> None:
    from sensor_msgs.msg import CameraInfo, Image

    from langgs_ros.ros.conversions import ConversionError, camera_info_to_k, image_to_depth, image_to_rgb

    with pytest.raises(ConversionError, match="unsupported colour encoding"):
        image_to_rgb(_img(np.zeros((2, 2, 2), np.uint8), "yuv422"))
    with pytest.raises(ConversionError, match="zero-size"):
        image_to_rgb(Image(height=0, width=0, encoding="rgb8", step=0))
    with pytest.raises(ConversionError, match="too short"):
        image_to_depth(Image(height=4, width=4, encoding="16UC1", step=8, data=bytes(10)))
    with pytest.raises(ConversionError, match="unsupported depth"):
        image_to_depth(_img(np.zeros((2, 2), np.uint8), "mono8"))
    with pytest.raises(ConversionError):
        camera_info_to_k(CameraInfo(width=0, height=0))
    with pytest.raises(ConversionError, match="pinhole"):
        camera_info_to_k(CameraInfo(width=4, height=4, k=[0.0] * 9))


def test_pose_round_trip_and_extrinsic() -> None:
    from scipy.spatial.transform import Rotation

    from langgs_ros.ros.conversions import matrix_to_pose, pose_to_matrix, xyz_rpy_to_matrix

    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler("zyx", [0.3, -0.2, 1.1]).as_matrix()
    T[:3, 3] = [1.0, -2.0, 0.5]
    assert np.allclose(pose_to_matrix(matrix_to_pose(T)), T)
    E = xyz_rpy_to_matrix([0.1, 0.0, 0.2], [0.0, 0.0, np.pi / 2])
    assert np.allclose(E[:3, :3] @ [1, 0, 0], [0, 1, 0])


def test_pointcloud2_layout_matches_the_snapshot() -> None:
    from builtin_interfaces.msg import Time

    from langgs_ros.ros.conversions import GAUSSIAN_FIELDS, SH_C0, pointcloud2_to_array, snapshot_to_pointcloud2
    from langgs_ros.types import Gaussians, InstanceTable, MapSnapshot

    n = 50
    g = torch.Generator().manual_seed(0)
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=1)
    gs = Gaussians(torch.randn(n, 3, generator=g), quats, torch.rand(n, 3, generator=g) * 0.05,
                   torch.rand(n, generator=g), torch.rand(n, 3, generator=g),
                   torch.randint(-1, 5, (n,), generator=g, dtype=torch.int32))
    snap = MapSnapshot(gaussians=gs, instances=InstanceTable.empty(8), encoder_id="x")
    msg = snapshot_to_pointcloud2(snap, Time(sec=3), "map")
    assert msg.header.frame_id == "map" and msg.height == 1 and msg.width == n
    assert [f.name for f in msg.fields] == [name for name, _, _ in GAUSSIAN_FIELDS]
    assert msg.point_step == 64 and msg.row_step == 64 * n and len(msg.data) == 64 * n
    arr = pointcloud2_to_array(msg)
    assert np.allclose(arr["x"], gs.means[:, 0].numpy()) and np.allclose(arr["rot_0"], quats[:, 0].numpy())
    assert np.array_equal(arr["instance_id"], gs.instance_ids.numpy())
    assert np.allclose(0.5 + SH_C0 * arr["f_dc_1"], gs.colors[:, 1].numpy(), atol=1e-6)
    packed = arr["rgb"].view(np.uint32)
    assert np.array_equal((packed >> 16) & 255, np.round(gs.colors[:, 0].numpy() * 255).astype(np.uint32))
    assert np.array_equal(packed & 255, np.round(gs.colors[:, 2].numpy() * 255).astype(np.uint32))
