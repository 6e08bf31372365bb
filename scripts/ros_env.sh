# shellcheck shell=bash
# Source in bash after scripts/setup_env.sh:   . scripts/ros_env.sh
#
# Makes this checkout's ROS 2 development environment usable from a shell, a test run or a script:
# - the ROS 2 packages PyPI lacks, built by setup_env.sh into <venv>/ros_vendor (tf2_ros, launch, launch_ros, the
#   `ros2` command with launch/service/topic/param/node/lifecycle/interface/pkg/run, vision_msgs, ...): its colcon
#   local_setup.bash prepends them to PATH, PYTHONPATH, LD_LIBRARY_PATH and AMENT_PREFIX_PATH. Where a system ROS
#   provides them instead (a robot's /opt/ros, already sourced), that one is used as it is;
# - langgs_ros itself in the ament index (build/ament_overlay, see scripts/ament_overlay.sh): share/langgs_ros
#   (launch, config) and lib/langgs_ros/{mapping_node,replay_node} of this checkout;
# - the venv: <venv>/bin on PATH, <venv> on AMENT_PREFIX_PATH (the ROS wheels' packages and langgs_ros' msg/srv);
# - loopback-only DDS defaults, each only when unset: ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and
#   FASTDDS_DEFAULT_PROFILES_FILE=build/fastdds_loopback.xml, written by langgs_ros/ros/dds_env.py (always required on development
#   machines and CI). ROS_DOMAIN_ID is left to the caller: tests, demos and benchmarks set their own.
# `ros2` subcommands that talk to the graph (topic, service list, param, node, lifecycle) start a background daemon
# unless given --no-daemon: scripts and tests pass --no-daemon (or run `ros2 daemon stop` when done).
#
# VENV=path overrides .venv, ROS_VENDOR=path the vendor prefix. Returns 1 (with a message) when the ROS packages
# are missing. Safe to source twice (paths are prepended once).

# The caller's shell options (set -eu in scripts) are restored at the end; colcon's scripts need them off.
_langgs_opts="$-"
set +eu
_langgs_done() {  # forget the helpers, restore the caller's shell options
  unset _langgs_root _langgs_venv _langgs_vendor
  unset -f _langgs_prepend _langgs_append
  case "$_langgs_opts" in *e*) set -e ;; esac
  case "$_langgs_opts" in *u*) set -u ;; esac
  unset _langgs_opts
}
_langgs_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_langgs_venv="$(cd "${VENV:-$_langgs_root/.venv}" 2>/dev/null && pwd)" || {
  echo "ros_env.sh: no virtual environment at ${VENV:-$_langgs_root/.venv}: run scripts/setup_env.sh first" >&2
  _langgs_done; unset -f _langgs_done; return 1
}
_langgs_vendor="${ROS_VENDOR:-$_langgs_venv/ros_vendor}"

_langgs_prepend() {  # $1: variable name, $2: path; moves $2 to the front, drops empty entries
  local old="${!1:-}" out="$2" p
  local IFS=:
  for p in $old; do [ -n "$p" ] && [ "$p" != "$2" ] && out="$out:$p"; done
  export "$1=$out"
}
_langgs_append() {  # $1: variable name, $2: path; appended when absent
  case ":${!1:-}:" in *":$2:"*) ;; *) export "$1=${!1:+${!1}:}$2" ;; esac
}

if [ -f "$_langgs_vendor/local_setup.bash" ]; then
  _langgs_prev_prefix="${COLCON_CURRENT_PREFIX-}"
  COLCON_CURRENT_PREFIX="$_langgs_vendor"
  # shellcheck disable=SC1091
  . "$_langgs_vendor/local_setup.bash"
  if [ -n "$_langgs_prev_prefix" ]; then COLCON_CURRENT_PREFIX="$_langgs_prev_prefix"; else unset COLCON_CURRENT_PREFIX; fi
  unset _langgs_prev_prefix
elif ! { command -v ros2 >/dev/null && [ -n "${ROS_DISTRO:-}" ]; }; then
  echo "ros_env.sh: the ROS 2 packages PyPI lacks are not built ($_langgs_vendor missing) and no system ROS is" \
       "sourced: run scripts/setup_env.sh (it builds them from ../shared/vendor/ros2) or source /opt/ros/<distro>/setup.bash" >&2
  _langgs_done; unset -f _langgs_done; return 1
fi

VENV="$_langgs_venv" bash "$_langgs_root/scripts/ament_overlay.sh"  # refreshes the links (new launch/config files)
_langgs_prepend AMENT_PREFIX_PATH "$_langgs_root/build/ament_overlay"
_langgs_append AMENT_PREFIX_PATH "$_langgs_venv"
_langgs_prepend PATH "$_langgs_venv/bin"
if [ -d "$_langgs_vendor/bin" ]; then _langgs_prepend PATH "$_langgs_vendor/bin"; fi
# colcon's scripts leave a trailing ':' (an empty entry: the current directory); drop it
if [ -n "${LD_LIBRARY_PATH:-}" ]; then _langgs_prepend LD_LIBRARY_PATH "${LD_LIBRARY_PATH%%:*}"; fi
if [ -n "${PYTHONPATH:-}" ]; then _langgs_prepend PYTHONPATH "${PYTHONPATH%%:*}"; fi

export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
if [ -z "${FASTDDS_DEFAULT_PROFILES_FILE:-}" ]; then
    FASTDDS_DEFAULT_PROFILES_FILE="$("$_langgs_venv/bin/python" "$_langgs_root/langgs_ros/ros/dds_env.py" \
        "$_langgs_root/build/fastdds_loopback.xml")" || {
        echo "ros_env.sh: cannot write the loopback DDS profile" >&2; _langgs_done; unset -f _langgs_done; return 1; }
fi
export FASTDDS_DEFAULT_PROFILES_FILE

_langgs_done
unset -f _langgs_done
