"""DINOv2 ViT with register tokens, used by VGGT as its patch embedding (VGGT arXiv 2503.11651, Sec. 3.2).

VGGT "patchifies" each frame with a DINOv2 ViT (Oquab et al. 2023; registers: Darcet et al. 2023) and
feeds the ViT's *normalised patch tokens* to the alternating-attention aggregator. The ViT's own cls
and register outputs are discarded by VGGT.

Parameter names follow the reference (``cls_token``, ``pos_embed``, ``register_tokens``,
``mask_token``, ``patch_embed.proj``, ``blocks.{i}``, ``norm``) so VGGT checkpoints load strictly.

Conventions that matter numerically:

* LayerNorm eps is 1e-6 everywhere in the ViT; blocks have LayerScale (init 1.0), no qk-norm, no RoPE.
* The learned position embedding (cls + M x M grid) is resized to the (H/14) x (W/14) patch grid in
  float32 with **antialiased bicubic** interpolation (``F.interpolate(..., mode="bicubic",
  antialias=True)``, explicit output size). PyTorch's antialiased bicubic uses a different (PIL-style)
  kernel than plain bicubic, so the two are *not* interchangeable. The resize is skipped only for
  the native square grid.
* Register tokens are inserted right after the cls token *after* position embeddings are added, so
  they carry no position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from langgs_ros.models.vggt.layers import Block

__all__ = ["DinoV2Config", "DinoVisionTransformer", "PatchEmbed"]


@dataclass(frozen=True)
class DinoV2Config:
    """Size of the DINOv2 ViT used as VGGT's patch embedding.

    Attributes:
        embed_dim: Token channels C (must equal the aggregator's ``embed_dim``).
        depth: Number of ViT blocks.
        num_heads: Attention heads per block.
        mlp_ratio: MLP hidden size as a multiple of C.
        num_register_tokens: Number of DINOv2 register tokens (4 for the ``*_reg`` models).
        init_values: LayerScale init (1.0 in VGGT).
        interpolate_antialias: Antialiased bicubic position-embedding resize (True in VGGT).
        interpolate_offset: DINOv2's legacy scale-factor offset; VGGT uses 0.0 (explicit size).

    Source: VGGT arXiv 2503.11651, Sec. 3.2 and Appendix B (DINOv2 ViT-L/14 with registers).
    """

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    init_values: float = 1.0
    interpolate_antialias: bool = True
    interpolate_offset: float = 0.0

    @classmethod
    def from_name(cls, name: str, num_register_tokens: int = 4) -> DinoV2Config:
        """Return the config of a named DINOv2 variant.

        Args:
            name: One of ``"dinov2_vits14_reg"``, ``"dinov2_vitb14_reg"``, ``"dinov2_vitl14_reg"``.
            num_register_tokens: Register tokens (VGGT passes its own count, 4).

        Raises:
            KeyError: For an unknown name.
        """
        sizes = {
            "dinov2_vits14_reg": (384, 12, 6),
            "dinov2_vitb14_reg": (768, 12, 12),
            "dinov2_vitl14_reg": (1024, 24, 16),
        }
        if name not in sizes:
            raise KeyError(f"unknown DINOv2 variant {name!r}; known: {sorted(sizes)}")
        dim, depth, heads = sizes[name]
        return cls(embed_dim=dim, depth=depth, num_heads=heads, num_register_tokens=num_register_tokens)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: a ``patch x patch`` convolution with stride ``patch``.

    Args:
        patch_size: Patch side p in pixels.
        in_chans: Input channels (3).
        embed_dim: Output channels C.

    Shapes: (B, 3, H, W) -> (B, (H/p)*(W/p), C), patches in row-major order.

    Raises:
        ValueError: If H or W is not a multiple of ``patch_size``.
    """

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 1024) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """Embed patches; (B, 3, H, W) -> (B, N, C)."""
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoVisionTransformer(nn.Module):
    """DINOv2 vision transformer with register tokens (inference re-implementation).

    Args:
        img_size: Training image side (pixels); the learned position grid is ``img_size // patch``
            squared (37 x 37 for 518 / 14).
        patch_size: Patch side p in pixels.
        cfg: Width/depth/heads etc. (see :class:`DinoV2Config`).

    Drop-path, masking and gradient-checkpointing paths of the reference are not implemented (VGGT
    uses drop-path 0 and never passes masks); ``mask_token`` exists only so checkpoints load.

    Source: VGGT arXiv 2503.11651, Sec. 3.2; DINOv2 (arXiv 2304.07193); registers (arXiv 2309.16588).
    """

    def __init__(self, img_size: int, patch_size: int, cfg: DinoV2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_size = patch_size
        self.num_register_tokens = cfg.num_register_tokens
        grid = img_size // patch_size
        self.grid_size = grid
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(patch_size, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.register_tokens: nn.Parameter | None = (
            nn.Parameter(torch.zeros(1, cfg.num_register_tokens, dim)) if cfg.num_register_tokens else None
        )
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim,
                    cfg.num_heads,
                    mlp_ratio=cfg.mlp_ratio,
                    init_values=cfg.init_values,
                    qk_norm=False,
                    norm_eps=1e-6,
                )
                for _ in range(cfg.depth)
            ]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        # Unused by VGGT (no masked inputs); kept so that checkpoints load with strict=True.
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.mask_token.requires_grad_(False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init in the style of DINOv2/timm (trunc-normal 0.02 linears and pos-embed)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> Tensor:
        """Resize the learned position embedding to a ``grid_h x grid_w`` patch grid.

        Args:
            grid_h: Patch rows (H / p).
            grid_w: Patch columns (W / p).
            dtype: Output dtype (interpolation itself always runs in float32).

        Returns:
            Tensor (1, 1 + grid_h * grid_w, C): cls position first, then the grid in row-major order.
        """
        M = self.grid_size
        if grid_h == M and grid_w == M:
            return self.pos_embed.to(dtype)
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        dim = pos.shape[-1]
        patch_pos = patch_pos.reshape(1, M, M, dim).permute(0, 3, 1, 2)
        if self.cfg.interpolate_offset:
            off = self.cfg.interpolate_offset
            resized = F.interpolate(
                patch_pos,
                scale_factor=((grid_h + off) / M, (grid_w + off) / M),
                mode="bicubic",
                antialias=self.cfg.interpolate_antialias,
            )
        else:
            resized = F.interpolate(
                patch_pos, size=(grid_h, grid_w), mode="bicubic", antialias=self.cfg.interpolate_antialias
            )
        resized = resized.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat((cls_pos, resized), dim=1).to(dtype)

    def forward(self, x: Tensor, return_all: bool = False) -> Tensor | dict[str, Tensor]:
        """Run the ViT on normalised images.

        Args:
            x: ImageNet-normalised images, shape (B, 3, H, W), H and W multiples of the patch size.
            return_all: If True, return a dict with ``x_norm_clstoken`` (B, C),
                ``x_norm_regtokens`` (B, R, C) and ``x_norm_patchtokens`` (B, N, C); otherwise only the
                normalised patch tokens (B, N, C), N = (H/p) * (W/p), row-major.

        Returns:
            Patch tokens or the dict above, dtype of the block outputs.

        Raises:
            ValueError: If H or W is not a multiple of the patch size.
        """
        B, _, H, W = x.shape
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(B, -1, -1).to(tokens.dtype), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(
            H // self.patch_size, W // self.patch_size, tokens.dtype
        )
        if self.register_tokens is not None:
            reg = self.register_tokens.expand(B, -1, -1).to(tokens.dtype)
            tokens = torch.cat((tokens[:, :1], reg, tokens[:, 1:]), dim=1)
        for blk in self.blocks:
            tokens = blk(tokens)
        start = 1 + self.num_register_tokens
        if not return_all:
            return self.norm(tokens[:, start:])
        normed = self.norm(tokens)
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1:start],
            "x_norm_patchtokens": normed[:, start:],
        }
