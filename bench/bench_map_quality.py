"""Map quality: maps rendered at their frames' poses, against the photos on their valid-depth pixels.

The three parts of issue 10's benchmark (the Open3D fusion-time peer is in ``bench_core.py``). Maps (posed
RGB-D, label semantics) are built with several sparsification settings side by side, rendered by
:func:`langgs_ros.render.render_gaussians` (torch compositor, black background) at each frame's pose and
intrinsics, and compared with the frame on its valid-depth pixels (8-bit PSNR, mean alpha):

(a) one frame, mapped alone, rendered at its own pose;
(b) one 16-frame window (every ``--window-step``-th frame from ``--window-start``), rendered at each of its
    frames; PSNR raw and after a per-frame, per-channel affine colour correction ``a·rendered + b`` fitted on the
    frame's valid pixels (least squares; it removes the sequence's auto-exposure jumps);
(c) the whole sequence mapped without every 8th frame (windows of 8 frames): PSNR on valid-depth pixels and
    whole-frame SSIM (scikit-image) at the left-out poses and at as many mapped poses, next to the forward-warp
    bound of the same views (every mapped frame's valid pixels re-projected with the ground-truth poses, nearest
    wins; black where nothing lands, like the map's background), the median error of the rendered depth against
    the sensor's at the left-out views (planar depth, PGSR's ray–splat-plane intersection, and the 3DGS expected
    depth of the means, see :func:`langgs_ros.render.planar_depth`), the Gaussian count and bytes per Gaussian —
    the geometry–semantic levels against the distance-only method at equal Gaussian budgets, a sweep of budgets
    (a Pareto table), and the distance-only map refined (``--refine-steps`` per window) at the same count.

Methods:

- ``dense``: 2 mm base voxels (about one Gaussian per pixel), the upper bound of the surfels;
- ``moment``: plain moment matching (``spread_gain`` 1, mean opacity), the method before issue 10, 2 cm voxels;
- ``distance``: view-distance levels only (``max_coarsen`` 0) with the surface-closing merge, 2 cm and 1 cm;
- ``hierarchical``: geometry–semantic levels (:func:`langgs_ros.sparsify.hierarchical_levels`) over finer
  base voxels, at budgets near the ``distance`` rows;
- ``+ refine N``: the same map after N steps of photometric refinement (:mod:`langgs_ros.refine`, the
  PyTorch rasteriser here; gsplat on CUDA) against the mapped frames.

Usage::

    .venv/bin/python bench/bench_map_quality.py [--frames 10 40 70] [--parts a b c] [--refine-steps 50]
        [--figure docs/images/map_quality.jpg --figure-frame 40]

``--figure`` writes a 2x2 picture of one-frame maps of one frame, rendered from 35 cm behind its pose and turned
15°: dense surfels, plain moment matching, the surface-closing merge, and the merge + refinement (README's
picture; each title has the PSNR at the frame's own pose).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from langgs_ros.datasets import open_sequence
from langgs_ros.frames import WindowConfig
from langgs_ros.pipeline import MappingPipeline, PipelineConfig
from langgs_ros.refine import RefineConfig
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
    "distance 2.4 cm": {"base_voxel_size": 0.024},
    "distance 2.4 cm + refine": {"base_voxel_size": 0.024, "refine": 1},
}
SEQUENCE_METHODS: dict[str, dict[str, float]] = {
    "distance 1.5 cm": {"base_voxel_size": 0.015},
    "distance 2 cm": {"base_voxel_size": 0.02},
    "distance 2.5 cm": {"base_voxel_size": 0.025},
    "distance 3 cm": {"base_voxel_size": 0.03},
    "hierarchical 1 cm +1": {"base_voxel_size": 0.01, "max_coarsen": 1},
    "hierarchical 1.5 cm +1": {"base_voxel_size": 0.015, "max_coarsen": 1},
    "hierarchical 1.5 cm +2": {"base_voxel_size": 0.015, "max_coarsen": 2},
    "hierarchical 2 cm +1": {"base_voxel_size": 0.02, "max_coarsen": 1},
    "distance 2 cm + refine": {"base_voxel_size": 0.02, "refine": 1},
}
WINDOW_METHODS: dict[str, dict[str, float]] = {
    "dense 2 mm": {"base_voxel_size": 0.002},
    "moment 2 cm": {"base_voxel_size": 0.02, "spread_gain": 1.0, "opacity_evidence": 1.0},
    "distance 2 cm": {"base_voxel_size": 0.02},
    "distance 2 cm + refine": {"base_voxel_size": 0.02, "refine": 1},
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """8-bit PSNR (dB) of two arrays of 0..255 values."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10.0 * np.log10(255.0 ** 2 / max(mse, 1e-12))


