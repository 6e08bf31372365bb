"""The ``clip_sam`` source: mask resolution, masked crops, tiny-preset end to end on real frames, weight round trips.

The tiny presets are random-init SAM / CLIP models of the real architectures (segment_anything.modeling classes,
open_clip's CLIP class): their masks and embeddings are meaningless, but every code path (SamAutomaticMaskGenerator,
mask resolution, crops, open_clip preprocessing and image tower, checkpoint loading) is the real one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from langgs_ros.datasets import RGBDSequence
from langgs_ros.semantics.base import make_semantic_source
from langgs_ros.semantics.clip_sam import ClipSamSemanticSource, masked_crops, resolve_masks, square_context_boxes
from langgs_ros.semantics.presets import build_sam_tiny, load_sam, resolve_sam_checkpoint
from langgs_ros.semantics.text import OpenClipModel, load_open_clip_model
from langgs_ros.types import NO_INSTANCE, Frame


@pytest.fixture(scope="module")
def seq(hololens_seq) -> RGBDSequence:
    return hololens_seq


@pytest.fixture(scope="module")
def tiny_clip() -> OpenClipModel:
    return load_open_clip_model(preset="tiny", device="cpu", seed=0)


# ---------------------------------------------------------------------------------------------------- resolve_masks


def _rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_resolve_masks_smaller_overwrites_larger() -> None:
    big = _rect(40, 60, 0, 40, 0, 60)      # whole image (2400 px)
    mid = _rect(40, 60, 5, 35, 5, 35)      # 900 px inside big
    small = _rect(40, 60, 10, 20, 10, 20)  # 100 px inside mid
    ids, kept = resolve_masks(np.stack([small, big, mid]), min_pixels=10)
    assert kept.tolist() == [1, 2, 0]  # painting order: largest first
    assert ids[15, 15] == 2 and ids[30, 30] == 1 and ids[38, 58] == 0
    assert ids.dtype == np.int32 and set(np.unique(ids).tolist()) == {0, 1, 2}


def test_resolve_masks_drops_hidden_and_limits() -> None:
    a = _rect(40, 60, 0, 20, 0, 30)      # 600 px
    b = _rect(40, 60, 0, 20, 0, 30)      # same region, painted after a (stable order) -> a fully hidden
    c = _rect(40, 60, 30, 33, 50, 53)    # 9 px < min_pixels
    d = _rect(40, 60, 25, 40, 0, 20)     # 300 px
    ids, kept = resolve_masks(np.stack([a, b, c, d]), min_pixels=10)
    assert kept.tolist() == [1, 3]
    assert np.all(ids[30:33, 50:53] == NO_INSTANCE) and np.all(ids[0:20, 0:30] == 0)
    ids2, kept2 = resolve_masks(np.stack([a, c, d]), min_pixels=5, max_masks=1)
    assert kept2.tolist() == [0] and np.all(ids2[25:40, 0:20] == NO_INSTANCE)
    # A dropped small mask does not leave a hole in the mask below it.
    e = _rect(40, 60, 0, 40, 0, 60)
    ids3, kept3 = resolve_masks(np.stack([e, c]), min_pixels=10)
    assert kept3.tolist() == [0] and np.all(ids3 == 0)


def test_resolve_masks_iou_order_and_empty() -> None:
    big = _rect(20, 20, 0, 20, 0, 20)
    small = _rect(20, 20, 5, 10, 5, 10)
    ids, kept = resolve_masks(np.stack([big, small]), scores=np.array([0.9, 0.5]), overlap="iou", min_pixels=1)
    assert kept.tolist() == [0] and np.all(ids == 0)  # the confident big mask wins every pixel
    ids0, kept0 = resolve_masks(np.zeros((0, 7, 9), bool))
    assert ids0.shape == (7, 9) and np.all(ids0 == NO_INSTANCE) and kept0.shape == (0,)
    with pytest.raises(ValueError):
        resolve_masks(np.stack([big]), overlap="iou")
    with pytest.raises(ValueError):
        resolve_masks(big)


# ---------------------------------------------------------------------------------------------------- crops


def test_masked_crops_content() -> None:
    H, W = 60, 80
    image = torch.zeros(3, H, W)
    image[2] = 1.0                      # blue background
    image[:, 20:40, 30:50] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # red object
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    mask[0, 20:40, 30:50] = True
    fill = (0.5, 0.5, 0.5)
    crops = masked_crops(image, mask, (32, 32), context=0.25, background_keep=0.2, fill=fill)
    assert crops.shape == (1, 3, 32, 32)
    centre = crops[0, :, 14:18, 14:18].mean(dim=(1, 2))
    torch.testing.assert_close(centre, torch.tensor([1.0, 0.0, 0.0]), atol=1e-4, rtol=0)
    corner = crops[0, :, 0, 0]  # background: 0.2 * blue + 0.8 * grey
    torch.testing.assert_close(corner, torch.tensor([0.4, 0.4, 0.6]), atol=1e-4, rtol=0)
    # Square box: 20 px object + 25 % context per side = 30 px, centred on the object.
    torch.testing.assert_close(square_context_boxes(mask, 0.25), torch.tensor([[25.0, 15.0, 55.0, 45.0]]))
    # A mask at the image border: the part of the crop outside the image is the fill colour.
    edge = torch.zeros(1, H, W, dtype=torch.bool)
    edge[0, 0:10, 0:10] = True
    c2 = masked_crops(image, edge, (16, 16), context=0.5, background_keep=1.0, fill=fill)
    torch.testing.assert_close(c2[0, :, 0, 0], torch.tensor(fill), atol=1e-4, rtol=0)
    assert masked_crops(image, mask[:0], (8, 8)).shape == (0, 3, 8, 8)
    # Crops far larger than the output come from the average-pooled pyramid: the same pixels as a full-resolution
    # area average (roi_align over the whole crop), up to the pyramid's bilinear sampling.
    from torchvision.ops import roi_align

    gen = torch.Generator().manual_seed(0)
    big = F.interpolate(torch.rand(1, 3, 45, 60, generator=gen), size=(360, 480), mode="bilinear")[0]
    masks = torch.zeros(3, 360, 480, dtype=torch.bool)
    masks[0, 100:300, 50:400] = True
    masks[1, 10:40, 10:30] = True
    masks[2, 150:350, 300:470] = True
    out = masked_crops(big, masks, (32, 32), context=0.4, background_keep=1.0, fill=fill)
    boxes = square_context_boxes(masks, 0.4)
    fill_t = torch.tensor(fill).view(1, 3, 1, 1)
    ref = roi_align(big[None] - fill_t, torch.cat([torch.zeros(3, 1), boxes], 1), (32, 32), spatial_scale=1.0,
                    sampling_ratio=-1, aligned=True) + fill_t
    assert float((out - ref).abs().mean()) < 0.01 and float((out - ref).abs().max()) < 0.1
    with pytest.raises(ValueError):
        masked_crops(image, mask[:, :10], (8, 8))


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("names", [
    pytest.param(("00063",), id="1frame"),
    pytest.param(("00031", "00063", "00103", "00155"), id="4frames", marks=pytest.mark.slow),
])
def test_clip_sam_tiny_end_to_end(seq: RGBDSequence, tiny_clip: OpenClipModel, names: tuple[str, ...]) -> None:
    """Tiny random SAM + CLIP on real frames (1 frame quick, 4 frames slow: ~20 s on 2 cores). Thresholds are
    lowered (pred IoU / stability 0, no box NMS) so that the random model yields masks at all; the masks are
    meaningless, the code path is the real one."""
    frames = [seq.frame(seq.names.index(n)) for n in names]
    src = ClipSamSemanticSource(preset="tiny", points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                box_nms_thresh=1.0, min_pixels=50, max_masks=30, clip=tiny_clip)
    assert src.text_encoder.clip is tiny_clip and src.text_encoder.dim == 64
    segs = src.segment(frames)
    assert len(segs) == len(frames)
    for frame, seg in zip(frames, segs):
        K = seg.num_instances
        assert 1 <= K <= 30
        assert seg.instance_ids.shape == frame.rgb.shape[:2] and seg.instance_ids.dtype == np.int32
        assert seg.instance_ids.min() >= NO_INSTANCE and seg.instance_ids.max() == K - 1
        counts = np.bincount(seg.instance_ids[seg.instance_ids >= 0].ravel(), minlength=K)
        assert counts.min() >= 50  # every instance visible with >= min_pixels
        assert seg.embeddings.shape == (K, 64) and seg.embeddings.dtype == torch.float32
        torch.testing.assert_close(seg.embeddings.norm(dim=1), torch.ones(K))
        assert seg.names == [None] * K and seg.class_ids is None
    assert src.last_timings["sam"] > 0 and src.last_timings["clip"] > 0
    # Same frame twice -> same result (deterministic model and resolution).
    again = src.segment(frames[:1])[0]
    np.testing.assert_array_equal(again.instance_ids, segs[0].instance_ids)
    torch.testing.assert_close(again.embeddings, segs[0].embeddings)


def test_clip_sam_zero_masks(seq: RGBDSequence, tiny_clip: OpenClipModel) -> None:
    """pred_iou_thresh above 1 rejects every SAM mask: K = 0, all background."""
    frame = seq.frame(seq.names.index("00063"))
    src = make_semantic_source("clip_sam", preset="tiny", points_per_side=2, pred_iou_thresh=1.01, clip=tiny_clip)
    assert isinstance(src, ClipSamSemanticSource)
    seg = src.segment([frame])[0]
    assert seg.num_instances == 0 and seg.embeddings.shape == (0, 64) and seg.names == []
    assert np.all(seg.instance_ids == NO_INSTANCE)


def test_clip_sam_bad_input(tiny_clip: OpenClipModel) -> None:
    src = ClipSamSemanticSource(preset="tiny", points_per_side=2, clip=tiny_clip)
    with pytest.raises(ValueError, match="uint8"):
        src.segment([Frame(rgb=np.zeros((20, 30, 3), np.float32), stamp=0.0)])
    with pytest.raises(ValueError, match="uint8"):
        src.segment([Frame(rgb=np.zeros((20, 30), np.uint8), stamp=0.0)])
    with pytest.raises(ValueError):
        ClipSamSemanticSource(preset="small", clip=tiny_clip)
    with pytest.raises(ValueError):
        ClipSamSemanticSource(preset="tiny", overlap="random", clip=tiny_clip)


# ---------------------------------------------------------------------------------------------------- weights


def test_sam_tiny_weight_round_trip(tmp_path: Path, seq: RGBDSequence) -> None:
    """Save the tiny SAM, load it through the torch.load + load_state_dict builder into a differently seeded
    model: identical parameters and identical predictions."""
    from segment_anything import SamPredictor

    src = build_sam_tiny(seed=0)
    path = tmp_path / "sam_tiny.pth"
    torch.save(src.state_dict(), path)
    other = build_sam_tiny(seed=1)
    loaded = load_sam(preset="tiny", checkpoint=path, seed=1)
    for (k, v), (k2, v2) in zip(src.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert any(not torch.equal(v, w) for v, w in zip(src.state_dict().values(), other.state_dict().values()))
    image = seq.frame(seq.names.index("00063")).rgb
    pts, lab = np.array([[100.0, 120.0], [300.0, 200.0]]), np.array([1, 1])
    outs = []
    for model in (src, loaded, other):
        pred = SamPredictor(model)
        pred.set_image(image)
        masks, scores, logits = pred.predict(point_coords=pts, point_labels=lab, multimask_output=True)
        outs.append((masks, scores, logits))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][2], outs[1][2])
    assert not np.array_equal(outs[0][2], outs[2][2])
    with pytest.raises(RuntimeError):  # a vit_b-sized builder refuses the tiny state dict
        from segment_anything import sam_model_registry

        sam_model_registry["vit_b"](checkpoint=str(path))


def test_clip_tiny_weight_round_trip(tmp_path: Path) -> None:
    """Save the tiny CLIP and load it with open_clip.create_model(pretrained=path) (open_clip's load_checkpoint)."""
    src = OpenClipModel.tiny(seed=0)
    path = tmp_path / "clip_tiny.pt"
    torch.save(src.model.state_dict(), path)
    loaded = OpenClipModel.tiny(seed=1, checkpoint=path)
    fresh = OpenClipModel.tiny(seed=1)
    texts = ["a sofa", "an espresso machine"]
    images = torch.rand(3, 3, 70, 50, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.encode_text(texts), src.encode_text(texts), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loaded.encode_image(images), src.encode_image(images), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fresh.encode_text(texts), src.encode_text(texts))
    assert loaded.encoder_id == "open_clip:tiny-random:clip_tiny"


def test_full_preset_missing_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANGGS_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=r"sam_vit_b_01ec64\.pth") as info:
        resolve_sam_checkpoint("vit_b")
    assert "langgs-download-weights" in str(info.value)
    with pytest.raises(FileNotFoundError, match="langgs-download-weights"):
        ClipSamSemanticSource(preset="full", sam_checkpoint=tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="unknown SAM model type"):
        resolve_sam_checkpoint("vit_x")


