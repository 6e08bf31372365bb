"""Language localisation accuracy of a map against annotated 3D boxes (``langgs eval``).

Protocol (LERF's localisation metric, Kerr et al., ICCV 2023, §4.2, with 3D boxes instead of 2D ones): a query
counts as **found** when the centre of its top-1 result lies inside the ground-truth box of any annotated object
the phrase names, the box grown by ``margin`` metres on every side. Each query also reports the 3D IoU of the top-1
result's gravity-aligned box with the best-overlapping target box (:func:`gravity_box_iou`).

Annotation format (``objects.json``, the layout of ``../shared/data/hololens_office/annotations/objects.json``)::

    {"up": [0, 1, 0],                                     # optional world up (else each box's z axis)
     "objects": [{"id": 1, "name": "sofa", "synonyms": ["couch", "settee"],
                  "center": [x, y, z], "size": [sx, sy, sz],  # metres, along box x, box y, box z (= up)
                  "rotation": [[...], [...], [...]]}]}        # world-from-box 3x3 (columns = box axes)

``rotation`` may be replaced by ``"yaw"`` (rad about ``up``, :func:`langgs_ros.geometry.rotation_from_yaw`
convention; needs a top-level ``up``). All positions in the map's frame (``langgs map`` keeps the dataset's world
frame).

Queries: by default every object's name and synonyms (case-insensitive, each phrase once); its targets are all
objects having it as name or synonym ("table" may name several tables). A queries file has one phrase per line
(``#`` comments and blank lines skipped); ``PHRASE => T1, T2`` gives the targets explicitly (object ids or names);
a bare phrase takes the objects that have it as name or synonym.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from langgs_ros.geometry import normalize_up, rotation_from_yaw

__all__ = ["EvalObject", "EvalQuery", "build_queries", "gravity_box_iou", "load_eval_objects", "read_queries",
           "score_query"]


@dataclass
class EvalObject:
    """An annotated box.

    Attributes:
        id: object id. name: name. synonyms: other phrases.
        center: (3,) float64 box centre (map frame, m). size: (3,) float64 extents along box x, y, z (m).
        rotation: (3, 3) float64 world-from-box rotation (column 2 = up).
    """

    id: int
    name: str
    synonyms: list[str]
    center: np.ndarray
    size: np.ndarray
    rotation: np.ndarray

    def contains(self, point: np.ndarray, margin: float = 0.0) -> bool:
        """Whether a world point (3,) lies in the box grown by ``margin`` metres on every side."""
        local = self.rotation.T @ (np.asarray(point, np.float64) - self.center)
        return bool(np.all(np.abs(local) <= self.size / 2.0 + margin))


@dataclass
class EvalQuery:
    """A phrase and the ids of the objects it may be answered with."""

    text: str
    targets: list[int]


def load_eval_objects(path: str | Path) -> list[EvalObject]:
    """Read the annotation file (format in the module docstring).

    Raises:
        ValueError: missing fields or bad shapes. FileNotFoundError: no such file.
    """
    data = json.loads(Path(path).read_text())
    items = data.get("objects", []) if isinstance(data, dict) else data
    up = data.get("up") if isinstance(data, dict) else None
    out = []
    for o in items:
        try:
            center = np.asarray(o["center"], np.float64).reshape(3)
            size = np.asarray(o["size"], np.float64).reshape(3)
            if "rotation" in o:
                rot = np.asarray(o["rotation"], np.float64).reshape(3, 3)
            elif "yaw" in o and up is not None:
                rot = rotation_from_yaw(float(o["yaw"]), np.asarray(up, np.float64))
            else:
                raise KeyError("rotation (or yaw with a top-level up)")
            out.append(EvalObject(int(o["id"]), str(o["name"]), [str(s) for s in o.get("synonyms", [])],
                                  center, size, rot))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: object {o.get('id', '?') if isinstance(o, dict) else o!r}: "
                             f"missing or bad {exc}") from exc
    if not out:
        raise ValueError(f"{path}: no objects")
    return out


def _phrase_index(objects: Sequence[EvalObject]) -> dict[str, list[int]]:
    index: dict[str, list[int]] = {}
    for o in objects:
        for t in dict.fromkeys([o.name, *o.synonyms]):
            index.setdefault(t.strip().lower(), []).append(o.id)
    return index


def build_queries(objects: Sequence[EvalObject]) -> list[EvalQuery]:
    """Every name and synonym once (first spelling kept), each with all objects it names."""
    index = _phrase_index(objects)
    out, seen = [], set()
    for o in objects:
        for t in [o.name, *o.synonyms]:
            k = t.strip().lower()
            if k and k not in seen:
                seen.add(k)
                out.append(EvalQuery(t.strip(), index[k]))
    return out


def read_queries(path: str | Path, objects: Sequence[EvalObject]) -> list[EvalQuery]:
    """Read a queries file (format in the module docstring).

    Raises:
        ValueError: a target that names no object, or a phrase without targets.
    """
    index = _phrase_index(objects)
    by_name: dict[str, list[int]] = {}
    for o in objects:
        by_name.setdefault(o.name.strip().lower(), []).append(o.id)
    ids = {o.id for o in objects}
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        text, _, spec = line.partition("=>")
        text = text.strip()
        if spec.strip():
            targets: list[int] = []
            for t in (x.strip() for x in spec.split(",")):
                if t.isdigit() and int(t) in ids:
                    targets.append(int(t))
                elif t.lower() in by_name:
                    targets.extend(by_name[t.lower()])
                else:
                    raise ValueError(f"{path}:{n}: target {t!r} is no object id or name")
        else:
            targets = index.get(text.lower(), [])
            if not targets:
                raise ValueError(f"{path}:{n}: {text!r} is no object's name or synonym; write 'PHRASE => ID'")
        out.append(EvalQuery(text, list(dict.fromkeys(targets))))
    return out


def _clip_polygon(subject: np.ndarray, clip: np.ndarray) -> np.ndarray:
    """Sutherland–Hodgman clipping of a convex polygon by a convex counter-clockwise polygon (both (n, 2))."""
    out = subject
    for i in range(len(clip)):
        a, b = clip[i], clip[(i + 1) % len(clip)]
        if len(out) == 0:
            break
        edge = b - a
        side = edge[0] * (out[:, 1] - a[1]) - edge[1] * (out[:, 0] - a[0])  # >= 0: inside (left of edge)
        new = []
        for j in range(len(out)):
            p, q = out[j], out[(j + 1) % len(out)]
            sp, sq = side[j], side[(j + 1) % len(out)]
            if sp >= 0:
                new.append(p)
            if (sp >= 0) != (sq >= 0):
                t = sp / (sp - sq)
                new.append(p + t * (q - p))
        out = np.array(new) if new else np.zeros((0, 2))
    return out


def _area(poly: np.ndarray) -> float:
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def gravity_box_iou(center_a: np.ndarray, size_a: np.ndarray, rotation_a: np.ndarray,
                    center_b: np.ndarray, size_b: np.ndarray, rotation_b: np.ndarray,
                    up: np.ndarray | None = None) -> float:
    """3D IoU of two gravity-aligned boxes (yaw about a shared ``up``).

    Footprint intersection (convex polygon clipping in the plane orthogonal to ``up``) times the overlap of the
    vertical extents, over the union volume. Exact when both boxes' z axes are ``up``; boxes tilted away from it
    are treated as their footprint prisms.

    Args:
        center_*: (3,) centres (m). size_*: (3,) extents along box x, y, z (m). rotation_*: (3, 3) world-from-box.
        up: (3,) world up (default: box b's z axis).

    Returns:
        IoU in [0, 1].
    """
    u = normalize_up(np.asarray(rotation_b)[:, 2] if up is None else up)
    e1 = np.cross(u, [1.0, 0.0, 0.0] if abs(u[0]) < 0.9 else [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(u, e1)

    def footprint(c: np.ndarray, s: np.ndarray, R: np.ndarray) -> tuple[np.ndarray, float, float]:
        R = np.asarray(R, np.float64)
        s = np.asarray(s, np.float64)
        c = np.asarray(c, np.float64)
        # Horizontal half-axes: the box axes projected onto the plane; vertical extent along up.
        ax = [R[:, i] * s[i] / 2 for i in range(3)]
        h = sum(abs(float(a @ u)) for a in ax)
        horiz = sorted(ax, key=lambda a: abs(float(a @ u)))[:2]  # the two most horizontal axes
        corners = np.array([c + sx * horiz[0] + sy * horiz[1] for sx, sy in ((1, 1), (-1, 1), (-1, -1), (1, -1))])
        xy = np.stack([corners @ e1, corners @ e2], axis=1)
        centre = xy.mean(axis=0)
        ang = np.arctan2(xy[:, 1] - centre[1], xy[:, 0] - centre[0])
        return xy[np.argsort(ang)], float(c @ u - h), float(c @ u + h)

    pa, za0, za1 = footprint(center_a, size_a, rotation_a)
    pb, zb0, zb1 = footprint(center_b, size_b, rotation_b)
    dz = max(0.0, min(za1, zb1) - max(za0, zb0))
    if dz <= 0:
        return 0.0
    inter = _area(_clip_polygon(pa, pb)) * dz
    va, vb = _area(pa) * (za1 - za0), _area(pb) * (zb1 - zb0)
    union = va + vb - inter
    return float(inter / union) if union > 0 else 0.0


def score_query(query: EvalQuery, top: dict | None, objects: dict[int, EvalObject], margin: float = 0.10,
                up: np.ndarray | None = None) -> tuple[bool, float, int | None]:
    """Score one answer.

    Args:
        query: the phrase and its target ids.
        top: the top-1 result as :func:`langgs_ros.query.to_json_dict` writes it plus ``"rotation"`` (3x3 list,
            world-from-box), or None when nothing was returned.
        objects: id -> annotated object. margin: box growth (m). up: world up for the IoU.

    Returns:
        (found: centre inside a grown target box, IoU of the top box with the best-overlapping target box,
        id of that target or None).
    """
    if top is None:
        return False, 0.0, None
    c = np.asarray(top["center"], np.float64)
    found = any(objects[t].contains(c, margin) for t in query.targets)
    best, best_id = 0.0, None
    for t in query.targets:
        o = objects[t]
        iou = gravity_box_iou(c, np.asarray(top["size"]), np.asarray(top["rotation"]), o.center, o.size,
                              o.rotation, up)
        if best_id is None or iou > best:
            best, best_id = iou, t
    return found, best, best_id
