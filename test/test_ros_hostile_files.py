"""Hostile map files over real (loopback) DDS: the mapping node, as its own process, answers ``~/load_map`` of each
crafted file and ``~/save_map`` of each forbidden name with success=false and a message saying what is wrong,
stays alive, and keeps its map: after every request ``/find_object`` answers exactly as before and the map's
Gaussian / instance counts on ``/diagnostics`` are unchanged.

Written against the node's service interface only (``~/save_map``, ``~/load_map``, ``find_object``, parameters
``map_dir``, ``allow_any_path``, ``limits.max_map_file_bytes``), so it applies to any implementation of the node.
The map the node holds during the test is built here from a few hundred Gaussians per object with embeddings
made by the node's own text encoder (read from a map the node saved), so that ``/find_object`` has real answers;
the crafted files are mutations of that map, so they pass the encoder check and reach the deeper validation.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from ros_helpers import DiagnosticsWatcher, call_service, process_rss_mb, start_node_process, stop_process
from test_persistence_hostile import (
    _sidecar_members,
    _zero_bomb,
    _zip,
    mutate_array,
    mutate_meta,
    read_pair,
    replace_vertices,
    vertex_records,
    write_pair,
)

from langgs_ros.persistence import save_map, sidecar_path
from langgs_ros.types import Gaussians, InstanceTable, MapSnapshot

pytestmark = [pytest.mark.ros, pytest.mark.slow]

OBJECTS = {"red backpack": (1.0, 0.5, 0.3), "sofa": (-1.5, 2.0, 0.4), "desk lamp": (0.5, -2.0, 1.2)}


@pytest.fixture
def client(spinning_executor):
    from rclpy.node import Node

    node = spinning_executor.add(Node("hostile_files_client", context=spinning_executor.executor.context))
    node.diag = DiagnosticsWatcher(node)
    return node


@pytest.fixture
def node(tmp_path: Path, ros_domain):
    """The mapping node in its own process with ``map_dir`` = tmp_path/maps; yields (process, map_dir)."""
    maps = tmp_path / "maps"
    maps.mkdir()
    # the size limit is set explicitly (1 GiB) so the sparse-file case does not depend on the node's default
    params = {"backend": "rgbd", "semantic_source": "labels", "pose_source": "odometry", "map_dir": str(maps),
              "limits.max_map_file_bytes": 1 << 30}
    proc = start_node_process(params, log_path=tmp_path / "node.log")
    yield proc, maps
    code = stop_process(proc)
    assert code == 0, (tmp_path / "node.log").read_text()[-3000:]


def srv(client, kind: str, path: str, timeout: float = 90.0):
    from langgs_ros.srv import LoadMap, SaveMap

    t = {"save": SaveMap, "load": LoadMap}[kind]
    return call_service(client, t, f"/mapping_node/{kind}_map", t.Request(path=path), timeout=timeout)


def fingerprint(client) -> tuple:
    """What /find_object answers for each object (ids, labels, scores, poses, sizes, support) + the map stamp."""
    from langgs_ros.srv import FindObject

    out = []
    for text in OBJECTS:
        r = call_service(client, FindObject, "/find_object", FindObject.Request(query=text, max_results=5), timeout=60)
        assert r.success, r.message
        out.append((r.map_stamp.sec, r.map_stamp.nanosec, tuple(
            (o.instance_id, o.label, round(o.score, 5), round(o.pose.pose.position.x, 5),
             round(o.pose.pose.position.y, 5), round(o.pose.pose.position.z, 5), round(o.size.x, 5), o.num_gaussians)
            for o in r.objects)))
    return tuple(out)


def fresh_counts(client, timeout: float = 15.0) -> tuple[int, int]:
    """(map_gaussians, map_instances) from a /diagnostics message published after this call started."""
    start = client.diag.count
    deadline = time.monotonic() + timeout
    while client.diag.count < start + 2:  # the first one may have been on its way already
        if time.monotonic() > deadline:
            raise TimeoutError("no fresh diagnostics")
        time.sleep(0.05)
    return client.diag.get("map_gaussians"), client.diag.get("map_instances")


def node_space(client, maps: Path) -> tuple[str, int]:
    """(encoder_id, embedding_dim) of the node's map, read from a map the node saves (its empty map)."""
    resp = srv(client, "save", "probe/empty.ply")
    assert resp.success, resp.message
    path = maps / "probe" / "empty.ply"
    _, meta, _ = read_pair(path)
    return meta["encoder_id"], int(meta["embedding_dim"])


