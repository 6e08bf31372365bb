"""The loopback-only DDS profile that every test, demo, benchmark and CI run uses (langgs_ros.ros.dds_env)."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from langgs_ros.ros import dds_env

NS = {"d": "http://www.eprosima.com"}


def test_profile_keeps_dds_on_loopback_and_enlarges_shared_memory(tmp_path: Path) -> None:
    path = dds_env.write_loopback_profile(tmp_path / "p.xml")
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.eprosima.com}dds"
    descs = {d.findtext("d:transport_id", namespaces=NS): d for d in root.iterfind(".//d:transport_descriptor", NS)}
    kinds = {tid: d.findtext("d:type", namespaces=NS) for tid, d in descs.items()}
    assert sorted(kinds.values()) == ["SHM", "UDPv4"]
    udp = next(d for d in descs.values() if d.findtext("d:type", namespaces=NS) == "UDPv4")
    assert [a.text for a in udp.iterfind("d:interfaceWhiteList/d:address", NS)] == ["127.0.0.1"]
    shm = next(d for d in descs.values() if d.findtext("d:type", namespaces=NS) == "SHM")
    assert int(shm.findtext("d:segment_size", namespaces=NS)) == dds_env.SHM_SEGMENT_BYTES >= 900 * 1024
    part = root.find(".//d:participant", NS)
    assert part is not None and part.get("is_default_profile") == "true"
    assert part.findtext("d:rtps/d:useBuiltinTransports", namespaces=NS) == "false"
    assert sorted(t.text for t in part.iterfind("d:rtps/d:userTransports/d:transport_id", NS)) == sorted(descs)
    with pytest.raises(ValueError):
        dds_env.loopback_profile_xml(1024)


def test_env_points_at_a_written_profile_and_the_script_writes_the_same(tmp_path: Path) -> None:
    env = dds_env.loopback_dds_env(7, {"ROS_STATIC_PEERS": "10.0.0.2"})
    assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST" and env["ROS_DOMAIN_ID"] == "7"
    assert "ROS_STATIC_PEERS" not in env
    assert Path(env["FASTDDS_DEFAULT_PROFILES_FILE"]).read_text() == dds_env.loopback_profile_xml()
    with pytest.raises(ValueError):
        dds_env.loopback_dds_env(102, {})
    # the shell entry points' way: the module as a plain script (standard library only), path printed
    out = subprocess.run([sys.executable, dds_env.__file__, str(tmp_path / "s.xml")], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == str(tmp_path / "s.xml") and Path(out).read_text() == dds_env.loopback_profile_xml()
