"""Open-vocabulary object queries on a :class:`~langgs_ros.types.MapSnapshot`.

Scoring is LERF's relevancy (Kerr et al., "LERF: Language Embedded Radiance Fields", ICCV 2023, §3.4) applied
to the per-instance embeddings of the map (FLEG-style instance-level semantics): with unit embeddings φ (an
instance), φ_q (the query) and φ_c^i (canonical phrases "object", "things", "stuff", "texture" plus optional
extra negatives),

    relevancy = min_i exp(φ·φ_q / τ) / (exp(φ·φ_c^i / τ) + exp(φ·φ_q / τ)) = σ((φ·φ_q − max_i φ·φ_c^i) / τ),

computed in that numerically stable sigmoid form for all instances at once (one (K, D) × (D, 1 + C) matrix
product). τ = 1 reproduces LERF exactly (scores then lie in (0.27, 0.73)); 0.5 means "no better than a generic
phrase". A smaller τ only stretches scores (the ranking is unchanged) and changes what ``min_score`` means.

Each result carries a gravity-aligned box and an **approach pose** for navigation: the ring of radius
``max(min_standoff, half box diagonal + clearance)`` around the object's floor projection; the visited camera
position (projected onto the floor) whose horizontal distance to the object is closest to that radius is chosen
(visited positions are known free space, and the segment from a camera towards an object it observed was free
at camera height; positions inside the box footprint + 0.1 m are skipped); if it lies beyond the ring it is
pulled in along that line to the ring. The approach yaw
faces the object centre (about ``up``, :func:`langgs_ros.geometry.heading_yaw` convention). Without recorded
cameras the pose lies on the ring along the box's x axis.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from langgs_ros.geometry import GravityBox, fit_gravity_aligned_box, heading_yaw, normalize_up, rotation_from_yaw
from langgs_ros.semantics.base import TextEncoder
from langgs_ros.types import MapSnapshot

__all__ = [
    "Candidate",
    "ObjectResult",
    "QueryAnswer",
    "QueryConfig",
    "QueryEngine",
    "approach_pose",
    "instance_boxes",
    "lerf_relevancy",
    "to_json_dict",
]


@dataclass
class QueryConfig:
    """Parameters of :class:`QueryEngine`.

    Attributes:
        top_k: default number of results.
        min_score: default relevancy threshold (only results strictly above are kept); 0.5 = "better than every
            generic phrase".
        canonical_negatives: LERF's canonical phrases.
        max_query_length: longest accepted query, characters.
        temperature: τ of the relevancy (1.0 = LERF).
        min_standoff: minimum approach distance from the object centre, metres.
        clearance: approach distance beyond the half box diagonal, metres.
        box_trim_percent: trimming of the result boxes (as in the map).
        cache_size: text embeddings kept in the engine's LRU cache.
    """

    top_k: int = 5
    min_score: float = 0.5
    canonical_negatives: tuple[str, ...] = ("object", "things", "stuff", "texture")
    max_query_length: int = 1000
    temperature: float = 1.0
    min_standoff: float = 0.6
    clearance: float = 0.4
    box_trim_percent: float = 2.0
    cache_size: int = 256


@dataclass
class ObjectResult:
    """One query hit.

    Attributes:
        instance_id: map instance id.
        name: instance name (``None`` when unknown).
        score: LERF relevancy in (0, 1).
        center: (3,) float64 gravity-aligned box centre, map frame, metres.
        size: (3,) float64 box extents (box x, box y, up), metres.
        yaw: box yaw about ``up`` (rad).
        num_gaussians: supporting map Gaussians.
        approach_position: (3,) float64 standoff point on the floor, map frame, metres.
        approach_yaw: heading (rad about ``up``) from the approach position towards the object.
        box_rotation: (3, 3) float64 world-from-box rotation (columns box x, box y, up).
        centroid: (3,) float64 opacity-weighted centroid of the instance (the table's ``centers`` row).
    """

    instance_id: int
    name: str | None
    score: float
    center: np.ndarray
    size: np.ndarray
    yaw: float
    num_gaussians: int
    approach_position: np.ndarray
    approach_yaw: float
    box_rotation: np.ndarray
    centroid: np.ndarray = field(default_factory=lambda: np.zeros(3))


@dataclass
class Candidate:
    """An instance's relevancy for a query, whether or not it passed ``min_score`` (for operator messages).

    Attributes:
        instance_id: map instance id. name: instance name (``None`` when unknown). score: LERF relevancy in (0, 1).
    """

    instance_id: int
    name: str | None
    score: float

    @property
    def label(self) -> str:
        """The name, or ``#<id>`` for unnamed instances (``clip_sam``)."""
        return self.name if self.name else f"#{self.instance_id}"


@dataclass
class QueryAnswer:
    """What :meth:`QueryEngine.answer` returns: the results plus an operator message.

    Attributes:
        query: the query text (stripped).
        objects: the :class:`ObjectResult` list of :meth:`QueryEngine.query` (above ``min_score``, best first).
        candidates: the best instances by relevancy regardless of ``min_score`` (at most ``num_candidates``,
            one per distinct name — fragments of one object share a name —, best first).
        min_score: the threshold that was applied.
        message: ``""`` when objects were found; otherwise e.g.
            ``"settee: nothing above 0.50; best: sofa 0.47, couch table 0.45"`` (or ``"...; the map has no
            instances"``). A service answers ``success=true`` with this message: an empty result is an answer.
    """

    query: str
    objects: list[ObjectResult]
    candidates: list[Candidate]
    min_score: float
    message: str


def format_no_match(query: str, min_score: float, candidates: Sequence[Candidate]) -> str:
    """The operator message for a query no instance reaches: ``"<query>: nothing above <thr>; best: a 0.47, ..."``.

    Scores are printed with 2 decimals (3 when two decimals would show the threshold itself).
    """
    def fmt(x: float) -> str:
        two = f"{x:.2f}"
        return f"{x:.3f}" if two == f"{min_score:.2f}" else two

    head = f"{query}: nothing above {min_score:.2f}"
    if not candidates:
        return f"{head}; the map has no instances"
    return f"{head}; best: " + ", ".join(f"{c.label} {fmt(c.score)}" for c in candidates)


def lerf_relevancy(embeddings: torch.Tensor, query: torch.Tensor, negatives: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """LERF relevancy of each row of ``embeddings`` (Kerr et al. ICCV 2023, Eq. in §3.4).

    Args:
        embeddings: (K, D) unit embeddings (instances or Gaussians).
        query: (D,) unit query embedding.
        negatives: (C, D) unit canonical/negative phrase embeddings, C >= 1.
        temperature: τ > 0.

    Returns:
        (K,) float32 ``min_i σ((φ·φ_q − φ·φ_c^i) / τ)``.

    Raises:
        ValueError: dimension mismatch, no negatives or τ <= 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if negatives.ndim != 2 or negatives.shape[0] == 0:
        raise ValueError("need at least one negative phrase embedding")
    D = embeddings.shape[1]
    if query.shape != (D,) or negatives.shape[1] != D:
        raise ValueError(f"embedding dims differ: instances {D}, query {tuple(query.shape)}, "
                         f"negatives {tuple(negatives.shape)}")
    E = embeddings.float()
    sims = E @ torch.cat((query[None].float(), negatives.float())).T  # (K, 1 + C)
    return torch.sigmoid((sims[:, 0] - sims[:, 1:].max(dim=1).values) / temperature)


def approach_pose(center: np.ndarray, size: np.ndarray, yaw: float, up: np.ndarray, floor_height: float | None,
                  camera_positions: np.ndarray, min_standoff: float = 0.6, clearance: float = 0.4
                  ) -> tuple[np.ndarray, float]:
    """Standoff pose on the floor facing an object (see the module docstring).

    Args:
        center: (3,) box centre. size: (3,) box extents (x, y, up). yaw: box yaw (rad).
        up: (3,) unit up. floor_height: ``up · p`` of the floor, or ``None`` (then the box bottom is used).
        camera_positions: (P, 3) visited camera centres (P may be 0).
        min_standoff / clearance: ring radius = ``max(min_standoff, 0.5·hypot(size_x, size_y) + clearance)``.

    Returns:
        ``(position (3,) on the floor plane, yaw (rad) facing the object centre)``.
    """
    u = normalize_up(up)
    c = np.asarray(center, dtype=np.float64)
    sz = np.asarray(size, dtype=np.float64)
    h_f = float(floor_height) if floor_height is not None else float(c @ u - 0.5 * sz[2])
    c_f = c - (c @ u - h_f) * u
    half_diag = 0.5 * float(np.hypot(sz[0], sz[1]))
    r = max(min_standoff, half_diag + clearance)
    pos = None
    cams = np.asarray(camera_positions, dtype=np.float64).reshape(-1, 3)
    if len(cams):
        p_f = cams - ((cams @ u) - h_f)[:, None] * u[None]
        delta = p_f - c_f
        rho = np.linalg.norm(delta, axis=1)
        # Exclude positions inside the object's footprint (+0.1 m): box-local horizontal coordinates.
        R = rotation_from_yaw(yaw, u)
        bx, by = np.abs(delta @ R[:, 0]), np.abs(delta @ R[:, 1])
        ok = (bx > 0.5 * sz[0] + 0.1) | (by > 0.5 * sz[1] + 0.1)
        if ok.any():
            k = int(np.argmin(np.where(ok, np.abs(rho - r), np.inf)))
            pos = c_f + delta[k] * min(1.0, r / rho[k])
    if pos is None:
        pos = c_f + r * rotation_from_yaw(yaw, u)[:, 0]
    return pos, heading_yaw(c_f - pos, u)


class QueryEngine:
    """Ranks map instances for a text query (LERF relevancy; see the module docstring).

    Args:
        text_encoder: encoder of the map's embedding space (its ``encoder_id`` must match the snapshot's).
        config: :class:`QueryConfig`.
    """

    def __init__(self, text_encoder: TextEncoder, config: QueryConfig | None = None) -> None:
        self.text_encoder = text_encoder
        self.config = config or QueryConfig()
        if self.config.max_query_length < 1 or self.config.top_k < 1 or self.config.temperature <= 0:
            raise ValueError("max_query_length and top_k must be >= 1 and temperature > 0")
        if not self.config.canonical_negatives:
            raise ValueError("canonical_negatives must not be empty")
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        # Boxes fitted per map snapshot (immutable): (snapshot, {instance id: box}) for the last two snapshots.
        # The snapshot object is kept so its id() cannot be reused while cached.
        self._box_cache: OrderedDict[int, tuple[MapSnapshot, dict[int, GravityBox | None]]] = OrderedDict()
        self._box_lock = threading.Lock()

    def boxes(self, snapshot: MapSnapshot, ids: Sequence[int]) -> dict[int, GravityBox]:
        """Gravity-aligned boxes of ``ids`` in ``snapshot``, fitted once per snapshot and cached.

        Fitting needs a pass over all map Gaussians (~10-80 ms at 1 M); snapshots are immutable, so repeated
        queries against the same map version reuse the boxes. Thread-safe.
        """
        key = id(snapshot)
        with self._box_lock:
            entry = self._box_cache.get(key)
            if entry is None or entry[0] is not snapshot:
                entry = (snapshot, {})
                self._box_cache[key] = entry
                while len(self._box_cache) > 2:
                    self._box_cache.popitem(last=False)
            known = entry[1]
            missing = [int(i) for i in ids if int(i) not in known]
        if missing:
            fitted = instance_boxes(snapshot, missing, self.config.box_trim_percent)
            with self._box_lock:
                for i in missing:
                    known[i] = fitted.get(i)
        return {int(i): known[int(i)] for i in ids if known.get(int(i)) is not None}

    def _validate_text(self, text: object, what: str = "query") -> str:
        if not isinstance(text, str):
            raise ValueError(f"{what} must be a string, got {type(text).__name__}")
        t = text.strip()
        if not t:
            raise ValueError(f"{what} is empty or whitespace")
        if len(text) > self.config.max_query_length:
            raise ValueError(f"{what} is {len(text)} characters long; the limit is {self.config.max_query_length}")
        return t

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(M, D) float32 unit embeddings of ``texts`` (LRU-cached per phrase; one encoder call for misses)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            emb = self.text_encoder.encode_text(missing).detach().float().cpu()
            if emb.ndim != 2 or emb.shape[0] != len(missing):
                raise ValueError(f"text encoder returned shape {tuple(emb.shape)} for {len(missing)} texts")
            emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
            for t, e in zip(missing, emb):
                self._cache[t] = e
        out = []
        for t in texts:
            self._cache.move_to_end(t)
            out.append(self._cache[t])
        while len(self._cache) > max(self.config.cache_size, len(texts)):
            self._cache.popitem(last=False)
        return torch.stack(out)

    @torch.inference_mode()
    def scores(self, snapshot: MapSnapshot, text: str, negatives: Sequence[str] = ()) -> torch.Tensor:
        """(K,) relevancy of every instance of ``snapshot.instances`` (row order) for ``text``.

        Raises:
            ValueError: bad query/negatives, encoder or dimension mismatch.
        """
        q = self._validate_text(text)
        negs = list(dict.fromkeys([*self.config.canonical_negatives,
                                   *(self._validate_text(n, "negative phrase") for n in negatives)]))
        if snapshot.encoder_id != self.text_encoder.encoder_id:
            raise ValueError(f"map embeddings are in {snapshot.encoder_id!r} but the text encoder is "
                             f"{self.text_encoder.encoder_id!r}")
        emb = self.embed([q, *negs])
        E = snapshot.instances.embeddings
        if len(snapshot.instances) == 0:
            return torch.zeros(0)
        if E.shape[1] != emb.shape[1]:
            raise ValueError(f"map embedding dim {E.shape[1]} != text embedding dim {emb.shape[1]}")
        return lerf_relevancy(E, emb[0], emb[1:], self.config.temperature)

    def candidates(self, snapshot: MapSnapshot, scores: torch.Tensor, n: int = 3) -> list[Candidate]:
        """The ``n`` best instances of ``snapshot`` by ``scores`` (from :meth:`scores`), one per distinct name
        (unnamed instances each count as their own), ignoring ``min_score``; instances without Gaussians skipped.
        """
        inst = snapshot.instances
        if scores.numel() == 0 or n < 1:
            return []
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        out: list[Candidate] = []
        seen: set[str] = set()
        for r in order:
            if int(inst.num_gaussians[r]) <= 0:
                continue
            name = inst.names[r]
            key = name if name else f"#{int(inst.ids[r])}"
            if key in seen:
                continue
            seen.add(key)
            out.append(Candidate(int(inst.ids[r]), name, float(scores[r])))
            if len(out) >= n:
                break
        return out

    def answer(self, snapshot: MapSnapshot, text: str, top_k: int | None = None, min_score: float | None = None,
               negatives: Sequence[str] = (), num_candidates: int = 3) -> QueryAnswer:
        """:meth:`query` plus the best candidates and an operator message for the no-match case.

        For a ROS ``FindObject`` response: ``success = True``, ``objects`` from ``answer.objects`` and
        ``message = answer.message`` (empty when something was found; ``"settee: nothing above 0.50; best: sofa
        0.47"`` when nothing passed ``min_score``). Scores are computed once.

        Args:
            num_candidates: how many best candidates to report (one per distinct name).

        Raises:
            ValueError: as :meth:`query`.
        """
        thr = self.config.min_score if min_score is None else float(min_score)
        s = self.scores(snapshot, text, negatives)
        objects = self._results(snapshot, s, top_k, thr)
        cands = self.candidates(snapshot, s, num_candidates)
        q = text.strip()
        msg = "" if objects else format_no_match(q, thr, cands)
        return QueryAnswer(query=q, objects=objects, candidates=cands, min_score=thr, message=msg)

    def query(self, snapshot: MapSnapshot, text: str, top_k: int | None = None, min_score: float | None = None,
              negatives: Sequence[str] = ()) -> list[ObjectResult]:
        """Best-matching object instances for ``text``, highest relevancy first.

        Args:
            snapshot: the map.
            text: the query (1..``max_query_length`` characters, not only whitespace).
            top_k: at most this many results (default ``config.top_k``).
            min_score: keep only results with relevancy strictly above this (default ``config.min_score``; 0.5
                keeps instances that match the query better than every canonical phrase).
            negatives: extra negative phrases added to the canonical ones.

        Returns:
            Up to ``top_k`` :class:`ObjectResult` with ``score > min_score``; ``[]`` for an empty map.

        Raises:
            ValueError: empty/whitespace or too long query, ``top_k < 1``, encoder or dimension mismatch.
        """
        k = self.config.top_k if top_k is None else int(top_k)
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {k}")
        thr = self.config.min_score if min_score is None else float(min_score)
        return self._results(snapshot, self.scores(snapshot, text, negatives), k, thr)

    def _results(self, snapshot: MapSnapshot, s: torch.Tensor, top_k: int | None, thr: float) -> list[ObjectResult]:
        k = self.config.top_k if top_k is None else int(top_k)
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {k}")
        inst = snapshot.instances
        if s.numel() == 0:
            return []
        valid = torch.as_tensor(inst.num_gaussians > 0) & (s > thr)
        cand = valid.nonzero().squeeze(1)
        # Highest score first; ties (e.g. fragments of one object with identical embeddings) -> larger first.
        ng = torch.as_tensor(inst.num_gaussians)[cand]
        by_size = cand[torch.argsort(ng, descending=True, stable=True)]
        order = by_size[torch.argsort(s[by_size], descending=True, stable=True)]
        rows = order[:k].tolist()
        if not rows:
            return []
        ids = [int(inst.ids[r]) for r in rows]
        boxes = self.boxes(snapshot, ids)
        up = normalize_up(snapshot.up)
        out = []
        for r, iid in zip(rows, ids):
            box = boxes.get(iid)
            if box is not None:
                center, size, yaw, rot = box.center, box.size, box.yaw, box.rotation
            else:
                center, size, yaw = inst.centers[r].copy(), inst.sizes[r].copy(), float(inst.yaws[r])
                rot = rotation_from_yaw(yaw, up)
            pos, ayaw = approach_pose(center, size, yaw, up, snapshot.floor_height, snapshot.camera_positions,
                                      self.config.min_standoff, self.config.clearance)
            out.append(ObjectResult(
                instance_id=iid, name=inst.names[r], score=float(s[r]), center=np.asarray(center, np.float64),
                size=np.asarray(size, np.float64), yaw=float(yaw), num_gaussians=int(inst.num_gaussians[r]),
                approach_position=pos, approach_yaw=ayaw, box_rotation=rot,
                centroid=np.asarray(inst.centers[r], np.float64).copy()))
        return out


def instance_boxes(snapshot: MapSnapshot, ids: Sequence[int] | None = None,
                   trim_percent: float = 2.0) -> dict[int, GravityBox]:
    """Gravity-aligned boxes of map instances fitted to their Gaussians' means.

    Same robust fit as the map's (:func:`langgs_ros.geometry.fit_gravity_aligned_box`); use it for box centres:
    ``InstanceTable.centers`` holds opacity-weighted centroids, which differ from box centres for objects
    seen from one side.

    Args:
        snapshot: the map. ids: instance ids (default: all in the table). trim_percent: percentile trimming.

    Returns:
        ``{instance id: GravityBox}`` for the ids that have Gaussians (centre, size, yaw about
        ``snapshot.up``, world-from-box rotation).
    """
    g = snapshot.gaussians
    want = [int(i) for i in (snapshot.instances.ids if ids is None else ids)]
    if len(g) == 0 or not want:
        return {}
    inst = g.instance_ids
    sel = torch.isin(inst, torch.tensor(want, dtype=inst.dtype))
    rows = sel.nonzero().squeeze(1)
    sub = inst[rows]
    order = torch.argsort(sub, stable=True)
    rows, sub = rows[order], sub[order]
    uniq, counts = torch.unique_consecutive(sub, return_counts=True)
    means = g.means[rows].double().numpy()
    out: dict[int, GravityBox] = {}
    start = 0
    for iid, n in zip(uniq.tolist(), counts.tolist()):
        box = fit_gravity_aligned_box(means[start:start + n], snapshot.up, trim_percent)
        if box is not None:
            out[int(iid)] = box
        start += n
    return out


def to_json_dict(results: Sequence[ObjectResult], query: str) -> dict:
    """JSON-serialisable ``{"query", "objects": [{"id", "name", "score", "center", "size", "yaw",
    "num_gaussians"}]}`` (floats as Python floats, vectors as lists, metres/radians)."""
    return {
        "query": query,
        "objects": [
            {
                "id": int(r.instance_id),
                "name": r.name,
                "score": float(r.score),
                "center": [float(x) for x in r.center],
                "size": [float(x) for x in r.size],
                "yaw": float(r.yaw),
                "num_gaussians": int(r.num_gaussians),
            }
            for r in results
        ],
    }
