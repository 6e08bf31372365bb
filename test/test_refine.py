"""Photometric refinement (langgs_ros.refine) and its differentiable rasteriser (langgs_ros.diff_render), on CPU:
the same code path robots run with gsplat on CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from langgs_ros.diff_render import rasterize
from langgs_ros.refine import RefineConfig, refine_gaussians, view_counts
from langgs_ros.render import render_gaussians
from langgs_ros.types import Gaussians

HOLOLENS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hololens_office"
K_SMALL = torch.tensor([[60.0, 0.0, 23.5], [0.0, 60.0, 15.5], [0.0, 0.0, 1.0]])
W_SMALL, H_SMALL = 48, 32


def _scene(n: int, seed: int) -> Gaussians:
    """n random Gaussians 2-3 m in front of an identity camera (OpenCV axes)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 3, generator=gen) * torch.tensor([1.6, 1.0, 1.0]) + torch.tensor([-0.8, -0.5, 2.0])
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=gen), dim=1)
    scales = torch.rand(n, 3, generator=gen) * 0.06 + 0.02
    opac = torch.rand(n, generator=gen) * 0.6 + 0.35
    colors = torch.rand(n, 3, generator=gen)
    return Gaussians(means, quats, scales, opac, colors, torch.arange(n, dtype=torch.int32) % 3,
                     weights=torch.rand(n, generator=gen) + 0.5)


def test_torch_rasterizer_matches_the_renderer() -> None:
    """The differentiable compositor forms the same image as render_gaussians' torch backend (same rules)."""
    g = _scene(400, 0)
    ref = render_gaussians(g, np.eye(4), K_SMALL.numpy(), W_SMALL, H_SMALL, backend="torch", render_instances=False)
    out = rasterize(g.means, g.quats, g.scales, g.opacities, g.colors, torch.eye(4), K_SMALL, W_SMALL, H_SMALL,
                    backend="torch")
    assert out.rgb.shape == (H_SMALL, W_SMALL, 3) and out.alpha.shape == out.depth.shape == (H_SMALL, W_SMALL)
    assert float(ref.alpha.mean()) > 0.5  # a scene that covers most of the image
    torch.testing.assert_close(out.rgb, ref.rgb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.alpha, ref.alpha, atol=1e-5, rtol=1e-5)
    m = ref.alpha >= 0.5
    torch.testing.assert_close(out.depth[m], ref.depth[m], atol=1e-4, rtol=1e-5)


def _dense_reference(means, quats, scales, opacities, colors, K, W, H):
    """Test double of the tiled compositor: every pixel against every Gaussian (no tiles, no padding), the same
    3DGS rules, written independently; autograd differentiates it. Stands for gsplat's CUDA backward pass."""
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    Kg = K.clone()
    Kg[:2, 2] += 0.5
    cov, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False)
    radii, m2d, z, conics, _ = _fully_fused_projection(means, cov, torch.eye(4)[None], Kg[None], W, H, eps2d=0.3,
                                                       near_plane=0.05, far_plane=100.0)
    order = torch.argsort(z[0].detach())
    m2d, z, conics, op, col = m2d[0][order], z[0][order], conics[0][order], opacities[order], colors[order]
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    d = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)[:, None, :] - m2d[None]  # (HW, N, 2)
    dx, dy = d[..., 0], d[..., 1]
    sig = 0.5 * conics[:, 0] * dx ** 2 + conics[:, 1] * dx * dy + 0.5 * conics[:, 2] * dy ** 2
    a = (op * torch.exp(-sig)).clamp(max=0.999)
    a = a * ((sig >= 0) & (a >= 1 / 255) & (radii[0][order] > 0).all(-1)).detach()
    T = torch.cumprod(1 - a, dim=1)
    w = a * torch.cat([torch.ones_like(T[:, :1]), T[:, :-1]], 1) * (T > 1e-4).detach()
    return (w @ col).reshape(H, W, 3), (w @ z[:, None]).reshape(H, W)


