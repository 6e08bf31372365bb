"""Test-only replay: a dataset folder re-stamped at a camera rate, with each topic delayed and reordered against
colour (stands for a real camera driver + odometry whose topics reach the node with different, varying latencies).

Built on :class:`langgs_ros.ros.replay.FolderReplay` (same messages, frames, QoS). Frame ``k`` of the replayed
indices is stamped ``t0 + k * period``. Each message of frame ``k`` on topic ``X`` is published at "slot"
``k + delay_X(k)`` (in frame periods; ``delay`` drawn uniformly from the topic's range with a fixed seed), with the
order of one topic's messages kept (ROS topics from one publisher are ordered); slots are paced at
``wall_per_frame`` seconds of wall clock, so the wall rate can be lower than the stamp rate (a busy CPU receives a
30 Hz stream late, not faster).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from langgs_ros.ros.replay import FolderReplay

# Delays in frame periods (colour is the reference at 0). Every partner of frame k is usually published after
# colour k (the case that broke the old matching: the previous frame's partner, 33 ms off, was buffered then);
# labels sometimes after colour k + 1, odometry sometimes before colour.
DEFAULT_DELAYS: dict[str, tuple[float, float]] = {
    "image": (0.0, 0.0), "camera_info": (0.1, 0.9), "depth": (0.2, 0.95), "labels": (0.3, 1.9),
    "odom": (-0.5, 1.5),
}


class DelayedReplay(FolderReplay):
    """:class:`FolderReplay` with camera-rate stamps and per-topic delays (see the module docstring).

    Args:
        sequence: the opened folder. ``period``: s between stamps (1/30 for a 30 Hz camera). ``delays``: topic ->
            (low, high) delay in frame periods. ``seed``: of the delay draws. Other arguments: FolderReplay's.
    """

    def __init__(self, sequence, period: float = 1.0 / 30.0, delays: dict[str, tuple[float, float]] | None = None,
                 seed: int = 0, **kwargs) -> None:
        super().__init__(sequence, **kwargs)
        self.period = float(period)
        self.delays = dict(DEFAULT_DELAYS if delays is None else delays)
        self.rng = np.random.default_rng(seed)
        self.published: list[tuple[float, str, int]] = []  # (slot, topic, k) in publication order

    def schedule(self, n: int) -> list[tuple[float, str, int]]:
        """(slot, topic, k) for ``n`` frames, sorted by slot; one topic's messages stay in stamp order."""
        events = []
        for topic, (lo, hi) in self.delays.items():
            slots = np.arange(n) + self.rng.uniform(lo, hi, n)
            slots = np.maximum.accumulate(slots)  # a topic's messages are published in order
            events += [(float(slots[k]), topic, k) for k in range(n)]
        return sorted(events, key=lambda e: (e[0], e[2]))

    def run_delayed(self, indices: Sequence[int], wall_per_frame: float = 0.25) -> list[float]:
        """Publish the frames ``indices`` per :meth:`schedule`; returns their stamps (s)."""
        stamps = [self.t0 + k * self.period for k in range(len(indices))]
        messages = [dict(self.frame_messages(i, stamps[k])) for k, i in enumerate(indices)]
        start = time.monotonic()
        first = None
        for slot, topic, k in self.schedule(len(indices)):
            first = slot if first is None else first
            rest = start + (slot - first) * wall_per_frame - time.monotonic()
            if rest > 0:
                time.sleep(rest)
            if topic in messages[k]:
                self.publish(topic, messages[k][topic])
                self.published.append((slot, topic, k))
        return stamps

    def late_partner_frames(self, topic: str) -> int:
        """Frames k whose ``topic`` message was published after colour k while that of frame k - 1 was published
        before it: where taking the nearest buffered message within 0.05 s picks the previous frame's."""
        order = {(t, k): n for n, (_, t, k) in enumerate(self.published)}
        n = 0
        for (t, k), pos in order.items():
            if t == topic and k > 0 and (topic, k - 1) in order and ("image", k) in order:
                n += order[(topic, k - 1)] < order[("image", k)] < pos
        return n