# ------------------------------------------------------------------------------------ multi-level, crops, stuff

LOW = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}


def test_level_generator_matches_the_library_generator(seq: RGBDSequence) -> None:
    """With NMS off, all three levels = the library generator's pooled output (same masks); one level = the
    masks of that multimask output only (a subset)."""
    from segment_anything import SamAutomaticMaskGenerator

    from langgs_ros.semantics.sam_levels import make_level_generator

    sam = build_sam_tiny(seed=0)
    rgb = seq.frame(seq.names.index("00063")).rgb[::2, ::2].copy()
    ref = SamAutomaticMaskGenerator(sam, points_per_side=3, **LOW).generate(rgb)
    allv = make_level_generator(sam, ("whole", "part", "subpart"), points_per_side=3, **LOW).generate_levels(rgb)
    assert len(ref) == len(allv) == 27  # 9 points x 3 outputs, nothing filtered
    key = lambda m: np.packbits(m).tobytes()  # noqa: E731
    assert sorted(key(r["segmentation"]) for r in ref) == sorted(key(r["segmentation"]) for r in allv)
    assert sorted(r["level"] for r in allv) == [0] * 9 + [1] * 9 + [2] * 9
    whole = make_level_generator(sam, ("whole",), points_per_side=3, **LOW).generate_levels(rgb)
    assert {key(r["segmentation"]) for r in whole} == {key(r["segmentation"]) for r in allv if r["level"] == 2}
    with pytest.raises(ValueError, match="levels"):
        make_level_generator(sam, ("everything",))