def build_map(seq, indices: list[int], sparsify: dict[str, float], refine_steps: int, window: int = 0):
    """Map ``indices`` as one window with the given :class:`~langgs_ros.sparsify.SparsifyConfig` fields (and
    ``refine`` > 0: ``refine_steps`` of photometric refinement). Returns (snapshot, frames, seconds)."""
    cfg = PipelineConfig(device="cpu", backend="rgbd", semantic_source="labels")
    cfg.window = WindowConfig(size=max(2, window or len(indices)), overlap=0)
    cfg.backend_args = {"max_depth": 10.0}
    cfg.semantic_args = {"label_names": seq.label_names or None}
    for k, v in sparsify.items():
        if k != "refine":
            setattr(cfg.sparsify, k, type(getattr(cfg.sparsify, k))(v))
    if sparsify.get("refine"):
        cfg.refine = RefineConfig(steps=refine_steps, max_seconds=3600.0)
    pipeline = MappingPipeline(cfg)
    frames = [seq.frame(i) for i in indices]
    step = window or len(frames)
    t = time.perf_counter()
    for s in range(0, len(frames), step):
        pipeline.process_window(frames[s:s + step])
    return pipeline.snapshot(), frames, time.perf_counter() - t


def score_view(snap, frame) -> dict[str, float]:
    """PSNR (raw and exposure-corrected) and mean alpha of the map rendered at ``frame``'s pose, on its
    valid-depth pixels."""
    H, W = frame.rgb.shape[:2]
    valid = np.asarray(frame.depth) > 0
    out = render_gaussians(snap.gaussians, frame.world_from_camera, frame.intrinsics, W, H, backend="torch",
                           render_instances=False)
    rendered = np.asarray(out.rgb).clip(0, 1)[valid] * 255.0
    photo = frame.rgb[valid].astype(np.float64)
    corrected = np.empty_like(rendered)
    for c in range(3):  # per-channel affine fit photo ≈ a·rendered + b (exposure / white balance)
        A = np.stack([rendered[:, c], np.ones(len(rendered))], 1)
        coef, *_ = np.linalg.lstsq(A, photo[:, c], rcond=None)
        corrected[:, c] = A @ coef
    return {"psnr": psnr(np.round(rendered), photo), "psnr_cc": psnr(np.round(corrected.clip(0, 255)), photo),
            "alpha": float(np.asarray(out.alpha)[valid].mean()), "valid": float(valid.sum())}


