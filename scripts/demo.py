#!/usr/bin/env python3
"""The main-job demo: replay an RGB-D folder into the real mapping node over loopback DDS, then ask it
language queries through ``/find_object`` and print one JSON line per answer.

    make demo [DATA=<folder>]     (hololens or TUM layout; default ../shared/data/hololens_office)

Two processes: this one (replay publisher + service client) and ``mapping_node``, started through the robot's
entry point ``ros2 launch langgs_ros mapping.launch.py params_file:=build/demo_params_<backend>.yaml`` with the
replay's topics as remaps (directly as ``python -m langgs_ros.ros.mapping_node`` where ``ros2``/launch_ros are
missing, which it says). The params file is ``config/mapping_labels.yaml`` (``labels`` semantic source, odometry
poses) when the folder is annotated, else ``config/mapping.yaml`` (``clip_sam``), with the settings below.
DDS is confined to loopback (``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``, the repo's loopback Fast DDS profile,
a random ``ROS_DOMAIN_ID``) before ``rclpy.init()``.

With annotations, every query is checked against the ground-truth box (grown 10 cm) expressed in the replay's
z-up ``odom`` frame, and the accuracy is printed last. Without a DATA folder and without the shared data (a
user's machine), the TUM RGB-D ``fr1_desk`` sample and the CLIP + SAM weights are downloaded (with progress, cached;
:mod:`langgs_ros.download`, :func:`langgs_ros.weights_cli.ensure_weights`); a failed download prints one paragraph
(what failed, how to get it by hand, how to use a local folder) and exits with status 2. After each part the map is
saved through ``~/save_map`` and drawn (:mod:`langgs_ros.report`): ``build/demo/<backend>/top_down.png`` and
``last_view.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from langgs_ros.datasets import DatasetError  # noqa: E402
from langgs_ros.download import DownloadError, fetch_tum_sample  # noqa: E402
from langgs_ros.ros.dds_env import configure_loopback_dds  # noqa: E402
from langgs_ros.ros.params_file import CONFIG_DIR, write_params_file  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data" / "hololens_office"

# Lighter clip_sam settings on the CPU (README, "make demo"): every 40th frame of the sequence is replayed and each
# one is a keyframe (fr1_desk: 15 keyframes, about 1.3 s / 0.55 m apart), windows without overlap (the rgbd backend
# has poses, overlap would segment those frames twice), and SAM prompted with an 8x8 point grid instead of 16x16.
CPU_CLIP_SAM_FRAMES = "::40"
CPU_CLIP_SAM_PARAMS = {
    "semantic.points_per_side": 8, "keyframe.min_translation": 0.0, "keyframe.min_rotation": 0.0,
    "keyframe.min_image_change": 0.0, "window.overlap": 0,
}


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a CUDA device, else ``cpu``; anything else is returned unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def settle_seconds(diag: dict[str, str]) -> float:
    """Seconds the node's queues must stay empty and its map unchanged before the map counts as finished.

    ``/diagnostics`` does not count the window the worker is processing, so "queues empty" alone can be seen
    while the last window is still running (minutes with clip_sam on a CPU): wait longer than ``window_period``
    plus 1.5x the duration of the last processed window (its stage times), at least 4 s.
    """
    window_s = sum(float(diag.get(k, 0.0) or 0.0) for k in ("t_reconstruct_s", "t_semantics_s", "t_gaussians_s",
                                                              "t_fuse_s", "t_refine_s"))
    return max(4.0, 2.0 + 1.5 * window_s)


def find_service(node, suffix: str, timeout: float = 10.0) -> str | None:
    """Full name of the first service whose name ends with ``/<suffix>`` (e.g. the node's ``~/save_map``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, _ in node.get_service_names_and_types():
            if name.endswith("/" + suffix):
                return name
        time.sleep(0.2)
    return None


def write_demo_report(node, seq, indices: list[int], answers: list[dict], out_dir: Path, label: str) -> None:
    """Save the node's map through ``~/save_map`` into ``out_dir`` and draw it (top-down plan + last camera view,
    in the node's z-up map frame = the replay's ``odom``); prints the paths. Problems are printed, not raised."""
    import cv2
    import numpy as np

    from langgs_ros.persistence import load_map
    from langgs_ros.report import write_map_report
    from langgs_ros.ros.replay import gravity_alignment
    from langgs_ros.srv import SaveMap

    out_dir.mkdir(parents=True, exist_ok=True)
    name = find_service(node, "save_map")
    if name is None:
        print("[demo] pictures: skipped, the node offers no save_map service", flush=True)
        return
    client = node.create_client(SaveMap, name)
    client.wait_for_service(timeout_sec=10)
    future = client.call_async(SaveMap.Request(path="map.ply"))  # relative to the node's map_dir = out_dir
    deadline = time.monotonic() + 300
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    resp = future.result() if future.done() else None
    if resp is None or not resp.success:
        print(f"[demo] pictures: skipped, save_map failed ({resp.message if resp else 'timeout'})", flush=True)
        return
    snap = load_map(out_dir / "map.ply")
    cams = last = None
    if seq.poses is not None:
        map_from_camera = gravity_alignment(seq.up)[None] @ seq.poses[indices]
        cams = map_from_camera[:, :3, 3]
        if seq.intrinsics is not None:
            h, w = cv2.imread(str(seq.rgb_paths[indices[-1]]), cv2.IMREAD_UNCHANGED).shape[:2]
            last = (map_from_camera[-1], np.asarray(seq.intrinsics), w, h)
    paths = write_map_report(snap, out_dir, camera_path=cams, answers=answers, last_camera=last,
                             title=f"{label}: {seq.root.name}, {len(snap.gaussians)} Gaussians, "
                                   f"{len(snap.instances)} instances")
    print(f"[demo] pictures: top-down map {paths['top_down']}"
          + (f", view from the last camera {paths['view']}" if "view" in paths else ""), flush=True)


def run_session(seq, backend: str, params: dict, args, label: str) -> tuple[int, int]:
    """Start mapping_node with ``params``, replay ``seq`` into it, ask the queries; returns (hits, total)."""
    import numpy as np
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    from langgs_ros.ros.replay import FolderReplay, gravity_alignment
    from langgs_ros.srv import FindObject

    annotated = params.get("semantic_source") == "labels"
    log_path = ROOT / "build" / f"demo_node_{backend}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # config/mapping_labels.yaml for annotated data, the robot default otherwise, with this session's settings
    report_dir = Path(args.report_dir) / backend
    report_dir.mkdir(parents=True, exist_ok=True)
    params = {**params, "map_dir": str(report_dir)}  # ~/save_map names are relative to map_dir
    params_path = write_params_file(ROOT / "build" / f"demo_params_{backend}.yaml", params,
                                    base=CONFIG_DIR / ("mapping_labels.yaml" if annotated else "mapping.yaml"))
    cmd = node_command(params_path)
    print(f"[demo] {label}: starting mapping_node ({params['semantic_source']} semantics, {backend} backend) with "
          f"`{' '.join(cmd[:4]) if cmd[0] == 'ros2' else 'python -m langgs_ros.ros.mapping_node'}`, params "
          f"{params_path}; log: {log_path}", flush=True)
    node_proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                                 env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=ROOT, start_new_session=True)
    rclpy.init()
    executor = SingleThreadedExecutor()
    replay = FolderReplay(seq)
    client_node = Node("langgs_demo_client")
    executor.add_node(replay)
    executor.add_node(client_node)
    diag: dict[str, str] = {}

    def on_diag(msg: DiagnosticArray) -> None:
        for st in msg.status:
            if st.name.endswith("mapping"):
                diag.clear()
                diag.update({kv.key: kv.value for kv in st.values})

    client_node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    ok = 0
    total = 0
    answers: list[dict] = []
    try:
        client = client_node.create_client(FindObject, "/find_object")
        if not client.wait_for_service(timeout_sec=120):
            raise RuntimeError(f"mapping_node did not come up; see {log_path}")
        if not replay.wait_for_subscribers(120):
            raise RuntimeError(f"mapping_node did not subscribe to all camera topics; see {log_path}")
        indices = list(range(len(seq)))
        if args.frames:
            indices = indices[slice(*[int(p) if p else None for p in args.frames.split(":")])]
        t0 = time.monotonic()
        n = replay.run(rate=args.rate, indices=indices)
        print(f"[demo] replayed {n} frames in {time.monotonic() - t0:.1f} s; waiting for the map ...", flush=True)
        deadline = time.monotonic() + args.timeout
        stable = 0
        last = None
        while time.monotonic() < deadline:
            time.sleep(1.0)
            state = (diag.get("queued_frames"), diag.get("queued_windows"), diag.get("processed_windows"),
                     diag.get("map_version"))
            # Idle as test/ros_helpers.py's wait_idle sees it: no frame waiting for its partners (sync.pending),
            # in the queue or in the frame buffer, no window queued or running (worker_busy).
            idle = (diag.get("queued_frames") == "0" and diag.get("queued_windows") == "0"
                    and diag.get("pending_keyframes") == "0" and diag.get("worker_busy", "0") == "0"
                    and diag.get("sync.pending", "0") == "0"
                    and int(diag.get("processed_windows", 0)) + int(diag.get("failed_windows", 0)) > 0)
            stable = stable + 1 if (idle and state == last) else 0
            last = state
            if stable >= settle_seconds(diag):
                break
        print(f"[demo] map: {diag.get('map_gaussians')} Gaussians, {diag.get('map_instances')} instances, "
              f"{diag.get('processed_windows')} windows, dropped windows {diag.get('dropped_windows')}, dropped frames "
              f"{diag.get('dropped_frames')}, keyframes {diag.get('keyframes')}", flush=True)

        # A phrase is answered correctly when the top result lies in the box of any annotated object that has the
        # phrase as its name or synonym ("table", "plant" and "basket" name several objects by design).
        queries: list[tuple[str, list]] = []
        if annotated:
            valid: dict[str, list] = {}
            for obj in seq.objects:
                for text in [obj.name, *obj.synonyms]:
                    valid.setdefault(text.lower(), []).append(obj)
            seen = set()
            for obj in seq.objects:
                for text in [obj.name, *obj.synonyms[:2]]:
                    if text.lower() not in seen:
                        seen.add(text.lower())
                        queries.append((text, valid[text.lower()]))
        else:
            queries = [(t, []) for t in ("chair", "keyboard", "monitor", "cup", "book")]
        odom_from_world = gravity_alignment(seq.up)
        for text, targets in queries:
            future = client.call_async(FindObject.Request(query=text, max_results=3))
            while not future.done():
                time.sleep(0.01)
            resp = future.result()
            objs = [{"id": o.instance_id, "name": o.label, "score": round(o.score, 4),
                     "center": [round(o.pose.pose.position.x, 4), round(o.pose.pose.position.y, 4),
                                round(o.pose.pose.position.z, 4)],
                     "size": [round(o.size.x, 4), round(o.size.y, 4), round(o.size.z, 4)],
                     "yaw": round(2.0 * float(np.arctan2(o.pose.pose.orientation.z, o.pose.pose.orientation.w)), 4),
                     "num_gaussians": o.num_gaussians} for o in resp.objects]
            line = {"query": text, "objects": objs}
            if not resp.success:
                line["error"] = resp.message
            if targets:
                total += 1
                hit = False
                if objs:
                    c_odom = np.array([*objs[0]["center"], 1.0])
                    c_world = np.linalg.inv(odom_from_world) @ c_odom
                    hit = any(t.contains(c_world[:3], margin=0.10) for t in targets)
                ok += hit
                line["inside_ground_truth_box"] = hit
            print(json.dumps(line), flush=True)
            answers.append(line)
        if total:
            print(f"[demo] top-1 inside the ground-truth box (+10 cm): {ok}/{total} = {100.0 * ok / total:.1f} %",
                  flush=True)
        write_demo_report(client_node, seq, indices, answers, report_dir, label)
    finally:
        executor.shutdown()
        spin.join(timeout=10)
        replay.destroy_node()
        client_node.destroy_node()
        rclpy.shutdown()
        stop_group(node_proc)
    return ok, total