def test_multi_crop_embedding_is_the_mean_of_the_crops(tiny_clip: OpenClipModel) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    masks = np.zeros((2, 60, 80), bool)
    masks[0, 10:30, 10:40] = True
    masks[1, 35:55, 50:75] = True
    src = ClipSamSemanticSource(preset="tiny", points_per_side=2, clip=tiny_clip, crop_contexts=(0.1, 0.5))
    got = src.embed_masks(rgb, masks)
    image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    ref = torch.stack([tiny_clip.encode_image(masked_crops(image, torch.from_numpy(masks), tiny_clip.image_size,
                                                           context=c, fill=tiny_clip.mean)) for c in (0.1, 0.5)])
    torch.testing.assert_close(got, torch.nn.functional.normalize(ref.mean(0), dim=1), atol=1e-5, rtol=1e-5)


def test_window_batched_clip_pass_equals_per_frame(seq: RGBDSequence, tiny_clip: OpenClipModel) -> None:
    frames = [seq.frame(seq.names.index(n)) for n in ("00031", "00063")]
    for f in frames:  # half resolution keeps the test fast
        f.rgb, f.depth = f.rgb[::2, ::2].copy(), f.depth[::2, ::2].copy()
        f.intrinsics = f.intrinsics.copy()
        f.intrinsics[:2] /= 2
        f.labels = None
    src = ClipSamSemanticSource(preset="tiny", points_per_side=3, clip=tiny_clip, batch_size=7, max_masks=12,
                                **LOW)
    both = src.segment(frames)
    t = src.last_timings
    assert t["frames"] == 2 and all(t[k] > 0 for k in ("sam", "resolve", "crops", "clip"))
    for f, seg in zip(frames, both):
        one = src.segment([f])[0]
        np.testing.assert_array_equal(one.instance_ids, seg.instance_ids)
        torch.testing.assert_close(one.embeddings, seg.embeddings, atol=1e-5, rtol=1e-5)
        assert seg.num_instances >= 1


