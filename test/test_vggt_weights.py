"""Checkpoint loading for the VGGT backbone (langgs_ros.models.vggt.weights)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from langgs_ros.models.vggt import (
    VGGT,
    VGGTConfig,
    WeightsNotFoundError,
    build_vggt,
    load_vggt_weights,
)


def _random_model(seed: int = 0) -> VGGT:
    torch.manual_seed(seed)
    model = VGGT(VGGTConfig.tiny()).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial values, so that a parameter that was not loaded is visible
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(r / math.sqrt(math.prod(p.shape[1:])))
            elif name.endswith(("weight", "gamma")):
                p.copy_(0.5 + 0.25 * r)
            else:
                p.copy_(0.1 * r)
    return model


def _images(seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 2, 3, 56, 70, generator=torch.Generator().manual_seed(seed))


def _assert_same_outputs(a: VGGT, b: VGGT) -> None:
    images = _images()
    with torch.inference_mode():
        oa, ob = a(images), b(images)
    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        torch.testing.assert_close(oa[key], ob[key], atol=1e-6, rtol=1e-6, msg=key)


@pytest.fixture()
def source() -> VGGT:
    return _random_model(0)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", "-nested-state_dict.pt", "-nested-model.pt"])
def test_roundtrip_formats(tmp_path: Path, source: VGGT, suffix: str) -> None:
    sd = {k: v.clone().contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    elif "state_dict" in suffix:
        torch.save({"state_dict": sd, "epoch": 3}, path)
    elif "model" in suffix:
        torch.save({"model": sd, "optimizer": {}}, path)
    else:
        torch.save(sd, path)
    target = _random_model(1)
    info = load_vggt_weights(target, path)
    assert info.path == path and info.ignored_keys == ()
    _assert_same_outputs(source, target)


def test_directory_and_build_vggt(tmp_path: Path, source: VGGT) -> None:
    torch.save(source.state_dict(), tmp_path / "model.pt")
    model = build_vggt("tiny", weights=tmp_path)  # directory: model.pt is found inside
    assert not model.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    _assert_same_outputs(source, model)


def test_build_vggt_trunk_dtype_keeps_heads_fp32(tmp_path: Path, source: VGGT) -> None:
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = build_vggt(VGGTConfig.tiny(), weights=path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.aggregator.parameters())
    for head in (model.camera_head, model.depth_head, model.point_head):
        assert head is not None and all(p.dtype == torch.float32 for p in head.parameters())
    with torch.inference_mode():
        out = model(_images())
        ref = source(_images())
    for key in ("pose_enc", "depth", "world_points", "depth_conf"):
        assert out[key].dtype == torch.float32
        assert torch.isfinite(out[key]).all()
    # bfloat16 trunk: same ballpark as float32, not identical.
    assert (out["depth"] - ref["depth"]).abs().max() < 0.1 * ref["depth"].abs().max()


def test_heads_fp32_under_cpu_autocast(source: VGGT) -> None:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = source(_images())
    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        assert out[key].dtype == torch.float32, key


def test_missing_file_raises_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "vggt.pt"
    with pytest.raises(WeightsNotFoundError) as info:
        load_vggt_weights(VGGT(VGGTConfig.tiny()), missing)
    msg = str(info.value)
    assert str(missing) in msg and "langgs-download-weights vggt" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_missing_repo_in_cache_raises_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as info:
        load_vggt_weights(VGGT(VGGTConfig.tiny()), "facebook/VGGT-1B-Commercial", cache_dir=tmp_path / "hf")
    msg = str(info.value)
    assert "facebook/VGGT-1B-Commercial" in msg and "vggt_1B_commercial.pt" in msg
    assert "langgs-download-weights vggt" in msg


def test_track_head_keys_are_ignored(tmp_path: Path, source: VGGT) -> None:
    sd = dict(source.state_dict())
    sd["track_head.feature_extractor.norm.weight"] = torch.ones(8)
    sd["track_head.tracker.corr_mlp.fc1.weight"] = torch.zeros(4, 4)
    path = tmp_path / "with_track.pt"
    torch.save(sd, path)
    target = _random_model(2)
    info = load_vggt_weights(target, path)
    assert set(info.ignored_keys) == {
        "track_head.feature_extractor.norm.weight",
        "track_head.tracker.corr_mlp.fc1.weight",
    }
    _assert_same_outputs(source, target)


def test_missing_key_raises(tmp_path: Path, source: VGGT) -> None:
    sd = dict(source.state_dict())
    del sd["depth_head.scratch.output_conv2.2.bias"]
    path = tmp_path / "incomplete.pt"
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match=r"output_conv2\.2\.bias"):
        load_vggt_weights(VGGT(VGGTConfig.tiny()), path)


def test_unexpected_key_raises(tmp_path: Path, source: VGGT) -> None:
    sd = dict(source.state_dict())
    sd["aggregator.extra_token"] = torch.zeros(3)
    path = tmp_path / "extra.pt"
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="extra_token"):
        load_vggt_weights(VGGT(VGGTConfig.tiny()), path)


def test_shape_mismatch_raises(tmp_path: Path, source: VGGT) -> None:
    sd = dict(source.state_dict())
    sd["camera_head.empty_pose_tokens"] = torch.zeros(1, 1, 7)
    path = tmp_path / "bad_shape.pt"
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="empty_pose_tokens"):
        load_vggt_weights(VGGT(VGGTConfig.tiny()), path)
