"""A view-dependent, SAM-like semantic source made from ground-truth label images (tests and benchmarks only).

Stands in for ``clip_sam`` with real weights where those weights cannot be had: what CLIP + SAM give fusion is
(a) an embedding that differs from view to view and (b) masks with SAM's kinds of errors. This source produces
both from the hololens label images, deterministically (seeded per frame):

* **Phrases.** Every (frame, object) segment is embedded from one phrase sampled per frame — the object's name, one
  of its synonyms, or a short description (the first clause of the annotation's notes, e.g. "Beige two-seat sofa
  against the wall") — by a real :class:`~langgs_ros.semantics.base.TextEncoder` (the MiniLM model), so instance
  embeddings are running means of different phrases and a query equal to a name is no longer cosine 1.
* **Segmentation errors** (each with its own probability per segment and frame): missed objects; over-segmentation
  (a mask split in two along its principal axis, both halves embedded separately); under-segmentation (a mask
  merged with a touching neighbour, embedded from the larger one's phrase); eroded or dilated boundaries (1–4 px);
  spurious masks (ellipses on unlabelled pixels, embedded from distractor phrases).

``noise=0`` with ``phrases="name"`` reproduces the oracle ``labels`` source (ids as instances, names embedded).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from langgs_ros.datasets import AnnotatedObject
from langgs_ros.semantics.base import SemanticSource, TextEncoder
from langgs_ros.types import NO_INSTANCE, Frame, FrameSegmentation

DISTRACTORS = ("wall", "floor", "ceiling", "door", "window", "shelf", "chair", "poster", "cabinet", "radiator",
               "curtain", "light switch", "cable", "picture frame")
"""Phrases of spurious masks (things present in an office but not annotated)."""


def description(notes: str, max_words: int = 8) -> str:
    """Short description from an annotation's notes: the first clause, at most ``max_words`` words."""
    first = re.split(r"[;.(,]", notes, maxsplit=1)[0].strip()
    return " ".join(first.split()[:max_words])


@dataclass
class NoiseConfig:
    """Per-segment probabilities of the segmentation errors (scaled together by :attr:`PhraseNoiseSource.noise`).

    Attributes:
        miss: object not segmented. split: mask split in two. merge: mask merged with a touching neighbour.
        boundary: boundary eroded or dilated (1–4 px, half each). spurious: mean spurious masks per frame.
    """

    miss: float = 0.10
    split: float = 0.15
    merge: float = 0.10
    boundary: float = 0.50
    spurious: float = 1.0


