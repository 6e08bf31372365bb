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
user's machine), the TUM RGB-D ``fr1_desk`` sample is downloaded (see :func:`fetch_sample`).
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
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from langgs_ros.ros.dds_env import configure_loopback_dds  # noqa: E402
from langgs_ros.ros.params_file import CONFIG_DIR, write_params_file  # noqa: E402

TUM_URL = "https://cvg.cit.tum.de/rgbd/dataset/freiburg1/rgbd_dataset_freiburg1_desk.tgz"


def fetch_sample(dest: Path) -> Path:
    """Download and unpack TUM RGB-D fr1_desk (about 330 MB) into ``dest``; returns the sequence folder.

    Raises:
        RuntimeError: the download failed (no network, proxy, ...) with a message saying what to do instead.
    """
    folder = dest / "rgbd_dataset_freiburg1_desk"
    if (folder / "rgb.txt").is_file():
        return folder
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "fr1_desk.tgz"
    print(f"[demo] downloading {TUM_URL} ...", flush=True)
    try:
        urllib.request.urlretrieve(TUM_URL, archive)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    except Exception as exc:
        raise RuntimeError(f"could not download the TUM sample ({exc}); run `make demo DATA=<rgbd folder>` "
                           "with a local hololens- or TUM-layout folder instead") from exc
    return folder


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
            idle = (diag.get("queued_frames") == "0" and diag.get("queued_windows") == "0"
                    and diag.get("pending_keyframes") == "0")
            stable = stable + 1 if (idle and state == last) else 0
            last = state
            if stable >= 4:  # idle and unchanged for 4 s (longer than window_period)
                break
        print(f"[demo] map: {diag.get('map_gaussians')} Gaussians, {diag.get('map_instances')} instances, "
              f"{diag.get('processed_windows')} windows, dropped windows {diag.get('dropped_windows')}", flush=True)

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
        if total:
            print(f"[demo] top-1 inside the ground-truth box (+10 cm): {ok}/{total} = {100.0 * ok / total:.1f} %",
                  flush=True)
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="?", default="", help="RGB-D folder (hololens or TUM layout)")
    ap.add_argument("--rate", type=float, default=4.0, help="replay frames per second")
    ap.add_argument("--frames", default="", help="python slice start:stop:step of frames to replay")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=900.0, help="s to wait for the node to finish mapping")
    ap.add_argument("--vggt-weights", default="facebook/VGGT-1B-Commercial",
                    help="VGGT checkpoint path or Hugging Face repo id for the feedforward part")
    args = ap.parse_args(argv)

    data = Path(args.data) if args.data else ROOT.parent / "shared" / "data" / "hololens_office"
    if not args.data and not data.is_dir():
        data = fetch_sample(ROOT / "build" / "demo_data")
    configure_loopback_dds(random.randint(1, 100))

    from langgs_ros.datasets import open_sequence

    seq = open_sequence(data)
    for line in seq.report:
        print(f"[demo] {line}", flush=True)
    annotated = bool(seq.objects) and any(p is not None for p in seq.label_paths)
    semantic = "labels" if annotated else "clip_sam"
    params = {
        "backend": "rgbd", "semantic_source": semantic, "pose_source": "odometry", "device": args.device,
        "window_period": 2.0, "queue.max_frames": 500, "queue.max_windows": 100, "publish.gaussians_period": 1.0,
    }
    if annotated:
        params["label_names_file"] = str(seq.root / "annotations" / "objects.json")
    run_session(seq, "rgbd", params, args, "part 1/2, posed RGB-D")

    # Part 2: the feed-forward unposed reconstructor (VGGT) on the colour images only, with odometry giving
    # metric scale and gravity. It needs the released weights, which load from the local cache only.
    from langgs_ros.models.vggt.weights import WeightsNotFoundError, resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(args.vggt_weights, local_files_only=True)
    except WeightsNotFoundError as exc:
        print(f"[demo] part 2/2, feedforward (VGGT) backend: skipped, weights not found here ({exc})", flush=True)
        return 0
    ff = dict(params, backend="feedforward", **{"feedforward.weights": str(ckpt)})
    run_session(seq, "feedforward", ff, args, "part 2/2, feed-forward unposed (VGGT)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
