"""Nothing a peer sends kills the node or changes its map behind its back (in-process node, real DDS clients).

Covered here: a map edit (reset, load) while the worker is stuck in a long window is refused and never runs later;
oversized images; queries that are too long or carry too many negatives; stamps jumping back (a bag loop): each is
answered or counted, and ``/find_object`` still answers with the map unchanged afterwards.
"""

from __future__ import annotations

import threading
import time

import pytest
from ros_helpers import DiagnosticsWatcher, call_service

pytestmark = [pytest.mark.ros, pytest.mark.slow]

FRAMES = [4, 5, 6, 7, 8, 9]


class BlockingPipeline:
    """Test double standing for a GPU window that takes longer than a service may wait: wraps a real
    :class:`~langgs_ros.pipeline.MappingPipeline` and, while :attr:`release` is cleared, holds the worker inside
    ``process_window`` (:attr:`entered` says it is there)."""

    def __init__(self, pipeline) -> None:
        self._p = pipeline
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def process_window(self, frames):
        self.entered.set()
        self.release.wait(120)
        return self._p.process_window(frames)

    def __getattr__(self, name):
        return getattr(self._p, name)


@pytest.fixture
def setup(spinning_executor, hololens_dir, tmp_path):
    from rclpy.node import Node
    from rclpy.parameter import Parameter

    from langgs_ros.datasets import open_sequence
    from langgs_ros.pipeline import MappingPipeline, PipelineConfig
    from langgs_ros.ros.mapping_node import MappingNode, _load_label_names
    from langgs_ros.ros.replay import FolderReplay

    ctx = spinning_executor.executor.context
    names_file = hololens_dir / "annotations" / "objects.json"
    pipeline = BlockingPipeline(MappingPipeline(PipelineConfig(
        semantic_source="labels", semantic_args={"label_names": _load_label_names(str(names_file))})))
    overrides = {"backend": "rgbd", "semantic_source": "labels", "pose_source": "odometry",
                 "label_names_file": str(names_file), "window.size": 3, "window.overlap": 1,
                 "window_period": 0.5, "queue.max_windows": 16, "queue.max_frames": 40,
                 "limits.worker_command_timeout": 1.0, "limits.max_image_pixels": 540 * 360,
                 "map_dir": str(tmp_path / "maps")}
    node = MappingNode("hostile_mapping_node", pipeline=pipeline, context=ctx,
                       parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
    spinning_executor.add(node)
    client = spinning_executor.add(Node("hostile_client", context=ctx))
    client.diag = DiagnosticsWatcher(client)
    replay = spinning_executor.add(FolderReplay(open_sequence(hololens_dir), node_name="hostile_replay", context=ctx))
    assert replay.wait_for_subscribers(60)
    return node, pipeline, client, replay


def find(client, text: str, **kw):
    from langgs_ros.srv import FindObject

    return call_service(client, FindObject, "/find_object", FindObject.Request(query=text, **kw))


def wait_for(pred, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def test_hostile_peers_never_change_the_map_behind_its_back(setup) -> None:
    from std_srvs.srv import Trigger

    from langgs_ros.srv import LoadMap, SaveMap

    node, pipeline, client, replay = setup
    replay.run(rate=4.0, indices=FRAMES[:4])
    node.worker.flush(timeout=300)
    wait_for(lambda: node.worker.processed_windows >= 1 and len(node.worker.snapshot().instances) > 0)
    before = node.worker.snapshot()
    n_gauss, n_inst = len(before.gaussians), len(before.instances)
    assert find(client, "sofa").success
    assert call_service(client, SaveMap, "/hostile_mapping_node/save_map", SaveMap.Request(path="a.ply")).success

    # the worker is stuck in a long window: map edits are refused (not queued behind the caller's back)
    pipeline.release.clear()
    pipeline.entered.clear()
    replay.run(rate=4.0, indices=FRAMES[4:])
    wait_for(pipeline.entered.is_set)
    resp = call_service(client, Trigger, "/hostile_mapping_node/reset", Trigger.Request())
    assert not resp.success and "busy" in resp.message
    resp = call_service(client, LoadMap, "/hostile_mapping_node/load_map", LoadMap.Request(path="a.ply"))
    assert not resp.success and "map unchanged" in resp.message
    assert find(client, "sofa").success  # queries never wait for the worker
    pipeline.release.set()
    node.worker.flush(timeout=300)
    after = node.worker.snapshot()
    assert len(after.gaussians) >= n_gauss and len(after.instances) >= n_inst  # the refused reset never ran

    # oversized images are dropped and counted; bad queries answer success=false with a reason
    import numpy as np
    from std_msgs.msg import Header

    from langgs_ros.ros.replay import _image

    replay.pub_image.publish(_image(np.zeros((400, 600, 3), np.uint8), "rgb8", Header(frame_id="cam")))
    wait_for(lambda: client.diag.get("input_errors.image_too_large") >= 1, 60)
    r = find(client, "x" * 1001)
    assert not r.success and "too long" in r.message
    r = find(client, "sofa", negatives=[f"thing {i}" for i in range(17)])
    assert not r.success and "negatives" in r.message

    # stamps jump back (a bag played again): counted, pending buffers cleared, mapping continues, map kept
    windows = node.worker.processed_windows
    kept = len(node.worker.snapshot().gaussians)
    replay.t0 -= 1000.0
    replay.run(rate=4.0, indices=FRAMES[:4])
    node.worker.flush(timeout=300)
    wait_for(lambda: client.diag.get("input_errors.time_jumps") + client.diag.get("worker_time_jumps") >= 1, 60)
    wait_for(lambda: node.worker.processed_windows > windows, 120)
    assert len(node.worker.snapshot().gaussians) >= 0.9 * kept
    final = find(client, "sofa")
    assert final.success and final.objects
    assert node.worker.faults == 0 and not node.health.faults, node.health.faults
