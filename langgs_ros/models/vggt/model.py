"""VGGT model: aggregator + camera head + depth head + point head (VGGT arXiv 2503.11651, Sec. 3).

Independent re-implementation that is numerically conformant to the reference implementation
(facebookresearch/vggt @ 44b3afb) and loads its checkpoints by parameter name. The track head of the
reference is **not** implemented: the released checkpoints' ``track_head.*`` keys are the only keys
ignored when loading (see :mod:`.weights`).

Precision: the aggregator ("trunk") may run in bfloat16/float16 — either with float32 weights under
``torch.autocast`` or with weights cast via :meth:`VGGT.set_trunk_dtype` — while the heads always run
with autocast disabled on float32 inputs (the reference only disables *CUDA* autocast; here it is
disabled for the input's device type, so CPU autocast does not leak into the heads either).

Memory: the model never keeps activations beyond what the outputs need. By default the aggregator
keeps only the layers the heads read (4 of 24 for VGGT-1B instead of all 24); the DPT heads process
``frames_chunk_size`` frames at a time. Under ``torch.inference_mode()`` no autograd graph is stored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from langgs_ros.models.vggt.aggregator import Aggregator
from langgs_ros.models.vggt.camera_head import CameraHead
from langgs_ros.models.vggt.dinov2 import DinoV2Config
from langgs_ros.models.vggt.dpt_head import DPTHead

__all__ = ["VGGT", "VGGTConfig"]


@dataclass(frozen=True)
class VGGTConfig:
    """Architecture and inference settings of :class:`VGGT`.

    Attributes:
        img_size: Training image side in pixels (sets the ViT position grid).
        patch_size: Patch side p in pixels.
        embed_dim: Aggregator token channels C (heads see 2C).
        depth: Aggregator layers (frame + global block pairs).
        num_heads: Aggregator attention heads.
        mlp_ratio: Aggregator MLP expansion.
        num_register_tokens: Register tokens per frame (aggregator and ViT).
        qk_norm: Per-head qk LayerNorm in aggregator blocks.
        rope_freq: 2-D RoPE frequency base; ``<= 0`` disables RoPE.
        init_values: LayerScale init of aggregator and camera-trunk blocks.
        aa_order: Attention order within a layer group.
        aa_block_size: Blocks per attention type before switching.
        vit: DINOv2 patch-embedding ViT size.
        camera_trunk_depth: Camera-head trunk blocks.
        camera_num_heads: Camera-head trunk heads.
        camera_num_iterations: Camera refinement iterations.
        dpt_features: DPT fusion channels.
        dpt_out_channels: DPT projection channels per selected layer.
        dpt_layers: Aggregator layers read by the DPT heads.
        enable_camera: Build the camera head.
        enable_depth: Build the depth head.
        enable_point: Build the point head.
        frames_chunk_size: Default frames per DPT chunk (``None`` or ``<= 0``: all frames at once).

    Raises:
        ValueError: (on construction) for inconsistent sizes.

    Source: VGGT arXiv 2503.11651, Sec. 3.2 ("L = 24 layers of global and frame-wise attention"),
    Sec. 3.3 (heads) and Appendix B (architecture details).
    """

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    qk_norm: bool = True
    rope_freq: float = 100.0
    init_values: float = 0.01
    aa_order: tuple[str, ...] = ("frame", "global")
    aa_block_size: int = 1
    vit: DinoV2Config = field(default_factory=DinoV2Config)
    camera_trunk_depth: int = 4
    camera_num_heads: int = 16
    camera_num_iterations: int = 4
    dpt_features: int = 256
    dpt_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    dpt_layers: tuple[int, int, int, int] = (4, 11, 17, 23)
    enable_camera: bool = True
    enable_depth: bool = True
    enable_point: bool = True
    frames_chunk_size: int | None = 8

    def __post_init__(self) -> None:
        """Validate sizes (raises ValueError)."""
        if self.vit.embed_dim != self.embed_dim:
            raise ValueError(f"vit.embed_dim ({self.vit.embed_dim}) must equal embed_dim ({self.embed_dim})")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) not divisible by num_heads ({self.num_heads})")
        if (2 * self.embed_dim) % self.camera_num_heads:
            raise ValueError("2 * embed_dim must be divisible by camera_num_heads")
        if self.depth % self.aa_block_size:
            raise ValueError(
                f"depth ({self.depth}) must be divisible by aa_block_size ({self.aa_block_size})"
            )
        if any(not 0 <= i < self.depth for i in self.dpt_layers):
            raise ValueError(f"dpt_layers {self.dpt_layers} out of range for depth {self.depth}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})"
            )

    @classmethod
    def vggt_1b(cls, **overrides: Any) -> VGGTConfig:
        """The released VGGT-1B / VGGT-1B-Commercial architecture (1.19e9 parameters without track head).

        518-px training size, patch 14, embed 1024, 24 aggregator layers with 16 heads, DINOv2
        ViT-L/14 with 4 registers, camera trunk of 4 blocks, DPT heads with 256 features reading
        layers (4, 11, 17, 23). ``overrides`` replace individual fields.
        """
        return replace(cls(), **overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> VGGTConfig:
        """The tiny test configuration of the conformance fixture (1,523,128 parameters).

        img 70, patch 14, embed 64, 4 layers x 4 heads, 4 registers, tiny DINOv2 ViT (64 wide,
        2 blocks, 4 heads), camera trunk 2 blocks x 4 heads, DPT features 32, out channels
        (16, 32, 64, 64) reading layers (0, 1, 2, 3). ``overrides`` replace individual fields.
        """
        base = cls(
            img_size=70,
            patch_size=14,
            embed_dim=64,
            depth=4,
            num_heads=4,
            vit=DinoV2Config(embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0, num_register_tokens=4),
            camera_trunk_depth=2,
            camera_num_heads=4,
            dpt_features=32,
            dpt_out_channels=(16, 32, 64, 64),
            dpt_layers=(0, 1, 2, 3),
        )
        return replace(base, **overrides)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VGGTConfig:
        """Return a preset by name: ``"vggt_1b"`` or ``"tiny"``.

        Raises:
            KeyError: For an unknown preset name.
        """
        presets = {"vggt_1b": cls.vggt_1b, "tiny": cls.tiny}
        if name not in presets:
            raise KeyError(f"unknown VGGT preset {name!r}; known: {sorted(presets)}")
        return presets[name](**overrides)


@contextlib.contextmanager
def _autocast_disabled(device: torch.device) -> Iterator[None]:
    """Disable autocast for ``device``'s type (no-op for device types autocast does not know)."""
    try:
        ctx = torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):
        ctx = contextlib.nullcontext()
    with ctx:
        yield


