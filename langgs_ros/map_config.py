"""Configuration and per-call statistics of the semantic Gaussian map (:mod:`langgs_ros.fusion`).

Shared by the map facade (:class:`~langgs_ros.fusion.SemanticGaussianMap`), its Gaussian store
(:mod:`langgs_ros.gaussian_store`) and its instance table (:mod:`langgs_ros.instance_table`); kept in its own
module so that neither of those imports the facade.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FusionConfig", "IntegrationStats"]


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
        min_assoc_cos: a segment is never associated with an instance whose embedding cosine is below this,
            whatever the overlap (an under-segmented mask, or a small object inside a big instance's voxels,
            otherwise joins the big instance on geometry alone). Measured on hololens with view-dependent MiniLM
            phrases (bench_semantics); for CLIP image embeddings, whose cosines between objects are higher,
            it is mostly inactive.
        fragment_max_observations / fragment_min_ratio / fragment_min_age: an overlapping instance observed at
            most ``fragment_max_observations`` times, unseen for ``fragment_min_age`` frames, is merged into one
            observed ``fragment_min_ratio`` times as often even below ``merge_min_cos`` (a once-seen half of an
            over-segmented mask).
        label_consensus_ratio: after each call, Gaussians of one voxel (level + ``label_consensus_coarsen``)
            whose label's accumulated weight there is at most 1/ratio of the heaviest label's are relabelled to it
            and merged (:meth:`~langgs_ros.gaussian_store.GaussianStore.label_consensus`); 0 = off.
        label_consensus_background: background (-1) Gaussians vote and can be relabelled.
        label_consensus_coarsen: voxel level offset of the vote (0 = the Gaussians' own voxels).
        label_consensus_max_share: a label that would lose more than this fraction of its total weight in one
            call keeps all of it (a small object sharing voxels with a big one is not erased).
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
    min_assoc_cos: float = 0.3
    min_segment_points: int = 50
    merge_overlap: float = 0.6
    merge_min_cos: float = 0.75
    fragment_max_observations: float = 2.0
    fragment_min_ratio: float = 4.0
    fragment_min_age: int = 16
    label_consensus_ratio: float = 2.0
    label_consensus_background: bool = True
    label_consensus_coarsen: int = 0
    label_consensus_max_share: float = 0.7
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
        relabelled_gaussians: map Gaussians relabelled by the label consensus.
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
    relabelled_gaussians: int = 0
    num_instances: int = 0
    seconds: float = 0.0

