"""Packaging: package.xml, layout, config/launch consistency, and a real colcon build against the ROS wheels."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from ros_helpers import require_vendor_module

ROOT = Path(__file__).resolve().parents[1]


def test_layout_matches_design_card() -> None:
    for rel in ("package.xml", "CMakeLists.txt", "setup.py", "langgs_ros", "langgs_ros/ros", "launch", "config",
                "msg", "srv", "test", "bench", "README.md", ".ci/run", "launch/mapping.launch.py",
                "config/mapping.yaml", "config/mapping_labels.yaml", "config/langgs.rviz"):
        assert (ROOT / rel).exists(), rel


def test_package_xml_is_format3_ament_cmake_interface_package() -> None:
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.tag == "package" and root.get("format") == "3"
    assert root.findtext("name") == "langgs_ros"
    assert root.find("export/build_type").text == "ament_cmake"
    assert "rosidl_interface_packages" in [e.text for e in root.findall("member_of_group")]
    build_tools = {e.text for e in root.findall("buildtool_depend")}
    assert {"ament_cmake", "rosidl_default_generators"} <= build_tools
    deps = {e.text for tag in ("depend", "exec_depend") for e in root.findall(tag)}
    assert {"rclpy", "sensor_msgs", "geometry_msgs", "nav_msgs", "visualization_msgs", "diagnostic_msgs",
            "std_srvs", "rosidl_default_runtime", "cv_bridge", "launch_ros"} <= deps


# The robot default differs from the node's built-in defaults only here (the node's defaults suit tests and
# scripts that pass their own settings; a robot gets open-vocabulary semantics on its best device).
ROBOT_DEFAULTS = {"semantic_source": "clip_sam", "device": "auto", "pose_source": "auto", "backend": "rgbd"}


def test_config_yaml_declares_exactly_the_node_parameters() -> None:
    """config/mapping.yaml (robot default, keyed /** for any namespace) names every declared parameter, with the
    declared default's type and value, except the robot settings above."""
    from langgs_ros.ros import mapping_node
    from langgs_ros.ros.params_file import read_params_file

    assert list(yaml.safe_load((ROOT / "config" / "mapping.yaml").read_text())) == ["/**"]
    flat = read_params_file(ROOT / "config" / "mapping.yaml")
    declared = {k: spec.default for k, spec in mapping_node.PARAMETERS.items()}
    assert set(flat) == set(declared), (set(flat) ^ set(declared))
    for name, value in flat.items():
        assert type(value) is type(declared[name]), (name, value, declared[name])
        if name in ROBOT_DEFAULTS:
            assert value == ROBOT_DEFAULTS[name], (name, value)
        else:
            assert value == declared[name], (name, value, declared[name])


def test_labels_params_file_names_only_declared_parameters() -> None:
    """config/mapping_labels.yaml (demo, tests, simulators): /**-keyed, declared names and types, labels + odometry."""
    from langgs_ros.ros import mapping_node
    from langgs_ros.ros.params_file import read_params_file

    assert list(yaml.safe_load((ROOT / "config" / "mapping_labels.yaml").read_text())) == ["/**"]
    flat = read_params_file(ROOT / "config" / "mapping_labels.yaml")
    for name, value in flat.items():
        assert name in mapping_node.PARAMETERS, name
        assert type(value) is type(mapping_node.PARAMETERS[name].default), (name, value)
    assert flat["semantic_source"] == "labels" and flat["pose_source"] == "odometry"


def test_params_file_round_trip(tmp_path: Path) -> None:
    """write_params_file layers dotted overrides over a shipped file; rcl's nesting (window: {size}) is kept."""
    from langgs_ros.ros.params_file import read_params_file, write_params_file

    out = write_params_file(tmp_path / "p.yaml", {"window.size": 3, "device": "cpu"},
                            base=ROOT / "config" / "mapping_labels.yaml")
    data = yaml.safe_load(out.read_text())
    assert data["/**"]["ros__parameters"]["window"] == {"size": 3}
    flat = read_params_file(out)
    assert flat["window.size"] == 3 and flat["queue.max_frames"] == 500 and flat["semantic_source"] == "labels"
    with pytest.raises(ValueError):
        write_params_file(tmp_path / "bad.yaml", {"window": 1, "window.size": 2})


LAUNCH_ARGUMENTS = {"params_file", "namespace", "use_sim_time", "autostart", "respawn", "respawn_delay", "log_level",
                    "rviz", "rviz_config", "image", "camera_info", "depth", "labels", "odom"}


def _launch_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mapping_launch", ROOT / "launch" / "mapping.launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launch_file_declares_documented_arguments() -> None:
    """The launch file's real LaunchDescription declares the documented arguments (README's table)."""
    require_vendor_module("launch_ros")
    from launch.actions import DeclareLaunchArgument

    desc = _launch_module().generate_launch_description()
    declared = {e.name: e for e in desc.entities if isinstance(e, DeclareLaunchArgument)}
    assert LAUNCH_ARGUMENTS <= set(declared)
    assert declared["respawn"].default_value[0].text == "true"
    assert declared["autostart"].default_value[0].text == "true"
    readme = (ROOT / "README.md").read_text()
    for name in LAUNCH_ARGUMENTS:
        assert f"`{name}`" in readme, f"launch argument {name} is not documented in README.md"


def test_launch_moves_rviz_topics_into_the_namespace() -> None:
    """RViz configs hold no substitutions: the launch file rewrites the absolute topics of config/langgs.rviz."""
    require_vendor_module("launch_ros")
    module = _launch_module()
    text = (ROOT / "config" / "langgs.rviz").read_text()
    topics = re.findall(r"^\s*Value:\s*(/\S+)", text, flags=re.MULTILINE)
    assert "/mapping_node/gaussians" in topics and "/goal_pose" in topics
    moved = re.findall(r"^\s*Value:\s*(/\S+)", module.namespaced_rviz_config(text, "/robot1/"), flags=re.MULTILINE)
    assert moved == ["/robot1" + t for t in topics]
    assert module.namespaced_rviz_config(text, "") == text
    # everything but the topic names is unchanged
    assert module.namespaced_rviz_config(text, "robot1").replace("/robot1/", "/") == text


@pytest.mark.slow
def test_colcon_build_with_pip_installed_ros(tmp_path: Path) -> None:
    """`colcon build` (ament_cmake) of the package succeeds and its install space imports on its own."""
    env = dict(os.environ, COLCON_OUT=str(tmp_path / "ws"))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "colcon_build.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    install = tmp_path / "ws" / "install" / "langgs_ros"
    site = install / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert (install / "lib" / "langgs_ros" / "mapping_node").is_file()
    assert (install / "share" / "langgs_ros" / "launch" / "mapping.launch.py").is_file()
    assert (install / "share" / "langgs_ros" / "config" / "mapping.yaml").is_file()
    code = ("import langgs_ros, langgs_ros.pipeline; from langgs_ros.srv import FindObject; "
            "print(langgs_ros.__file__); print(FindObject.__module__)")
    ld = f"{install / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}"
    env = dict(os.environ, PYTHONPATH=str(site), LD_LIBRARY_PATH=ld)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert str(site) in out.stdout.splitlines()[0]
