#!/usr/bin/env bash
# `make demo [DATA=folder] [DEMO_ARGS="--device cpu --part2 no ..."]`: see scripts/demo.py (--help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# `ros2 launch` and the ament index of this checkout (scripts/ros_env.sh); without them demo.py says so and starts
# the node directly.
# shellcheck disable=SC1091
. "$ROOT/scripts/ros_env.sh" || echo "[demo] no ROS 2 command line (see above)"
DATA="${1:-}"
shift || true
exec "${VENV:-$ROOT/.venv}/bin/python" "$ROOT/scripts/demo.py" ${DATA:+"$DATA"} "$@"
