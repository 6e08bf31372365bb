"""The map's instance table: segment → instance association, duplicate-instance merging, embeddings, boxes.

Part of :class:`~langgs_ros.fusion.SemanticGaussianMap` (the algorithms are described in :mod:`langgs_ros.fusion`,
steps 1–2 and the periodic merge). Semantics are stored per instance (FLEG's instance-level embeddings), not per
Gaussian: one running-mean unit embedding, a name histogram and a gravity-aligned box per instance, plus the
set of occupied (voxel, instance) keys (:func:`~langgs_ros.sparsify.occupancy_keys`) used to measure overlaps.

Not thread-safe by itself: the map facade serialises access.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from langgs_ros.geometry import fit_gravity_aligned_box
from langgs_ros.map_config import FusionConfig, IntegrationStats
from langgs_ros.sparsify import (
    MAX_OCC_INSTANCE,
    occupancy_instance_part,
    occupancy_keys,
    occupancy_voxel_part,
    sorted_insert,
    sorted_lookup,
)
from langgs_ros.types import NO_INSTANCE, FrameSegmentation, Gaussians, InstanceTable

__all__ = ["InstanceRecord", "MapInstances"]

_OCC_LOW = (1 << 20) - 1


@dataclass
class InstanceRecord:
    """One map instance.

    Attributes:
        id: map instance id. embedding: (D,) CPU float32 unit running-mean embedding.
        observations: segments merged into it (ConceptGraphs' detection count). names: name histogram.
        center: (3,) opacity-weighted centroid (m). size/yaw: gravity-aligned box (m, rad).
        num_gaussians: map Gaussians carrying the id. last_seen: frame counter of the last association.
    """

    id: int
    embedding: torch.Tensor
    observations: float = 0.0
    names: Counter = field(default_factory=Counter)
    center: np.ndarray = field(default_factory=lambda: np.zeros(3))
    size: np.ndarray = field(default_factory=lambda: np.zeros(3))
    yaw: float = 0.0
    num_gaussians: int = 0
    last_seen: int = 0

    @property
    def name(self) -> str | None:
        """Most frequent name, ``None`` without names."""
        return self.names.most_common(1)[0][0] if self.names else None


class MapInstances:
    """Instance records, their occupancy and the association of frame segments to them.

    Args:
        config: :class:`~langgs_ros.map_config.FusionConfig` (association/merge thresholds, box trimming).
        embedding_dim: D.
        device: where the occupancy keys live and association runs.
    """

    def __init__(self, config: FusionConfig, embedding_dim: int, device: torch.device) -> None:
        self.config = config
        self.embedding_dim = int(embedding_dim)
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Remove every instance and the occupancy."""
        self.records: dict[int, InstanceRecord] = {}
        self.next_id = 0
        self._occ = torch.zeros(0, dtype=torch.int64, device=self.device)  # sorted unique occupancy keys

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_occupancy_keys(self) -> int:
        """Occupied (voxel, instance) pairs (8 bytes each)."""
        return int(self._occ.numel())

    def memory_bytes(self) -> float:
        """Bytes of the records (embeddings and box fields) and the occupancy set."""
        return float(len(self.records) * (self.embedding_dim * 4 + 8 * 9) + 8 * self._occ.numel())

    # --- association ------------------------------------------------------------------------------------------
    def _instance_rows(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Current instance ids, their (K, D) embeddings and an id -> row lookup tensor on the device."""
        ids = sorted(self.records)
        emb = (torch.stack([self.records[i].embedding for i in ids]) if ids
               else torch.zeros(0, self.embedding_dim))
        lut = torch.full((self.next_id + 1,), -1, dtype=torch.int64, device=self.device)
        if ids:
            lut[torch.tensor(ids, device=self.device)] = torch.arange(len(ids), device=self.device)
        return ids, emb, lut

    def associate_and_relabel(self, g: Gaussians, seg: FrameSegmentation | None, stats: IntegrationStats,
                              touched: set[int], frame_counter: int) -> Gaussians:
        """Associate the frame's segments with instances (creating new ones) and relabel its Gaussians.

        Args:
            g: one frame's Gaussians, ``instance_ids`` = segment-local ids (-1 none).
            seg: the frame's segmentation (``None``: everything background).
            stats: counters to update (segments, associated, new_instances).
            touched: ids of instances touched in this call (updated).
            frame_counter: the map's frame counter (``last_seen`` of associated instances).

        Returns:
            ``g`` with map instance ids (-1 for background and segments below ``min_segment_points``).

        Raises:
            RuntimeError: more than :data:`~langgs_ros.sparsify.MAX_OCC_INSTANCE` instance ids used.
        """
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
            ok = overlap_c[:, :max(Kmap, 1)] >= cfg.min_overlap
            if Kmap:
                ok &= cos >= cfg.min_assoc_cos
            sim = torch.where(ok, sim, torch.full_like(sim, -math.inf))
            for k in seg_ids:
                stats.segments += 1
                name = seg.names[k] if k < len(seg.names) else None
                best = int(sim[k].argmax()) if Kmap else -1
                if Kmap and float(sim[k, best]) >= cfg.sim_threshold:
                    inst = self.records[ids[best]]
                    e = inst.embedding * inst.observations + seg_emb[k]
                    inst.embedding = e / e.norm().clamp_min(1e-12)
                    inst.observations += 1.0
                    stats.associated += 1
                else:
                    if self.next_id > MAX_OCC_INSTANCE:
                        raise RuntimeError(f"more than {MAX_OCC_INSTANCE} instance ids used; reset the map")
                    inst = InstanceRecord(id=self.next_id, embedding=seg_emb[k].clone(), observations=1.0)
                    self.records[inst.id] = inst
                    self.next_id += 1
                    stats.new_instances += 1
                if name:
                    inst.names[name] += 1
                inst.last_seen = frame_counter
                touched.add(inst.id)
                to_map[k + 1] = inst.id
        new_ids = to_map[local + 1].to(torch.int32)
        return Gaussians(g.means, g.quats, g.scales, g.opacities, g.colors, new_ids, g.weights)

    def add_occupancy(self, means: torch.Tensor, inst: torch.Tensor) -> None:
        """Record the voxels (edge ``assoc_voxel_size``) occupied by ``means`` (N, 3) of instances ``inst`` (N,)
        (entries with id -1 are ignored)."""
        sel = inst >= 0
        if not bool(sel.any()):
            return
        k = torch.unique(occupancy_keys(means[sel], inst[sel], self.config.assoc_voxel_size))
        _, hit = sorted_lookup(self._occ, k)
        if bool((~hit).any()):
            self._occ, _, _ = sorted_insert(self._occ, k[~hit])

    # --- maintenance ------------------------------------------------------------------------------------------
    def merge_duplicates(self, touched: set[int], frame_counter: int = 0) -> tuple[int, torch.Tensor | None]:
        """Merge instance pairs with large voxel overlap and similar embeddings (union-find, oldest id wins).

        Returns:
            ``(merges, relabel)``: the number of absorbed instances and, when > 0, an (next_id + 1,) int64
            lookup old id -> surviving id that the Gaussians must be relabelled with
            (:meth:`~langgs_ros.gaussian_store.GaussianStore.relabel_instances`); ``None`` otherwise.
        """
        cfg = self.config
        occ = self._occ
        if len(self.records) < 2 or occ.numel() < 2 or not touched:
            return 0, None
        vox = occupancy_voxel_part(occ)
        inst = occupancy_instance_part(occ)
        n_vox = torch.bincount(inst, minlength=self.next_id + 1)
        pa, pb = [], []
        for o in range(1, 6):
            same = vox[o:] == vox[:-o]
            if not bool(same.any()):
                break
            pa.append(inst[:-o][same])
            pb.append(inst[o:][same])
        if not pa:
            return 0, None
        a, b = torch.cat(pa), torch.cat(pb)
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        pair, cnt = torch.unique(lo * (self.next_id + 1) + hi, return_counts=True)
        ia, ib = pair // (self.next_id + 1), pair % (self.next_id + 1)
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
            if i not in self.records or j not in self.records or (i not in touched and j not in touched):
                continue
            if (float(self.records[i].embedding @ self.records[j].embedding) < cfg.merge_min_cos
                    and not self._is_fragment(i, j, frame_counter)):
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
            return 0, None
        relabel = torch.arange(self.next_id + 1, device=self.device)
        for r, members in groups.items():
            keep = self.records[r]
            for mid in members:
                other = self.records.pop(mid)
                e = keep.embedding * keep.observations + other.embedding * other.observations
                keep.embedding = e / e.norm().clamp_min(1e-12)
                keep.observations += other.observations
                keep.names.update(other.names)
                keep.last_seen = max(keep.last_seen, other.last_seen)
                relabel[mid] = r
                merges += 1
            touched.add(r)
            touched.difference_update(members)
        self._occ = torch.unique((occ & ~_OCC_LOW) | relabel[inst])
        return merges, relabel

    def _is_fragment(self, i: int, j: int, frame_counter: int) -> bool:
        """Whether one of two overlapping instances is a rarely seen fragment of the other: observed at most
        ``fragment_max_observations`` times and not for ``fragment_min_age`` frames, while the other was observed
        ``fragment_min_ratio`` times as often (e.g. one half of an over-segmented mask embedded from a phrase
        unlike the object's running mean). A young instance may still be a real object seen for the first time."""
        cfg = self.config
        small, big = sorted((self.records[i], self.records[j]), key=lambda r: r.observations)
        return (small.observations <= cfg.fragment_max_observations
                and big.observations >= cfg.fragment_min_ratio * max(small.observations, 1.0)
                and frame_counter - small.last_seen >= cfg.fragment_min_age)

    def update(self, instance_ids: torch.Tensor, means: torch.Tensor, opacities: torch.Tensor, up: np.ndarray,
               touched: set[int]) -> None:
        """Recompute counts for all instances, drop empty ones, refit centroid/box of the touched ones.

        Args:
            instance_ids: (M,) int map instance id of every map Gaussian. means: (M, 3) float (m).
            opacities: (M,) float. up: (3,) unit gravity-up. touched: ids to refit (updated: dropped ids removed).
        """
        inst = instance_ids.to(torch.int64)
        counts = torch.bincount(inst[inst >= 0], minlength=self.next_id + 1).cpu().numpy()
        for iid in list(self.records):
            c = int(counts[iid]) if iid < len(counts) else 0
            if c == 0:
                del self.records[iid]
                touched.discard(iid)
                dead = occupancy_instance_part(self._occ) == iid
                if bool(dead.any()):
                    self._occ = self._occ[~dead]
            else:
                self.records[iid].num_gaussians = c
        ids = sorted(i for i in touched if i in self.records)
        if not ids:
            return
        sel = torch.isin(inst, torch.tensor(ids, device=inst.device))
        rows = sel.nonzero().squeeze(1)
        order = torch.argsort(inst[rows], stable=True)
        rows = rows[order]
        pts = means[rows].double().cpu().numpy()
        opac = opacities[rows].double().cpu().numpy()
        sizes = [int(counts[i]) for i in ids]
        start = 0
        for iid, n in zip(ids, sizes):
            p, a = pts[start:start + n], opac[start:start + n]
            start += n
            rec = self.records[iid]
            rec.center = np.average(p, axis=0, weights=a) if a.sum() > 0 else p.mean(0)
            box = fit_gravity_aligned_box(p, up, self.config.box_trim_percent)
            if box is not None:
                rec.size, rec.yaw = box.size, box.yaw

    # --- snapshots --------------------------------------------------------------------------------------------
    def table(self) -> InstanceTable:
        """A CPU copy as :class:`~langgs_ros.types.InstanceTable` (ids ascending)."""
        ids = sorted(self.records)
        recs = [self.records[i] for i in ids]
        return InstanceTable(
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

    def load(self, table: InstanceTable) -> None:
        """Fill empty records from a saved table (embeddings re-normalised; boxes are refitted by :meth:`update`).
        """
        for k, iid in enumerate(table.ids.tolist()):
            e = table.embeddings[k].float().cpu()
            rec = InstanceRecord(id=int(iid), embedding=e / e.norm().clamp_min(1e-12),
                                 observations=float(table.observations[k]) if len(table.observations) else 1.0)
            if table.names[k]:
                rec.names[table.names[k]] += 1
            self.records[int(iid)] = rec
        self.next_id = (max(int(i) for i in table.ids) + 1) if len(table.ids) else 0
