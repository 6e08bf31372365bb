"""The mapping node as a managed lifecycle node and its parameter rules, over loopback DDS in two processes.

The node runs as its own process (``autostart: false`` so a lifecycle manager — here the test — drives it through
the standard ``lifecycle_msgs`` services, as Nav2's lifecycle manager does); parameters are set with the standard
``rcl_interfaces`` SetParameters service, as ``ros2 param set`` does.
"""

from __future__ import annotations

import time

import pytest
from ros_helpers import DiagnosticsWatcher, call_service, require_ros2_cli, ros2, start_node_process, stop_process

pytestmark = [pytest.mark.ros, pytest.mark.slow]

NODE = "lifecycle_mapping_node"


@pytest.fixture
def client(spinning_executor):
    from rclpy.node import Node

    node = spinning_executor.add(Node("lifecycle_test_client", context=spinning_executor.executor.context))
    node.diag = DiagnosticsWatcher(node)
    return node


def get_state(client) -> str:
    from lifecycle_msgs.srv import GetState

    return call_service(client, GetState, f"/{NODE}/get_state", GetState.Request(), timeout=60).current_state.label


def change_state(client, transition_id: int) -> bool:
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    req = ChangeState.Request(transition=Transition(id=transition_id))
    return call_service(client, ChangeState, f"/{NODE}/change_state", req, timeout=120).success


def set_param(client, name: str, value):
    """SetParameters on the node; returns the SetParametersResult (successful, reason)."""
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter

    req = SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()])
    return call_service(client, SetParameters, f"/{NODE}/set_parameters", req).results[0]


def get_param(client, name: str):
    from rcl_interfaces.srv import GetParameters
    from rclpy.parameter import parameter_value_to_python

    resp = call_service(client, GetParameters, f"/{NODE}/get_parameters", GetParameters.Request(names=[name]))
    return parameter_value_to_python(resp.values[0])


def service_exists(client, name: str, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(n == name for n, _ in client.get_service_names_and_types()):
            return True
        time.sleep(0.1)
    return False


def wait_service_gone(client, name: str, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(n != name for n, _ in client.get_service_names_and_types()):
            return True
        time.sleep(0.1)
    return False


def test_lifecycle_transitions_and_parameter_rules(client, tmp_path) -> None:
    from lifecycle_msgs.msg import Transition

    from langgs_ros.srv import FindObject

    proc = start_node_process({"autostart": False, "backend": "rgbd", "semantic_source": "labels",
                               "pose_source": "odometry", "map_dir": str(tmp_path / "maps")},
                              node_name=NODE, log_path=tmp_path / "node.log")
    try:
        assert get_state(client) == "unconfigured"
        assert not service_exists(client, "/find_object", timeout=1.0)
        # configure-time parameters may change while unconfigured; invalid values never
        assert set_param(client, "window.size", 4).successful
        bad = set_param(client, "window.overlap", 4)
        assert not bad.successful and "window.size" in bad.reason
        assert not set_param(client, "backend", "nerf").successful
        assert get_param(client, "backend") == "rgbd"

        assert change_state(client, Transition.TRANSITION_CONFIGURE)
        assert get_state(client) == "inactive"
        assert not service_exists(client, "/find_object", timeout=1.0)
        assert change_state(client, Transition.TRANSITION_ACTIVATE)
        assert get_state(client) == "active"
        resp = call_service(client, FindObject, "/find_object", FindObject.Request(query="chair"))
        assert not resp.success and resp.message == "map is empty"

        # run time: configure-time parameters are refused with the reason, invalid values are refused and not stored
        r = set_param(client, "window.size", 2)
        assert not r.successful and "configure" in r.reason
        assert get_param(client, "window.size") == 4
        r = set_param(client, "map_frame", "odom")
        assert not r.successful and "configure" in r.reason
        assert not set_param(client, "sync_tolerance", -1.0).successful
        assert get_param(client, "sync_tolerance") == pytest.approx(0.05)
        assert not set_param(client, "publish.max_points", -1).successful
        assert get_param(client, "publish.max_points") == 2_000_000
        assert not set_param(client, "autostart", False).successful  # read-only
        r = set_param(client, "query.min_score", 0.3)
        assert r.successful, r.reason
        assert get_param(client, "query.min_score") == pytest.approx(0.3)
        assert set_param(client, "sync_tolerance", 0.01).successful

        assert change_state(client, Transition.TRANSITION_DEACTIVATE)
        assert get_state(client) == "inactive"
        assert wait_service_gone(client, "/find_object")
        assert change_state(client, Transition.TRANSITION_CLEANUP)
        assert get_state(client) == "unconfigured"

        # an error while configuring (a missing label file) goes through the error transition back to unconfigured
        assert set_param(client, "label_names_file", str(tmp_path / "missing.json")).successful
        assert not change_state(client, Transition.TRANSITION_CONFIGURE)
        assert get_state(client) == "unconfigured"
        deadline = time.monotonic() + 20
        while "configure failed" not in client.diag.values.get("last_fault", "") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "missing.json" in client.diag.values.get("last_fault", "")
        # fixed, it configures and activates again
        assert set_param(client, "label_names_file", "").successful
        assert change_state(client, Transition.TRANSITION_CONFIGURE)
        assert change_state(client, Transition.TRANSITION_ACTIVATE)
        assert get_state(client) == "active"
        assert proc.poll() is None
    finally:
        assert stop_process(proc) == 0, (tmp_path / "node.log").read_text()[-3000:]


def test_ros2_lifecycle_cli_drives_the_node(client, tmp_path) -> None:
    """``ros2 lifecycle get/set`` (the real ros2lifecycle CLI, as an operator or a launch file uses it)."""
    require_ros2_cli()
    from langgs_ros.srv import FindObject

    proc = start_node_process({"autostart": False, "backend": "rgbd", "semantic_source": "labels",
                               "pose_source": "odometry", "map_dir": str(tmp_path / "maps")},
                              node_name=NODE, log_path=tmp_path / "node.log")
    cli = ("--no-daemon", "--spin-time", "5")
    try:
        assert get_state(client) == "unconfigured"  # the node is up
        out = ros2("lifecycle", "get", *cli, f"/{NODE}")
        assert out.returncode == 0 and out.stdout.startswith("unconfigured"), out.stdout + out.stderr
        for transition in ("configure", "activate"):
            out = ros2("lifecycle", "set", *cli, f"/{NODE}", transition)
            assert out.returncode == 0 and "Transitioning successful" in out.stdout, out.stdout + out.stderr
        out = ros2("lifecycle", "get", *cli, f"/{NODE}")
        assert out.stdout.startswith("active"), out.stdout + out.stderr
        resp = call_service(client, FindObject, "/find_object", FindObject.Request(query="chair"))
        assert not resp.success and resp.message == "map is empty"
        out = ros2("lifecycle", "set", *cli, f"/{NODE}", "deactivate")
        assert out.returncode == 0 and "Transitioning successful" in out.stdout, out.stdout + out.stderr
        assert get_state(client) == "inactive"
    finally:
        assert stop_process(proc) == 0, (tmp_path / "node.log").read_text()[-3000:]
