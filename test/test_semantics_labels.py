"""The ``labels`` semantic source on real hololens frames (label images + objects.json names), MiniLM real weights."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from langgs_ros.datasets import RGBDSequence
from langgs_ros.semantics.base import make_semantic_source
from langgs_ros.semantics.labels import (
    LabelSemanticSource,
    link_components,
    load_label_names,
    split_by_3d_connectivity,
)
from langgs_ros.semantics.text import MiniLMTextEncoder
from langgs_ros.types import NO_INSTANCE, Frame


@pytest.fixture(scope="module")
def seq(hololens_seq) -> RGBDSequence:
    return hololens_seq


@pytest.fixture(scope="module")
def encoder() -> MiniLMTextEncoder:
    return MiniLMTextEncoder(device="cpu")


def _frame(seq: RGBDSequence, name: str) -> Frame:
    return seq.frame(seq.names.index(name))


@pytest.mark.parametrize("name", ["00039", "00063", "00087", "00155"])
def test_instances_match_label_ids(seq: RGBDSequence, encoder: MiniLMTextEncoder, name: str) -> None:
    frame = _frame(seq, name)
    assert frame.labels is not None and frame.label_names
    src = LabelSemanticSource(text_encoder=encoder, min_pixels=50)
    seg = src.segment([frame])[0]
    ids, counts = np.unique(frame.labels, return_counts=True)
    expected = [int(i) for i, c in zip(ids, counts) if i > 0 and c >= 50]
    assert seg.class_ids == expected and len(expected) >= 1
    assert seg.instance_ids.shape == frame.labels.shape and seg.instance_ids.dtype == np.int32
    for k, lid in enumerate(expected):
        np.testing.assert_array_equal(seg.instance_ids == k, frame.labels == lid)
    small = np.isin(frame.labels, [i for i, c in zip(ids, counts) if c < 50]) | (frame.labels == 0)
    assert np.all(seg.instance_ids[small] == NO_INSTANCE)
    assert seg.names == [frame.label_names[i] for i in expected]
    assert seg.embeddings.shape == (len(expected), 384) and seg.embeddings.dtype == torch.float32
    torch.testing.assert_close(seg.embeddings.norm(dim=1), torch.ones(len(expected)))
    torch.testing.assert_close(seg.embeddings, encoder.encode_text(seg.names), rtol=0, atol=1e-6)


def test_class_ids_split_far_objects(seq: RGBDSequence, encoder: MiniLMTextEncoder) -> None:
    """The two wicker fruit baskets (ids 6, 7; ~0.4 m apart) given one class id become two instances."""
    src = LabelSemanticSource(text_encoder=encoder, ids_are_instances=False)
    for name in ["00059", "00063", "00067"]:
        frame = _frame(seq, name)
        orig = frame.labels.copy()
        frame.labels = np.where(orig == 7, 6, orig).astype(np.int32)
        seg = src.segment([frame])[0]
        basket = [k for k, c in enumerate(seg.class_ids) if c == 6]
        assert len(basket) == 2, (name, seg.class_ids)
        assert all(seg.names[k] == "wicker fruit basket" for k in basket)
        for lid in (6, 7):
            got = seg.instance_ids[orig == lid]
            share = np.bincount(got[got >= 0], minlength=seg.num_instances)
            assert share.max() >= 0.95 * (orig == lid).sum(), (name, lid)
        dom6 = np.bincount(seg.instance_ids[orig == 6][seg.instance_ids[orig == 6] >= 0]).argmax()
        dom7 = np.bincount(seg.instance_ids[orig == 7][seg.instance_ids[orig == 7] >= 0]).argmax()
        assert dom6 != dom7 and {dom6, dom7} == set(basket)
        torch.testing.assert_close(seg.embeddings[basket[0]], seg.embeddings[basket[1]], rtol=1e-5, atol=1e-6)


def test_class_split_keeps_compact_object_whole(seq: RGBDSequence, encoder: MiniLMTextEncoder) -> None:
    """A compact object (espresso machine, frame 00155) is not split into several instances."""
    src = LabelSemanticSource(text_encoder=encoder, ids_are_instances=False)
    frame = _frame(seq, "00155")
    seg = src.segment([frame])[0]
    assert seg.class_ids == [12]
    assert (seg.instance_ids == 0).sum() >= 0.99 * (frame.labels == 12).sum()


def test_split_by_3d_connectivity_synthetic() -> None:
    K = np.array([[100.0, 0, 32], [0, 100.0, 24], [0, 0, 1]])
    mask = np.zeros((48, 64), bool)
    mask[10:30, 10:50] = True
    depth = np.full((48, 64), 2.0, np.float32)
    # Same image region, right half 1.5 m further away: touching in 2D, apart in 3D -> two parts.
    depth[:, 30:] = 3.5
    parts, n = split_by_3d_connectivity(mask, depth, K, link_distance=0.25)
    assert n == 2
    assert len(np.unique(parts[10:30, 10:30])) == 1 and len(np.unique(parts[10:30, 30:50])) == 1
    assert parts[15, 15] != parts[15, 40] and np.all(parts[~mask] == -1)
    # One flat surface with a band without depth: one part; the hole pixels join it.
    depth2 = np.full((48, 64), 2.0, np.float32)
    depth2[:, 28:31] = 0.0
    parts2, n2 = split_by_3d_connectivity(mask, depth2, K, link_distance=0.25)
    assert n2 == 1 and np.all(parts2[mask] == 0)
    # No depth at all: 2D connected components.
    mask3 = mask.copy()
    mask3[:, 29] = False
    parts3, n3 = split_by_3d_connectivity(mask3, None, None)
    assert n3 == 2 and parts3[15, 15] != parts3[15, 40]
    # A small fragment (< min_fraction of the largest part) is merged, not a separate instance.
    depth4 = np.full((48, 64), 2.0, np.float32)
    depth4[10:12, 10:12] = 4.0
    parts4, n4 = split_by_3d_connectivity(mask, depth4, K, link_distance=0.25, min_fraction=0.05, min_pixels=2)
    assert n4 == 1 and np.all(parts4[mask] == 0)
    # Only fragments, all below min_pixels: they join the largest one instead of failing.
    tiny = np.zeros((48, 64), bool)
    tiny[5:8, 5:8] = tiny[5:8, 40:43] = True
    depth5 = np.full((48, 64), 2.0, np.float32)
    depth5[:, 30:] = 5.0
    parts5, n5 = split_by_3d_connectivity(tiny, depth5, K, link_distance=0.25, min_pixels=50)
    assert n5 == 1 and np.all(parts5[tiny] == 0)


def test_link_components_distance() -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 0.3, (200, 3))
    b = a + np.array([1.0, 0, 0])  # gap 0.7 m
    lab = link_components(np.concatenate([a, b]), 0.25)
    assert len(np.unique(lab[:200])) == 1 and len(np.unique(lab[200:])) == 1 and lab[0] != lab[200]
    lab2 = link_components(np.concatenate([a, b]), 1.0)
    assert len(np.unique(lab2)) == 1
    assert link_components(np.zeros((0, 3)), 0.1).shape == (0,)
    with pytest.raises(ValueError):
        link_components(a, 0.0)


def test_unknown_ids_skipped_with_warning(seq: RGBDSequence, encoder: MiniLMTextEncoder,
                                          caplog: pytest.LogCaptureFixture) -> None:
    frame = _frame(seq, "00063")
    labels = frame.labels.copy()
    labels[:40, :40] = 99  # an id nobody named
    frame.labels = labels
    src = LabelSemanticSource(text_encoder=encoder)
    with caplog.at_level(logging.WARNING, logger="langgs_ros.semantics.labels"):
        seg = src.segment([frame])[0]
    assert 99 not in seg.class_ids and np.all(seg.instance_ids[:40, :40] == NO_INSTANCE)
    assert any("99" in r.getMessage() for r in caplog.records)
    # Frame without names: the constructor's names are used; frame names take precedence where both exist.
    frame.label_names = None
    seg2 = LabelSemanticSource(label_names={4: "table", 99: "mystery box"}, text_encoder=encoder).segment([frame])[0]
    assert seg2.class_ids == [4, 99] and seg2.names == ["table", "mystery box"]
    frame.label_names = {4: "long wooden table"}
    seg3 = LabelSemanticSource(label_names={4: "table"}, text_encoder=encoder).segment([frame])[0]
    assert seg3.class_ids == [4] and seg3.names == ["long wooden table"]


def test_bad_input(seq: RGBDSequence, encoder: MiniLMTextEncoder) -> None:
    src = LabelSemanticSource(text_encoder=encoder)
    frame = _frame(seq, "00063")
    bad = Frame(rgb=frame.rgb, stamp=0.0, frame_id="bad", labels=frame.labels[:-1], label_names=frame.label_names)
    with pytest.raises(ValueError, match="shape"):
        src.segment([bad])
    with pytest.raises(ValueError, match="no label image"):
        src.segment([Frame(rgb=frame.rgb, stamp=0.0, frame_id="nolabels")])
    with pytest.raises(ValueError, match="integer"):
        src.segment([Frame(rgb=frame.rgb, stamp=0.0, labels=frame.labels.astype(np.float32))])
    empty = Frame(rgb=frame.rgb, stamp=0.0, labels=np.zeros(frame.rgb.shape[:2], np.int32))
    seg = src.segment([empty])[0]
    assert seg.num_instances == 0 and seg.embeddings.shape == (0, 384) and np.all(seg.instance_ids == -1)
    with pytest.raises(ValueError):
        LabelSemanticSource(text_encoder=encoder, min_pixels=0)


def test_registry_and_names_file(seq: RGBDSequence, encoder: MiniLMTextEncoder, hololens_dir: Path) -> None:
    names_file = hololens_dir / "annotations" / "objects.json"
    names = load_label_names(names_file)
    assert names[1] == "sofa" and names[12] == "espresso machine" and len(names) == 15
    src = make_semantic_source("labels", label_names=names_file, text_encoder=encoder)
    assert isinstance(src, LabelSemanticSource) and src.text_encoder is encoder
    frame = _frame(seq, "00031")
    frame.label_names = None
    seg = src.segment([frame])[0]
    assert "sofa" in seg.names


def test_default_encoder_is_minilm_without_clip_weights() -> None:
    src = LabelSemanticSource()
    assert src.text_encoder.encoder_id == "sentence_transformers:all-MiniLM-L6-v2"
