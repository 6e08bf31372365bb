"""Unposed mapping (issue 9): windows registered against the map's keyframe memory, relocalisation, frames fused
once, gravity and the camera-height scale prior, and the scale's provenance in map info.

Runs on the real ``hololens_office`` frames through :class:`_ff_double.GroundTruthBackbone` (ground truth in a
random Sim(3) per window, plus the error model where a test says so). Small windows and a 280-px model width keep
it fast.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from _ff_double import ErrorModel, GroundTruthBackbone, dropped, record_first_placement, window_indices

from langgs_ros.reconstruction.alignment import AlignerConfig, AlignmentError, WindowAligner, frame_key, umeyama
from langgs_ros.reconstruction.feedforward import FeedForwardReconstructor
from langgs_ros.reconstruction.gravity import GravityConfig, estimate_gravity_and_scale, mean_camera_up
from langgs_ros.reconstruction.keyframe_memory import KeyframeMemory, image_descriptor
from langgs_ros.types import Frame

WIDTH = 280
N_FRAMES = 24


@pytest.fixture(scope="module")
def frames(hololens_seq) -> list[Frame]:
    return list(hololens_seq.frames(range(N_FRAMES)))


@pytest.fixture(scope="module")
def camera_height(hololens_dir, frames) -> float:
    floor = json.loads((hololens_dir / "annotations" / "objects.json").read_text())["floor_plane"]
    return float(np.mean([np.asarray(floor["normal"]) @ f.world_from_camera[:3, 3] + floor["offset"]
                          for f in frames]))


def unposed(frames: list[Frame], idx: list[int]) -> list[Frame]:
    """Frames as an unposed camera gives them: colour + CameraInfo, no depth, no pose."""
    return [dataclasses.replace(frames[i], world_from_camera=None, depth=None, labels=None) for i in idx]


def run_windows(frames: list[Frame], rec: FeedForwardReconstructor, drop: set[int] = frozenset(),
                size: int = 6, overlap: int = 2) -> tuple[dict[str, np.ndarray], list[Exception | None]]:
    """Windows through ``rec`` (``drop``: window indices never given to it); first placement of each frame."""
    placed: dict[str, np.ndarray] = {}
    outcome: list[Exception | None] = []
    for w, idx in enumerate(window_indices(len(frames), size, overlap)):
        if w in drop:
            continue
        window = unposed(frames, idx)
        try:
            out = rec.reconstruct(window)
        except ValueError as exc:
            outcome.append(exc)
            continue
        outcome.append(None)
        assert [f.frame_id for f in out.frames] == [f.frame_id for f in window]  # anchors are not returned
        assert out.depth.shape[0] == len(window)
        record_first_placement(placed, window, out.world_from_camera, out.map_correction)
    return placed, outcome


def ate_after_sim3(placed: dict[str, np.ndarray], frames: list[Frame], with_scale: bool = True) -> float:
    ids = [f for f in frames if f.frame_id in placed]
    P = np.stack([placed[f.frame_id][:3, 3] for f in ids])
    G = np.stack([f.world_from_camera[:3, 3] for f in ids])
    fit = umeyama(P, G, with_scale=with_scale)
    return float(np.sqrt(np.mean(np.sum((fit.apply(P) - G) ** 2, axis=1))))


def up_error_deg(placed: dict[str, np.ndarray], frames: list[Frame], up_true) -> float:
    """Angle between the map's z and the true up, from the camera orientations (chordal mean of R_world R_map^T)."""
    ids = [f for f in frames if f.frame_id in placed]
    M = sum(f.world_from_camera[:3, :3] @ placed[f.frame_id][:3, :3].T for f in ids)
    U, _, Vt = np.linalg.svd(M)
    up_map = U @ np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))]) @ Vt @ np.array([0.0, 0.0, 1.0])
    return math.degrees(math.acos(float(np.clip(up_map @ np.asarray(up_true), -1, 1))))