def _plane_depth(K: np.ndarray, H: int, W: int, n: np.ndarray, d: float) -> np.ndarray:
    """z-depth of the plane n·p = d (camera frame) at every pixel (0 where the ray misses it)."""
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    rays = np.stack([(xs - K[0, 2]) / K[0, 0], (ys - K[1, 2]) / K[1, 1], np.ones_like(xs)], axis=-1)
    denom = rays @ n
    z = np.where(np.abs(denom) > 1e-6, d / np.where(np.abs(denom) > 1e-6, denom, 1.0), 0.0)
    return np.where(z > 0, z, 0.0).astype(np.float32)


def test_stuff_classification_from_depth(seq: RGBDSequence) -> None:
    from langgs_ros.semantics.stuff import camera_up, classify_stuff

    H, W = 120, 160
    K = np.array([[100.0, 0, 80], [0, 100.0, 60], [0, 0, 1]])
    up = np.array([0.0, -1.0, 0.0])  # camera looking horizontally, y down
    floor = _plane_depth(K, H, W, up, -1.4)      # 1.4 m below the camera
    wall = _plane_depth(K, H, W, np.array([0.0, 0.0, 1.0]), 3.0)  # facing the camera at 3 m
    table = _plane_depth(K, H, W, up, -0.5)      # horizontal, 0.5 m below: an object, not floor
    rng = np.random.default_rng(0)
    blob = (2.0 + 0.3 * rng.standard_normal((H, W))).astype(np.float32)  # not planar
    bottom = np.zeros((H, W), bool)
    bottom[80:, :] = True
    top = np.zeros((H, W), bool)
    top[:40, :] = True
    small = np.zeros((H, W), bool)
    small[90:95, 10:20] = True
    depth = np.where(bottom, floor, wall)
    names = classify_stuff(np.stack([bottom, top, small]), depth, K, up)
    assert names == ["floor", "wall", None]
    assert classify_stuff(bottom[None], np.where(bottom, table, 0), K, up) == [None]
    assert classify_stuff(top[None], blob, K, up) == [None]
    assert classify_stuff(bottom[None], None, K, up) == [None]
    # Up from the pose: a camera rolled by 90 degrees sees the floor on its side.
    R = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])  # world_from_camera rotation
    pose = np.eye(4)
    pose[:3, :3] = R
    np.testing.assert_allclose(camera_up(pose, np.array([1.0, 0, 0])), [0, -1, 0], atol=1e-12)
    np.testing.assert_allclose(camera_up(None, None), [0, -1, 0])
    # Real frame: the pixels that lie on the annotated floor plane of hololens are a floor.
    import json

    meta = json.loads((seq.root / "annotations" / "objects.json").read_text())
    normal, offset = np.asarray(meta["floor_plane"]["normal"]), float(meta["floor_plane"]["offset"])
    best = None
    for i in range(0, len(seq), 6):
        f = seq.frame(i)
        v, u = np.nonzero(f.depth > 0)
        z = f.depth[v, u].astype(np.float64)
        pc = np.stack([(u - f.intrinsics[0, 2]) * z / f.intrinsics[0, 0],
                       (v - f.intrinsics[1, 2]) * z / f.intrinsics[1, 1], z], 1)
        pw = pc @ f.world_from_camera[:3, :3].T + f.world_from_camera[:3, 3]
        on = np.abs(pw @ normal + offset) < 0.02
        m = np.zeros(f.depth.shape, bool)
        m[v[on], u[on]] = True
        if best is None or m.sum() > best[1].sum():
            best = (f, m)
    f, m = best
    assert m.mean() > 0.08
    assert classify_stuff(m[None], f.depth, f.intrinsics, camera_up(f.world_from_camera, normal)) == ["floor"]