class PhraseNoiseSource(SemanticSource):
    """Label images -> SAM-like masks with view-dependent phrase embeddings (see the module docstring).

    Args:
        objects: annotated objects (id = label id in the images; name, synonyms).
        text_encoder: real text encoder (MiniLM).
        notes: object id -> annotation notes (for descriptions; missing -> no description).
        phrases: "mixed" (name / synonym / description, sampled per frame) or "name" (always the name).
        noise: scale of :class:`NoiseConfig` probabilities (0 = clean masks).
        seed: global seed (combined with each frame's id).
        min_pixels: segments with fewer pixels are dropped.
    """

    name = "phrase_noise"

    def __init__(self, objects: Sequence[AnnotatedObject], text_encoder: TextEncoder,
                 notes: dict[int, str] | None = None, phrases: str = "mixed", noise: float = 1.0, seed: int = 0,
                 min_pixels: int = 50, config: NoiseConfig | None = None) -> None:
        if phrases not in ("mixed", "name"):
            raise ValueError(f"phrases must be 'mixed' or 'name', got {phrases!r}")
        self.objects = {o.id: o for o in objects}
        self.text_encoder = text_encoder
        self.notes = notes or {}
        self.phrases = phrases
        self.noise = float(noise)
        self.seed = int(seed)
        self.min_pixels = int(min_pixels)
        self.config = config or NoiseConfig()
        self.phrase_log: list[tuple[str, int, str]] = []  # (frame id, object id or -1, phrase)

    def _choices(self, oid: int) -> list[str]:
        o = self.objects[oid]
        if self.phrases == "name":
            return [o.name]
        out = [o.name, *o.synonyms]
        if self.notes.get(oid):
            out.append(description(self.notes[oid]))
        return out

    def _rng(self, frame: Frame) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(str(frame.frame_id).encode())])

    def segment(self, frames: Sequence[Frame]) -> list[FrameSegmentation]:
        """Segment each frame (needs ``Frame.labels``).

        Raises:
            ValueError: a frame without a label image.
        """
        out = []
        for f in frames:
            if f.labels is None:
                raise ValueError(f"frame {f.frame_id!r} has no label image")
            out.append(self._segment_one(f, self._rng(f)))
        return out

    def _segment_one(self, frame: Frame, rng: np.random.Generator) -> FrameSegmentation:
        labels = np.asarray(frame.labels)
        H, W = labels.shape
        p = self.config
        s = self.noise
        present = [int(v) for v in np.unique(labels) if v > 0 and int(v) in self.objects]
        masks = {oid: labels == oid for oid in present}
        masks = {oid: m for oid, m in masks.items() if m.sum() >= self.min_pixels}
        segs: list[tuple[np.ndarray, str, int]] = []  # (mask, phrase, object id or -1)
        # Under-segmentation first (needs the neighbours' masks), then per-segment errors.
        merged_into: dict[int, int] = {}
        for oid in list(masks):
            if oid in merged_into or rng.random() >= p.merge * s:
                continue
            grown = ndimage.binary_dilation(masks[oid], iterations=3)
            touching = [o for o in masks if o != oid and o not in merged_into and (grown & masks[o]).any()]
            if touching:
                other = touching[int(rng.integers(len(touching)))]
                merged_into[other] = oid
        for oid, m in masks.items():
            if oid in merged_into:
                continue
            for other, target in merged_into.items():
                if target == oid:
                    m = m | masks[other]
            if rng.random() < p.miss * s:
                continue
            # The phrase of the larger object of a merged mask.
            group = [oid, *[o for o, t in merged_into.items() if t == oid]]
            main = max(group, key=lambda o: int(masks[o].sum()))
            choices = self._choices(main)
            phrase = choices[int(rng.integers(len(choices)))]
            if rng.random() < p.boundary * s:
                it = int(rng.integers(1, 5))
                m = (ndimage.binary_erosion(m, iterations=it) if rng.random() < 0.5
                     else ndimage.binary_dilation(m, iterations=it))
            if rng.random() < p.split * s:
                ys, xs = np.nonzero(m)
                if len(ys) >= 2 * self.min_pixels:
                    pts = np.stack([xs, ys], 1).astype(np.float64)
                    c = pts.mean(0)
                    _, _, vt = np.linalg.svd(pts - c, full_matrices=False)
                    side = (pts - c) @ vt[0] > 0
                    for half in (side, ~side):
                        hm = np.zeros_like(m)
                        hm[ys[half], xs[half]] = True
                        ph = choices[int(rng.integers(len(choices)))]
                        segs.append((hm, ph, main))
                    continue
            segs.append((m, phrase, main))
        n_spur = int(rng.poisson(p.spurious * s)) if s > 0 else 0
        free = labels == 0
        for _ in range(n_spur):
            ys, xs = np.nonzero(free)
            if len(ys) == 0:
                break
            i = int(rng.integers(len(ys)))
            ry, rx = rng.uniform(0.04, 0.15) * H, rng.uniform(0.04, 0.15) * W
            yy, xx = np.ogrid[:H, :W]
            blob = (((yy - ys[i]) / ry) ** 2 + ((xx - xs[i]) / rx) ** 2 <= 1.0) & free
            if blob.sum() >= self.min_pixels:
                segs.append((blob, DISTRACTORS[int(rng.integers(len(DISTRACTORS)))], -1))
        # Paint larger segments first (smaller ones stay visible, as clip_sam's resolve_masks does).
        segs.sort(key=lambda t: -int(t[0].sum()))
        ids = np.full((H, W), NO_INSTANCE, np.int32)
        for k, (m, _, _) in enumerate(segs):
            ids[m] = k
        vis = np.bincount(ids[ids >= 0].ravel(), minlength=len(segs))
        keep = [k for k in range(len(segs)) if vis[k] >= self.min_pixels]
        lut = np.full(len(segs) + 1, NO_INSTANCE, np.int32)
        lut[keep] = np.arange(len(keep), dtype=np.int32)
        ids = lut[ids]
        phrases = [segs[k][1] for k in keep]
        for k in keep:
            self.phrase_log.append((str(frame.frame_id), segs[k][2], segs[k][1]))
        emb = self.text_encoder.encode_text(phrases) if phrases else None
        import torch

        if emb is None:
            emb = torch.zeros(0, self.text_encoder.dim)
        return FrameSegmentation(instance_ids=ids, embeddings=emb.float(), names=[None] * len(keep),
                                 class_ids=None)


# ---------------------------------------------------------------------------------------------------- measurement


def build_map(seq, source: SemanticSource, indices: Sequence[int], window: int = 8, overlap: int = 2,
              fusion=None):
    """Map ``seq`` frames ``indices`` with the rgbd backend (dataset poses) and ``source``; returns the snapshot.
    Same windowing as ``langgs map`` (every frame a keyframe)."""
    from langgs_ros.frames import FrameBuffer, KeyframeConfig, WindowConfig
    from langgs_ros.pipeline import MappingPipeline, PipelineConfig

    cfg = PipelineConfig(device="cpu", backend="rgbd", semantic_source="labels")
    cfg.window = WindowConfig(size=window, overlap=overlap)
    cfg.keyframes = KeyframeConfig(min_translation=0.0, min_rotation=0.0, min_image_change=0.0)
    if seq.up is not None:
        cfg.up = tuple(float(x) for x in seq.up)
    cfg.backend_args = {"max_depth": 10.0}
    if fusion is not None:
        cfg.fusion = fusion
    pipe = MappingPipeline(cfg, semantic_source=source)
    buf = FrameBuffer(cfg.keyframes, cfg.window)
    for f in seq.frames(list(indices)):
        buf.add(f)
        while buf.window_ready():
            pipe.process_window(buf.pop_window())
    last = buf.pop_window(force=True)
    if last:
        pipe.process_window(last)
    return pipe.snapshot()