def forward_warp(sources, target) -> np.ndarray:
    """(H, W, 3) float64 image of ``sources``' valid pixels re-projected into ``target`` with their ground-truth
    poses (z-buffer: the nearest wins; 0 where nothing lands)."""
    H, W = target.rgb.shape[:2]
    K = np.asarray(target.intrinsics, dtype=np.float64)
    camera_from_world = np.linalg.inv(np.asarray(target.world_from_camera, dtype=np.float64))
    zs, idx, cols = [], [], []
    for f in sources:
        d = np.asarray(f.depth, dtype=np.float64)
        v, u = np.nonzero(d > 0)
        z = d[v, u]
        Ks = np.asarray(f.intrinsics, dtype=np.float64)
        cam = np.stack([(u - Ks[0, 2]) / Ks[0, 0] * z, (v - Ks[1, 2]) / Ks[1, 1] * z, z], 1)
        T = camera_from_world @ np.asarray(f.world_from_camera, dtype=np.float64)
        p = cam @ T[:3, :3].T + T[:3, 3]
        ok = p[:, 2] > 0.05
        p, c = p[ok], f.rgb[v[ok], u[ok]]
        ut = np.round(K[0, 0] * p[:, 0] / p[:, 2] + K[0, 2]).astype(np.int64)
        vt = np.round(K[1, 1] * p[:, 1] / p[:, 2] + K[1, 2]).astype(np.int64)
        inside = (ut >= 0) & (ut < W) & (vt >= 0) & (vt < H)
        zs.append(p[inside, 2])
        idx.append(vt[inside] * W + ut[inside])
        cols.append(c[inside])
    z, pix, col = np.concatenate(zs), np.concatenate(idx), np.concatenate(cols)
    order = np.argsort(-z, kind="stable")  # far first: the nearest is written last and wins
    out = np.zeros((H * W, 3))
    out[pix[order]] = col[order]
    return out.reshape(H, W, 3)


def bytes_per_gaussian() -> float:
    """Bytes per Gaussian of the map's stored layout (:meth:`SemanticGaussianMap.memory_bytes`)."""
    from langgs_ros.fusion import SemanticGaussianMap

    return float(SemanticGaussianMap("any", 1).memory_bytes()["stored_per_gaussian"])


def view_metrics(rendered: np.ndarray, frame) -> tuple[float, float]:
    """(PSNR on the frame's valid-depth pixels, whole-frame SSIM) of a 0..255 (H, W, 3) image."""
    from skimage.metrics import structural_similarity

    valid = np.asarray(frame.depth) > 0
    img = np.round(rendered.clip(0, 255))
    ssim = structural_similarity(img.astype(np.uint8), frame.rgb, channel_axis=2, data_range=255)
    return psnr(img[valid], frame.rgb[valid]), float(ssim)