class KnownMasksSource(ClipSamSemanticSource):
    """Test double of the mask stage only: stands in for a trained SAM (the tiny random SAM's masks are
    meaningless) by returning fixed masks; resolution, stuff policy, crops and the CLIP tower are the real ones."""

    def __init__(self, masks: np.ndarray, **kwargs) -> None:
        super().__init__(**kwargs)
        self.known = masks

    def generate_masks(self, rgb: np.ndarray) -> list[dict]:
        return [{"segmentation": m, "area": int(m.sum()), "predicted_iou": 0.9, "stability_score": 0.9,
                 "level": 2} for m in self.known]


def test_stuff_policy_and_smaller_masks_subtracted(tiny_clip: OpenClipModel) -> None:
    """A synthetic RGB-D frame: lower half a floor plane 1.5 m below the camera with a box standing on it, upper
    half non-planar clutter. Policy "label": the floor mask becomes a 'floor' instance embedded as the CLIP text
    of 'floor'; "drop": it is removed; "keep": an object. With subtract_smaller the floor's crops exclude the box
    painted over it."""
    H, W = 96, 128
    K = np.array([[90.0, 0, 64], [0, 90.0, 48], [0, 0, 1]])
    up = np.array([0.0, -1.0, 0.0])
    rng = np.random.default_rng(1)
    lower = np.repeat(np.arange(H)[:, None] >= H // 2, W, axis=1)
    clutter = (1.0 + 2.0 * rng.random((H, W))).astype(np.float32)
    depth = np.where(lower, _plane_depth(K, H, W, up, -1.5), clutter).astype(np.float32)
    box = _rect(H, W, 60, 80, 40, 70)
    depth[box] = 2.0
    rgb = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    clutter_mask = _rect(H, W, 0, 40, 0, 60)
    frame = Frame(rgb=rgb, stamp=0.0, depth=depth, intrinsics=K)
    masks = np.stack([lower, box, clutter_mask])
    common = dict(preset="tiny", points_per_side=2, clip=tiny_clip, stuff_min_area=0.05, min_pixels=20)
    seg = KnownMasksSource(masks, **common).segment([frame])[0]
    by_name = {n: k for k, n in enumerate(seg.names)}
    assert sorted(seg.names, key=str) == sorted(["floor", None, None], key=str)
    floor = by_name["floor"]
    np.testing.assert_array_equal(seg.instance_ids == floor, lower & ~box)  # the box is painted over the floor
    torch.testing.assert_close(seg.embeddings[floor], KnownMasksSource(masks, **common).text_encoder.encode_text(
        ["floor"])[0])
    dropped = KnownMasksSource(masks, stuff="drop", **common).segment([frame])[0]
    assert dropped.num_instances == 2 and np.all(dropped.instance_ids[lower & ~box] == NO_INSTANCE)
    kept_src = KnownMasksSource(masks, stuff="keep", **common)
    kept = kept_src.segment([frame])[0]
    assert kept.names == [None] * 3
    np.testing.assert_array_equal(kept.instance_ids, seg.instance_ids)
    k_floor = int(kept.instance_ids[90, 5])
    torch.testing.assert_close(kept.embeddings[k_floor], kept_src.embed_masks(rgb, (lower & ~box)[None])[0])
    whole = KnownMasksSource(masks, stuff="keep", subtract_smaller=False, **common)
    e_whole = whole.segment([frame])[0].embeddings[k_floor]
    torch.testing.assert_close(e_whole, whole.embed_masks(rgb, lower[None])[0])
    assert not torch.allclose(e_whole, kept.embeddings[k_floor], atol=1e-4)
    with pytest.raises(ValueError, match="stuff"):
        ClipSamSemanticSource(preset="tiny", clip=tiny_clip, stuff="paint")
    with pytest.raises(ValueError, match="precision"):
        ClipSamSemanticSource(preset="tiny", clip=tiny_clip, precision="fp8")


def test_autocast_dtype() -> None:
    from langgs_ros.semantics.clip_sam import autocast_dtype

    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and autocast_dtype("fp16", cpu) is torch.float16
    if torch.cuda.is_available():
        assert autocast_dtype("auto", torch.device("cuda")) in (torch.bfloat16, torch.float16)
