"""Tests of :mod:`langgs_ros.reconstruction.alignment`: Umeyama, RANSAC, trajectory fits and the WindowAligner.

The aligner tests run on the real ``hololens_office`` RGB-D sequence: each window's ground-truth depth and poses
are expressed in a random Sim(3) frame (scale in [0.3, 3]) with 1 % depth noise, and the aligner must recover
the trajectory (unposed: up to one global Sim(3); with the ground-truth poses as odometry: directly, metric).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _ff_double import record_first_placement, window_indices
from scipy.spatial.transform import Rotation

from langgs_ros.reconstruction.alignment import (
    AlignerConfig,
    AlignmentError,
    Sim3,
    WindowAligner,
    fit_trajectory_sim3,
    ransac_umeyama,
    sample_frame_geometry,
    umeyama,
)
from langgs_ros.types import Frame


def random_sim3(rng: np.random.Generator, lo: float = 0.3, hi: float = 3.0) -> Sim3:
    """A random similarity: log-uniform scale in [lo, hi], uniform rotation, N(0, 2) translation."""
    return Sim3(float(np.exp(rng.uniform(np.log(lo), np.log(hi)))),
                Rotation.random(random_state=rng).as_matrix(), rng.normal(scale=2.0, size=3))


def rotation_error_deg(Ra: np.ndarray, Rb: np.ndarray) -> float:
    """Angle of ``Ra Rb^T`` in degrees."""
    return float(np.degrees(Rotation.from_matrix(Ra @ Rb.T).magnitude()))


def ate(a: np.ndarray, b: np.ndarray) -> float:
    """RMS distance between corresponding (N, 3) points."""
    return float(np.sqrt(np.mean(np.sum((a - b) ** 2, axis=1))))


# ------------------------------------------------------------------------------------------------ Sim3 / Umeyama
def test_sim3_algebra() -> None:
    rng = np.random.default_rng(1)
    A, B = random_sim3(rng), random_sim3(rng)
    p = rng.normal(size=(10, 3))
    np.testing.assert_allclose(A.compose(B).apply(p), A.apply(B.apply(p)), atol=1e-12)
    np.testing.assert_allclose(A.inverse().apply(A.apply(p)), p, atol=1e-12)
    np.testing.assert_allclose(A.matrix() @ np.r_[p[0], 1.0], np.r_[A.apply(p[0]), 1.0], atol=1e-12)
    C = Sim3.from_matrix(A.matrix())
    assert C.s == pytest.approx(A.s) and np.allclose(C.R, A.R) and np.allclose(C.t, A.t)
    # transform_pose keeps a proper rotation, moves the centre like a point, and is consistent with points
    T = np.eye(4)
    T[:3, :3] = Rotation.random(random_state=3).as_matrix()
    T[:3, 3] = [1.0, 2.0, 3.0]
    T2 = A.transform_pose(T)
    R2 = T2[:3, :3]
    assert np.allclose(R2.T @ R2, np.eye(3)) and np.linalg.det(R2) == pytest.approx(1.0)
    np.testing.assert_allclose(T2[:3, 3], A.apply(T[:3, 3]))
    x_cam = np.array([0.3, -0.2, 2.0])  # a point at depth 2 seen by the camera -> depth 2 s in the target
    world = T[:3, :3] @ x_cam + T[:3, 3]
    np.testing.assert_allclose(R2 @ (x_cam * A.s) + T2[:3, 3], A.apply(world), atol=1e-12)
    with pytest.raises(ValueError):
        Sim3(-1.0)
    with pytest.raises(ValueError):
        Sim3(1.0, np.diag([1.0, 1.0, -1.0]))  # a reflection is not a rotation


@pytest.mark.parametrize("weighted", [False, True])
def test_umeyama_recovers_exact_sim3(weighted: bool) -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        true = random_sim3(rng, 0.05, 20.0)
        src = rng.normal(size=(50, 3)) * rng.uniform(0.1, 5.0)
        w = rng.uniform(0.1, 1.0, 50) if weighted else None
        est = umeyama(src, true.apply(src), w)
        assert est.s == pytest.approx(true.s, rel=1e-9)
        assert rotation_error_deg(est.R, true.R) < 1e-6
        np.testing.assert_allclose(est.t, true.t, atol=1e-8 * (1 + np.abs(true.t).max()))
    # rigid variant keeps s = 1
    rigid = Sim3(1.0, true.R, true.t)
    est = umeyama(src, rigid.apply(src), with_scale=False)
    assert est.s == 1.0 and rotation_error_deg(est.R, rigid.R) < 1e-6


def test_umeyama_weights_ignore_zero_weight_outliers() -> None:
    rng = np.random.default_rng(3)
    true = random_sim3(rng)
    src = rng.normal(size=(40, 3))
    dst = true.apply(src)
    dst[:10] += rng.normal(scale=5.0, size=(10, 3))
    w = np.r_[np.zeros(10), np.ones(30)]
    est = umeyama(src, dst, w)
    assert est.s == pytest.approx(true.s, rel=1e-9) and rotation_error_deg(est.R, true.R) < 1e-6


def test_symmetric_scale_is_unbiased_with_noise_on_both_sides() -> None:
    """Umeyama's scale is biased low by σx² / (σx² + σn²) when the source is noisy; Horn's symmetric one is not."""
    rng = np.random.default_rng(8)
    true = random_sim3(rng)
    pts = rng.normal(size=(20000, 3))  # σx² = 3 (per point, summed over axes)
    src = pts + rng.normal(scale=0.4, size=pts.shape)  # σn² = 0.48
    dst = true.apply(pts + rng.normal(scale=0.4, size=pts.shape))
    plain = umeyama(src, dst)
    sym = umeyama(src, dst, symmetric_scale=True)
    assert plain.s / true.s == pytest.approx(3.0 / 3.48, rel=0.02)
    assert sym.s / true.s == pytest.approx(1.0, rel=0.01)
    assert rotation_error_deg(sym.R, true.R) < 0.5


def test_umeyama_rejects_bad_input() -> None:
    rng = np.random.default_rng(4)
    src = rng.normal(size=(5, 3))
    with pytest.raises(ValueError, match="at least 3"):
        umeyama(src[:2], src[:2])
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        umeyama(src, src[:4])
    with pytest.raises(ValueError, match="weights"):
        umeyama(src, src, -np.ones(5))
    with pytest.raises(ValueError, match="finite"):
        umeyama(np.full((5, 3), np.nan), src)
    line = np.outer(np.arange(5.0), [1.0, 2.0, 3.0])
    with pytest.raises(AlignmentError, match="degenerate"):
        umeyama(line, line * 2.0)


def test_ransac_umeyama_with_noise_and_30_percent_outliers() -> None:
    rng = np.random.default_rng(5)
    for trial in range(5):
        true = random_sim3(rng)
        n = 600
        src = rng.uniform(-2.0, 2.0, size=(n, 3))
        dst = true.apply(src) + rng.normal(scale=0.005, size=(n, 3))
        out = rng.random(n) < 0.3
        dst[out] = rng.uniform(-5.0, 5.0, size=(int(out.sum()), 3)) * true.s + true.t
        w = rng.uniform(0.5, 1.0, n)
        sim, inl, res = ransac_umeyama(src, dst, w, threshold_m=0.03 * true.s, iterations=500, rng=trial)
        assert abs(sim.s / true.s - 1.0) < 0.005
        assert rotation_error_deg(sim.R, true.R) < 0.3
        assert np.linalg.norm(sim.t - true.t) < 0.02 * max(1.0, true.s)
        # the outliers are recognised (a random outlier can land within the threshold by chance: allow 1 %)
        assert (inl == ~out).mean() > 0.99
        assert res.shape == (n,) and np.all(res[inl] <= 0.03 * true.s)
        # plain Umeyama on the same data is visibly wrong: the test does need the robust estimator
        naive = umeyama(src, dst, w)
        assert abs(naive.s / true.s - 1.0) > 0.05 or rotation_error_deg(naive.R, true.R) > 2.0


def test_ransac_umeyama_errors() -> None:
    rng = np.random.default_rng(6)
    src = rng.normal(size=(20, 3))
    dst = rng.normal(size=(20, 3)) * 100  # unrelated: no consensus
    with pytest.raises(AlignmentError, match="RANSAC"):
        ransac_umeyama(src, dst, threshold_m=1e-3, iterations=50, min_inliers=10, rng=0)
    with pytest.raises(ValueError, match="threshold"):
        ransac_umeyama(src, src, threshold_m=0.0)


def _trajectory(rng: np.random.Generator, n: int, straight: bool) -> np.ndarray:
    poses = np.tile(np.eye(4), (n, 1, 1))
    for i in range(n):
        poses[i, :3, :3] = Rotation.from_euler("xyz", rng.normal(scale=0.3, size=3)).as_matrix()
        poses[i, :3, 3] = [0.1 * i, 0.0, 0.0] if straight else [0.1 * i, np.sin(0.5 * i), 0.05 * i]
    return poses


@pytest.mark.parametrize("straight", [False, True])
def test_fit_trajectory_sim3(straight: bool) -> None:
    """Planar/curved trajectories use Umeyama on centres; straight lines get the rotation from orientations."""
    rng = np.random.default_rng(7)
    odo = _trajectory(rng, 12, straight)
    true = random_sim3(rng)  # odometry -> reconstruction
    rec = true.transform_pose(odo)
    rec[:, :3, 3] += rng.normal(scale=0.002 * true.s, size=(12, 3))
    odo_bad = odo.copy()
    odo_bad[3, :3, 3] += [1.0, -2.0, 0.5]  # one odometry glitch
    sim, inl, _ = fit_trajectory_sim3(rec, odo_bad, threshold_m=0.1, rng=0)
    inv = true.inverse()
    assert abs(sim.s / inv.s - 1.0) < 0.01
    assert rotation_error_deg(sim.R, inv.R) < 0.5
    assert not inl[3] and inl.sum() == 11
    assert ate(sim.transform_pose(rec)[inl, :3, 3], odo[inl, :3, 3]) < 0.01
    with pytest.raises(AlignmentError, match="baseline"):
        still = np.tile(odo[:1], (5, 1, 1))
        fit_trajectory_sim3(true.transform_pose(still), still)


def test_sample_frame_geometry_backprojects() -> None:
    K = np.array([[100.0, 0, 31.5], [0, 100.0, 23.5], [0, 0, 1]])
    depth = np.full((48, 64), 2.0, np.float32)
    depth[:10] = 0.0
    T = np.eye(4)
    T[:3, 3] = [1.0, 0.0, 0.0]
    g = sample_frame_geometry(("a", 0.0), depth, K, T, stride=4)
    v, u = g.pixels // 64, g.pixels % 64
    assert np.all(v >= 10)
    np.testing.assert_allclose(g.points[:, 2], 2.0)
    np.testing.assert_allclose(g.points[:, 0], (u - 31.5) / 100.0 * 2.0 + 1.0)
    with pytest.raises(ValueError):
        sample_frame_geometry(("a", 0.0), depth, K, T, confidence=np.ones((2, 2)))


# ------------------------------------------------------------------------------------------------ WindowAligner
@pytest.fixture(scope="module")
def holo_frames(hololens_seq) -> list[Frame]:
    return list(hololens_seq.frames(range(0, 44), with_labels=False))




def _window_inputs(frames: list[Frame], idx: list[int], sim: Sim3, rng: np.random.Generator,
                   noise: float = 0.01) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    gt = np.stack([frames[i].world_from_camera for i in idx])
    depth = np.stack([frames[i].depth for i in idx]).astype(np.float64)
    depth = np.where(depth > 0, depth * sim.s * (1.0 + noise * rng.standard_normal(depth.shape)), 0.0)
    Ks = np.stack([frames[i].intrinsics for i in idx])
    conf = (depth > 0).astype(np.float64)
    return sim.transform_pose(gt), depth, Ks, conf


def _run_aligner(frames: list[Frame], posed: bool, seed: int = 0, odometry: list[np.ndarray] | None = None
                 ) -> tuple[dict[str, np.ndarray], WindowAligner, list[dict[str, float]]]:
    """Windows of the ground truth through random Sim(3)s into a new aligner; odometry = GT poses or ``odometry``."""
    rng = np.random.default_rng(seed)
    aligner = WindowAligner(seed=seed)
    est: dict[str, np.ndarray] = {}
    residuals = []
    odo = odometry or [f.world_from_camera for f in frames]
    for idx in window_indices(len(frames)):
        fs = [dataclasses.replace(frames[i], world_from_camera=odo[i] if posed else None) for i in idx]
        poses, depth, Ks, conf = _window_inputs(frames, idx, random_sim3(rng), rng)
        out = aligner.align(fs, poses, depth, Ks, conf)
        residuals.append(out.residuals)
        record_first_placement(est, fs, out.world_from_camera, out.map_correction)  # moved with the map
    return est, aligner, residuals


def test_window_aligner_unposed_chain_matches_ground_truth(holo_frames: list[Frame]) -> None:
    est, aligner, residuals = _run_aligner(holo_frames, posed=False)
    assert not aligner.metric
    P = np.stack([est[f.frame_id][:3, 3] for f in holo_frames])
    G = np.stack([f.world_from_camera[:3, 3] for f in holo_frames])
    fit = umeyama(P, G)
    err = ate(fit.apply(P), G)
    assert err < 0.02, f"ATE after one global Sim(3) = {err:.4f} m"
    rot = max(rotation_error_deg(fit.R @ est[f.frame_id][:3, :3], f.world_from_camera[:3, :3]) for f in holo_frames)
    assert rot < 1.0
    assert all(r["overlap_inlier_ratio"] > 0.8 for r in residuals[1:])
    assert all(r["metric"] == 0.0 for r in residuals)


def test_window_aligner_with_odometry_is_metric(holo_frames: list[Frame]) -> None:
    est, aligner, residuals = _run_aligner(holo_frames, posed=True)
    assert aligner.metric
    P = np.stack([est[f.frame_id][:3, 3] for f in holo_frames])
    G = np.stack([f.world_from_camera[:3, 3] for f in holo_frames])
    err = ate(P, G)  # directly in the odometry frame: no fit
    assert err < 0.02, f"ATE in the odometry frame = {err:.4f} m"
    assert abs(umeyama(P, G).s - 1.0) < 0.01
    last = residuals[-1]
    assert last["metric"] == 1.0 and last["ate_m"] < 0.02 and last["odom_inlier_ratio"] > 0.9
    assert set(last) >= {"rms_m", "inlier_ratio", "scale", "odom_scale", "overlap_rms"}


def test_window_aligner_rejects_odometry_outliers(holo_frames: list[Frame]) -> None:
    odometry = [f.world_from_camera.copy() for f in holo_frames]
    glitch = {5, 17, 30}
    for i in glitch:
        odometry[i][:3, 3] += [0.8, -0.5, 1.2]  # odometry jumps
    est, _, residuals = _run_aligner(holo_frames, posed=True, seed=1, odometry=odometry)
    good = [i for i in range(len(holo_frames)) if i not in glitch]
    P = np.stack([est[holo_frames[i].frame_id][:3, 3] for i in good])
    G = np.stack([holo_frames[i].world_from_camera[:3, 3] for i in good])
    assert ate(P, G) < 0.02
    assert residuals[-1]["odom_inliers"] == residuals[-1]["odom_frames"] - len(glitch)


def test_window_aligner_disconnected_window(holo_frames: list[Frame]) -> None:
    rng = np.random.default_rng(3)
    # Unposed: a window sharing no frame with the map cannot be placed; state is unchanged.
    aligner = WindowAligner()
    unposed = [dataclasses.replace(f, world_from_camera=None) for f in holo_frames]
    aligner.align([unposed[i] for i in range(8)], *_window_inputs(holo_frames, list(range(8)), random_sim3(rng), rng))
    stored = aligner.num_stored_frames
    idx = list(range(20, 28))
    with pytest.raises(AlignmentError, match="shares no frame"):
        aligner.align([unposed[i] for i in idx], *_window_inputs(holo_frames, idx, random_sim3(rng), rng))
    assert aligner.num_stored_frames == stored and aligner.num_windows == 1
    # With odometry and an established metric fit, the window is placed through its own trajectory.
    aligner = WindowAligner()
    for w in ([0, 1, 2, 3, 4, 5, 6, 7], [6, 7, 8, 9, 10, 11, 12, 13]):
        aligner.align([holo_frames[i] for i in w], *_window_inputs(holo_frames, w, random_sim3(rng), rng))
    out = aligner.align([holo_frames[i] for i in idx], *_window_inputs(holo_frames, idx, random_sim3(rng), rng))
    assert out.residuals["odometry_fallback"] == 1.0 and out.metric
    G = np.stack([holo_frames[i].world_from_camera[:3, 3] for i in idx])
    assert ate(out.world_from_camera[:, :3, 3], G) < 0.02


def test_window_aligner_input_validation() -> None:
    aligner = WindowAligner()
    f = Frame(rgb=np.zeros((4, 4, 3), np.uint8), stamp=0.0, frame_id="a")
    with pytest.raises(ValueError, match="world_from_camera"):
        aligner.align([f], np.eye(4)[None, :3], np.ones((1, 4, 4)), np.eye(3)[None])
    with pytest.raises(ValueError, match="confidence"):
        aligner.align([f], np.eye(4)[None], np.ones((1, 4, 4)), np.eye(3)[None], np.ones((1, 2, 2)))
    with pytest.raises(ValueError):
        WindowAligner(AlignerConfig(min_inlier_ratio=2.0))
