"""``langgs``: build, query, render and inspect semantic Gaussian maps from the command line (no ROS needed).

    langgs map --rgbd DIR --out MAP.ply [--semantic labels|clip_sam] [--backend rgbd|feedforward] [--window N]
               [--report DIR [--query TEXT ...]]
    langgs query MAP.ply "TEXT" ["TEXT" ...] [--queries-file FILE] [--top-k K] [--json]
    langgs eval MAP.ply --objects objects.json [--queries FILE] [--margin 0.10]
    langgs render MAP.ply (--pose 16 numbers | --pose-file FILE --index I) --intrinsics FX FY CX CY
                  --size W H --out view.png [--what rgb|depth|instances] [--depth-mode planar|expected]
    langgs info MAP.ply

Frames: ``map`` writes the map in the dataset's world frame (the frame of its camera-to-world poses), metres;
``query`` prints positions in that frame (metres, radians).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np

log = logging.getLogger("langgs")


def estimate_up(world_from_camera: np.ndarray) -> np.ndarray:
    """Gravity-up estimate from camera poses: the mean camera "up" (minus the optical y axis) in the world.

    Hand-held and robot cameras are held roughly upright, so the average of ``-R[:, 1]`` over many frames is a
    robust up estimate when nothing better (an IMU, annotations) is known.

    Args:
        world_from_camera: (N, 4, 4) camera-to-world poses, OpenCV optical axes.

    Returns:
        (3,) unit vector in the world frame.
    """
    ups = -np.asarray(world_from_camera)[:, :3, 1]
    m = ups.mean(axis=0)
    n = np.linalg.norm(m)
    return m / n if n > 1e-6 else np.array([0.0, 0.0, 1.0])


def _parse_frames(spec: str | None, n: int) -> list[int]:
    if not spec:
        return list(range(n))
    parts = [int(p) if p else None for p in spec.split(":")]
    return list(range(n))[slice(*parts)]


def cmd_map(args: argparse.Namespace) -> int:
    """Build a map from an RGB-D folder and save it."""
    from tqdm import tqdm

    from langgs_ros.datasets import open_sequence
    from langgs_ros.frames import FrameBuffer, KeyframeConfig, WindowConfig
    from langgs_ros.persistence import save_map
    from langgs_ros.pipeline import MappingPipeline, PipelineConfig
    from langgs_ros.refine import RefineConfig

    seq = open_sequence(args.rgbd, max_depth=args.max_depth)
    for line in seq.report:
        print(f"[langgs] {line}", file=sys.stderr)
    if args.backend == "rgbd" and (seq.intrinsics is None or seq.poses is None
                                   or all(p is None for p in seq.depth_paths)):
        print("[langgs] error: the rgbd backend needs depth, intrinsics and poses; use --backend feedforward",
              file=sys.stderr)
        return 2
    if args.semantic == "labels" and not any(p is not None for p in seq.label_paths):
        print("[langgs] error: --semantic labels needs annotations/labels/ and annotations/objects.json; "
              "use --semantic clip_sam", file=sys.stderr)
        return 2
    indices = _parse_frames(args.frames, len(seq))
    up = seq.up if seq.up is not None else (estimate_up(seq.poses[indices]) if seq.poses is not None else None)
    cfg = PipelineConfig(device=args.device, backend=args.backend, semantic_source=args.semantic)
    cfg.window = WindowConfig(size=args.window, overlap=min(args.overlap, args.window - 1))
    cfg.keyframes = KeyframeConfig(min_translation=0.0, min_rotation=0.0, min_image_change=0.0)  # every frame
    if up is not None:
        cfg.up = tuple(float(x) for x in up)
    if args.backend == "rgbd":
        cfg.backend_args = {"max_depth": args.max_depth}
    if args.semantic == "labels":
        cfg.semantic_args = {"label_names": seq.label_names or None}
    elif args.semantic == "clip_sam":
        cfg.semantic_args = {"preset": args.preset}
    if args.voxel_size:
        cfg.sparsify.base_voxel_size = args.voxel_size
    if args.pixel_block < 1 or args.refine_steps < 0:
        print("[langgs] error: --pixel-block must be >= 1 and --refine-steps >= 0", file=sys.stderr)
        return 2
    cfg.gaussians.block = args.pixel_block
    cfg.refine = RefineConfig(steps=args.refine_steps)
    pipeline = MappingPipeline(cfg)

    buf = FrameBuffer(cfg.keyframes, cfg.window)
    windows = failed = 0

    def process(window: list) -> None:
        nonlocal windows, failed
        try:
            pipeline.process_window(window)
            windows += 1
        except ValueError as exc:  # an unusable window is skipped, the map is unchanged
            failed += 1
            print(f"[langgs] window {window[0].frame_id}..{window[-1].frame_id} skipped: {exc}", file=sys.stderr)

    with tqdm(total=len(indices), desc="mapping", unit="frame", disable=args.quiet) as bar:
        for frame in seq.frames(indices):
            buf.add(frame)
            bar.update(1)
            while buf.window_ready():
                process(buf.pop_window())
                bar.set_postfix(gaussians=pipeline.map.num_gaussians, instances=pipeline.map.num_instances)
        last = buf.pop_window(force=True)
        if last:
            process(last)
    if windows == 0:
        print("[langgs] error: no window could be mapped", file=sys.stderr)
        return 2
    snap = pipeline.snapshot()
    save_map(snap, args.out)
    print(f"[langgs] {windows} windows ({failed} skipped), {len(snap.gaussians)} Gaussians, "
          f"{len(snap.instances)} instances -> {args.out}", file=sys.stderr)
    if args.report:
        write_report(snap, seq, indices, args.report, args.query or [], args.device)
    return 0


def write_report(snap, seq, indices: list[int], out_dir: str, queries: list[str], device: str = "cpu") -> dict:
    """``langgs map --report DIR``: the top-down plan (with the answers of ``queries``) and the view rendered from
    the last used camera, in the dataset's world frame; prints the paths. Returns ``{"top_down", "view"}`` paths."""
    import cv2

    from langgs_ros.query import QueryEngine, to_json_dict
    from langgs_ros.report import write_map_report

    answers = []
    if queries:
        engine = QueryEngine(text_encoder_for(snap.encoder_id, device))
        answers = [to_json_dict(engine.query(snap, q, top_k=1), q) for q in queries]
    cams = last = None
    if seq.poses is not None:
        cams = seq.poses[indices][:, :3, 3]
        if seq.intrinsics is not None:
            h, w = cv2.imread(str(seq.rgb_paths[indices[-1]]), cv2.IMREAD_UNCHANGED).shape[:2]
            last = (seq.poses[indices[-1]], seq.intrinsics, w, h)
    paths = write_map_report(snap, out_dir, camera_path=cams, answers=answers, last_camera=last,
                             title=f"{seq.root.name}: {len(snap.gaussians)} Gaussians, {len(snap.instances)} instances")
    for kind, path in paths.items():
        print(f"[langgs] report {kind}: {path}", file=sys.stderr)
    return paths