def test_rasterizer_gradients_match_a_dense_reference_and_finite_differences() -> None:
    """Autograd through the tiled compositor equals autograd through a brute-force one (means, quats, scales,
    opacities, colours), and the colour gradient equals central differences (the render is linear in colour; the
    other parameters also move the 1/255 alpha cut-off, a jump autograd does not see, as in gsplat)."""
    g = _scene(12, 1)
    target = torch.rand(H_SMALL, W_SMALL, 3, generator=torch.Generator().manual_seed(2))
    names = ("means", "quats", "scales", "opacities", "colors")

    def grads(fn) -> dict[str, torch.Tensor]:
        leaves = {k: getattr(g, k).clone().requires_grad_() for k in names}
        rgb, zacc = fn(*(leaves[k] for k in names))
        (((rgb - target) ** 2).sum() + 0.1 * zacc.sum()).backward()
        return {k: v.grad for k, v in leaves.items()}

    def tiled(*p):
        out = rasterize(*p, torch.eye(4), K_SMALL, W_SMALL, H_SMALL, backend="torch")
        return out.rgb, out.depth * out.alpha

    ours = grads(tiled)
    ref = grads(lambda *p: _dense_reference(*p, K_SMALL, W_SMALL, H_SMALL))
    for k in names:
        assert float(ours[k].abs().max()) > 0, k
        torch.testing.assert_close(ours[k], ref[k], atol=1e-3, rtol=1e-3)

    def loss_of_colors(c: torch.Tensor) -> float:
        out = rasterize(g.means, g.quats, g.scales, g.opacities, c, torch.eye(4), K_SMALL, W_SMALL, H_SMALL,
                        backend="torch")
        return float(((out.rgb.double() - target) ** 2).sum())

    for j in torch.argsort(ours["colors"].reshape(-1).abs(), descending=True)[:5].tolist():
        plus, minus = g.colors.clone(), g.colors.clone()
        plus.view(-1)[j] += 1e-2
        minus.view(-1)[j] -= 1e-2
        fd = (loss_of_colors(plus) - loss_of_colors(minus)) / 2e-2
        an = float(ours["colors"].reshape(-1)[j])
        assert abs(fd - an) <= 1e-2 * abs(an) + 1e-3, (j, fd, an)


def test_refinement_fits_the_frames_within_its_bounds() -> None:
    """From perturbed colours, opacities, scales and means, refinement moves a render towards the images of the
    true Gaussians (two views) and keeps every bound: mean shift, minimum scale, ids and weights untouched."""
    truth = _scene(60, 4)
    poses = np.stack([np.eye(4), np.eye(4)])
    poses[1, 0, 3] = 0.15  # second camera 15 cm to the right
    K = np.stack([K_SMALL.numpy()] * 2)
    imgs, deps = [], []
    for T in poses:
        r = render_gaussians(truth, T, K[0], W_SMALL, H_SMALL, backend="torch", render_instances=False)
        imgs.append(r.rgb)
        deps.append(r.depth)
    images, depths = torch.stack(imgs), torch.stack(deps)
    gen = torch.Generator().manual_seed(5)
    start = Gaussians(truth.means + (torch.rand(60, 3, generator=gen) - 0.5) * 0.02, truth.quats.clone(),
                      truth.scales * 1.4, (truth.opacities * 0.6).clamp(0.05, 1.0),
                      (truth.colors + (torch.rand(60, 3, generator=gen) - 0.5) * 0.4).clamp(0.0, 1.0),
                      truth.instance_ids.clone(), weights=truth.weights.clone())
    cfg = RefineConfig(steps=120, max_seconds=600.0, lr_means=1e-3, lr_colors=0.02, max_mean_shift=0.015,
                       min_scale=0.021)

    def err(g: Gaussians) -> float:
        total = 0.0
        for i in range(2):
            r = render_gaussians(g, poses[i], K[0], W_SMALL, H_SMALL, backend="torch", render_instances=False)
            v = depths[i] > 0
            total += float((r.rgb[v] - images[i][v]).abs().mean())
        return total / 2

    refined, stats = refine_gaussians(start, images, depths, poses, K, cfg)
    assert stats.steps == 120 and stats.gaussians == 60
    assert stats.loss_last < 0.5 * stats.loss_first
    assert err(refined) < 0.5 * err(start)
    assert float((refined.means - start.means).abs().max()) <= 0.015 + 1e-6
    assert float(refined.scales.min()) >= 0.021 * (1 - 1e-6)
    assert float(refined.opacities.min()) >= 0 and float(refined.opacities.max()) <= 1
    assert torch.allclose(refined.quats.norm(dim=1), torch.ones(60), atol=1e-5)
    assert torch.equal(refined.instance_ids, start.instance_ids)
    assert torch.equal(refined.weights, start.weights)
    assert not start.means.requires_grad and not refined.means.requires_grad

    same, off = refine_gaussians(start, images, depths, poses, K, RefineConfig(steps=0))
    assert same is start and off.steps == 0
    _, timed_out = refine_gaussians(start, images, depths, poses, K, RefineConfig(steps=50, max_seconds=1e-9))
    assert timed_out.steps == 0  # the time bound is checked before every step