def build_good_map(path: Path, encoder_id: str, dim: int) -> None:
    """Three objects (300 Gaussians each, 0.3 m clusters) + 300 unlabelled Gaussians, embeddings by the node's
    encoder; written with save_map."""
    from langgs_ros.semantics.text import encoder_from_id

    enc = encoder_from_id(encoder_id)
    assert enc.dim == dim
    rng = np.random.default_rng(0)
    names = list(OBJECTS)
    means, ids = [], []
    for k, name in enumerate(names):
        means.append(rng.normal(OBJECTS[name], 0.1, (300, 3)))
        ids.append(np.full(300, k, np.int32))
    means.append(rng.uniform(-3, 3, (300, 3)) * [1, 1, 0.05])
    ids.append(np.full(300, -1, np.int32))
    means = np.concatenate(means).astype(np.float32)
    n = len(means)
    q = rng.normal(size=(n, 4))
    g = Gaussians(means=torch.as_tensor(means), quats=torch.as_tensor((q / np.linalg.norm(q, axis=1, keepdims=True))
                                                                     .astype(np.float32)),
                  scales=torch.full((n, 3), 0.02), opacities=torch.full((n,), 0.8),
                  colors=torch.as_tensor(rng.uniform(0, 1, (n, 3)).astype(np.float32)),
                  instance_ids=torch.as_tensor(np.concatenate(ids)), weights=torch.ones(n))
    centers = np.array([OBJECTS[name] for name in names])
    inst = InstanceTable(ids=np.arange(3, dtype=np.int32), embeddings=enc.encode_text(names).float(), names=names,
                         centers=centers, sizes=np.full((3, 3), 0.6), yaws=np.zeros(3),
                         num_gaussians=np.full(3, 300, np.int64), observations=np.full(3, 5.0))
    cams = np.array([[0.0, 0.0, 1.5], [1.0, 1.0, 1.5], [-1.0, 0.0, 1.5]])
    save_map(MapSnapshot(gaussians=g, instances=inst, encoder_id=encoder_id, camera_positions=cams, stamp=100.0,
                         version=1), path)


