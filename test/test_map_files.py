"""MapDirectory: names confined to the map directory, saves that never overwrite or delete foreign files, loads
with a size limit; every refusal is one MapFileError with a message fit for a service response."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement
from test_persistence import STANDARD, make_snapshot

from langgs_ros.map_files import MapDirectory, MapFileError
from langgs_ros.persistence import save_map, sidecar_path


@pytest.fixture
def md(tmp_path: Path) -> MapDirectory:
    return MapDirectory(tmp_path / "maps")


def refused(fn, match: str) -> MapFileError:
    import re

    with pytest.raises(MapFileError) as info:
        fn()
    msg = str(info.value)
    assert re.search(match, msg), msg
    assert "\n" not in msg and len(msg) < 1000
    return info.value


def test_names_resolve_inside_the_root_which_is_created_on_demand(tmp_path: Path, md: MapDirectory) -> None:
    assert not (tmp_path / "maps").exists()
    p = md.resolve("office.ply")
    assert (tmp_path / "maps").is_dir()
    assert p == Path(os.path.realpath(tmp_path / "maps" / "office.ply"))
    assert md.resolve("site/floor2.ply") == Path(os.path.realpath(tmp_path / "maps")) / "site" / "floor2.ply"
    root_default = MapDirectory("~/some_maps_dir_that_is_not_created")
    assert root_default.root == Path(os.path.expanduser("~/some_maps_dir_that_is_not_created"))


@pytest.mark.parametrize("name, match", [
    ("../x.ply", r"'\.\.' is not allowed"),
    ("a/../../x.ply", r"'\.\.' is not allowed"),
    ("a/../x.ply", r"'\.\.' is not allowed"),
    ("/etc/x.ply", r"absolute paths are not allowed"),
    ("~/x.ply", r"absolute paths are not allowed"),
    ("x.txt", r"end in \.ply"),
    ("", r"empty map name"),
    ("   ", r"empty map name"),
    ("a\x00b.ply", r"NUL"),
    ("a" * 5000 + ".ply", r"longer than 4096"),
])
def test_refused_names(md: MapDirectory, name: str, match: str) -> None:
    e = refused(lambda: md.resolve(name), match)
    if "allowed" in match:
        assert "map_dir" in str(e) and "allow_any_path" in str(e)


def test_symlinks_leading_outside_are_refused_inside_ones_accepted(tmp_path: Path, md: MapDirectory) -> None:
    root = md.real_root()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "out.ply").symlink_to(outside / "x.ply")  # dangling, pointing out
    (root / "outdir").symlink_to(outside)
    (root / "in.ply").symlink_to(root / "real.ply")
    refused(lambda: md.resolve("out.ply"), r"leads outside map_dir through a symlink")
    refused(lambda: md.resolve("outdir/x.ply"), r"leads outside map_dir through a symlink")
    assert md.resolve("in.ply") == root / "real.ply"
    snap = make_snapshot(n=20)
    refused(lambda: md.save(snap, "outdir/x.ply"), r"leads outside")
    assert list(outside.iterdir()) == []


def test_allow_any_path(tmp_path: Path) -> None:
    md = MapDirectory(tmp_path / "maps", allow_any_path=True)
    target = tmp_path / "elsewhere" / "m.ply"
    target.parent.mkdir()
    assert md.resolve(str(target)) == Path(os.path.realpath(target))
    assert md.resolve("../elsewhere/m.ply") == Path(os.path.realpath(target))
    assert md.resolve("rel.ply") == md.real_root() / "rel.ply"
    md.save(make_snapshot(n=20), str(target))
    assert len(md.load(str(target)).gaussians) == 20


def test_save_and_load_round_trip_and_overwrite_own_map(md: MapDirectory) -> None:
    a, b = make_snapshot(n=40, seed=1), make_snapshot(n=25, seed=2)
    p = md.save(a, "m.ply")
    assert torch.equal(md.load("m.ply", expected_encoder_id="test:encoder-a").gaussians.means, a.gaussians.means)
    md.save(b, "m.ply")  # its own map file: overwritten atomically
    assert len(md.load("m.ply").gaussians) == 25
    assert [x.name for x in p.parent.iterdir() if x.name.endswith(".npz")] == [sidecar_path(p).name]
    md.save(a, "sub/dir/m.ply")
    assert len(md.load("sub/dir/m.ply").gaussians) == 40


def test_save_never_overwrites_an_unrelated_file_at_an_absolute_path(tmp_path: Path) -> None:
    """The issue's case: ~/save_map of an absolute path of an unrelated file overwrote it. Even with
    allow_any_path the file is left alone."""
    victim = tmp_path / "home" / "notes.ply"
    victim.parent.mkdir()
    victim.write_text("ply\nnot a map, but precious\n")
    for md in (MapDirectory(tmp_path / "maps"), MapDirectory(tmp_path / "maps", allow_any_path=True)):
        match = r"absolute paths are not allowed" if not md.allow_any_path else \
            r"refusing to overwrite .*notes\.ply: it exists and is not a langgs_ros map file"
        refused(lambda md=md: md.save(make_snapshot(n=10), str(victim)), match)
    assert victim.read_text() == "ply\nnot a map, but precious\n"
    assert sorted(p.name for p in victim.parent.iterdir()) == ["notes.ply"]


def test_save_refuses_foreign_files_inside_the_root(md: MapDirectory) -> None:
    root = md.real_root()
    (root / "text.ply").write_text("hello")
    plain = root / "splat.ply"  # a plain 3DGS PLY from another tool
    PlyData([PlyElement.describe(np.zeros(3, dtype=[(n, "<f4") for n in STANDARD]), "vertex")]).write(str(plain))
    plain_bytes = plain.read_bytes()
    (root / "dir.ply").mkdir()
    os.mkfifo(root / "fifo.ply")
    (root / "dangling.ply").symlink_to(root / "nowhere" / "x.ply")
    for name in ("text.ply", "splat.ply", "dir.ply", "fifo.ply"):
        refused(lambda name=name: md.save(make_snapshot(n=10), name), r"refusing to overwrite .* not a langgs_ros map")
    assert (root / "text.ply").read_text() == "hello" and plain.read_bytes() == plain_bytes
    # a dangling symlink inside the root resolves to its (missing) target inside the root: that is a new file
    md.save(make_snapshot(n=10), "dangling.ply")
    assert (root / "nowhere" / "x.ply").is_file() and (root / "dangling.ply").is_symlink()


def test_save_keeps_a_neighbour_matching_the_sidecar_glob(md: MapDirectory) -> None:
    """The issue's case: a neighbouring file matching the sidecar glob was deleted by a save."""
    root = md.real_root()
    md.save(make_snapshot(n=10), "m.ply")
    neighbours = [root / "m.ply.backup.instances.npz", root / f"m.ply.{'0' * 32}.instances.npz"]
    for n in neighbours:
        n.write_bytes(b"someone else's data")
    md.save(make_snapshot(n=12), "m.ply")
    md.save(make_snapshot(n=14), "m.ply")
    for n in neighbours:
        assert n.read_bytes() == b"someone else's data"
    assert len(md.load("m.ply").gaussians) == 14
    npz = sorted(p.name for p in root.iterdir() if p.name.endswith(".npz"))
    assert npz == sorted([n.name for n in neighbours] + [sidecar_path(root / "m.ply").name])


