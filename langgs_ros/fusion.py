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
   their means). Their old coarse keys stay in the index as **aliases** of the rows they went into. With
   ``SparsifyConfig.max_coarsen > 0`` the lock is the finest level and
   :func:`~langgs_ros.sparsify.hierarchical_levels` coarsens homogeneous voxels above it (geometry–semantic
   levels); a later refinement of the cell re-keys those coarse Gaussians at the new lock like any other.
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
Gaussians that disagree with the weight majority of their voxel are relabelled to it (label consensus,
:meth:`~langgs_ros.gaussian_store.GaussianStore.label_consensus`: an under-segmented mask's share of a
neighbour goes back to the neighbour);
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

**Code layout**: :class:`SemanticGaussianMap` is a thin facade (validation, locking, cameras, floor, snapshots)
over a :class:`~langgs_ros.gaussian_store.GaussianStore` (rows, key index, aliases, cell locks, eviction) and
a :class:`~langgs_ros.instance_table.MapInstances` (association, duplicate merging, embeddings, boxes); the
level-of-detail policy (view-distance levels, per-cell locks and refinement) is in :mod:`langgs_ros.sparsify`
(:func:`~langgs_ros.sparsify.voxel_levels`, :func:`~langgs_ros.sparsify.lock_cell_levels`), configuration in
:mod:`langgs_ros.map_config`.

**Memory**: stored per Gaussian (the snapshot / persisted layout): means, quats, scales, colors, opacity,
weight as float32 and the instance id as int32 = 64 bytes (3DGS with SH degree 3 stores 248 B). The runtime
adds a level (int8), a last-seen counter (int32) and the sorted key index (int64 key + int64 row) = 85 bytes,
plus 16 bytes per alias key (one per Gaussian re-keyed by a refinement; ~1.5 % of the map on hololens).
Semantics are stored per instance (FLEG's instance-level embeddings), not per Gaussian.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence

import numpy as np
import torch

from langgs_ros.gaussian_store import GaussianStore
from langgs_ros.geometry import normalize_up, quat_to_rotmat, yaw_frame
from langgs_ros.instance_table import MapInstances
from langgs_ros.map_config import FusionConfig, IntegrationStats
from langgs_ros.sparsify import SparsifyConfig, hierarchical_levels, sparsify_with_keys
from langgs_ros.types import NO_INSTANCE, FrameSegmentation, Gaussians, MapSnapshot

__all__ = ["FusionConfig", "IntegrationStats", "SemanticGaussianMap", "estimate_floor_height", "transform_snapshot"]


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


def _as_similarity(M: np.ndarray) -> np.ndarray:
    """(4, 4) float64 copy of a similarity ``[[s R, t], [0, 1]]``; ``ValueError`` if it is not one."""
    T = np.array(M, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)) or not np.allclose(T[3], [0, 0, 0, 1]):
        raise ValueError(f"expected a finite (4, 4) similarity [[s R, t], [0, 1]], got {np.asarray(M).shape}")
    det = float(np.linalg.det(T[:3, :3]))
    s = np.cbrt(det) if det > 0 else 0.0
    if not s > 0 or not np.allclose((T[:3, :3] / s) @ (T[:3, :3] / s).T, np.eye(3), atol=1e-6):
        raise ValueError("expected a similarity [[s R, t], [0, 1]] with R a rotation and s > 0")
    return T