def gaussian_labels(snapshot, seq, indices: Sequence[int], depth_tolerance: float = 0.05) -> np.ndarray:
    """Ground-truth object id of every map Gaussian: the majority label of the label images it projects into
    (frames ``indices``, pixel inside the image with measured depth within ``depth_tolerance`` m of the
    Gaussian's depth, i.e. visible there); 0 = background / never seen.

    Returns:
        (N,) int64.
    """
    means = snapshot.gaussians.means.double().numpy()
    n_lab = max(o.id for o in seq.objects) + 1
    votes = np.zeros((len(means), n_lab), np.int32)
    for i in indices:
        f = seq.frame(i)
        if f.labels is None or f.depth is None:
            continue
        T = np.linalg.inv(f.world_from_camera)
        pc = means @ T[:3, :3].T + T[:3, 3]
        z = pc[:, 2]
        ok = z > 0.05
        u = np.round(f.intrinsics[0, 0] * pc[:, 0] / np.where(ok, z, 1) + f.intrinsics[0, 2]).astype(np.int64)
        v = np.round(f.intrinsics[1, 1] * pc[:, 1] / np.where(ok, z, 1) + f.intrinsics[1, 2]).astype(np.int64)
        H, W = f.depth.shape
        ok &= (u >= 0) & (u < W) & (v >= 0) & (v < H)
        rows = np.nonzero(ok)[0]
        d = f.depth[v[rows], u[rows]]
        vis = (d > 0) & (np.abs(d - z[rows]) < depth_tolerance)
        rows = rows[vis]
        lab = np.asarray(f.labels)[v[rows], u[rows]].astype(np.int64)
        lab[(lab < 0) | (lab >= n_lab)] = 0
        np.add.at(votes, (rows, lab), 1)
    out = votes.argmax(axis=1)
    out[votes.sum(axis=1) == 0] = 0
    return out


def association_metrics(snapshot, objects: Sequence[AnnotatedObject], engine, owner: np.ndarray,
                        margin: float = 0.10) -> dict:
    """How annotated objects end up in map instances, and top-1 localisation of names and synonyms.

    Args:
        owner: (N,) ground-truth object id per map Gaussian (:func:`gaussian_labels`; 0 = none).

    Returns ``dict`` with:

    * ``dominant``: fraction of objects (>= 20 Gaussians in instances) whose instance-carrying Gaussians are
      >= 80 % in one instance;
    * ``instances_per_object``: mean number of instances holding >= 10 % of an object's instance-carrying Gaussians;
    * ``coverage``: mean fraction of an object's Gaussians that carry an instance id at all;
    * ``purity``: mean over instances (>= 20 object Gaussians) of the share belonging to their dominant object;
    * ``localisation``: fraction of names and synonyms (``langgs eval``'s default queries) whose top-1 result lies
      in the box (grown by ``margin``) of an object the phrase names; plus ``found`` / ``queries``.
    """
    from langgs_ros.evaluation import EvalObject, build_queries, score_query
    from langgs_ros.query import to_json_dict

    inst = snapshot.gaussians.instance_ids.numpy().astype(np.int64)
    dom, per, cov = [], [], []
    for o in objects:
        mine = owner == o.id
        ids = inst[mine & (inst >= 0)]
        if len(ids) < 20:
            continue
        cov.append(len(ids) / int(mine.sum()))
        _, cnt = np.unique(ids, return_counts=True)
        frac = cnt / cnt.sum()
        dom.append(frac.max() >= 0.8)
        per.append(int((frac >= 0.1).sum()))
    purity = []
    sel = (owner > 0) & (inst >= 0)
    for i in np.unique(inst[sel]):
        own = owner[sel][inst[sel] == i]
        if len(own) >= 20:
            purity.append(np.bincount(own).max() / len(own))
    evo = [EvalObject(o.id, o.name, o.synonyms, o.center, o.size, o.rotation) for o in objects]
    by_id = {o.id: o for o in evo}
    found, queries = 0, build_queries(evo)
    for q in queries:
        res = engine.query(snapshot, q.text, top_k=1)
        top = None
        if res:
            top = to_json_dict(res, q.text)["objects"][0]
            top["rotation"] = res[0].box_rotation.tolist()
        hit, _, _ = score_query(q, top, by_id, margin=margin)
        found += hit
    return {"dominant": float(np.mean(dom)) if dom else 0.0,
            "instances_per_object": float(np.mean(per)) if per else 0.0,
            "purity": float(np.mean(purity)) if purity else 0.0,
            "localisation": found / max(len(queries), 1), "found": found, "queries": len(queries),
            "coverage": float(np.mean(cov)) if cov else 0.0, "objects": len(dom),
            "instances": len(snapshot.instances)}
