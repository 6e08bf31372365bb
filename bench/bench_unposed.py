#!/usr/bin/env python3
"""Unposed mapping on the real hololens sequence: registration, drops, ATE, up error and objects found.

Runs the shared ``hololens_office`` sequence with ``pose_source: none`` (no odometry, no ground-truth pose
reaches the pipeline) through the real :class:`~langgs_ros.pipeline.MappingPipeline` (feedforward backend with its
keyframe memory / anchors / relocalisation, gravity and camera-height scale prior, ``labels`` semantics, fusion,
query engine). The network is the ground-truth test double of ``test/_ff_double.py`` degraded by its error model
(``--errors full``: per-window Sim(3), depth noise growing with depth, per-window affine depth bias, ±5 % focal
error, camera noise, edge confidence, 5 % failed calls; ``--errors simple``: Sim(3) + 1 % depth noise). One
window in ``--drop-every`` is dropped before it reaches the pipeline (what :class:`MappingWorker` does when it
falls behind). CameraInfo is given (``camera_info: replace``) unless ``--no-camera-info``.

Measured: windows registered (or relocalised) out of those processed; camera ATE after one global rigid fit at
the map's own scale (the scale from the prior) and, for reference, after a full Sim(3) fit; the angle between the
map's up (z) and the true up; the drift between the first and the last frames (each end fitted alone; nothing
closes loops); and, per annotated object, whether the top-1 query answer lies in its box + 10 cm.
The last line is::

    unposed windows_registered=X/Y drops=D ate_cm=A up_error_deg=U objects_found=K/N

Example::

    .venv/bin/python bench/bench_unposed.py [--errors full] [--drop-every 5] [--window 8] [--width 518]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "test"))

from _ff_double import ErrorModel, GroundTruthBackbone, record_first_placement  # noqa: E402

from langgs_ros.datasets import open_sequence  # noqa: E402
from langgs_ros.frames import FrameBuffer, KeyframeConfig, WindowConfig  # noqa: E402
from langgs_ros.gaussians import GaussianInitConfig  # noqa: E402
from langgs_ros.pipeline import MappingPipeline, PipelineConfig  # noqa: E402
from langgs_ros.reconstruction.alignment import AlignerConfig, WindowAligner, umeyama  # noqa: E402
from langgs_ros.reconstruction.feedforward import FeedForwardReconstructor  # noqa: E402

HOLOLENS = ROOT.parent / "shared" / "data" / "hololens_office"


def rotation_between_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two vectors, degrees."""
    c = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def main() -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--errors", choices=("full", "simple"), default="full")
    ap.add_argument("--drop-every", type=int, default=5, help="drop one window in this many (0: none)")
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--overlap", type=int, default=2)
    ap.add_argument("--anchors", type=int, default=2)
    ap.add_argument("--width", type=int, default=518, help="model image width of the double (multiple of 14)")
    ap.add_argument("--frames", type=int, default=0, help="first N frames only (0: all)")
    ap.add_argument("--no-camera-info", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not HOLOLENS.is_dir():
        print(f"shared data not found at {HOLOLENS}", file=sys.stderr)
        return 2
    seq = open_sequence(HOLOLENS)
    n = len(seq) if args.frames <= 0 else min(args.frames, len(seq))
    gt_frames = list(seq.frames(range(n)))
    up_true = np.asarray(seq.up, np.float64)
    # The declared prior: the camera's mean height above the annotated floor (a robot declares its mount height).
    import json
    floor = json.loads((HOLOLENS / "annotations" / "objects.json").read_text())["floor_plane"]
    heights = np.array([float(np.asarray(floor["normal"]) @ f.world_from_camera[:3, 3] + floor["offset"])
                        for f in gt_frames])
    camera_height = float(heights.mean())
    errors = ErrorModel.full() if args.errors == "full" else ErrorModel()
    double = GroundTruthBackbone(gt_frames, width=args.width, seed=args.seed, errors=errors)
    aligner = WindowAligner(AlignerConfig(), seed=args.seed)
    rec = FeedForwardReconstructor(backbone=double, aligner=aligner, image_width=args.width,
                                   anchors=args.anchors, camera_height=camera_height,
                                   camera_info="ignore" if args.no_camera_info else "replace")
    cfg = PipelineConfig(backend="feedforward", semantic_source="labels",
                         semantic_args={"label_names": seq.label_names})
    cfg.window = WindowConfig(size=args.window, overlap=args.overlap)
    cfg.keyframes = KeyframeConfig(min_translation=0.0, min_rotation=0.0, min_image_change=0.0)  # every frame
    cfg.gaussians = GaussianInitConfig(stride=4)
    pipeline = MappingPipeline(cfg, reconstructor=rec)
    unposed = [dataclasses.replace(f, world_from_camera=None, depth=None,
                                   intrinsics=None if args.no_camera_info else f.intrinsics) for f in gt_frames]
    buf = FrameBuffer(cfg.keyframes, cfg.window)
    windows = []
    for f in unposed:
        buf.add(f)
        while buf.window_ready():
            windows.append(buf.pop_window())
    last = buf.pop_window(force=True)
    if last:
        windows.append(last)
    placed: dict[str, np.ndarray] = {}
    processed = registered = drops = 0
    t0 = time.perf_counter()
    for w, window in enumerate(windows):
        if args.drop_every > 0 and w % args.drop_every == args.drop_every - 1:
            drops += 1
            continue
        processed += 1
        try:
            pipeline.process_window(window)
        except ValueError as exc:
            print(f"  window {w}: not registered: {exc}")
            continue
        registered += 1
        al = rec.last_alignment  # the map was re-levelled when al.map_correction is set: earlier cameras move too
        record_first_placement(placed, window, al.world_from_camera, al.map_correction)
    elapsed = time.perf_counter() - t0
    stats = pipeline.registration_stats()
    snap = pipeline.snapshot()
    ids = [f.frame_id for f in gt_frames if f.frame_id in placed]
    P = np.stack([placed[i][:3, 3] for i in ids])
    G = np.stack([gt_frames[int(np.flatnonzero([g.frame_id == i for g in gt_frames])[0])].world_from_camera[:3, 3]
                  for i in ids])
    sim = umeyama(P, G)  # full Sim(3), for the scale error and the up direction
    rigid = umeyama(P, G, with_scale=False)  # the map's own scale (prior)
    ate_rigid = float(np.sqrt(np.mean(np.sum((rigid.apply(P) - G) ** 2, axis=1))))
    ate_sim = float(np.sqrt(np.mean(np.sum((sim.apply(P) - G) ** 2, axis=1))))
    # up error from the camera orientations (the chordal mean of R_world,i R_map,i^T; a fit on camera centres
    # leaves the rotation about a nearly straight path poorly determined)
    gt_R = {f.frame_id: f.world_from_camera[:3, :3] for f in gt_frames}
    M = sum(gt_R[i] @ placed[i][:3, :3].T for i in ids)
    U, _, Vt = np.linalg.svd(M)
    R_wm = U @ np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))]) @ Vt
    up_err = rotation_between_deg(R_wm @ np.array([0.0, 0.0, 1.0]), up_true)
    found, names = 0, []
    for obj in seq.objects:
        hits = pipeline.query_engine.query(snap, obj.name, top_k=1, min_score=0.0)
        same = [o for o in seq.objects if o.name == obj.name]
        if hits:
            # the answer is in map coordinates: bring it to the ground-truth world with the map's rigid fit
            c = rigid.apply(np.asarray(hits[0].centroid, np.float64))
            ok = any(o.contains(c, margin=0.10) for o in same)
        else:
            ok = False
        found += int(ok)
        if not ok:
            names.append(obj.name)
    print(f"hololens_office: {n} frames, window {args.window}/{args.overlap}, anchors {args.anchors}, errors "
          f"{args.errors}, CameraInfo {'no' if args.no_camera_info else 'yes'}, camera_height prior "
          f"{camera_height:.3f} m, {elapsed:.1f} s")
    print(f"registration: {stats}")
    print(f"frames placed {len(ids)}/{n}; scale error of the prior {100 * abs(sim.s - 1):.2f} %; "
          f"ATE rigid {100 * ate_rigid:.2f} cm, ATE Sim(3) {100 * ate_sim:.2f} cm; map: "
          f"{len(snap.gaussians)} Gaussians, {len(snap.instances)} instances, scale_source={snap.scale_source}, "
          f"scale_is_metric={snap.scale_is_metric}")
    # Drift (no pose graph closes loops): the map's first and last 16 placed frames, each fitted alone to the
    # ground truth by a rigid transform at the map's scale; the angle and offset between the two fits is how far
    # the chain of windows has wandered from one end of the path to the other.
    k = min(16, len(ids) // 2)
    head, tail = umeyama(P[:k], G[:k], with_scale=False), umeyama(P[-k:], G[-k:], with_scale=False)
    rel = head.inverse().compose(tail)
    drift_deg = math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(rel.R) - 1) / 2))))
    drift_cm = 100 * float(np.linalg.norm(head.apply(P[-k:]) - tail.apply(P[-k:]), axis=1).mean())
    path_m = float(np.linalg.norm(np.diff(G, axis=0), axis=1).sum())
    print(f"drift (first vs last {k} frames fitted alone): {drift_cm:.1f} cm, {drift_deg:.2f} deg over a "
          f"{path_m:.1f} m path")
    if names:
        print(f"objects not found: {names}")
    print(f"unposed windows_registered={registered}/{processed} drops={drops} ate_cm={100 * ate_rigid:.1f} "
          f"up_error_deg={up_err:.2f} objects_found={found}/{len(seq.objects)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
