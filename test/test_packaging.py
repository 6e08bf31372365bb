"""Packaging: package.xml, layout, config/launch consistency, and a real colcon build against the ROS wheels."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_layout_matches_design_card() -> None:
    for rel in ("package.xml", "CMakeLists.txt", "setup.py", "langgs_ros", "langgs_ros/ros", "launch", "config",
                "msg", "srv", "test", "bench", "README.md", ".ci/run", "launch/mapping.launch.py",
                "config/mapping.yaml", "config/langgs.rviz"):
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


def test_config_yaml_declares_exactly_the_node_parameters() -> None:
    """config/mapping.yaml and the node's declared parameters agree (names and default values)."""
    from langgs_ros.ros import mapping_node

    data = yaml.safe_load((ROOT / "config" / "mapping.yaml").read_text())
    params = data["mapping_node"]["ros__parameters"]

    def flatten(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flatten(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    flat = flatten(params)
    declared = {k: v for k, (v, _) in mapping_node.PARAMETERS.items()}
    assert flat == declared


def test_launch_file_declares_documented_arguments() -> None:
    tree = ast.parse((ROOT / "launch" / "mapping.launch.py").read_text())
    names = {node.args[0].value for node in ast.walk(tree)
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "DeclareLaunchArgument"}
    assert {"params_file", "namespace", "use_sim_time", "rviz", "image", "camera_info", "depth", "odom"} <= names


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
