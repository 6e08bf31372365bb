"""ROS 2 layer of langgs_ros (rclpy nodes, message conversions, replay). Imports rclpy lazily per module."""
