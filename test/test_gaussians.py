"""Tests of pixel-aligned Gaussians (langgs_ros.gaussians)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _core_fixtures import hololens_meta, load_hololens

from langgs_ros.gaussians import GaussianInitConfig, gaussians_from_depth, gaussians_from_window
from langgs_ros.geometry import quat_to_rotmat
from langgs_ros.types import Frame, FrameSegmentation, WindowReconstruction

K = np.array([[300.0, 0.0, 79.5], [0.0, 310.0, 59.5], [0.0, 0.0, 1.0]])
H, W = 120, 160


def _pose(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    T = np.eye(4)
    T[:3, :3] = quat_to_rotmat(torch.from_numpy(q)).numpy()
    T[:3, 3] = rng.normal(size=3)
    return T


def _rays() -> np.ndarray:
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    return np.stack(((u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)), -1)


def _plane_depth(n_cam: np.ndarray, d0: float) -> np.ndarray:
    """z-depth of the plane n·X = d0 (camera frame) for every pixel."""
    return (d0 / (_rays() @ n_cam)).astype(np.float32)


def _rgb() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)


def test_unprojection_is_exact() -> None:
    rng = np.random.default_rng(2)
    depth = rng.uniform(0.5, 5.0, (H, W)).astype(np.float32)
    T = _pose(3)
    g = gaussians_from_depth(depth, _rgb(), K, T)
    assert len(g) == H * W
    ref = (_rays() * depth[..., None].astype(np.float64)).reshape(-1, 3) @ T[:3, :3].T + T[:3, 3]
    np.testing.assert_allclose(g.means.double().numpy(), ref, atol=2e-5)
    # Re-projection lands on the integer pixel centres.
    cam = (g.means.double().numpy() - T[:3, 3]) @ T[:3, :3]
    uv = cam[:, :2] / cam[:, 2:] * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]]
    v, u = np.mgrid[0:H, 0:W]
    np.testing.assert_allclose(uv, np.stack((u.ravel(), v.ravel()), 1), atol=1e-3)
    # Colours and default attributes.
    np.testing.assert_allclose(g.colors.numpy(), _rgb().reshape(-1, 3) / 255.0, atol=1e-6)
    assert torch.all(g.instance_ids == -1) and g.instance_ids.dtype == torch.int32
    assert torch.allclose(g.opacities, torch.full((H * W,), 0.9))
    assert torch.allclose(g.quats.norm(dim=1), torch.ones(H * W), atol=1e-5)


def test_surfel_normals_and_footprint_on_tilted_plane() -> None:
    n_cam = np.array([0.4, -0.3, -1.0])
    n_cam /= np.linalg.norm(n_cam)  # faces the camera (n · ray < 0)
    depth = _plane_depth(n_cam, -2.0)
    assert np.all(depth > 0)
    T = _pose(4)
    cfg = GaussianInitConfig(max_depth=20.0)
    g = gaussians_from_depth(torch.from_numpy(depth), torch.from_numpy(_rgb()), torch.from_numpy(K),
                             torch.from_numpy(T), config=cfg)
    assert len(g) == H * W
    R = quat_to_rotmat(g.quats.double()).numpy()
    assert np.allclose(np.linalg.det(R), 1.0, atol=1e-5)
    n_world = T[:3, :3] @ n_cam
    normals = R[:, :, 2]
    ang = np.degrees(np.arccos(np.clip(normals @ n_world, -1, 1)))
    assert ang.max() < 0.5, f"normal error up to {ang.max():.3f} deg"
    # Oriented towards the camera centre.
    to_cam = T[:3, 3] - g.means.double().numpy()
    assert np.all(np.sum(normals * to_cam, axis=1) > 0)
    # Footprint: s_y = factor * d / f, s_x = s_y / |cos|, thickness = ratio * s_y.
    f = 0.5 * (K[0, 0] + K[1, 1])
    s = g.scales.double().numpy()
    foot = cfg.scale_factor * depth.reshape(-1) / f
    rays = _rays().reshape(-1, 3)
    cos = np.abs(rays @ n_cam) / np.linalg.norm(rays, axis=1)
    np.testing.assert_allclose(s[:, 1], foot, rtol=1e-4)
    np.testing.assert_allclose(s[:, 0], foot / np.maximum(cos, cfg.min_cos), rtol=1e-3)
    np.testing.assert_allclose(s[:, 2], cfg.thickness_ratio * foot, rtol=1e-4)
    # The stretched axis lies in the plane spanned by the ray and the normal.
    ray_w = (rays / np.linalg.norm(rays, axis=1, keepdims=True)) @ T[:3, :3].T
    assert np.abs(np.sum(np.cross(ray_w, normals) * R[:, :, 0], axis=1)).max() < 1e-3


def test_normals_respect_depth_discontinuities() -> None:
    depth = np.full((H, W), 3.0, np.float32)
    depth[40:80, 60:100] = 1.0  # fronto-parallel box in front of a wall
    g = gaussians_from_depth(depth, _rgb(), K, np.eye(4))
    normals = quat_to_rotmat(g.quats.double()).numpy()[:, :, 2]
    # Every pixel, including both sides of the step, sees a fronto-parallel surface: normal = -z.
    assert np.min(normals @ np.array([0.0, 0.0, -1.0])) > math.cos(math.radians(0.5))


def test_invalid_depth_and_confidence_are_dropped() -> None:
    depth = np.full((H, W), 2.0, np.float32)
    bad = [(0, 0, 0.0), (1, 1, np.nan), (2, 2, np.inf), (3, 3, 0.05), (4, 4, 25.0), (5, 5, -1.0)]
    for v, u, d in bad:
        depth[v, u] = d
    conf = np.ones((H, W), np.float32)
    conf[10, 10] = 0.1
    conf[11, 11] = 0.0
    conf[12, 12] = 0.5
    cfg = GaussianInitConfig(min_confidence=0.2)
    g = gaussians_from_depth(depth, _rgb(), K, np.eye(4), confidence=conf, config=cfg)
    assert len(g) == H * W - len(bad) - 2
    assert torch.isfinite(g.means).all() and torch.isfinite(g.scales).all() and torch.isfinite(g.quats).all()
    uv = (g.means[:, :2] / g.means[:, 2:]).double().numpy() * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]]
    kept = {(round(y), round(x)) for x, y in uv}
    for v, u, _ in bad:
        assert (v, u) not in kept
    assert (10, 10) not in kept and (11, 11) not in kept
    # Confidence rule: 0.9 * conf.
    op = dict(zip([(round(y), round(x)) for x, y in uv], g.opacities.tolist()))
    assert op[(12, 12)] == pytest.approx(0.45)
    assert op[(20, 20)] == pytest.approx(0.9)
    g2 = gaussians_from_depth(depth, _rgb(), K, np.eye(4), confidence=conf,
                              config=GaussianInitConfig(opacity_rule="constant", base_opacity=0.7))
    assert torch.allclose(g2.opacities, torch.full((len(g2),), 0.7))


def test_isolated_pixel_falls_back_to_viewing_ray() -> None:
    depth = np.zeros((H, W), np.float32)
    depth[30, 120] = 2.0
    g = gaussians_from_depth(depth, _rgb(), K, np.eye(4))
    assert len(g) == 1
    n = quat_to_rotmat(g.quats.double())[0, :, 2].numpy()
    ray = _rays()[30, 120]
    np.testing.assert_allclose(n, -ray / np.linalg.norm(ray), atol=1e-5)
    empty = gaussians_from_depth(np.zeros((H, W), np.float32), _rgb(), K, np.eye(4))
    assert len(empty) == 0 and empty.means.shape == (0, 3)


def test_stride_float_rgb_and_instance_ids() -> None:
    depth = np.full((H, W), 2.0, np.float32)
    rgbf = torch.rand(H, W, 3)
    ids = np.full((H, W), -1, np.int32)
    ids[:, W // 2:] = 3
    g = gaussians_from_depth(depth, rgbf, K, np.eye(4), instance_ids=ids, config=GaussianInitConfig(stride=2))
    assert len(g) == (H // 2) * (W // 2)
    np.testing.assert_allclose(g.colors.numpy(), rgbf[::2, ::2].reshape(-1, 3).numpy(), atol=1e-6)
    assert set(g.instance_ids.tolist()) == {-1, 3}
    f = 0.5 * (K[0, 0] + K[1, 1])
    assert torch.allclose(g.scales[:, 1], torch.full((len(g),), 0.5 * 2 * 2.0 / f))


def test_pixel_blocks_average_their_foreground_pixels() -> None:
    """block = 2: one surfel per 2x2 block, averaged over the block's foreground (nearest-depth) pixels, the
    majority instance id, a footprint of sqrt(k) pixels; on a plane, the means stay on the plane."""
    n_cam = np.array([0.3, -0.2, -1.0])
    n_cam /= np.linalg.norm(n_cam)
    depth = _plane_depth(n_cam, -2.0)
    depth[10:20, 10:20] = 0.8  # a box in front: its edge at row/col 10 and 20 falls on block boundaries
    depth[31, 41] = 0.0  # one invalid pixel: its block keeps 3
    rgb = _rgb()
    ids = np.full((H, W), -1, np.int32)
    ids[:, 61:] = 5  # column 61 splits block column 30 (60, 61): one pixel of 5 per row, majority -1 needs a tie
    ids[:, 62:] = 5
    T = _pose(6)
    g = gaussians_from_depth(depth, rgb, K, T, instance_ids=ids, config=GaussianInitConfig(block=2, max_depth=20))
    assert len(g) == (H // 2) * (W // 2)
    f = 0.5 * (K[0, 0] + K[1, 1])
    # Block (15, 20) = pixels (30..31, 40..41): three valid pixels, their mean depth and colour.
    b = 15 * (W // 2) + 20
    px = [(30, 40), (30, 41), (31, 40)]
    z = np.mean([depth[p] for p in px])
    cam = (g.means[b].double().numpy() - T[:3, 3]) @ T[:3, :3]
    np.testing.assert_allclose(cam[2], z, rtol=1e-5)
    uv = cam[:2] / cam[2] * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]]
    np.testing.assert_allclose(uv, [np.mean([p[1] for p in px]), np.mean([p[0] for p in px])], atol=2e-2)
    np.testing.assert_allclose(g.colors[b].numpy(), np.mean([rgb[p] for p in px], 0) / 255.0, atol=1e-5)
    assert float(g.scales[b, 1]) == pytest.approx(0.5 * math.sqrt(3) * z / f, rel=1e-3)
    # A full block: footprint of 2 pixels; every mean on the plane n·X = -2 (camera frame).
    full = 5 * (W // 2) + 50
    z_full = depth[10:12, 100:102].mean()
    assert float(g.scales[full, 1]) == pytest.approx(0.5 * 2 * z_full / f, rel=1e-3)
    cam_all = (g.means.double().numpy() - T[:3, 3]) @ T[:3, :3]
    on_box = (cam_all[:, 2] < 0.9)
    assert on_box.sum() == 25  # the 10x10 box is 5x5 blocks
    np.testing.assert_allclose(cam_all[~on_box] @ n_cam, -2.0, atol=1e-4)
    # Instance ids: the block column 31 (pixels 62, 63) is all 5, column 30 (60, 61) is a tie resolved to the
    # first pixel's id; never a mix of the two.
    cols = np.arange(len(g)) % (W // 2)
    assert set(g.instance_ids[torch.from_numpy(cols >= 31)].tolist()) == {5}
    assert set(g.instance_ids[torch.from_numpy(cols < 30)].tolist()) == {-1}


def test_pixel_blocks_keep_the_nearest_surface_at_a_discontinuity() -> None:
    depth = np.full((H, W), 3.0, np.float32)
    depth[:, 81:] = 1.0  # the near surface starts mid-block (block column 40 = pixels 80, 81)
    g = gaussians_from_depth(depth, _rgb(), K, np.eye(4), config=GaussianInitConfig(block=2))
    z = g.means[:, 2].reshape(H // 2, W // 2)
    assert torch.all(z[:, 40] == 1.0)  # foreground pixels (column 81) only, not an average with the 3 m wall
    assert torch.all(z[:, :40] == 3.0) and torch.all(z[:, 41:] == 1.0)
    f = 0.5 * (K[0, 0] + K[1, 1])
    torch.testing.assert_close(g.scales[:, 1].reshape(H // 2, W // 2)[:, 40],
                               torch.full((H // 2,), 0.5 * math.sqrt(2) * 1.0 / f))  # k = 2 foreground pixels


def test_a_pixel_block_surfel_is_the_merge_of_its_pixel_surfels() -> None:
    """The image-space block average is the first level of the fusion merge: its in-plane scales match the
    moment-matching merge (spread gain 3) of the block's pixel surfels."""
    from langgs_ros.sparsify import merge_by_inverse, merge_weights

    depth = np.full((H, W), 2.0, np.float32)
    pix = gaussians_from_depth(depth, _rgb(), K, np.eye(4))
    blk = gaussians_from_depth(depth, _rgb(), K, np.eye(4), config=GaussianInitConfig(block=2))
    v, u = np.mgrid[0:H, 0:W]
    inverse = torch.from_numpy(((v // 2) * (W // 2) + u // 2).reshape(-1))
    merged = merge_by_inverse(pix, merge_weights(pix), inverse, len(blk), min_scale=1e-6, spread_gain=3.0)
    # The merge weights pixels by footprint area (larger off-axis); the block average does not: sub-mm apart.
    torch.testing.assert_close(merged.means, blk.means, atol=5e-4, rtol=0)
    torch.testing.assert_close(merged.colors, blk.colors, atol=2e-3, rtol=0)
    in_plane = torch.sort(merged.scales, dim=1).values[:, 1:]
    ref = torch.sort(blk.scales, dim=1).values[:, 1:]
    torch.testing.assert_close(in_plane, ref, rtol=0.03, atol=0)  # fx != fy: 3 % anisotropy


def test_bad_inputs_raise() -> None:
    depth = np.ones((H, W), np.float32)
    with pytest.raises(ValueError, match="rgb"):
        gaussians_from_depth(depth, np.zeros((H, W + 1, 3), np.uint8), K, np.eye(4))
    with pytest.raises(ValueError, match="depth"):
        gaussians_from_depth(np.ones((2, H, W), np.float32), _rgb(), K, np.eye(4))
    with pytest.raises(ValueError, match="intrinsics"):
        gaussians_from_depth(depth, _rgb(), np.eye(4), np.eye(4))
    with pytest.raises(ValueError, match="finite"):
        gaussians_from_depth(depth, _rgb(), K, np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="instance_ids"):
        gaussians_from_depth(depth, _rgb(), K, np.eye(4), instance_ids=np.zeros((H, 2), np.int32))
    with pytest.raises(ValueError):
        gaussians_from_depth(depth, _rgb(), K, np.eye(4), config=GaussianInitConfig(min_depth=5, max_depth=1))


def test_gaussians_from_window_resizes_images_and_labels() -> None:
    frames = [Frame(rgb=_rgb(), stamp=float(i)) for i in range(2)]
    h, w = H // 2, W // 2
    depth = torch.full((2, h, w), 2.0)
    depth[1, :5] = 0.0
    Kh = torch.from_numpy(K).float().clone()
    Kh[:2] *= 0.5
    Kh[:2, 2] = torch.tensor([(K[0, 2] + 0.5) / 2 - 0.5, (K[1, 2] + 0.5) / 2 - 0.5])
    rec = WindowReconstruction(frames=frames, depth=depth, confidence=torch.ones(2, h, w),
                               intrinsics=Kh[None].repeat(2, 1, 1),
                               world_from_camera=torch.eye(4)[None].repeat(2, 1, 1))
    ids = np.full((H, W), -1, np.int32)
    ids[: H // 2] = 0
    segs = [FrameSegmentation(instance_ids=ids, embeddings=torch.eye(1), names=["a"]) for _ in range(2)]
    out = gaussians_from_window(rec, segs)
    assert [len(g) for g in out] == [h * w, h * w - 5 * w]
    assert set(out[0].instance_ids.tolist()) == {-1, 0}
    assert (out[0].instance_ids == 0).sum() == h * w // 2
    assert out[0].colors.min() >= 0 and out[0].colors.max() <= 1
    with pytest.raises(ValueError):
        gaussians_from_window(rec, segs[:1])
    assert all((g.instance_ids == -1).all() for g in gaussians_from_window(rec, None))


def test_real_floor_normals_point_up(hololens_dir) -> None:
    meta = hololens_meta(hololens_dir)
    up = np.asarray(meta["up"])
    offset = meta["floor_plane"]["offset"]
    fr = load_hololens([60], hololens_dir)[0]  # a frame looking down at a large floor area
    g = gaussians_from_depth(fr.depth, fr.rgb, fr.K, fr.pose)
    p = g.means.double().numpy()
    floor = np.abs(p @ up + offset) < 0.02
    assert floor.sum() > 20000
    n = quat_to_rotmat(g.quats.double()).numpy()[floor][:, :, 2]
    ang = np.degrees(np.arccos(np.clip(n @ up, -1, 1)))
    # Real depth (1 mm quantised, 2x-duplicated pixels) gives noisy per-pixel normals; measured: median 4.2°,
    # 90th percentile 13°. Holding the median and 80 % within 15° catches orientation/sign/axis errors.
    assert np.median(ang) < 8.0, np.median(ang)
    assert np.mean(ang < 15.0) > 0.8, np.mean(ang < 15.0)


def test_transform_gaussians_moves_means_and_covariances() -> None:
    """Σ' = s² R Σ Rᵀ, μ' = s R μ + t, weights × s² (areas); a non-similarity is refused."""
    from scipy.spatial.transform import Rotation

    from langgs_ros.gaussians import transform_gaussians
    from langgs_ros.geometry import covariance_from_scales_quats
    from langgs_ros.types import Gaussians

    gen = torch.Generator().manual_seed(0)
    n = 50
    q = torch.randn(n, 4, generator=gen)
    g = Gaussians(torch.randn(n, 3, generator=gen), q / q.norm(dim=1, keepdim=True),
                  torch.rand(n, 3, generator=gen) * 0.05 + 0.01, torch.rand(n, generator=gen),
                  torch.rand(n, 3, generator=gen), torch.arange(n, dtype=torch.int32), torch.rand(n, generator=gen))
    R = Rotation.from_rotvec([0.3, -0.2, 1.1]).as_matrix()
    s, t = 1.7, np.array([0.5, -1.0, 2.0])
    M = np.eye(4)
    M[:3, :3], M[:3, 3] = s * R, t
    out = transform_gaussians(g, M)
    Rt = torch.as_tensor(R, dtype=torch.float32)
    np.testing.assert_allclose(out.means.numpy(), (s * g.means @ Rt.T + torch.as_tensor(t).float()).numpy(),
                               atol=1e-5)
    cov = covariance_from_scales_quats(g.scales, g.quats)
    expect = s * s * Rt[None] @ cov @ Rt.T[None]
    np.testing.assert_allclose(covariance_from_scales_quats(out.scales, out.quats).numpy(), expect.numpy(),
                               atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(out.weights.numpy(), (g.weights * s * s).numpy(), rtol=1e-6)
    assert torch.equal(out.instance_ids, g.instance_ids) and torch.equal(out.opacities, g.opacities)
    shear = np.eye(4)
    shear[0, 1] = 0.2
    with pytest.raises(ValueError):
        transform_gaussians(g, shear)
