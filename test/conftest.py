"""Shared pytest fixtures.

Loopback-only DDS is configured here at import time, before any test can call ``rclpy.init()``:
``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``, the repo's loopback Fast DDS profile and a per-run
``ROS_DOMAIN_ID``. Each ROS test additionally gets its own domain id through :func:`ros_domain`.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from langgs_ros.ros.dds_env import configure_loopback_dds

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
HOLOLENS = SHARED / "data" / "hololens_office"

# Domain ids 1..100 are spread over concurrent runs by pid; each ROS test takes the next one.
_DOMAIN_BASE = os.getpid() % 50
_domain_counter = itertools.count()
configure_loopback_dds(1 + _DOMAIN_BASE)


def next_domain_id() -> int:
    """A fresh ROS_DOMAIN_ID (1..100) for one test; cycles within this run."""
    return 1 + (_DOMAIN_BASE + next(_domain_counter)) % 100


@pytest.fixture(scope="session")
def hololens_dir() -> Path:
    """Path of the shared real RGB-D sequence; skips when ../shared is not beside the repo."""
    if not HOLOLENS.is_dir():
        pytest.skip(f"shared data not found at {HOLOLENS}")
    return HOLOLENS


@pytest.fixture
def ros_domain() -> Iterator[int]:
    """A test-specific ROS domain id, also exported to ``os.environ`` for subprocesses started by the test."""
    domain = next_domain_id()
    old = os.environ.get("ROS_DOMAIN_ID")
    configure_loopback_dds(domain)
    yield domain
    if old is not None:
        os.environ["ROS_DOMAIN_ID"] = old


@pytest.fixture
def ros_context(ros_domain: int):
    """An initialised rclpy context on the test's own domain; shut down (after executors) at teardown."""
    rclpy = pytest.importorskip("rclpy")
    context = rclpy.context.Context()
    rclpy.init(context=context, domain_id=ros_domain)
    yield context
    if context.ok():
        rclpy.shutdown(context=context)


class SpinningExecutor:
    """A MultiThreadedExecutor spinning in a background thread; :meth:`close` joins it cleanly."""

    def __init__(self, context) -> None:
        from rclpy.executors import MultiThreadedExecutor

        self.executor = MultiThreadedExecutor(num_threads=4, context=context)
        self.nodes: list = []
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._started = False

    def add(self, node):
        """Add a node and start spinning if not yet started; returns the node."""
        self.nodes.append(node)
        self.executor.add_node(node)
        if not self._started:
            self.thread.start()
            self._started = True
        return node

    def close(self) -> None:
        """Shut the executor down, join its thread (before rclpy.shutdown), destroy the nodes."""
        self.executor.shutdown(timeout_sec=5.0)
        if self._started:
            self.thread.join(timeout=10.0)
        for node in self.nodes:
            node.destroy_node()


@pytest.fixture
def spinning_executor(ros_context) -> Iterator[SpinningExecutor]:
    """A background-spinning executor bound to :func:`ros_context`, closed before the context shuts down."""
    ex = SpinningExecutor(ros_context)
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def hololens_seq(hololens_dir: Path):
    """The shared hololens sequence opened with :func:`langgs_ros.datasets.open_sequence` (module-scoped)."""
    from langgs_ros.datasets import open_sequence

    return open_sequence(hololens_dir)
