#!/usr/bin/env python3
"""Rewrite build-machine paths in the ROS 2 PyPI wheels' exported CMake files.

The ``ros-kilted-*`` wheels export CMake configs that point at the wheel builder's Python
(``/opt/python/cpXY-cpXY/include/pythonX.Y``) and numpy include folders. ``rosidl_generate_interfaces``
needs the real ones of the virtual environment. See ``../shared/docs/ros2-from-pip.md`` ("Custom msg/srv").

Usage: ``fix_ros_wheel_cmake.py VENV`` (run with the venv's own Python so numpy and sysconfig are its own).
"""

from __future__ import annotations

import re
import sys
import sysconfig
from pathlib import Path

import numpy


def main(venv: str) -> int:
    """Rewrite ``<venv>/share/**/*.cmake`` in place; returns the process exit code."""
    py_include = sysconfig.get_paths()["include"]
    np_include = numpy.get_include()
    py_pat = re.compile(r"/opt/python/cp\d+-cp\d+t?/include/python3\.\d+t?")
    np_pat = re.compile(r"/opt/python/cp\d+-cp\d+t?/lib/python3\.\d+t?/site-packages/numpy/(?:_core|core)/include")
    changed = 0
    for path in Path(venv, "share").rglob("*.cmake"):
        text = path.read_text(errors="surrogateescape")
        new = py_pat.sub(py_include, np_pat.sub(np_include, text))
        if new != text:
            path.write_text(new, errors="surrogateescape")
            changed += 1
    print(f"[fix_ros_wheel_cmake] python include {py_include}, numpy include {np_include}; {changed} files changed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
