"""Tests of open-vocabulary queries (langgs_ros.query): LERF relevancy, ranking, validation, approach poses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _core_fixtures import FixedTextEncoder

from langgs_ros.geometry import rotation_from_yaw
from langgs_ros.query import ObjectResult, QueryConfig, QueryEngine, approach_pose, lerf_relevancy, to_json_dict
from langgs_ros.types import Gaussians, InstanceTable, MapSnapshot

D = 8
CANON = ("object", "things", "stuff", "texture")


def _unit(v) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=torch.float32)
    return v / v.norm()


def _encoder() -> FixedTextEncoder:
    e = torch.eye(D)
    table = {
        "chair": e[0], "table": e[1], "red mug": e[2],
        "a seat": _unit(0.9 * e[0] + 0.1 * e[1] + 0.3 * e[7]),
        "object": _unit(e[7] + 0.2 * e[6]), "things": _unit(e[7] + 0.2 * e[5]),
        "stuff": _unit(e[7] + 0.2 * e[4]), "texture": _unit(e[6]), "furniture": _unit(e[0] + e[1]),
    }
    return FixedTextEncoder(table, encoder_id="fixed:test")


def _box_points(center, size, yaw, up=(0, 0, 1), n=2000, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    local = (rng.random((n, 3)) - 0.5) * np.asarray(size)
    return local @ rotation_from_yaw(yaw, up).T + np.asarray(center)


def _snapshot(emb: torch.Tensor, centers, sizes, yaws, names, cameras=None, floor=0.0,
              encoder_id="fixed:test") -> MapSnapshot:
    pts, ids = [], []
    for k, (c, s, y) in enumerate(zip(centers, sizes, yaws)):
        p = _box_points(c, s, y, seed=k)
        pts.append(p)
        ids.append(np.full(len(p), k, np.int32))
    P = torch.from_numpy(np.concatenate(pts)).float() if pts else torch.zeros(0, 3)
    N = P.shape[0]
    g = Gaussians(P, torch.tensor([[1.0, 0, 0, 0]]).repeat(N, 1), torch.full((N, 3), 0.01), torch.ones(N),
                  torch.rand(N, 3), torch.from_numpy(np.concatenate(ids)) if ids else torch.zeros(0, dtype=torch.int32),
                  weights=torch.ones(N))
    K = emb.shape[0]
    table = InstanceTable(ids=np.arange(K, dtype=np.int32), embeddings=emb, names=list(names),
                          centers=np.asarray(centers, float).reshape(-1, 3),
                          sizes=np.asarray(sizes, float).reshape(-1, 3), yaws=np.asarray(yaws, float),
                          num_gaussians=np.full(K, 2000, np.int64), observations=np.ones(K))
    return MapSnapshot(gaussians=g, instances=table, encoder_id=encoder_id,
                       camera_positions=np.zeros((0, 3)) if cameras is None else np.asarray(cameras, float),
                       floor_height=floor)


def test_lerf_relevancy_matches_formula() -> None:
    g = torch.Generator().manual_seed(0)
    E = torch.nn.functional.normalize(torch.randn(50, D, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    C = torch.nn.functional.normalize(torch.randn(4, D, generator=g), dim=1)
    for tau in (1.0, 0.1):
        ref = torch.stack([torch.exp(E @ q / tau) / (torch.exp(E @ c / tau) + torch.exp(E @ q / tau)) for c in C])
        torch.testing.assert_close(lerf_relevancy(E, q, C, tau), ref.min(0).values, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        lerf_relevancy(E, q[:3], C)
    with pytest.raises(ValueError):
        lerf_relevancy(E, q, C[:0])


def test_ranking_with_known_embeddings() -> None:
    e = torch.eye(D)
    emb = torch.stack([_unit(e[1] + 0.1 * e[3]), _unit(e[0] + 0.05 * e[3]), _unit(e[2]), _unit(e[0] + 0.6 * e[1])])
    snap = _snapshot(emb, [[2, 0, 0.4], [0, 2, 0.45], [1, 1, 0.8], [-1, 0, 0.4]],
                     [[1.5, 0.8, 0.8], [0.5, 0.5, 0.9], [0.1, 0.1, 0.1], [0.6, 0.6, 0.8]], [0.3, 0.0, 0.0, 0.5],
                     ["table", "chair", "red mug", "armchair"])
    enc = _encoder()
    qe = QueryEngine(enc, QueryConfig(min_score=0.0, top_k=4))
    res = qe.query(snap, "chair")
    assert [r.instance_id for r in res][:2] == [1, 3]  # pure chair first, then the chair-like armchair
    assert res[0].score == pytest.approx(float(lerf_relevancy(emb, enc.table["chair"],
                                                               torch.stack([enc.table[c] for c in CANON]))[1]))
    assert [r.instance_id for r in qe.query(snap, "red mug", top_k=1)] == [2]
    assert qe.query(snap, "  table ")[0].name == "table"  # whitespace stripped
    # Default threshold 0.5 drops instances no better than the canonical phrases.
    res = QueryEngine(enc).query(snap, "red mug")
    assert [r.instance_id for r in res] == [2]
    assert all(r.score >= 0.5 for r in res)
    # An extra negative equal to the query caps relevancy at 0.5.
    res = qe.query(snap, "chair", negatives=["chair"])
    assert max(r.score for r in res) == pytest.approx(0.5, abs=1e-6)
    # Boxes come from the instance's Gaussians (same robust fit as the map).
    r = qe.query(snap, "table", top_k=1)[0]
    np.testing.assert_allclose(r.center, [2, 0, 0.4], atol=0.05)
    np.testing.assert_allclose(r.size, [1.5, 0.8, 0.8], atol=0.08)
    assert abs(np.angle(np.exp(1j * (r.yaw - 0.3)))) < 0.05
    np.testing.assert_allclose(r.box_rotation, rotation_from_yaw(r.yaw, (0, 0, 1)), atol=1e-9)
    np.testing.assert_allclose(r.centroid, [2, 0, 0.4])


def test_text_embeddings_are_cached() -> None:
    e = torch.eye(D)
    snap = _snapshot(torch.stack([e[0], e[1]]), [[0, 0, 0.5], [2, 0, 0.5]], [[0.5] * 3, [0.5] * 3], [0, 0],
                     ["chair", "table"])
    enc = _encoder()
    qe = QueryEngine(enc)
    qe.query(snap, "chair")
    assert enc.encoded == 5  # query + 4 canonical phrases, one call
    qe.query(snap, "chair")
    qe.query(snap, "table")
    assert enc.encoded == 6 and enc.calls == 2  # only "table" was new


def test_bad_queries_and_empty_maps() -> None:
    enc = _encoder()
    qe = QueryEngine(enc)
    e = torch.eye(D)
    snap = _snapshot(e[:1], [[0, 0, 0.5]], [[0.5] * 3], [0], ["chair"])
    for bad in ("", "   ", "\n\t"):
        with pytest.raises(ValueError, match="empty"):
            qe.query(snap, bad)
    with pytest.raises(ValueError, match="1000"):
        qe.query(snap, "chair " * 200)
    with pytest.raises(ValueError, match="string"):
        qe.query(snap, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k"):
        qe.query(snap, "chair", top_k=0)
    with pytest.raises(ValueError, match="negative"):
        qe.query(snap, "chair", negatives=[" "])
    other = _snapshot(e[:1], [[0, 0, 0.5]], [[0.5] * 3], [0], ["chair"], encoder_id="other")
    with pytest.raises(ValueError, match="other"):
        qe.query(other, "chair")
    empty = MapSnapshot(gaussians=Gaussians.empty(), instances=InstanceTable.empty(D), encoder_id="fixed:test")
    assert qe.query(empty, "chair") == []
    with pytest.raises(ValueError):
        qe.query(empty, "")


def test_approach_pose_on_floor_facing_object() -> None:
    up = np.array([0.0, 0.0, 1.0])
    center, size, yaw = np.array([2.0, 1.0, 0.45]), np.array([2.0, 0.9, 0.8]), 0.4
    cams = np.array([[-3.0, 1.0, 1.2], [2.0, -1.5, 1.3], [6.0, 6.0, 1.2], [2.5, 1.2, 1.2]])  # last: in the box
    pos, ayaw = approach_pose(center, size, yaw, up, 0.02, cams)
    assert pos[2] == pytest.approx(0.02)  # on the floor
    r = max(0.6, 0.5 * np.hypot(2.0, 0.9) + 0.4)
    horiz = np.linalg.norm((pos - center)[:2])
    assert horiz == pytest.approx(r, abs=1e-9)
    # Chosen along the line to the visited camera whose distance is closest to the ring (the one at y = -1.5).
    d = (cams[1] - center)[:2]
    np.testing.assert_allclose((pos - center)[:2] / horiz, d / np.linalg.norm(d), atol=1e-9)
    to_obj = (center - pos)[:2]
    assert ayaw == pytest.approx(np.arctan2(to_obj[1], to_obj[0]))
    # A camera already inside the ring (but outside the object) is used as is.
    near = center + 0.6 * rotation_from_yaw(yaw, up)[:, 1] + [0, 0, 0.7]  # 0.15 m beside the long side
    pos2, _ = approach_pose(center, size, yaw, up, 0.0, near[None])
    np.testing.assert_allclose(pos2, [near[0], near[1], 0.0], atol=1e-9)
    # No cameras: on the ring along the box x axis.
    pos3, yaw3 = approach_pose(center, size, yaw, up, 0.0, np.zeros((0, 3)))
    np.testing.assert_allclose(pos3[:2], center[:2] + r * np.array([np.cos(yaw), np.sin(yaw)]), atol=1e-9)
    assert yaw3 == pytest.approx(np.angle(np.exp(1j * (yaw + np.pi))))
    # y-up world (hololens): the pose lies on the floor plane along y.
    up_y = np.array([0.0, 1.0, 0.0])
    c4 = np.array([1.0, -1.1, -0.9])
    pos4, yaw4 = approach_pose(c4, np.array([2.0, 0.9, 0.8]), 1.1, up_y, -1.53, np.array([[-1.0, 0.2, 1.0]]))
    assert pos4 @ up_y == pytest.approx(-1.53)
    # yaw frame for up = +y: e1 = +x, e2 = up x e1 = -z.
    to_obj = c4 - pos4
    assert yaw4 == pytest.approx(np.arctan2(-to_obj[2], to_obj[0]))


def test_query_results_carry_approach_and_json() -> None:
    e = torch.eye(D)
    snap = _snapshot(torch.stack([e[0], e[1]]), [[0, 0, 0.45], [3, 0, 0.4]], [[0.5, 0.5, 0.9], [1.5, 0.8, 0.8]],
                     [0.0, 0.0], ["chair", "table"], cameras=[[-2.0, 0.0, 1.2], [1.5, 2.0, 1.2]], floor=0.0)
    qe = QueryEngine(_encoder())
    res = qe.query(snap, "table")
    assert len(res) == 1 and isinstance(res[0], ObjectResult)
    r = res[0]
    assert r.approach_position[2] == pytest.approx(0.0)
    heading = np.array([np.cos(r.approach_yaw), np.sin(r.approach_yaw)])
    to_obj = (r.center - r.approach_position)[:2]
    assert heading @ to_obj / np.linalg.norm(to_obj) == pytest.approx(1.0)
    d = to_json_dict(res, "table")
    assert set(d) == {"query", "objects"} and d["query"] == "table"
    assert set(d["objects"][0]) == {"id", "name", "score", "center", "size", "yaw", "num_gaussians"}
    json.dumps(d)
    assert to_json_dict([], "x") == {"query": "x", "objects": []}


def test_answer_names_best_candidates_below_threshold() -> None:
    """A query nothing reaches above min_score: no objects, and a message with the best candidates (one per
    name) and their scores, computed from the same relevancy as query()."""
    e = torch.eye(D)
    emb = torch.stack([_unit(e[0] + 0.05 * e[3]), _unit(e[0] + 0.05 * e[3]), _unit(e[1]), _unit(e[2])])
    snap = _snapshot(emb, [[0, 0, 0.5], [0.1, 0, 0.5], [2, 0, 0.4], [1, 1, 0.8]], [[0.5] * 3] * 4, [0.0] * 4,
                     ["chair", "chair", "table", None])
    enc = _encoder()
    qe = QueryEngine(enc, QueryConfig(min_score=0.8))
    ans = qe.answer(snap, " a seat ")
    s = qe.scores(snap, "a seat")
    assert ans.objects == [] and ans.query == "a seat" and ans.min_score == 0.8
    assert 0.5 < float(s.max()) <= 0.8
    # One candidate per name (the two chair fragments count once), best first, the unnamed one as #id.
    assert [c.label for c in ans.candidates] == ["chair", "table", "#3"]
    assert ans.candidates[0].score == pytest.approx(float(s[:2].max()))
    assert ans.message.startswith("a seat: nothing above 0.80; best: chair ")
    assert f"chair {ans.candidates[0].score:.2f}" in ans.message and "table" in ans.message
    # Found -> same objects as query(), empty message.
    ans = qe.answer(snap, "chair", top_k=2, min_score=0.5)
    assert [r.instance_id for r in ans.objects] == [0, 1]
    assert [r.instance_id for r in qe.query(snap, "chair", top_k=2, min_score=0.5)] == [0, 1]
    assert ans.message == "" and ans.candidates[0].name == "chair"
    empty = MapSnapshot(gaussians=Gaussians.empty(), instances=InstanceTable.empty(D), encoder_id="fixed:test")
    assert qe.answer(empty, "chair").message == "chair: nothing above 0.80; the map has no instances"
