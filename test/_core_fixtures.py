"""Helpers shared by the core tests (gaussians / sparsify / fusion / query) and ``bench/bench_core.py``.

Loads frames of the shared real ``hololens_office`` RGB-D sequence with their ground-truth labels and builds
:class:`FrameSegmentation` objects from the label images with one-hot label embeddings (an oracle segmenter:
the semantic sources proper belong to :mod:`langgs_ros.semantics`). :class:`FixedTextEncoder` is a real
:class:`TextEncoder` over a fixed phrase -> vector table, used to test query ranking with known embeddings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from langgs_ros.semantics.base import TextEncoder
from langgs_ros.types import NO_INSTANCE, FrameSegmentation

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HOLOLENS = SHARED / "data" / "hololens_office"


@dataclass
class HoloFrame:
    """One hololens frame: rgb (H,W,3) uint8, depth (H,W) float32 m, K (3,3), pose (4,4) world_from_camera,
    labels (H,W) int64 GT object ids (0 = none)."""

    name: str
    rgb: np.ndarray
    depth: np.ndarray
    K: np.ndarray
    pose: np.ndarray
    labels: np.ndarray


def hololens_meta(root: Path = HOLOLENS) -> dict:
    """``objects.json`` plus the frame names."""
    meta = json.loads((root / "annotations" / "objects.json").read_text())
    meta["frames"] = [ln.split()[0] for ln in (root / "frames.txt").read_text().splitlines()
                      if ln.strip() and not ln.startswith("#")]
    return meta


def load_hololens(indices: Sequence[int], root: Path = HOLOLENS) -> list[HoloFrame]:
    """Load frames by index into ``frames.txt``."""
    names = hololens_meta(root)["frames"]
    poses = np.loadtxt(root / "poses.txt").reshape(-1, 4, 4)
    K = np.loadtxt(root / "K.txt")
    out = []
    for i in indices:
        n = names[i]
        out.append(HoloFrame(
            name=n,
            rgb=np.asarray(Image.open(root / "images" / n).convert("RGB")),
            depth=np.asarray(Image.open(root / "depth" / n)).astype(np.float32) / 1000.0,
            K=K.copy(), pose=poses[i].copy(),
            labels=np.asarray(Image.open(root / "annotations" / "labels" / n)).astype(np.int64),
        ))
    return out


def label_segmentation(labels: np.ndarray, num_labels: int, names: dict[int, str] | None = None,
                       dim: int | None = None) -> FrameSegmentation:
    """FrameSegmentation from a GT label image: local id k per present label, one-hot embedding of the label
    (dimension ``dim`` >= num_labels, label l -> axis l - 1)."""
    present = [int(v) for v in np.unique(labels) if v > 0]
    ids = np.full(labels.shape, NO_INSTANCE, np.int32)
    D = dim or num_labels
    emb = torch.zeros(len(present), D)
    for k, lab in enumerate(present):
        ids[labels == lab] = k
        emb[k, lab - 1] = 1.0
    return FrameSegmentation(instance_ids=ids, embeddings=emb,
                             names=[(names or {}).get(lab) for lab in present], class_ids=present)


class FixedTextEncoder(TextEncoder):
    """A text encoder over a fixed table of phrase -> unit vector (unknown phrases raise ``KeyError``).

    Counts phrases encoded, to test caching.
    """

    def __init__(self, table: dict[str, torch.Tensor], encoder_id: str = "fixed") -> None:
        self.table = {k: v.float() / v.float().norm() for k, v in table.items()}
        self.encoder_id = encoder_id
        self.dim = int(next(iter(self.table.values())).shape[0])
        self.calls = 0
        self.encoded = 0

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        self.calls += 1
        self.encoded += len(texts)
        return torch.stack([self.table[t] for t in texts])
