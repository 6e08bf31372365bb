"""Transformer building blocks of the VGGT backbone (VGGT, arXiv 2503.11651, Sec. 3.2).

Everything here is an independent re-implementation whose *parameter names and shapes* follow the
reference VGGT code so that released checkpoints load unchanged:

* :class:`LayerScale` (``gamma``), :class:`Mlp` (``fc1``/``fc2``),
* :class:`Attention` (``qkv``, optional per-head ``q_norm``/``k_norm``, ``proj``) with optional 2-D RoPE,
* :class:`Block` (pre-norm ``norm1 -> attn -> ls1``, ``norm2 -> mlp -> ls2``),
* :class:`RotaryPositionEmbedding2D`, the 2-D rotary embedding used inside the aggregator blocks.

All modules work on any device and dtype; none of them stores activations beyond the autograd
graph, so under ``torch.inference_mode()`` intermediate tensors are freed as soon as a block returns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attention",
    "Block",
    "LayerScale",
    "Mlp",
    "RopeTable",
    "RotaryPositionEmbedding2D",
    "apply_rope_2d",
]

#: ``(cos, sin)`` tables for one token layout, each of shape (1, 1, N, head_dim) (broadcast over batch
#: and heads), or (B, 1, N, head_dim).
RopeTable = tuple[Tensor, Tensor]


class LayerScale(nn.Module):
    """Per-channel residual scaling ``x * gamma`` (CaiT-style LayerScale).

    Args:
        dim: Channel count C.
        init_values: Initial value of every entry of ``gamma``.

    Shapes: input (..., C) -> output (..., C); dtype follows type promotion of ``x`` and ``gamma``.
    Source: VGGT arXiv 2503.11651, Sec. 3.2 and Appendix B (blocks follow DINOv2, with LayerScale).
    """

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x * gamma``; shape (..., C) -> (..., C)."""
        return x * self.gamma


class Mlp(nn.Module):
    """Two-layer feed-forward network ``fc2(GELU(fc1(x)))`` with exact (erf) GELU.

    Args:
        in_features: Input channels C_in.
        hidden_features: Hidden channels (default ``in_features``).
        out_features: Output channels (default ``in_features``).
        bias: Whether both linear layers have a bias.

    Shapes: (..., C_in) -> (..., C_out).
    Source: VGGT arXiv 2503.11651, Sec. 3.2 (standard ViT MLP inside every block).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP; shape (..., C_in) -> (..., C_out)."""
        return self.fc2(self.act(self.fc1(x)))


