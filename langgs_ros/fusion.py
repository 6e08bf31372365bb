"""Incremental fusion of per-frame semantic Gaussians into a bounded, instance-level language map.

Pipeline per frame (:meth:`SemanticGaussianMap.integrate`):

1. **Association** (ConceptGraphs, Gu et al. ICRA 2024, §III-B): every segment of the frame with at least
   ``min_segment_points`` Gaussians is compared with every map instance by
   ``sim = w_geo · overlap + w_sem · (1 + cos) / 2`` where ``overlap`` is the fraction of the segment's
   occupied voxels (edge ``assoc_voxel_size``) that the instance already occupies and ``cos`` the cosine of the
   two unit embeddings. The best instance with ``overlap >= min_overlap`` and ``sim >= sim_threshold`` absorbs
   the segment; otherwise a new instance is created. Instance embeddings are running means over observations
   (ConceptGraphs' detection-count average), re-normalised to unit length.
2. **Relabelling** of the frame's Gaussians from segment-local ids to map instance ids (-1 stays -1).
3. **Hierarchical sparsification** (FLEG, arXiv 2512.17541): the level from the distance to this frame's
   camera (:mod:`langgs_ros.sparsify`), with one level *locked per cell* (the level-``max_level`` voxel): a
   cell keeps the level of its first observation; observing a region again from farther away reuses its fine
   keys (no duplicate coarse copy), and observing it from (``refine_min_levels``) levels closer refines it,
   re-keying the cell's coarser map Gaussians at the new level (they merge into the fine voxels containing
   their means). Their old coarse keys stay in the index as **aliases** of the rows they went into.
4. **Map merge**: the map is a hash of Gaussians keyed like :func:`~langgs_ros.sparsify.voxel_keys`; a merged
   frame Gaussian whose key exists is moment-matched into the map Gaussian (weights = accumulated Σw, so the
   result equals merging all original observations at once); new keys are inserted. A frame Gaussian seen
   from farther than its cell's lock (requested level coarser than the key level) whose fine key is absent
   first looks up the keys of its mean at the coarser levels: an alias hit means the region was already
   observed at that resolution before the cell was refined, and the Gaussian merges into the aliased row.
   Without this, a revisit of the frames that saw a cell before its refinement filled the fine voxels that
   their (re-keyed) coarse Gaussians already covered: +13 % on a second pass over the 84 hololens training
   frames, 99 % of it in the cells refined during the first pass. Re-observing an area hence does not grow
   the map (+0.003 % there).

After the frames of one call: instances that turn out to be the same (voxel overlap ≥ ``merge_overlap`` of the
smaller one and embedding cosine ≥ ``merge_min_cos``; ConceptGraphs' periodic merge) are merged (union-find,
the oldest id survives, Gaussians re-keyed); the map is bounded by ``max_gaussians`` (eviction below);
centroids, gravity-aligned boxes (:func:`langgs_ros.geometry.fit_gravity_aligned_box`), Gaussian counts and
the floor height are updated.

**Eviction policy** (when the map exceeds ``max_gaussians``): the Gaussians with the lowest score
``evidence × opacity × boost × 0.5^(age / eviction_half_life)`` are removed until
``evict_to_fraction × max_gaussians`` remain, where ``evidence = weight / (π s_a s_b)`` is the accumulated
merge weight (Σ opacity × pixel-footprint area) per unit of the Gaussian's own area — roughly how many times
its surface was observed, independent of its size/level (raw ``weight × opacity`` would always evict fine
near-range Gaussians before coarse ones) — ``age`` = integrated frames since it was last observed, and
``boost = eviction_instance_boost`` for Gaussians of object instances (1 for background). Rarely seen, faint,
long-unseen background goes first; instances left without Gaussians are removed.

**Memory**: stored per Gaussian (the snapshot / persisted layout): means, quats, scales, colors, opacity,
weight as float32 and the instance id as int32 = 64 bytes (3DGS with SH degree 3 stores 248 B). The runtime
adds a level (int8), a last-seen counter (int32) and the sorted key index (int64 key + int64 row) = 85 bytes,
plus 16 bytes per alias key (one per Gaussian re-keyed by a refinement; ~1.5 % of the map on hololens).
Semantics are stored per instance (FLEG's instance-level embeddings), not per Gaussian.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.spatial import cKDTree

from langgs_ros.geometry import fit_gravity_aligned_box, normalize_up, quat_to_rotmat
from langgs_ros.sparsify import (
    MAX_OCC_INSTANCE,
    SparsifyConfig,
    cell_keys,
    merge_by_inverse,
    occupancy_instance_part,
    occupancy_keys,
    occupancy_voxel_part,
    sparsify_with_keys,
    voxel_keys,
    voxel_levels,
)
from langgs_ros.types import NO_INSTANCE, FrameSegmentation, Gaussians, InstanceTable, MapSnapshot

__all__ = ["FusionConfig", "IntegrationStats", "SemanticGaussianMap", "estimate_floor_height"]

_OCC_LOW = (1 << 20) - 1


@dataclass
class FusionConfig:
    """Parameters of :class:`SemanticGaussianMap`.

    Attributes:
        assoc_voxel_size: edge (m) of the occupancy voxels used to measure 3D overlap.
        w_geo: weight of the geometric overlap in the association similarity.
        w_sem: weight of the semantic similarity ``(1 + cos) / 2``.
        sim_threshold: minimum similarity to associate (ConceptGraphs uses 1.1 with unit weights: a perfect
            semantic match still needs 10 % overlap).
        min_overlap: minimum overlap to associate at all (different objects of one class never merge).
        min_segment_points: segments with fewer Gaussians in a frame are treated as background (-1).
        merge_overlap: instances are merged when their shared voxels reach this fraction of the smaller one's ...
        merge_min_cos: ... and their embeddings' cosine is at least this.
        max_gaussians: map size bound (eviction above it).
        evict_to_fraction: eviction removes down to this fraction of ``max_gaussians`` (hysteresis).
        eviction_half_life: age (in integrated frames) that halves a Gaussian's eviction score.
        eviction_instance_boost: eviction-score factor of Gaussians that belong to an object instance (objects
            are what queries are about; background goes first).
        box_trim_percent: percentile trimming of instance boxes (each end, each axis).
        camera_spacing: camera positions closer than this (m) to a recorded one are not recorded again.
        max_camera_positions: cap on recorded camera positions (oldest dropped).
        floor_normal_cos: a Gaussian is a horizontal-surface candidate for the floor if its normal (smallest
            axis) has ``|n · up| >=`` this.
        floor_bin: histogram bin (m) of the floor estimate.
        floor_min_fraction: the floor is the lowest height bin of horizontal surfaces holding at least this
            fraction of the heaviest bin's mass.
        nominal_camera_height: camera height above the floor (m) used when no floor is visible; ``None`` = use
            the lowest map heights instead.
        refine_min_levels: a cell locked at level ``ℓ`` is refined (re-keyed at the finer level) only when it is
            observed at level ``ℓ − refine_min_levels`` or finer. 1 = always keep the finest level seen (most
            detail, more Gaussians); 2 (default) refines only on 4x finer views; a large value never refines
            (regions stay as coarse as first seen). Revisits do not grow the map in either case (alias keys,
            see the module docstring).
    """

    assoc_voxel_size: float = 0.05
    w_geo: float = 1.0
    w_sem: float = 1.0
    sim_threshold: float = 1.1
    min_overlap: float = 0.05
    min_segment_points: int = 50
    merge_overlap: float = 0.6
    merge_min_cos: float = 0.75
    max_gaussians: int = 2_000_000
    evict_to_fraction: float = 0.9
    eviction_half_life: float = 200.0
    eviction_instance_boost: float = 4.0
    box_trim_percent: float = 2.0
    camera_spacing: float = 0.05
    max_camera_positions: int = 20_000
    floor_normal_cos: float = 0.9
    floor_bin: float = 0.02
    floor_min_fraction: float = 0.2
    nominal_camera_height: float | None = None
    refine_min_levels: int = 2

    def validate(self) -> None:
        """Raise ``ValueError`` on inconsistent settings."""
        if self.assoc_voxel_size <= 0 or self.floor_bin <= 0:
            raise ValueError("assoc_voxel_size and floor_bin must be > 0")
        if self.max_gaussians < 1 or not (0 < self.evict_to_fraction <= 1):
            raise ValueError("max_gaussians must be >= 1 and evict_to_fraction in (0, 1]")
        if self.eviction_half_life <= 0 or self.min_segment_points < 1:
            raise ValueError("eviction_half_life must be > 0 and min_segment_points >= 1")
        if not (0 <= self.box_trim_percent < 50):
            raise ValueError("box_trim_percent must be in [0, 50)")
        if self.refine_min_levels < 1:
            raise ValueError("refine_min_levels must be >= 1")


@dataclass
class IntegrationStats:
    """What one :meth:`SemanticGaussianMap.integrate` call did.

    Attributes:
        frames: frames integrated.
        input_gaussians: pixel Gaussians received.
        sparsified_gaussians: Gaussians after per-frame sparsification (before the map merge).
        inserted_gaussians: new map Gaussians (keys not yet in the map).
        merged_gaussians: frame Gaussians merged into existing map Gaussians.
        evicted_gaussians: removed by the size bound.
        num_gaussians: map size after the call.
        segments: segments considered (enough points); associated / new_instances split them.
        associated: segments merged into existing instances.
        new_instances: instances created.
        merged_instances: instances absorbed by others.
        num_instances: instances after the call.
        seconds: wall time of the call.
    """

    frames: int = 0
    input_gaussians: int = 0
    sparsified_gaussians: int = 0
    inserted_gaussians: int = 0
    merged_gaussians: int = 0
    evicted_gaussians: int = 0
    num_gaussians: int = 0
    segments: int = 0
    associated: int = 0
    new_instances: int = 0
    merged_instances: int = 0
    num_instances: int = 0
    seconds: float = 0.0


@dataclass
class _Instance:
    id: int
    embedding: torch.Tensor  # (D,) CPU float32 unit
    observations: float = 0.0
    names: Counter = field(default_factory=Counter)
    center: np.ndarray = field(default_factory=lambda: np.zeros(3))
    size: np.ndarray = field(default_factory=lambda: np.zeros(3))
    yaw: float = 0.0
    num_gaussians: int = 0
    last_seen: int = 0

    @property
    def name(self) -> str | None:
        return self.names.most_common(1)[0][0] if self.names else None


def _sorted_insert(sorted_arr: torch.Tensor, new_sorted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """Merge sorted ``new_sorted`` (values absent from ``sorted_arr``) into the sorted array.

    Returns ``(merged, positions of the old entries, positions of the new entries)`` in ``merged``.
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


