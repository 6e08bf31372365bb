"""Tests of langgs_ros.geometry: rotations against transforms3d, yaw frames, gravity-aligned box fitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transforms3d.quaternions as tq

from langgs_ros.geometry import (
    covariance_from_scales_quats,
    fit_gravity_aligned_box,
    heading_yaw,
    quat_to_rotmat,
    rotation_from_yaw,
    rotmat_to_quat,
    scales_quats_from_covariance,
    symmetric_eigh3,
    yaw_frame,
)


def _random_quats(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 4, generator=g, dtype=torch.float64)
    q = q / q.norm(dim=1, keepdim=True)
    return torch.where(q[:, :1] < 0, -q, q)


def test_quat_rotmat_match_transforms3d_and_roundtrip() -> None:
    q = _random_quats(500)
    R = quat_to_rotmat(q)
    ref = np.stack([tq.quat2mat(x) for x in q.numpy()])
    np.testing.assert_allclose(R.numpy(), ref, atol=1e-12)
    # Near-180° rotations (w ~ 0) and identity are the hard cases for the inverse.
    special = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0],
                            [1e-9, 0.6, 0.8, 0.0]], dtype=torch.float64)
    special = special / special.norm(dim=1, keepdim=True)
    for qq in (q, special):
        back = rotmat_to_quat(quat_to_rotmat(qq))
        # q and -q are the same rotation; compare rotations.
        np.testing.assert_allclose(quat_to_rotmat(back).numpy(), quat_to_rotmat(qq).numpy(), atol=1e-9)
        assert torch.all(back[:, 0] >= 0)
    np.testing.assert_allclose(rotmat_to_quat(R).numpy(), q.numpy(), atol=1e-9)


def test_covariance_roundtrip_gives_proper_rotation() -> None:
    q = _random_quats(300, seed=1).float()
    s = torch.rand(300, 3) * 0.05 + 1e-3
    cov = covariance_from_scales_quats(s, q)
    s2, q2 = scales_quats_from_covariance(cov, min_scale=1e-6)
    R2 = quat_to_rotmat(q2.double())
    assert torch.allclose(torch.linalg.det(R2), torch.ones(300, dtype=torch.float64), atol=1e-5)
    cov2 = covariance_from_scales_quats(s2, q2)
    assert torch.allclose(cov2, cov, atol=1e-7)
    assert torch.all(s2[:, 0] <= s2[:, 1]) and torch.all(s2[:, 1] <= s2[:, 2])  # ascending
    torch.testing.assert_close(torch.sort(s2, dim=1).values, torch.sort(s, dim=1).values, atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("spectrum", [None, (1e-4, 1.0, 1.0), (1e-4, 0.5, 1.0), (1.0, 1.0, 1.0), (0.0, 0.0, 1.0),
                                      (0.0, 0.0, 0.0), (1e-8, 1e-4, 1.0), (1.0, 1.0, 1.0 + 1e-9), (-1.0, 0.0, 2.0)])
def test_closed_form_eigh3_matches_lapack(spectrum) -> None:
    """symmetric_eigh3 against torch.linalg.eigh (LAPACK): same eigenvalues, A = V diag(λ) Vᵀ, V a proper
    rotation, on random and on repeated / zero / flat-disc spectra (the merges' cases)."""
    g = torch.Generator().manual_seed(7)
    n = 2000
    if spectrum is None:
        X = torch.randn(n, 3, 3, generator=g, dtype=torch.float64)
        A = X @ X.transpose(1, 2)
    else:
        Q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
        A = Q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ Q.transpose(1, 2)
    for dtype, tol in ((torch.float64, 5e-8), (torch.float32, 1e-6)):  # float64: acos near repeated roots
        a = (A * 1e-4).to(dtype)  # covariances of cm-sized Gaussians (m²)
        ev, V = symmetric_eigh3(a)
        assert ev.dtype == dtype and V.dtype == dtype and V.shape == (n, 3, 3)
        ref = torch.linalg.eigvalsh(a.double())
        scale = a.double().abs().amax(dim=(1, 2)).clamp_min(1e-30)[:, None]
        assert ((ev.double() - ref).abs() / scale).max() < tol
        Vd = V.double()
        rec = Vd @ torch.diag_embed(ev.double()) @ Vd.transpose(1, 2)
        assert ((rec - a.double()).abs().amax(dim=2) / scale).max() < 10 * tol
        assert (Vd.transpose(1, 2) @ Vd - torch.eye(3, dtype=torch.float64)).abs().max() < 10 * tol
        assert (torch.linalg.det(Vd) - 1.0).abs().max() < 10 * tol
    ev, V = symmetric_eigh3(torch.zeros(0, 3, 3))
    assert ev.shape == (0, 3) and V.shape == (0, 3, 3)


def test_yaw_frame_conventions() -> None:
    e1, e2 = yaw_frame((0, 0, 1))
    np.testing.assert_allclose(e1, [1, 0, 0])
    np.testing.assert_allclose(e2, [0, 1, 0])
    assert heading_yaw(np.array([0.0, 1.0, 0.0]), (0, 0, 1)) == pytest.approx(np.pi / 2)
    # y-up world (the hololens annotations): e1 = x, e2 = up x e1 = -z.
    e1, e2 = yaw_frame((0, 1, 0))
    np.testing.assert_allclose(e1, [1, 0, 0])
    np.testing.assert_allclose(e2, [0, 0, -1])
    R = rotation_from_yaw(0.3, (0, 1, 0))
    np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        yaw_frame((0, 0, 0))


@pytest.mark.parametrize("up", [(0.0, 0.0, 1.0), (0.000267, 0.999998, 0.002046)])
def test_box_fit_recovers_rotated_box_with_outliers(up: tuple[float, float, float]) -> None:
    rng = np.random.default_rng(0)
    size = np.array([2.0, 0.8, 0.6])
    yaw = 0.7
    R = rotation_from_yaw(yaw, up)
    centre = np.array([1.0, -0.5, 2.0])
    local = (rng.random((5000, 3)) - 0.5) * size
    pts = local @ R.T + centre
    outliers = centre + rng.normal(0, 5.0, (20, 3))  # 0.4 % far outliers, removed by trimming
    box = fit_gravity_aligned_box(np.vstack((pts, outliers)), up, trim_percent=1.0)
    assert box is not None
    np.testing.assert_allclose(box.center, centre, atol=0.05)
    np.testing.assert_allclose(box.size, size, atol=0.08)
    assert abs(np.angle(np.exp(1j * (box.yaw - yaw)))) < 0.03
    np.testing.assert_allclose(box.rotation[:, 2], np.asarray(up) / np.linalg.norm(up), atol=1e-9)
    assert fit_gravity_aligned_box(np.zeros((0, 3)), up) is None
    one = fit_gravity_aligned_box(np.ones((1, 3)), up)
    assert one is not None and np.allclose(one.size, 0)
    with pytest.raises(ValueError):
        fit_gravity_aligned_box(pts, up, trim_percent=60)
