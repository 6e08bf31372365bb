"""Model presets of the semantic stage: where real weights are found, and tiny random-init models for tests.

Real weights (never downloaded here; ``langgs-download-weights`` fetches them):

- SAM (Kirillov et al., "Segment Anything", ICCV 2023): the official checkpoints
  (:data:`SAM_CHECKPOINT_FILES`), looked up as an explicit path, else in ``<weights dir>/sam/`` and
  ``<weights dir>/`` (:func:`default_weights_dir`: ``$LANGGS_WEIGHTS_DIR``, default ``~/.cache/langgs_ros``), else
  in torch hub's checkpoint folder (``torch.hub.get_dir()/checkpoints``). Built by
  ``segment_anything.sam_model_registry[type](checkpoint=path)``.
- open_clip: an explicit checkpoint file, else open_clip's standard cache for the pretrained tag — the Hugging Face
  hub cache (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``) for ``hf_hub`` tags, ``~/.cache/clip`` for URL
  tags — looked up without network access.

Tiny presets (tests/benchmarks only; outputs are meaningless, code paths are the real ones): a SAM built from
``segment_anything.modeling`` classes with tiny sizes (:data:`TINY_SAM_CFG`, builder :func:`build_sam_tiny`,
mirroring ``segment_anything.build_sam._build_sam``) and an open_clip ``CLIP`` built by ``open_clip.create_model``
with a small architecture override (:data:`TINY_CLIP_CFG`).
"""

from __future__ import annotations

import logging
import os
from copy import deepcopy
from functools import partial
from pathlib import Path
from typing import Any

import torch

WEIGHTS_DIR_ENV = "LANGGS_WEIGHTS_DIR"
"""Environment variable naming the folder where ``langgs-download-weights`` puts checkpoints."""

DOWNLOAD_HINT = "run `langgs-download-weights` (on a machine with internet access) or pass the checkpoint path"

SAM_CHECKPOINT_FILES = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}
"""Official SAM checkpoint file names per model type (https://github.com/facebookresearch/segment-anything)."""

TINY_SAM_CFG: dict[str, Any] = {
    "encoder_embed_dim": 32,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_global_attn_indexes": (1,),
    "image_size": 256,
    "vit_patch_size": 16,
    "window_size": 4,
    "prompt_embed_dim": 32,
    "mask_in_chans": 4,
    "decoder_depth": 2,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 32,
}
"""Sizes of the tiny SAM (same classes as vit_b: ImageEncoderViT, PromptEncoder, MaskDecoder, TwoWayTransformer)."""

VIT_B_SAM_CFG: dict[str, Any] = {
    "encoder_embed_dim": 768,
    "encoder_depth": 12,
    "encoder_num_heads": 12,
    "encoder_global_attn_indexes": (2, 5, 8, 11),
    "image_size": 1024,
    "vit_patch_size": 16,
    "window_size": 14,
    "prompt_embed_dim": 256,
    "mask_in_chans": 16,
    "decoder_depth": 2,
    "decoder_mlp_dim": 2048,
    "decoder_num_heads": 8,
    "iou_head_hidden_dim": 256,
}
"""segment_anything's vit_b sizes in this config format (documents what TINY_SAM_CFG shrinks)."""

TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
"""open_clip architecture override for the tiny CLIP (ViT vision tower + transformer text tower, open_clip's
``CLIP`` class; vocabulary and context length of open_clip's shipped BPE tokenizer)."""

TINY_CLIP_BASE = "ViT-B-16"
"""Built-in open_clip config whose architecture family / tokenizer the tiny CLIP uses."""


def default_weights_dir() -> Path:
    """Folder for downloaded checkpoints: ``$LANGGS_WEIGHTS_DIR`` or ``~/.cache/langgs_ros`` (SAM under ``sam/``)."""
    env = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "langgs_ros"


# --------------------------------------------------------------------------------------------------------------
# SAM
# --------------------------------------------------------------------------------------------------------------