def test_refine_config_and_inputs_are_validated() -> None:
    for bad in ({"steps": -1}, {"max_seconds": 0.0}, {"downscale": 0}, {"lr_means": float("nan")},
                {"max_gaussians": 0}):
        with pytest.raises(ValueError):
            RefineConfig(**bad)
    g = _scene(5, 6)
    with pytest.raises(ValueError, match="match"):
        refine_gaussians(g, torch.zeros(2, 8, 8, 3), torch.zeros(1, 8, 8), np.stack([np.eye(4)] * 2),
                         np.stack([K_SMALL.numpy()] * 2), RefineConfig(steps=1))
    with pytest.raises(ValueError, match="finite"):
        refine_gaussians(g, torch.full((1, 8, 8, 3), float("nan")), torch.zeros(1, 8, 8), np.eye(4)[None],
                         K_SMALL.numpy()[None], RefineConfig(steps=1))


def test_view_counts() -> None:
    means = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, -2.0], [5.0, 0.0, 2.0], [0.2, 0.0, 2.0]])
    poses = np.stack([np.eye(4), np.eye(4)])
    poses[1, 0, 3] = 0.4
    c = view_counts(means, poses, np.stack([K_SMALL.numpy()] * 2), W_SMALL, H_SMALL)
    assert c.tolist() == [2, 0, 0, 2]
    c1 = view_counts(means, poses[:1], K_SMALL.numpy()[None], W_SMALL, H_SMALL)
    assert c1.tolist() == [1, 0, 0, 1]


