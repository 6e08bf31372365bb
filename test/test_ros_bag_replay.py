"""rosbag2 replay: a bag written with the rosbags library is republished over DDS, messages intact."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.ros


def _write_bag(path: Path, n: int = 5) -> list:
    from rclpy.serialization import serialize_message
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    from langgs_ros.ros.conversions import sec_to_stamp

    store = get_typestore(Stores.ROS2_KILTED)
    msgs = []
    with Writer(path, version=9) as writer:
        conn = writer.add_connection("/camera/image", "sensor_msgs/msg/Image", typestore=store)
        for i in range(n):
            rgb = np.full((6, 8, 3), 20 * i, np.uint8)
            msg = Image(header=Header(stamp=sec_to_stamp(100.0 + 0.05 * i), frame_id="cam"), height=6, width=8,
                        encoding="rgb8", step=24, data=rgb.tobytes())
            msgs.append(msg)
            writer.write(conn, int((100.0 + 0.05 * i) * 1e9), serialize_message(msg))
    return msgs


def test_bag_replay_republishes_recorded_messages(spinning_executor, tmp_path) -> None:
    from rclpy.node import Node
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from langgs_ros.ros.replay import BagReplay

    bag = tmp_path / "bag"
    sent = _write_bag(bag)
    ctx = spinning_executor.executor.context
    got: list = []
    sub = spinning_executor.add(Node("bag_sub", context=ctx))
    sub.create_subscription(Image, "/camera/image", got.append, qos_profile_sensor_data)
    replay = spinning_executor.add(BagReplay(bag, context=ctx))
    deadline = time.monotonic() + 30
    while replay.pubs and next(iter(replay.pubs.values())).get_subscription_count() == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    assert replay.run(rate=1.0) == len(sent)
    deadline = time.monotonic() + 10
    while len(got) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [m.data.tobytes() if hasattr(m.data, "tobytes") else bytes(m.data) for m in got] == \
        [bytes(m.data) for m in sent]
    assert [m.header.stamp.nanosec for m in got] == [m.header.stamp.nanosec for m in sent]


def test_bag_without_wanted_topics_is_refused(spinning_executor, tmp_path) -> None:
    from langgs_ros.ros.replay import BagReplay

    bag = tmp_path / "bag"
    _write_bag(bag, n=1)
    with pytest.raises(ValueError, match="none of the requested topics"):
        BagReplay(bag, topics={"/other": "/other"}, context=spinning_executor.executor.context)