def transform_snapshot(snapshot: MapSnapshot, new_from_old: np.ndarray) -> MapSnapshot:
    """A map snapshot moved by a similarity transform (``new <- old``, e.g. a re-levelled unposed map).

    Gaussians (:func:`~langgs_ros.gaussians.transform_gaussians`), camera positions, ``up`` (``R · up``),
    instance centroids and boxes (sizes × s, yaw re-measured about the new ``up``) and the floor height
    (``s · floor + up_new · t``) move with it; embeddings, names and counts stay.

    Args:
        snapshot: the map in ``old``.
        new_from_old: (4, 4) float64 similarity ``[[s R, t], [0, 1]]`` (metres).

    Raises:
        ValueError: not a finite similarity.
    """
    from langgs_ros.gaussians import transform_gaussians

    T = np.asarray(new_from_old, dtype=np.float64)
    g = transform_gaussians(snapshot.gaussians, T)
    s = float(np.linalg.det(T[:3, :3])) ** (1.0 / 3.0)
    sR, t = T[:3, :3], T[:3, 3]
    R = sR / s
    up_old = normalize_up(snapshot.up)
    up = normalize_up(R @ up_old)
    cams = np.asarray(snapshot.camera_positions, dtype=np.float64).reshape(-1, 3) @ sR.T + t
    inst = snapshot.instances
    e1, e2 = yaw_frame(up_old)
    yaws = np.asarray(inst.yaws, np.float64)
    box_x = (np.cos(yaws)[:, None] * e1 + np.sin(yaws)[:, None] * e2) @ R.T
    f1, f2 = yaw_frame(up)
    new_yaws = np.arctan2(box_x @ f2, box_x @ f1)
    new_yaws = (new_yaws + np.pi / 2) % np.pi - np.pi / 2  # boxes are symmetric: yaw in [-π/2, π/2)
    inst = dataclasses.replace(inst, centers=np.asarray(inst.centers, np.float64).reshape(-1, 3) @ sR.T + t,
                               sizes=np.asarray(inst.sizes, np.float64) * s, yaws=new_yaws)
    floor = None if snapshot.floor_height is None else s * float(snapshot.floor_height) + float(up @ t)
    return dataclasses.replace(snapshot, gaussians=g, instances=inst, camera_positions=cams, up=up,
                               floor_height=floor)


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
            self.store = GaussianStore(self.sparsify_config, self.config.refine_min_levels, self.device)
            self.instances = MapInstances(self.config, self.embedding_dim, self.device)
            self._cameras = np.zeros((0, 3))  # store frame
            self._floor: float | None = None  # store frame, along _up_store
            self._map_from_store = np.eye(4)  # similarity; identity unless a map correction was applied
            self._up_store = self.up.copy()
            self._stamp = 0.0
            self._version = getattr(self, "_version", 0) + 1
            self._snapshot_cache: MapSnapshot | None = None

    @property
    def num_gaussians(self) -> int:
        """Number of map Gaussians."""
        return self.store.num_gaussians

    @property
    def num_instances(self) -> int:
        """Number of object instances."""
        return len(self.instances)

    @property
    def version(self) -> int:
        """Increments with each update."""
        return self._version

    @property
    def floor_height(self) -> float | None:
        """Current floor height estimate along ``up`` (m, map frame), ``None`` before any data."""
        if self._floor is None:
            return None
        M = self._map_from_store
        return float(np.cbrt(np.linalg.det(M[:3, :3]))) * self._floor + float(self.up @ M[:3, 3])

    @property
    def camera_positions(self) -> np.ndarray:
        """(P, 3) float64 recorded camera centres (map frame)."""
        M = self._map_from_store
        return self._cameras @ M[:3, :3].T + M[:3, 3]

    @property
    def map_from_store(self) -> np.ndarray:
        """(4, 4) float64 similarity from the frame the Gaussians are stored in to the map frame (identity unless
        :meth:`apply_correction` moved the map)."""
        return self._map_from_store.copy()

    def _store_is_map_frame(self) -> bool:
        """Whether the store's frame is the map frame (no correction applied since the map was made or loaded)."""
        return bool(np.array_equal(self._map_from_store, np.eye(4)))

    def apply_correction(self, new_from_old: np.ndarray) -> None:
        """Move the whole map by a similarity ``map_new <- map_old`` (e.g. an unposed map re-levelled and
        re-scaled as more floor is seen; issue 9), without re-keying or merging anything.

        The Gaussians stay where they are stored; the map keeps ``map_from_store`` and composes the correction
        into it. Later :meth:`integrate` calls take their inputs in the new map frame (moved into the store
        frame first), snapshots are given in the new map frame (:func:`transform_snapshot`), and boxes and the
        floor are refitted about the map's ``up`` as seen in the store frame. Re-keying the moved Gaussians in a
        new voxel grid instead merged neighbours that fell into one voxel: −28 % of the Gaussians of 8 hololens
        frames per correction.

        Args:
            new_from_old: (4, 4) float64 similarity ``[[s R, t], [0, 1]]`` (R a rotation, s > 0; t in metres).

        Raises:
            ValueError: not a finite similarity (the map is unchanged).
        """
        M = _as_similarity(new_from_old)
        with self._lock:
            self._map_from_store = M @ self._map_from_store
            s = float(np.cbrt(np.linalg.det(self._map_from_store[:3, :3])))
            self._up_store = normalize_up((self._map_from_store[:3, :3] / s).T @ self.up)
            self._update_instances_and_floor(set(self.instances.records))
            self._version += 1
            self._snapshot_cache = None

    # ------------------------------------------------------------------------------------------------------------
    # Access for refinement (langgs_ros.refine)
    # ------------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def gaussians_in_view(self, world_from_camera: torch.Tensor | np.ndarray, intrinsics: torch.Tensor | np.ndarray,
                          width: int, height: int, max_gaussians: int | None = None
                          ) -> tuple[torch.Tensor, Gaussians]:
        """The Gaussians whose means lie in at least one of S views, in the map frame (copies).

        Args:
            world_from_camera: (S, 4, 4) camera-to-map poses (OpenCV axes), metres.
            intrinsics: (S, 3, 3) pinhole K of the (height, width) images.
            width, height: image size in pixels.
            max_gaussians: keep at most this many, those inside the most views first (ties: lower row first).

        Returns:
            ``(rows, gaussians)``: (R,) int64 store rows (for :meth:`update_gaussians`) and R Gaussians (means,
            quats, scales in the map frame; ``weights`` set) on the map's device.
        """
        from langgs_ros.gaussians import transform_gaussians
        from langgs_ros.refine import view_counts

        with self._lock:
            means = self.store.means  # the stored rows only; nothing else is copied before the selection
            identity = self._store_is_map_frame()
            if not identity:
                M = torch.as_tensor(self._map_from_store, dtype=means.dtype, device=means.device)
                means = means @ M[:3, :3].T + M[:3, 3]
            counts = view_counts(means, world_from_camera, intrinsics, width, height)
            rows = torch.nonzero(counts > 0).squeeze(1)
            if max_gaussians is not None and rows.numel() > max_gaussians:
                order = torch.sort(counts[rows], descending=True, stable=True).indices[:max_gaussians]
                rows = torch.sort(rows[order]).values
            g = self.store.rows_gaussians(rows)
            return rows, g if identity else transform_gaussians(g, self._map_from_store)

    @torch.inference_mode()
    def update_gaussians(self, rows: torch.Tensor, gaussians: Gaussians) -> None:
        """Overwrite means, quats, scales, opacities and colours of store ``rows`` (e.g. after photometric
        refinement); instance ids, merge weights, levels and voxel keys are kept. Instance centroids and boxes
        are refitted.

        Args:
            rows: (R,) int64 rows from :meth:`gaussians_in_view` (the map must not have changed since).
            gaussians: R Gaussians in the map frame.

        Raises:
            ValueError: length mismatch, rows out of range, or non-finite values (the map is unchanged).
        """
        from langgs_ros.gaussians import transform_gaussians

        rows = torch.as_tensor(rows, dtype=torch.int64, device=self.device)
        g = gaussians.to(self.device)
        if len(g) != rows.numel():
            raise ValueError(f"{rows.numel()} rows but {len(g)} Gaussians")
        if not all(bool(torch.isfinite(t).all()) for t in (g.means, g.quats, g.scales, g.opacities, g.colors)):
            raise ValueError("refined Gaussians contain non-finite values")
        with self._lock:
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.store.num_gaussians):
                raise ValueError("rows out of range")
            if not self._store_is_map_frame():
                g = transform_gaussians(g, np.linalg.inv(self._map_from_store))
            old = self.store.rows_gaussians(rows)
            self.store.write_rows(rows, Gaussians(g.means, g.quats, g.scales, g.opacities.clamp(0.0, 1.0),
                                                  g.colors.clamp(0.0, 1.0), old.instance_ids, weights=old.weights))
            self._update_instances_and_floor({int(i) for i in torch.unique(old.instance_ids).tolist() if i >= 0})
            self._version += 1
            self._snapshot_cache = None

    def memory_bytes(self) -> dict[str, float]:
        """Memory accounting.

        Returns:
            ``stored_per_gaussian`` (bytes of the snapshot layout per Gaussian), ``runtime_per_gaussian``
            (including level, last-seen and the key index), ``instance_bytes`` (embeddings etc.) and ``total``.
        """
        mem = self.store.memory_bytes()
        inst = self.num_instances * (self.embedding_dim * 4 + 8 * 9)
        return {"stored_per_gaussian": mem["stored_per_gaussian"], "runtime_per_gaussian": mem["runtime_per_gaussian"],
                "instance_bytes": float(inst), "total": mem["total"] + self.instances.memory_bytes()}

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
            if not self._store_is_map_frame():  # inputs come in the map frame
                from langgs_ros.gaussians import transform_gaussians

                store_from_map = np.linalg.inv(self._map_from_store)
                frame_gaussians = [transform_gaussians(g, store_from_map) for g in frame_gaussians]
                T = T.clone()
                T[:, :3, 3] = T[:, :3, 3] @ torch.as_tensor(store_from_map[:3, :3]).T + torch.as_tensor(
                    store_from_map[:3, 3])
            touched: set[int] = set()
            for i in range(S):
                self.store.frame_counter += 1
                cam = T[i, :3, 3].numpy()
                self._record_camera(cam)
                g = frame_gaussians[i].to(self.device)
                stats.input_gaussians += len(g)
                if len(g) == 0:
                    continue
                seg = segmentations[i] if segmentations is not None else None
                g = self.instances.associate_and_relabel(g, seg, stats, touched, self.store.frame_counter)
                dist = (g.means - torch.as_tensor(cam, dtype=torch.float32, device=self.device)).norm(dim=1)
                levels, requested = self.store.levels_for(g.means, dist)
                levels = hierarchical_levels(g, levels, self.sparsify_config)
                res = sparsify_with_keys(g, levels, self.sparsify_config)
                stats.sparsified_gaussians += len(res.gaussians)
                # A merged Gaussian is a coarse view of its voxel when all its pixels asked for a coarser level
                # than the cell's lock (the frame sees the region from farther than the map resolution there).
                req = torch.full((len(res.gaussians),), self.sparsify_config.max_level, dtype=torch.int32,
                                 device=self.device).scatter_reduce_(0, res.inverse, requested, reduce="amin")
                ins, mer, _ = self.store.insert(res.gaussians, res.keys, res.levels,
                                               coarse_view=req > res.levels.to(torch.int32))
                stats.inserted_gaussians += ins
                stats.merged_gaussians += mer
                self.instances.add_occupancy(g.means, g.instance_ids)
            stats.merged_instances, relabel = self.instances.merge_duplicates(touched, self.store.frame_counter)
            if relabel is not None:
                self.store.relabel_instances(relabel)
            if self.config.label_consensus_ratio > 0:
                stats.relabelled_gaussians, changed = self.store.label_consensus(
                    self.config.label_consensus_ratio, self.config.label_consensus_background,
                    self.config.label_consensus_coarsen, self.config.label_consensus_max_share)
                touched.update(i for i in changed if i >= 0)
            cfg = self.config
            stats.evicted_gaussians, affected = self.store.evict(
                cfg.max_gaussians, cfg.evict_to_fraction, cfg.eviction_half_life, cfg.eviction_instance_boost)
            touched.update(i for i in affected if i >= 0)
            self._update_instances_and_floor(touched)
            self._stamp = float(stamp)
            self._version += 1
            self._snapshot_cache = None
            stats.num_gaussians = self.store.num_gaussians
            stats.num_instances = len(self.instances)
        stats.seconds = time.perf_counter() - t0
        return stats

    def _update_instances_and_floor(self, touched: set[int]) -> None:
        st = self.store
        up = self._up_store
        self.instances.update(st.instance_ids, st.means, st.opacities, up, touched)
        self._floor = estimate_floor_height(st.means, st.quats, st.scales, st.weights, up,
                                            self._cameras @ up if len(self._cameras) else None, self.config)

    def _record_camera(self, c: np.ndarray) -> None:
        if not np.all(np.isfinite(c)):
            return
        cams = self._cameras
        if len(cams) and np.min(np.linalg.norm(cams[-2000:] - c, axis=1)) < self.config.camera_spacing:
            return
        cams = np.vstack((cams, c[None]))
        self._cameras = cams[-self.config.max_camera_positions:]

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
            g = self.store.gaussians("cpu")
            table = self.instances.table()
            snap = MapSnapshot(gaussians=g, instances=table, encoder_id=self.encoder_id, up=self._up_store.copy(),
                               frame_id=self.frame_id, camera_positions=self._cameras.copy(),
                               floor_height=self._floor, stamp=self._stamp, version=self._version)
            if not self._store_is_map_frame():
                snap = dataclasses.replace(transform_snapshot(snap, self._map_from_store), up=self.up.copy())
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
            m.instances.load(inst)
            m._cameras = np.asarray(snapshot.camera_positions, dtype=np.float64).reshape(-1, 3).copy()
            if len(g):
                w = g.weights if g.weights is not None else torch.ones(len(g), device=m.device)
                g = Gaussians(g.means, g.quats, g.scales, g.opacities, g.colors, g.instance_ids, w)
                m.store.load(g, m._cameras)
                m.instances.add_occupancy(g.means, g.instance_ids)
            m._update_instances_and_floor(set(m.instances.records))
            if snapshot.floor_height is not None and m._floor is None:
                m._floor = float(snapshot.floor_height)
            m._stamp = float(snapshot.stamp)
            m._version = int(snapshot.version) + 1
            m._snapshot_cache = None
        return m