def text_encoder_for(encoder_id: str, device: str = "cpu"):
    """Build the text encoder that produced a map's embeddings, from the map's ``encoder_id``.

    Raises:
        ValueError: an encoder id this version does not know.
    """
    from langgs_ros.semantics.text import encoder_from_id

    return encoder_from_id(encoder_id, device=device)


def _read_query_lines(path: str) -> list[str]:
    """Query phrases of a file: one per line; blank lines and lines starting with ``#`` are skipped."""
    from pathlib import Path

    return [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def cmd_query(args: argparse.Namespace) -> int:
    """Answer text queries against a saved map, all in this process (the models are loaded once).

    Queries: the positional ``TEXT`` arguments, then the lines of ``--queries-file``. With ``--json`` one JSON line
    per query (:func:`langgs_ros.query.to_json_dict`; a query that fails adds ``"error"``). A query that nothing
    reaches above ``min_score`` prints the best candidates and their scores on stderr. Exit code 2 if any query
    was rejected (empty, too long) or no query was given.
    """
    from langgs_ros.persistence import load_map
    from langgs_ros.query import QueryConfig, QueryEngine, to_json_dict

    texts = list(args.text or [])
    if args.queries_file:
        texts += _read_query_lines(args.queries_file)
    if not texts:
        print("[langgs] error: no query given (TEXT arguments or --queries-file)", file=sys.stderr)
        return 2
    snap = load_map(args.map)
    engine = QueryEngine(text_encoder_for(snap.encoder_id, args.device), QueryConfig())
    failed = 0
    for text in texts:
        try:
            ans = engine.answer(snap, text, top_k=args.top_k, min_score=args.min_score,
                                negatives=args.negative or ())
        except ValueError as exc:
            failed += 1
            print(f"[langgs] error: {text[:60]!r}: {exc}", file=sys.stderr)
            if args.json:
                print(json.dumps({"query": text, "objects": [], "error": str(exc)}), flush=True)
            continue
        out = to_json_dict(ans.objects, text)
        if ans.message:
            print(f"[langgs] {ans.message}", file=sys.stderr)
        if args.json:
            print(json.dumps(out), flush=True)
            continue
        if len(texts) > 1:
            print(f"{text}:")
        if not ans.objects:
            print(f"no object matches {text!r} ({ans.message.split(': ', 1)[-1]})")
        for o in out["objects"]:
            c = ", ".join(f"{x:.2f}" for x in o["center"])
            s = " x ".join(f"{x:.2f}" for x in o["size"])
            print(f"{o['score']:.3f}  #{o['id']:<4} {o['name'] or '?':<24} center [{c}] m  size {s} m  "
                  f"yaw {o['yaw']:.2f} rad  ({o['num_gaussians']} Gaussians)")
    return 2 if failed else 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Localisation accuracy of a saved map against annotated boxes (:mod:`langgs_ros.evaluation`).

    Prints one JSON line per query (``query``, ``targets``, ``found``, ``iou``, ``iou_target``, ``top`` = the top-1
    result as ``langgs query --json`` prints it, or null) and ``accuracy X% (k/n)`` last.
    """
    from langgs_ros.evaluation import build_queries, load_eval_objects, read_queries, score_query
    from langgs_ros.persistence import load_map
    from langgs_ros.query import QueryConfig, QueryEngine, to_json_dict

    objects = load_eval_objects(args.objects)
    queries = read_queries(args.queries, objects) if args.queries else build_queries(objects)
    by_id = {o.id: o for o in objects}
    snap = load_map(args.map)
    engine = QueryEngine(text_encoder_for(snap.encoder_id, args.device), QueryConfig())
    found = 0
    ious = []
    for q in queries:
        ans = engine.answer(snap, q.text, top_k=1, min_score=args.min_score)
        top = None
        if ans.objects:
            top = to_json_dict(ans.objects[:1], q.text)["objects"][0]
            top["rotation"] = np.asarray(ans.objects[0].box_rotation).tolist()
        hit, iou, iou_target = score_query(q, top, by_id, margin=args.margin, up=snap.up)
        found += hit
        ious.append(iou)
        line = {"query": q.text, "targets": q.targets, "found": hit, "iou": round(iou, 4), "iou_target": iou_target,
                "top": top}
        if ans.message:
            line["message"] = ans.message
        print(json.dumps(line), flush=True)
    n = len(queries)
    print(f"mean IoU {float(np.mean(ious)) if ious else 0.0:.3f}")
    print(f"accuracy {100.0 * found / max(n, 1):.1f}% ({found}/{n})")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    """Render a view of a saved map to a PNG."""
    import cv2

    from langgs_ros.persistence import load_map
    from langgs_ros.render import render_gaussians

    snap = load_map(args.map)
    if args.pose is not None:
        pose = np.asarray(args.pose, dtype=np.float64).reshape(4, 4)
    else:
        rows = np.loadtxt(args.pose_file, dtype=np.float64, ndmin=2)
        pose = rows[args.index].reshape(4, 4)
    fx, fy, cx, cy = args.intrinsics
    K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
    w, h = args.size
    out = render_gaussians(snap.gaussians, pose, K, w, h, render_instances=args.what == "instances",
                           depth_mode=args.depth_mode)
    if args.what == "rgb":
        img = (np.asarray(out.rgb).clip(0, 1) * 255).astype(np.uint8)[..., ::-1]
    elif args.what == "depth":
        d = np.asarray(out.depth)
        img = (d * 1000.0).clip(0, 65535).astype(np.uint16)  # 16-bit PNG in millimetres
    else:
        ids = np.asarray(out.instance_ids)
        rng = np.random.default_rng(0)
        palette = rng.integers(40, 255, size=(max(int(ids.max()) + 2, 2), 3), dtype=np.uint8)
        img = np.where((ids >= 0)[..., None], palette[ids.clip(0)], 0).astype(np.uint8)
    if not cv2.imwrite(str(args.out), img):
        print(f"[langgs] error: could not write {args.out}", file=sys.stderr)
        return 2
    print(f"[langgs] wrote {args.what} {w}x{h} -> {args.out}", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print a map's counts, bounds, encoder and instances."""
    from langgs_ros.persistence import map_info

    info = map_info(args.map)
    print(json.dumps(info, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``langgs`` argument parser."""
    p = argparse.ArgumentParser(prog="langgs", description="Language-queryable semantic Gaussian maps")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("map", help="build a map from an RGB-D folder (hololens or TUM layout)")
    m.add_argument("--rgbd", required=True, help="input folder")
    m.add_argument("--out", required=True, help="output .ply (instances sidecar written beside it)")
    m.add_argument("--semantic", choices=("labels", "clip_sam"), default="labels")
    m.add_argument("--backend", choices=("rgbd", "feedforward"), default="rgbd")
    m.add_argument("--preset", choices=("full", "tiny"), default="full", help="clip_sam model size")
    m.add_argument("--window", type=int, default=8, help="frames per window")
    m.add_argument("--overlap", type=int, default=2, help="frames shared by consecutive windows")
    m.add_argument("--frames", help="python slice start:stop:step of frames to use")
    m.add_argument("--max-depth", type=float, default=10.0, help="m; farther depth is invalid")
    m.add_argument("--voxel-size", type=float, default=0.0, help="m; base voxel size (0 = default)")
    m.add_argument("--pixel-block", type=int, default=1, help="b x b pixel blocks averaged into one surfel (1 = none)")
    m.add_argument("--refine-steps", type=int, default=0,
                   help="photometric refinement steps per window (langgs_ros.refine; 0 = off)")
    m.add_argument("--device", default="cpu")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.add_argument("--report", metavar="DIR", help="also write top_down.png and last_view.png (pictures of the map)")
    m.add_argument("--query", action="append", help="with --report: a query whose top answer is drawn (repeatable)")
    m.set_defaults(func=cmd_map)

    q = sub.add_parser("query", help="find objects by text (several queries: one process, one JSON line each)")
    q.add_argument("map")
    q.add_argument("text", nargs="*", help="query phrase(s)")
    q.add_argument("--queries-file", help="file with one query per line (# comments, blank lines skipped)")
    q.add_argument("--top-k", type=int, default=None)
    q.add_argument("--min-score", type=float, default=None)
    q.add_argument("--negative", action="append", help="extra negative phrase (repeatable)")
    q.add_argument("--json", action="store_true", help="print one JSON object per query, one per line")
    q.add_argument("--device", default="cpu")
    q.set_defaults(func=cmd_query)

    e = sub.add_parser("eval", help="localisation accuracy against annotated 3D boxes (LERF-style, top-1 in box)")
    e.add_argument("map")
    e.add_argument("--objects", required=True, help="annotations (objects.json: id, name, synonyms, center, size, "
                                                     "rotation)")
    e.add_argument("--queries", help="file: one phrase per line, optionally 'PHRASE => ID, NAME' (default: every "
                                     "name and synonym)")
    e.add_argument("--margin", type=float, default=0.10, help="m; the box is grown by this on every side")
    e.add_argument("--min-score", type=float, default=None, help="relevancy threshold (default: the engine's)")
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("render", help="render a view of a map")
    r.add_argument("map")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--pose", type=float, nargs=16, help="camera-to-world 4x4, row-major")
    g.add_argument("--pose-file", help="file of row-major 4x4 camera-to-world poses, one per line")
    r.add_argument("--index", type=int, default=0, help="line of --pose-file")
    r.add_argument("--intrinsics", type=float, nargs=4, required=True, metavar=("FX", "FY", "CX", "CY"))
    r.add_argument("--size", type=int, nargs=2, required=True, metavar=("W", "H"))
    r.add_argument("--what", choices=("rgb", "depth", "instances"), default="rgb")
    r.add_argument("--depth-mode", choices=("planar", "expected"), default="planar",
                   help="depth: where the ray meets the blended splat plane (planar, PGSR) or the blended z of "
                        "the splats' means (expected, 3DGS)")
    r.add_argument("--out", required=True)
    r.set_defaults(func=cmd_render)

    i = sub.add_parser("info", help="summary of a map file")
    i.add_argument("map")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``langgs`` command; returns the exit code (2 on a user error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(args.func(args))
    except (ValueError, OSError) as exc:
        print(f"[langgs] error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