def copy_map(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    shutil.copyfile(sidecar_path(src), sidecar_path(dst))
    return dst


def loaded_good_map(client, maps: Path) -> tuple[Path, tuple, tuple[int, int]]:
    """Build the good map, load it into the node; returns (path, find_object fingerprint, counts)."""
    encoder_id, dim = node_space(client, maps)
    good = maps / "good.ply"
    build_good_map(good, encoder_id, dim)
    resp = srv(client, "load", "good.ply")
    assert resp.success and resp.num_instances == 3, resp.message
    fp = fingerprint(client)
    assert all(ans for _, _, ans in fp), fp  # every object is found
    assert {ans[0][1] for _, _, ans in fp} == set(OBJECTS)
    counts = fresh_counts(client)
    assert counts[1] == 3 and counts[0] > 500, counts
    return good, fp, counts


# ------------------------------------------------------------------------------------------------ crafted files


def _null_total(p: Path) -> None:
    mutate_meta(p, num_gaussians_total=None)


def _missing_names(p: Path) -> None:
    ply, meta, arrays = read_pair(p)
    del meta["names"]
    write_pair(p, ply, meta, arrays, fix_sha=False)


def _int_embeddings(p: Path) -> None:
    mutate_array(p, "embeddings", read_pair(p)[2]["embeddings"].astype(np.int32))


def _bad_shape(p: Path) -> None:
    mutate_array(p, "centers", np.zeros((3, 2)))


def _nan_embedding(p: Path) -> None:
    e = read_pair(p)[2]["embeddings"].copy()
    e[1, 0] = np.nan
    mutate_array(p, "embeddings", e)


def _unknown_instance(p: Path) -> None:
    v = vertex_records(p)
    v["instance_id"][10] = 9  # the table has ids 0, 1, 2
    replace_vertices(p, v)


def _count_mismatch(p: Path) -> None:
    mutate_meta(p, num_gaussians_total=read_pair(p)[1]["num_gaussians_total"] + 1)


def _bomb(p: Path) -> None:
    members = _sidecar_members(p)
    size = 3 << 30
    import io

    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (3, 0)})
    hlen = len(f.getvalue())
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                             "shape": (3, (size - hlen) // 12)})
    members["embeddings.npy"] = (_zero_bomb(f.getvalue(), blocks=size >> 24), zipfile.ZIP_DEFLATED, size, 0)
    sidecar_path(p).write_bytes(_zip(members))


def _truncated(p: Path) -> None:
    ply, meta, arrays = read_pair(p)
    write_pair(p, ply[:-40], meta, arrays)


def _huge_stamp(p: Path) -> None:
    mutate_meta(p, stamp=1e12)  # does not fit builtin_interfaces/Time (int32 s)


def _other_encoder(p: Path) -> None:
    mutate_meta(p, encoder_id="open_clip:ViT-B-16:laion2b_s34b_b88k")


def _other_dim(p: Path) -> None:
    ply, meta, arrays = read_pair(p)
    arrays["embeddings"] = np.ones((3, 16), np.float32)
    meta["embedding_dim"] = 16
    write_pair(p, ply, meta, arrays, fix_sha=False)


def _string_weights_flag(p: Path) -> None:
    mutate_meta(p, has_weights="yes")


CRAFTED: list[tuple[str, Callable[[Path], None], str]] = [
    ("null_total", _null_total, r"num_gaussians_total"),
    ("missing_field", _missing_names, r"lacks \['names'\]"),
    ("int_embeddings", _int_embeddings, r"'embeddings' must have a float dtype"),
    ("bad_shape", _bad_shape, r"'centers' has shape"),
    ("nan", _nan_embedding, r"NaN/inf"),
    ("unknown_instance", _unknown_instance, r"missing from the sidecar's table"),
    ("count_mismatch", _count_mismatch, r"vertices, sidecar expects"),
    ("bomb", _bomb, r"expands to 3221225472 bytes"),
    ("truncated", _truncated, r"truncated or padded"),
    ("huge_stamp", _huge_stamp, r"stamp"),
    ("other_encoder", _other_encoder, r"encoder"),
    ("other_dim", _other_dim, r"16-d embeddings"),
    ("string_flag", _string_weights_flag, r"has_weights"),
]


def test_crafted_map_files_are_refused_and_the_map_is_kept(client, node, tmp_path: Path) -> None:
    proc, maps = node
    good, fp0, counts0 = loaded_good_map(client, maps)

    def check_refused(name: str, match: str) -> None:
        import re

        resp = srv(client, "load", name)
        assert not resp.success, (name, resp.message)
        assert re.search(match, resp.message), (name, resp.message)
        assert resp.num_gaussians == 0 and resp.num_instances == 0
        assert proc.poll() is None, f"the node died on {name}"
        assert fingerprint(client) == fp0, f"/find_object answers changed after {name}"

    for case, craft, match in CRAFTED:
        craft(copy_map(good, maps / f"{case}.ply"))
        check_refused(f"{case}.ply", match)
    # not a map at all, and a missing one
    (maps / "garbage.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 10\nend_header\n\x00")
    check_refused("garbage.ply", r"not a langgs_ros map")
    check_refused("nope.ply", r"not found")
    # a FIFO (a plain open() would block the service thread forever) and a directory
    os.mkfifo(maps / "fifo.ply")
    check_refused("fifo.ply", r"not a regular file")
    (maps / "dir.ply").mkdir()
    check_refused("dir.ply", r"not a regular file")
    # names outside map_dir
    outside = tmp_path / "outside"
    copy_map(good, outside / "x.ply")
    check_refused("../outside/x.ply", r"'\.\.' is not allowed")
    check_refused(str(outside / "x.ply"), r"absolute paths are not allowed")
    (maps / "link.ply").symlink_to(outside / "x.ply")
    check_refused("link.ply", r"leads outside map_dir")
    # a sparse file 1 byte over the 1 GiB limit: refused from its size, not read into memory
    sparse = maps / "sparse.ply"
    sparse.write_bytes(good.read_bytes()[:700])
    with open(sparse, "r+b") as f:
        f.truncate((1 << 30) + 1)
    rss0 = process_rss_mb(proc.pid)
    check_refused("sparse.ply", r"over the limit of 1073741824 bytes")
    assert process_rss_mb(proc.pid) - rss0 < 200, "the node read the sparse file"

    assert fresh_counts(client) == counts0
    resp = srv(client, "load", "good.ply")  # the good map still loads after all that
    assert resp.success, resp.message
    assert proc.poll() is None


def test_forbidden_saves_are_refused_and_nothing_foreign_is_touched(client, node, tmp_path: Path) -> None:
    proc, maps = node
    _, fp0, counts0 = loaded_good_map(client, maps)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.ply"
    victim.write_text("an unrelated file")
    notes = maps / "notes.ply"
    notes.write_text("not a map")
    (maps / "out.ply").symlink_to(outside / "new.ply")
    before_outside = sorted(p.name for p in outside.iterdir())

    import re

    for name, match in [("../x.ply", r"'\.\.' is not allowed"), (str(victim), r"absolute paths are not allowed"),
                        ("out.ply", r"leads outside map_dir"), ("notes.ply", r"refusing to overwrite .*notes\.ply"),
                        ("map.txt", r"end in \.ply"), ("~/x.ply", r"absolute paths are not allowed")]:
        resp = srv(client, "save", name)
        assert not resp.success and re.search(match, resp.message), (name, resp.message)
        assert proc.poll() is None and fingerprint(client) == fp0, name
    assert victim.read_text() == "an unrelated file" and notes.read_text() == "not a map"
    assert sorted(p.name for p in outside.iterdir()) == before_outside
    assert not (tmp_path / "x.ply").exists()

    # a neighbouring file matching the sidecar pattern survives repeated saves
    neighbour = maps / "mine.ply.backup.instances.npz"
    neighbour.write_bytes(b"someone else's")
    for _ in range(2):
        resp = srv(client, "save", "mine.ply")
        assert resp.success and resp.num_instances == 3, resp.message
    assert neighbour.read_bytes() == b"someone else's"
    own = [p.name for p in maps.glob("mine.ply.*.instances.npz") if p != neighbour]
    assert own == [sidecar_path(maps / "mine.ply").name]
    assert fresh_counts(client) == counts0
    with np.load(sidecar_path(maps / "mine.ply")) as z:
        assert json.loads(str(z["meta"]))["num_gaussians_total"] == counts0[0]
    resp = srv(client, "load", "mine.ply")  # what the node saved loads back, with the counts it had
    assert resp.success and resp.num_gaussians == counts0[0] and resp.num_instances == 3, resp.message
