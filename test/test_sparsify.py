"""Tests of the FLEG-style hierarchical sparsification (langgs_ros.sparsify)."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from langgs_ros.geometry import covariance_from_scales_quats, quat_to_rotmat
from langgs_ros.sparsify import (
    SparsifyConfig,
    merge_by_inverse,
    merge_weights,
    occupancy_instance_part,
    occupancy_keys,
    occupancy_voxel_part,
    sparsify,
    sparsify_with_keys,
    voxel_keys,
    voxel_levels,
)
from langgs_ros.types import Gaussians


def _random_gaussians(n: int, seed: int = 0, spread: float = 0.1, n_inst: int = 1) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 4, generator=g)
    q = q / q.norm(dim=1, keepdim=True)
    return Gaussians(
        means=torch.rand(n, 3, generator=g) * spread,
        quats=q,
        scales=torch.rand(n, 3, generator=g) * 0.01 + 1e-3,
        opacities=torch.rand(n, generator=g) * 0.9 + 0.1,
        colors=torch.rand(n, 3, generator=g),
        instance_ids=torch.randint(-1, n_inst, (n,), generator=g, dtype=torch.int32) if n_inst > 1
        else torch.full((n,), -1, dtype=torch.int32),
    )


def _brute_force(g: Gaussians, w: np.ndarray, groups: dict, gain: float = 1.0, evidence: float = 1.0) -> dict:
    """float64 numpy moment matching per group (spread term x gain, opacity 1 - (1 - mean)^evidence for groups
    of two or more): key -> (W, mu, cov, color, opacity)."""
    means = g.means.double().numpy()
    cov_i = covariance_from_scales_quats(g.scales.double(), g.quats.double()).numpy()
    out = {}
    for key, idx in groups.items():
        idx = np.asarray(idx)
        ww = w[idx]
        W = ww.sum()
        mu = (ww[:, None] * means[idx]).sum(0) / W
        d = means[idx] - mu
        cov = (ww[:, None, None] * (cov_i[idx] + gain * d[:, :, None] * d[:, None, :])).sum(0) / W
        col = (ww[:, None] * g.colors.double().numpy()[idx]).sum(0) / W
        op = (ww * g.opacities.double().numpy()[idx]).sum() / W
        if len(idx) > 1:
            op = 1.0 - (1.0 - op) ** evidence
        out[key] = (W, mu, cov, col, op)
    return out


@pytest.mark.parametrize(("gain", "evidence"), [(1.0, 1.0), (4.0, 2.0)])
def test_merge_by_inverse_matches_brute_force_moment_matching(gain: float, evidence: float) -> None:
    g = _random_gaussians(400, seed=1)
    inv = torch.randint(0, 60, (400,), generator=torch.Generator().manual_seed(2))
    inv[:60] = torch.arange(60)  # every group used
    inv[60] = 59  # and at least one singleton possible elsewhere
    w = merge_weights(g)
    merged = merge_by_inverse(g, w, inv, 60, min_scale=1e-6, spread_gain=gain, opacity_evidence=evidence)
    groups = defaultdict(list)
    for i, k in enumerate(inv.tolist()):
        groups[k].append(i)
    ref = _brute_force(g, w.double().numpy(), groups, gain, evidence)
    cov = covariance_from_scales_quats(merged.scales.double(), merged.quats.double()).numpy()
    for k, (W, mu, C, col, op) in ref.items():
        assert merged.weights[k].item() == pytest.approx(W, rel=1e-5)
        np.testing.assert_allclose(merged.means[k].numpy(), mu, atol=1e-6)
        np.testing.assert_allclose(cov[k], C, atol=2e-7, rtol=1e-3)
        np.testing.assert_allclose(merged.colors[k].numpy(), col, atol=1e-5)
        assert merged.opacities[k].item() == pytest.approx(op, abs=1e-5)
    R = quat_to_rotmat(merged.quats.double())
    assert torch.allclose(torch.linalg.det(R), torch.ones(60, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(merged.quats.norm(dim=1), torch.ones(60), atol=1e-5)


def test_merge_weights_are_opacity_times_area() -> None:
    g = _random_gaussians(10)
    s = torch.sort(g.scales, dim=1).values
    assert torch.allclose(merge_weights(g), g.opacities * math.pi * s[:, 1] * s[:, 2])
    g.weights = torch.full((10,), 3.0)
    assert torch.allclose(merge_weights(g), torch.full((10,), 3.0))


def test_voxel_levels_follow_distance_law() -> None:
    cfg = SparsifyConfig(base_voxel_size=0.02, growth_start_distance=1.0, max_level=3)
    d = torch.tensor([0.0, 0.5, 1.0, 1.99, 2.0, 3.9, 4.0, 8.5, 100.0, float("nan"), float("inf")])
    assert voxel_levels(d, cfg).tolist() == [0, 0, 0, 0, 1, 1, 2, 3, 3, 0, 0]
    assert cfg.voxel_size(2) == pytest.approx(0.08)
    # Voxel edge ~ proportional to distance: edge / distance stays within a factor 2 of base / d0.
    dd = torch.linspace(1.0, 8.0, 50)
    ratio = torch.tensor([cfg.voxel_size(int(lv)) for lv in voxel_levels(dd, cfg)]) / dd
    assert torch.all(ratio <= 0.02) and torch.all(ratio > 0.01 - 1e-9)


def test_keys_separate_levels_voxels_and_instances() -> None:
    cfg = SparsifyConfig()
    # Voxels are centred on multiples of the edge: level 0 voxel 0 spans [-0.01, 0.01).
    p = torch.tensor([[-0.009, -0.009, -0.009], [0.009, 0.009, 0.009], [0.011, 0.0, 0.0], [-0.011, 0.0, 0.0]])
    lv = torch.zeros(4, dtype=torch.int8)
    ids = torch.full((4,), -1, dtype=torch.int32)
    k = voxel_keys(p, lv, ids, cfg)
    assert k[0] == k[1] and k[0] != k[2] and k[0] != k[3]
    assert voxel_keys(p, lv + 1, ids, cfg)[0] != k[0]
    assert voxel_keys(p, lv, ids + 1, cfg)[0] != k[0]
    # Level 1 voxel 0 spans [-0.02, 0.02) and contains points of three level-0 voxels.
    k1 = voxel_keys(p, lv + 1, ids, cfg)
    assert k1[0] == k1[2] == k1[3]
    # Occupancy keys: voxel-major with the instance in the low bits.
    ok = occupancy_keys(p[:2], torch.tensor([5, 7]), 0.05)
    assert occupancy_voxel_part(ok[0]) == occupancy_voxel_part(ok[1])
    assert occupancy_instance_part(ok).tolist() == [5, 7]


def test_sparsify_groups_like_brute_force_and_never_merges_instances() -> None:
    cfg = SparsifyConfig(base_voxel_size=0.05, growth_start_distance=1.0, max_level=2)
    g = _random_gaussians(3000, seed=3, spread=0.4, n_inst=3)
    dist = torch.rand(3000, generator=torch.Generator().manual_seed(4)) * 5.0
    res = sparsify_with_keys(g, voxel_levels(dist, cfg), cfg)
    out = res.gaussians
    # Brute-force grouping by (level, voxel, instance).
    lv = voxel_levels(dist, cfg).numpy()
    size = cfg.base_voxel_size * 2.0 ** lv
    ijk = np.floor(g.means.double().numpy() / size[:, None] + 0.5).astype(np.int64)
    groups = defaultdict(list)
    for i in range(3000):
        groups[(int(lv[i]), *ijk[i].tolist(), int(g.instance_ids[i]))].append(i)
    assert len(out) == len(groups)
    # Every merged Gaussian's members share its instance (no cross-instance merge).
    inv = res.inverse
    assert torch.all(out.instance_ids[inv] == g.instance_ids)
    ref = _brute_force(g, merge_weights(g).double().numpy(), groups)
    ref_by_first = {min(idx): ref[key] for key, idx in groups.items()}
    for first, (W, mu, _, _, _) in ref_by_first.items():
        k = int(inv[first])
        np.testing.assert_allclose(out.means[k].numpy(), mu, atol=1e-6)
        assert out.weights[k].item() == pytest.approx(W, rel=1e-5)
    assert res.levels.tolist() == [int(lv[idx[0]]) for idx in
                                   sorted(groups.values(), key=lambda ix: int(res.keys[inv[ix[0]]]))]
    # Mass and first moment are conserved.
    w = merge_weights(g)
    assert out.weights.sum().item() == pytest.approx(w.sum().item(), rel=1e-5)
    np.testing.assert_allclose((out.weights[:, None] * out.means).sum(0).numpy(),
                               (w[:, None] * g.means).sum(0).numpy(), rtol=1e-4)
    assert torch.all(res.keys[1:] > res.keys[:-1])  # sorted unique


def test_two_instances_in_one_voxel_stay_apart() -> None:
    g = _random_gaussians(200, seed=5, spread=0.01)
    g.instance_ids = torch.tensor([0, 1] * 100, dtype=torch.int32)
    out = sparsify(g, torch.full((200,), 0.5), SparsifyConfig(base_voxel_size=0.1))
    assert len(out) == 2 and sorted(out.instance_ids.tolist()) == [0, 1]


def test_dense_plane_is_reduced_and_stays_flat() -> None:
    # 200 x 200 pixel-like surfels on the plane z = 1 (1 mm spacing, 0.5 mm footprint, normal +z).
    n = 200
    ax = torch.arange(n) * 1e-3 - 0.0095  # voxel edges at -0.01 + k 0.02 fall between samples
    xy = torch.stack(torch.meshgrid(ax, ax, indexing="ij"), -1).reshape(-1, 2)
    N = n * n
    g = Gaussians(torch.cat((xy, torch.ones(N, 1)), 1), torch.tensor([[1.0, 0, 0, 0]]).repeat(N, 1),
                  torch.tensor([[5e-4, 5e-4, 5e-5]]).repeat(N, 1), torch.full((N,), 0.9), torch.rand(N, 3),
                  torch.full((N,), -1, dtype=torch.int32))
    out = sparsify(g, torch.full((N,), 0.5), SparsifyConfig(base_voxel_size=0.02))
    assert len(out) == 100  # 0.2 m / 0.02 m = 10 x 10 voxels
    R = quat_to_rotmat(out.quats)
    thin = out.scales.argmin(dim=1)
    normals = torch.gather(R, 2, thin[:, None, None].expand(-1, 3, 1)).squeeze(2)
    assert torch.all(normals[:, 2].abs() > 0.999)
    # In-plane sigma of a uniformly filled 2 cm voxel: its second moment 2 cm / sqrt(12) times sqrt(spread_gain).
    in_plane = torch.sort(out.scales, dim=1).values[:, 1:]
    gain = SparsifyConfig().spread_gain
    assert torch.allclose(in_plane, torch.full_like(in_plane, 0.02 * math.sqrt(gain / 12)), rtol=0.05)
    assert torch.allclose(out.opacities, torch.full((100,), 1 - 0.1 ** SparsifyConfig().opacity_evidence))
    # Plain moment matching (gain 1, mean opacity) is the second moment itself.
    plain = sparsify(g, torch.full((N,), 0.5), SparsifyConfig(base_voxel_size=0.02, spread_gain=1.0,
                                                                 opacity_evidence=1.0))
    in_plane = torch.sort(plain.scales, dim=1).values[:, 1:]
    assert torch.allclose(in_plane, torch.full_like(in_plane, 0.02 / math.sqrt(12)), rtol=0.05)
    assert torch.allclose(plain.opacities, torch.full((100,), 0.9))


def test_edge_cases() -> None:
    cfg = SparsifyConfig()
    empty = sparsify(Gaussians.empty(), torch.zeros(0), cfg)
    assert len(empty) == 0
    g = _random_gaussians(5)
    with pytest.raises(ValueError):
        sparsify(g, torch.zeros(4), cfg)
    with pytest.raises(ValueError):
        sparsify_with_keys(g, torch.full((5,), 9, dtype=torch.int8), cfg)
    with pytest.raises(ValueError):
        SparsifyConfig(base_voxel_size=0).validate()
    # Identical points: the merged covariance is the members' own (no spread), scales bounded below.
    same = Gaussians(torch.zeros(4, 3), torch.tensor([[1.0, 0, 0, 0]]).repeat(4, 1), torch.full((4, 3), 1e-3),
                     torch.ones(4), torch.ones(4, 3), torch.zeros(4, dtype=torch.int32))
    out = sparsify(same, torch.zeros(4), cfg)
    assert len(out) == 1 and torch.allclose(out.scales, torch.full((1, 3), 1e-3), rtol=1e-3)


def test_merging_pixel_surfels_with_gain_3_gives_the_surfel_of_a_larger_pixel() -> None:
    # A k x k block of pixel surfels (sigma = half a pixel) merged with gain 3 is the surfel of a pixel k times
    # larger (sigma = k / 2 pixels), and merging merged blocks again gives the same (associative).
    px, k = 1e-3, 4
    ax = (torch.arange(2 * k, dtype=torch.float32) + 0.5) * px
    xy = torch.stack(torch.meshgrid(ax, ax, indexing="ij"), -1).reshape(-1, 2)
    N = xy.shape[0]
    g = Gaussians(torch.cat((xy, torch.ones(N, 1)), 1), torch.tensor([[1.0, 0, 0, 0]]).repeat(N, 1),
                  torch.tensor([[0.5 * px, 0.5 * px, 1e-5]]).repeat(N, 1), torch.full((N,), 0.9), torch.rand(N, 3),
                  torch.full((N,), -1, dtype=torch.int32))
    blk = (torch.div(xy[:, 0], k * px, rounding_mode="floor") * 2 + torch.div(xy[:, 1], k * px,
                                                                              rounding_mode="floor")).long()
    quads = merge_by_inverse(g, merge_weights(g), blk, 4, min_scale=1e-6, spread_gain=3.0)
    in_plane = torch.sort(quads.scales, dim=1).values[:, 1:]
    assert torch.allclose(in_plane, torch.full_like(in_plane, 0.5 * k * px), rtol=1e-3)
    whole = merge_by_inverse(quads, quads.weights, torch.zeros(4, dtype=torch.int64), 1, 1e-6, 3.0)
    direct = merge_by_inverse(g, merge_weights(g), torch.zeros(N, dtype=torch.int64), 1, 1e-6, 3.0)
    assert torch.allclose(whole.scales, direct.scales, rtol=1e-3)
    assert torch.allclose(torch.sort(whole.scales).values[0, 1:], torch.full((2,), k * px), rtol=1e-3)


def test_merged_plane_renders_without_gaps() -> None:
    from langgs_ros.gaussians import gaussians_from_depth
    from langgs_ros.render import render_gaussians

    # A fronto-parallel wall 1 m away seen by a 96 x 96 camera (f = 100 px: 1 cm per pixel), merged in 4 cm voxels.
    H = W = 96
    K = np.array([[100.0, 0, 47.5], [0, 100.0, 47.5], [0, 0, 1]])
    rgb = np.full((H, W, 3), 128, np.uint8)
    g = gaussians_from_depth(np.ones((H, W), np.float32), rgb, K, np.eye(4))
    dense = render_gaussians(g, np.eye(4), K, W, H, backend="torch")
    inner = (slice(16, 80), slice(16, 80))

    def alpha_of(cfg: SparsifyConfig) -> float:
        out = sparsify(g, torch.ones(len(g)), cfg)
        assert len(out) <= len(g) / 12
        return float(render_gaussians(out, np.eye(4), K, W, H, backend="torch").alpha[inner].mean())

    assert float(dense.alpha[inner].mean()) > 0.98
    # 4 x 4 pixel Gaussians per merged one: the default merge covers the wall (measured 0.92) ...
    assert alpha_of(SparsifyConfig(base_voxel_size=0.04)) > 0.9
    # ... plain moment matching leaves a grid of gaps (measured 0.57; the failure this guards against).
    assert alpha_of(SparsifyConfig(base_voxel_size=0.04, spread_gain=1.0, opacity_evidence=1.0)) < 0.7


def _scene_for_levels() -> tuple[Gaussians, torch.Tensor]:
    # A 32 cm x 32 cm floor patch of 2 mm surfels: grey, then a colour edge at x = 0.255 (inside a voxel at every
    # level).
    ax = torch.arange(160, dtype=torch.float32) * 2e-3 + 1e-3
    xy = torch.stack(torch.meshgrid(ax, ax, indexing="ij"), -1).reshape(-1, 2)
    N = xy.shape[0]
    colors = torch.full((N, 3), 0.5)
    colors[xy[:, 0] > 0.255] = torch.tensor([0.9, 0.1, 0.1])
    g = Gaussians(torch.cat((xy, torch.zeros(N, 1)), 1), torch.tensor([[1.0, 0, 0, 0]]).repeat(N, 1),
                  torch.tensor([[1e-3, 1e-3, 1e-4]]).repeat(N, 1), torch.full((N,), 0.9), colors,
                  torch.full((N,), -1, dtype=torch.int32))
    return g, torch.zeros(N, dtype=torch.int8)


def test_hierarchical_levels_coarsen_uniform_regions_and_refine_at_edges() -> None:
    from langgs_ros.sparsify import hierarchical_levels

    g, fine = _scene_for_levels()
    cfg = SparsifyConfig(base_voxel_size=0.02, max_level=4, max_coarsen=3)
    lv = hierarchical_levels(g, fine, cfg)
    x = g.means[:, 0]
    assert lv.dtype == torch.int8 and int(lv.min()) >= 0 and int(lv.max()) <= 3
    far_from_edge = (x < 0.15)  # uniform grey, several 16 cm voxels away from the edge
    assert float((lv[far_from_edge] >= 2).float().mean()) > 0.9
    at_edge = (x - 0.255).abs() < 0.004
    assert torch.all(lv[at_edge] == 0)  # the colour edge is kept at the finest level
    assert len(sparsify_with_keys(g, lv, cfg).gaussians) < len(sparsify_with_keys(g, fine, cfg).gaussians) / 2
    # A corner (the floor meets a wall, surfels turned with it) refines like a colour edge.
    g.colors[:] = 0.5
    wall = x > 0.255
    g.means[wall, 2] = x[wall] - 0.255
    g.means[wall, 0] = 0.255
    g.quats[wall] = torch.tensor([math.cos(math.pi / 4), 0.0, math.sin(math.pi / 4), 0.0])  # normal +z -> +x
    lv = hierarchical_levels(g, fine, cfg)
    assert torch.all(lv[at_edge] == 0) and float((lv[far_from_edge] >= 2).float().mean()) > 0.9
    # Never finer than the fine levels, never coarser than fine + max_coarsen; off with max_coarsen = 0.
    fine2 = torch.ones_like(fine)
    lv2 = hierarchical_levels(g, fine2, cfg)
    assert torch.all(lv2 >= 1) and torch.all(lv2 <= 4)
    assert torch.equal(hierarchical_levels(g, fine2, SparsifyConfig()), fine2)
    with pytest.raises(ValueError):
        hierarchical_levels(g, fine[:-1], cfg)
