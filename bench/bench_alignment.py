#!/usr/bin/env python3
"""Time of the Sim(3) window alignment (:mod:`langgs_ros.reconstruction.alignment`) per window.

Runs on the shared real ``hololens_office`` sequence (540x360): every window's ground-truth depth and poses are
put in a random Sim(3) frame (scale in [0.3, 3]) with 1 % depth noise and aligned into the map by a
:class:`WindowAligner`, unposed (overlap chaining only) and with the ground-truth poses as odometry (chaining +
the metric reconstruction -> odometry fit). Prints, per mode, the median / max time of ``align`` per window and
the resulting trajectory error, plus :func:`ransac_umeyama` times for a range of correspondence counts.

Example::

    .venv/bin/python bench/bench_alignment.py [--window 8] [--overlap 2] [--frames 94] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from langgs_ros.datasets import open_sequence
from langgs_ros.reconstruction.alignment import Sim3, WindowAligner, ransac_umeyama, umeyama

HOLOLENS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hololens_office"


def random_sim3(rng: np.random.Generator) -> Sim3:
    """Log-uniform scale in [0.3, 3], uniform rotation, N(0, 2) translation."""
    return Sim3(float(np.exp(rng.uniform(np.log(0.3), np.log(3.0)))), Rotation.random(random_state=rng).as_matrix(),
                rng.normal(scale=2.0, size=3))


def windows(n: int, size: int, overlap: int) -> list[list[int]]:
    """Index lists of consecutive windows sharing ``overlap`` frames."""
    out, start = [], 0
    while start < n - overlap:
        out.append(list(range(start, min(n, start + size))))
        start += size - overlap
    return out


def run(frames: list, posed: bool, size: int, overlap: int, seed: int) -> tuple[list[float], float, float]:
    """Align all windows; returns (align times s, ATE m (after a global Sim(3) fit when unposed), scale)."""
    rng = np.random.default_rng(seed)
    aligner = WindowAligner(seed=seed)
    times, first = [], {}
    for idx in windows(len(frames), size, overlap):
        sim = random_sim3(rng)
        fs = [frames[i] if posed else dataclasses.replace(frames[i], world_from_camera=None) for i in idx]
        gt = np.stack([frames[i].world_from_camera for i in idx])
        depth = np.stack([frames[i].depth for i in idx]).astype(np.float32)
        depth = np.where(depth > 0, depth * sim.s * (1 + 0.01 * rng.standard_normal(depth.shape)), 0).astype(np.float32)
        Ks = np.stack([frames[i].intrinsics for i in idx])
        conf = (depth > 0).astype(np.float32)
        t0 = time.perf_counter()
        out = aligner.align(fs, sim.transform_pose(gt), depth, Ks, conf)
        times.append(time.perf_counter() - t0)
        if out.map_correction is not None:  # the unposed map was re-levelled: earlier cameras move with it
            first = {k: out.map_correction.apply(p[None])[0] for k, p in first.items()}
        for f, T in zip(fs, out.world_from_camera):
            first.setdefault(f.frame_id, T[:3, 3])
    P = np.stack([first[f.frame_id] for f in frames])
    G = np.stack([f.world_from_camera[:3, 3] for f in frames])
    fit = umeyama(P, G)
    Q = P if posed else fit.apply(P)
    return times, float(np.sqrt(np.mean(np.sum((Q - G) ** 2, axis=1)))), fit.s


def main() -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--overlap", type=int, default=2)
    ap.add_argument("--frames", type=int, default=94)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not HOLOLENS.is_dir():
        print(f"shared data not found at {HOLOLENS}", file=sys.stderr)
        return 2
    seq = open_sequence(HOLOLENS)
    frames = list(seq.frames(range(min(args.frames, len(seq))), with_labels=False))
    print(f"hololens_office: {len(frames)} frames {frames[0].width}x{frames[0].height}, window {args.window}, "
          f"overlap {args.overlap}")
    print("ATE: max over repeats; unposed after one global Sim(3) fit, odometry directly in the odometry frame.")
    print(f"{'mode':<10} {'windows':>7} {'median ms':>10} {'max ms':>8} {'ATE cm':>7} {'scale err %':>12}")
    for posed in (False, True):
        all_times, ates, scales = [], [], []
        for r in range(args.repeats):
            times, err, s = run(frames, posed, args.window, args.overlap, seed=r)
            all_times += times[1:]  # the first window is an identity placement
            ates.append(err)
            scales.append(abs(s - 1.0))
        mode = "odometry" if posed else "unposed"
        print(f"{mode:<10} {len(all_times) // args.repeats:>7} {1e3 * statistics.median(all_times):>10.1f} "
              f"{1e3 * max(all_times):>8.1f} {100 * max(ates):>7.2f} "
              f"{f'{100 * max(scales):.3f}' if posed else 'n/a':>12}")
    print("\nransac_umeyama (30 % outliers, 300 iterations max):")
    rng = np.random.default_rng(0)
    for n in (100, 1000, 3000, 10000):
        src = rng.uniform(-2, 2, (n, 3))
        true = random_sim3(rng)
        dst = true.apply(src) + rng.normal(scale=0.005, size=(n, 3))
        out = rng.random(n) < 0.3
        dst[out] = rng.uniform(-5, 5, (int(out.sum()), 3))
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ransac_umeyama(src, dst, threshold_m=0.03 * true.s, iterations=300, rng=0)
            ts.append(time.perf_counter() - t0)
        print(f"  N = {n:>6}: {1e3 * statistics.median(ts):8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