def _rotate_half(x: Tensor) -> Tensor:
    """Map the two halves ``(a, b)`` of the last axis to ``(-b, a)``."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope_2d(x: Tensor, table: RopeTable) -> Tensor:
    """Rotate per-head features with a 2-D rotary position table.

    The head dimension D is split in two halves; the first half is rotated by the token's row
    position and the second half by its column position. Within a half the rotate-half convention
    is used: ``x * cos + rotate_half(x) * sin`` where ``rotate_half((a, b)) = (-b, a)``.

    Args:
        x: Queries or keys, shape (B, heads, N, D), D divisible by 4.
        table: ``(cos, sin)`` from :meth:`RotaryPositionEmbedding2D.table`, each broadcastable to
            (B, heads, N, D) and laid out as ``[row-half | column-half]``.

    Returns:
        Tensor of the same shape and dtype as ``x``.

    Source: VGGT arXiv 2503.11651, Sec. 3.2 (RoPE in the alternating-attention blocks).
    """
    cos, sin = table
    half = x.shape[-1] // 2
    xr, xc = x[..., :half], x[..., half:]
    out_r = xr * cos[..., :half] + _rotate_half(xr) * sin[..., :half]
    out_c = xc * cos[..., half:] + _rotate_half(xc) * sin[..., half:]
    return torch.cat((out_r, out_c), dim=-1)


class RotaryPositionEmbedding2D(nn.Module):
    """2-D rotary position embedding (RoPE) with frequency base ``frequency``.

    For a per-direction feature size d (= head_dim / 2) the angular frequencies are
    ``frequency ** (-2k / d)`` for ``k = 0 .. d/2 - 1``; the angle vector lists them twice back to
    back (rotate-half layout). Positions are integers: (row + 1, column + 1) for patch tokens and
    (0, 0) for camera/register tokens (the aggregator builds them).

    The module has no parameters. It caches frequency tables per (d, max position, device); tables
    are computed in float32 and cast to the requested dtype at the end, which is at least as
    accurate as the reference for bfloat16/float16 trunks.

    Source: VGGT arXiv 2503.11651, Sec. 3.2; RoPE (Su et al.) extended to 2-D as in CroCo v2.
    """

    def __init__(self, frequency: float = 100.0) -> None:
        super().__init__()
        self.frequency = float(frequency)
        self._cache: dict[tuple[int, int, str], tuple[Tensor, Tensor]] = {}

    def _tables(self, dim: int, num_positions: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Return float32 (cos, sin) of shape (num_positions, dim) for one direction."""
        key = (dim, num_positions, str(device))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        exponents = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim
        inv_freq = 1.0 / (self.frequency**exponents)
        positions = torch.arange(num_positions, device=device, dtype=torch.float32)
        angles = positions[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        tables = (angles.cos(), angles.sin())
        if device.type != "meta":
            self._cache[key] = tables
        return tables

    def table(
        self, positions: Tensor, head_dim: int, dtype: torch.dtype, num_positions: int | None = None
    ) -> RopeTable:
        """Build the (cos, sin) table for integer 2-D positions.

        Args:
            positions: Integer (row, column) positions, shape (N, 2) or (B, N, 2), int64.
            head_dim: Per-head feature size D (must be divisible by 4).
            dtype: dtype of the queries/keys the table will multiply.
            num_positions: Exclusive upper bound of the position values. When omitted it is read
                from ``positions`` (one host-device sync); the aggregator passes it explicitly.

        Returns:
            ``(cos, sin)``, each of shape (1, 1, N, D) for 2-D ``positions`` or (B, 1, N, D) for 3-D
            ``positions``, dtype ``dtype``, on ``positions.device``.

        Raises:
            ValueError: If ``head_dim`` is not divisible by 4 or ``positions`` is malformed.
        """
        if head_dim % 4 != 0:
            raise ValueError(f"RoPE-2D needs head_dim divisible by 4, got {head_dim}")
        if positions.shape[-1] != 2 or positions.ndim not in (2, 3):
            raise ValueError(f"positions must have shape (N, 2) or (B, N, 2), got {tuple(positions.shape)}")
        half = head_dim // 2
        if num_positions is None:
            num_positions = int(positions.max().item()) + 1 if positions.numel() else 1
        cos_t, sin_t = self._tables(half, num_positions, positions.device)
        rows, cols = positions[..., 0], positions[..., 1]
        cos = torch.cat((cos_t[rows], cos_t[cols]), dim=-1).to(dtype)
        sin = torch.cat((sin_t[rows], sin_t[cols]), dim=-1).to(dtype)
        if positions.ndim == 2:
            return cos[None, None], sin[None, None]
        return cos[:, None], sin[:, None]


class Attention(nn.Module):
    """Multi-head self-attention with optional per-head qk-LayerNorm and optional 2-D RoPE.

    Computation: ``qkv = Linear(x)``; ``q, k = LN(q), LN(k)`` (per head, eps ``norm_eps``) when
    ``qk_norm``; RoPE on q and k when a table is given; ``softmax(q k^T / sqrt(D)) v`` via
    :func:`torch.nn.functional.scaled_dot_product_attention`; output projection ``proj``.

    Args:
        dim: Token channels C (= heads * D).
        num_heads: Number of heads.
        qkv_bias: Bias on the qkv projection.
        proj_bias: Bias on the output projection.
        qk_norm: Whether to LayerNorm q and k per head (parameters ``q_norm``/``k_norm`` of size D).
        norm_eps: Epsilon of the qk LayerNorms.

    Shapes: x (B, N, C) -> (B, N, C).

    Raises:
        ValueError: If ``dim`` is not divisible by ``num_heads``.

    Source: VGGT arXiv 2503.11651, Sec. 3.2 (self-attention with QKNorm and RoPE).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm: nn.Module = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, rope: RopeTable | None = None) -> Tensor:
        """Attend over the N tokens of each of the B sequences.

        Args:
            x: Tokens, shape (B, N, C).
            rope: Optional RoPE table for these N tokens (see :class:`RotaryPositionEmbedding2D`).

        Returns:
            Tensor of shape (B, N, C), same dtype as the projection output.
        """
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        del qkv
        q = self.q_norm(q)
        k = self.k_norm(k)
        if rope is not None:
            q = apply_rope_2d(q, rope)
            k = apply_rope_2d(k, rope)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(self.head_dim))
        del q, k, v
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: ``x += ls1(attn(norm1(x)))``; ``x += ls2(mlp(norm2(x)))``.

    Args:
        dim: Token channels C.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden size as a multiple of C.
        qkv_bias: Bias on qkv.
        proj_bias: Bias on the attention output projection.
        ffn_bias: Bias on both MLP layers.
        init_values: LayerScale init; ``None`` or 0 disables LayerScale (``ls1``/``ls2`` become
            identities and have no parameters).
        qk_norm: Per-head qk LayerNorm.
        norm_eps: Epsilon of ``norm1``/``norm2`` (1e-5 in the aggregator and camera head, 1e-6 in
            the DINOv2 ViT).
        qk_norm_eps: Epsilon of the qk LayerNorms.

    Shapes: x (B, N, C) -> (B, N, C).
    Source: VGGT arXiv 2503.11651, Sec. 3.2 (frame/global attention blocks) and Sec. 3.3 (camera trunk).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = None,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        qk_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm, norm_eps=qk_norm_eps
        )
        self.ls1: nn.Module = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2: nn.Module = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: Tensor, rope: RopeTable | None = None) -> Tensor:
        """Apply the block; x (B, N, C) -> (B, N, C). ``rope`` is passed to the attention."""
        x = x + self.ls1(self.attn(self.norm1(x), rope=rope))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x