def part_c(seq, refine_steps: int, only: str = "", skip: str = "", every: int = 8, window: int = 8) -> None:
    n = len(seq)
    held = [i for i in range(n) if i % every == every // 2]
    mapped = [i for i in range(n) if i % every != every // 2]
    probe = mapped[every // 4::every][:len(held)]  # as many mapped views, spread over the sequence
    print(f"\n(c) sequence of {n} frames mapped without every {every}th ({len(held)} left out: {held[0]}, "
          f"{held[1]}, ...), windows of {window}; PSNR on valid-depth pixels / whole-frame SSIM; median depth "
          "error at the left-out views, planar (ray meets the blended splat plane) and expected (blended z of the "
          "means) depth")
    frames = {i: seq.frame(i) for i in held + mapped}
    bound_h = [view_metrics(forward_warp([frames[j] for j in mapped], frames[i]), frames[i]) for i in held]
    bound_m = [view_metrics(forward_warp([frames[j] for j in mapped if j != i], frames[i]), frames[i])
               for i in probe]
    print(f"{'method':<24} {'Gaussians':>9} {'B/G':>4} {'held PSNR':>9} {'SSIM':>5} {'mapped PSNR':>11} {'SSIM':>5} "
          f"{'planar d.':>9} {'exp. d.':>9} {'map s':>6}")
    print(f"{'forward-warp bound':<24} {'':>9} {'':>4} {np.mean([b[0] for b in bound_h]):>9.2f} "
          f"{np.mean([b[1] for b in bound_h]):>5.3f} {np.mean([b[0] for b in bound_m]):>11.2f} "
          f"{np.mean([b[1] for b in bound_m]):>5.3f}", flush=True)
    bpg = round(bytes_per_gaussian())
    for name, sp in SEQUENCE_METHODS.items():
        if (only and only not in name) or (skip and skip in name):
            continue
        snap, _, seconds = build_map(seq, mapped, sp, refine_steps, window=window)
        rows_h, rows_m, errs_p, errs_e = [], [], [], []
        for i in held + probe:
            f = frames[i]
            H, W = f.rgb.shape[:2]
            out = render_gaussians(snap.gaussians, f.world_from_camera, f.intrinsics, W, H, backend="torch",
                                   render_instances=False, depth_mode="planar")
            (rows_h if i in held else rows_m).append(view_metrics(np.asarray(out.rgb) * 255.0, f))
            if i in held:
                d = np.asarray(f.depth)
                expected = render_gaussians(snap.gaussians, f.world_from_camera, f.intrinsics, W, H,
                                            backend="torch", render_instances=False).depth
                for errs, r in ((errs_p, np.asarray(out.depth)), (errs_e, np.asarray(expected))):
                    ok = (d > 0) & (r > 0)
                    errs.append(np.abs(r[ok] - d[ok]))
        print(f"{name:<24} {len(snap.gaussians):>9} {bpg:>4} {np.mean([r[0] for r in rows_h]):>9.2f} "
              f"{np.mean([r[1] for r in rows_h]):>5.3f} {np.mean([r[0] for r in rows_m]):>11.2f} "
              f"{np.mean([r[1] for r in rows_m]):>5.3f} {100 * np.median(np.concatenate(errs_p)):>7.2f}cm "
              f"{100 * np.median(np.concatenate(errs_e)):>7.2f}cm {seconds:>6.1f}", flush=True)


def novel_view(world_from_camera: np.ndarray, back: float = 0.35, yaw_deg: float = 15.0) -> np.ndarray:
    """A camera-to-world pose ``back`` metres behind ``world_from_camera`` along its optical axis and turned
    ``yaw_deg`` degrees about its own y axis (OpenCV: image down), so a picture shows the map, not the photo."""
    from scipy.spatial.transform import Rotation

    camera_from_novel = np.eye(4)
    camera_from_novel[:3, :3] = Rotation.from_euler("y", yaw_deg, degrees=True).as_matrix()
    camera_from_novel[:3, 3] = [0.0, 0.0, -back]
    return np.asarray(world_from_camera, dtype=np.float64) @ camera_from_novel


def figure(seq, index: int, refine_steps: int, path: str) -> None:
    """2x2 JPEG of one-frame maps of frame ``index``, rendered from :func:`novel_view` of its pose: dense surfels |
    plain moment matching 2 cm // surface-closing merge 2 cm | + refinement 2.4 cm. Each title gives the Gaussian
    count and the PSNR at the frame's own pose (valid-depth pixels)."""
    from PIL import Image, ImageDraw

    panels = []
    for title, sp in (("dense surfels, 2 mm", METHODS["dense 2 mm"]),
                      ("plain moment matching, 2 cm", METHODS["moment 2 cm"]),
                      ("surface-closing merge, 2 cm", METHODS["distance 2 cm"]),
                      (f"2.4 cm + {refine_steps} refinement steps", METHODS["distance 2.4 cm + refine"])):
        snap, fr, _ = build_map(seq, [index], sp, refine_steps)
        f = fr[0]
        H, W = f.rgb.shape[:2]
        out = render_gaussians(snap.gaussians, novel_view(f.world_from_camera), f.intrinsics, W, H, backend="torch",
                               render_instances=False)
        r = score_view(snap, f)
        img = np.round(np.asarray(out.rgb).clip(0, 1) * 255).astype(np.uint8)
        panels.append((f"{title}: {len(snap.gaussians):,} G, {r['psnr']:.1f} dB at its pose", img))
    H, W = panels[0][1].shape[:2]
    canvas = Image.new("RGB", (2 * W, 2 * H))
    for k, (title, img) in enumerate(panels):
        tile = Image.fromarray(img)
        ImageDraw.Draw(tile).text((6, 4), title, fill=(255, 255, 0))
        canvas.paste(tile, ((k % 2) * W, (k // 2) * H))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, quality=88)
    print(f"figure written: {path}")


def part_a(seq, frames: list[int], refine_steps: int) -> None:
    print("(a) one-frame self-render on valid-depth pixels (8-bit PSNR, dB; ratio = valid pixels / Gaussians)")
    print(f"{'method':<26} {'frame':>5} {'Gaussians':>9} {'ratio':>6} {'PSNR':>6} {'alpha':>6} {'map s':>6}")
    summary: dict[str, list[dict[str, float]]] = {}
    for name, sp in METHODS.items():
        for i in frames:
            snap, fr, seconds = build_map(seq, [i], sp, refine_steps)
            r = score_view(snap, fr[0])
            r.update(gaussians=len(snap.gaussians), ratio=r["valid"] / max(len(snap.gaussians), 1), seconds=seconds)
            summary.setdefault(name, []).append(r)
            print(f"{name:<26} {i:>5} {r['gaussians']:>9} {r['ratio']:>6.1f} {r['psnr']:>6.2f} {r['alpha']:>6.3f} "
                  f"{r['seconds']:>6.2f}", flush=True)
    print(f"\nmean over frames {frames} (target: >= {TARGET_PSNR_DB} dB at >= {TARGET_RATIO}x fewer Gaussians "
          f"than valid pixels; refine = {refine_steps} steps)")
    dense = np.mean([r["psnr"] for r in summary["dense 2 mm"]])
    for name, rows in summary.items():
        p = float(np.mean([r["psnr"] for r in rows]))
        ratio = float(np.mean([r["ratio"] for r in rows]))
        print(f"{name:<26} ratio {ratio:6.1f}x  PSNR {p:6.2f} dB  ({p - dense:+.2f} dB vs dense, "
              f"{p / TARGET_PSNR_DB:.2f} of target)")


def part_b(seq, start: int, step: int, refine_steps: int) -> None:
    indices = [start + k * step for k in range(16) if start + k * step < len(seq)]
    print(f"\n(b) one window of {len(indices)} frames ({indices[0]}..{indices[-1]} step {step}), rendered at each "
          "of its frames; PSNR on valid-depth pixels, raw and exposure-corrected (cc); ratio = valid pixels of all "
          "frames / Gaussians")
    print(f"{'method':<26} {'Gaussians':>9} {'ratio':>6} {'PSNR':>6} {'PSNR cc':>7} {'alpha':>6} {'map s':>6}")
    results: dict[str, float] = {}
    for name, sp in WINDOW_METHODS.items():
        snap, frames, seconds = build_map(seq, indices, sp, refine_steps)
        rows = [score_view(snap, f) for f in frames]
        n = len(snap.gaussians)
        ratio = sum(r["valid"] for r in rows) / max(n, 1)
        cc = float(np.mean([r["psnr_cc"] for r in rows]))
        results[name] = cc
        print(f"{name:<26} {n:>9} {ratio:>6.1f} {np.mean([r['psnr'] for r in rows]):>6.2f} {cc:>7.2f} "
              f"{np.mean([r['alpha'] for r in rows]):>6.3f} {seconds:>6.1f}", flush=True)
    dense = results["dense 2 mm"]
    for name, cc in results.items():
        print(f"{name:<26} {cc - dense:+.2f} dB (colour-corrected) vs dense (target: within -3 dB at >= 20x)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[10, 40, 70])
    ap.add_argument("--parts", nargs="+", choices=("a", "b", "c"), default=["a", "b", "c"])
    ap.add_argument("--refine-steps", type=int, default=50, help="steps of the '+ refine' rows")
    ap.add_argument("--window-start", type=int, default=10)
    ap.add_argument("--window-step", type=int, default=2)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--figure", help="write the 2x2 picture of --figure-frame here (JPEG) and stop")
    ap.add_argument("--figure-frame", type=int, default=40)
    ap.add_argument("--only", default="", help="part (c): only the methods whose name contains this")
    ap.add_argument("--skip", default="", help="part (c): not the methods whose name contains this")
    args = ap.parse_args()
    seq = open_sequence(args.data)
    if args.figure:
        figure(seq, args.figure_frame, args.refine_steps, args.figure)
        return 0
    if "a" in args.parts:
        part_a(seq, args.frames, args.refine_steps)
    if "b" in args.parts:
        part_b(seq, args.window_start, args.window_step, args.refine_steps * 4)
    if "c" in args.parts:
        part_c(seq, args.refine_steps, args.only, args.skip)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
