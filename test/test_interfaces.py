"""The generated langgs_ros interfaces have exactly the documented fields and types (v1)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.ros

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = {
    "msg.ObjectLocation": {
        "instance_id": "uint32", "label": "string", "score": "float", "pose": "geometry_msgs/PoseStamped",
        "size": "geometry_msgs/Vector3", "num_gaussians": "uint32", "approach_pose": "geometry_msgs/PoseStamped",
    },
    "srv.FindObject.Request": {
        "query": "string", "max_results": "uint32", "min_score": "float", "negatives": "sequence<string>",
    },
    "srv.FindObject.Response": {
        "success": "boolean", "message": "string", "objects": "sequence<langgs_ros/ObjectLocation>",
        "map_stamp": "builtin_interfaces/Time",
    },
    "srv.SaveMap.Request": {"path": "string"},
    "srv.SaveMap.Response": {"success": "boolean", "message": "string", "num_gaussians": "uint64",
                             "num_instances": "uint32"},
    "srv.LoadMap.Request": {"path": "string"},
    "srv.LoadMap.Response": {"success": "boolean", "message": "string", "num_gaussians": "uint64",
                             "num_instances": "uint32"},
}


def _resolve(dotted: str):
    import importlib

    kind, name, *rest = dotted.split(".")
    obj = getattr(importlib.import_module(f"langgs_ros.{kind}"), name)
    for r in rest:
        obj = getattr(obj, r)
    return obj


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fields_and_types(name: str) -> None:
    cls = _resolve(name)
    assert cls.get_fields_and_field_types() == EXPECTED[name]


def _documented_fields(path: Path) -> list[list[str]]:
    """Field names declared in a .msg/.srv file, per section (request/response)."""
    sections: list[list[str]] = [[]]
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line == "---":
            sections.append([])
        elif line:
            sections[-1].append(re.split(r"\s+", line)[1])
    return sections


def test_every_field_is_documented_with_a_comment() -> None:
    """Each field line in msg/ and srv/ is preceded by a comment (units and meaning live in the files)."""
    for path in sorted((ROOT / "msg").glob("*.msg")) + sorted((ROOT / "srv").glob("*.srv")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            code = line.split("#", 1)[0].strip()
            if not code or code == "---":
                continue
            prev = [ln for ln in lines[:i] if ln.strip()]
            assert prev and prev[-1].lstrip().startswith("#"), f"{path.name}: field {code!r} has no comment above it"


def test_interface_files_match_generated_code() -> None:
    """The files in msg/ and srv/ are what was built (a stale build would fail here)."""
    for dotted, fields in EXPECTED.items():
        kind, name, *rest = dotted.split(".")
        path = ROOT / kind / f"{name}.{kind}"
        sections = _documented_fields(path)
        section = sections[0] if not rest or rest[0] == "Request" else sections[1]
        assert section == list(fields), f"{path.name}: {section} != {list(fields)}"


def test_messages_construct_and_round_trip_through_serialization() -> None:
    from rclpy.serialization import deserialize_message, serialize_message

    from langgs_ros.msg import ObjectLocation
    from langgs_ros.srv import FindObject

    loc = ObjectLocation(instance_id=7, label="red backpack", score=0.75, num_gaussians=123)
    loc.pose.header.frame_id = "map"
    loc.pose.pose.position.x = 1.5
    loc.size.z = 0.37
    resp = FindObject.Response(success=True, message="ok", objects=[loc])
    back = deserialize_message(serialize_message(resp), FindObject.Response)
    assert back.objects[0].label == "red backpack"
    assert back.objects[0].pose.pose.position.x == 1.5
    assert back.objects[0].size.z == pytest.approx(0.37)
    req = FindObject.Request(query="the red backpack", max_results=3, min_score=0.0, negatives=["wall"])
    assert deserialize_message(serialize_message(req), FindObject.Request).negatives == ["wall"]
