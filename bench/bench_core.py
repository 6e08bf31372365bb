"""Benchmark of the geometric/semantic core: sparsify + fuse rate, memory per Gaussian, query latency.

Usage::

    .venv/bin/python bench/bench_core.py [--frames 16] [--window 8] [--repeats 3] [--threads N] [--device cpu]

Measures on real frames of ``../shared/data/hololens_office`` (ground-truth depth, poses and label images as an
oracle segmentation with one-hot embeddings):

- input rate of :meth:`SemanticGaussianMap.integrate` (hierarchical sparsification + association + map merge +
  instance/box/floor updates) in pixel Gaussians per second, first pass (new area) and revisit pass;
  pixel-Gaussian construction (:func:`gaussians_from_depth`) is timed separately and not included;
- bytes per stored map Gaussian vs the 248 B of 3DGS (float32, SH degree 3), plus the runtime bytes;
- embeddings per Gaussian (instances / Gaussians; FLEG reports ~5 %);
- the map size vs the per-pixel representation;
- the CPU peer, side by side: Open3D's ``VoxelBlockGrid`` TSDF integration (``compute_unique_block_coordinates``
  + ``integrate``, tsdf/weight/colour, 8³ blocks) of the same frames at the same voxel size, against our surfel
  creation + sparsification + fusion of them (open3d is a benchmark-only dependency: ``bench/requirements.txt``;
  the row is skipped with a note without it);
- LERF scoring latency (:meth:`QueryEngine.scores`) for 1k and 10k instances with D = 512 random unit
  embeddings and cached text embeddings, and one end-to-end :meth:`QueryEngine.query` on the real map.

The best of ``--repeats`` timings is reported (the machine may be shared), with the median in brackets.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "test"))

from _core_fixtures import HOLOLENS, FixedTextEncoder, hololens_meta, label_segmentation, load_hololens  # noqa: E402

from langgs_ros.fusion import SemanticGaussianMap  # noqa: E402
from langgs_ros.gaussians import GaussianInitConfig, gaussians_from_depth  # noqa: E402
from langgs_ros.query import QueryEngine  # noqa: E402
from langgs_ros.sparsify import SparsifyConfig  # noqa: E402
from langgs_ros.types import Gaussians, InstanceTable, MapSnapshot  # noqa: E402


def import_open3d():
    """open3d, or None when it is not installed. Its wheel links libusb-1.0, which slim images lack: the copy of
    the ``libusb-package`` wheel (bench/requirements.txt) is loaded first when present."""
    import ctypes
    import importlib.util
    import os

    spec = importlib.util.find_spec("libusb_package")
    if spec is not None and spec.origin:
        lib = os.path.join(os.path.dirname(spec.origin), "libusb-1.0.so")
        if os.path.exists(lib):
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    try:
        import open3d
    except ImportError:
        return None
    return open3d


def open3d_integrate(o3d, frames, voxel_size: float, max_depth: float = 10.0) -> tuple[float, int]:
    """Seconds to TSDF-integrate ``frames`` into a fresh Open3D ``VoxelBlockGrid`` (CPU), and its point count."""
    o3c = o3d.core
    vbg = o3d.t.geometry.VoxelBlockGrid(attr_names=("tsdf", "weight", "color"),
                                        attr_dtypes=(o3c.float32, o3c.float32, o3c.float32),
                                        attr_channels=((1), (1), (3)), voxel_size=voxel_size, block_resolution=8,
                                        block_count=50000, device=o3c.Device("CPU:0"))
    t0 = time.perf_counter()
    for f in frames:
        depth = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(f.depth, dtype=np.float32)))
        color = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(f.rgb, dtype=np.float32) / 255.0))
        K = o3c.Tensor(np.asarray(f.K, dtype=np.float64))
        camera_from_world = o3c.Tensor(np.linalg.inv(np.asarray(f.pose, dtype=np.float64)))
        blocks = vbg.compute_unique_block_coordinates(depth, K, camera_from_world, 1.0, max_depth)
        vbg.integrate(blocks, depth, color, K, camera_from_world, 1.0, max_depth)
    seconds = time.perf_counter() - t0
    return seconds, len(vbg.extract_point_cloud().point.positions)


GS3D_BYTES = 248  # 3DGS: xyz, normal, f_dc(3) + f_rest(45), opacity, scale(3), rot(4) as float32 = 62 floats


def _fuse(m: SemanticGaussianMap, frames, segs, gs, window: int) -> float:
    t = 0.0
    for s in range(0, len(gs), window):
        t0 = time.perf_counter()
        m.integrate(gs[s:s + window], segs[s:s + window], np.stack([f.pose for f in frames[s:s + window]]), float(s))
        t += time.perf_counter() - t0
    return t


def _lat(fn, n: int) -> list[float]:
    fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not HOLOLENS.is_dir():
        sys.exit(f"shared data not found at {HOLOLENS}")
    dev = torch.device(args.device)
    print(f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}")

    meta = hololens_meta()
    n_lab = len(meta["objects"])
    names = {o["id"]: o["name"] for o in meta["objects"]}
    frames = load_hololens(range(args.frames))
    segs = [label_segmentation(f.labels, n_lab, names) for f in frames]
    inits = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        gs = [gaussians_from_depth(f.depth, f.rgb, f.K, f.pose, instance_ids=s.instance_ids, device=dev)
              for f, s in zip(frames, segs)]
        inits.append(time.perf_counter() - t0)
    t_init = min(inits)
    n_in = sum(len(g) for g in gs)
    n_pix = sum(f.depth.size for f in frames)

    first, second, maps = [], [], []
    for _ in range(args.repeats):
        m = SemanticGaussianMap("onehot", n_lab, up=meta["up"], device=dev)
        first.append(_fuse(m, frames, segs, gs, args.window))
        n1 = m.num_gaussians
        second.append(_fuse(m, frames, segs, gs, args.window))
        maps.append((m, n1))
    m, n1 = maps[-1]
    snap = m.snapshot()
    mem = m.memory_bytes()

    def fresh_snapshot() -> None:
        m._snapshot_cache = None  # force the O(N) copy the first call after an update makes
        m.snapshot()

    snap_t = _lat(fresh_snapshot, 20)

    # Query scoring latency with random unit embeddings (D = 512, text cached).
    D = 512
    g = torch.Generator().manual_seed(0)
    vocab = ["a red mug", "object", "things", "stuff", "texture"]
    enc = FixedTextEncoder({t: torch.randn(D, generator=g) for t in vocab})
    qe = QueryEngine(enc)
    lat = {}
    for K in (1000, 10000):
        emb = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=1)
        table = InstanceTable(ids=np.arange(K, dtype=np.int32), embeddings=emb, names=[None] * K,
                              centers=np.zeros((K, 3)), sizes=np.ones((K, 3)), yaws=np.zeros(K),
                              num_gaussians=np.ones(K, np.int64), observations=np.ones(K))
        s = MapSnapshot(gaussians=Gaussians.empty(), instances=table, encoder_id="fixed")
        lat[K] = _lat(lambda s=s: qe.scores(s, "a red mug"), 200)
    # End-to-end query on the real map (scores + boxes + approach poses for the top 5).
    onehot = {names[i]: torch.eye(n_lab)[i - 1] for i in names}
    for c in ("object", "things", "stuff", "texture"):
        onehot[c] = torch.full((n_lab,), 1.0)
    qe_real = QueryEngine(FixedTextEncoder(onehot, "onehot"))
    e2e = _lat(lambda: qe_real.query(snap, "sofa"), 20)

    # The same with 2x2 pixel blocks averaged into one surfel (GaussianInitConfig.block = 2, node pixel_block).
    blocked = []
    for _ in range(args.repeats):
        mb = SemanticGaussianMap("onehot", n_lab, up=meta["up"], device=dev)  # not timed, as for block 1
        t0 = time.perf_counter()
        gb = [gaussians_from_depth(f.depth, f.rgb, f.K, f.pose, instance_ids=s.instance_ids, device=dev,
                                   config=GaussianInitConfig(block=2)) for f, s in zip(frames, segs)]
        t_init_b = time.perf_counter() - t0
        blocked.append(t_init_b + _fuse(mb, frames, segs, gb, args.window))
    o3d = import_open3d()
    voxel = SparsifyConfig().base_voxel_size
    peer = None
    if o3d is not None:
        runs = [open3d_integrate(o3d, frames, voxel) for _ in range(args.repeats)]
        peer = (min(r[0] for r in runs), runs[0][1])

    def best(xs: list[float]) -> str:
        return f"{min(xs):.3f} s [{statistics.median(xs):.3f}]"

    rate1 = n_in / min(first)
    rate2 = n_in / min(second)
    rows = [
        ("pixel Gaussians (input)", f"{n_in:,} from {args.frames} frames ({n_pix:,} pixels)", "", ""),
        ("gaussians_from_depth", f"{t_init:.3f} s = {n_in / t_init / 1e6:.2f} M/s", "(not in fuse rate)", ""),
        ("integrate, new area", best(first) + f" = {rate1 / 1e6:.2f} M/s", ">= 1 M/s", f"{rate1 / 1e6:.2f}x"),
        ("integrate, revisit", best(second) + f" = {rate2 / 1e6:.2f} M/s", ">= 1 M/s", f"{rate2 / 1e6:.2f}x"),
        ("surfels + sparsify + fuse (new area)", f"{t_init + min(first):.3f} s", "<= Open3D's", ""),
        ("same, pixel_block 2", f"{min(blocked):.3f} s ({mb.num_gaussians:,} map Gaussians)", "<= Open3D's", ""),
        (f"Open3D {o3d.__version__ if o3d else ''} VoxelBlockGrid TSDF, {100 * voxel:g} cm",
         f"{peer[0]:.3f} s ({peer[1]:,} surface points)" if peer else "open3d not installed "
         "(pip install -r bench/requirements.txt)", "peer",
         f"{peer[0] / (t_init + min(first)):.2f}x / {peer[0] / min(blocked):.2f}x (peer time / ours, block 1 / 2)"
         if peer else ""),
        ("map Gaussians after 1 / 2 passes", f"{n1:,} / {m.num_gaussians:,} "
         f"(+{100 * (m.num_gaussians - n1) / max(n1, 1):.1f} %)", "< +5 %", ""),
        ("pixels per map Gaussian", f"{n_pix / m.num_gaussians:.1f}", ">= 20", f"{n_pix / m.num_gaussians / 20:.1f}x"),
        ("bytes per stored Gaussian",
         f"{mem['stored_per_gaussian']:.0f} B (runtime {mem['runtime_per_gaussian']:.0f} B)",
         f"<= 64 B (3DGS {GS3D_BYTES} B)", f"{GS3D_BYTES / mem['stored_per_gaussian']:.2f}x smaller than 3DGS"),
        ("embeddings per Gaussian", f"{m.num_instances} / {m.num_gaussians:,} = "
         f"{100 * m.num_instances / max(m.num_gaussians, 1):.3f} %", "<= 1 % (FLEG ~5 %)", ""),
        ("snapshot after an update", f"{1e3 * min(snap_t):.2f} ms [{1e3 * statistics.median(snap_t):.2f}] = "
         f"{1e9 * statistics.median(snap_t) / max(m.num_gaussians, 1):.0f} ns/Gaussian", "", ""),
        ("query scoring, 1k instances", f"{1e3 * min(lat[1000]):.3f} ms [{1e3 * statistics.median(lat[1000]):.3f}]",
         "<= 2 ms", ""),
        ("query scoring, 10k instances", f"{1e3 * min(lat[10000]):.3f} ms [{1e3 * statistics.median(lat[10000]):.3f}]",
         "<= 2 ms", f"{2e-3 / statistics.median(lat[10000]):.1f}x headroom"),
        ("query end-to-end (real map, top 5)", f"{1e3 * min(e2e):.2f} ms [{1e3 * statistics.median(e2e):.2f}]", "", ""),
    ]
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    hdr = ("metric", "measured (best [median])", "target", "ratio")
    w = [max(a, len(b)) for a, b in zip(w, hdr)]
    print(" | ".join(h.ljust(x) for h, x in zip(hdr, w)))
    print("-+-".join("-" * x for x in w))
    for r in rows:
        print(" | ".join(c.ljust(x) for c, x in zip(r, w)))
    print(f"instances: {m.num_instances}, floor height {snap.floor_height:.3f} m "
          f"(annotated {-meta['floor_plane']['offset']:.3f} m)")


if __name__ == "__main__":
    main()
