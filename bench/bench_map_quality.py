"""Map quality: a one-frame map rendered at that frame's own pose, against the photo on its valid-depth pixels.

Part (a) of issue 10's benchmark (parts (b) window PSNR with exposure correction, (c) left-out views and the
Open3D fusion-time peer are not written yet). For each frame, maps of that one frame (posed RGB-D, label
semantics) are built with several sparsification settings side by side, rendered by
:func:`langgs_ros.render.render_gaussians` (torch compositor, black background) at the frame's pose and
intrinsics, and compared with the frame on its valid-depth pixels (8-bit PSNR, mean alpha):

- ``dense``: 2 mm base voxels (about one Gaussian per pixel), the upper bound of the surfels;
- ``moment``: plain moment matching (``spread_gain`` 1, mean opacity), the method before issue 10, 2 cm voxels;
- ``distance``: view-distance levels only (``max_coarsen`` 0) with the surface-closing merge, 2 cm and 1 cm;
- ``hierarchical``: geometry–semantic levels (:func:`langgs_ros.sparsify.hierarchical_levels`) over finer
  base voxels, at budgets near the ``distance`` rows.

Usage::

    .venv/bin/python bench/bench_map_quality.py [--frames 10 40 70]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from langgs_ros.datasets import open_sequence
from langgs_ros.frames import WindowConfig
from langgs_ros.pipeline import MappingPipeline, PipelineConfig
from langgs_ros.render import render_gaussians

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hololens_office"
TARGET_PSNR_DB = 26.0
TARGET_RATIO = 20.0

METHODS: dict[str, dict[str, float]] = {
    "dense 2 mm": {"base_voxel_size": 0.002},
    "moment 2 cm": {"base_voxel_size": 0.02, "spread_gain": 1.0, "opacity_evidence": 1.0},
    "distance 2 cm": {"base_voxel_size": 0.02},
    "distance 1 cm": {"base_voxel_size": 0.01},
    "hierarchical 1 cm +1": {"base_voxel_size": 0.01, "max_coarsen": 1},
    "hierarchical 1 cm +2": {"base_voxel_size": 0.01, "max_coarsen": 2},
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """8-bit PSNR (dB) of two arrays of 0..255 values."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10.0 * np.log10(255.0 ** 2 / max(mse, 1e-12))


def one_frame(seq, index: int, sparsify: dict[str, float]) -> dict[str, float]:
    """Map frame ``index`` alone with the given :class:`~langgs_ros.sparsify.SparsifyConfig` fields, render it."""
    cfg = PipelineConfig(device="cpu", backend="rgbd", semantic_source="labels")
    cfg.window = WindowConfig(size=2, overlap=0)
    cfg.backend_args = {"max_depth": 10.0}
    cfg.semantic_args = {"label_names": seq.label_names or None}
    for k, v in sparsify.items():
        setattr(cfg.sparsify, k, type(getattr(cfg.sparsify, k))(v))
    pipeline = MappingPipeline(cfg)
    frame = seq.frame(index)
    t = time.perf_counter()
    pipeline.process_window([frame])
    seconds = time.perf_counter() - t
    snap = pipeline.snapshot()
    H, W = frame.rgb.shape[:2]
    valid = np.asarray(frame.depth) > 0
    out = render_gaussians(snap.gaussians, frame.world_from_camera, frame.intrinsics, W, H, backend="torch")
    rendered = np.round(np.asarray(out.rgb).clip(0, 1) * 255.0)
    return {"gaussians": len(snap.gaussians), "ratio": valid.sum() / max(len(snap.gaussians), 1),
            "psnr": psnr(rendered[valid], frame.rgb[valid]), "alpha": float(np.asarray(out.alpha)[valid].mean()),
            "seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[10, 40, 70])
    ap.add_argument("--data", default=str(DATA))
    args = ap.parse_args()
    seq = open_sequence(args.data)
    print("(a) one-frame self-render on valid-depth pixels (8-bit PSNR, dB; ratio = valid pixels / Gaussians)")
    print(f"{'method':<22} {'frame':>5} {'Gaussians':>9} {'ratio':>6} {'PSNR':>6} {'alpha':>6} {'map s':>6}")
    summary: dict[str, list[dict[str, float]]] = {}
    for name, sp in METHODS.items():
        for i in args.frames:
            r = one_frame(seq, i, sp)
            summary.setdefault(name, []).append(r)
            print(f"{name:<22} {i:>5} {r['gaussians']:>9} {r['ratio']:>6.1f} {r['psnr']:>6.2f} {r['alpha']:>6.3f} "
                  f"{r['seconds']:>6.2f}", flush=True)
    print(f"\nmean over frames {args.frames} (target: >= {TARGET_PSNR_DB} dB at >= {TARGET_RATIO}x fewer Gaussians "
          "than valid pixels)")
    dense = np.mean([r["psnr"] for r in summary["dense 2 mm"]])
    for name, rows in summary.items():
        p = float(np.mean([r["psnr"] for r in rows]))
        ratio = float(np.mean([r["ratio"] for r in rows]))
        print(f"{name:<22} ratio {ratio:6.1f}x  PSNR {p:6.2f} dB  ({p - dense:+.2f} dB vs dense, "
              f"{p / TARGET_PSNR_DB:.2f} of target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
