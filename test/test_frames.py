"""FrameBuffer: validation, keyframe selection, overlapping windows, bounded memory."""

from __future__ import annotations

import math

import numpy as np
import pytest

from langgs_ros.frames import FrameBuffer, FrameError, KeyframeConfig, WindowConfig, validate_frame
from langgs_ros.types import Frame


def pose(x: float = 0.0, yaw: float = 0.0) -> np.ndarray:
    T = np.eye(4)
    c, s = math.cos(yaw), math.sin(yaw)
    T[:3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    T[0, 3] = x
    return T


def frame(t: float, x: float = 0.0, yaw: float = 0.0, h: int = 24, w: int = 32, posed: bool = True,
          value: int = 100) -> Frame:
    return Frame(rgb=np.full((h, w, 3), value, np.uint8), stamp=t, frame_id=f"f{t}",
                 depth=np.ones((h, w), np.float32), intrinsics=np.array([[30.0, 0, 16], [0, 30.0, 12], [0, 0, 1]]),
                 world_from_camera=pose(x, yaw) if posed else None)


def test_validate_cleans_bad_depth_and_rejects_bad_shapes() -> None:
    f = frame(0.0)
    f.depth[0, 0], f.depth[0, 1], f.depth[0, 2] = np.nan, np.inf, -1.0
    out = validate_frame(f)
    assert out.depth[0, :3].tolist() == [0.0, 0.0, 0.0]
    assert np.isnan(f.depth[0, 0]), "the caller's array must not be modified"
    with pytest.raises(FrameError, match="depth shape"):
        validate_frame(Frame(rgb=f.rgb, stamp=0.0, depth=np.ones((3, 3), np.float32)))
    with pytest.raises(FrameError, match="uint8"):
        validate_frame(Frame(rgb=f.rgb.astype(np.float32), stamp=0.0))
    with pytest.raises(FrameError, match="empty image"):
        validate_frame(Frame(rgb=np.zeros((0, 5, 3), np.uint8), stamp=0.0))
    with pytest.raises(FrameError, match="intrinsics"):
        validate_frame(Frame(rgb=f.rgb, stamp=0.0, intrinsics=np.zeros((3, 3))))
    bad = pose()
    bad[:3, :3] *= 2.0
    with pytest.raises(FrameError, match="orthonormal"):
        validate_frame(Frame(rgb=f.rgb, stamp=0.0, world_from_camera=bad))
    with pytest.raises(FrameError, match="label image"):
        validate_frame(Frame(rgb=f.rgb, stamp=0.0, labels=np.zeros((2, 2), np.int32)))
    with pytest.raises(FrameError, match="finite"):
        validate_frame(Frame(rgb=f.rgb, stamp=float("nan")))


def test_keyframes_by_motion_and_time() -> None:
    buf = FrameBuffer(KeyframeConfig(min_translation=0.1, min_rotation=0.2, max_interval=10.0))
    assert buf.add(frame(0.0))
    assert not buf.add(frame(0.1, x=0.05))  # too little motion
    assert buf.add(frame(0.2, x=0.15))  # translation
    assert buf.add(frame(0.3, x=0.15, yaw=0.3))  # rotation
    assert not buf.add(frame(0.4, x=0.15, yaw=0.3))
    assert buf.add(frame(20.0, x=0.15, yaw=0.3))  # max_interval
    assert buf.num_keyframes == 4 and buf.num_received == 6


def test_unposed_keyframes_by_image_change() -> None:
    buf = FrameBuffer(KeyframeConfig(min_image_change=0.1, max_interval=100.0))
    assert buf.add(frame(0.0, posed=False, value=100))
    assert not buf.add(frame(0.1, posed=False, value=105))
    assert buf.add(frame(0.2, posed=False, value=200))


def test_stamps_going_backwards_and_size_changes_are_rejected() -> None:
    buf = FrameBuffer()
    buf.add(frame(1.0))
    with pytest.raises(FrameError, match="older"):
        buf.add(frame(0.5, x=1.0))
    with pytest.raises(FrameError, match="image size changed"):
        buf.add(frame(2.0, x=1.0, h=10, w=10))
    buf.reset()
    assert buf.add(frame(0.5, x=1.0, h=10, w=10))


def test_windows_overlap_and_partial_windows() -> None:
    buf = FrameBuffer(KeyframeConfig(min_translation=0.0, min_rotation=0.0), WindowConfig(size=4, overlap=1))
    windows = []
    for i in range(10):
        buf.add(frame(float(i), x=float(i)))
        while buf.window_ready():
            windows.append([f.stamp for f in buf.pop_window()])
    assert windows == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert buf.pop_window() is None
    buf.add(frame(10.0, x=10.0))
    assert buf.pop_window() is None
    assert [f.stamp for f in buf.pop_window(force=True)] == [9.0, 10.0]


def test_pending_keyframes_are_bounded() -> None:
    buf = FrameBuffer(KeyframeConfig(min_translation=0.0, min_rotation=0.0), WindowConfig(size=4, overlap=0),
                      max_pending=6)
    for i in range(20):
        buf.add(frame(float(i), x=float(i)))
    assert buf.num_pending == 6 and buf.dropped == 14


def test_window_config_validation() -> None:
    with pytest.raises(ValueError):
        WindowConfig(size=0)
    with pytest.raises(ValueError):
        WindowConfig(size=4, overlap=4)


def test_time_jump_flushes_pending_keyframes_and_accepts_older_stamps() -> None:
    buf = FrameBuffer(KeyframeConfig(min_translation=0.0, min_rotation=0.0), WindowConfig(size=4, overlap=1))
    for i in range(6):
        buf.add(frame(100.0 + i, x=float(i)))
    assert [f.stamp for f in buf.pop_window()] == [100, 101, 102, 103]
    flushed = buf.on_time_jump()  # a bag loop: the pending keyframes 104, 105 are mapped with their overlap
    assert [[f.stamp for f in w] for w in flushed] == [[103, 104, 105]]
    assert buf.num_pending == 0 and buf.on_time_jump() == []
    windows = []
    for i in range(4):  # the new time line: older stamps accepted; the first window starts fresh (no carry)
        assert buf.add(frame(1.0 + i, x=float(i)))
        while buf.window_ready():
            windows.append([f.stamp for f in buf.pop_window()])
    assert windows == [[1, 2, 3, 4]]
    assert buf.num_received == 10 and buf.num_keyframes == 10


def test_worker_time_jump_keeps_the_map_and_maps_the_new_time_line() -> None:
    """MappingWorker.time_jump with the real pipeline (rgbd backend, labels source over a fixed text table)."""
    import torch
    from _core_fixtures import FixedTextEncoder

    from langgs_ros.pipeline import MappingPipeline, MappingWorker, PipelineConfig
    from langgs_ros.semantics.labels import LabelSemanticSource

    cfg = PipelineConfig(keyframes=KeyframeConfig(min_translation=0.0, min_rotation=0.0),
                         window=WindowConfig(size=2, overlap=0))
    encoder = FixedTextEncoder({"box": torch.tensor([1.0, 0.0, 0.0])})
    pipeline = MappingPipeline(cfg, semantic_source=LabelSemanticSource({1: "box"}, text_encoder=encoder))

    def labelled(t: float, x: float) -> Frame:
        f = frame(t, x=x, h=48, w=64)
        f.intrinsics = np.array([[60.0, 0, 32], [0, 60.0, 24], [0, 0, 1]])
        f.labels = np.zeros((48, 64), np.int32)
        f.labels[10:30, 20:40] = 1
        return f

    worker = MappingWorker(pipeline, window_period=0.0, max_queued_frames=10, max_queued_windows=10)
    worker.start()
    try:
        for i in range(3):  # windows [100, 101]; 102 stays pending
            worker.submit(labelled(100.0 + i, 0.3 * i))
        worker.time_jump()
        for i in range(2):  # stamps restart: without the jump these would be rejected as older
            worker.submit(labelled(1.0 + i, 0.3 * i + 2.0))
        worker.flush()
        assert worker.time_jumps == 1 and worker.rejected_frames == 0 and worker.failed_windows == 0
        assert worker.processed_windows == 3  # [100, 101], [102] (flushed at the jump), [1, 2]
        assert worker.snapshot().camera_positions.shape[0] == 5  # the map kept every frame of both time lines
    finally:
        worker.stop()