@pytest.mark.skipif(not HOLOLENS.is_dir(), reason="needs ../shared/data/hololens_office")
def test_pipeline_refines_a_real_window_in_place() -> None:
    """refine.steps > 0: the fused window's Gaussians render closer to its frames; the map keeps its size,
    instances and bounds; a moved map (map_from_store not identity) round-trips through the access methods."""
    from langgs_ros.datasets import open_sequence
    from langgs_ros.frames import WindowConfig
    from langgs_ros.pipeline import MappingPipeline, PipelineConfig

    seq = open_sequence(str(HOLOLENS))
    frames = [seq.frame(10), seq.frame(14)]

    def build(steps: int) -> tuple[MappingPipeline, object]:
        cfg = PipelineConfig(device="cpu", backend="rgbd", semantic_source="labels")
        cfg.window = WindowConfig(size=2, overlap=0)
        cfg.backend_args = {"max_depth": 10.0}
        cfg.semantic_args = {"label_names": seq.label_names or None}
        cfg.refine = RefineConfig(steps=steps, max_seconds=600.0, downscale=2)
        p = MappingPipeline(cfg)
        return p, p.process_window(frames)

    def psnr(p: MappingPipeline) -> float:
        g = p.snapshot().gaussians
        vals = []
        for f in frames:
            H, W = f.rgb.shape[:2]
            v = np.asarray(f.depth) > 0
            r = render_gaussians(g, f.world_from_camera, f.intrinsics, W, H, backend="torch")
            err = np.asarray(r.rgb)[v] * 255.0 - f.rgb[v].astype(np.float64)
            vals.append(10 * np.log10(255.0 ** 2 / np.mean(err ** 2)))
        return float(np.mean(vals))

    plain, s0 = build(0)
    refined, s1 = build(16)
    assert s0.refine_steps == 0 and s0.t_refine == 0.0
    assert s1.refine_steps == 16 and s1.t_refine > 0
    a, b = plain.snapshot(), refined.snapshot()
    assert len(a.gaussians) == len(b.gaussians)
    assert torch.equal(a.gaussians.instance_ids, b.gaussians.instance_ids)
    assert float((a.gaussians.means - b.gaussians.means).abs().max()) <= RefineConfig().max_mean_shift + 1e-5
    assert psnr(refined) > psnr(plain) + 1.0

    m = refined.map
    M = np.eye(4)
    M[:3, 3] = [0.5, -0.2, 0.1]
    m.apply_correction(M)
    f = frames[0]
    T = np.asarray(f.world_from_camera, dtype=np.float64).copy()
    T[:3, 3] += M[:3, 3]  # the same camera in the moved map
    H, W = f.rgb.shape[:2]
    rows, g = m.gaussians_in_view(T[None], np.asarray(f.intrinsics)[None], W, H)
    assert 0 < len(rows) <= m.num_gaussians
    before = m.snapshot().gaussians
    m.update_gaussians(rows, g)  # writing back what was read changes nothing
    after = m.snapshot().gaussians
    torch.testing.assert_close(after.means, before.means, atol=1e-5, rtol=0)
    torch.testing.assert_close(after.colors, before.colors)
    rows2, _ = m.gaussians_in_view(T[None], np.asarray(f.intrinsics)[None], W, H, max_gaussians=10)
    assert len(rows2) == 10
    with pytest.raises(ValueError):
        m.update_gaussians(rows[:3], g)


def test_a_diverging_refinement_returns_its_input() -> None:
    """A learning rate that blows the parameters up (non-finite loss) is caught: the input comes back unchanged
    and the stats say so (the map then keeps the fused window as it was)."""
    g = _scene(30, 7)
    img = render_gaussians(g, np.eye(4), K_SMALL.numpy(), W_SMALL, H_SMALL, backend="torch", render_instances=False)
    cfg = RefineConfig(steps=30, max_seconds=600.0, lr_scales=1e6, lr_means=0.0, max_mean_shift=0.0)
    out, stats = refine_gaussians(g, img.rgb[None], img.depth[None], np.eye(4)[None], K_SMALL.numpy()[None], cfg)
    assert stats.skipped == "diverged"
    assert out is g


def test_exposure_absorbs_a_brightness_change_between_frames() -> None:
    """The second frame is 25 % brighter (auto exposure): with the per-frame affine exposure the Gaussians keep
    the reference frame's colours; without it they drift towards the average of the two exposures."""
    truth = _scene(60, 8)
    truth.colors = truth.colors * 0.7  # room for the brighter copy below 1
    poses = np.stack([np.eye(4), np.eye(4)])
    poses[1, 0, 3] = 0.1
    K = np.stack([K_SMALL.numpy()] * 2)
    imgs, deps = [], []
    for i, T in enumerate(poses):
        r = render_gaussians(truth, T, K[0], W_SMALL, H_SMALL, backend="torch", render_instances=False)
        imgs.append(r.rgb * (1.25 if i == 1 else 1.0))
        deps.append(r.depth)
    images, depths = torch.stack(imgs), torch.stack(deps)

    def colour_error(exposure: bool) -> float:
        cfg = RefineConfig(steps=80, max_seconds=600.0, lr_means=0.0, lr_scales=0.0, lr_quats=0.0, lr_opacities=0.0,
                           lr_colors=0.01, exposure=exposure, lr_exposure=0.02)
        refined, stats = refine_gaussians(truth, images, depths, poses, K, cfg)
        assert stats.steps == 80 and not stats.skipped
        return float((refined.colors - truth.colors).abs().mean())

    with_exposure, without = colour_error(True), colour_error(False)
    assert with_exposure < 0.5 * without, (with_exposure, without)
