"""Alternating-attention aggregator of VGGT (VGGT arXiv 2503.11651, Sec. 3.2 "Feature Backbone").

Each frame is patchified by a DINOv2 ViT (:mod:`.dinov2`); a camera token and register tokens are
prepended per frame; then ``depth`` layers alternate *frame attention* (tokens of one frame attend to
each other, shape (B*S, P, C)) and *global attention* (all tokens of all frames of a sequence attend
to each other, shape (B, S*P, C)). The output of layer ``i`` concatenates, along channels, the frame
block output (first C channels) and the global block output (last C channels): (B, S, P, 2C).

Token layout per frame: ``[camera (1) | registers (R) | patches (h*w, row-major)]``; the patch tokens
start at ``patch_start_idx = 1 + R``. The aggregator owns two camera tokens and two register sets:
index 0 is used by the first frame of every sequence (the reference frame, whose camera defines the
world frame after training), index 1 by all other frames.

Positions for the 2-D RoPE are (row + 1, column + 1) for patches and (0, 0) for special tokens; in
global attention every frame reuses the same positions (there is no frame-index encoding).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from langgs_ros.models.vggt.dinov2 import DinoV2Config, DinoVisionTransformer
from langgs_ros.models.vggt.layers import Block, RopeTable, RotaryPositionEmbedding2D

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Aggregator"]

#: ImageNet RGB mean/std used to normalise [0, 1] inputs inside the aggregator.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _first_and_rest(token: Tensor, B: int, S: int, dtype: torch.dtype) -> Tensor:
    """Expand a (1, 2, X, C) token pair to (B*S, X, C): index 0 for frame 0, index 1 for the others."""
    first = token[:, :1].expand(B, 1, *token.shape[2:])
    rest = token[:, 1:2].expand(B, S - 1, *token.shape[2:])
    return torch.cat((first, rest), dim=1).reshape(B * S, *token.shape[2:]).to(dtype)


class Aggregator(nn.Module):
    """VGGT feature backbone: DINOv2 patch embedding + ``depth`` frame/global attention layers.

    Args:
        img_size: Training image side in pixels (sets the ViT position grid, 518 for VGGT-1B).
        patch_size: Patch side p in pixels (14).
        embed_dim: Token channels C.
        depth: Number of frame blocks (= number of global blocks = number of output layers).
        num_heads: Heads of every frame/global block.
        mlp_ratio: MLP expansion of the blocks.
        num_register_tokens: Register tokens R per frame.
        qkv_bias: Bias of the qkv projections.
        proj_bias: Bias of the attention output projections.
        ffn_bias: Bias of the MLPs.
        vit: DINOv2 ViT size (``vit.embed_dim`` must equal ``embed_dim``).
        aa_order: Order of attention types within one layer group, a permutation of
            ``("frame", "global")``.
        aa_block_size: Blocks of each type run before switching type (1 in VGGT).
        qk_norm: Per-head qk LayerNorm in the blocks.
        rope_freq: RoPE frequency base (100); ``<= 0`` disables RoPE.
        init_values: LayerScale init of the blocks.

    Raises:
        ValueError: On inconsistent sizes (see messages).

    Source: VGGT arXiv 2503.11651, Sec. 3.2 (alternating attention, camera/register tokens).
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 4,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        vit: DinoV2Config | None = None,
        aa_order: Sequence[str] = ("frame", "global"),
        aa_block_size: int = 1,
        qk_norm: bool = True,
        rope_freq: float = 100.0,
        init_values: float = 0.01,
    ) -> None:
        super().__init__()
        vit = vit or DinoV2Config()
        if vit.embed_dim != embed_dim:
            raise ValueError(f"ViT embed_dim {vit.embed_dim} != aggregator embed_dim {embed_dim}")
        if sorted(aa_order) != ["frame", "global"]:
            raise ValueError(f"aa_order must be a permutation of ('frame', 'global'), got {tuple(aa_order)}")
        if depth % aa_block_size != 0:
            raise ValueError(f"depth ({depth}) must be divisible by aa_block_size ({aa_block_size})")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.aa_order = tuple(aa_order)
        self.aa_block_size = aa_block_size
        self.patch_start_idx = 1 + num_register_tokens
        #: Use gradient checkpointing over the blocks in training mode (as the reference does).
        self.gradient_checkpointing = True

        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, embed_dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, num_register_tokens, embed_dim))
        self.patch_embed = DinoVisionTransformer(img_size, patch_size, vit)
        self.rope: RotaryPositionEmbedding2D | None = (
            RotaryPositionEmbedding2D(rope_freq) if rope_freq > 0 else None
        )

        def make_block() -> Block:
            return Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                init_values=init_values,
                qk_norm=qk_norm,
                norm_eps=1e-5,
                qk_norm_eps=1e-5,
            )

        self.frame_blocks = nn.ModuleList([make_block() for _ in range(depth)])
        self.global_blocks = nn.ModuleList([make_block() for _ in range(depth)])
        nn.init.normal_(self.camera_token, std=1e-6)
        nn.init.normal_(self.register_token, std=1e-6)

    @property
    def trunk_dtype(self) -> torch.dtype:
        """dtype of the aggregator parameters (float32, or bfloat16/float16 for a cast trunk)."""
        return self.patch_embed.patch_embed.proj.weight.dtype

    def normalize_images(self, images: Tensor) -> Tensor:
        """ImageNet-normalise RGB images in [0, 1] (computed in float32, cast to :attr:`trunk_dtype`).

        Args:
            images: (..., 3, H, W) floating RGB in [0, 1].

        Returns:
            Tensor of the same shape, dtype :attr:`trunk_dtype`.
        """
        x = images.float()
        mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device, dtype=torch.float32).view(3, 1, 1)
        return ((x - mean) / std).to(self.trunk_dtype)

    def _rope_tables(
        self, grid_h: int, grid_w: int, S: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[RopeTable | None, RopeTable | None]:
        """RoPE tables for frame attention (1, 1, P, D) and global attention (1, 1, S*P, D)."""
        if self.rope is None:
            return None, None
        rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w) + 1
        cols = torch.arange(grid_w, device=device).repeat(grid_h) + 1
        pos = torch.stack((rows, cols), dim=-1)
        special = torch.zeros(self.patch_start_idx, 2, dtype=pos.dtype, device=device)
        pos = torch.cat((special, pos), dim=0)
        head_dim = self.embed_dim // self.num_heads
        cos, sin = self.rope.table(pos, head_dim, dtype, num_positions=max(grid_h, grid_w) + 1)
        frame = (cos, sin)
        glob = (cos.repeat(1, 1, S, 1), sin.repeat(1, 1, S, 1)) if S > 1 else frame
        return frame, glob

    def _run_block(self, block: nn.Module, x: Tensor, rope: RopeTable | None) -> Tensor:
        if self.training and self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, rope, use_reentrant=False)
        return block(x, rope)

    def forward(
        self, images: Tensor, keep_layers: Iterable[int] | None = None
    ) -> tuple[list[Tensor | None], int]:
        """Aggregate the frames of each sequence.

        Args:
            images: RGB in [0, 1], shape (B, S, 3, H, W), H and W multiples of ``patch_size``.
                Normalisation happens here.
            keep_layers: Indices of the layers whose outputs are returned; ``None`` keeps all
                ``depth`` layers. Dropping layers the heads do not read saves memory (each layer is
                B*S*P*2C values).

        Returns:
            ``(tokens_list, patch_start_idx)``: a list of length ``depth`` whose entry ``i`` is the
            layer-``i`` output of shape (B, S, P, 2C) in :attr:`trunk_dtype` (or ``None`` when not
            kept), with P = patch_start_idx + (H/p)*(W/p); and ``patch_start_idx`` (= 1 + R).

        Raises:
            ValueError: If the input is not 5-D with 3 channels or H/W are not patch multiples.
        """
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"images must have shape (B, S, 3, H, W), got {tuple(images.shape)}")
        B, S, _, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        keep = set(range(self.depth)) if keep_layers is None else {int(i) % self.depth for i in keep_layers}

        x = self.normalize_images(images).reshape(B * S, 3, H, W)
        patch_tokens = self.patch_embed(x)
        del x
        tokens = torch.cat(
            (
                _first_and_rest(self.camera_token, B, S, patch_tokens.dtype),
                _first_and_rest(self.register_token, B, S, patch_tokens.dtype),
                patch_tokens,
            ),
            dim=1,
        )
        del patch_tokens
        P, C = tokens.shape[1], tokens.shape[2]
        rope_frame, rope_global = self._rope_tables(H // p, W // p, S, tokens.device, tokens.dtype)

        outputs: list[Tensor | None] = [None] * self.depth
        frame_idx = global_idx = 0
        k = self.aa_block_size
        for group in range(self.depth // k):
            frame_out: list[Tensor | None] = []
            global_out: list[Tensor | None] = []
            for attn_type in self.aa_order:
                for i in range(k):
                    layer = group * k + i
                    if attn_type == "frame":
                        tokens = tokens.reshape(B * S, P, C)
                        tokens = self._run_block(self.frame_blocks[frame_idx], tokens, rope_frame)
                        frame_idx += 1
                        frame_out.append(tokens.reshape(B, S, P, C) if layer in keep else None)
                    else:
                        tokens = tokens.reshape(B, S * P, C)
                        tokens = self._run_block(self.global_blocks[global_idx], tokens, rope_global)
                        global_idx += 1
                        global_out.append(tokens.reshape(B, S, P, C) if layer in keep else None)
            for i in range(k):
                layer = group * k + i
                f_i, g_i = frame_out[i], global_out[i]
                if f_i is not None and g_i is not None:
                    outputs[layer] = torch.cat((f_i, g_i), dim=-1)
            del frame_out, global_out
        del tokens
        return outputs, self.patch_start_idx
