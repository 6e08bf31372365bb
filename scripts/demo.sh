#!/usr/bin/env bash
# `make demo [DATA=folder]`: see scripts/demo.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# `ros2 launch` and the ament index of this checkout (scripts/ros_env.sh); without them demo.py says so and starts
# the node directly.
# shellcheck disable=SC1091
. "$ROOT/scripts/ros_env.sh" || echo "[demo] no ROS 2 command line (see above)"
exec "${VENV:-$ROOT/.venv}/bin/python" "$ROOT/scripts/demo.py" ${1:+"$1"}
