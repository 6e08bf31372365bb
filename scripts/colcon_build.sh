#!/usr/bin/env bash
# Build langgs_ros with colcon (ament_cmake: rosidl interfaces + Python package + launch/config) against the
# ROS 2 Kilted wheels in .venv, as a robot's `colcon build` would against /opt/ros. Output: build/colcon/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
OUT="${COLCON_OUT:-$ROOT/build/colcon}"
mkdir -p "$OUT/src"
# colcon crawls a source folder; a link keeps the build out of the repository tree.
ln -sfn "$ROOT" "$OUT/src/langgs_ros"
cd "$OUT"
export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV" PATH="$VENV/bin:$PATH"
"$VENV/bin/colcon" --log-base "$OUT/log" build --base-paths src --build-base "$OUT/build" \
  --install-base "$OUT/install" --event-handlers console_direct- \
  --cmake-args -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF
echo "colcon build ok: $OUT/install"
