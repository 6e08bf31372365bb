"""Crafted (hostile) map files: load_map refuses each with a MapLoadError and a message naming the problem, reads
nothing it was not allowed to, and whatever it accepts is a map that fusion's snapshot import takes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_persistence import make_snapshot

from langgs_ros import persistence
from langgs_ros.fusion import SemanticGaussianMap
from langgs_ros.persistence import (
    DEFAULT_MAX_MAP_BYTES,
    EncoderMismatchError,
    MapFormatError,
    MapLoadError,
    MapTooLargeError,
    load_map,
    save_map,
    sidecar_path,
)

# ------------------------------------------------------------------------------------------------ crafting helpers


def saved(tmp_path: Path, name: str = "m.ply", **kw) -> Path:
    """A genuine map written by save_map (the starting point of every crafted file)."""
    path = tmp_path / name
    save_map(make_snapshot(n=kw.pop("n", 60), **kw), path)
    return path


def read_pair(path: Path) -> tuple[bytes, dict[str, Any], dict[str, np.ndarray]]:
    """(PLY bytes, meta, arrays) of a saved map (read with numpy: these are our own files)."""
    with np.load(sidecar_path(path)) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")))
    return path.read_bytes(), meta, arrays


def write_pair(path: Path, ply: bytes, meta: dict[str, Any] | None, arrays: dict[str, np.ndarray],
               fix_sha: bool = True, raw_meta: np.ndarray | None = None, side: Path | None = None) -> None:
    """Write a PLY and its sidecar (same uuid), updating the checksum to the new PLY unless ``fix_sha`` is off."""
    side = side or sidecar_path(path)
    path.write_bytes(ply)
    if meta is not None and fix_sha:
        meta["ply_sha256"] = hashlib.sha256(ply).hexdigest()
    members = dict(arrays)
    members["meta"] = raw_meta if raw_meta is not None else np.array(json.dumps(meta))
    with open(side, "wb") as f:
        np.savez(f, **members)


def mutate_meta(path: Path, **changes: Any) -> None:
    ply, meta, arrays = read_pair(path)
    for k, v in changes.items():
        if v is _DELETE:
            del meta[k]
        else:
            meta[k] = v
    write_pair(path, ply, meta, arrays, fix_sha=False)


def mutate_array(path: Path, name: str, value: Any) -> None:
    ply, meta, arrays = read_pair(path)
    if value is _DELETE:
        del arrays[name]
    else:
        arrays[name] = value
    write_pair(path, ply, meta, arrays, fix_sha=False)


_DELETE = object()


def ply_bytes(header_lines: list[str], body: bytes) -> bytes:
    return ("\n".join(["ply", *header_lines, "end_header"]) + "\n").encode() + body


def header_and_body(ply: bytes) -> tuple[list[str], bytes]:
    end = ply.index(b"end_header\n")
    lines = ply[:end].decode().splitlines()[1:]
    return lines, ply[end + len(b"end_header\n"):]


def vertex_records(path: Path) -> np.ndarray:
    ply, _, _ = read_pair(path)
    _, body = header_and_body(ply)
    return np.frombuffer(body, dtype=persistence._VERTEX_DTYPE).copy()


def replace_vertices(path: Path, v: np.ndarray, header_lines: list[str] | None = None) -> None:
    """Rewrite the PLY body (and the header's vertex count) keeping the uuid; checksum and count updated."""
    ply, meta, arrays = read_pair(path)
    lines, _ = header_and_body(ply)
    if header_lines is None:
        header_lines = [f"element vertex {len(v)}" if ln.startswith("element vertex") else ln for ln in lines]
    meta["num_gaussians_total"] = len(v)
    write_pair(path, ply_bytes(header_lines, v.tobytes()), meta, arrays)


def refused(path: Path, match: str, exc: type[MapLoadError] = MapFormatError, **kw) -> MapLoadError:
    """Assert load_map raises ``exc`` (a MapLoadError) whose message matches ``match``; return it."""
    with pytest.raises(MapLoadError) as info:
        load_map(path, **kw)
    assert isinstance(info.value, exc), repr(info.value)
    assert type(info.value).__mro__.index(MapLoadError) >= 0
    import re

    assert re.search(match, str(info.value)), str(info.value)
    assert len(str(info.value)) < 1000, "a service response message must stay short"
    return info.value


# ------------------------------------------------------------------------------------------------ metadata


def test_null_num_gaussians_total_is_a_clean_error(tmp_path: Path) -> None:
    """The case that escaped as a TypeError and killed the node."""
    path = saved(tmp_path)
    mutate_meta(path, num_gaussians_total=None)
    refused(path, r"num_gaussians_total.*integer.*None")


@pytest.mark.parametrize("field", ["format_version", "map_uuid", "ply_sha256", "num_gaussians_total", "has_weights",
                                   "encoder_id", "embedding_dim", "names", "frame_id", "floor_height", "stamp",
                                   "version"])
def test_missing_metadata_field(tmp_path: Path, field: str) -> None:
    path = saved(tmp_path)
    mutate_meta(path, **{field: _DELETE})
    refused(path, rf"metadata lacks \['{field}'\]")


WRONG_VALUES = [None, "12", 1e300, -1, 2.5, True, [], {}, "x" * 5000]


@pytest.mark.parametrize("field", ["format_version", "map_uuid", "ply_sha256", "num_gaussians_total", "has_weights",
                                   "encoder_id", "embedding_dim", "names", "frame_id", "floor_height", "stamp",
                                   "version"])
def test_metadata_field_of_wrong_type_or_range(tmp_path: Path, field: str) -> None:
    """Every field set to null, strings, huge/negative/fractional numbers, booleans, lists and objects: either a
    clean refusal naming the field (or the uuid/checksum it guards) or a snapshot fusion accepts."""
    path = saved(tmp_path)
    ply, meta0, arrays = read_pair(path)
    guard = {"map_uuid": "belongs to map", "ply_sha256": "checksum", "names": "names"}.get(field, field)
    accepted = []
    for value in WRONG_VALUES:
        meta = dict(meta0)
        meta[field] = value
        write_pair(path, ply, meta, arrays, fix_sha=False)
        try:
            snap = load_map(path)
        except MapLoadError as e:
            assert guard in str(e) or field in str(e), (value, str(e))
            assert len(str(e)) < 1000
            continue
        SemanticGaussianMap.from_snapshot(snap)
        accepted.append(value)
    legit = {"floor_height": [None, -1, 2.5], "stamp": [2.5], "frame_id": ["12", "x" * 5000],
             "encoder_id": ["12", "x" * 5000], "has_weights": [True]}.get(field, [])
    assert accepted == legit, accepted


def test_stamp_outside_ros_time_refused(tmp_path: Path) -> None:
    """find_object puts the map stamp in a builtin_interfaces/Time (int32 seconds): 1e12 s would raise there."""
    path = saved(tmp_path)
    mutate_meta(path, stamp=1e12)
    refused(path, r"stamp")


@pytest.mark.parametrize("raw", [
    np.array("not json {"), np.array(json.dumps([1, 2, 3])), np.array(7), np.array(["{}", "{}"]),
    np.array("[" * 100_000),  # nesting deeper than json's recursion limit
    np.frombuffer(b'{"a": 1}', dtype=np.uint8),
])
def test_malformed_metadata_member(tmp_path: Path, raw: np.ndarray) -> None:
    path = saved(tmp_path)
    ply, meta, arrays = read_pair(path)
    write_pair(path, ply, meta, arrays, fix_sha=False, raw_meta=raw)
    refused(path, r"meta")


def test_encoder_and_dimension_mismatch(tmp_path: Path) -> None:
    path = saved(tmp_path)
    refused(path, r"encoder", EncoderMismatchError, expected_encoder_id="other")
    refused(path, r"16-d embeddings.*384-d", EncoderMismatchError, expected_embedding_dim=384)
    mutate_meta(path, embedding_dim=17)  # meta says 17, the array is 16 wide
    refused(path, r"embeddings.*shape")


def test_mismatched_counts(tmp_path: Path) -> None:
    path = saved(tmp_path)
    mutate_meta(path, num_gaussians_total=61)
    refused(path, r"60 vertices, sidecar expects 61")
    path = saved(tmp_path, "b.ply")
    mutate_meta(path, names=["only", "three", "names"])
    refused(path, r"names must be a list of 4")
    path = saved(tmp_path, "c.ply")
    mutate_array(path, "yaws", np.zeros(5))
    refused(path, r"'yaws' has shape \(5,\), expected \(4,\)")


# ------------------------------------------------------------------------------------------------ sidecar arrays


@pytest.mark.parametrize("name, value, match", [
    ("ids", np.arange(4, dtype=np.float64) * 10, r"'ids' must have an integer dtype"),
    ("ids", np.array(["a", "b", "c", "d"]), r"'ids' must have an integer dtype"),
    ("ids", np.arange(8, dtype=np.int32).reshape(4, 2), r"'ids' has shape"),
    ("embeddings", np.ones((4, 16), dtype=np.int32), r"'embeddings' must have a float dtype"),
    ("embeddings", np.ones((4, 16), dtype=np.complex64), r"'embeddings' must have a float dtype"),
    ("embeddings", np.ones((4, 15), dtype=np.float32), r"'embeddings' has shape \(4, 15\), expected \(4, 16\)"),
    ("embeddings", np.ones(64, dtype=np.float32), r"'embeddings' has shape"),
    ("centers", np.zeros((4, 2)), r"'centers' has shape"),
    ("centers", np.zeros(4, dtype=[("x", "<f8"), ("y", "<f8"), ("z", "<f8")]), r"unsupported dtype"),
    ("sizes", np.full((4, 3), -1.0), r"'sizes' has values below 0"),
    ("num_gaussians", np.full(4, -3, dtype=np.int64), r"num_gaussians"),
    ("num_gaussians", np.ones(4), r"'num_gaussians' must have an integer dtype"),
    ("observations", np.full(4, -1.0), r"'observations' has values below 0"),
    ("camera_positions", np.zeros((3, 2)), r"'camera_positions' has shape"),
    ("camera_positions", np.zeros(3), r"'camera_positions' has shape"),
    ("up", np.zeros(4), r"'up' has shape"),
    ("up", np.zeros(3), r"'up' is the zero vector"),
    ("up", np.array([0, 0, 1], dtype=bool), r"'up' must have a float dtype"),
    ("ids", _DELETE, r"lacks arrays \['ids'\]"),
    ("camera_positions", _DELETE, r"lacks arrays \['camera_positions'\]"),
])
def test_sidecar_array_wrong_dtype_shape_or_range(tmp_path: Path, name: str, value: Any, match: str) -> None:
    path = saved(tmp_path)
    mutate_array(path, name, value)
    refused(path, match)


@pytest.mark.parametrize("name, index", [("embeddings", (1, 3)), ("centers", (0, 0)), ("sizes", (2, 1)),
                                         ("yaws", (1,)), ("observations", (3,)), ("camera_positions", (4, 2)),
                                         ("up", (2,))])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_sidecar_nan_inf(tmp_path: Path, name: str, index: tuple[int, ...], bad: float) -> None:
    path = saved(tmp_path)
    a = read_pair(path)[2][name].copy()
    a[index] = bad
    mutate_array(path, name, a)
    refused(path, rf"'{name}' contains NaN/inf")


def test_float64_embeddings_beyond_float32_range_refused(tmp_path: Path) -> None:
    path = saved(tmp_path)
    emb = read_pair(path)[2]["embeddings"].astype(np.float64)
    emb[0, 0] = 1e300  # finite in float64, inf once stored as float32
    mutate_array(path, "embeddings", emb)
    refused(path, r"'embeddings' has values beyond")


@pytest.mark.parametrize("ids, match", [
    (np.array([0, 10, 10, 30], dtype=np.int32), r"not unique"),
    (np.array([0, 10, -20, 30], dtype=np.int32), r"instance ids must be in \[0, "),
    (np.array([0, 10, 20, 2**30], dtype=np.int64), r"instance ids must be in \[0, "),
    (np.array([0, 10, 20, 2**40], dtype=np.int64), r"instance ids must be in \[0, "),
    (np.array([0, 10, 20, 2**64 - 1], dtype=np.uint64), r"instance ids must be in \[0, "),
])
def test_bad_instance_ids(tmp_path: Path, ids: np.ndarray, match: str) -> None:
    path = saved(tmp_path)
    mutate_array(path, "ids", ids)
    refused(path, match)


def test_zero_embedding_row_refused(tmp_path: Path) -> None:
    path = saved(tmp_path)
    emb = read_pair(path)[2]["embeddings"].copy()
    emb[2] = 0
    mutate_array(path, "embeddings", emb)
    refused(path, r"zero rows")


def test_gaussians_naming_unknown_instance_ids(tmp_path: Path) -> None:
    """fusion's snapshot import raised ValueError on this; load now refuses it first."""
    path = saved(tmp_path)
    v = vertex_records(path)
    v["instance_id"][5] = 77  # the table has ids 0, 10, 20, 30
    replace_vertices(path, v)
    refused(path, r"name 1 instance id\(s\) missing from the sidecar's table, e.g. \[77\]")


def test_object_array_member_refused_without_unpickling(tmp_path: Path) -> None:
    path = saved(tmp_path)
    _, meta, arrays = read_pair(path)
    arrays["ids"] = np.array([0, "10", None, 30.0], dtype=object)
    side = sidecar_path(path)
    with open(side, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)  # np.savez pickles object arrays
    refused(path, r"'ids' has unsupported dtype object")


# ------------------------------------------------------------------------------------------------ PLY body


@pytest.mark.parametrize("prop, value, match", [
    ("x", np.nan, r"NaN/inf"), ("rot_2", np.inf, r"NaN/inf"), ("weight", np.nan, r"NaN/inf"),
    ("x", 3e38, r"\['x'\] have values outside"), ("scale_1", 80.0, r"\['scale_1'\] have values outside"),
    ("scale_0", -200.0, r"\['scale_0'\] have values outside"), ("f_dc_2", 1e30, r"f_dc_2"),
    ("weight", 0.0, r"'weight' .* must be in \(0, "), ("weight", -2.0, r"'weight'"),
])
def test_ply_bad_values(tmp_path: Path, prop: str, value: float, match: str) -> None:
    path = saved(tmp_path)
    v = vertex_records(path)
    v[prop][7] = value
    replace_vertices(path, v)
    refused(path, match)


def test_ply_zero_quaternion_and_instance_below_minus_one(tmp_path: Path) -> None:
    path = saved(tmp_path)
    v = vertex_records(path)
    for i in range(4):
        v[f"rot_{i}"][3] = 0.0
    replace_vertices(path, v)
    refused(path, r"zero-norm")
    v = vertex_records(saved(tmp_path, "b.ply"))
    v["instance_id"][0] = -5
    replace_vertices(tmp_path / "b.ply", v)
    refused(tmp_path / "b.ply", r"instance_id values must be in \[-1")


def _retyped(path: Path, retype: dict[str, str], edit=None) -> None:
    """Rewrite the vertex element with some properties stored as other PLY types (values converted, then
    ``edit(records)`` if given)."""
    v = vertex_records(path)
    np_types = {"float": "<f4", "double": "<f8", "int": "<i4", "uchar": "u1", "short": "<i2", "uint": "<u4"}
    ply_type = {n: retype.get(n, "int" if n == "instance_id" else "float") for n in v.dtype.names}
    out = np.zeros(len(v), dtype=[(n, np_types[ply_type[n]]) for n in v.dtype.names])
    for n in v.dtype.names:
        out[n] = v[n].astype(out.dtype[n])
    if edit is not None:
        edit(out)
    ply, _, _ = read_pair(path)
    lines, _ = header_and_body(ply)
    lines = [ln for ln in lines if not ln.startswith("property")]
    at = next(i for i, ln in enumerate(lines) if ln.startswith("element vertex")) + 1
    props = [f"property {ply_type[n]} {n}" for n in v.dtype.names]
    replace_vertices(path, out, lines[:at] + props + lines[at:])


@pytest.mark.parametrize("retype, match", [
    ({"x": "int"}, r"wrong types \['x: int'\]"),
    ({"opacity": "uchar"}, r"wrong types \['opacity: uchar'\]"),
    ({"instance_id": "float"}, r"wrong types \['instance_id: float'\]"),
])
def test_ply_wrong_property_types(tmp_path: Path, retype: dict[str, str], match: str) -> None:
    path = saved(tmp_path)
    _retyped(path, retype)
    refused(path, match)


def test_ply_double_and_unsigned_properties_are_accepted(tmp_path: Path) -> None:
    """Other layouts a 3DGS tool may write (double floats, uint ids) still load when the values are valid."""
    path = saved(tmp_path)
    ref = load_map(path)
    _retyped(path, {"x": "double", "y": "double", "instance_id": "short"})
    back = load_map(path)
    assert torch.equal(back.gaussians.means, ref.gaussians.means)
    assert torch.equal(back.gaussians.instance_ids, ref.gaussians.instance_ids)


def test_ply_uint32_instance_id_beyond_int32_refused(tmp_path: Path) -> None:
    """2^32 - 1 as uint32 would wrap to -1 (no instance) in int32."""
    path = saved(tmp_path)

    def edit(out: np.ndarray) -> None:
        out["instance_id"] = 0
        out["instance_id"][0] = 2**32 - 1

    _retyped(path, {"instance_id": "uint"}, edit)
    refused(path, r"instance_id values must be in \[-1, 2\^31 - 1\]")


def test_truncated_ply_with_matching_checksum_refused(tmp_path: Path) -> None:
    """A truncated body whose sidecar checksum was updated to match: caught by the layout check, before plyfile."""
    path = saved(tmp_path)
    ply, meta, arrays = read_pair(path)
    write_pair(path, ply[:-30], meta, arrays)
    refused(path, r"truncated or padded")
    write_pair(path, ply + b"\x00" * 76, meta, arrays)
    refused(path, r"truncated or padded")


def test_ply_declaring_a_huge_vertex_count_refused(tmp_path: Path) -> None:
    path = saved(tmp_path)
    ply, meta, arrays = read_pair(path)
    lines, body = header_and_body(ply)
    lines = [("element vertex 100000000000" if ln.startswith("element vertex") else ln) for ln in lines]
    meta["num_gaussians_total"] = 100_000_000_000
    write_pair(path, ply_bytes(lines, body), meta, arrays)
    tracemalloc.start()
    try:
        refused(path, r"truncated or padded|sidecar expects|num_gaussians_total")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


@pytest.mark.parametrize("edit, match", [
    (lambda ls: [ln.replace("binary_little_endian", "ascii") for ln in ls], r"format 'ascii 1.0' refused"),
    (lambda ls: [*ls, "property list uchar int vertex_indices"], r"scalar properties only"),
    (lambda ls: [*ls, "element face 3", "property uchar a"], r"truncated or padded"),
    (lambda ls: [ln.replace("element vertex", "element vertex -") for ln in ls], r"malformed element line"),
    (lambda ls: [ln for ln in ls if not ln.startswith("format")], r"no format line"),
    (lambda ls: [ln.replace("element vertex", "element vertices") for ln in ls], r"exactly one 'vertex'"),
    (lambda ls: ["bogus line", *ls], r"unknown header line"),
])
def test_malformed_ply_header(tmp_path: Path, edit, match: str) -> None:
    path = saved(tmp_path)
    ply, meta, arrays = read_pair(path)
    lines, body = header_and_body(ply)
    write_pair(path, ply_bytes(edit(lines), body), meta, arrays)
    refused(path, match)


def test_overlong_uuid_is_not_a_map(tmp_path: Path) -> None:
    """A uuid comment of 10 000 hex digits would make a sidecar name the OS refuses (ENAMETOOLONG)."""
    path = tmp_path / "m.ply"
    path.write_bytes(ply_bytes(["format binary_little_endian 1.0", "comment langgs_map_uuid " + "a" * 10_000,
                                "comment langgs_format_version 1", "element vertex 0"], b""))
    refused(path, r"not a langgs_ros map")


# ------------------------------------------------------------------------------------------------ sizes and bombs


def _zip(members: dict[str, tuple[bytes, int, int, int]]) -> bytes:
    """A zip archive written byte by byte: name -> (stored data, method, declared uncompressed size, crc32).

    Lets a test declare sizes and CRCs that do not match the data (what zipfile itself never writes)."""
    out, central = io.BytesIO(), io.BytesIO()
    for name, (data, method, usize, crc) in members.items():
        n = name.encode()
        offset = out.tell()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), usize, len(n), 0))
        out.write(n + data)
        central.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(data), usize,
                                  len(n), 0, 0, 0, 0, 0, offset) + n)
    cd = central.getvalue()
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(cd), out.tell(), 0)
    return out.getvalue() + cd + eocd