def node_command(params_path: Path) -> list[str]:
    """``ros2 launch langgs_ros mapping.launch.py`` with ``params_path`` and the replay's topics as remaps (the
    robot's entry point); ``python -m langgs_ros.ros.mapping_node`` when ``ros2`` / launch_ros are missing."""
    if shutil.which("ros2") and importlib.util.find_spec("launch_ros") is not None:
        remaps = [f"{t}:=/{t}" for t in ("image", "camera_info", "depth", "labels", "odom")]
        # respawn off: a node that dies during the demo is an error to see, not to hide
        return ["ros2", "launch", "langgs_ros", "mapping.launch.py", f"params_file:={params_path}", "respawn:=false",
                *remaps]
    print("[demo] `ros2 launch` is not available (run scripts/setup_env.sh, then `. scripts/ros_env.sh`): starting "
          "the node directly", flush=True)
    return [sys.executable, "-m", "langgs_ros.ros.mapping_node", "--ros-args", "--params-file", str(params_path)]


def stop_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGINT the process group of ``proc`` (ros2 launch and the node: clean ROS shutdown); SIGKILL after
    ``timeout`` s."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> int:
    """Entry point: status 0 after the demo ran, 2 when data or weights could not be had (one paragraph, no
    traceback)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="?", default="", help="RGB-D folder (hololens or TUM layout)")
    ap.add_argument("--rate", type=float, default=4.0, help="replay frames per second")
    ap.add_argument("--frames", default="", help="python slice start:stop:step of frames to replay")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    ap.add_argument("--timeout", type=float, default=900.0, help="s to wait for the node to finish mapping")
    ap.add_argument("--vggt-weights", default="facebook/VGGT-1B-Commercial",
                    help="VGGT checkpoint path or Hugging Face repo id for the feedforward part")
    ap.add_argument("--part2", choices=("auto", "yes", "no"), default="auto",
                    help="feed-forward part: auto = with CUDA (downloading the weights) or when they are cached")
    ap.add_argument("--shared-dir", default=str(SHARED_DATA), help="data used when no folder is given, if present")
    ap.add_argument("--report-dir", default=str(ROOT / "build" / "demo"), help="where the pictures are written")
    ap.add_argument("--semantic-preset", choices=("full", "tiny"), default="full",
                    help="clip_sam models: full (real weights) or tiny (random init, plumbing tests only)")
    args = ap.parse_args(argv)
    try:
        return run_demo(args)
    except (DownloadError, DatasetError) as exc:
        print(f"[demo] {exc}", file=sys.stderr, flush=True)
        return 2


def run_demo(args: argparse.Namespace) -> int:
    """The demo (see the module docstring).

    Raises:
        DownloadError: the sample or the weights could not be downloaded. DatasetError: unreadable folder.
    """
    if args.data:
        data = Path(args.data)
    elif Path(args.shared_dir).is_dir():
        data = Path(args.shared_dir)
    else:
        data = fetch_tum_sample()
    device = resolve_device(args.device)

    from langgs_ros.datasets import open_sequence

    seq = open_sequence(data)
    for line in seq.report:
        print(f"[demo] {line}", flush=True)
    annotated = bool(seq.objects) and any(p is not None for p in seq.label_paths)
    semantic = "labels" if annotated else "clip_sam"
    params = {
        "backend": "rgbd", "semantic_source": semantic, "pose_source": "odometry", "device": device,
        "window_period": 2.0, "queue.max_frames": 500, "queue.max_windows": 100, "publish.gaussians_period": 1.0,
    }
    if annotated:
        params["label_names_file"] = str(seq.root / "annotations" / "objects.json")
    elif args.semantic_preset == "tiny":
        params["semantic.preset"] = "tiny"
        print("[demo] clip_sam with the tiny random-init models: tests the plumbing, the answers mean nothing",
              flush=True)
    else:
        from langgs_ros.weights_cli import ensure_weights

        print("[demo] clip_sam needs the CLIP and SAM weights (downloaded once, then taken from the cache)", flush=True)
        for line in ensure_weights(["clip", "sam"]):
            print(f"[demo] {line}", flush=True)
    if not annotated and device == "cpu":
        params.update(CPU_CLIP_SAM_PARAMS)
        args.frames = args.frames or CPU_CLIP_SAM_FRAMES
        print(f"[demo] CPU: lighter clip_sam settings (frames {args.frames}, {CPU_CLIP_SAM_PARAMS})", flush=True)
    print(f"[demo] device: {device}", flush=True)
    configure_loopback_dds(random.randint(1, 100))
    run_session(seq, "rgbd", params, args, "part 1/2, posed RGB-D")

    # Part 2: the feed-forward unposed reconstructor (VGGT) on the colour images only, with odometry giving
    # metric scale and gravity. Its weights come from the local cache, or are downloaded with CUDA / --part2 yes.
    from langgs_ros.models.vggt.weights import WeightsNotFoundError, resolve_checkpoint
    from langgs_ros.weights_cli import fetch_vggt

    label = "part 2/2, feedforward (VGGT) backend"
    if args.part2 == "no":
        print(f"[demo] {label}: skipped (--part2 no)", flush=True)
        return 0
    try:
        ckpt = resolve_checkpoint(args.vggt_weights, local_files_only=True)
    except WeightsNotFoundError:
        if args.part2 == "auto" and not device.startswith("cuda"):
            print(f"[demo] {label}: skipped on the CPU (VGGT-1B: about 5 GB of weights and minutes per window "
                  "without a GPU); `make demo DEMO_ARGS=\"--part2 yes\"` fetches and runs it anyway", flush=True)
            return 0
        try:
            print(f"[demo] {fetch_vggt(args.vggt_weights, check=False)}", flush=True)
            ckpt = resolve_checkpoint(args.vggt_weights, local_files_only=True)
        except (DownloadError, WeightsNotFoundError) as exc:
            what = exc.reason + ". " + exc.manual if isinstance(exc, DownloadError) else str(exc)
            print(f"[demo] {label}: skipped, no weights: {what}", flush=True)
            return 0
    ff = dict(params, backend="feedforward", **{"feedforward.weights": str(ckpt)})
    ff.pop("window.overlap", None)  # the feed-forward windows are aligned on their overlap frames
    run_session(seq, "feedforward", ff, args, "part 2/2, feed-forward unposed (VGGT)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
