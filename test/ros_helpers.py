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
