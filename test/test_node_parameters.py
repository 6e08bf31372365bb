"""The node's parameter table (descriptors, validation) and its error accounting (Health.guard), without DDS."""

from __future__ import annotations

import math

import pytest

from langgs_ros.ros.health import Health
from langgs_ros.ros.parameters import CONFIGURE, PARAMETERS, READ_ONLY, RUNTIME, descriptor, validate


def test_every_parameter_has_a_descriptor_matching_its_default() -> None:
    for name, spec in PARAMETERS.items():
        d = descriptor(name, spec)
        assert d.name == name and d.description
        assert d.read_only == (spec.change == READ_ONLY)
        assert validate(name, spec.default, {n: s.default for n, s in PARAMETERS.items()}) is None, name
        if spec.range is not None and isinstance(spec.default, float):
            r = d.floating_point_range[0]
            assert r.from_value <= spec.default <= r.to_value
        if spec.range is not None and isinstance(spec.default, int) and not isinstance(spec.default, bool):
            r = d.integer_range[0]
            assert r.from_value <= spec.default <= r.to_value
    # the kinds the issue names
    assert PARAMETERS["window.size"].change == CONFIGURE and PARAMETERS["map_frame"].change == CONFIGURE
    assert PARAMETERS["sync_tolerance"].change == RUNTIME and PARAMETERS["query.min_score"].change == RUNTIME
    assert PARAMETERS["map_dir"].change == READ_ONLY and PARAMETERS["allow_any_path"].change == READ_ONLY


@pytest.mark.parametrize(("name", "value", "words"), [
    ("sync_tolerance", -1.0, "[0"), ("publish.max_points", -1, "[1"), ("backend", "nerf", "one of"),
    ("device", "gpu", "cuda:N"), ("query.min_score", math.nan, "finite"), ("camera_extrinsic_xyz", [1.0], "3"),
    ("window.overlap", 8, "window.size"),
])
def test_invalid_values_are_refused_with_a_reason(name, value, words) -> None:
    current = {n: s.default for n, s in PARAMETERS.items()}
    reason = validate(name, value, current)
    assert reason is not None and words in reason


def test_valid_values_pass() -> None:
    current = {n: s.default for n, s in PARAMETERS.items()}
    for name, value in [("device", "cuda:1"), ("device", "auto"), ("window.size", 3), ("query.min_score", 0.0)]:
        assert validate(name, value, current) is None


class _Logger:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def warning(self, msg: str) -> None:
        self.lines.append(("warning", msg))

    def error(self, msg: str) -> None:
        self.lines.append(("error", msg))


def test_guard_catches_answers_counts_and_throttles() -> None:
    class Response:
        success = True
        message = ""

    log = _Logger()
    h = Health(log, throttle=3600.0)

    def handler(request, response):
        raise TypeError("num_gaussians_total is None")

    guarded = h.guard("load_map", handler, response_index=1)
    for _ in range(3):
        resp = guarded(object(), Response())
        assert resp.success is False and "TypeError" in resp.message and "map unchanged" in resp.message
    assert h.faults == {"load_map": 3} and h.recent_fault and "num_gaussians_total" in h.last_fault
    assert len([x for x in log.lines if x[0] == "error"]) == 1  # throttled
    assert h.guard("timer", lambda: 1 / 0)() is None and h.faults["timer"] == 1
    h.warn("image", "bad image")
    h.warn("image", "bad image")
    assert h.warnings["image"] == 2 and len([x for x in log.lines if x[0] == "warning"]) == 1


def test_every_clip_sam_knob_is_a_node_parameter_and_reaches_the_source() -> None:
    """Each ClipSamConfig field (but the device, the tiny preset's seed and world_up, which come from the node) is
    a ``semantic.<name>`` parameter with the same default, and the node's pipeline config carries a changed value
    of each into the clip_sam source's config."""
    from dataclasses import fields, replace
    from types import SimpleNamespace

    from langgs_ros.ros.mapping_node import MappingNode
    from langgs_ros.semantics.clip_sam import ClipSamConfig

    defaults = ClipSamConfig()
    knobs = [f.name for f in fields(ClipSamConfig) if f.name not in ("device", "seed", "world_up")]
    for name in knobs:
        spec = PARAMETERS.get(f"semantic.{name}")
        assert spec is not None, name
        want = getattr(defaults, name)
        got = spec.default
        if isinstance(want, tuple):
            assert tuple(got) == want, name
        else:
            assert (got or None) == want if want is None else got == want, (name, got, want)
    params = {n: s.default for n, s in PARAMETERS.items()}
    changed = {"points_per_batch": 32, "pred_iou_thresh": 0.8, "max_masks": 7, "precision": "fp16", "stuff": "drop",
               "mask_levels": ["subpart"], "crop_contexts": [0.2], "subtract_smaller": False, "min_pixels": 9,
               "stuff_floor_below": 0.5, "batch_size": 4, "clip_checkpoint": "/x/clip.bin"}
    params.update({f"semantic.{k}": v for k, v in changed.items()})
    params["device"] = "cpu"
    node = SimpleNamespace(backend="rgbd", semantic_source="clip_sam", label_names=None)
    cfg = MappingNode._pipeline_config(node, params)
    built = replace(ClipSamConfig(), **cfg.semantic_args)
    for k, v in changed.items():
        assert getattr(built, k) == (tuple(v) if isinstance(v, list) else v), k
    assert validate("semantic.mask_levels", ["part", "bogus"]) is not None
    assert validate("semantic.crop_contexts", [-1.0]) is not None
