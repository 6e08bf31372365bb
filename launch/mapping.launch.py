"""Launch the langgs_ros mapping node (and optionally RViz).

    ros2 launch langgs_ros mapping.launch.py \
        params_file:=/path/to/mapping.yaml namespace:=robot1 use_sim_time:=false rviz:=true \
        image:=/camera/color/image_raw camera_info:=/camera/color/camera_info \
        depth:=/camera/aligned_depth_to_color/image_raw odom:=/odom labels:=/camera/labels
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare("langgs_ros")
    args = [
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution([share, "config", "mapping.yaml"]),
                              description="Parameter file of mapping_node"),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node and its topics"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="Use /clock (bags, simulators)"),
        DeclareLaunchArgument("rviz", default_value="false", description="Start RViz with config/langgs.rviz"),
        DeclareLaunchArgument("image", default_value="/camera/color/image_raw", description="Colour image topic"),
        DeclareLaunchArgument("camera_info", default_value="/camera/color/camera_info", description="CameraInfo topic"),
        DeclareLaunchArgument("depth", default_value="/camera/aligned_depth_to_color/image_raw",
                              description="Depth image topic (16UC1 mm or 32FC1 m), registered to colour"),
        DeclareLaunchArgument("labels", default_value="/camera/labels",
                              description="Label image topic (labels source)"),
        DeclareLaunchArgument("odom", default_value="/odom", description="Odometry topic (pose_source odometry)"),
    ]
    node = Node(
        package="langgs_ros",
        executable="mapping_node",
        name="mapping_node",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        parameters=[LaunchConfiguration("params_file"), {"use_sim_time": LaunchConfiguration("use_sim_time")}],
        remappings=[
            ("image", LaunchConfiguration("image")),
            ("camera_info", LaunchConfiguration("camera_info")),
            ("depth", LaunchConfiguration("depth")),
            ("labels", LaunchConfiguration("labels")),
            ("odom", LaunchConfiguration("odom")),
        ],
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        name="rviz2",
        arguments=["-d", PathJoinSubstitution([share, "config", "langgs.rviz"])],
        parameters=[{"use_sim_time": LaunchConfiguration("use_sim_time")}],
        condition=IfCondition(LaunchConfiguration("rviz")),
    )
    return LaunchDescription([*args, node, rviz])