def resolve_sam_checkpoint(model_type: str = "vit_b", checkpoint: str | Path | None = None) -> Path:
    """Find the SAM checkpoint file for ``model_type`` on this machine (no download).

    Args:
        model_type: "vit_b", "vit_l" or "vit_h".
        checkpoint: explicit file path (must exist), or None to search the standard places.

    Returns:
        Path of an existing checkpoint file.

    Raises:
        ValueError: unknown model type.
        FileNotFoundError: not found; the message names the file, where it was looked for, and the
            ``langgs-download-weights`` command.
    """
    if model_type not in SAM_CHECKPOINT_FILES:
        raise ValueError(f"unknown SAM model type {model_type!r}; known: {sorted(SAM_CHECKPOINT_FILES)}")
    if checkpoint is not None:
        p = Path(checkpoint).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"SAM {model_type} checkpoint not found: {p}; {DOWNLOAD_HINT}")
        return p
    name = SAM_CHECKPOINT_FILES[model_type]
    candidates = [default_weights_dir() / "sam" / name, default_weights_dir() / name,
                  Path(torch.hub.get_dir()) / "checkpoints" / name]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"SAM {model_type} checkpoint {name} not found (looked in: {', '.join(str(c.parent) for c in candidates)}); "
        f"{DOWNLOAD_HINT} (sam_checkpoint=...)")


def build_sam_from_config(cfg: dict[str, Any], checkpoint: str | Path | None = None) -> torch.nn.Module:
    """Build a ``segment_anything.modeling.Sam`` with the given sizes; mirrors ``segment_anything``'s ``_build_sam``.

    Same module structure and constants as the library builder (pixel mean/std, 3 multimask outputs, 3-layer IoU
    head, relative positions, LayerNorm eps 1e-6), with the sizes of ``cfg`` (keys of :data:`TINY_SAM_CFG`). With
    ``checkpoint`` the state dict is read with ``torch.load`` and applied with ``load_state_dict`` (strict), like
    the library does (here with ``map_location="cpu"`` and ``weights_only=True``).

    Returns:
        The model on the CPU in eval mode.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist. RuntimeError: state-dict mismatch.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    image_size = int(cfg["image_size"])
    patch = int(cfg["vit_patch_size"])
    prompt_dim = int(cfg["prompt_embed_dim"])
    emb_size = image_size // patch
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=int(cfg["encoder_depth"]),
            embed_dim=int(cfg["encoder_embed_dim"]),
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=int(cfg["encoder_num_heads"]),
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(cfg["encoder_global_attn_indexes"]),
            window_size=int(cfg["window_size"]),
            out_chans=prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(emb_size, emb_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=int(cfg["mask_in_chans"]),
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=int(cfg["decoder_depth"]),
                embedding_dim=prompt_dim,
                mlp_dim=int(cfg["decoder_mlp_dim"]),
                num_heads=int(cfg["decoder_num_heads"]),
            ),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=int(cfg["iou_head_hidden_dim"]),
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"SAM checkpoint not found: {path}")
        with open(path, "rb") as f:
            state_dict = torch.load(f, map_location="cpu", weights_only=True)
        sam.load_state_dict(state_dict)
    return sam


def build_sam_tiny(checkpoint: str | Path | None = None, seed: int = 0) -> torch.nn.Module:
    """The tiny random-init SAM (:data:`TINY_SAM_CFG`), initialised under ``seed`` (reproducible), or loaded from
    ``checkpoint``. Tests only: its masks are meaningless."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam_from_config(TINY_SAM_CFG, checkpoint=checkpoint)


def load_sam(model_type: str = "vit_b", checkpoint: str | Path | None = None, preset: str = "full",
             device: str | torch.device = "cpu", seed: int = 0) -> torch.nn.Module:
    """Build SAM for the ``clip_sam`` source.

    Args:
        model_type: "vit_b" | "vit_l" | "vit_h" (full preset).
        checkpoint: checkpoint file (full: optional, else searched by :func:`resolve_sam_checkpoint`; tiny:
            optional tiny state dict).
        preset: "full" -> ``segment_anything.sam_model_registry[model_type](checkpoint=path)``;
            "tiny" -> :func:`build_sam_tiny`.
        device: torch device.

    Returns:
        A ``segment_anything.modeling.Sam`` on ``device`` in eval mode.

    Raises:
        ValueError: unknown preset or model type. FileNotFoundError: missing checkpoint.
    """
    if preset == "tiny":
        sam = build_sam_tiny(checkpoint=checkpoint, seed=seed)
    elif preset == "full":
        from segment_anything import sam_model_registry

        path = resolve_sam_checkpoint(model_type, checkpoint)
        sam = sam_model_registry[model_type](checkpoint=str(path))
    else:
        raise ValueError(f"unknown SAM preset {preset!r}; expected 'full' or 'tiny'")
    return sam.to(torch.device(device)).eval()


