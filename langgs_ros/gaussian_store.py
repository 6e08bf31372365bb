"""Keyed storage of a map's Gaussians: rows, the sorted key index with alias keys, and the per-cell level locks.

The store of :class:`~langgs_ros.fusion.SemanticGaussianMap` (see :mod:`langgs_ros.fusion` for the map merge,
the cell refinement and the alias keys). Rows are kept in growable preallocated tensors (``capacity >=``
:attr:`GaussianStore.num_gaussians`); the index is a sorted (key, row) array, keys as
:func:`~langgs_ros.sparsify.voxel_keys`. Several keys may point to one row (*aliases*, left behind when a
refinement re-keys a coarse Gaussian). The level-of-detail policy itself (which level a Gaussian is keyed at) is
:func:`~langgs_ros.sparsify.lock_cell_levels`; the store keeps its state (cell table) and applies its refinements.

Not thread-safe by itself: the map facade serialises access.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from langgs_ros.sparsify import (
    SparsifyConfig,
    cell_keys,
    lock_cell_levels,
    lock_cells_to_finest,
    merge_by_inverse,
    snapshot_levels,
    sorted_insert,
    sorted_lookup,
    voxel_keys,
    voxel_levels,
)
from langgs_ros.types import Gaussians

MAX_ID = (1 << 31) - 1

__all__ = ["GaussianStore"]

_ROW_FIELDS = ("_means", "_quats", "_scales", "_colors", "_opac", "_weights", "_inst", "_levels", "_seen")


class GaussianStore:
    """Map Gaussians keyed by (level, voxel, instance), merged by moment matching on key hits.

    Args:
        sparsify_config: :class:`~langgs_ros.sparsify.SparsifyConfig` (key geometry, levels, ``min_scale``).
        refine_min_levels: see :attr:`~langgs_ros.map_config.FusionConfig.refine_min_levels`.
        device: where the tensors live.

    Attributes:
        frame_counter: integrated frames so far (set by the map; stamps ``last_seen`` of written rows).
    """

    def __init__(self, sparsify_config: SparsifyConfig, refine_min_levels: int, device: torch.device) -> None:
        self.sparsify_config = sparsify_config
        self.refine_min_levels = int(refine_min_levels)
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Remove every Gaussian, key and cell lock; ``frame_counter`` back to 0."""
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
        self.frame_counter = 0

    # --- views ------------------------------------------------------------------------------------------------
    @property
    def num_gaussians(self) -> int:
        """Number of stored Gaussians M."""
        return self._M

    @property
    def means(self) -> torch.Tensor:
        """(M, 3) float32 means (m, map frame); a view, do not modify."""
        return self._means[: self._M]

    @property
    def quats(self) -> torch.Tensor:
        """(M, 4) float32 unit quaternions w-x-y-z (view)."""
        return self._quats[: self._M]

    @property
    def scales(self) -> torch.Tensor:
        """(M, 3) float32 standard deviations (m) (view)."""
        return self._scales[: self._M]

    @property
    def opacities(self) -> torch.Tensor:
        """(M,) float32 opacities in [0, 1] (view)."""
        return self._opac[: self._M]

    @property
    def colors(self) -> torch.Tensor:
        """(M, 3) float32 RGB in [0, 1] (view)."""
        return self._colors[: self._M]

    @property
    def instance_ids(self) -> torch.Tensor:
        """(M,) int32 map instance ids, -1 background (view)."""
        return self._inst[: self._M]

    @property
    def weights(self) -> torch.Tensor:
        """(M,) float32 accumulated merge weights Σw (m²) (view)."""
        return self._weights[: self._M]

    @property
    def levels(self) -> torch.Tensor:
        """(M,) int8 key level of each Gaussian (view)."""
        return self._levels[: self._M]

    @property
    def last_seen(self) -> torch.Tensor:
        """(M,) int32 ``frame_counter`` when each Gaussian was last written (view)."""
        return self._seen[: self._M]

    @property
    def index_keys(self) -> torch.Tensor:
        """(K,) int64 sorted index keys (K >= M: own keys plus aliases)."""
        return self._keys

    @property
    def index_rows(self) -> torch.Tensor:
        """(K,) int64 row each index key points to."""
        return self._rows

    @property
    def num_cells(self) -> int:
        """Number of level-locked cells."""
        return int(self._cells.numel())

    def gaussians(self, device: torch.device | str | None = None) -> Gaussians:
        """A copy of the stored Gaussians (``weights`` set) on ``device`` (default: the store's)."""
        dev = self.device if device is None else torch.device(device)
        M = self._M
        return Gaussians(*(t[:M].detach().to(dev, copy=True) for t in
                           (self._means, self._quats, self._scales, self._opac, self._colors, self._inst)),
                         weights=self._weights[:M].detach().to(dev, copy=True))

    def memory_bytes(self) -> dict[str, float]:
        """``stored_per_gaussian`` (snapshot layout), ``runtime_per_gaussian`` (with level, last-seen, index
        entry) and ``total`` (including aliases and the cell table), bytes."""
        stored = sum(t.element_size() * math.prod(t.shape[1:]) for t in
                     (self._means, self._quats, self._scales, self._colors, self._opac, self._weights, self._inst))
        runtime = stored + self._levels.element_size() + self._seen.element_size() + \
            self._keys.element_size() + self._rows.element_size()
        aliases = (self._keys.element_size() + self._rows.element_size()) * (self._keys.numel() - self._M)
        return {"stored_per_gaussian": float(stored), "runtime_per_gaussian": float(runtime),
                "total": float(runtime * self._M + 9 * self._cells.numel() + aliases)}

    # --- levels -----------------------------------------------------------------------------------------------
    def levels_for(self, means: torch.Tensor, dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key levels for new observations, updating the cell locks and refining cells where requested.

        Args:
            means: (N, 3) float positions (m). dist: (N,) float view distance (m).

        Returns:
            ``(levels (N,) int8 = cell locks, requested (N,) int32 = view-distance levels)``.
        """
        cfg = self.sparsify_config
        req = voxel_levels(dist, cfg).to(torch.int32)
        lock = lock_cell_levels(means, req, self._cells, self._cell_levels, self.refine_min_levels, cfg)
        self._cells, self._cell_levels = lock.cells, lock.cell_levels
        if lock.refined_cells.numel():
            self._refine_cells(lock.refined_cells, lock.refined_levels)
        return lock.levels, req

    def _refine_cells(self, cells: torch.Tensor, levels: torch.Tensor) -> None:
        """Re-key the Gaussians of ``cells`` (sorted) that are coarser than the cells' new ``levels``."""
        M = self._M
        cand = (self._levels[:M] > 0).nonzero().squeeze(1)
        if cand.numel() == 0:
            return
        ck = cell_keys(self._means[cand], self.sparsify_config)
        pos, hit = sorted_lookup(cells, ck)
        cand, pos = cand[hit], pos[hit]
        coarse = self._levels[cand] > levels[pos]
        rows = cand[coarse]
        if rows.numel():
            self.rekey(rows, new_levels=levels[pos[coarse]], keep_aliases=True)

    # --- rows ---------------------------------------------------------------------------------------------------
    def _ensure_capacity(self, n: int) -> None:
        cap = self._means.shape[0]
        if n <= cap:
            return
        new_cap = max(n, int(cap * 1.5) + 1024)

        def grow(t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros((new_cap, *t.shape[1:]), dtype=t.dtype, device=t.device)
            out[: self._M] = t[: self._M]
            return out

        for name in _ROW_FIELDS:
            setattr(self, name, grow(getattr(self, name)))

    def rows_gaussians(self, rows: torch.Tensor) -> Gaussians:
        """Gaussians of ``rows`` (R,) int64 (copies, ``weights`` set)."""
        return Gaussians(self._means[rows], self._quats[rows], self._scales[rows], self._opac[rows],
                         self._colors[rows], self._inst[rows], weights=self._weights[rows])

    def write_rows(self, rows: torch.Tensor, g: Gaussians) -> None:
        """Overwrite every field of ``rows`` (R,) int64 with the R Gaussians ``g`` (``weights`` set); keys, levels
        and last-seen counters are kept."""
        self._means[rows] = g.means
        self._quats[rows] = g.quats
        self._scales[rows] = g.scales
        self._opac[rows] = g.opacities
        self._colors[rows] = g.colors
        self._inst[rows] = g.instance_ids
        self._weights[rows] = g.weights  # type: ignore[assignment]

    def insert(self, g: Gaussians, keys: torch.Tensor, levels: torch.Tensor,
               coarse_view: torch.Tensor | None = None) -> tuple[int, int, torch.Tensor]:
        """Merge keyed Gaussians (unique sorted ``keys`` (n,) int64, ``g.weights`` set) into the store.

        A Gaussian whose key is absent but which is flagged in ``coarse_view`` (n,) bool (observed from farther
        than the resolution its cell is locked at) is merged into the Gaussian that an *alias key* at a coarser
        level of its mean points to, the finest such level first (see :meth:`rekey`): the region was observed at
        that coarse level before its cell was refined, and that observation now lives in the aliased Gaussian.

        Returns ``(inserted, merged, rows)``: counts and the (n,) row each input Gaussian ended up in.
        """
        n = len(g)
        dev = self.device
        if n == 0:
            return 0, 0, torch.zeros(0, dtype=torch.int64, device=dev)
        pos, hit = sorted_lookup(self._keys, keys)
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
                apos, ahit = sorted_lookup(self._keys, ak)
                dest[c[ahit]] = self._rows[apos[ahit]]
                keep = dest[cand] < 0
                cand, lv_c = cand[keep], lv_c[keep]
            hit = dest >= 0
        nh = int(hit.sum())
        if nh:
            hidx = hit.nonzero().squeeze(1)
            rows, inv = torch.unique(dest[hidx], return_inverse=True)
            old = self.rows_gaussians(rows)
            both = Gaussians.cat([old, g.select(hit)])
            inv = torch.cat((torch.arange(rows.numel(), device=dev), inv))
            merged = merge_by_inverse(both, both.weights, inv, int(rows.numel()),  # type: ignore[arg-type]
                                      self.sparsify_config.min_scale, self.sparsify_config.spread_gain,
                                      self.sparsify_config.opacity_evidence)
            self.write_rows(rows, merged)
            self._seen[rows] = self.frame_counter
        miss = ~hit
        m = n - nh
        if m:
            M = self._M
            self._ensure_capacity(M + m)
            new_rows = torch.arange(M, M + m, device=dev)
            self.write_rows(new_rows, g.select(miss))
            self._levels[new_rows] = levels[miss].to(torch.int8)
            self._seen[new_rows] = self.frame_counter
            self._M = M + m
            self._index_add(keys[miss], new_rows)
            dest[miss] = new_rows
        return m, nh, dest

    def _index_add(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Add ``keys`` (sorted, unique, absent from the index) pointing to ``rows``."""
        M = self._keys.numel()
        self._keys, old_pos, new_pos = sorted_insert(self._keys, keys)
        r = torch.empty(M + keys.numel(), dtype=torch.int64, device=self.device)
        r[old_pos] = self._rows
        r[new_pos] = rows
        self._rows = r

    def remove_rows(self, rows: torch.Tensor) -> tuple[Gaussians, torch.Tensor, torch.Tensor, torch.Tensor,
                                                       torch.Tensor]:
        """Remove ``rows`` (R,) int64 (compacting storage and index).

        Returns their Gaussians, levels, last-seen counters, and the index keys that pointed to them (own keys
        and aliases) with the position in ``rows`` of the row each key pointed to.
        """
        M = self._M
        g = self.rows_gaussians(rows)
        lv, seen = self._levels[rows].clone(), self._seen[rows].clone()
        keep = torch.ones(M, dtype=torch.bool, device=self.device)
        keep[rows] = False
        new_index = torch.cumsum(keep.to(torch.int64), 0) - 1
        kr = keep.nonzero().squeeze(1)
        for name in _ROW_FIELDS:
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

    def rekey(self, rows: torch.Tensor, new_levels: torch.Tensor | None = None,
              new_inst: torch.Tensor | None = None, keep_aliases: bool = False) -> None:
        """Take rows out, change level and/or instance, and merge them back by their new keys.

        With ``keep_aliases`` every index key that pointed to a moved row (its old key and older aliases) is
        kept as an *alias* pointing to the row the Gaussian was merged into. Used on cell refinement: frames
        that saw the cell before it was refined merged their pixels under the old coarse keys; when such a
        coarse view is integrated again (revisit), its pixels whose fine keys are absent find the coarse
        observation through the alias (:meth:`insert`) instead of filling fine voxels that the coarse
        observation already covers (which grew the map by ~13 % on a second pass over the hololens sequence).
        """
        g, lv, _, gone_keys, gone_of = self.remove_rows(rows)
        if new_levels is not None:
            lv = new_levels.to(torch.int8)
        if new_inst is not None:
            g = Gaussians(g.means, g.quats, g.scales, g.opacities, g.colors, new_inst.to(torch.int32), g.weights)
        keys = voxel_keys(g.means, lv, g.instance_ids, self.sparsify_config)
        uk, inv = torch.unique(keys, return_inverse=True)
        merged = merge_by_inverse(g, g.weights, inv, int(uk.numel()), self.sparsify_config.min_scale,
                                  self.sparsify_config.spread_gain, self.sparsify_config.opacity_evidence)  # type: ignore
        ulv = torch.zeros(uk.numel(), dtype=torch.int8, device=self.device).scatter_(0, inv, lv)
        _, _, dest = self.insert(merged, uk, ulv)
        if keep_aliases and gone_keys.numel():
            _, present = sorted_lookup(self._keys, gone_keys)
            ak, arow = gone_keys[~present], dest[inv[gone_of[~present]]]
            if ak.numel():
                order = torch.argsort(ak)
                self._index_add(ak[order], arow[order])

    def relabel_instances(self, relabel: torch.Tensor) -> None:
        """Map every Gaussian's instance id ``i >= 0`` to ``relabel[i]`` (re-keying the changed rows).

        Args:
            relabel: (I,) int64 lookup over all instance ids in use.
        """
        M = self._M
        cur = self._inst[:M].to(torch.int64)
        moved = ((cur >= 0) & (relabel[cur.clamp_min(0)] != cur)).nonzero().squeeze(1)
        if moved.numel():
            self.rekey(moved, new_levels=self._levels[moved].clone(), new_inst=relabel[cur[moved]])

    def label_consensus(self, min_ratio: float, background_votes: bool = True,
                        coarsen: int = 0, max_share: float = 0.5) -> tuple[int, list[int]]:
        """Relabel Gaussians that disagree with the weight majority of their own voxel.

        Rows in one voxel (at ``level + coarsen``) with different instance ids are the same surface labelled
        differently by different frames (a SAM mask that swallowed a neighbour, a dilated boundary, a missed
        object). The label with the largest accumulated merge weight there (Σ opacity × pixel footprint, i.e. how
        much of the voxel's observation carried that label) wins: the rows of every label whose weight in the
        voxel is at most ``1 / min_ratio`` of the winner's take the winner's id and are merged into the winner's
        rows of the same key (:meth:`rekey`; moment matching, so nothing observed is lost). Background (-1) rows
        vote like an instance when ``background_votes`` (a segment's dilated rim over a wall goes back to the
        wall), else they are neither moved nor counted. A label that would lose more than ``max_share`` of its
        whole weight is left alone: that is a real object small against the voxel (a canister on a table's edge
        in 5 cm voxels), not a neighbour's spill-over, and consensus never erases an instance (merging whole
        fragments is the instance table's job).

        Args:
            min_ratio: > 1; how much heavier the winning label must be in the voxel (2 = twice the weight).
            coarsen: vote in the voxels this many levels coarser than each Gaussian's own (0 = its own voxel).
            background_votes: whether background rows take part.
            max_share: in (0, 1]; the largest fraction of a label's total weight that may be relabelled in one
                call (1 = no limit).

        Returns:
            ``(relabelled rows, instance ids that lost or gained Gaussians (may include -1))``.

        Raises:
            ValueError: ``min_ratio <= 1`` or ``max_share`` outside (0, 1].
        """
        if not min_ratio > 1.0:
            raise ValueError(f"min_ratio must be > 1, got {min_ratio}")
        if not 0.0 < max_share <= 1.0:
            raise ValueError(f"max_share must be in (0, 1], got {max_share}")
        M = self._M
        if M < 2:
            return 0, []
        inst = self._inst[:M]
        rows = torch.arange(M, device=self.device) if background_votes else (inst >= 0).nonzero().squeeze(1)
        if rows.numel() < 2:
            return 0, []
        dev = self.device
        lv = self._levels[rows].to(torch.int64) + int(coarsen)
        vk = voxel_keys(self._means[rows], lv, torch.full((rows.numel(),), -1, device=dev), self.sparsify_config)
        uv, inv = torch.unique(vk, return_inverse=True)
        # Weight of every (voxel, instance) pair; the winner of a voxel is its heaviest instance.
        r_inst = inst[rows].to(torch.int64)
        pk = inv * (MAX_ID + 2) + (r_inst + 1)
        up_, pinv = torch.unique(pk, return_inverse=True)
        if up_.numel() == uv.numel():  # no voxel holds two labels
            return 0, []
        pw = torch.zeros(up_.numel(), dtype=torch.float64, device=dev).index_add_(
            0, pinv, self._weights[rows].to(torch.float64))
        pv, pi = up_ // (MAX_ID + 2), up_ % (MAX_ID + 2) - 1
        vmax = torch.zeros(uv.numel(), dtype=torch.float64, device=dev).scatter_reduce_(0, pv, pw, reduce="amax")
        cand = torch.where(pw >= vmax[pv], pi, torch.full_like(pi, MAX_ID + 1))
        win = torch.full((uv.numel(),), MAX_ID + 1, dtype=torch.int64, device=dev).scatter_reduce_(
            0, pv, cand, reduce="amin")  # lowest id on exact ties
        pair_move = (pw * min_ratio <= vmax[pv]) & (pi != win[pv])
        # A label losing more than max_share of its total weight keeps all of it (a small real object).
        lab = torch.unique(pi, return_inverse=True)[1]
        total = torch.zeros(int(lab.max()) + 1, dtype=torch.float64, device=dev).index_add_(0, lab, pw)
        lost = torch.zeros_like(total).index_add_(0, lab, torch.where(pair_move, pw, torch.zeros_like(pw)))
        pair_move &= (lost <= max_share * total)[lab]
        move = pair_move[pinv]
        target = win[inv[move]]
        src = rows[move]
        changed = target != inst[src].to(torch.int64)
        src, target = src[changed], target[changed]
        if src.numel() == 0:
            return 0, []
        affected = torch.unique(torch.cat((inst[src].to(torch.int64), target))).tolist()
        self.rekey(src, new_levels=self._levels[src].clone(), new_inst=target)
        return int(src.numel()), affected

    def evict(self, max_gaussians: int, evict_to_fraction: float, half_life: float,
              instance_boost: float) -> tuple[int, list[int]]:
        """Bound the store size (score in :mod:`langgs_ros.fusion`, *Eviction policy*).

        Returns ``(evicted count, instance ids that lost Gaussians (may include -1))``.
        """
        M = self._M
        if M <= max_gaussians:
            return 0, []
        target = int(max_gaussians * evict_to_fraction)
        n_evict = M - target
        age = (self.frame_counter - self._seen[:M]).float()
        srt = torch.sort(self._scales[:M], dim=1).values
        evidence = self._weights[:M] / (math.pi * srt[:, 1] * srt[:, 2]).clamp_min(1e-12)
        boost = torch.where(self._inst[:M] >= 0, instance_boost, 1.0)
        score = evidence * self._opac[:M] * boost * torch.pow(0.5, age / half_life)
        rows = torch.topk(score, n_evict, largest=False).indices
        affected = torch.unique(self._inst[rows]).tolist()
        self.remove_rows(rows)
        return n_evict, affected

    def load(self, g: Gaussians, camera_positions: np.ndarray) -> None:
        """Fill an empty store from saved Gaussians (``weights`` set), recomputing levels and cell locks.

        Levels from :func:`~langgs_ros.sparsify.snapshot_levels`, each cell locked to the finest level found in
        it (:func:`~langgs_ros.sparsify.lock_cells_to_finest`); Gaussians that then share a key are merged
        (moment matching), so the count can only shrink.
        """
        cfg = self.sparsify_config
        lv = snapshot_levels(g.means, g.scales, camera_positions, cfg)
        lv, self._cells, self._cell_levels = lock_cells_to_finest(g.means, lv, cfg)
        keys = voxel_keys(g.means, lv, g.instance_ids, cfg)
        uk, kinv = torch.unique(keys, return_inverse=True)
        merged = merge_by_inverse(g, g.weights, kinv, int(uk.numel()), cfg.min_scale, cfg.spread_gain,
                                  cfg.opacity_evidence)  # type: ignore[arg-type]
        ulv = torch.zeros(uk.numel(), dtype=torch.int8, device=self.device).scatter_(0, kinv, lv)
        self.insert(merged, uk, ulv)
