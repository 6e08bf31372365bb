"""The robot's own entry points over loopback DDS: ``ros2 launch langgs_ros mapping.launch.py`` with a params file
and remaps, real hololens frames replayed into it, ``ros2 service call .../find_object`` answered with an object in
its ground-truth box, ``ros2 param get``; the same under ``namespace:=robot1`` (the ``/**`` params file still
applies), and ``respawn`` bringing a killed node back. Needs the ROS 2 command line of ``scripts/ros_env.sh``
(built by ``scripts/setup_env.sh`` from ``../shared/vendor/ros2``); skipped without it, except on CI."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from ros_helpers import (
    DiagnosticsWatcher,
    group_processes,
    require_ros2_cli,
    ros2,
    ros2_daemons,
    start_launch,
    stop_process_group,
)

from langgs_ros.ros.params_file import CONFIG_DIR, read_params_file, write_params_file

pytestmark = [pytest.mark.ros, pytest.mark.slow]

BACKPACK_FRAMES = list(range(4, 14))  # 00019 .. 00055: sofa, backpack, lamp, plant in view
# Small windows for a 10-frame replay (the labels set-up of config/mapping_labels.yaml otherwise).
TEST_OVERRIDES = {"window.size": 4, "window.overlap": 1, "window_period": 1.0, "publish.gaussians_period": 0.5}

_OBJECT = re.compile(
    r"ObjectLocation\(instance_id=(?P<id>\d+), label=(?P<q>['\"])(?P<label>.*?)(?P=q), score=(?P<score>[^,]+), "
    r"pose=geometry_msgs\.msg\.PoseStamped\(header=std_msgs\.msg\.Header\(stamp=builtin_interfaces\.msg\.Time\("
    r"sec=\d+, nanosec=\d+\), frame_id='(?P<frame>[^']*)'\), pose=geometry_msgs\.msg\.Pose\(position="
    r"geometry_msgs\.msg\.Point\(x=(?P<x>[^,]+), y=(?P<y>[^,]+), z=(?P<z>[^)]+)\)")


def parse_find_object(stdout: str) -> dict:
    """``ros2 service call`` output of a FindObject response -> success, message, objects (label, frame, xyz)."""
    assert "response:" in stdout, stdout[-2000:]
    resp = stdout.split("response:", 1)[1]
    m = re.search(r"FindObject_Response\(success=(True|False), message=(['\"])(.*?)\2", resp)
    assert m, resp[:2000]
    objects = [{"label": o["label"], "frame": o["frame"], "score": float(o["score"]),
                "xyz": np.array([float(o["x"]), float(o["y"]), float(o["z"])])} for o in _OBJECT.finditer(resp)]
    return {"success": m.group(1) == "True", "message": m.group(3), "objects": objects}


def call_find_object(service: str, query: str, timeout: float = 120.0) -> dict:
    """``ros2 service call <service> langgs_ros/srv/FindObject "{query: ...}"`` (no daemon involved), parsed."""
    proc = ros2("service", "call", service, "langgs_ros/srv/FindObject", f"{{query: '{query}', max_results: 3}}",
                timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return parse_find_object(proc.stdout)


def param_get(node: str, name: str) -> str:
    """``ros2 param get --no-daemon --spin-time 5 <node> <name>`` (time for discovery) -> its printed value."""
    proc = ros2("param", "get", "--no-daemon", "--spin-time", "5", node, name, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().rsplit(" ", 1)[-1]


def wait_for_service(service: str, launch, log: Path, timeout: float = 180.0) -> None:
    """Wait until ``service`` is listed by ``ros2 service list --no-daemon`` (fails at once if ``launch`` exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert launch.poll() is None, f"ros2 launch exited ({launch.returncode}):\n" + log.read_text()[-3000:]
        proc = ros2("service", "list", "--no-daemon", "--spin-time", "2", timeout=120)
        if service in proc.stdout.split():
            return
        time.sleep(1.0)
    raise TimeoutError(f"{service} did not appear within {timeout} s:\n" + log.read_text()[-3000:])


def in_box(obj, xyz: np.ndarray, odom_from_world: np.ndarray) -> bool:
    """Whether a result centre (odom frame, z up) lies in the object's ground-truth box (world frame) + 10 cm."""
    world = np.linalg.inv(odom_from_world) @ np.array([*xyz, 1.0])
    return obj.contains(world[:3], margin=0.10)


@pytest.fixture
def cli(ros_domain):
    """The ``ros2`` command (skip/fail without it); after the test, asserts no CLI daemon was left on its domain."""
    exe = require_ros2_cli()
    yield exe
    left = ros2_daemons(ros_domain)
    if left:
        ros2("daemon", "stop", timeout=60)
    assert not left, f"a ros2 CLI daemon was started on domain {ros_domain} (pids {left}): pass --no-daemon"


@pytest.fixture
def labels_params(tmp_path, hololens_dir) -> Path:
    """config/mapping_labels.yaml with the hololens objects.json and small windows, as a ``/**`` params file."""
    return write_params_file(tmp_path / "params.yaml", base=CONFIG_DIR / "mapping_labels.yaml",
                             overrides={"label_names_file": str(hololens_dir / "annotations" / "objects.json"),
                                        **TEST_OVERRIDES})


def _replay(spinning_executor, hololens_seq, namespace: str):
    from rclpy.node import Node

    from langgs_ros.ros.replay import FolderReplay

    ctx = spinning_executor.executor.context
    replay = spinning_executor.add(FolderReplay(hololens_seq, namespace=namespace, context=ctx))
    client = spinning_executor.add(Node("launch_test_client", context=ctx))
    return replay, DiagnosticsWatcher(client)


def _map_and_query(replay, diag, service: str, hololens_seq, log: Path) -> None:
    assert replay.wait_for_subscribers(180), "the launched node never subscribed to the remapped topics:\n" + \
        log.read_text()[-3000:]
    replay.run(rate=5.0, indices=BACKPACK_FRAMES)
    values = diag.wait_idle(min_windows=3, timeout=300)
    assert int(values["map_instances"]) >= 3 and int(values["dropped_windows"]) == 0, values
    backpack = next(o for o in hololens_seq.objects if o.name == "red backpack")
    resp = call_find_object(service, "red backpack")
    assert resp["success"], resp
    assert 1 <= len(resp["objects"]) <= 3
    top = resp["objects"][0]
    # odometry-posed map: results are stamped in the odometry message's frame (REP-105), not in map
    assert top["label"] == "red backpack" and top["frame"] == replay.odom_frame
    assert in_box(backpack, top["xyz"], replay.odom_from_world), (top, backpack)


def test_params_files_are_keyed_for_any_namespace() -> None:
    """Both shipped params files use the ``/**`` wildcard (a ``mapping_node:`` key is dropped under a namespace)."""
    import yaml

    for name in ("mapping.yaml", "mapping_labels.yaml"):
        data = yaml.safe_load((CONFIG_DIR / name).read_text())
        assert list(data) == ["/**"], (name, list(data))
    labels = read_params_file(CONFIG_DIR / "mapping_labels.yaml")
    assert labels["semantic_source"] == "labels" and labels["pose_source"] == "odometry"


def test_ros2_launch_with_params_file_and_remaps_answers_ros2_service_call(
        cli, ros_domain, spinning_executor, hololens_seq, labels_params, tmp_path) -> None:
    """``ros2 launch`` + params file + absolute remaps into the replay's namespace; ``ros2 service call``."""
    log = tmp_path / "launch.log"
    replay, diag = _replay(spinning_executor, hololens_seq, "cam")
    remaps = [f"{t}:=/cam/{t}" for t in ("image", "camera_info", "depth", "labels", "odom")]
    proc = start_launch([f"params_file:={labels_params}", "respawn:=false", *remaps], log)
    try:
        wait_for_service("/find_object", proc, log)
        resp = call_find_object("/find_object", "red backpack")
        assert not resp["success"] and resp["message"] == "map is empty", resp
        assert param_get("/mapping_node", "window.size") == "4"
        assert param_get("/mapping_node", "semantic_source") == "labels"
        _map_and_query(replay, diag, "/find_object", hololens_seq, log)
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        stop_process_group(proc)
    text = log.read_text()
    assert "Traceback" not in text and "process has died" not in text, text[-3000:]


def test_ros2_launch_under_namespace_keeps_params_file_and_respawns(
        cli, ros_domain, spinning_executor, hololens_seq, labels_params, tmp_path) -> None:
    """``namespace:=robot1``: relative remaps resolve inside it, the ``/**`` params file still applies, the service
    is ``/robot1/find_object``; a killed node is respawned (``respawn`` defaults to true) and answers again."""
    log = tmp_path / "launch.log"
    replay, diag = _replay(spinning_executor, hololens_seq, "robot1/cam")
    remaps = [f"{t}:=cam/{t}" for t in ("image", "camera_info", "depth", "labels", "odom")]
    proc = start_launch([f"params_file:={labels_params}", "namespace:=robot1", "respawn_delay:=0.5", *remaps], log)
    try:
        wait_for_service("/robot1/find_object", proc, log)
        assert param_get("/robot1/mapping_node", "semantic_source") == "labels"
        assert param_get("/robot1/mapping_node", "window.size") == "4"
        _map_and_query(replay, diag, "/robot1/find_object", hololens_seq, log)

        nodes = group_processes(proc.pid, "langgs_ros.ros.mapping_node")
        assert len(nodes) == 1, nodes
        os.kill(nodes[0], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            now = group_processes(proc.pid, "langgs_ros.ros.mapping_node")
            if now and now != nodes:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the killed node was not respawned:\n" + log.read_text()[-3000:])
        # the respawned node is a fresh one: its diagnostics report an empty map, and it answers on the same service
        count = diag.count
        deadline = time.monotonic() + 180
        while not (diag.count > count and diag.get("map_gaussians", -1) == 0):
            assert time.monotonic() < deadline, "no diagnostics from the respawned node:\n" + log.read_text()[-3000:]
            time.sleep(0.2)
        resp = call_find_object("/robot1/find_object", "red backpack")
        assert not resp["success"] and resp["message"] == "map is empty", resp
        assert proc.poll() is None
    finally:
        stop_process_group(proc)
    assert "process has died" in log.read_text()
