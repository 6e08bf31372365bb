"""Tests of langgs_ros.persistence: PLY layout, exact round trip, validation and atomic writes."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement
from scipy.spatial.transform import Rotation

from langgs_ros import persistence
from langgs_ros.persistence import (
    C0,
    PLY_PROPERTIES,
    EncoderMismatchError,
    MapFormatError,
    MapLoadError,
    load_map,
    map_info,
    save_map,
    sidecar_path,
)
from langgs_ros.types import Gaussians, InstanceTable, MapSnapshot

STANDARD = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
            "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


def make_snapshot(n: int = 500, k: int = 4, dim: int = 16, seed: int = 0, weights: bool = True,
                  encoder_id: str = "test:encoder-a") -> MapSnapshot:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    g = Gaussians(
        means=torch.as_tensor(rng.normal(0, 3, (n, 3)).astype(f32)),
        quats=torch.as_tensor(Rotation.random(n, random_state=seed).as_quat(scalar_first=True).astype(f32)),
        scales=torch.as_tensor(rng.uniform(0.001, 0.3, (n, 3)).astype(f32)),
        opacities=torch.as_tensor(rng.uniform(0.0, 1.0, n).astype(f32)),
        colors=torch.as_tensor(rng.uniform(0.0, 1.0, (n, 3)).astype(f32)),
        instance_ids=torch.as_tensor(rng.integers(-1, k, n).astype(np.int32) * 10),
        weights=torch.as_tensor(rng.uniform(0.1, 5, n).astype(f32)) if weights else None,
    )
    g.instance_ids[g.instance_ids < 0] = -1
    emb = torch.nn.functional.normalize(torch.as_tensor(rng.normal(size=(k, dim)).astype(f32)), dim=1)
    inst = InstanceTable(
        ids=np.arange(k, dtype=np.int32) * 10, embeddings=emb, names=["chair", None, "desk lamp", "ü-name"][:k],
        centers=rng.normal(size=(k, 3)), sizes=rng.uniform(0.1, 2, (k, 3)), yaws=rng.uniform(-3, 3, k),
        num_gaussians=rng.integers(1, 100, k).astype(np.int64), observations=rng.uniform(1, 9, k))
    return MapSnapshot(gaussians=g, instances=inst, encoder_id=encoder_id, up=np.array([0.0, 0.0, 1.0]),
                       frame_id="map", camera_positions=rng.normal(size=(7, 3)), floor_height=-0.25,
                       stamp=1234.5678, version=42)


def expected_preactivation(g: Gaussians) -> dict[str, np.ndarray]:
    """Pre-activation values computed independently, float64 then rounded to float32."""
    col = g.colors.numpy().astype(np.float64)
    a = np.clip(g.opacities.numpy().astype(np.float64), 1e-6, 1 - 1e-6)
    out = {f"f_dc_{i}": ((col[:, i] - 0.5) / C0).astype(np.float32) for i in range(3)}
    out["opacity"] = np.log(a / (1 - a)).astype(np.float32)
    for i in range(3):
        out[f"scale_{i}"] = np.log(g.scales.numpy()[:, i].astype(np.float64)).astype(np.float32)
    for i in range(4):
        out[f"rot_{i}"] = g.quats.numpy()[:, i]
    return out


def test_ply_layout_and_plain_plyfile_read(tmp_path: Path) -> None:
    snap = make_snapshot()
    path = tmp_path / "map.ply"
    save_map(snap, path)
    with open(path, "rb") as f:
        head = f.read(4096)
    assert b"format binary_little_endian 1.0" in head
    ply = PlyData.read(str(path))
    v = ply["vertex"]
    names = [p.name for p in v.properties]
    assert names == [*STANDARD, "instance_id", "weight"] == list(PLY_PROPERTIES)
    assert all(p.val_dtype.endswith("f4") for p in v.properties if p.name != "instance_id")
    assert next(p for p in v.properties if p.name == "instance_id").val_dtype.endswith("i4")
    assert len(v.data) == len(snap.gaussians)
    # Standard 3DGS reading recovers the activated values.
    d = v.data
    np.testing.assert_array_equal(np.c_[d["x"], d["y"], d["z"]], snap.gaussians.means.numpy())
    np.testing.assert_allclose(0.5 + C0 * np.c_[d["f_dc_0"], d["f_dc_1"], d["f_dc_2"]], snap.gaussians.colors.numpy(),
                               atol=1e-6)
    np.testing.assert_allclose(1 / (1 + np.exp(-d["opacity"])), np.clip(snap.gaussians.opacities.numpy(), 1e-6, 1),
                               atol=1e-6)
    np.testing.assert_array_equal(np.c_[d["nx"], d["ny"], d["nz"]], 0)
    # Exact stored pre-activation arrays.
    for name, arr in expected_preactivation(snap.gaussians).items():
        np.testing.assert_array_equal(d[name], arr, err_msg=name)
    np.testing.assert_array_equal(d["instance_id"], snap.gaussians.instance_ids.numpy())
    # Exactly one sidecar, named after the uuid in the header.
    sidecars = list(tmp_path.glob("map.ply.*.instances.npz"))
    assert sidecars == [sidecar_path(path)]
    uuid_comment = [c for c in ply.comments if c.startswith("langgs_map_uuid")]
    assert len(uuid_comment) == 1 and uuid_comment[0].split()[1] in sidecars[0].name
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


@pytest.mark.parametrize("weights", [True, False])
def test_exact_round_trip(tmp_path: Path, weights: bool) -> None:
    snap = make_snapshot(weights=weights)
    path = tmp_path / "map.ply"
    save_map(snap, path)
    back = load_map(path, expected_encoder_id="test:encoder-a")
    g, h = snap.gaussians, back.gaussians
    assert torch.equal(h.means, g.means)  # bit-exact
    assert torch.equal(h.instance_ids, g.instance_ids) and h.instance_ids.dtype == torch.int32
    assert torch.equal(back.instances.embeddings, snap.instances.embeddings)
    assert (h.weights is None) == (not weights)
    if weights:
        assert torch.equal(h.weights, g.weights)
    # Activations: within float32 rounding (opacity clamp documented).
    torch.testing.assert_close(h.colors, g.colors, atol=2e-7, rtol=0)
    torch.testing.assert_close(h.opacities, g.opacities.clamp(1e-6, 1 - 1e-6), atol=2e-7, rtol=0)
    torch.testing.assert_close(h.scales, g.scales, atol=0, rtol=3e-7)
    torch.testing.assert_close(h.quats, torch.nn.functional.normalize(g.quats.double(), dim=1).float(),
                               atol=2e-7, rtol=0)
    # Saving the loaded map again stores identical pre-activation arrays for the exactly-invertible fields.
    path2 = tmp_path / "again.ply"
    save_map(back, path2)
    d1, d2 = PlyData.read(str(path))["vertex"].data, PlyData.read(str(path2))["vertex"].data
    for name in ("x", "y", "z", "instance_id", "weight"):
        np.testing.assert_array_equal(d1[name], d2[name])
    for name in STANDARD[6:]:
        np.testing.assert_allclose(d2[name], d1[name], rtol=1e-5, atol=1e-5)
    # Instance table and metadata.
    a, b = snap.instances, back.instances
    np.testing.assert_array_equal(b.ids, a.ids)
    assert b.names == a.names
    for name in ("centers", "sizes", "yaws", "num_gaussians", "observations"):
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name))
    assert b.num_gaussians.dtype == np.int64 and b.ids.dtype == np.int32
    np.testing.assert_array_equal(back.camera_positions, snap.camera_positions)
    np.testing.assert_array_equal(back.up, snap.up)
    assert (back.encoder_id, back.frame_id, back.floor_height, back.stamp, back.version) == \
        (snap.encoder_id, snap.frame_id, snap.floor_height, snap.stamp, snap.version)


def test_empty_map_round_trip(tmp_path: Path) -> None:
    snap = MapSnapshot(gaussians=Gaussians.empty(), instances=InstanceTable.empty(8), encoder_id="e")
    save_map(snap, tmp_path / "empty.ply")
    back = load_map(tmp_path / "empty.ply")
    assert len(back.gaussians) == 0 and len(back.instances) == 0 and back.instances.embeddings.shape == (0, 8)
    assert back.floor_height is None
    info = map_info(tmp_path / "empty.ply")
    assert info["num_gaussians"] == 0 and info["bounds_min"] is None


def test_map_info(tmp_path: Path) -> None:
    snap = make_snapshot()
    save_map(snap, tmp_path / "m.ply")
    info = map_info(tmp_path / "m.ply")
    assert info["num_gaussians"] == 500 and info["num_instances"] == 4
    assert info["num_labelled"] == int((snap.gaussians.instance_ids >= 0).sum())
    np.testing.assert_allclose(info["bounds_min"], snap.gaussians.means.numpy().min(0))
    np.testing.assert_allclose(info["bounds_max"], snap.gaussians.means.numpy().max(0))
    assert info["encoder_id"] == "test:encoder-a" and info["embedding_dim"] == 16
    assert [i["name"] for i in info["instances"]] == snap.instances.names
    json.dumps(info)  # serialisable for the CLI


def test_encoder_mismatch_refused(tmp_path: Path) -> None:
    save_map(make_snapshot(), tmp_path / "m.ply")
    with pytest.raises(EncoderMismatchError, match="test:encoder-a"):
        load_map(tmp_path / "m.ply", expected_encoder_id="open_clip:ViT-B-16:laion2b_s34b_b88k")
    assert issubclass(EncoderMismatchError, ValueError) and issubclass(MapFormatError, MapLoadError)


def test_missing_sidecar_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "m.ply"
    with pytest.raises(MapFormatError, match="not found"):
        load_map(path)
    save_map(make_snapshot(), path)
    sidecar_path(path).unlink()
    with pytest.raises(MapFormatError, match="sidecar missing"):
        load_map(path)


def test_plain_3dgs_ply_refused(tmp_path: Path) -> None:
    v = np.zeros(3, dtype=[(n, "<f4") for n in STANDARD])
    PlyData([PlyElement.describe(v, "vertex")]).write(str(tmp_path / "plain.ply"))
    with pytest.raises(MapFormatError, match="not a langgs_ros map"):
        load_map(tmp_path / "plain.ply")


def _rewrite_ply(path: Path, vertex: np.ndarray) -> None:
    """Replace the PLY body keeping its header comments, and update the sidecar checksum to match."""
    ply = PlyData.read(str(path))
    side = sidecar_path(path)
    buf = io.BytesIO()
    PlyData([PlyElement.describe(vertex, "vertex")], text=False, byte_order="<", comments=ply.comments).write(buf)
    path.write_bytes(buf.getvalue())
    with np.load(side) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["ply_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    arrays["meta"] = np.array(json.dumps(meta))
    with open(side, "wb") as f:
        np.savez(f, **arrays)


def test_missing_property_and_nan_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.ply"
    save_map(make_snapshot(), path)
    d = PlyData.read(str(path))["vertex"].data
    keep = [n for n in d.dtype.names if n != "scale_1"]
    reduced = np.zeros(len(d), dtype=[(n, d.dtype[n]) for n in keep])
    for n in keep:
        reduced[n] = d[n]
    _rewrite_ply(path, reduced)
    with pytest.raises(MapFormatError, match="scale_1"):
        load_map(path)

    save_map(make_snapshot(), path)
    d = PlyData.read(str(path))["vertex"].data.copy()
    d["opacity"][3] = np.nan
    _rewrite_ply(path, d)
    with pytest.raises(MapFormatError, match="NaN"):
        load_map(path)


def test_truncated_and_corrupt_files_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.ply"
    save_map(make_snapshot(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(MapFormatError, match="checksum"):
        load_map(path)
    # A flipped byte in the body (still parses, no NaN) is caught by the checksum.
    bad = bytearray(data)
    bad[-10] ^= 0x01
    path.write_bytes(bytes(bad))
    with pytest.raises(MapFormatError, match="checksum"):
        load_map(path)
    # Truncated header.
    path.write_bytes(data[:40])
    with pytest.raises(MapFormatError):
        load_map(path)
    # Truncated sidecar.
    path.write_bytes(data)
    side = sidecar_path(path)
    sd = side.read_bytes()
    side.write_bytes(sd[: len(sd) // 2])
    with pytest.raises(MapFormatError, match="sidecar"):
        load_map(path)


def test_mismatched_pair_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.ply", tmp_path / "b.ply"
    save_map(make_snapshot(seed=1), a)
    save_map(make_snapshot(seed=2), b)
    # Put b's sidecar where a's PLY looks for its own.
    os.replace(sidecar_path(b), sidecar_path(a))
    with pytest.raises(MapFormatError, match="belongs to map"):
        load_map(a)


def test_invalid_snapshot_refused_before_writing(tmp_path: Path) -> None:
    snap = make_snapshot()
    snap.gaussians.means[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        save_map(snap, tmp_path / "m.ply")
    snap = make_snapshot()
    snap.instances.names = ["only one"]
    with pytest.raises(ValueError, match="names"):
        save_map(snap, tmp_path / "m.ply")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        save_map(make_snapshot(), tmp_path / "no" / "such" / "dir" / "m.ply")


@pytest.mark.parametrize("fail_at", [1, 2])
def test_failed_write_keeps_previous_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
    """A crash at either rename leaves the previous map loadable and unchanged, and no stray files."""
    path = tmp_path / "m.ply"
    old = make_snapshot(seed=1)
    save_map(old, path)
    before = sorted(p.name for p in tmp_path.iterdir())
    calls = {"n": 0}
    real_replace = os.replace

    def flaky_replace(src: str | Path, dst: str | Path) -> None:
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError("simulated crash during os.replace")
        return real_replace(src, dst)

    monkeypatch.setattr(persistence.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="simulated"):
        save_map(make_snapshot(seed=2, n=50), path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    back = load_map(path)
    assert torch.equal(back.gaussians.means, old.gaussians.means)


def test_killed_between_renames_reader_sees_old_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a kill after the sidecar rename (no cleanup runs): the old map still loads; next save cleans up."""
    path = tmp_path / "m.ply"
    old = make_snapshot(seed=1)
    save_map(old, path)
    real_replace = os.replace

    class Killed(BaseException):
        pass

    def killing_replace(src: str | Path, dst: str | Path) -> None:
        if str(dst) == str(path):
            raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr(persistence.os, "replace", killing_replace)
    monkeypatch.setattr(persistence.os, "unlink", lambda *a, **k: None)  # a killed process cleans nothing
    with pytest.raises(Killed):
        save_map(make_snapshot(seed=2, n=50), path)
    monkeypatch.undo()
    assert len(list(tmp_path.glob("m.ply.*.instances.npz"))) == 2  # orphan sidecar of the unfinished save
    assert torch.equal(load_map(path).gaussians.means, old.gaussians.means)
    for t in tmp_path.glob(".*.tmp"):  # leftovers of the killed process
        t.unlink()
    new = make_snapshot(seed=3, n=60)
    save_map(new, path)
    assert [p.name for p in tmp_path.glob("m.ply.*.instances.npz")] == [sidecar_path(path).name]
    assert torch.equal(load_map(path).gaussians.means, new.gaussians.means)


def test_load_retries_when_a_concurrent_save_replaces_the_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.ply"
    save_map(make_snapshot(seed=1), path)
    new = make_snapshot(seed=2, n=80)
    real = persistence._load_sidecar
    state = {"raced": False}

    def racing_load_sidecar(side: Path, *args):  # a writer commits a new save (removing the old sidecar) mid-load
        if not state["raced"]:
            state["raced"] = True
            save_map(new, path)
        return real(side, *args)

    monkeypatch.setattr(persistence, "_load_sidecar", racing_load_sidecar)
    back = load_map(path)
    assert state["raced"] and torch.equal(back.gaussians.means, new.gaussians.means)
