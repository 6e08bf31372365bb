"""Geometry–semantic hierarchical sparsification (FLEG, Tian et al., arXiv 2512.17541, "geometry-semantic
hierarchical sparsification").

FLEG reduces dense per-pixel Gaussians by merging them coarsely where geometry allows (far away, where the pixel
footprint is large anyway) and never across semantic (instance) boundaries. Here that strategy is made explicit
and deterministic so it can also serve as the key of an incremental map:

- **Geometry level** (coarse-to-fine hierarchy): a Gaussian seen at distance ``d`` from its camera is assigned
  the octree level ``ℓ = clamp(floor(log2(d / d0)), 0, max_level)`` for ``d > d0`` (else 0), i.e. the voxel
  edge ``base_voxel_size · 2^ℓ`` grows proportionally to distance (like the pixel footprint), quantised to
  powers of two so voxels of different levels nest and keys are identical across windows and frames.
- **Semantic split**: the merge key is ``(ℓ, voxel ijk at level ℓ, instance id)``; Gaussians of different
  instances never share a key, so object boundaries are preserved at every level.
- **Merge** (moment matching, see ``shared/docs/conventions.md``): with weights ``w_i`` = opacity × footprint
  area (``π s_a s_b`` of the two largest scales; ``g.weights`` when given, so already-merged Gaussians carry
  their accumulated mass): ``μ = Σ w_i μ_i / Σ w_i``, ``Σ = Σ w_i (Σ_i + γ (μ_i − μ)(μ_i − μ)ᵀ) / Σ w_i``
  (two-pass, no cancellation), eigen-decomposed (closed form, ``geometry.symmetric_eigh3``) into scales and a proper
  rotation (det +1, quaternion w ≥ 0); ``γ = spread_gain`` (:class:`SparsifyConfig`) keeps splats as wide,
  relative to their patch, as a pixel surfel is relative to its pixel, so merged surfaces render without gaps.
  Colours: weighted mean. **Opacity**: ``1 − (1 − ō)^e`` of the weighted mean ``ō`` (``e = opacity_evidence``):
  members are independent evidence of one opaque surface patch, a merged patch of trusted pixels is nearly
  opaque. Singleton keys are passed through unchanged.

Voxels are *centred* on the grid points ``k · edge`` (index ``floor(p / edge + 0.5)``) at every level, so a
plane at a round coordinate — typically the floor at ``z = 0`` of a robot's ``map`` — lies mid-voxel at all
levels instead of on a voxel boundary, where sensor noise would split it into two layers of Gaussians. (Levels
are therefore not nested; nothing relies on nesting: the level is part of the key.)

Keys are 64-bit hashes (splitmix64 finaliser of the packed fields); distinct keys collide with probability
≈ N²/2⁶⁴ (≈5·10⁻⁸ for a million Gaussians), and voxel indices wrap beyond ±2²⁰ voxels (±21 km at 2 cm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree

from langgs_ros.geometry import quat_to_rotmat, scales_quats_from_covariance
from langgs_ros.types import Gaussians

__all__ = [
    "MAX_OCC_INSTANCE",
    "CellLevelLock",
    "SparsifyConfig",
    "SparsifyResult",
    "cell_keys",
    "hierarchical_levels",
    "lock_cell_levels",
    "lock_cells_to_finest",
    "merge_by_inverse",
    "merge_weights",
    "occupancy_instance_part",
    "occupancy_keys",
    "occupancy_voxel_part",
    "snapshot_levels",
    "sorted_insert",
    "sorted_lookup",
    "sparsify",
    "sparsify_with_keys",
    "voxel_keys",
    "voxel_levels",
]

_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)
_OCC_INST_BITS = 20
MAX_OCC_INSTANCE = (1 << _OCC_INST_BITS) - 2
"""Largest map instance id representable in :func:`occupancy_keys`."""


@dataclass
class SparsifyConfig:
    """Parameters of the hierarchical sparsification.

    Attributes:
        base_voxel_size: voxel edge at level 0 (near range), metres.
        growth_start_distance: ``d0``; up to this view distance the level is 0, beyond it the voxel edge grows
            proportionally to distance (``base · d / d0``), quantised down to a power of two.
        max_level: coarsest level (voxel edge ``base · 2^max_level``); also the edge of the *cells* used by the
            map to lock one level per region (see :mod:`langgs_ros.fusion`).
        min_scale: lower bound on merged standard deviations, metres.
        spread_gain: ``γ`` of the merge covariance ``Σ w_i (Σ_i + γ (μ_i − μ)(μ_i − μ)ᵀ) / Σ w_i``. Every
            Gaussian stands for a patch of surface whose splat standard deviation is half the patch's width
            (a pixel surfel: ``scale_factor`` 0.5 of its footprint). A uniformly filled patch of width ``a`` has
            second moment ``a²/12`` per axis, so splat covariance = 3 × second moment: with ``γ = 3`` (=
            ``12 · 0.5²``) the member covariances ``Σ_i`` (already ×3) and the spread of the members' means are
            on the same footing, a merge of a k×k block of pixel surfels is exactly the surfel of the k-times
            larger pixel, and merging is associative (merging merged Gaussians again gives the same result).
            ``γ = 1`` is plain moment matching (splats a/√12 wide on an ``a`` grid: the surface renders with gaps).
            Measured on hololens frames 10 and 40 (one frame mapped, rendered at its own pose, valid-depth pixels,
            2 cm voxels, 8-bit PSNR): 13.5 / 13.2 dB with γ = 1 and mean opacity, 23.8 / 21.3 with γ = 3 and
            ``opacity_evidence`` 2. γ = 4 renders 0.9 / 0.2 dB better but grows the held-out depth error of the
            whole-sequence map from 2.6 to 3.5 cm (wider splats reach past silhouettes).
        opacity_evidence: merged opacity ``1 − (1 − ō)^e`` (``ō`` the members' weighted mean opacity) for
            groups of two or more: members are independent evidence that an opaque surface is there (each pixel
            saw it), so a merged patch of trusted pixels (0.9) is nearly opaque (0.99 with ``e = 2``) instead of
            letting the background show through it; ``e = 1`` keeps the mean. Repeated merges of the same patch
            (revisits) tend to 1: a surface seen again and again is solid.
        max_coarsen: geometry–semantic hierarchy depth (FLEG): a Gaussian may be merged up to this many levels
            coarser than its view-distance level where its voxel is homogeneous (see
            :func:`hierarchical_levels`); 0 = view-distance levels only.
        color_tolerance: a voxel is homogeneous only if the weighted standard deviation of its members'
            colours (RMS over R, G, B, colours in [0, 1]) is at most this.
        planar_tolerance: ... and the standard deviation of its members' means along their least-spread axis
            (thickness: curvature, depth discontinuities, a thin object on a surface) is at most this fraction
            of the voxel edge.
        normal_tolerance: ... and the members' normals (axis of their smallest scale) agree:
            ``1 − λ_max(Σ w n nᵀ / Σ w) <=`` this (0 for identical normals; 0.05 ≈ 13° of spread; a corner or
            an edge between a floor and a wall fails it).
        min_split_members: voxels with fewer members are not split (nothing to gain).
    """

    base_voxel_size: float = 0.02
    growth_start_distance: float = 1.0
    max_level: int = 4
    min_scale: float = 1e-4
    spread_gain: float = 3.0
    opacity_evidence: float = 2.0
    max_coarsen: int = 0
    color_tolerance: float = 0.04
    planar_tolerance: float = 0.08
    normal_tolerance: float = 0.05
    min_split_members: int = 4

    def validate(self) -> None:
        """Raise ``ValueError`` on inconsistent settings."""
        if not (self.base_voxel_size > 0 and self.growth_start_distance > 0):
            raise ValueError("base_voxel_size and growth_start_distance must be > 0")
        if not (0 <= self.max_level <= 15):
            raise ValueError(f"max_level must be in [0, 15], got {self.max_level}")
        if self.min_scale <= 0:
            raise ValueError("min_scale must be > 0")
        if self.spread_gain <= 0 or self.opacity_evidence < 1:
            raise ValueError("spread_gain must be > 0 and opacity_evidence >= 1")
        if not (0 <= self.max_coarsen <= self.max_level):
            raise ValueError(f"max_coarsen must be in [0, max_level], got {self.max_coarsen}")
        if (self.color_tolerance < 0 or self.planar_tolerance < 0 or self.normal_tolerance < 0
                or self.min_split_members < 1):
            raise ValueError("color_tolerance, planar_tolerance must be >= 0 and min_split_members >= 1")

    def voxel_size(self, level: int) -> float:
        """Voxel edge (m) at ``level``."""
        return self.base_voxel_size * (2.0 ** level)

    @property
    def cell_size(self) -> float:
        """Edge (m) of the coarsest voxels (level ``max_level``)."""
        return self.voxel_size(self.max_level)


@dataclass
class SparsifyResult:
    """Output of :func:`sparsify_with_keys`.

    Attributes:
        gaussians: merged set (M ≤ N), ``weights`` = accumulated merge weight Σw.
        keys: (M,) int64 merge keys, sorted ascending (unique).
        levels: (M,) int8 hierarchy level of each merged Gaussian.
        inverse: (N,) int64 index of the merged Gaussian each input went into.
    """

    gaussians: Gaussians
    keys: torch.Tensor
    levels: torch.Tensor
    inverse: torch.Tensor


def _lsr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser (Steele et al. 2014) on int64 with wrap-around arithmetic."""
    x = (x ^ _lsr(x, 30)) * _M1
    x = (x ^ _lsr(x, 27)) * _M2
    return x ^ _lsr(x, 31)


def _pack_ijk(ijk: torch.Tensor) -> torch.Tensor:
    """Pack (N, 3) int64 voxel indices into 63 bits (21 bits per axis, wrapping)."""
    m = (1 << 21) - 1
    off = 1 << 20
    return (((ijk[:, 0] + off) & m) << 42) | (((ijk[:, 1] + off) & m) << 21) | ((ijk[:, 2] + off) & m)


def voxel_levels(view_distance: torch.Tensor, config: SparsifyConfig) -> torch.Tensor:
    """Hierarchy level per Gaussian from its view distance.

    Args:
        view_distance: (N,) float distance (m) from the observing camera centre.

    Returns:
        (N,) int8 ``clamp(floor(log2(d / d0)), 0, max_level)`` (0 for ``d <= d0`` or non-finite ``d``).
    """
    d = torch.nan_to_num(view_distance.float(), nan=0.0, posinf=0.0) / config.growth_start_distance
    lvl = torch.floor(torch.log2(d.clamp_min(1.0)))
    return lvl.clamp(0, config.max_level).to(torch.int8)


def _voxel_ijk(means: torch.Tensor, levels: torch.Tensor, config: SparsifyConfig) -> torch.Tensor:
    size = config.base_voxel_size * torch.pow(2.0, levels.to(torch.float64))
    return torch.floor(means.to(torch.float64) / size[:, None] + 0.5).to(torch.int64)


def voxel_keys(means: torch.Tensor, levels: torch.Tensor, instance_ids: torch.Tensor,
               config: SparsifyConfig) -> torch.Tensor:
    """Merge keys ``hash(level, voxel ijk at that level, instance id)``.

    Args:
        means: (N, 3) float positions, metres. levels: (N,) int levels. instance_ids: (N,) int ids (-1 allowed).

    Returns:
        (N,) int64 keys (equal iff same level, voxel and instance, up to hash collisions ≈ N²/2⁶⁴).
    """
    ijk = _voxel_ijk(means, levels, config)
    li = (levels.to(torch.int64) << 32) | ((instance_ids.to(torch.int64) + 1) & 0xFFFFFFFF)
    return _mix64(_pack_ijk(ijk) ^ _mix64(li))


def cell_keys(means: torch.Tensor, config: SparsifyConfig) -> torch.Tensor:
    """Spatial keys of the level-``max_level`` cells containing ``means`` (N, 3) -> (N,) int64."""
    lv = torch.full((means.shape[0],), config.max_level, dtype=torch.int64, device=means.device)
    return _mix64(_pack_ijk(_voxel_ijk(means, lv, config)) ^ 0x5BD1E995)


def occupancy_keys(means: torch.Tensor, instance_ids: torch.Tensor, voxel_size: float) -> torch.Tensor:
    """Voxel-major (voxel, instance) keys for overlap tests.

    The top 44 bits are a hash of the voxel of edge ``voxel_size`` containing the point, the low 20 bits the
    instance id; so in a sorted array all instances occupying one voxel ``v`` are contiguous in
    ``[v_key, v_key + 2^20)`` (see :func:`occupancy_voxel_part`). Voxel-hash collisions (≈ V²/2⁴⁴) only merge
    two voxels' occupancy, a negligible bias for overlap ratios.

    Args:
        means: (N, 3) positions, metres. instance_ids: (N,) ids in ``[0, MAX_OCC_INSTANCE]``.
        voxel_size: voxel edge, metres.

    Returns:
        (N,) int64 keys.
    """
    ijk = torch.floor(means.to(torch.float64) / voxel_size + 0.5).to(torch.int64)
    hv = _mix64(_pack_ijk(ijk) ^ 0x27D4EB2F)
    low = (1 << _OCC_INST_BITS) - 1
    return (hv & ~low) | (instance_ids.to(torch.int64) & low)


def occupancy_voxel_part(keys: torch.Tensor) -> torch.Tensor:
    """Voxel part of :func:`occupancy_keys` (low 20 bits cleared)."""
    return keys & ~((1 << _OCC_INST_BITS) - 1)


def occupancy_instance_part(keys: torch.Tensor) -> torch.Tensor:
    """Instance part (int64) of :func:`occupancy_keys`."""
    return keys & ((1 << _OCC_INST_BITS) - 1)


@torch.inference_mode()
def hierarchical_levels(g: Gaussians, fine_levels: torch.Tensor, config: SparsifyConfig,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """Geometry–semantic hierarchical levels: coarse where a voxel is homogeneous, refined where it is not.

    FLEG (arXiv 2512.17541, geometry–semantic hierarchical sparsification): Gaussians are first grouped coarsely
    by geometric position, then refined by semantics. Here, top-down over an octree of voxel levels: every
    Gaussian starts at ``min(fine + max_coarsen, max_level)`` and the voxels of one level (keyed by level, voxel
    and instance id, so instance boundaries always split) are tested for homogeneity:

    - colour: weighted RMS standard deviation of the members' colours ``<= color_tolerance`` (colour edges,
      texture);
    - geometry: weighted standard deviation of the members' means along their least-spread axis ``<=
      planar_tolerance · edge`` (depth discontinuities, thin structures in front of a surface), and normal
      coherence ``1 − λ_max(Σ w n nᵀ / Σ w) <= normal_tolerance`` (curvature, corners, edges).

    Members of a voxel that fails either test (and has ``>= min_split_members`` members) go one level finer;
    nobody goes finer than its ``fine_levels`` (the view-distance resolution, the pixel footprint). A flat
    uniform wall therefore ends as a few large flat Gaussians, edges and thin structures at the finest level.

    Args:
        g: N Gaussians (means (N, 3) m, colours (N, 3) in [0, 1], instance ids (N,)).
        fine_levels: (N,) int finest level per Gaussian, in ``[0, max_level]``.
        config: :class:`SparsifyConfig` (``max_coarsen``, tolerances).
        weights: optional (N,) positive weights (default :func:`merge_weights`).

    Returns:
        (N,) int8 levels in ``[fine_levels, fine_levels + max_coarsen]`` (clamped to ``max_level``).

    Raises:
        ValueError: ``fine_levels`` of the wrong shape.
    """
    N = len(g)
    if fine_levels.shape != (N,):
        raise ValueError(f"fine_levels must have shape ({N},), got {tuple(fine_levels.shape)}")
    dev = g.means.device
    fine = fine_levels.to(device=dev, dtype=torch.int64)
    if N == 0 or config.max_coarsen == 0:
        return fine.to(torch.int8)
    w = (merge_weights(g) if weights is None else weights.to(dev)).to(torch.float64)
    x = g.means.to(torch.float64)
    c = g.colors.to(torch.float64)
    R = quat_to_rotmat(g.quats.to(torch.float64))
    n = torch.gather(R, 2, g.scales.argmin(dim=1)[:, None, None].expand(-1, 3, 1)).squeeze(2)
    nn = (n[:, :, None] * n[:, None, :]).reshape(-1, 9)
    level = (fine + config.max_coarsen).clamp(max=config.max_level)
    undecided = level > fine
    while bool(undecided.any()):
        idx = undecided.nonzero().squeeze(1)
        lv = level[idx]
        keys = voxel_keys(x[idx], lv, g.instance_ids[idx], config)
        _, inv = torch.unique(keys, return_inverse=True)
        G = int(inv.max()) + 1
        wi = w[idx]
        W = torch.zeros(G, dtype=torch.float64, device=dev).index_add_(0, inv, wi)
        wn = wi / W[inv]
        cnt = torch.bincount(inv, minlength=G)
        mu_c = torch.zeros(G, 3, dtype=torch.float64, device=dev).index_add_(0, inv, c[idx] * wn[:, None])
        var_c = torch.zeros(G, dtype=torch.float64, device=dev).index_add_(
            0, inv, ((c[idx] - mu_c[inv]) ** 2).sum(1) * wn) / 3.0
        mu_x = torch.zeros(G, 3, dtype=torch.float64, device=dev).index_add_(0, inv, x[idx] * wn[:, None])
        d = x[idx] - mu_x[inv]
        cov = torch.zeros(G, 9, dtype=torch.float64, device=dev).index_add_(
            0, inv, (d[:, :, None] * d[:, None, :]).reshape(-1, 9) * wn[:, None]).reshape(G, 3, 3)
        thin = torch.linalg.eigvalsh(cov)[:, 0].clamp_min(0.0)
        ncov = torch.zeros(G, 9, dtype=torch.float64, device=dev).index_add_(
            0, inv, nn[idx] * wn[:, None]).reshape(G, 3, 3)
        incoherent = 1.0 - torch.linalg.eigvalsh(ncov)[:, 2] > config.normal_tolerance
        edge = config.base_voxel_size * torch.pow(2.0, torch.zeros(G, dtype=torch.float64, device=dev)
                                                  .scatter_(0, inv, lv.to(torch.float64)))
        split = ((var_c > config.color_tolerance ** 2) | (thin > (config.planar_tolerance * edge) ** 2)
                 | incoherent) & (cnt >= config.min_split_members)
        go = split[inv]
        level[idx[go]] -= 1
        undecided[idx[~go]] = False
        undecided[idx[go]] = level[idx[go]] > fine[idx[go]]
    return level.to(torch.int8)


# Upper-triangle entries (a, b) of a symmetric 3×3 matrix, and the 9 row-major entries as indices into them.
_SYM_A = (0, 0, 0, 1, 1, 2)
_SYM_B = (0, 1, 2, 1, 2, 2)
_SYM_FULL = (0, 1, 2, 1, 3, 4, 2, 4, 5)


def merge_weights(g: Gaussians) -> torch.Tensor:
    """Merge weight per Gaussian: ``g.weights`` if present, else opacity × footprint area.

    Footprint area = ``π s_a s_b`` of the two largest standard deviations (m²). Returns (N,) float32 > 0.
    """
    if g.weights is not None:
        return g.weights.float().clamp_min(1e-20)
    s = torch.sort(g.scales.float(), dim=1).values
    return (g.opacities.float() * math.pi * s[:, 1] * s[:, 2]).clamp_min(1e-20)


@torch.inference_mode()
def merge_by_inverse(g: Gaussians, weights: torch.Tensor, inverse: torch.Tensor, num_out: int,
                     min_scale: float = 1e-4, spread_gain: float = 1.0, opacity_evidence: float = 1.0
                     ) -> Gaussians:
    """Moment-matching merge of the Gaussians that share an output index.

    Args:
        g: N input Gaussians (instance ids must agree within each group; the first member's is kept).
        weights: (N,) positive merge weights.
        inverse: (N,) int64 output index in ``[0, num_out)`` of each input; every output index must be used.
        num_out: M, the number of groups.
        min_scale: lower bound on merged standard deviations (m).
        spread_gain: ``γ`` of the spread term (see :attr:`SparsifyConfig.spread_gain`; 1 = moment matching).
        opacity_evidence: ``e`` of the merged opacity ``1 − (1 − ō)^e`` of groups of two or more (``ō`` the
            weighted mean; 1 = the mean itself; see :attr:`SparsifyConfig.opacity_evidence`).

    Returns:
        M merged Gaussians with ``weights`` = Σ w per group (float32, on ``g``'s device).
    """
    dev = g.means.device
    N = len(g)
    w = weights.to(torch.float32)
    counts = torch.bincount(inverse, minlength=num_out)
    W = torch.zeros(num_out, device=dev).index_add_(0, inverse, w)
    wn = w / W[inverse]
    mu = torch.zeros(num_out, 3, device=dev).index_add_(0, inverse, g.means * wn[:, None])
    colors = torch.zeros(num_out, 3, device=dev).index_add_(0, inverse, g.colors * wn[:, None])
    opac = torch.zeros(num_out, device=dev).index_add_(0, inverse, g.opacities * wn)
    first = torch.full((num_out,), N, dtype=torch.int64, device=dev).scatter_reduce_(
        0, inverse, torch.arange(N, device=dev), reduce="amin")
    inst = g.instance_ids[first]
    scales = g.scales[first].clone()
    quats = g.quats[first].clone()
    multi = counts > 1
    if bool(multi.any()):
        # Second moments for all inputs (cheaper than masking out singletons); the six unique entries of
        # w (Σ_i + γ d dᵀ), Σ_i = R diag(s²) Rᵀ; eigen-decomposed only for groups >= 2.
        d = g.means - mu[inverse]
        R = quat_to_rotmat(g.quats)  # (N, 3, 3)
        rs = R * (g.scales * g.scales)[:, None, :]  # R diag(s²)
        dw = d * (spread_gain * wn)[:, None]
        contrib = torch.stack([(rs[:, a] * R[:, b]).sum(-1) * wn + dw[:, a] * d[:, b]
                               for a, b in zip(_SYM_A, _SYM_B)], dim=1)  # (N, 6)
        idx = multi.nonzero().squeeze(1)
        cov6 = torch.zeros(num_out, 6, device=dev).index_add_(0, inverse, contrib)[idx]
        cov = cov6[:, list(_SYM_FULL)].reshape(-1, 3, 3)
        s_m, q_m = scales_quats_from_covariance(cov, min_scale=min_scale)
        scales[idx] = s_m
        quats[idx] = q_m
        if opacity_evidence != 1.0:
            opac[idx] = 1.0 - (1.0 - opac[idx].clamp(0.0, 1.0)) ** opacity_evidence
    # Exact means of singletons (no division round-off).
    single = ~multi
    mu[single] = g.means[first[single]]
    return Gaussians(mu, quats, scales, opac.clamp(0.0, 1.0), colors.clamp(0.0, 1.0), inst, weights=W)


@torch.inference_mode()
def sparsify_with_keys(g: Gaussians, levels: torch.Tensor, config: SparsifyConfig) -> SparsifyResult:
    """Merge Gaussians sharing a ``(level, voxel, instance)`` key (see the module docstring).

    Args:
        g: N Gaussians (``weights`` used as merge weights when present).
        levels: (N,) int hierarchy level per Gaussian (e.g. :func:`voxel_levels` of the view distance).
        config: :class:`SparsifyConfig`.

    Returns:
        :class:`SparsifyResult` (merged Gaussians sorted by key).

    Raises:
        ValueError: ``levels`` has the wrong length or a level outside ``[0, max_level]``.
    """
    config.validate()
    N = len(g)
    if levels.shape != (N,):
        raise ValueError(f"levels must have shape ({N},), got {tuple(levels.shape)}")
    dev = g.means.device
    if N == 0:
        return SparsifyResult(Gaussians.empty(dev), torch.zeros(0, dtype=torch.int64, device=dev),
                              torch.zeros(0, dtype=torch.int8, device=dev),
                              torch.zeros(0, dtype=torch.int64, device=dev))
    levels = levels.to(dev)
    if int(levels.min()) < 0 or int(levels.max()) > config.max_level:
        raise ValueError(f"levels must lie in [0, {config.max_level}]")
    keys = voxel_keys(g.means, levels, g.instance_ids, config)
    ukeys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    merged = merge_by_inverse(g, merge_weights(g), inverse, int(ukeys.numel()), config.min_scale,
                              config.spread_gain, config.opacity_evidence)
    out_levels = torch.zeros(ukeys.numel(), dtype=torch.int8, device=dev).scatter_(0, inverse, levels.to(torch.int8))
    return SparsifyResult(merged, ukeys, out_levels, inverse)


def sparsify(g: Gaussians, view_distance: torch.Tensor, config: SparsifyConfig | None = None, *,
             levels: torch.Tensor | None = None) -> Gaussians:
    """FLEG geometry–semantic hierarchical sparsification of one set of Gaussians.

    Args:
        g: N Gaussians (e.g. one frame's pixel Gaussians), instance ids respected (never merged across).
        view_distance: (N,) distance (m) of each Gaussian from the camera that observed it; sets the level.
        config: :class:`SparsifyConfig` (defaults if ``None``).
        levels: optional (N,) int levels overriding those derived from ``view_distance``.

    Returns:
        M ≤ N merged Gaussians (sorted by key) with ``weights`` = Σ w (opacity × footprint area, m²).

    Raises:
        ValueError: ``view_distance`` / ``levels`` of the wrong shape.
    """
    cfg = config or SparsifyConfig()
    if view_distance.shape != (len(g),):
        raise ValueError(f"view_distance must have shape ({len(g)},), got {tuple(view_distance.shape)}")
    lv = voxel_levels(view_distance.to(g.means.device), cfg) if levels is None else levels
    return sparsify_with_keys(g, lv, cfg).gaussians


# ----------------------------------------------------------------------------------------------------------------
# Sorted key arrays (the map's key index, cell table and occupancy sets)
# ----------------------------------------------------------------------------------------------------------------
def sorted_insert(sorted_arr: torch.Tensor, new_sorted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """Merge sorted ``new_sorted`` (values absent from ``sorted_arr``) into the sorted array.

    Args:
        sorted_arr: (M,) sorted ascending. new_sorted: (m,) sorted ascending, disjoint from ``sorted_arr``.

    Returns:
        ``(merged (M + m,), positions of the old entries (M,), positions of the new entries (m,))`` (int64
        positions in ``merged``).
    """
    M, m = sorted_arr.numel(), new_sorted.numel()
    dev = sorted_arr.device
    pos = torch.searchsorted(sorted_arr, new_sorted)
    new_pos = pos + torch.arange(m, device=dev)
    old_pos = torch.arange(M, device=dev) + torch.searchsorted(pos, torch.arange(M, device=dev), right=True)
    out = torch.empty(M + m, dtype=sorted_arr.dtype, device=dev)
    out[old_pos] = sorted_arr
    out[new_pos] = new_sorted
    return out, old_pos, new_pos


def sorted_lookup(sorted_keys: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of ``keys`` (N,) in the sorted ``sorted_keys`` (M,) and an (N,) bool hit mask.

    Positions of misses are clamped into ``[0, M)`` (meaningless; mask them with ``hit``).
    """
    if sorted_keys.numel() == 0:
        return torch.zeros_like(keys), torch.zeros(keys.shape, dtype=torch.bool, device=keys.device)
    pos = torch.searchsorted(sorted_keys, keys)
    pc = pos.clamp(max=sorted_keys.numel() - 1)
    return pc, (pos < sorted_keys.numel()) & (sorted_keys[pc] == keys)


# ----------------------------------------------------------------------------------------------------------------
# Level-of-detail policy of an incremental map: one level locked per cell
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CellLevelLock:
    """Output of :func:`lock_cell_levels`.

    Attributes:
        levels: (N,) int8 key level per input Gaussian (its cell's lock after this observation).
        cells: (C',) int64 sorted cell keys (the input table plus the newly seen cells).
        cell_levels: (C',) int8 locked level per cell.
        refined_cells: (R,) int64 sorted keys of already-locked cells whose lock became finer now; the map must
            re-key its coarser Gaussians there (``refined_levels`` = the new locks, (R,) int8).
    """

    levels: torch.Tensor
    cells: torch.Tensor
    cell_levels: torch.Tensor
    refined_cells: torch.Tensor
    refined_levels: torch.Tensor


def lock_cell_levels(means: torch.Tensor, requested: torch.Tensor, cells: torch.Tensor, cell_levels: torch.Tensor,
                     refine_min_levels: int, config: SparsifyConfig) -> CellLevelLock:
    """Per-cell level locking of an incremental map (the policy of :mod:`langgs_ros.fusion`).

    The cell is the level-``max_level`` voxel containing a mean (:func:`cell_keys`). A cell observed for the
    first time is locked at the finest level requested there; a locked cell keeps its level unless this
    observation requests ``refine_min_levels`` levels finer or more, in which case the lock moves to the
    requested level (the cell is *refined*).

    Args:
        means: (N, 3) float positions (m). requested: (N,) int requested level per Gaussian (e.g.
            :func:`voxel_levels` of the view distance).
        cells: (C,) int64 sorted cell keys of the map. cell_levels: (C,) int8 their locks (not modified).
        refine_min_levels: refinement threshold (levels, >= 1).
        config: :class:`SparsifyConfig`.

    Returns:
        :class:`CellLevelLock`.
    """
    dev = means.device
    req = requested.to(torch.int32)  # int32: scatter min is not atomic-safe for int8 on GPUs
    ck = cell_keys(means, config)
    uc, inv = torch.unique(ck, return_inverse=True)
    req_c = torch.full((uc.numel(),), config.max_level, dtype=torch.int32, device=dev)
    req_c = req_c.scatter_reduce(0, inv, req, reduce="amin").to(torch.int8)
    pos, hit = sorted_lookup(cells, uc)
    final = req_c.clone()
    cell_levels = cell_levels.clone()
    refined_cells = torch.zeros(0, dtype=torch.int64, device=dev)
    refined_levels = torch.zeros(0, dtype=torch.int8, device=dev)
    if bool(hit.any()):
        locked = cell_levels[pos[hit]]
        refine = req_c[hit].to(torch.int16) <= locked.to(torch.int16) - refine_min_levels
        final[hit] = torch.where(refine, req_c[hit], locked)
        if bool(refine.any()):
            cell_levels[pos[hit][refine]] = req_c[hit][refine]
            refined_cells, refined_levels = uc[hit][refine], req_c[hit][refine]
    miss = ~hit
    if bool(miss.any()):
        cells, old_pos, new_pos = sorted_insert(cells, uc[miss])
        lv = torch.empty(cells.numel(), dtype=torch.int8, device=dev)
        lv[old_pos] = cell_levels
        lv[new_pos] = req_c[miss]
        cell_levels = lv
    return CellLevelLock(final[inv], cells, cell_levels, refined_cells, refined_levels)


def snapshot_levels(means: torch.Tensor, scales: torch.Tensor, camera_positions: np.ndarray,
                    config: SparsifyConfig) -> torch.Tensor:
    """Levels of stored Gaussians whose levels were not saved (a loaded snapshot).

    From each Gaussian's distance to the nearest recorded camera position (the closest it can have been observed
    from, i.e. the finest level a map would have locked); without cameras from its largest scale
    (``ℓ = round(log2(2√3 · s_max / base))``: a voxel of edge ``a`` filled uniformly has σ ≈ a/√12).

    Args:
        means: (N, 3) float (m). scales: (N, 3) float standard deviations (m). camera_positions: (P, 3) float64.

    Returns:
        (N,) int8 levels in ``[0, max_level]``.
    """
    if len(camera_positions):
        dist, _ = cKDTree(camera_positions).query(means.double().cpu().numpy(), k=1)
        return voxel_levels(torch.as_tensor(dist, dtype=torch.float32, device=means.device), config)
    smax = scales.max(dim=1).values.clamp_min(1e-9)
    lv = torch.round(torch.log2(2 * math.sqrt(3) * smax / config.base_voxel_size))
    return lv.clamp(0, config.max_level).to(torch.int8)


def lock_cells_to_finest(means: torch.Tensor, levels: torch.Tensor, config: SparsifyConfig
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lock each cell to the finest of ``levels`` (N,) found in it.

    Returns:
        ``(levels (N,) int8 = the lock of each Gaussian's cell, cells (C,) int64 sorted, cell_levels (C,) int8)``.
    """
    ck = cell_keys(means, config)
    uc, inv = torch.unique(ck, return_inverse=True)
    cl = torch.full((uc.numel(),), config.max_level, dtype=torch.int32, device=means.device)
    cl = cl.scatter_reduce(0, inv, levels.to(torch.int32), reduce="amin").to(torch.int8)
    return cl[inv], uc, cl