def _npy(a: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array(f, a, allow_pickle=False)
    return f.getvalue()


def _sidecar_members(path: Path) -> dict[str, tuple[bytes, int, int, int]]:
    """The genuine sidecar's members, stored uncompressed."""
    _, meta, arrays = read_pair(path)
    arrays["meta"] = np.array(json.dumps(meta))
    out = {}
    for k, a in arrays.items():
        b = _npy(a)
        out[f"{k}.npy"] = (b, zipfile.ZIP_STORED, len(b), zlib.crc32(b))
    return out


def _zero_bomb(header: bytes, blocks: int, block: int = 16 << 20) -> bytes:
    """A raw deflate stream of ``header`` + zeros expanding to ``blocks * block`` bytes, built in a fraction of a
    second: after the first block the compressor's window is all zeros, so each further zero block compresses to
    the same bytes (checked) and is repeated instead of compressed."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = co.compress(header + bytes(block - len(header))) + co.flush(zlib.Z_SYNC_FLUSH)
    second = co.compress(bytes(block)) + co.flush(zlib.Z_SYNC_FLUSH)
    third = co.compress(bytes(block)) + co.flush(zlib.Z_SYNC_FLUSH)
    assert second == third
    return first + second * (blocks - 1) + co.flush()


def _bounded_inflate(stream: bytes, limit: int) -> int:
    """Bytes that ``stream`` inflates to, counting at most ``limit``."""
    d, n, data = zlib.decompressobj(-15), 0, stream
    while n < limit and data:
        n += len(d.decompress(data, 1 << 22))
        data = d.unconsumed_tail
    return n


def _traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_compressed_sidecar_expanding_to_gigabytes_refused_before_decompressing(tmp_path: Path) -> None:
    """A 3 MB sidecar member that inflates to 3 GiB (and says so): refused from its declared size under the default
    1 GiB limit, with no decompression (traced memory stays at a few MB)."""
    path = saved(tmp_path)
    members = _sidecar_members(path)
    size = 3 << 30
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (4, 0)})
    hlen = len(f.getvalue())
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                             "shape": (4, (size - hlen) // 16)})
    header = f.getvalue()
    assert len(header) == hlen and (size - hlen) % 16 == 0
    stream = _zero_bomb(header, blocks=size >> 24)
    assert len(stream) < 4 << 20 and _bounded_inflate(stream, 64 << 20) >= 64 << 20  # a real bomb
    members["embeddings.npy"] = (stream, zipfile.ZIP_DEFLATED, size, 0)
    sidecar_path(path).write_bytes(_zip(members))
    t0 = time.monotonic()
    peak = _traced_peak(lambda: refused(path, r"'embeddings' expands to 3221225472 bytes, over the",
                                        MapTooLargeError))
    assert peak < 32 << 20, peak
    assert time.monotonic() - t0 < 10


def test_compressed_sidecar_lying_about_its_size_stops_at_the_declared_size(tmp_path: Path) -> None:
    """The same bomb declaring 1 KiB: decompression stops at the declared size (then the CRC or npy check fails);
    memory stays bounded."""
    path = saved(tmp_path)
    members = _sidecar_members(path)
    stream = _zero_bomb(_npy(np.zeros((4, 16), np.float32))[:128], blocks=64)
    members["embeddings.npy"] = (stream, zipfile.ZIP_DEFLATED, 1024, 0)
    sidecar_path(path).write_bytes(_zip(members))
    peak = _traced_peak(lambda: refused(path, r"'embeddings' (is corrupt|declares shape)"))
    assert peak < 32 << 20, peak


def test_compressed_sidecar_over_a_small_limit(tmp_path: Path) -> None:
    """np.savez_compressed arrays of 64 MiB against a 4 MiB limit; the same file loads without the limit."""
    path = saved(tmp_path)
    _, meta, arrays = read_pair(path)
    arrays["camera_positions"] = np.zeros(((64 << 20) // 24, 3))
    with open(sidecar_path(path), "wb") as f:
        np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)
    assert sidecar_path(path).stat().st_size < 1 << 20
    peak = _traced_peak(lambda: refused(path, r"'camera_positions' expands to \d+ bytes", MapTooLargeError,
                                        max_bytes=4 << 20))
    assert peak < 16 << 20, peak
    assert load_map(path, max_bytes=None).camera_positions.shape == ((64 << 20) // 24, 3)


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_sidecar_with_unbounded_compression_methods_refused(tmp_path: Path, method: int) -> None:
    path = saved(tmp_path)
    _, meta, arrays = read_pair(path)
    arrays["meta"] = np.array(json.dumps(meta))
    with zipfile.ZipFile(sidecar_path(path), "w", compression=method) as zf:
        for k, a in arrays.items():
            zf.writestr(f"{k}.npy", _npy(a))
    refused(path, rf"compression method {method}")


def test_npy_header_declaring_more_than_its_bytes(tmp_path: Path) -> None:
    """np.load would allocate the declared (10^12-element) array before noticing the data is missing."""
    path = saved(tmp_path)
    members = _sidecar_members(path)
    good = _npy(np.zeros(4, np.float64))
    hdr_end = good.index(b"\n") + 1
    header = good[:hdr_end].replace(b"(4,), ", b"(1000000000000,), ")
    header = header[:8] + struct.pack("<H", len(header) - 10) + header[10:]
    crafted = header + good[hdr_end:]
    members["yaws.npy"] = (crafted, zipfile.ZIP_STORED, len(crafted), zlib.crc32(crafted))
    sidecar_path(path).write_bytes(_zip(members))
    peak = _traced_peak(lambda: refused(path, r"'yaws' declares shape \(1000000000000,\)"))
    assert peak < 8 << 20


def test_truncated_and_garbage_sidecars(tmp_path: Path) -> None:
    path = saved(tmp_path)
    side = sidecar_path(path)
    good = side.read_bytes()
    for data in (good[: len(good) // 3], good[:-30], b"PK\x03\x04" + os.urandom(200), b"", b"\x00" * 4096):
        side.write_bytes(data)
        refused(path, r"sidecar")


def test_sparse_gigabyte_map_file_refused_before_reading(tmp_path: Path) -> None:
    """A 1 GiB sparse file (a valid map header, then holes) under a 64 MiB limit, and 1 GiB + 1 byte under the
    default limit: refused from its size without reading it (traced memory < 1 MiB)."""
    path = saved(tmp_path)
    header = path.read_bytes()[:600]
    with open(path, "r+b") as f:
        f.write(header)
        f.truncate(1 << 30)
    assert path.stat().st_size == 1 << 30
    peak = _traced_peak(lambda: refused(path, r"is 1073741824 bytes, over the limit of 67108864 bytes",
                                        MapTooLargeError, max_bytes=64 << 20))
    assert peak < 1 << 20, peak
    with open(path, "r+b") as f:
        f.truncate(DEFAULT_MAX_MAP_BYTES + 1)
    peak = _traced_peak(lambda: refused(path, r"over the limit", MapTooLargeError))
    assert peak < 1 << 20, peak


def test_oversized_sidecar_file_refused(tmp_path: Path) -> None:
    path = saved(tmp_path)
    with open(sidecar_path(path), "r+b") as f:
        f.truncate(2 << 20)
    refused(path, r"sidecar .* over the limit of 1048576", MapTooLargeError, max_bytes=1 << 20)


def test_fifo_directory_and_device_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.ply"
    os.mkfifo(fifo)
    refused(fifo, r"not a regular file")  # opened non-blocking: no writer needed
    (tmp_path / "dir.ply").mkdir()
    refused(tmp_path / "dir.ply", r"not a regular file|cannot open")
    (tmp_path / "zero.ply").symlink_to("/dev/zero")
    refused(tmp_path / "zero.ply", r"not a regular file")
    path = saved(tmp_path)
    side = sidecar_path(path)
    side.unlink()
    os.mkfifo(side)
    refused(path, r"sidecar .* not a regular file")


# ------------------------------------------------------------------------------------------------ nothing else escapes


def test_random_corruptions_raise_only_map_load_errors(tmp_path: Path) -> None:
    """400 seeded random corruptions of PLY (checksum updated, so the parser sees them) and sidecar bytes: every
    load either raises a MapLoadError or returns a snapshot that fusion's snapshot import accepts."""
    path = saved(tmp_path)
    ply, meta, arrays = read_pair(path)
    side = sidecar_path(path)
    write_pair(path, ply, meta, arrays, fix_sha=False)
    side_bytes = side.read_bytes()
    rng = np.random.default_rng(0)
    outcomes = {"refused": 0, "accepted": 0}
    for i in range(400):
        p, s = bytearray(ply), bytearray(side_bytes)
        target = p if i % 2 == 0 else s
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(0, len(target)))
            op = int(rng.integers(0, 3))
            if op == 0:
                target[pos] = int(rng.integers(0, 256))
            elif op == 1:
                del target[pos: pos + int(rng.integers(1, 64))]
            else:
                target[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
        if target is p:  # keep the checksum consistent so the corruption reaches the parser and validators
            m = dict(meta, ply_sha256=hashlib.sha256(bytes(p)).hexdigest())
            write_pair(path, bytes(p), m, arrays, fix_sha=False, side=side)
        else:
            path.write_bytes(bytes(p))
            side.write_bytes(bytes(s))
        try:
            snap = load_map(path)
        except MapLoadError as e:
            assert len(str(e)) < 1000
            outcomes["refused"] += 1
            continue
        SemanticGaussianMap.from_snapshot(snap)
        outcomes["accepted"] += 1
    assert outcomes["refused"] > 300, outcomes


def test_unexpected_internal_errors_still_surface_as_map_load_errors(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: a check that raised TypeError (a bug) would still reach callers as a MapFormatError."""
    path = saved(tmp_path)

    def broken(*a, **k):
        raise TypeError("simulated bug")

    monkeypatch.setattr(persistence, "vertex_array_to_gaussians", broken)
    refused(path, r"invalid map data \(TypeError: simulated bug\)")


def test_genuine_maps_still_round_trip_and_import(tmp_path: Path) -> None:
    """Maps made by save_map load (default limit) and import into fusion: weights or not, no instances, empty."""
    from langgs_ros.types import Gaussians, InstanceTable, MapSnapshot

    for i, snap in enumerate([make_snapshot(n=300), make_snapshot(n=50, weights=False), make_snapshot(n=40, k=0),
                              MapSnapshot(gaussians=Gaussians.empty(), instances=InstanceTable.empty(8),
                                          encoder_id="e")]):
        if len(snap.instances) == 0:
            snap.gaussians.instance_ids[:] = -1
        path = tmp_path / f"g{i}.ply"
        save_map(snap, path)
        back = load_map(path)
        assert torch.equal(back.gaussians.means, snap.gaussians.means)
        SemanticGaussianMap.from_snapshot(back)


def test_save_refuses_what_load_would_refuse(tmp_path: Path) -> None:
    """save_map checks the same invariants, so a saved map always loads again."""
    cases = {
        "missing from the table": lambda s: s.gaussians.instance_ids.__setitem__(0, 99),
        "zero rows": lambda s: s.instances.embeddings.__setitem__(1, 0.0),
        "weights": lambda s: s.gaussians.weights.__setitem__(2, 0.0),
        "stamp": lambda s: setattr(s, "stamp", -1.0),
        "frame_id": lambda s: setattr(s, "frame_id", ""),
        "means": lambda s: s.gaussians.means.__setitem__((0, 0), 1e9),
        "ids": lambda s: setattr(s.instances, "ids", np.array([0, 10, 20, 2**25], np.int32)),
    }
    for match, edit in cases.items():
        snap = make_snapshot(n=50)
        edit(snap)
        with pytest.raises(ValueError, match=match):
            save_map(snap, tmp_path / "x.ply")
    assert not (tmp_path / "x.ply").exists()


def test_save_cleanup_deletes_only_its_own_sidecars(tmp_path: Path) -> None:
    """Neighbours matching the old sidecar glob (``m.ply.*.instances.npz``) survive a save; an orphaned sidecar of
    an unfinished save of the same map (genuine, uuid in its metadata) is removed."""
    path = saved(tmp_path)
    first_sidecar = sidecar_path(path)
    backup = tmp_path / "m.ply.backup.instances.npz"
    backup.write_bytes(b"user data")
    hex_named = tmp_path / f"m.ply.{'ab' * 16}.instances.npz"
    hex_named.write_bytes(b"not a sidecar")
    other_map = saved(tmp_path, "other.ply")
    impostor = tmp_path / f"m.ply.{'cd' * 16}.instances.npz"  # a genuine sidecar, but of another map
    impostor.write_bytes(sidecar_path(other_map).read_bytes())
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / f"m.ply.{'ef' * 16}.instances.npz"
    link.symlink_to(target)
    save_map(make_snapshot(n=30, seed=5), path)
    assert not first_sidecar.exists()  # the previous save's own sidecar is cleaned up
    for p in (backup, hex_named, impostor, link, target, sidecar_path(other_map)):
        assert p.exists(), p
    assert target.read_text() == "keep me" and backup.read_bytes() == b"user data"
    assert len(load_map(path).gaussians) == 30


def test_save_cleanup_escapes_glob_metacharacters(tmp_path: Path) -> None:
    """Saving ``a*.ply`` must not treat the name as a pattern matching ``ab.ply``'s sidecars."""
    ab = saved(tmp_path, "ab.ply")
    star = saved(tmp_path, "a*.ply")
    save_map(make_snapshot(n=20), star)
    assert sidecar_path(ab).exists() and len(load_map(ab).gaussians) == 60
    assert len(load_map(star).gaussians) == 20


def test_big_endian_ply_and_repeated_property(tmp_path: Path) -> None:
    """The PLY is decoded from its validated header (not plyfile's per-record loop): a big-endian file written by
    plyfile with the same content loads to the same map; a repeated property name is refused."""
    from plyfile import PlyData, PlyElement

    path = saved(tmp_path)
    ref = load_map(path)
    ply, meta, arrays = read_pair(path)
    src = PlyData.read(io.BytesIO(ply))
    buf = io.BytesIO()
    PlyData([PlyElement.describe(src["vertex"].data, "vertex")], text=False, byte_order=">",
            comments=src.comments).write(buf)
    write_pair(path, buf.getvalue(), meta, arrays)
    back = load_map(path)
    for name in ("means", "quats", "scales", "opacities", "colors", "instance_ids", "weights"):
        assert torch.equal(getattr(back.gaussians, name), getattr(ref.gaussians, name)), name
    lines, body = header_and_body(ply)
    write_pair(path, ply_bytes([*lines, "property float x"], body), meta, arrays)
    refused(path, r"property 'x' repeated")