# ------------------------------------------------------------------------------------------------ keyframe memory
def test_image_descriptor_ranks_neighbouring_frames_first(frames: list[Frame]) -> None:
    mem = KeyframeMemory(capacity=64)
    for i in range(0, 20):
        mem.add(frame_key(frames[i]), frames[i], None, 0)
    sims = mem.similarity([frames[21]])
    ranked = sorted(sims, key=lambda k: -sims[k])
    assert ranked[0][0] in {frames[i].frame_id for i in range(16, 20)}  # the nearest frames in time look alike
    d = image_descriptor(frames[0].rgb)
    assert d.shape == (288,) and abs(float(np.linalg.norm(d)) - 1.0) < 1e-5
    darker = (frames[0].rgb.astype(np.float32) * 0.7).astype(np.uint8)
    assert float(d @ image_descriptor(darker)) > 0.9  # hue/saturation only: exposure changes matter little
    assert float(d @ image_descriptor(frames[22].rgb)) < float(d @ image_descriptor(frames[1].rgb))


def test_anchor_sets_exclude_window_frames_and_relocalise_over_the_memory(frames: list[Frame]) -> None:
    mem = KeyframeMemory(capacity=64)
    for i in range(20):
        mem.add(frame_key(frames[i]), frames[i], None, 0)
    assert not mem.add(frame_key(frames[3]), frames[3], "other", 1)  # first placement wins
    window = [frames[i] for i in (18, 19, 20, 21)]
    sets = mem.anchor_sets(window, k=2, exclude={frame_key(f) for f in window}, attempts=3)
    assert len(sets) == 3 and all(len(s) == 2 for s in sets)
    keys = [kf.key for s in sets for kf in s]
    assert len(set(keys)) == 6  # every attempt tries new keyframes
    assert not {frame_key(f) for f in window} & set(keys)
    # the last set spreads over the memory in time (relocalisation against any keyframe)
    ids = sorted(int(kf.frame.frame_id) for kf in sets[2])
    assert ids[-1] - ids[0] >= 8
    assert mem.anchor_sets(window, k=0) == [[]] and KeyframeMemory().anchor_sets(window, 2) == [[]]


def test_memory_eviction_keeps_capacity_and_recent_frames(frames: list[Frame]) -> None:
    mem = KeyframeMemory(capacity=8, keep_recent=3)
    for i in range(N_FRAMES):
        mem.add(frame_key(frames[i]), frames[i], None, i)
    assert len(mem) == 8 and mem.evicted == N_FRAMES - 8
    assert all(frame_key(frames[i]) in mem for i in range(N_FRAMES - 3, N_FRAMES))
    assert mem[frame_key(frames[-1])].frame.depth is None  # anchors are images only


# ------------------------------------------------------------------------------------------------ registration
@pytest.mark.slow
def test_dropped_windows_do_not_end_mapping(frames: list[Frame]) -> None:
    """Without anchors a dropped window disconnects every later one; with anchors each window is registered."""
    drop = dropped(len(window_indices(N_FRAMES, 6, 2)), every=3, offset=1)
    assert drop
    chain = FeedForwardReconstructor(backbone=GroundTruthBackbone(frames, WIDTH, seed=1), image_width=WIDTH,
                                     anchors=0)
    _, outcome = run_windows(frames, chain, drop)
    assert any(isinstance(e, AlignmentError) and "shares no frame" in str(e) for e in outcome)
    rec = FeedForwardReconstructor(backbone=GroundTruthBackbone(frames, WIDTH, seed=1), image_width=WIDTH, anchors=2)
    placed, outcome = run_windows(frames, rec, drop)
    assert outcome and all(e is None for e in outcome), outcome
    assert rec.windows_registered == len(outcome) and rec.registration_failures == 0
    assert len(rec.aligner.memory) >= N_FRAMES - 6 * len(drop)
    err = ate_after_sim3(placed, frames)
    assert err < 0.03, f"ATE after one global Sim(3) = {100 * err:.2f} cm"


