"""Numerical conformance of langgs_ros.models.vggt with the reference VGGT (arXiv 2503.11651).

Uses the fixture in ``<workspace>/shared/fixtures/vggt`` (see its README): a tiny VGGT with random
weights run by the reference implementation (facebookresearch/vggt @ 44b3afb) on CPU in float32.
Every saved output of every case is compared with atol = rtol = 1e-4 (intrinsics relatively), as
the fixture README recommends. The VGGT-1B preset is checked against the full-size state-dict
manifest on the ``meta`` device (no 5 GB allocation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from langgs_ros.models.vggt import VGGT, VGGTConfig, pose_encoding_to_extri_intri

FIXTURE_DIR = Path(__file__).resolve().parents[1].parent / "shared/fixtures/vggt"
CASES = ("main", "seq_len_1", "seq_len_5", "hw_42x84")
ATOL = 1e-4
RTOL = 1e-4

pytestmark = pytest.mark.skipif(
    not FIXTURE_DIR.is_dir(), reason=f"VGGT conformance fixture folder {FIXTURE_DIR} is absent"
)


@pytest.fixture(scope="module")
def fixture() -> dict[str, Any]:
    path = FIXTURE_DIR / "vggt_tiny_reference.pt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tiny_model(fixture: dict[str, Any]) -> VGGT:
    model = VGGT(VGGTConfig.tiny()).eval()
    model.load_state_dict(fixture["state_dict"], strict=True)
    return model


@pytest.fixture(scope="module")
def outputs(fixture: dict[str, Any], tiny_model: VGGT) -> dict[str, dict[str, Any]]:
    """Run the model once per case (the reference comparisons below reuse these results)."""
    results: dict[str, dict[str, Any]] = {}
    for case in CASES:
        ref = fixture if case == "main" else fixture[case]
        images = ref["images"]
        with torch.inference_mode():
            pred = tiny_model(images, return_aggregated_tokens=True)
            agg = tiny_model.aggregator
            vit = agg.patch_embed(agg.normalize_images(images).flatten(0, 1), return_all=True)
        extrinsic, intrinsic = pose_encoding_to_extri_intri(pred["pose_enc"], images.shape[-2:])
        pred.update(
            extrinsic=extrinsic,
            intrinsic=intrinsic,
            debug_vit_x_norm_patchtokens=vit["x_norm_patchtokens"],
            debug_vit_x_norm_clstoken=vit["x_norm_clstoken"],
            debug_vit_x_norm_regtokens=vit["x_norm_regtokens"],
        )
        results[case] = pred
    return results


def _ref(fixture: dict[str, Any], case: str) -> dict[str, Any]:
    return fixture if case == "main" else fixture[case]


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    err = (actual - expected).abs().max().item()
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")
    print(f"{name}: max abs err {err:.3e}")


def test_tiny_preset_matches_fixture_config(fixture: dict[str, Any], tiny_model: VGGT) -> None:
    ref_keys = [(k, tuple(v.shape)) for k, v in fixture["state_dict"].items()]
    ours = [(k, tuple(v.shape)) for k, v in tiny_model.state_dict().items()]
    assert ours == ref_keys
    assert sum(p.numel() for p in tiny_model.parameters()) == 1_523_128
    assert tiny_model.aggregator.patch_start_idx == 5


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    "key", ["pose_enc", "depth", "depth_conf", "world_points", "world_points_conf", "extrinsic"]
)
def test_dense_and_camera_outputs(
    fixture: dict[str, Any], outputs: dict[str, dict[str, Any]], case: str, key: str
) -> None:
    _close(f"{case}.{key}", outputs[case][key], _ref(fixture, case)[key])


@pytest.mark.parametrize("case", CASES)
def test_pose_enc_list(fixture: dict[str, Any], outputs: dict[str, dict[str, Any]], case: str) -> None:
    ours, ref = outputs[case]["pose_enc_list"], _ref(fixture, case)["pose_enc_list"]
    assert len(ours) == len(ref) == 4
    for i, (a, b) in enumerate(zip(ours, ref)):
        _close(f"{case}.pose_enc_list.{i}", a, b)
    torch.testing.assert_close(ours[-1], outputs[case]["pose_enc"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_aggregated_tokens(fixture: dict[str, Any], outputs: dict[str, dict[str, Any]], case: str) -> None:
    ours, ref = outputs[case]["aggregated_tokens_list"], _ref(fixture, case)["aggregated_tokens_list"]
    assert len(ours) == len(ref) == 4
    for i, (a, b) in enumerate(zip(ours, ref)):
        _close(f"{case}.aggregated_tokens_list.{i}", a, b)
    assert outputs[case]["patch_start_idx"] == _ref(fixture, case)["patch_start_idx"] == 5


@pytest.mark.parametrize("case", CASES)
def test_intrinsics_relative(fixture: dict[str, Any], outputs: dict[str, dict[str, Any]], case: str) -> None:
    ours, ref = outputs[case]["intrinsic"], _ref(fixture, case)["intrinsic"]
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)
    rel = ((ours - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
    print(f"{case}.intrinsic: max rel err {rel:.3e}")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("part", ["patchtokens", "clstoken", "regtokens"])
def test_vit_debug_tokens(
    fixture: dict[str, Any], outputs: dict[str, dict[str, Any]], case: str, part: str
) -> None:
    key = f"debug_vit_x_norm_{part}"
    _close(f"{case}.{key}", outputs[case][key], _ref(fixture, case)[key])


def test_default_forward_matches_all_layer_forward(fixture: dict[str, Any], tiny_model: VGGT) -> None:
    """Keeping only the head layers, 4-D input and frame chunking do not change the outputs."""
    images = fixture["seq_len_5"]["images"]
    with torch.inference_mode():
        full = tiny_model(images, return_aggregated_tokens=True)
        lean = tiny_model(images[0], frames_chunk_size=2)
    assert "aggregated_tokens_list" not in lean
    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        torch.testing.assert_close(lean[key], full[key], atol=1e-5, rtol=1e-5)
    assert lean["depth"].shape == (1, 5, 56, 70, 1)
    assert lean["world_points"].shape == (1, 5, 56, 70, 3)
    assert lean["depth_conf"].shape == lean["world_points_conf"].shape == (1, 5, 56, 70)


def test_inference_mode_keeps_no_graph(fixture: dict[str, Any], tiny_model: VGGT) -> None:
    with torch.inference_mode():
        out = tiny_model(fixture["images"])
    assert all(not t.requires_grad and t.grad_fn is None for t in out["pose_enc_list"])
    assert out["depth"].grad_fn is None and out["world_points"].grad_fn is None


def test_vggt_1b_preset_matches_manifest() -> None:
    manifest_path = FIXTURE_DIR / "vggt_1b_manifest.json"
    if not manifest_path.is_file():
        pytest.skip(f"{manifest_path} is absent")
    manifest = json.loads(manifest_path.read_text())
    expected = [
        (e["key"], tuple(e["shape"]))
        for e in manifest["state_dict"]
        if not e["key"].startswith("track_head.")
    ]
    assert all(e["dtype"] == "float32" for e in manifest["state_dict"])
    with torch.device("meta"):
        model = VGGT(VGGTConfig.vggt_1b())
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == expected
    n_params = sum(p.numel() for p in model.parameters())
    by_module = manifest["parameters_by_top_level_module"]
    assert n_params == manifest["total_parameters"] - by_module["track_head"]
    for name in ("aggregator", "camera_head", "depth_head", "point_head"):
        assert sum(p.numel() for p in getattr(model, name).parameters()) == by_module[name], name