# --------------------------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------------------------


def _hf_cached_file(repo_id: str, filenames: list[str]) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in filenames:
        hit = try_to_load_from_cache(repo_id, name)
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    return None


def resolve_clip_checkpoint(model_name: str, pretrained: str | None,
                            checkpoint: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Find open_clip weights on this machine (no download) and the tag's pretrained config.

    Args:
        model_name: open_clip architecture name, e.g. "ViT-B-16".
        pretrained: pretrained tag (e.g. "laion2b_s34b_b88k") or a checkpoint file path, or None.
        checkpoint: explicit checkpoint file (takes precedence).

    Returns:
        (checkpoint path, the tag's pretrained config dict — mean/std/interpolation/quick_gelu — or {}).

    Raises:
        ValueError: unknown model name, or unknown tag while no checkpoint file is given.
        FileNotFoundError: weights not found; the message names the file and the download command.
    """
    import open_clip
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, get_pretrained_cfg

    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
    tag_cfg: dict[str, Any] = {}
    if pretrained and not Path(str(pretrained)).expanduser().is_file():
        tag_cfg = dict(get_pretrained_cfg(model_name, pretrained) or {})
    if checkpoint is not None:
        p = Path(checkpoint).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"open_clip checkpoint not found: {p}; {DOWNLOAD_HINT} (clip_checkpoint=...)")
        return p, tag_cfg
    if pretrained is None:
        raise ValueError("open_clip weights not configured: give clip_pretrained (a tag) or clip_checkpoint (a file)")
    as_path = Path(str(pretrained)).expanduser()
    if as_path.is_file():
        return as_path, tag_cfg
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(f"unknown pretrained tag {pretrained!r} for {model_name} (and no such file); known: {tags}")
    if tag_cfg.get("file"):
        p = Path(tag_cfg["file"])
        if p.is_file():
            return p, tag_cfg
    hub = str(tag_cfg.get("hf_hub") or "")
    url = str(tag_cfg.get("url") or "")
    looked: list[str] = []
    if hub:
        # open_clip's convention: "org/repo/" = default file name, "org/repo/file.bin" = that file.
        if hub.endswith("/"):
            repo_id, filename = hub.rstrip("/"), HF_WEIGHTS_NAME
        else:
            repo_id, filename = os.path.split(hub)
        names = [filename]
        if filename == HF_WEIGHTS_NAME:
            names.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        hit = _hf_cached_file(repo_id, names)
        if hit is not None:
            return hit, tag_cfg
        looked.append(f"Hugging Face cache repo {repo_id} files {names}")
    if url:
        p = Path.home() / ".cache" / "clip" / os.path.basename(url)
        if p.is_file():
            return p, tag_cfg
        looked.append(str(p))
    raise FileNotFoundError(
        f"open_clip weights {model_name}:{pretrained} not found on this machine (looked for: {'; '.join(looked)}); "
        f"{DOWNLOAD_HINT} (clip_checkpoint=...)")


def build_tiny_clip(device: str | torch.device = "cpu", seed: int = 0,
                    checkpoint: str | Path | None = None) -> tuple[torch.nn.Module, Any]:
    """The tiny random-init open_clip ``CLIP`` (:data:`TINY_CLIP_CFG`) and its tokenizer.

    Built with ``open_clip.create_model(TINY_CLIP_BASE, pretrained=checkpoint, **TINY_CLIP_CFG)`` on the CPU
    under ``seed`` (so the same weights on every device), then moved to ``device``. With ``checkpoint`` the weights
    are loaded by open_clip's ``load_checkpoint`` (strict). Tests only: embeddings are meaningless.

    Returns:
        (model in eval mode, ``open_clip.get_tokenizer(TINY_CLIP_BASE)``).
    """
    import open_clip

    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"tiny CLIP checkpoint not found: {checkpoint}")
    def expected_random_init(record: logging.LogRecord) -> bool:  # random init is the point of this preset
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(expected_random_init)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(TINY_CLIP_BASE, pretrained=None if checkpoint is None else str(checkpoint),
                                           device="cpu", **deepcopy(TINY_CLIP_CFG))
    finally:
        root.removeFilter(expected_random_init)
    model = model.to(torch.device(device)).eval()
    return model, open_clip.get_tokenizer(TINY_CLIP_BASE)
