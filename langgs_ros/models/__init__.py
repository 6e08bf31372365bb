"""Neural network models of langgs_ros (pure PyTorch, ROS-free).

Subpackages:

* :mod:`langgs_ros.models.vggt` — VGGT-compatible multi-view geometry backbone (arXiv 2503.11651).
"""