def test_load_size_limit_and_crafted_files(tmp_path: Path) -> None:
    md = MapDirectory(tmp_path / "maps", max_file_bytes=4096)
    root = md.real_root()
    save_map(make_snapshot(n=200), root / "big.ply")  # 200 x 76 bytes > 4096
    refused(lambda: md.load("big.ply"), r"big\.ply is \d+ bytes, over the limit of 4096 bytes")
    md = MapDirectory(tmp_path / "maps")
    assert len(md.load("big.ply").gaussians) == 200
    # the sidecar whose null num_gaussians_total escaped as a TypeError
    side = sidecar_path(root / "big.ply")
    with np.load(side) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["num_gaussians_total"] = None
    arrays["meta"] = np.array(json.dumps(meta))
    with open(side, "wb") as f:
        np.savez(f, **arrays)
    refused(lambda: md.load("big.ply"), r"num_gaussians_total.*None")
    refused(lambda: md.load("missing.ply"), r"map file not found")
    save_map(make_snapshot(n=20), root / "enc.ply")
    refused(lambda: md.load("enc.ply", expected_encoder_id="open_clip:x"), r"encoder")
    refused(lambda: md.load("enc.ply", expected_embedding_dim=384), r"16-d embeddings")


def test_load_refuses_a_sidecar_symlinked_outside(tmp_path: Path, md: MapDirectory) -> None:
    root = md.real_root()
    outside = tmp_path / "outside"
    outside.mkdir()
    save_map(make_snapshot(n=20), outside / "m.ply")
    (root / "m.ply").write_bytes((outside / "m.ply").read_bytes())
    (root / sidecar_path(outside / "m.ply").name).symlink_to(sidecar_path(outside / "m.ply"))
    refused(lambda: md.load("m.ply"), r"sidecar leads outside map_dir")
    assert len(MapDirectory(md.root, allow_any_path=True).load("m.ply").gaussians) == 20


def test_bad_configuration(tmp_path: Path) -> None:
    refused(lambda: MapDirectory(""), r"map_dir is empty")
    for bad in (0, -5, True, 1.5):
        refused(lambda bad=bad: MapDirectory(tmp_path, max_file_bytes=bad), r"positive number of bytes")
    (tmp_path / "file").write_text("x")
    refused(lambda: MapDirectory(tmp_path / "file").resolve("m.ply"), r"cannot create map directory")
    refused(lambda: MapDirectory(tmp_path / "file" / "sub").save(make_snapshot(n=5), "m.ply"),
            r"cannot create map directory")


def test_invalid_snapshot_is_a_map_file_error(md: MapDirectory) -> None:
    snap = make_snapshot(n=10)
    snap.gaussians.means[0, 0] = float("nan")
    refused(lambda: md.save(snap, "m.ply"), r"map not saved, it is invalid: .*non-finite")
    assert not md.resolve("m.ply").exists()
