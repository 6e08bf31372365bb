"""Error accounting of the mapping node: counted input problems, caught faults, and what diagnostics report.

Nothing a peer sends may end the node: every callback, timer and service handler runs inside :meth:`Health.guard`,
which catches the exception, counts it, logs it (throttled per kind) and keeps it as the last fault, so that
``/diagnostics`` reports ERROR (``last_fault``) for ``fault_hold`` seconds after it. Input problems that are
handled on purpose (a bad image, a frame without partners) are counted with :meth:`Health.warn` and make the
status WARN.
"""

from __future__ import annotations

import functools
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any


class Health:
    """Counters and throttled reporting shared by all callbacks of one node (thread-safe).

    Args:
        logger: an rclpy logger (``node.get_logger()``): ``warning``/``error`` with ``throttle_duration_sec``.
        throttle: seconds between two log lines of one kind.
        fault_hold: seconds the diagnostics level stays ERROR after a caught fault.
    """

    def __init__(self, logger: Any, throttle: float = 2.0, fault_hold: float = 30.0) -> None:
        self.logger = logger
        self.throttle = float(throttle)
        self.fault_hold = float(fault_hold)
        self.warnings: dict[str, int] = {}
        self.faults: dict[str, int] = {}
        self.last_fault: str = ""
        self._last_fault_time = -1e18
        self._last_log: dict[str, float] = {}
        self._lock = threading.Lock()

    def _should_log(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last_log.get(key, -1e18) < self.throttle:
                return False
            self._last_log[key] = now
            return True

    def count(self, key: str, n: int = 1) -> None:
        """Count an input event without logging (e.g. frames evicted by a bounded buffer)."""
        with self._lock:
            self.warnings[key] = self.warnings.get(key, 0) + n

    def warn(self, key: str, msg: str) -> None:
        """Count an input problem of kind ``key`` and log ``msg`` (throttled per kind)."""
        with self._lock:
            n = self.warnings[key] = self.warnings.get(key, 0) + 1
        if self._should_log("w:" + key):
            self.logger.warning(f"{msg} [{key}: {n} so far]")

    def fault(self, where: str, exc: BaseException) -> str:
        """Record an exception caught in ``where``; returns the one-line message for a service answer."""
        msg = f"{where} failed: {type(exc).__name__}: {exc}"
        with self._lock:
            n = self.faults[where] = self.faults.get(where, 0) + 1
            self.last_fault = msg
            self._last_fault_time = time.monotonic()
        if self._should_log("f:" + where):
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=6))
            self.logger.error(f"{msg} [{n} so far; the node keeps running with its map]\n{tb}")
        return msg

    @property
    def recent_fault(self) -> bool:
        """True within ``fault_hold`` seconds of the last caught fault."""
        return time.monotonic() - self._last_fault_time < self.fault_hold

    def guard(self, where: str, fn: Callable[..., Any], response_index: int | None = None) -> Callable[..., Any]:
        """Wrap a callback so that no exception escapes it.

        Args:
            where: name used in counters and messages (``"find_object"``, ``"image callback"``).
            fn: the callback.
            response_index: for service handlers, the index of the response argument: on an exception it is
                returned with ``success = False`` and ``message`` set (when the type has those fields).
        """

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # the whole point: nothing escapes a callback
                msg = self.fault(where, exc)
                if response_index is None:
                    return None
                response = args[response_index]
                if hasattr(response, "success"):
                    response.success = False
                if hasattr(response, "message"):
                    response.message = f"internal error, map unchanged: {msg}"
                return response

        return wrapper