@pytest.mark.slow
def test_failed_prediction_relocalises_with_other_anchors(frames: list[Frame]) -> None:
    # call 2 is window 2's first attempt (windows 0 and 1 took one call each)
    double = GroundTruthBackbone(frames, WIDTH, seed=2, errors=ErrorModel(fail_calls={2}))
    rec = FeedForwardReconstructor(backbone=double, image_width=WIDTH, anchors=2)
    placed, outcome = run_windows(frames, rec)
    assert all(e is None for e in outcome)
    assert double.calls[2].failed and not double.calls[3].failed
    assert rec.relocalisations == 1 and rec.registration_failures == 0
    assert ate_after_sim3(placed, frames) < 0.03
    # every attempt fails: the window is counted and skipped, the next one is registered again
    double = GroundTruthBackbone(frames, WIDTH, seed=3, errors=ErrorModel(fail_calls={2, 3, 4}))
    rec = FeedForwardReconstructor(backbone=double, image_width=WIDTH, anchors=2, max_relocalisations=2)
    _, outcome = run_windows(frames, rec)
    assert isinstance(outcome[2], AlignmentError) and "3 attempt" in str(outcome[2])
    assert outcome[3:] and all(e is None for e in outcome[3:])
    assert rec.registration_failures == 1
    assert rec.registration_stats()["windows_registered"] == len(outcome) - 1


# ------------------------------------------------------------------------------------------------ gravity / scale
@pytest.mark.slow
def test_gravity_and_camera_height_prior(frames: list[Frame], camera_height: float, hololens_seq) -> None:
    double = GroundTruthBackbone(frames, WIDTH, seed=4)
    rec = FeedForwardReconstructor(backbone=double, image_width=WIDTH, camera_height=camera_height)
    placed, outcome = run_windows(frames, rec)
    assert all(e is None for e in outcome)
    g = rec.aligner.gravity
    assert g is not None and g.up_source == "floor_plane" and g.scale_source == "camera_height"
    assert g.tilt_deg < 30.0
    ids = [f for f in frames if f.frame_id in placed]
    P = np.stack([placed[f.frame_id][:3, 3] for f in ids])
    G = np.stack([f.world_from_camera[:3, 3] for f in ids])
    fit = umeyama(P, G)
    up_err = up_error_deg(placed, frames, hololens_seq.up)
    assert up_err < 2.0, f"map up is {up_err:.2f} deg from the true up"
    assert abs(fit.s - 1.0) < 0.05, f"scale from the camera-height prior off by {100 * abs(fit.s - 1):.1f} %"
    # cameras sit at the declared height above the map's floor (z = 0 at the floor)
    assert abs(float(np.mean(P[:, 2])) - camera_height) < 0.15
    # without the prior the map is z-up too, but keeps the network's units
    rec2 = FeedForwardReconstructor(backbone=GroundTruthBackbone(frames, WIDTH, seed=4), image_width=WIDTH)
    run_windows(frames[:12], rec2)
    assert rec2.aligner.scale_source == "none" and rec2.aligner.gravity.map_from_reconstruction.s == 1.0


def test_gravity_estimate_rejects_a_wall_and_falls_back_to_camera_up() -> None:
    rng = np.random.default_rng(0)
    cams = np.tile(np.eye(4), (4, 1, 1))
    cams[:, :3, :3] = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)  # looking along +y, y_cam down = -z
    cams[:, :3, 3] = rng.normal(scale=0.2, size=(4, 3)) + np.array([0.0, 0.0, 1.5])
    assert np.allclose(mean_camera_up(cams), [0, 0, 1])
    floor = np.c_[rng.uniform(-3, 3, (3000, 2)), np.zeros(3000)]
    wall = np.c_[rng.uniform(-3, 3, 4000), np.full(4000, 3.0), rng.uniform(0, 2.5, 4000)]
    table = np.c_[rng.uniform(-0.5, 0.5, (1500, 2)), np.full(1500, 0.7)]
    est = estimate_gravity_and_scale(np.vstack([floor, wall, table]), cams, GravityConfig(camera_height=3.0), 0)
    assert est.up_source == "floor_plane" and np.allclose(est.up_reconstruction, [0, 0, 1], atol=0.01)
    h = float(np.mean(cams[:, 2, 3]))
    assert est.camera_height_rec == pytest.approx(h, abs=0.02)  # the floor, not the (higher) table top
    assert est.map_from_reconstruction.s == pytest.approx(3.0 / h, rel=0.02)
    only_wall = estimate_gravity_and_scale(wall, cams, GravityConfig(camera_height=3.0), 0)
    assert only_wall.up_source == "camera_up" and only_wall.scale_source == "none"


