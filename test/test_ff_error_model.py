"""Each behaviour of the feed-forward error model of :mod:`_ff_double` (the test double of a VGGT-class network).

The double returns the real ``hololens_office`` ground truth through a random Sim(3) per call, degraded by an
:class:`_ff_double.ErrorModel`; these tests check that every error it claims to make is made, with the claimed
size, so the unposed-mapping tests built on it test what they say.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from _ff_double import ErrorModel, GroundTruthBackbone
from scipy.spatial.transform import Rotation

from langgs_ros.reconstruction.alignment import AlignmentError, WindowAligner
from langgs_ros.reconstruction.feedforward import FeedForwardReconstructor, preprocess_images
from langgs_ros.types import Frame

WIDTH = 140


@pytest.fixture(scope="module")
def frames(hololens_seq) -> list[Frame]:
    return list(hololens_seq.frames(range(6), with_labels=False))


def call(double: GroundTruthBackbone, frames: list[Frame]) -> dict[str, np.ndarray]:
    images, _ = preprocess_images([f.rgb for f in frames], WIDTH)
    return {k: v.double().numpy() for k, v in double.predict(images).items()}


def poses(out: dict[str, np.ndarray]) -> np.ndarray:
    E = np.tile(np.eye(4), (out["extrinsic"].shape[0], 1, 1))
    E[:, :3, :] = out["extrinsic"]
    return np.linalg.inv(E)


def test_per_window_sim3_and_recognition(frames: list[Frame]) -> None:
    double = GroundTruthBackbone(frames, WIDTH, seed=0, errors=ErrorModel(depth_noise=0.0))
    a, b = call(double, frames[:4]), call(double, frames[:4])
    (ia, sa), (ib, sb) = double.calls
    assert list(ia) == list(ib) == [0, 1, 2, 3]  # frames recognised from their pixels
    assert abs(np.log(sa.s / sb.s)) > 1e-3  # a fresh Sim(3) per call
    np.testing.assert_allclose(poses(a), sa.transform_pose(double.poses[:4]), atol=1e-4)
    valid = double.depths[:4].numpy() > 0
    np.testing.assert_allclose(b["depth"][valid], sb.s * double.depths[:4].numpy()[valid], rtol=1e-5)


def test_depth_noise_grows_with_depth(frames: list[Frame]) -> None:
    em = ErrorModel(depth_noise=0.01, depth_noise_per_m=0.02)
    double = GroundTruthBackbone(frames, WIDTH, seed=1, errors=em)
    out = call(double, frames)
    s = double.calls[0].sim.s
    z = double.depths[:6].double().numpy()
    rel = out["depth"] / s / np.where(z > 0, z, 1.0) - 1.0
    near, far = (z > 0.8) & (z < 1.5), (z > 3.0) & (z < 5.0)
    assert near.sum() > 500 and far.sum() > 500
    std_near, std_far = float(rel[near].std()), float(rel[far].std())
    assert std_near == pytest.approx(em.depth_noise + em.depth_noise_per_m * float(z[near].mean()), rel=0.2)
    assert std_far == pytest.approx(em.depth_noise + em.depth_noise_per_m * float(z[far].mean()), rel=0.2)
    assert std_far > 2.0 * std_near


def test_per_window_affine_depth_bias(frames: list[Frame]) -> None:
    em = ErrorModel(depth_noise=0.0, depth_bias_scale=0.05, depth_bias_offset_m=0.05)
    double = GroundTruthBackbone(frames, WIDTH, seed=2, errors=em)
    biases = []
    for _ in range(3):
        out = call(double, frames[:3])
        rec = double.calls[-1]
        z = double.depths[:3].double().numpy()
        ok = z > 0
        A = np.c_[z[ok], np.ones(ok.sum())]
        (slope, offset), *_ = np.linalg.lstsq(A, out["depth"][ok] / rec.sim.s, rcond=None)
        a, b = rec.bias
        assert slope == pytest.approx(1.0 + a, abs=1e-4) and offset == pytest.approx(b, abs=1e-4)
        assert abs(a) <= 0.05 and abs(b) <= 0.05
        biases.append(rec.bias)
    assert len(set(biases)) == 3  # drawn per window


def test_focal_error_and_camera_info_rescale(frames: list[Frame]) -> None:
    """The double's focal error comes with the matching depth error; ``camera_info: replace`` undoes it."""
    em = ErrorModel(depth_noise=0.0, focal_error=0.05)
    double = GroundTruthBackbone(frames, WIDTH, seed=3, errors=em)
    out = call(double, frames[:3])
    rec = double.calls[-1]
    assert 0 < abs(rec.focal_error) <= 0.05
    np.testing.assert_allclose(out["intrinsic"][:, 0, 0] / double.Ks[:3, 0, 0], 1.0 + rec.focal_error, rtol=1e-5)
    z = double.depths[:3].double().numpy()
    ok = z > 0
    np.testing.assert_allclose(out["depth"][ok] / (rec.sim.s * z[ok]), 1.0 + rec.focal_error, rtol=1e-5)
    gt = torch.from_numpy(np.stack([f.depth for f in frames[:3]]))
    window = [dataclasses.replace(f, world_from_camera=None, depth=None) for f in frames[:3]]
    for mode in ("replace", "ignore"):
        double = GroundTruthBackbone(frames, WIDTH, seed=4, errors=dataclasses.replace(em, focal_error=0.05))
        ff = FeedForwardReconstructor(backbone=double, image_width=WIDTH, camera_info=mode, min_confidence=0.0)
        res = ff.reconstruct(window)
        e, s = double.calls[-1].focal_error, double.calls[-1].sim.s
        both = (gt > 0) & (res.depth > 0)
        ratio = float((res.depth[both] / gt[both]).median()) / (s * ff.last_alignment.depth_scale)
        assert abs(e) > 0.005
        assert ratio == pytest.approx(1.0 if mode == "replace" else 1.0 + e, rel=0.01), mode
        # The recovered focal is off by (1 + e) in both modes: the residual measures it either way.
        assert res.residuals["focal_rel_err"] == pytest.approx(abs(e) / (1 + e), rel=0.05), mode


