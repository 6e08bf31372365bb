"""Loopback-only DDS settings for tests, demos, benchmarks and CI on development machines.

On these machines DDS traffic must never leave the host. :func:`configure_loopback_dds` sets, *before*
``rclpy.init()``:

- ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` (discovery on the local host only; ``ROS_LOCALHOST_ONLY`` is
  ignored since Kilted),
- ``FASTDDS_DEFAULT_PROFILES_FILE`` = the loopback profile shipped in ``langgs_ros/resources`` (UDPv4 on
  127.0.0.1 plus shared memory, built-in transports off),
- ``ROS_DOMAIN_ID`` (a caller-chosen, test-specific domain).

Robots do not call this: they use their own DDS configuration.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

LOOPBACK_PROFILE = Path(__file__).resolve().parent.parent / "resources" / "fastdds_loopback.xml"


def loopback_dds_env(domain_id: int, env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Write the loopback-only DDS variables into ``env`` (default: ``os.environ``) and return it.

    Args:
        domain_id: ``ROS_DOMAIN_ID`` to use, 0..101 (the range safe with Fast DDS' default port mapping).

    Raises:
        ValueError: ``domain_id`` outside 0..101.
    """
    if not 0 <= int(domain_id) <= 101:
        raise ValueError(f"ROS_DOMAIN_ID must be in 0..101, got {domain_id}")
    target = os.environ if env is None else env
    target["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    target["FASTDDS_DEFAULT_PROFILES_FILE"] = str(LOOPBACK_PROFILE)
    target["ROS_DOMAIN_ID"] = str(int(domain_id))
    target.pop("ROS_STATIC_PEERS", None)
    return target


def configure_loopback_dds(domain_id: int) -> None:
    """Set the loopback-only DDS variables in this process (call before ``rclpy.init()``)."""
    loopback_dds_env(domain_id)
