"""Helpers for ROS tests: start the real mapping node in its own process and call its services over DDS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def start_node_process(params: dict[str, Any], node_name: str = "mapping_node", log_path: Path | None = None,
                       remaps: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m langgs_ros.ros.mapping_node`` with ``-p name:=value`` parameters in a new process.

    The process inherits this process's environment, which the test fixtures set to loopback-only DDS and the
    test's own ROS_DOMAIN_ID.
    """
    args = [sys.executable, "-m", "langgs_ros.ros.mapping_node", "--ros-args", "-r", f"__node:={node_name}"]
    for k, v in params.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, list | tuple):
            v = "[" + ",".join(str(x) for x in v) + "]"
        args += ["-p", f"{k}:={v}"]
    for a, b in (remaps or {}).items():
        args += ["-r", f"{a}:={b}"]
    out = open(log_path, "w") if log_path is not None else subprocess.DEVNULL
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                            start_new_session=True)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 20.0) -> int:
    """Send ``sig`` (SIGINT: clean ROS shutdown) and wait; SIGKILL after ``timeout`` s. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def call_service(node, srv_type, name: str, request, timeout: float = 60.0):
    """Call a service from ``node`` (spun by a background executor) and return the response.

    Raises:
        TimeoutError: the service did not appear or answer within ``timeout`` seconds.
    """
    client = node.create_client(srv_type, name)
    try:
        deadline = time.monotonic() + timeout
        while not client.wait_for_service(timeout_sec=0.5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"service {name} not available after {timeout} s")
        future = client.call_async(request)
        while not future.done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"service {name} did not answer within {timeout} s")
            time.sleep(0.01)
        return future.result()
    finally:
        node.destroy_client(client)


class DiagnosticsWatcher:
    """Keeps the latest ``mapping`` DiagnosticStatus values published by a mapping node on /diagnostics."""

    def __init__(self, node) -> None:
        from diagnostic_msgs.msg import DiagnosticArray

        self.values: dict[str, str] = {}
        self.count = 0
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on, 10)

    def _on(self, msg) -> None:
        for st in msg.status:
            if st.name.endswith("mapping"):
                self.values = {kv.key: kv.value for kv in st.values}
                self.count += 1

    def get(self, key: str, default: int = 0) -> int:
        """An integer value (0 when absent)."""
        try:
            return int(float(self.values.get(key, default)))
        except ValueError:
            return default

    def wait_idle(self, min_windows: int = 1, timeout: float = 180.0, stable_for: int = 3) -> dict[str, str]:
        """Wait until >= ``min_windows`` windows were processed and the queues (frames waiting for partners,
        frames, keyframes, windows) stayed empty with the worker not busy for ``stable_for`` consecutive
        diagnostics messages; returns the values.

        Raises:
            TimeoutError: not idle in time.
        """
        deadline = time.monotonic() + timeout
        stable, last_count, last_state = 0, self.count, None
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if self.count == last_count:
                continue
            last_count = self.count
            state = (self.get("processed_windows"), self.get("map_version"))
            idle = (self.get("queued_frames") == 0 and self.get("queued_windows") == 0
                    and self.get("pending_keyframes") == 0 and self.get("worker_busy") == 0
                    and self.get("sync.pending") == 0 and self.get("processed_windows") >= min_windows)
            stable = stable + 1 if idle and state == last_state else 0
            last_state = state
            if stable >= stable_for:
                return dict(self.values)
        raise TimeoutError(f"mapping node not idle after {timeout} s: {self.values}")


def process_rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


# ---- the ROS 2 command line (`ros2 launch`, `ros2 service call`, ...) from scripts/ros_env.sh ----------------------

ROS_ENV_HINT = ("the ROS 2 command line is not on PATH: run scripts/setup_env.sh (it builds tf2_ros, launch_ros and "
                "ros2cli from ../shared/vendor/ros2) and `. scripts/ros_env.sh`, or source a system ROS")


def require_vendor_module(name: str):
    """Import ``name`` (tf2_ros, launch_ros, vision_msgs, ...: what scripts/ros_env.sh makes importable); skip the
    test without it, except on CI (``CI=true``), where it fails: CI builds these packages."""
    import importlib

    import pytest

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} does not import ({exc}): {ROS_ENV_HINT}")
        pytest.skip(f"{name} does not import: {ROS_ENV_HINT}")


def require_ros2_cli() -> str:
    """Path of the ``ros2`` command whose ament index holds this checkout's langgs_ros; skips the test without it.

    On CI (``CI=true``) a missing command fails the test instead: CI builds the vendored packages, so these tests
    must run there. Raises ``pytest.fail``/``pytest.skip`` outcomes.
    """
    import shutil

    import pytest

    exe = shutil.which("ros2")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail(ROS_ENV_HINT)
        pytest.skip(ROS_ENV_HINT)
    share = subprocess.run([exe, "pkg", "prefix", "--share", "langgs_ros"], capture_output=True, text=True,
                           timeout=60)
    launch_file = Path(share.stdout.strip()) / "launch" / "mapping.launch.py"
    assert share.returncode == 0 and launch_file.resolve() == (REPO_ROOT / "launch" / "mapping.launch.py").resolve(), (
        f"`ros2 pkg prefix --share langgs_ros` is not this checkout ({share.stdout.strip()!r} {share.stderr[-500:]}):"
        " source this checkout's scripts/ros_env.sh")
    return exe


def ros2(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``ros2 <args>`` (environment of this process: loopback DDS, the test's ROS_DOMAIN_ID); returns it.

    Callers pass ``--no-daemon`` to graph verbs (param, node, topic, lifecycle) so that no CLI daemon is started.
    """
    return subprocess.run(["ros2", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=REPO_ROOT)


def start_launch(args: list[str], log_path: Path, launch_file: str = "mapping.launch.py") -> subprocess.Popen:
    """Start ``ros2 launch langgs_ros <launch_file> <args>`` in its own process group, output to ``log_path``."""
    return subprocess.Popen(["ros2", "launch", "langgs_ros", launch_file, *args], stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=REPO_ROOT,
                            start_new_session=True)


def stop_process_group(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """Stop ``ros2 launch`` and its nodes: SIGINT to the launch process only (it shuts its nodes down and does not
    respawn them; a SIGINT to the whole group could let a node exit before launch knows it is shutting down, and
    be respawned), SIGTERM after ``timeout`` s, then SIGKILL for whatever is left of the process group (ours).
    Returns the launch process's exit code."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    deadline = time.monotonic() + timeout
    while group_processes(proc.pid, "") and time.monotonic() < deadline:
        time.sleep(0.2)  # the nodes finishing their clean shutdown
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.wait(10)


def group_processes(pgid: int, needle: str) -> list[int]:
    """Pids of the processes in process group ``pgid`` whose command line contains ``needle`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ProcessLookupError):
            continue
        if needle in cmd:
            pids.append(int(entry.name))
    return pids


def ros2_daemons(domain_id: int) -> list[int]:
    """Pids of ``ros2`` CLI daemons serving ROS domain ``domain_id`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv]
        if any("_ros2_daemon" in a or a == "ros2-daemon" for a in text) and "--ros-domain-id" in text:
            i = text.index("--ros-domain-id")
            if i + 1 < len(text) and text[i + 1] == str(domain_id):
                pids.append(int(entry.name))
    return pids