# ------------------------------------------------------------------------------------------------ pipeline
class CountingSource:
    """Wraps a real semantic source and records which frames it segments (stands for nothing else)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.text_encoder = inner.text_encoder
        self.segmented: list[str] = []

    def segment(self, frames):
        self.segmented += [f.frame_id for f in frames]
        return self.inner.segment(frames)


@pytest.mark.slow
def test_pipeline_segments_and_fuses_each_frame_once(frames: list[Frame], hololens_seq, camera_height: float,
                                                     tmp_path) -> None:
    from langgs_ros.frames import FrameBuffer, KeyframeConfig, WindowConfig
    from langgs_ros.gaussians import GaussianInitConfig
    from langgs_ros.persistence import load_map, save_map
    from langgs_ros.pipeline import MappingPipeline, PipelineConfig
    from langgs_ros.semantics.base import make_semantic_source

    cfg = PipelineConfig(backend="feedforward", semantic_source="labels",
                         semantic_args={"label_names": hololens_seq.label_names})
    cfg.window = WindowConfig(size=6, overlap=2)
    cfg.keyframes = KeyframeConfig(min_translation=0.0, min_rotation=0.0, min_image_change=0.0)
    cfg.gaussians = GaussianInitConfig(stride=8)
    source = CountingSource(make_semantic_source("labels", label_names=hololens_seq.label_names))
    rec = FeedForwardReconstructor(backbone=GroundTruthBackbone(frames, WIDTH, seed=5), image_width=WIDTH,
                                   aligner=WindowAligner(AlignerConfig(), seed=5), camera_height=camera_height)
    pipeline = MappingPipeline(cfg, reconstructor=rec, semantic_source=source)
    buf = FrameBuffer(cfg.keyframes, cfg.window)
    fused = 0
    for f in frames[:16]:
        buf.add(dataclasses.replace(f, world_from_camera=None, depth=None))
        while buf.window_ready():
            fused += pipeline.process_window(buf.pop_window()).num_fused_frames
    fused += pipeline.process_window(buf.pop_window(force=True)).num_fused_frames
    assert len(source.segmented) == len(set(source.segmented)) == 16 == fused  # overlap frames not again
    assert pipeline.skipped_fused_frames > 0
    snap = pipeline.snapshot()
    assert snap.scale_is_metric is False and snap.scale_source == "camera_height"
    stats = pipeline.registration_stats()
    assert stats["scale_source"] == "camera_height" and stats["up_source"] == "floor_plane"
    path = tmp_path / "unposed.ply"
    save_map(snap, path)
    loaded = load_map(path)
    assert loaded.scale_is_metric is False and loaded.scale_source == "camera_height"


def _floor_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Four cameras 1.5 m above a floor (z = 0, 3000 points) with a table top (z = 0.7): points, poses (z up)."""
    cams = np.tile(np.eye(4), (4, 1, 1))
    cams[:, :3, :3] = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)  # looking along +y, y_cam down = -z
    cams[:, :3, 3] = rng.normal(scale=0.2, size=(4, 3)) * [1, 1, 0] + np.array([0.0, 0.0, 1.5])
    floor = np.c_[rng.uniform(-3, 3, (3000, 2)), np.zeros(3000)]
    table = np.c_[rng.uniform(-0.5, 0.5, (1500, 2)), np.full(1500, 0.7)]
    return np.vstack([floor, table]), cams


