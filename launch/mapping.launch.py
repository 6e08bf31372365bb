"""Launch the langgs_ros mapping node (and optionally RViz).

    ros2 launch langgs_ros mapping.launch.py \
        params_file:=/path/to/mapping.yaml namespace:=robot1 use_sim_time:=false autostart:=true \
        respawn:=true respawn_delay:=2.0 log_level:=info rviz:=true \
        image:=camera/color/image_raw camera_info:=camera/color/camera_info \
        depth:=camera/aligned_depth_to_color/image_raw odom:=odom labels:=camera/labels

Topic arguments are remaps of the node's ``image``, ``camera_info``, ``depth``, ``labels`` and ``odom`` inputs.
Relative names (the defaults) resolve inside ``namespace`` (``/robot1/camera/color/image_raw``); absolute names
(``/camera/...``) are used as they are. The node is ``<namespace>/mapping_node``: its services are
``<namespace>/find_object`` and ``<namespace>/mapping_node/{save_map,load_map,reset}``, its outputs
``<namespace>/mapping_node/{gaussians,objects,query_markers,camera_path}``. The params file is keyed ``/**:`` so
that it applies under any namespace and node name. With ``respawn:=true`` a node that died (crash, kill) is
started again after ``respawn_delay`` seconds; a clean shutdown of the launch stops it for good. RViz loads
``rviz_config`` (default ``config/langgs.rviz``) with its absolute topics moved into ``namespace``.
"""

from __future__ import annotations

import os
import re
import tempfile

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

TOPIC_ARGUMENTS = {
    "image": ("camera/color/image_raw", "Colour image topic (rgb8/bgr8/mono8)"),
    "camera_info": ("camera/color/camera_info", "CameraInfo topic of the colour camera"),
    "depth": ("camera/aligned_depth_to_color/image_raw",
              "Depth image topic (16UC1 mm or 32FC1 m), registered to colour"),
    "labels": ("camera/labels", "Label image topic (semantic_source labels: 16UC1/32SC1 instance ids)"),
    "odom": ("odom", "Odometry topic (pose_source odometry)"),
}


def _true(value: str) -> bool:
    """A launch argument string as a bool (true/false, 1/0, yes/no, on/off)."""
    v = value.strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


def namespaced_rviz_config(text: str, namespace: str) -> str:
    """Move every absolute ``Topic`` / ``Value: /...`` name of an RViz config into ``namespace``.

    RViz configs cannot hold substitutions, so the launch writes a copy with ``/mapping_node/gaussians`` ->
    ``/robot1/mapping_node/gaussians`` (and ``/goal_pose`` -> ``/robot1/goal_pose``). An empty namespace returns
    ``text`` unchanged.
    """
    ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
    if not ns:
        return text
    return re.sub(r"^(\s*Value:\s*)/(?!/)", lambda m: f"{m.group(1)}{ns}/", text, flags=re.MULTILINE)


def _launch_setup(context: LaunchContext) -> list:
    arg = {name: LaunchConfiguration(name).perform(context) for name in (
        "params_file", "namespace", "use_sim_time", "autostart", "respawn", "respawn_delay", "log_level", "rviz",
        "rviz_config", *TOPIC_ARGUMENTS)}
    namespace = arg["namespace"].strip("/")
    use_sim_time = _true(arg["use_sim_time"])
    node = Node(
        package="langgs_ros",
        executable="mapping_node",
        name="mapping_node",
        namespace=namespace,
        output="screen",
        emulate_tty=False,
        respawn=_true(arg["respawn"]),
        respawn_delay=float(arg["respawn_delay"]),
        parameters=[arg["params_file"], {"use_sim_time": use_sim_time, "autostart": _true(arg["autostart"])}],
        remappings=[(name, arg[name]) for name in TOPIC_ARGUMENTS],
        ros_arguments=["--log-level", arg["log_level"]],
    )
    actions = [node]
    if _true(arg["rviz"]):
        config = arg["rviz_config"]
        if namespace:
            with open(config) as f:
                text = namespaced_rviz_config(f.read(), namespace)
            fd, config = tempfile.mkstemp(prefix=f"langgs_{namespace.replace('/', '_')}_", suffix=".rviz")
            with os.fdopen(fd, "w") as f:
                f.write(text)
        actions.append(Node(package="rviz2", executable="rviz2", name="rviz2", namespace=namespace,
                            arguments=["-d", config], parameters=[{"use_sim_time": use_sim_time}], output="screen"))
    return actions


def generate_launch_description() -> LaunchDescription:
    """The launch description: arguments above, then mapping_node (and RViz) built from their values."""
    share = FindPackageShare("langgs_ros")
    args = [
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution([share, "config", "mapping.yaml"]),
                              description="Parameter file of mapping_node (keyed /**: so any namespace applies)"),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node and its topics"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="Use /clock (bags, simulators)"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="Configure and activate the (lifecycle) node on start"),
        DeclareLaunchArgument("respawn", default_value="true",
                              description="Start the node again when it dies (not after a clean shutdown)"),
        DeclareLaunchArgument("respawn_delay", default_value="2.0", description="s before a respawn"),
        DeclareLaunchArgument("log_level", default_value="info", description="Node log level (debug .. fatal)"),
        DeclareLaunchArgument("rviz", default_value="false", description="Start RViz with rviz_config"),
        DeclareLaunchArgument("rviz_config", default_value=PathJoinSubstitution([share, "config", "langgs.rviz"]),
                              description="RViz config (absolute topics are moved into namespace)"),
    ]
    args += [DeclareLaunchArgument(name, default_value=default, description=desc)
             for name, (default, desc) in TOPIC_ARGUMENTS.items()]
    return LaunchDescription([*args, OpaqueFunction(function=_launch_setup)])
