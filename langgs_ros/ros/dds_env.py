"""Loopback-only DDS settings for tests, demos, benchmarks and CI on development machines.

On these machines DDS traffic must never leave the host. :func:`configure_loopback_dds` sets, *before*
``rclpy.init()``:

- ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` (discovery on the local host only; ``ROS_LOCALHOST_ONLY`` is
  ignored since Kilted),
- ``FASTDDS_DEFAULT_PROFILES_FILE`` = a loopback Fast DDS profile written by :func:`write_loopback_profile`
  (UDPv4 on 127.0.0.1 plus shared memory, built-in transports off),
- ``ROS_DOMAIN_ID`` (a caller-chosen, test-specific domain).

Shell entry points (``.ci/run``, ``scripts/ros_env.sh``) write the same profile with
``python3 langgs_ros/ros/dds_env.py PATH``, which needs nothing but the standard library.

Robots do not call this: they use their own DDS configuration.
"""

from __future__ import annotations

import os
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import MutableMapping
from pathlib import Path

#: Shared-memory segment and largest message (bytes): Fast DDS' 512 KiB default is enlarged so that camera images
#: (a 640x480 rgb8 frame is 900 KiB) travel whole through shared memory instead of as UDP fragments, which
#: best-effort (sensor-data) QoS loses under load.
SHM_SEGMENT_BYTES = 32 * 1024 * 1024


def loopback_profile_xml(shm_segment_bytes: int = SHM_SEGMENT_BYTES) -> str:
    """The Fast DDS XML profile of a loopback-only default participant.

    Transports: UDPv4 restricted to 127.0.0.1 (``interfaceWhiteList``) and shared memory with a segment of
    ``shm_segment_bytes``; ``useBuiltinTransports=false``, so no multicast or unicast on real interfaces. Schema:
    eProsima Fast DDS *XML profiles* (``transport_descriptors``, ``participant``/``rtps``/``userTransports``).

    Raises:
        ValueError: ``shm_segment_bytes`` below 64 KiB.
    """
    if int(shm_segment_bytes) < 65536:
        raise ValueError(f"shm_segment_bytes must be >= 65536, got {shm_segment_bytes}")
    dds = ET.Element("dds", xmlns="http://www.eprosima.com")
    profiles = ET.SubElement(dds, "profiles")
    descriptors = ET.SubElement(profiles, "transport_descriptors")

    def descriptor(transport_id: str, kind: str) -> ET.Element:
        d = ET.SubElement(descriptors, "transport_descriptor")
        ET.SubElement(d, "transport_id").text = transport_id
        ET.SubElement(d, "type").text = kind
        return d

    udp = descriptor("udp_loopback", "UDPv4")
    ET.SubElement(ET.SubElement(udp, "interfaceWhiteList"), "address").text = "127.0.0.1"
    shm = descriptor("shm", "SHM")
    ET.SubElement(shm, "segment_size").text = str(int(shm_segment_bytes))
    ET.SubElement(shm, "maxMessageSize").text = str(int(shm_segment_bytes))
    participant = ET.SubElement(profiles, "participant", profile_name="loopback_only", is_default_profile="true")
    rtps = ET.SubElement(participant, "rtps")
    user = ET.SubElement(rtps, "userTransports")
    for tid in ("udp_loopback", "shm"):
        ET.SubElement(user, "transport_id").text = tid
    ET.SubElement(rtps, "useBuiltinTransports").text = "false"
    ET.indent(dds)
    return '<?xml version="1.0" encoding="UTF-8" ?>\n' + ET.tostring(dds, encoding="unicode") + "\n"


def default_profile_path() -> Path:
    """Where :func:`write_loopback_profile` writes by default: ``<tmp>/langgs_ros-<uid>/fastdds_loopback.xml``."""
    return Path(tempfile.gettempdir()) / f"langgs_ros-{os.getuid()}" / "fastdds_loopback.xml"


def write_loopback_profile(path: str | os.PathLike | None = None) -> Path:
    """Write :func:`loopback_profile_xml` to ``path`` (default :func:`default_profile_path`) and return it.

    The file is replaced atomically and only when its content differs, so processes started at the same time
    (tests, launch children) never read a partial profile.

    Raises:
        OSError: the file cannot be written.
    """
    target = Path(path) if path is not None else default_profile_path()
    text = loopback_profile_xml()
    try:
        if target.read_text() == text:
            return target
    except OSError:
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".fastdds_", suffix=".xml")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def loopback_dds_env(domain_id: int, env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Write the loopback-only DDS variables into ``env`` (default: ``os.environ``) and return it.

    Args:
        domain_id: ``ROS_DOMAIN_ID`` to use, 0..101 (the range safe with Fast DDS' default port mapping).

    Raises:
        ValueError: ``domain_id`` outside 0..101.
        OSError: the profile cannot be written (:func:`write_loopback_profile`).
    """
    if not 0 <= int(domain_id) <= 101:
        raise ValueError(f"ROS_DOMAIN_ID must be in 0..101, got {domain_id}")
    target = os.environ if env is None else env
    target["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    target["FASTDDS_DEFAULT_PROFILES_FILE"] = str(write_loopback_profile())
    target["ROS_DOMAIN_ID"] = str(int(domain_id))
    target.pop("ROS_STATIC_PEERS", None)
    return target


def configure_loopback_dds(domain_id: int) -> None:
    """Set the loopback-only DDS variables in this process (call before ``rclpy.init()``)."""
    loopback_dds_env(domain_id)


if __name__ == "__main__":  # python3 langgs_ros/ros/dds_env.py [PATH]: write the profile, print its path
    if len(sys.argv) > 2:
        sys.exit("usage: dds_env.py [PATH]")
    print(write_loopback_profile(sys.argv[1] if len(sys.argv) == 2 else None))