class VGGT(nn.Module):
    """Visual Geometry Grounded Transformer without the tracking head.

    Args:
        config: Architecture (default :meth:`VGGTConfig.vggt_1b`).

    Submodules (reference names): ``aggregator``, ``camera_head``, ``point_head``, ``depth_head``
    (disabled heads are ``None``).

    Source: VGGT arXiv 2503.11651, Sec. 3 (Fig. 2).
    """

    def __init__(self, config: VGGTConfig | None = None) -> None:
        super().__init__()
        cfg = config or VGGTConfig.vggt_1b()
        self.config = cfg
        self.aggregator = Aggregator(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            num_register_tokens=cfg.num_register_tokens,
            vit=cfg.vit,
            aa_order=cfg.aa_order,
            aa_block_size=cfg.aa_block_size,
            qk_norm=cfg.qk_norm,
            rope_freq=cfg.rope_freq,
            init_values=cfg.init_values,
        )
        dim_in = 2 * cfg.embed_dim
        self.camera_head: CameraHead | None = (
            CameraHead(
                dim_in=dim_in,
                trunk_depth=cfg.camera_trunk_depth,
                num_heads=cfg.camera_num_heads,
                mlp_ratio=4.0,
                init_values=cfg.init_values,
            )
            if cfg.enable_camera
            else None
        )

        def dpt(output_dim: int, activation: str) -> DPTHead:
            return DPTHead(
                dim_in=dim_in,
                patch_size=cfg.patch_size,
                output_dim=output_dim,
                activation=activation,
                features=cfg.dpt_features,
                out_channels=cfg.dpt_out_channels,
                intermediate_layer_idx=cfg.dpt_layers,
            )

        self.point_head: DPTHead | None = dpt(4, "inv_log") if cfg.enable_point else None
        self.depth_head: DPTHead | None = dpt(2, "exp") if cfg.enable_depth else None

    @property
    def frames_chunk_size(self) -> int | None:
        """Default frames per DPT chunk (from the config); override per call in :meth:`forward`."""
        return self.config.frames_chunk_size

    def set_trunk_dtype(self, dtype: torch.dtype) -> VGGT:
        """Cast only the aggregator parameters to ``dtype``; the heads stay float32.

        Args:
            dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``.

        Returns:
            ``self``.

        Raises:
            ValueError: For a non-floating dtype.
        """
        if not dtype.is_floating_point:
            raise ValueError(f"trunk dtype must be floating point, got {dtype}")
        self.aggregator.to(dtype=dtype)
        for head in (self.camera_head, self.point_head, self.depth_head):
            if head is not None:
                head.to(dtype=torch.float32)
        return self

    def required_layers(self) -> set[int]:
        """Aggregator layers read by the enabled heads (last layer for the camera head)."""
        layers: set[int] = set()
        if self.camera_head is not None:
            layers.add(self.config.depth - 1)
        for head in (self.point_head, self.depth_head):
            if head is not None:
                layers.update(head.intermediate_layer_idx)
        return layers

    def forward(
        self,
        images: Tensor,
        frames_chunk_size: int | None = None,
        return_aggregated_tokens: bool = False,
    ) -> dict[str, Any]:
        """Predict cameras, depth and point maps for one or more sequences of frames.

        Args:
            images: RGB in [0, 1], shape (B, S, 3, H, W) or (S, 3, H, W) (a batch axis is added);
                H and W multiples of 14 (VGGT-1B was trained with width 518). Normalisation is
                internal.
            frames_chunk_size: Frames per DPT chunk for this call (default: config value, 8).
            return_aggregated_tokens: Also return ``aggregated_tokens_list`` (all ``depth`` layers,
                each (B, S, P, 2C) in the trunk dtype; keeping all of them costs memory) and
                ``patch_start_idx``.

        Returns:
            Dict (entries of disabled heads are absent), all float32:

            * ``pose_enc`` (B, S, 9): final camera encoding ``[t(3), quat xyzw(4), fov_h, fov_w]``,
              camera-from-world, radians (decode with ``pose_encoding_to_extri_intri``);
            * ``pose_enc_list``: list of ``camera_num_iterations`` (B, S, 9) encodings;
            * ``depth`` (B, S, H, W, 1): depth along the camera z axis (scale of the scene
              normalisation, i.e. arbitrary global scale);
            * ``depth_conf`` (B, S, H, W): depth confidence (> 1);
            * ``world_points`` (B, S, H, W, 3): per-pixel 3-D points in the world frame (= first
              camera's OpenCV frame after training);
            * ``world_points_conf`` (B, S, H, W): point confidence (> 1);
            * optionally ``aggregated_tokens_list`` and ``patch_start_idx``.

        Raises:
            ValueError: For a wrong input rank/channels or H/W not a multiple of the patch size.

        Source: VGGT arXiv 2503.11651, Sec. 3.1 (f(I) = (g, D, P, T)), Sec. 3.3 (heads).
        """
        if images.ndim == 4:
            images = images.unsqueeze(0)
        if images.ndim != 5:
            raise ValueError(
                f"images must have shape (B, S, 3, H, W) or (S, 3, H, W), got {tuple(images.shape)}"
            )
        H, W = int(images.shape[-2]), int(images.shape[-1])
        chunk = self.config.frames_chunk_size if frames_chunk_size is None else frames_chunk_size
        keep = None if return_aggregated_tokens else self.required_layers()
        tokens_list, patch_start_idx = self.aggregator(images, keep_layers=keep)

        out: dict[str, Any] = {}
        with _autocast_disabled(images.device):
            if self.camera_head is not None:
                last = tokens_list[-1]
                assert last is not None
                cam_tokens = last[:, :, :1].to(self.camera_head.token_norm.weight.dtype)
                pose_list = self.camera_head(cam_tokens, num_iterations=self.config.camera_num_iterations)
                out["pose_enc"] = pose_list[-1]
                out["pose_enc_list"] = pose_list
            if self.depth_head is not None:
                depth, depth_conf = self.depth_head(tokens_list, (H, W), patch_start_idx, chunk)
                out["depth"] = depth
                out["depth_conf"] = depth_conf
            if self.point_head is not None:
                points, points_conf = self.point_head(tokens_list, (H, W), patch_start_idx, chunk)
                out["world_points"] = points
                out["world_points_conf"] = points_conf
        if return_aggregated_tokens:
            out["aggregated_tokens_list"] = tokens_list
            out["patch_start_idx"] = patch_start_idx
        return out