def test_relevel_correction_levels_and_rescales_a_tilted_map() -> None:
    from scipy.spatial.transform import Rotation

    from langgs_ros.reconstruction.alignment import Sim3
    from langgs_ros.reconstruction.gravity import GravityEstimate, relevel_correction, relevel_due

    rng = np.random.default_rng(0)
    pts, cams = _floor_scene(rng)
    cfg = GravityConfig(camera_height=3.0)  # the cameras are 1.5 reconstruction units up: true scale 2
    tilted = Sim3(2.2, Rotation.from_rotvec(np.radians(4.0) * np.array([0.6, -0.8, 0.0])).as_matrix(),
                  np.array([0.1, 0.2, 0.3]))
    current = GravityEstimate(tilted, np.array([0.0, 0.0, 1.0]), "floor_plane", "camera_height")
    out = relevel_correction(current, pts, cams, cfg, 0)
    assert out is not None
    new, C = out
    assert new.info["relevel_deg"] == pytest.approx(4.0, abs=0.2)
    assert C.s == pytest.approx(2.0 / 2.2, rel=0.01) and new.map_from_reconstruction.s == pytest.approx(2.0, rel=0.01)
    S = new.map_from_reconstruction
    assert np.degrees(np.arccos(min(1.0, float(S.R[2, 2])))) < 0.2  # R's up (z) is the map's z
    floor_map = S.apply(pts[:3000])
    assert abs(float(np.median(floor_map[:, 2]))) < 0.01  # the floor at z = 0
    np.testing.assert_allclose(C.apply(np.zeros((1, 3)))[0, :2], 0.0, atol=1e-12)  # x, y of the origin kept
    # a map already level and at the right scale is left alone; so are too large jumps
    assert relevel_correction(new, pts, cams, cfg, 0) is None
    wild = GravityEstimate(Sim3(2.0, Rotation.from_rotvec([0.5, 0.0, 0.0]).as_matrix(), np.zeros(3)),
                           np.array([0.0, 0.0, 1.0]), "floor_plane", "camera_height")
    assert relevel_correction(wild, pts, cams, cfg, 0) is None  # 29 deg > relevel_max_deg
    assert [n for n in range(1, 21) if relevel_due(n, cfg)] == [2, 4, 8, 12, 16, 20]
    assert not any(relevel_due(n, GravityConfig(relevel_every=0)) for n in range(1, 21))


@pytest.mark.slow
def test_relevelling_keeps_the_map_gravity_aligned(frames: list[Frame], camera_height: float, hololens_seq) -> None:
    """Under the full error model the first window's floor plane tilts the map; re-estimating on the keyframe
    memory as windows arrive levels it (earlier cameras move with the map)."""
    def run(relevel_every: int) -> tuple[float, FeedForwardReconstructor]:
        cfg = AlignerConfig()
        cfg.gravity.relevel_every = relevel_every
        rec = FeedForwardReconstructor(backbone=GroundTruthBackbone(frames, WIDTH, seed=6, errors=ErrorModel.full()),
                                       image_width=WIDTH, aligner=WindowAligner(cfg, seed=6),
                                       camera_height=camera_height)
        placed, outcome = run_windows(frames, rec)
        assert sum(e is None for e in outcome) >= len(outcome) - 1
        return up_error_deg(placed, frames, hololens_seq.up), rec

    err_fixed, _ = run(0)
    err, rec = run(4)
    print(f"\nup error: first-window estimate {err_fixed:.2f} deg, re-levelled {err:.2f} deg "
          f"({rec.aligner.relevellings} corrections)")
    assert rec.aligner.relevellings >= 1 and rec.registration_stats()["relevellings"] >= 1
    assert err < 2.0 and err < err_fixed