def _lookup(sorted_keys: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of ``keys`` in ``sorted_keys`` and a hit mask."""
    if sorted_keys.numel() == 0:
        return torch.zeros_like(keys), torch.zeros(keys.shape, dtype=torch.bool, device=keys.device)
    pos = torch.searchsorted(sorted_keys, keys)
    pc = pos.clamp(max=sorted_keys.numel() - 1)
    return pc, (pos < sorted_keys.numel()) & (sorted_keys[pc] == keys)


def estimate_floor_height(
    means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, weights: torch.Tensor, up: np.ndarray,
    camera_heights: np.ndarray | None = None, config: FusionConfig | None = None,
) -> float | None:
    """Robust floor height along ``up`` from a map's Gaussians.

    Horizontal-surface Gaussians (normal = the axis of the smallest scale, ``|n · up| >= floor_normal_cos``)
    are histogrammed by height (bin ``floor_bin``, weighted by merge weight); the floor is the lowest bin
    holding at least ``floor_min_fraction`` of the heaviest bin's mass, refined to the weighted mean height
    within ±1 bin. It must lie below every camera (``camera_heights``); if no such surface exists, falls back to
    ``median(camera_heights) − nominal_camera_height`` when configured, else the 1st percentile of all heights.

    Args:
        means/quats/scales/weights: map Gaussians (N, ...) on any device.
        up: (3,) unit up vector. camera_heights: (P,) ``up · c`` of visited camera centres.

    Returns:
        Floor height ``up · p`` (m), or ``None`` for an empty map without cameras.
    """
    cfg = config or FusionConfig()
    cam_h = None if camera_heights is None or len(camera_heights) == 0 else np.asarray(camera_heights)
    if means.shape[0] == 0:
        if cam_h is not None and cfg.nominal_camera_height is not None:
            return float(np.median(cam_h) - cfg.nominal_camera_height)
        return None
    # Deterministic subsample for bounded cost on large maps.
    step = max(1, means.shape[0] // 200_000)
    m, q, s, w = means[::step].float(), quats[::step].float(), scales[::step].float(), weights[::step].float()
    u = torch.as_tensor(up, dtype=torch.float32, device=m.device)
    h = m @ u
    R = quat_to_rotmat(q)
    axis = s.argmin(dim=1)
    n = torch.gather(R, 2, axis[:, None, None].expand(-1, 3, 1)).squeeze(2)
    horiz = (n @ u).abs() >= cfg.floor_normal_cos
    if cam_h is not None:
        horiz &= h < float(cam_h.min()) - 0.05
    if bool(horiz.any()):
        hh, ww = h[horiz].double().cpu().numpy(), w[horiz].double().cpu().numpy()
        lo = hh.min()
        nb = int(np.floor((hh.max() - lo) / cfg.floor_bin)) + 1
        b = np.minimum(((hh - lo) / cfg.floor_bin).astype(np.int64), nb - 1)
        mass = np.bincount(b, weights=ww, minlength=nb)
        k = int(np.nonzero(mass >= cfg.floor_min_fraction * mass.max())[0][0])
        sel = np.abs(b - k) <= 1
        return float(np.average(hh[sel], weights=ww[sel]))
    if cam_h is not None and cfg.nominal_camera_height is not None:
        return float(np.median(cam_h) - cfg.nominal_camera_height)
    return float(torch.quantile(h[: min(h.numel(), 1_000_000)].double(), 0.01))


class SemanticGaussianMap:
    """A bounded 3D Gaussian map with instance-level language embeddings (see the module docstring).

    Args:
        encoder_id: embedding space of the instance embeddings (:attr:`TextEncoder.encoder_id`).
        embedding_dim: D.
        config: :class:`FusionConfig`.
        sparsify_config: :class:`~langgs_ros.sparsify.SparsifyConfig`.
        up: unit gravity-up of the map frame (REP-103 ``map``: ``(0, 0, 1)``).
        device: where the Gaussians live and fusion runs (``"cpu"`` or ``"cuda[:k]"``).
        frame_id: name of the map frame.

    Thread safety: :meth:`integrate`, :meth:`snapshot` and :meth:`reset` serialise on an internal lock, so a
    reader thread may take snapshots while another integrates.

    Raises:
        ValueError: bad configuration, dimension or ``up``.
    """

    def __init__(self, encoder_id: str, embedding_dim: int, config: FusionConfig | None = None,
                 sparsify_config: SparsifyConfig | None = None, up: Sequence[float] | np.ndarray = (0.0, 0.0, 1.0),
                 device: torch.device | str = "cpu", frame_id: str = "map") -> None:
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.encoder_id = str(encoder_id)
        self.embedding_dim = int(embedding_dim)
        self.config = config or FusionConfig()
        self.config.validate()
        self.sparsify_config = sparsify_config or SparsifyConfig()
        self.sparsify_config.validate()
        self.up = normalize_up(up)
        self.device = torch.device(device)
        self.frame_id = frame_id
        self._lock = threading.RLock()
        self.reset()

    # ------------------------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty the map (Gaussians, instances, cameras, floor); the version keeps increasing."""
        with self._lock:
            dev = self.device
            f = dict(dtype=torch.float32, device=dev)
            self._M = 0
            self._means = torch.zeros(0, 3, **f)
            self._quats = torch.zeros(0, 4, **f)
            self._scales = torch.zeros(0, 3, **f)
            self._colors = torch.zeros(0, 3, **f)
            self._opac = torch.zeros(0, **f)
            self._weights = torch.zeros(0, **f)
            self._inst = torch.zeros(0, dtype=torch.int32, device=dev)
            self._levels = torch.zeros(0, dtype=torch.int8, device=dev)
            self._seen = torch.zeros(0, dtype=torch.int32, device=dev)
            self._keys = torch.zeros(0, dtype=torch.int64, device=dev)  # sorted
            self._rows = torch.zeros(0, dtype=torch.int64, device=dev)  # row of each sorted key
            self._cells = torch.zeros(0, dtype=torch.int64, device=dev)  # sorted cell keys
            self._cell_levels = torch.zeros(0, dtype=torch.int8, device=dev)
            self._occ = torch.zeros(0, dtype=torch.int64, device=dev)  # sorted unique occupancy keys
            self._instances: dict[int, _Instance] = {}
            self._next_id = 0
            self._cameras = np.zeros((0, 3))
            self._floor: float | None = None
            self._frame_counter = 0
            self._stamp = 0.0
            self._version = getattr(self, "_version", 0) + 1
            self._snapshot_cache: MapSnapshot | None = None

    @property
    def num_gaussians(self) -> int:
        """Number of map Gaussians."""
        return self._M

    @property
    def num_instances(self) -> int:
        """Number of object instances."""
        return len(self._instances)

    @property
    def version(self) -> int:
        """Increments with each update."""
        return self._version

    @property
    def floor_height(self) -> float | None:
        """Current floor height estimate along ``up`` (m), ``None`` before any data."""
        return self._floor

    @property
    def camera_positions(self) -> np.ndarray:
        """(P, 3) float64 recorded camera centres (map frame)."""
        return self._cameras.copy()

    def memory_bytes(self) -> dict[str, float]:
        """Memory accounting.

        Returns:
            ``stored_per_gaussian`` (bytes of the snapshot layout per Gaussian), ``runtime_per_gaussian``
            (including level, last-seen and the key index), ``instance_bytes`` (embeddings etc.) and ``total``.
        """
        stored = sum(t.element_size() * (t[0].numel() if t.ndim > 1 else 1) for t in
                     (self._means, self._quats, self._scales, self._colors, self._opac, self._weights, self._inst))
        runtime = stored + self._levels.element_size() + self._seen.element_size() + \
            self._keys.element_size() + self._rows.element_size()
        inst = self.num_instances * (self.embedding_dim * 4 + 8 * 9)
        aliases = (self._keys.element_size() + self._rows.element_size()) * (self._keys.numel() - self._M)
        return {"stored_per_gaussian": float(stored), "runtime_per_gaussian": float(runtime),
                "instance_bytes": float(inst), "total": float(runtime * self._M + inst + 8 * self._occ.numel()
                                                              + 9 * self._cells.numel() + aliases)}

    # ------------------------------------------------------------------------------------------------------------
    # Integration
    # ------------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def integrate(self, frame_gaussians: Sequence[Gaussians], segmentations: Sequence[FrameSegmentation] | None,
                  world_from_camera: torch.Tensor | np.ndarray, stamp: float) -> IntegrationStats:
        """Fuse one window of frames into the map.

        Args:
            frame_gaussians: S per-frame pixel Gaussians in the map frame, ``instance_ids`` = the frame
                segmentation's local ids (``-1`` none), e.g. from :func:`~langgs_ros.gaussians.gaussians_from_window`
                (``weights``, if set, are used as merge weights, e.g. for pre-merged Gaussians).
            segmentations: ``None`` (geometry only, everything background) or S segmentations whose embeddings
                (K_i, D) give each local id's embedding.
            world_from_camera: (S, 4, 4) camera-to-map poses of the frames (camera centres are recorded and set
                the view distance of the hierarchical sparsification).
            stamp: time of the newest frame, seconds.

        Returns:
            :class:`IntegrationStats`.

        Raises:
            ValueError: length mismatches, embedding dimension ≠ D, local ids outside ``[-1, K_i)``, inconsistent
                or non-finite Gaussians, or non-finite poses. The map is unchanged when this is raised.
        """
        t0 = time.perf_counter()
        S = len(frame_gaussians)
        T = torch.as_tensor(np.asarray(world_from_camera) if not isinstance(world_from_camera, torch.Tensor)
                            else world_from_camera).to(torch.float64).cpu()
        if T.shape != (S, 4, 4):
            raise ValueError(f"world_from_camera must be ({S}, 4, 4) for {S} frames, got {tuple(T.shape)}")
        if not bool(torch.isfinite(T).all()):
            raise ValueError("world_from_camera contains non-finite values")
        if segmentations is not None and len(segmentations) != S:
            raise ValueError(f"got {len(segmentations)} segmentations for {S} frames")
        for i in range(S):
            g = frame_gaussians[i]
            if segmentations is not None:
                seg = segmentations[i]
                if seg.embeddings.ndim != 2 or (seg.num_instances > 0 and seg.embeddings.shape[1] !=
                                                self.embedding_dim):
                    raise ValueError(f"frame {i}: embeddings must be (K, {self.embedding_dim}), "
                                     f"got {tuple(seg.embeddings.shape)}")
                if len(g) and int(g.instance_ids.max()) >= seg.num_instances:
                    raise ValueError(f"frame {i}: instance id {int(g.instance_ids.max())} >= K = {seg.num_instances}")
            if len(g) and int(g.instance_ids.min()) < NO_INSTANCE:
                raise ValueError(f"frame {i}: instance ids must be >= -1")
            n = len(g)
            if (g.quats.shape != (n, 4) or g.scales.shape != (n, 3) or g.opacities.shape != (n,)
                    or g.colors.shape != (n, 3) or g.instance_ids.shape != (n,)):
                raise ValueError(f"frame {i}: inconsistent Gaussian tensor shapes")
            if n and not bool(torch.isfinite(g.means).all() & torch.isfinite(g.scales).all()
                              & torch.isfinite(g.quats).all()):
                raise ValueError(f"frame {i}: non-finite Gaussian means/scales/quats")
        stats = IntegrationStats(frames=S)
        with self._lock:
            touched: set[int] = set()
            for i in range(S):
                self._frame_counter += 1
                cam = T[i, :3, 3].numpy()
                self._record_camera(cam)
                g = frame_gaussians[i].to(self.device)
                stats.input_gaussians += len(g)
                if len(g) == 0:
                    continue
                seg = segmentations[i] if segmentations is not None else None
                g = self._associate_and_relabel(g, seg, stats, touched)
                dist = (g.means - torch.as_tensor(cam, dtype=torch.float32, device=self.device)).norm(dim=1)
                levels, requested = self._levels_for(g.means, dist)
                res = sparsify_with_keys(g, levels, self.sparsify_config)
                stats.sparsified_gaussians += len(res.gaussians)
                # A merged Gaussian is a coarse view of its voxel when all its pixels asked for a coarser level
                # than the cell's lock (the frame sees the region from farther than the map resolution there).
                req = torch.full((len(res.gaussians),), self.sparsify_config.max_level, dtype=torch.int32,
                                 device=self.device).scatter_reduce_(0, res.inverse, requested, reduce="amin")
                ins, mer, _ = self._insert(res.gaussians, res.keys, res.levels,
                                           coarse_view=req > res.levels.to(torch.int32))
                stats.inserted_gaussians += ins
                stats.merged_gaussians += mer
                self._add_occupancy(g.means, g.instance_ids)
            stats.merged_instances = self._merge_duplicate_instances(touched)
            stats.evicted_gaussians = self._evict_if_needed(touched)
            self._update_instances(touched)
            self._floor = estimate_floor_height(
                self._means[: self._M], self._quats[: self._M], self._scales[: self._M], self._weights[: self._M],
                self.up, self._cameras @ self.up if len(self._cameras) else None, self.config)
            self._stamp = float(stamp)
            self._version += 1
            self._snapshot_cache = None
            stats.num_gaussians = self._M
            stats.num_instances = len(self._instances)
        stats.seconds = time.perf_counter() - t0
        return stats

    def _record_camera(self, c: np.ndarray) -> None:
        if not np.all(np.isfinite(c)):
            return
        cams = self._cameras
        if len(cams) and np.min(np.linalg.norm(cams[-2000:] - c, axis=1)) < self.config.camera_spacing:
            return
        cams = np.vstack((cams, c[None]))
        self._cameras = cams[-self.config.max_camera_positions:]

    # --- association ------------------------------------------------------------------------------------------
    def _instance_rows(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Current instance ids, their (K, D) embeddings and an id -> row lookup tensor on the device."""
        ids = sorted(self._instances)
        emb = (torch.stack([self._instances[i].embedding for i in ids]) if ids
               else torch.zeros(0, self.embedding_dim))
        lut = torch.full((self._next_id + 1,), -1, dtype=torch.int64, device=self.device)
        if ids:
            lut[torch.tensor(ids, device=self.device)] = torch.arange(len(ids), device=self.device)
        return ids, emb, lut

    def _associate_and_relabel(self, g: Gaussians, seg: FrameSegmentation | None, stats: IntegrationStats,
                               touched: set[int]) -> Gaussians:
        cfg = self.config
        dev = self.device
        K = 0 if seg is None else seg.num_instances
        local = g.instance_ids.to(torch.int64)
        if K == 0:
            return Gaussians(g.means, g.quats, g.scales, g.opacities, g.colors,
                             torch.full_like(g.instance_ids, NO_INSTANCE), g.weights)
        counts = torch.bincount(local[local >= 0], minlength=K)
        eligible = counts >= cfg.min_segment_points
        to_map = torch.full((K + 1,), NO_INSTANCE, dtype=torch.int64, device=dev)  # index = local + 1
        seg_ids = eligible.nonzero().squeeze(1).tolist()
        if seg_ids:
            sel = (local >= 0) & eligible[local.clamp_min(0)]
            okeys = torch.unique(occupancy_keys(g.means[sel], local[sel], cfg.assoc_voxel_size))
            seg_of = occupancy_instance_part(okeys)
            nvox = torch.bincount(seg_of, minlength=K).to(torch.float32)
            ids, emb, lut = self._instance_rows()
            Kmap = len(ids)
            overlap = torch.zeros(K, max(Kmap, 1), device=dev)
            if Kmap and self._occ.numel():
                vox = occupancy_voxel_part(okeys)
                lo = torch.searchsorted(self._occ, vox)
                hi = torch.searchsorted(self._occ, vox | _OCC_LOW, right=True)
                n = hi - lo
                tot = int(n.sum())
                if tot:
                    rep_seg = torch.repeat_interleave(seg_of, n)
                    start = torch.repeat_interleave(lo - (torch.cumsum(n, 0) - n), n)
                    entries = start + torch.arange(tot, device=dev)
                    rows = lut[occupancy_instance_part(self._occ[entries])]
                    ok = rows >= 0
                    overlap.index_put_((rep_seg[ok], rows[ok]), torch.ones(int(ok.sum()), device=dev),
                                       accumulate=True)
                    overlap /= nvox.clamp_min(1)[:, None]
            overlap_c = overlap.cpu()
            seg_emb = seg.embeddings.detach().float().cpu()
            seg_emb = seg_emb / seg_emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
            cos = seg_emb @ emb.T if Kmap else torch.zeros(K, 1)
            sim = cfg.w_geo * overlap_c[:, :max(Kmap, 1)] + cfg.w_sem * (1 + cos) / 2
            sim = torch.where(overlap_c[:, :max(Kmap, 1)] >= cfg.min_overlap, sim, torch.full_like(sim, -math.inf))
            for k in seg_ids:
                stats.segments += 1
                name = seg.names[k] if k < len(seg.names) else None
                best = int(sim[k].argmax()) if Kmap else -1
                if Kmap and float(sim[k, best]) >= cfg.sim_threshold:
                    inst = self._instances[ids[best]]
                    e = inst.embedding * inst.observations + seg_emb[k]
                    inst.embedding = e / e.norm().clamp_min(1e-12)
                    inst.observations += 1.0
                    stats.associated += 1
                else:
                    if self._next_id > MAX_OCC_INSTANCE:
                        raise RuntimeError(f"more than {MAX_OCC_INSTANCE} instance ids used; reset the map")
                    inst = _Instance(id=self._next_id, embedding=seg_emb[k].clone(), observations=1.0)
                    self._instances[inst.id] = inst
                    self._next_id += 1
                    stats.new_instances += 1
                if name:
                    inst.names[name] += 1
                inst.last_seen = self._frame_counter
                touched.add(inst.id)
                to_map[k + 1] = inst.id
        new_ids = to_map[local + 1].to(torch.int32)
        return Gaussians(g.means, g.quats, g.scales, g.opacities, g.colors, new_ids, g.weights)

    def _add_occupancy(self, means: torch.Tensor, inst: torch.Tensor) -> None:
        sel = inst >= 0
        if not bool(sel.any()):
            return
        k = torch.unique(occupancy_keys(means[sel], inst[sel], self.config.assoc_voxel_size))
        _, hit = _lookup(self._occ, k)
        if bool((~hit).any()):
            self._occ, _, _ = _sorted_insert(self._occ, k[~hit])

    # --- levels -----------------------------------------------------------------------------------------------
    def _levels_for(self, means: torch.Tensor, dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-Gaussian key level (the cell's locked level, refined first where this view is
        ``refine_min_levels`` finer) and the requested (view-distance) level, both (N,) (int8, int32)."""
        cfg = self.sparsify_config
        req = voxel_levels(dist, cfg).to(torch.int32)  # int32: scatter min is not atomic-safe for int8 on GPUs
        ck = cell_keys(means, cfg)
        uc, inv = torch.unique(ck, return_inverse=True)
        req_c = torch.full((uc.numel(),), cfg.max_level, dtype=torch.int32, device=self.device)
        req_c = req_c.scatter_reduce(0, inv, req, reduce="amin").to(torch.int8)
        pos, hit = _lookup(self._cells, uc)
        final = req_c.clone()
        if bool(hit.any()):
            locked = self._cell_levels[pos[hit]]
            refine = req_c[hit].to(torch.int16) <= locked.to(torch.int16) - self.config.refine_min_levels
            final[hit] = torch.where(refine, req_c[hit], locked)
            if bool(refine.any()):
                hp = pos[hit][refine]
                self._cell_levels[hp] = req_c[hit][refine]
                self._refine_cells(uc[hit][refine], req_c[hit][refine])
        miss = ~hit
        if bool(miss.any()):
            newc = uc[miss]
            self._cells, old_pos, new_pos = _sorted_insert(self._cells, newc)
            lv = torch.empty(self._cells.numel(), dtype=torch.int8, device=self.device)
            lv[old_pos] = self._cell_levels
            lv[new_pos] = req_c[miss]
            self._cell_levels = lv
        return final[inv], req

    def _refine_cells(self, cells: torch.Tensor, levels: torch.Tensor) -> None:
        """Re-key the map Gaussians of ``cells`` (sorted) that are coarser than the cells' new ``levels``."""
        M = self._M
        cand = (self._levels[:M] > 0).nonzero().squeeze(1)
        if cand.numel() == 0:
            return
        ck = cell_keys(self._means[cand], self.sparsify_config)
        pos, hit = _lookup(cells, ck)
        cand, pos = cand[hit], pos[hit]
        coarse = self._levels[cand] > levels[pos]
        rows = cand[coarse]
        if rows.numel():
            self._rekey(rows, new_levels=levels[pos[coarse]], keep_aliases=True)

    # --- map storage ------------------------------------------------------------------------------------------
    def _ensure_capacity(self, n: int) -> None:
        cap = self._means.shape[0]
        if n <= cap:
            return
        new_cap = max(n, int(cap * 1.5) + 1024)

        def grow(t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros((new_cap, *t.shape[1:]), dtype=t.dtype, device=t.device)
            out[: self._M] = t[: self._M]
            return out

        for name in ("_means", "_quats", "_scales", "_colors", "_opac", "_weights", "_inst", "_levels", "_seen"):
            setattr(self, name, grow(getattr(self, name)))

    def _rows_gaussians(self, rows: torch.Tensor) -> Gaussians:
        return Gaussians(self._means[rows], self._quats[rows], self._scales[rows], self._opac[rows],
                         self._colors[rows], self._inst[rows], weights=self._weights[rows])

    def _write_rows(self, rows: torch.Tensor, g: Gaussians) -> None:
        self._means[rows] = g.means
        self._quats[rows] = g.quats
        self._scales[rows] = g.scales
        self._opac[rows] = g.opacities
        self._colors[rows] = g.colors
        self._inst[rows] = g.instance_ids
        self._weights[rows] = g.weights  # type: ignore[assignment]

    def _insert(self, g: Gaussians, keys: torch.Tensor, levels: torch.Tensor,
                coarse_view: torch.Tensor | None = None) -> tuple[int, int, torch.Tensor]:
        """Merge keyed Gaussians (unique sorted ``keys``, ``g.weights`` set) into the map.

        A Gaussian whose key is absent but which is flagged in ``coarse_view`` (observed from farther than the
        resolution its cell is locked at) is merged into the map Gaussian that an *alias key* at a coarser level
        of its mean points to, the finest such level first (see :meth:`_rekey`): the region was observed at that
        coarse level before its cell was refined, and that observation now lives in the aliased Gaussian.

        Returns ``(inserted, merged, rows)``: counts and the (n,) map row each input Gaussian ended up in.
        """
        n = len(g)
        dev = self.device
        if n == 0:
            return 0, 0, torch.zeros(0, dtype=torch.int64, device=dev)
        pos, hit = _lookup(self._keys, keys)
        dest = torch.full((n,), -1, dtype=torch.int64, device=dev)
        dest[hit] = self._rows[pos[hit]]
        if coarse_view is not None and self._M and bool((cv := coarse_view & ~hit).any()):
            cand = cv.nonzero().squeeze(1)
            cfg = self.sparsify_config
            lv_c = levels[cand].to(torch.int32)
            for lvl in range(int(lv_c.min()) + 1, cfg.max_level + 1):
                c = cand[lv_c < lvl]
                if c.numel() == 0:
                    continue
                ak = voxel_keys(g.means[c], torch.full((c.numel(),), lvl, device=dev), g.instance_ids[c], cfg)
                apos, ahit = _lookup(self._keys, ak)
                dest[c[ahit]] = self._rows[apos[ahit]]
                keep = dest[cand] < 0
                cand, lv_c = cand[keep], lv_c[keep]
            hit = dest >= 0
        nh = int(hit.sum())
        if nh:
            hidx = hit.nonzero().squeeze(1)
            rows, inv = torch.unique(dest[hidx], return_inverse=True)
            old = self._rows_gaussians(rows)
            both = Gaussians.cat([old, g.select(hit)])
            inv = torch.cat((torch.arange(rows.numel(), device=dev), inv))
            merged = merge_by_inverse(both, both.weights, inv, int(rows.numel()),  # type: ignore[arg-type]
                                      self.sparsify_config.min_scale)
            self._write_rows(rows, merged)
            self._seen[rows] = self._frame_counter
        miss = ~hit
        m = n - nh
        if m:
            M = self._M
            self._ensure_capacity(M + m)
            new_rows = torch.arange(M, M + m, device=dev)
            self._write_rows(new_rows, g.select(miss))
            self._levels[new_rows] = levels[miss].to(torch.int8)
            self._seen[new_rows] = self._frame_counter
            self._M = M + m
            self._index_add(keys[miss], new_rows)
            dest[miss] = new_rows
        return m, nh, dest

    def _index_add(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Add ``keys`` (sorted, unique, absent from the index) pointing to map ``rows``."""
        M = self._keys.numel()
        self._keys, old_pos, new_pos = _sorted_insert(self._keys, keys)
        r = torch.empty(M + keys.numel(), dtype=torch.int64, device=self.device)
        r[old_pos] = self._rows
        r[new_pos] = rows
        self._rows = r

    def _remove_rows(self, rows: torch.Tensor) -> tuple[Gaussians, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
        """Remove map rows (compacting storage and index).

        Returns their Gaussians, levels, last-seen counters, and the index keys that pointed to them (own keys
        and aliases) with the position in ``rows`` of the row each key pointed to.
        """
        M = self._M
        g = self._rows_gaussians(rows)
        lv, seen = self._levels[rows].clone(), self._seen[rows].clone()
        keep = torch.ones(M, dtype=torch.bool, device=self.device)
        keep[rows] = False
        new_index = torch.cumsum(keep.to(torch.int64), 0) - 1
        kr = keep.nonzero().squeeze(1)
        for name in ("_means", "_quats", "_scales", "_colors", "_opac", "_weights", "_inst", "_levels", "_seen"):
            t = getattr(self, name)
            t[: kr.numel()] = t[kr]
        self._M = int(kr.numel())
        ki = keep[self._rows]
        lut = torch.full((M,), -1, dtype=torch.int64, device=self.device)
        lut[rows] = torch.arange(rows.numel(), device=self.device)
        gone_keys, gone_of = self._keys[~ki], lut[self._rows[~ki]]
        self._keys = self._keys[ki]
        self._rows = new_index[self._rows[ki]]
        return g, lv, seen, gone_keys, gone_of

    def _rekey(self, rows: torch.Tensor, new_levels: torch.Tensor | None = None,
               new_inst: torch.Tensor | None = None, keep_aliases: bool = False) -> None:
        """Take rows out, change level and/or instance, and merge them back by their new keys.

        With ``keep_aliases`` every index key that pointed to a moved row (its old key and older aliases) is
        kept as an *alias* pointing to the row the Gaussian was merged into. Used on cell refinement: frames
        that saw the cell before it was refined merged their pixels under the old coarse keys; when such a
        coarse view is integrated again (revisit), its pixels whose fine keys are absent find the coarse
        observation through the alias (:meth:`_insert`) instead of filling fine voxels that the coarse
        observation already covers (which grew the map by ~13 % on a second pass over the hololens sequence).
        """
        g, lv, _, gone_keys, gone_of = self._remove_rows(rows)
        if new_levels is not None:
            lv = new_levels.to(torch.int8)
        if new_inst is not None:
            g = Gaussians(g.means, g.quats, g.scales, g.opacities, g.colors, new_inst.to(torch.int32), g.weights)
        keys = voxel_keys(g.means, lv, g.instance_ids, self.sparsify_config)
        uk, inv = torch.unique(keys, return_inverse=True)
        merged = merge_by_inverse(g, g.weights, inv, int(uk.numel()), self.sparsify_config.min_scale)  # type: ignore
        ulv = torch.zeros(uk.numel(), dtype=torch.int8, device=self.device).scatter_(0, inv, lv)
        _, _, dest = self._insert(merged, uk, ulv)
        if keep_aliases and gone_keys.numel():
            _, present = _lookup(self._keys, gone_keys)
            ak, arow = gone_keys[~present], dest[inv[gone_of[~present]]]
            if ak.numel():
                order = torch.argsort(ak)
                self._index_add(ak[order], arow[order])

    # --- instance maintenance ---------------------------------------------------------------------------------
    def _merge_duplicate_instances(self, touched: set[int]) -> int:
        """Merge instance pairs with large voxel overlap and similar embeddings (union-find, oldest id wins)."""
        cfg = self.config
        occ = self._occ
        if len(self._instances) < 2 or occ.numel() < 2 or not touched:
            return 0
        vox = occupancy_voxel_part(occ)
        inst = occupancy_instance_part(occ)
        n_vox = torch.bincount(inst, minlength=self._next_id + 1)
        pa, pb = [], []
        for o in range(1, 6):
            same = vox[o:] == vox[:-o]
            if not bool(same.any()):
                break
            pa.append(inst[:-o][same])
            pb.append(inst[o:][same])
        if not pa:
            return 0
        a, b = torch.cat(pa), torch.cat(pb)
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        pair, cnt = torch.unique(lo * (self._next_id + 1) + hi, return_counts=True)
        ia, ib = pair // (self._next_id + 1), pair % (self._next_id + 1)
        ratio = cnt.float() / torch.minimum(n_vox[ia], n_vox[ib]).clamp_min(1).float()
        cand = (ratio >= cfg.merge_overlap).nonzero().squeeze(1).tolist()
        parent: dict[int, int] = {}

        def find(x: int) -> int:
            while parent.get(x, x) != x:
                x = parent[x]
            return x

        merges = 0
        for c in cand:
            i, j = int(ia[c]), int(ib[c])
            if i not in self._instances or j not in self._instances or (i not in touched and j not in touched):
                continue
            if float(self._instances[i].embedding @ self._instances[j].embedding) < cfg.merge_min_cos:
                continue
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
        groups: dict[int, list[int]] = {}
        for x in list(parent):
            r = find(x)
            if r != x:
                groups.setdefault(r, []).append(x)
        if not groups:
            return 0
        relabel = torch.arange(self._next_id + 1, device=self.device)
        for r, members in groups.items():
            keep = self._instances[r]
            for mid in members:
                other = self._instances.pop(mid)
                e = keep.embedding * keep.observations + other.embedding * other.observations
                keep.embedding = e / e.norm().clamp_min(1e-12)
                keep.observations += other.observations
                keep.names.update(other.names)
                keep.last_seen = max(keep.last_seen, other.last_seen)
                relabel[mid] = r
                merges += 1
            touched.add(r)
            touched.difference_update(members)
        # Relabel occupancy and Gaussians, re-key the affected Gaussians.
        new_occ = (occ & ~_OCC_LOW) | relabel[inst]
        self._occ = torch.unique(new_occ)
        M = self._M
        cur = self._inst[:M].to(torch.int64)
        moved = ((cur >= 0) & (relabel[cur.clamp_min(0)] != cur)).nonzero().squeeze(1)
        if moved.numel():
            self._rekey(moved, new_levels=self._levels[moved].clone(),
                        new_inst=relabel[cur[moved]])
        return merges

    def _evict_if_needed(self, touched: set[int]) -> int:
        cfg = self.config
        M = self._M
        if M <= cfg.max_gaussians:
            return 0
        target = int(cfg.max_gaussians * cfg.evict_to_fraction)
        n_evict = M - target
        age = (self._frame_counter - self._seen[:M]).float()
        srt = torch.sort(self._scales[:M], dim=1).values
        evidence = self._weights[:M] / (math.pi * srt[:, 1] * srt[:, 2]).clamp_min(1e-12)
        boost = torch.where(self._inst[:M] >= 0, cfg.eviction_instance_boost, 1.0)
        score = evidence * self._opac[:M] * boost * torch.pow(0.5, age / cfg.eviction_half_life)
        rows = torch.topk(score, n_evict, largest=False).indices
        affected = torch.unique(self._inst[rows]).tolist()
        self._remove_rows(rows)
        touched.update(i for i in affected if i >= 0)
        return n_evict

    def _update_instances(self, touched: set[int]) -> None:
        """Recompute counts for all instances, drop empty ones, refit centroid/box of the touched ones."""
        M = self._M
        inst = self._inst[:M].to(torch.int64)
        counts = torch.bincount(inst[inst >= 0], minlength=self._next_id + 1).cpu().numpy()
        for iid in list(self._instances):
            c = int(counts[iid]) if iid < len(counts) else 0
            if c == 0:
                del self._instances[iid]
                touched.discard(iid)
                dead = occupancy_instance_part(self._occ) == iid
                if bool(dead.any()):
                    self._occ = self._occ[~dead]
            else:
                self._instances[iid].num_gaussians = c
        ids = sorted(i for i in touched if i in self._instances)
        if not ids:
            return
        sel = torch.isin(inst, torch.tensor(ids, device=self.device))
        rows = sel.nonzero().squeeze(1)
        order = torch.argsort(inst[rows], stable=True)
        rows = rows[order]
        means = self._means[rows].double().cpu().numpy()
        opac = self._opac[rows].double().cpu().numpy()
        sizes = [int(counts[i]) for i in ids]
        start = 0
        for iid, n in zip(ids, sizes):
            p, a = means[start:start + n], opac[start:start + n]
            start += n
            rec = self._instances[iid]
            rec.center = np.average(p, axis=0, weights=a) if a.sum() > 0 else p.mean(0)
            box = fit_gravity_aligned_box(p, self.up, self.config.box_trim_percent)
            if box is not None:
                rec.size, rec.yaw = box.size, box.yaw

    # ------------------------------------------------------------------------------------------------------------
    # Snapshots
    # ------------------------------------------------------------------------------------------------------------
    def snapshot(self) -> MapSnapshot:
        """A consistent CPU copy of the map (cached until the next update; cost O(N) copy otherwise).

        Returns:
            :class:`~langgs_ros.types.MapSnapshot`; ``gaussians.weights`` = accumulated merge weights,
            ``instances.centers`` = opacity-weighted centroids, boxes gravity-aligned about ``up``.
        """
        with self._lock:
            if self._snapshot_cache is not None:
                return self._snapshot_cache
            M = self._M
            g = Gaussians(*(t[:M].detach().to("cpu", copy=True) for t in
                            (self._means, self._quats, self._scales, self._opac, self._colors, self._inst)),
                          weights=self._weights[:M].detach().to("cpu", copy=True))
            ids = sorted(self._instances)
            recs = [self._instances[i] for i in ids]
            table = InstanceTable(
                ids=np.asarray(ids, dtype=np.int32),
                embeddings=(torch.stack([r.embedding for r in recs]).clone() if recs
                            else torch.zeros(0, self.embedding_dim)),
                names=[r.name for r in recs],
                centers=np.asarray([r.center for r in recs], dtype=np.float64).reshape(-1, 3),
                sizes=np.asarray([r.size for r in recs], dtype=np.float64).reshape(-1, 3),
                yaws=np.asarray([r.yaw for r in recs], dtype=np.float64),
                num_gaussians=np.asarray([r.num_gaussians for r in recs], dtype=np.int64),
                observations=np.asarray([r.observations for r in recs], dtype=np.float64),
            )
            snap = MapSnapshot(gaussians=g, instances=table, encoder_id=self.encoder_id, up=self.up.copy(),
                               frame_id=self.frame_id, camera_positions=self._cameras.copy(),
                               floor_height=self._floor, stamp=self._stamp, version=self._version)
            self._snapshot_cache = snap
            return snap

    @classmethod
    def from_snapshot(cls, snapshot: MapSnapshot, config: FusionConfig | None = None,
                      sparsify_config: SparsifyConfig | None = None, device: torch.device | str = "cpu"
                      ) -> SemanticGaussianMap:
        """Rebuild a live map from a snapshot (e.g. a loaded map) so integration can continue.

        Levels are not stored in snapshots; they are recomputed from each Gaussian's distance to the nearest
        recorded camera position (the closest it can have been observed from, i.e. the finest level the map
        would have locked), or, without cameras, from its largest scale (``ℓ = round(log2(2√3 · s_max /
        base))``: a voxel of edge ``a`` filled uniformly has σ ≈ a/√12). Levels are locked per cell to the
        finest found there and Gaussians that then share a key are merged (moment matching), so the count can
        only shrink (slightly, where the recomputed level is coarser). Centroids/boxes are recomputed.

        Raises:
            ValueError: inconsistent snapshot (embedding rows vs ids, instance ids of Gaussians not in the table).
        """
        inst = snapshot.instances
        dim = int(inst.embeddings.shape[1]) if inst.embeddings.ndim == 2 else 0
        if len(inst.ids) != inst.embeddings.shape[0]:
            raise ValueError("snapshot instance table: embeddings rows != ids")
        m = cls(snapshot.encoder_id, dim, config, sparsify_config, up=snapshot.up, device=device,
                frame_id=snapshot.frame_id)
        g = snapshot.gaussians.to(m.device)
        known = set(int(i) for i in inst.ids)
        used = set(torch.unique(g.instance_ids).tolist()) - {NO_INSTANCE}
        if not used <= known:
            raise ValueError(f"snapshot Gaussians reference unknown instance ids {sorted(used - known)[:10]}")
        with m._lock:
            for k, iid in enumerate(inst.ids.tolist()):
                e = inst.embeddings[k].float().cpu()
                rec = _Instance(id=int(iid), embedding=e / e.norm().clamp_min(1e-12),
                                observations=float(inst.observations[k]) if len(inst.observations) else 1.0)
                if inst.names[k]:
                    rec.names[inst.names[k]] += 1
                m._instances[int(iid)] = rec
            m._next_id = (max(known) + 1) if known else 0
            m._cameras = np.asarray(snapshot.camera_positions, dtype=np.float64).reshape(-1, 3).copy()
            if len(g):
                w = g.weights if g.weights is not None else torch.ones(len(g), device=m.device)
                g = Gaussians(g.means, g.quats, g.scales, g.opacities, g.colors, g.instance_ids, w)
                cfg = m.sparsify_config
                if len(m._cameras):
                    dist, _ = cKDTree(m._cameras).query(g.means.double().cpu().numpy(), k=1)
                    lv = voxel_levels(torch.as_tensor(dist, dtype=torch.float32, device=m.device), cfg)
                else:
                    smax = g.scales.max(dim=1).values.clamp_min(1e-9)
                    lv = torch.round(torch.log2(2 * math.sqrt(3) * smax / cfg.base_voxel_size))
                    lv = lv.clamp(0, cfg.max_level).to(torch.int8)
                ck = cell_keys(g.means, cfg)
                uc, inv = torch.unique(ck, return_inverse=True)
                cl = torch.full((uc.numel(),), cfg.max_level, dtype=torch.int32, device=m.device)
                cl = cl.scatter_reduce(0, inv, lv.to(torch.int32), reduce="amin").to(torch.int8)
                m._cells, m._cell_levels = uc, cl
                lv = cl[inv]
                keys = voxel_keys(g.means, lv, g.instance_ids, cfg)
                uk, kinv = torch.unique(keys, return_inverse=True)
                merged = merge_by_inverse(g, g.weights, kinv, int(uk.numel()), cfg.min_scale)  # type: ignore
                ulv = torch.zeros(uk.numel(), dtype=torch.int8, device=m.device).scatter_(0, kinv, lv)
                m._insert(merged, uk, ulv)
                m._add_occupancy(g.means, g.instance_ids)
            m._update_instances(set(m._instances))
            m._floor = estimate_floor_height(
                m._means[: m._M], m._quats[: m._M], m._scales[: m._M], m._weights[: m._M], m.up,
                m._cameras @ m.up if len(m._cameras) else None, m.config)
            if snapshot.floor_height is not None and m._floor is None:
                m._floor = float(snapshot.floor_height)
            m._stamp = float(snapshot.stamp)
            m._version = int(snapshot.version) + 1
            m._snapshot_cache = None
        return m
