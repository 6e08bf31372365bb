"""Interfaces of the semantic lifting stage.

A :class:`SemanticSource` turns frames into :class:`~langgs_ros.types.FrameSegmentation` (per-pixel instance
ids, one L2-normalised embedding per instance). Its :class:`TextEncoder` maps query text into the same
embedding space, so the query engine can score instances (LERF relevancy, Kerr et al. ICCV 2023).

Sources (registered by name in :data:`SEMANTIC_SOURCES`):

- ``clip_sam``: segment-anything automatic masks + one open_clip image embedding per mask (robot default).
- ``labels``: a label image aligned with the colour image + id -> name, names embedded by a text encoder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from langgs_ros.types import Frame, FrameSegmentation


class TextEncoder(ABC):
    """Maps text to unit embeddings in a semantic source's embedding space.

    Attributes:
        encoder_id: identifies the embedding space (model + weights), e.g.
            ``"open_clip:ViT-B-16:laion2b_s34b_b88k"`` or ``"sentence_transformers:all-MiniLM-L6-v2"``. Maps
            record it; loading a map made with a different encoder is refused.
        dim: embedding dimension D.
    """

    encoder_id: str
    dim: int

    @abstractmethod
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed ``texts``.

        Returns:
            (M, D) float32 L2-normalised embeddings on the CPU, row m = ``texts[m]``.
        """


class SemanticSource(ABC):
    """Produces per-frame instance segmentations with embeddings in ``text_encoder``'s space."""

    name: str
    text_encoder: TextEncoder

    @abstractmethod
    def segment(self, frames: Sequence[Frame]) -> list[FrameSegmentation]:
        """Segment each frame.

        Returns:
            One :class:`FrameSegmentation` per frame, ``instance_ids`` on the frame's (H, W) pixel grid.

        Raises:
            ValueError: a frame lacks what the source needs (e.g. no label image for ``labels``).
        """


SEMANTIC_SOURCES: dict[str, Callable[..., SemanticSource]] = {}
"""Registry name -> factory; sources register themselves when their module is imported."""


def register_semantic_source(name: str) -> Callable[[Callable[..., SemanticSource]], Callable[..., SemanticSource]]:
    """Class/factory decorator adding a source to :data:`SEMANTIC_SOURCES` under ``name``."""

    def deco(factory: Callable[..., SemanticSource]) -> Callable[..., SemanticSource]:
        SEMANTIC_SOURCES[name] = factory
        return factory

    return deco


def make_semantic_source(name: str, **kwargs: object) -> SemanticSource:
    """Build a registered semantic source by name (``"labels"`` or ``"clip_sam"``).

    Raises:
        ValueError: unknown name.
    """
    import langgs_ros.semantics.clip_sam
    import langgs_ros.semantics.labels  # noqa: F401

    if name not in SEMANTIC_SOURCES:
        raise ValueError(f"unknown semantic source {name!r}; known: {sorted(SEMANTIC_SOURCES)}")
    return SEMANTIC_SOURCES[name](**kwargs)