def test_camera_rotation_and_translation_noise(frames: list[Frame]) -> None:
    em = ErrorModel(depth_noise=0.0, rotation_noise_deg=0.5, translation_noise_m=0.02)
    double = GroundTruthBackbone(frames, WIDTH, seed=5, errors=em)
    rot, trans = [], []
    for _ in range(5):
        out = call(double, frames)
        sim = double.calls[-1].sim
        exact = sim.transform_pose(double.poses[:6])
        got = poses(out)
        for i in range(6):
            rot.append(np.degrees(Rotation.from_matrix(got[i, :3, :3] @ exact[i, :3, :3].T).magnitude()))
            trans.append(np.linalg.norm(got[i, :3, 3] - exact[i, :3, 3]) / sim.s)
    # |N(0, σ I3)| has mean σ·sqrt(8/π) ≈ 1.6 σ
    assert np.mean(rot) == pytest.approx(1.6 * 0.5, rel=0.3)
    assert np.mean(trans) == pytest.approx(1.6 * 0.02, rel=0.3)


def test_confidence_drops_at_depth_edges(frames: list[Frame]) -> None:
    em = ErrorModel(depth_noise=0.0, edge_confidence=True)
    double = GroundTruthBackbone(frames, WIDTH, seed=6, errors=em)
    out = call(double, frames[:3])
    z = torch.from_numpy(double.depths[:3].numpy())
    big = torch.where(z > 0, z, torch.full_like(z, float("inf")))
    dmax = torch.nn.functional.max_pool2d(z[:, None], 3, 1, 1)[:, 0]
    dmin = -torch.nn.functional.max_pool2d(-big[:, None], 3, 1, 1)[:, 0]
    edge = ((dmax > dmin * (1 + em.edge_jump)) & (z > 0)).numpy()
    flat = (~edge) & (z.numpy() > 0)
    assert edge.sum() > 100
    c = out["depth_conf"] - 1.0
    assert float(np.median(c[edge])) == pytest.approx(em.edge_confidence_factor * float(np.median(c[flat])),
                                                      rel=1e-3)
    # the reconstructor's min_confidence removes them (normalised confidence 0.05 < 0.2)
    ff = FeedForwardReconstructor(backbone=GroundTruthBackbone(frames, WIDTH, seed=6, errors=em), image_width=WIDTH)
    res = ff.reconstruct([dataclasses.replace(f, world_from_camera=None, depth=None) for f in frames[:3]])
    off = ErrorModel(depth_noise=0.0)
    ff_off = FeedForwardReconstructor(backbone=GroundTruthBackbone(frames, WIDTH, seed=6, errors=off),
                                      image_width=WIDTH)
    res_off = ff_off.reconstruct([dataclasses.replace(f, world_from_camera=None, depth=None) for f in frames[:3]])
    assert float((res.depth > 0).float().mean()) < float((res_off.depth > 0).float().mean())


def test_failed_calls_are_rejected_by_the_aligner(frames: list[Frame]) -> None:
    double = GroundTruthBackbone(frames, WIDTH, seed=7, errors=ErrorModel(fail_calls={1}))
    ff = FeedForwardReconstructor(backbone=double, image_width=WIDTH, anchors=0, aligner=WindowAligner(seed=7))
    unposed = [dataclasses.replace(f, world_from_camera=None, depth=None) for f in frames]
    ff.reconstruct(unposed[:4])
    with pytest.raises(AlignmentError):
        ff.reconstruct(unposed[2:6])  # shares frames 2 and 3 with the map, but the prediction failed
    assert double.calls[1].failed and ff.aligner.num_windows == 1
    ff.reconstruct(unposed[2:6])  # the same window again, now predicted normally
    assert ff.aligner.num_windows == 2 and not double.calls[2].failed
    rate = GroundTruthBackbone(frames, WIDTH, seed=8, errors=ErrorModel(fail_rate=0.3))
    for _ in range(40):
        call(rate, frames[:2])
    assert 0.1 < np.mean([c.failed for c in rate.calls]) < 0.5
