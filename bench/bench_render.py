"""Benchmark :func:`langgs_ros.render.render_gaussians` at 540x360.

Scenes: a synthetic room (floor, walls and box-shaped objects covered by flat surface Gaussians, as a fused map
looks) seen from inside, with N Gaussians. Reports the median wall time over repeats for the torch compositor on
the CPU (colour + depth + instance ids, optionally a 16-d feature) and, where CUDA and gsplat's extension are
available, for the gsplat backend; plus the ratio to the target of 3 s per CPU frame and the process peak RSS.

Usage::

    .venv/bin/python bench/bench_render.py [--sizes 10000 100000 300000] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from langgs_ros.render import gsplat_cuda_available, render_gaussians
from langgs_ros.types import Gaussians

WIDTH, HEIGHT = 540, 360
TARGET_CPU_S = 3.0


def room_scene(n: int, seed: int = 0) -> Gaussians:
    """n surface Gaussians on a 6 x 5 x 2.6 m room's floor/walls and on 8 boxes (instances 0..7, walls -1)."""
    rng = np.random.default_rng(seed)
    n_obj = n // 3
    n_room = n - n_obj
    # Room: floor z=0, walls at x=+-3, y=+-2.5 (z up).
    face = rng.integers(0, 5, n_room)
    u, v = rng.uniform(0, 1, n_room), rng.uniform(0, 1, n_room)
    pts = np.zeros((n_room, 3))
    normals = np.zeros((n_room, 3))
    f0 = face == 0
    pts[f0] = np.c_[u[f0] * 6 - 3, v[f0] * 5 - 2.5, np.zeros(f0.sum())]
    normals[f0] = [0, 0, 1]
    for k, (axis, val) in enumerate([(0, -3.0), (0, 3.0), (1, -2.5), (1, 2.5)], start=1):
        m = face == k
        other = 1 - axis
        span = 6.0 if other == 0 else 5.0
        pts[m, axis] = val
        pts[m, other] = u[m] * span - span / 2
        pts[m, 2] = v[m] * 2.6
        normals[m, axis] = 1.0
    # Objects: boxes on the floor, points on their surfaces.
    centers = np.c_[rng.uniform(-2, 2, 8), rng.uniform(-1.8, 1.8, 8), np.zeros(8)]
    sizes = rng.uniform(0.3, 1.0, (8, 3))
    obj = rng.integers(0, 8, n_obj)
    local = rng.uniform(-0.5, 0.5, (n_obj, 3))
    ax = rng.integers(0, 3, n_obj)
    local[np.arange(n_obj), ax] = np.sign(local[np.arange(n_obj), ax]) * 0.5
    opts = centers[obj] + local * sizes[obj] + np.c_[np.zeros((n_obj, 2)), sizes[obj, 2] / 2]
    onormals = np.zeros((n_obj, 3))
    onormals[np.arange(n_obj), ax] = 1.0
    means = np.r_[pts, opts]
    nrm = np.r_[normals, onormals]
    # Flat Gaussians: thin along the normal; spacing-dependent tangential size.
    tangential = np.sqrt(60.0 / n) * rng.uniform(0.5, 1.5, n)
    scales = np.c_[tangential, tangential, np.full(n, 0.004)]
    rots = Rotation.from_rotvec(np.cross([0, 0, 1.0], nrm) * (np.pi / 2) * (np.abs(nrm[:, 2]) < 0.5)[:, None])
    quats = rots.as_quat(scalar_first=True)
    colors = np.r_[np.full((n_room, 3), 0.7) + rng.normal(0, 0.05, (n_room, 3)),
                   rng.uniform(0, 1, (8, 3))[obj]].clip(0, 1)
    ids = np.r_[np.full(n_room, -1), obj]
    f32 = np.float32
    return Gaussians(torch.as_tensor(means.astype(f32)), torch.as_tensor(quats.astype(f32)),
                     torch.as_tensor(scales.astype(f32)), torch.as_tensor(rng.uniform(0.6, 1.0, n).astype(f32)),
                     torch.as_tensor(colors.astype(f32)), torch.as_tensor(ids.astype(np.int32)))


def camera() -> tuple[np.ndarray, np.ndarray]:
    """A camera at (-2.5, -2.0, 1.4) m looking at the room centre (OpenCV optical axes), 60° horizontal FOV."""
    eye, target = np.array([-2.5, -2.0, 1.4]), np.array([0.5, 0.5, 0.5])
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, [0, 0, 1.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    T = np.eye(4)
    T[:3, :3] = np.c_[x, y, z]
    T[:3, 3] = eye
    f = WIDTH / 2 / np.tan(np.radians(30))
    K = np.array([[f, 0, (WIDTH - 1) / 2], [0, f, (HEIGHT - 1) / 2], [0, 0, 1.0]])
    return T, K


def timeit(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(min, median) wall seconds over ``repeats`` calls after one warm-up call."""
    fn()  # warm-up (imports, allocator)
    ts = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return min(ts), statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    T, K = camera()
    print(f"render_gaussians {WIDTH}x{HEIGHT}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'N':>8} {'backend':>8} {'config':>14} {'min_s':>7} {'median_s':>8} {'median/3s':>9} {'coverage':>8}")
    cuda = gsplat_cuda_available()
    for n in args.sizes:
        g = room_scene(n)
        feats = torch.randn(n, 16)
        out = render_gaussians(g, T, K, WIDTH, HEIGHT)
        cov = float((out.alpha > 0.5).float().mean())
        for cfg, kw in [("rgb+depth", dict(render_instances=False)), ("+instances", {}),
                        ("+inst+feat16", dict(extra_features=feats))]:
            tmin, tmed = timeit(lambda g=g, kw=kw: render_gaussians(g, T, K, WIDTH, HEIGHT, backend="torch", **kw),
                                args.repeats)
            print(f"{n:>8} {'torch':>8} {cfg:>14} {tmin:>7.3f} {tmed:>8.3f} {tmed / TARGET_CPU_S:>9.3f} {cov:>8.3f}")
        if cuda:
            gc, fc = g.to("cuda"), feats.cuda()
            for cfg, kw in [("rgb+depth", dict(render_instances=False)), ("+instances", {}),
                            ("+inst+feat16", dict(extra_features=fc))]:
                tmin, tmed = timeit(
                    lambda gc=gc, kw=kw: render_gaussians(gc, T, K, WIDTH, HEIGHT, backend="gsplat", **kw),
                    args.repeats)
                print(f"{n:>8} {'gsplat':>8} {cfg:>14} {tmin:>7.3f} {tmed:>8.3f} {'':>9} {cov:>8.3f}")
    if not cuda:
        print("gsplat CUDA backend: not available here (no CUDA device or extension), skipped")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
