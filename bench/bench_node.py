"""Benchmark of the ROS 2 mapping node over loopback DDS (two processes).

Usage::

    .venv/bin/python bench/bench_node.py [--gaussians 1000000] [--instances 1000] [--queries 50]

Measures, printed side by side with the targets:

1. image callback cost per 640x480 frame (conversion + stamp matching + enqueue; the node's own measurement,
   reported on /diagnostics as ``image_callback_ms_mean``), target <= 2 ms;
2. ``/find_object`` round-trip latency over DDS for a map of ``--gaussians`` Gaussians / ``--instances``
   instances (a synthetic map loaded with ``load_on_start``), excluding the first (cold) text encoding,
   target <= 20 ms;
3. sustained input rate: frames are replayed at increasing rates; for each the node's resident memory before
   and after, queued/dropped frames and windows. The node absorbs a rate when its memory stays flat (drops are
   its bounded-queue policy at work, not growth).

DDS stays on loopback (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, the repo's loopback profile, a random domain).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "test"))
sys.path.insert(0, str(REPO))

from langgs_ros.ros.dds_env import configure_loopback_dds  # noqa: E402

HOLOLENS = REPO.parent / "shared" / "data" / "hololens_office"


def synthetic_map(path: Path, n: int, k: int, encoder_id: str, dim: int) -> None:
    """Write a map of ``n`` Gaussians in ``k`` instances (random unit embeddings) with :func:`save_map`."""
    import torch

    from langgs_ros.persistence import save_map
    from langgs_ros.types import Gaussians, InstanceTable, MapSnapshot

    g = torch.Generator().manual_seed(0)
    centers = torch.rand(k, 3, generator=g) * torch.tensor([40.0, 40.0, 1.0])
    inst = torch.randint(0, k, (n,), generator=g, dtype=torch.int32)
    means = centers[inst.long()] + torch.randn(n, 3, generator=g) * 0.2
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=1)
    gs = Gaussians(means, quats, torch.rand(n, 3, generator=g) * 0.02 + 0.005, torch.rand(n, generator=g) * 0.9 + 0.05,
                   torch.rand(n, 3, generator=g), inst, weights=torch.ones(n))
    emb = torch.nn.functional.normalize(torch.randn(k, dim, generator=g), dim=1)
    table = InstanceTable(ids=np.arange(k, dtype=np.int32), embeddings=emb, names=[f"object {i}" for i in range(k)],
                          centers=centers.double().numpy(), sizes=np.full((k, 3), 0.6), yaws=np.zeros(k),
                          num_gaussians=np.bincount(inst.numpy(), minlength=k).astype(np.int64),
                          observations=np.ones(k))
    cams = np.random.default_rng(0).uniform([0, 0, 1.2], [40, 40, 1.2], size=(200, 3))
    save_map(MapSnapshot(gaussians=gs, instances=table, encoder_id=encoder_id, camera_positions=cams,
                         floor_height=0.0, version=1), path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gaussians", type=int, default=1_000_000)
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--rates", type=float, nargs="+", default=[5.0, 15.0, 30.0])
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per input rate")
    args = ap.parse_args()
    configure_loopback_dds(random.randint(1, 100))

    import cv2
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.node import Node
    from ros_helpers import DiagnosticsWatcher, call_service, process_rss_mb, start_node_process, stop_process

    from langgs_ros.datasets import open_sequence
    from langgs_ros.ros.replay import FolderReplay
    from langgs_ros.semantics.text import MINILM_ENCODER_ID
    from langgs_ros.srv import FindObject

    tmp = Path(tempfile.mkdtemp(prefix="langgs_bench_"))
    big = tmp / "big.ply"
    t0 = time.perf_counter()
    synthetic_map(big, args.gaussians, args.instances, MINILM_ENCODER_ID, 384)
    print(f"[bench] synthetic map {args.gaussians} Gaussians / {args.instances} instances written in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    rclpy.init()
    ex = MultiThreadedExecutor(num_threads=4)
    client = Node("bench_client")
    diag = DiagnosticsWatcher(client)
    ex.add_node(client)
    spin = threading.Thread(target=ex.spin, daemon=True)
    spin.start()
    rows: list[tuple[str, str, str]] = []
    try:
        # --- 2. query latency on the big map
        proc = start_node_process({"backend": "rgbd", "semantic_source": "labels", "pose_source": "odometry",
                                   "map_dir": str(tmp), "autosave_path": big.name, "load_on_start": True,
                                   "publish.gaussians_period": 3600.0}, log_path=tmp / "node_query.log")
        try:
            call_service(client, FindObject, "/find_object", FindObject.Request(query="warm up"), timeout=300)
            lat = []
            for _ in range(args.queries):
                q = FindObject.Request(query="object number one", max_results=5)
                t = time.perf_counter()
                resp = call_service(client, FindObject, "/find_object", q, timeout=60)
                lat.append(1e3 * (time.perf_counter() - t))
                assert resp.success, resp.message
            lat_client_created = statistics.median(lat)
            # persistent client (no discovery per call): the latency a robot's navigation stack sees
            cl = client.create_client(FindObject, "/find_object")
            cl.wait_for_service(timeout_sec=30)
            lat2 = []
            for _ in range(args.queries):
                t = time.perf_counter()
                fut = cl.call_async(FindObject.Request(query="object number one", max_results=5))
                while not fut.done():
                    time.sleep(0.0002)
                lat2.append(1e3 * (time.perf_counter() - t))
            rows.append((f"/find_object round trip, {args.gaussians:,} G / {args.instances} inst (persistent client)",
                         f"median {statistics.median(lat2):.1f} ms, p90 {np.percentile(lat2, 90):.1f} ms", "<= 20 ms"))
            rows.append(("/find_object incl. client creation + discovery", f"median {lat_client_created:.1f} ms", "-"))
        finally:
            stop_process(proc)

        # --- 1 + 3. callback cost at 640x480 and sustained input rates
        seq = open_sequence(HOLOLENS)
        replay = FolderReplay(seq)
        ex.add_node(replay)
        resized = {}
        seq_frame = seq.frame

        def frame_640(i: int):
            if i not in resized:
                f = seq_frame(i)
                f.rgb = cv2.resize(f.rgb, (640, 480), interpolation=cv2.INTER_LINEAR)
                f.depth = cv2.resize(f.depth, (640, 480), interpolation=cv2.INTER_NEAREST)
                f.labels = cv2.resize(f.labels.astype(np.uint16), (640, 480),
                                      interpolation=cv2.INTER_NEAREST).astype(np.int32)
                f.intrinsics = f.intrinsics @ np.diag([640 / 540, 480 / 360, 1.0])
                resized[i] = f
            return resized[i]

        seq.frame = lambda i, with_labels=True: frame_640(i)  # replay 640x480 frames
        proc = start_node_process({"backend": "rgbd", "semantic_source": "labels", "pose_source": "odometry",
                                   "label_names_file": str(HOLOLENS / "annotations" / "objects.json"),
                                   "queue.max_frames": 30, "queue.max_windows": 2},
                                  log_path=tmp / "node_rate.log")
        try:
            while replay.pub_image.get_subscription_count() == 0:
                time.sleep(0.1)
            for i in range(len(seq)):
                frame_640(i)
            replay.run(rate=5.0, indices=list(range(0, 16)))
            diag.wait_idle(min_windows=1, timeout=300)
            for rate in args.rates:
                rss0 = process_rss_mb(proc.pid)
                d0 = (diag.get("dropped_frames"), diag.get("dropped_windows"), diag.get("processed_windows"))
                n = int(rate * args.seconds)
                replay.t0 += 10_000.0
                t = time.perf_counter()
                replay.run(rate=rate, indices=[i % len(seq) for i in range(n)])
                achieved = n / (time.perf_counter() - t)
                time.sleep(2.0)
                rss1 = process_rss_mb(proc.pid)
                values = diag.values
                rows.append((f"input {rate:.0f} Hz ({achieved:.1f} achieved), {n} frames 640x480",
                             f"RSS {rss0:.0f} -> {rss1:.0f} MiB, queued {values.get('queued_frames')}/"
                             f"{values.get('queued_windows')}, dropped frames +{diag.get('dropped_frames') - d0[0]}, "
                             f"windows +{diag.get('dropped_windows') - d0[1]}, "
                             f"processed +{diag.get('processed_windows') - d0[2]}", "memory flat"))
                diag.wait_idle(min_windows=0, timeout=600)
            rows.insert(0, ("image callback per 640x480 frame (node-measured mean)",
                            f"{float(diag.values.get('image_callback_ms_mean', 'nan')):.2f} ms", "<= 2 ms"))
        finally:
            stop_process(proc)
            seq.frame = seq_frame
    finally:
        ex.shutdown()
        spin.join(10)
        client.destroy_node()
        rclpy.shutdown()
    print("\n| measurement | result | target |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
