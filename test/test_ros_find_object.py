"""A real FindObject call between two processes over (loopback-only) DDS."""

from __future__ import annotations

import os

import pytest
from ros_helpers import call_service, start_node_process, stop_process

pytestmark = pytest.mark.ros


def test_find_object_across_processes_on_an_empty_map(spinning_executor, tmp_path, ros_domain) -> None:
    from rclpy.node import Node

    from langgs_ros.srv import FindObject

    assert os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    assert os.environ["ROS_DOMAIN_ID"] == str(ros_domain)
    proc = start_node_process({"backend": "rgbd", "semantic_source": "labels", "pose_source": "odometry"},
                              log_path=tmp_path / "node.log")
    try:
        client = spinning_executor.add(Node("find_object_client", context=spinning_executor.executor.context))
        resp = call_service(client, FindObject, "/find_object", FindObject.Request(query="red backpack"), timeout=90)
        assert resp.success is False
        assert resp.message == "map is empty"
        assert list(resp.objects) == []
        resp = call_service(client, FindObject, "/find_object", FindObject.Request(query="   "))
        assert resp.success is False and "empty" in resp.message
        resp = call_service(client, FindObject, "/find_object", FindObject.Request(query="x" * 10_000))
        assert resp.success is False and "too long" in resp.message
        assert proc.poll() is None, "the node died"
    finally:
        code = stop_process(proc)
        log = (tmp_path / "node.log").read_text()
    assert code == 0, log[-3000:]
