"""DPT dense-prediction head of VGGT (VGGT arXiv 2503.11651, Sec. 3.3 "Dense predictions").

Used twice: the depth head (output_dim 2: log-depth + confidence, activation ``exp``) and the point
head (output_dim 4: xyz + confidence, activation ``inv_log``). Follows DPT (Ranftl et al., arXiv
2103.13413) with VGGT's additions:

1. For each of four selected aggregator layers take the patch tokens, apply one shared LayerNorm
   (eps 1e-5), reshape to a (2C, h, w) map, project with a 1x1 conv to ``out_channels[i]`` and add a
   fixed sine-cosine UV position embedding (x 0.1).
2. Resize the four maps x4 (transposed conv), x2 (transposed conv), x1, x1/2 (strided conv).
3. Fuse coarse-to-fine with RefineNet blocks (bilinear, align_corners=True). Their residual conv
   units apply ReLU to their input *before* the skip connection (the reference uses an in-place
   ReLU), so the skip adds ``relu(x)``.
4. 3x3 conv to features/2, bilinear upsampling to the full H x W, the position embedding again,
   3x3 conv to 32, ReLU, 1x1 conv to ``output_dim``.
5. Channels last; the last channel is confidence ``1 + exp(c)``, the rest are values.

Frames are processed in chunks of ``frames_chunk_size`` so peak activation memory is bounded by the
chunk, not by the sequence length. Parameter names follow the reference (``norm``, ``projects``,
``resize_layers``, ``scratch.*``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DPTHead", "uv_position_embedding"]

_MAX_INTERP_ELEMENTS = 1_610_612_736  # stay below int32 indexing limits of some interpolate kernels


def _interpolate(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=True) resize of (N, C, h, w) to ``size``, chunked over N if huge."""
    elements = size[0] * size[1] * x.shape[0] * x.shape[1]
    if elements <= _MAX_INTERP_ELEMENTS:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    chunks = torch.chunk(x, elements // _MAX_INTERP_ELEMENTS + 1, dim=0)
    return torch.cat([F.interpolate(c, size=size, mode="bilinear", align_corners=True) for c in chunks])


_POS_CACHE: dict[tuple[int, int, int, float, str], Tensor] = {}


def uv_position_embedding(
    channels: int, grid_h: int, grid_w: int, aspect_ratio: float, device: torch.device, omega_0: float = 100.0
) -> Tensor:
    """Fixed 2-D sine-cosine embedding of an aspect-ratio-aware UV grid (unscaled).

    The grid spans ``[-a, a] x [-b, b]`` (cell centres, ``a = r / sqrt(r^2 + 1)``,
    ``b = 1 / sqrt(r^2 + 1)``, r = ``aspect_ratio`` = W / H of the *image*), built in float32. The
    first ``channels/2`` channels embed u (horizontal), the rest v (vertical); each half is
    ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = omega_0 ** (-k / (channels/4))``, computed in
    float64 and returned as float32.

    Args:
        channels: Embedding channels (divisible by 4).
        grid_h: Rows of the feature map.
        grid_w: Columns of the feature map.
        aspect_ratio: Image width / height.
        device: Target device.
        omega_0: Frequency base (100).

    Returns:
        float32 tensor of shape (channels, grid_h, grid_w) on ``device``.

    Raises:
        ValueError: If ``channels`` is not divisible by 4.

    Source: VGGT arXiv 2503.11651, Sec. 3.3 (DPT head); sincos embedding as in MAE/DiT.
    """
    if channels % 4 != 0:
        raise ValueError(f"channels must be divisible by 4, got {channels}")
    key = (channels, grid_h, grid_w, float(aspect_ratio), str(device))
    hit = _POS_CACHE.get(key)
    if hit is not None:
        return hit
    diag = math.sqrt(aspect_ratio**2 + 1.0)
    span_x, span_y = aspect_ratio / diag, 1.0 / diag
    u = torch.linspace(
        -span_x * (grid_w - 1) / grid_w, span_x * (grid_w - 1) / grid_w, steps=grid_w, dtype=torch.float32
    )
    v = torch.linspace(
        -span_y * (grid_h - 1) / grid_h, span_y * (grid_h - 1) / grid_h, steps=grid_h, dtype=torch.float32
    )
    quarter = channels // 4
    omega = torch.arange(quarter, dtype=torch.float64) / quarter
    omega = 1.0 / omega_0**omega

    def sincos(pos: Tensor) -> Tensor:
        angles = pos.double()[:, None] * omega[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1).float()

    emb_u = sincos(u)[None, :, :].expand(grid_h, grid_w, 2 * quarter)
    emb_v = sincos(v)[:, None, :].expand(grid_h, grid_w, 2 * quarter)
    emb = torch.cat((emb_u, emb_v), dim=-1).permute(2, 0, 1).contiguous().to(device)
    if device.type != "meta":
        _POS_CACHE[key] = emb
    return emb


class ResidualConvUnit(nn.Module):
    """``conv2(relu(conv1(relu(x)))) + relu(x)`` with 3x3 convs (names ``conv1``/``conv2``).

    The ``+ relu(x)`` skip reproduces the reference, whose in-place ReLU overwrites ``x``.
    Shapes: (N, F, h, w) -> (N, F, h, w).
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the unit; (N, F, h, w) -> (N, F, h, w)."""
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FeatureFusionBlock(nn.Module):
    """RefineNet-style fusion: ``out_conv(up(rcu2(x0 + rcu1(x1))))`` (``rcu1`` only if ``has_residual``).

    Shapes: x0, x1 (N, F, h, w) -> (N, F, h', w') with (h', w') = ``size`` or 2x.
    """

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1, stride=1, padding=0, bias=True)
        self.has_residual = has_residual
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        """Fuse ``x`` with ``skip`` and upsample to ``size`` (default 2x)."""
        if self.has_residual and skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            size = (x.shape[-2] * 2, x.shape[-1] * 2)
        return self.out_conv(_interpolate(x, size))


class DPTHead(nn.Module):
    """DPT head producing a dense map plus confidence from four aggregator layers.

    Args:
        dim_in: Channels of the aggregated tokens (2 * embed_dim).
        patch_size: Patch side p in pixels.
        output_dim: Output channels including confidence (2 for depth, 4 for points).
        activation: Value activation: ``"exp"`` (depth), ``"inv_log"`` (points,
            ``sign(v) * (exp(|v|) - 1)``), ``"linear"``, ``"relu"``.
        features: Fusion channels (256 in VGGT-1B).
        out_channels: Projection channels of the four layers (256, 512, 1024, 1024 in VGGT-1B).
        intermediate_layer_idx: Aggregator layers read by the head ((4, 11, 17, 23) in VGGT-1B).
        pos_embed: Add the UV sine-cosine embedding (True).

    Raises:
        ValueError: If ``out_channels``/``intermediate_layer_idx`` do not have 4 entries.

    Source: VGGT arXiv 2503.11651, Sec. 3.3 ("Dense predictions", DPT layer producing dense feature
    maps, then depth/point maps with aleatoric uncertainty/confidence).
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int = 4,
        activation: str = "inv_log",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
        pos_embed: bool = True,
    ) -> None:
        super().__init__()
        if len(out_channels) != 4 or len(intermediate_layer_idx) != 4:
            raise ValueError("DPTHead needs exactly 4 out_channels and 4 intermediate_layer_idx entries")
        self.patch_size = patch_size
        self.activation = activation
        self.use_pos_embed = pos_embed
        self.intermediate_layer_idx = tuple(int(i) for i in intermediate_layer_idx)
        oc = list(out_channels)
        self.norm = nn.LayerNorm(dim_in, eps=1e-5)
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, c, kernel_size=1, stride=1, padding=0) for c in oc])
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4, padding=0),
                nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2, padding=0),
                nn.Identity(),
                nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        scratch = nn.Module()
        scratch.layer1_rn = nn.Conv2d(oc[0], features, kernel_size=3, stride=1, padding=1, bias=False)
        scratch.layer2_rn = nn.Conv2d(oc[1], features, kernel_size=3, stride=1, padding=1, bias=False)
        scratch.layer3_rn = nn.Conv2d(oc[2], features, kernel_size=3, stride=1, padding=1, bias=False)
        scratch.layer4_rn = nn.Conv2d(oc[3], features, kernel_size=3, stride=1, padding=1, bias=False)
        scratch.refinenet1 = FeatureFusionBlock(features)
        scratch.refinenet2 = FeatureFusionBlock(features)
        scratch.refinenet3 = FeatureFusionBlock(features)
        scratch.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        scratch.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, stride=1, padding=1)
        scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, kernel_size=3, stride=1, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, output_dim, kernel_size=1, stride=1, padding=0),
        )
        self.scratch = scratch

    def _add_pos(self, x: Tensor, aspect_ratio: float) -> Tensor:
        if not self.use_pos_embed:
            return x
        emb = uv_position_embedding(x.shape[1], x.shape[-2], x.shape[-1], aspect_ratio, x.device)
        return x + 0.1 * emb.to(x.dtype)

    def _forward_frames(
        self,
        tokens_list: Sequence[Tensor | None],
        image_hw: tuple[int, int],
        patch_start_idx: int,
        f0: int,
        f1: int,
    ) -> tuple[Tensor, Tensor]:
        """Run the head on frames ``f0:f1``; returns values (B, s, H, W, D-1) and conf (B, s, H, W)."""
        H, W = image_hw
        gh, gw = H // self.patch_size, W // self.patch_size
        aspect = W / H
        dtype = self.norm.weight.dtype
        feats: list[Tensor] = []
        B = s = 0
        for i, layer in enumerate(self.intermediate_layer_idx):
            t = tokens_list[layer]
            if t is None:
                raise ValueError(f"aggregator layer {layer} needed by the DPT head was not kept")
            t = t[:, f0:f1, patch_start_idx:].to(dtype)
            B, s = t.shape[0], t.shape[1]
            x = self.norm(t.reshape(B * s, gh * gw, t.shape[-1]))
            del t
            x = x.permute(0, 2, 1).reshape(B * s, -1, gh, gw)
            x = self._add_pos(self.projects[i](x), aspect)
            feats.append(self.resize_layers[i](x))
            del x
        sc = self.scratch
        l1, l2, l3, l4 = (
            sc.layer1_rn(feats[0]),
            sc.layer2_rn(feats[1]),
            sc.layer3_rn(feats[2]),
            sc.layer4_rn(feats[3]),
        )
        del feats
        out = sc.refinenet4(l4, size=tuple(l3.shape[-2:]))
        del l4
        out = sc.refinenet3(out, l3, size=tuple(l2.shape[-2:]))
        del l3
        out = sc.refinenet2(out, l2, size=tuple(l1.shape[-2:]))
        del l2
        out = sc.refinenet1(out, l1)
        del l1
        out = sc.output_conv1(out)
        out = _interpolate(out, (gh * self.patch_size, gw * self.patch_size))
        out = self._add_pos(out, aspect)
        out = sc.output_conv2(out)
        out = out.permute(0, 2, 3, 1)
        values, conf = out[..., :-1], out[..., -1]
        if self.activation == "exp":
            values = torch.exp(values)
        elif self.activation == "inv_log":
            values = torch.sign(values) * torch.expm1(values.abs())
        elif self.activation == "relu":
            values = F.relu(values)
        elif self.activation != "linear":
            raise ValueError(f"unknown activation {self.activation!r}")
        conf = 1.0 + torch.exp(conf)
        return values.reshape(B, s, *values.shape[1:]), conf.reshape(B, s, *conf.shape[1:])

    def forward(
        self,
        tokens_list: Sequence[Tensor | None],
        image_hw: tuple[int, int],
        patch_start_idx: int,
        frames_chunk_size: int | None = 8,
    ) -> tuple[Tensor, Tensor]:
        """Predict a dense map and its confidence for every frame.

        Args:
            tokens_list: Aggregator outputs indexed by layer, each (B, S, P, dim_in) (entries not in
                ``intermediate_layer_idx`` may be ``None``). They are cast to the head's parameter
                dtype (float32) chunk by chunk.
            image_hw: (H, W) of the input images in pixels (multiples of the patch size).
            patch_start_idx: Index of the first patch token in P.
            frames_chunk_size: Frames per chunk; ``None`` or ``<= 0`` processes all S frames at once.

        Returns:
            ``(values, conf)``: values (B, S, H, W, output_dim - 1) — depth in the depth head's units
            (scale of the first camera's frame after training), or 3-D points in the world (= first
            camera) frame for the point head — and confidence (B, S, H, W), always > 1.

        Raises:
            ValueError: If a needed layer is missing or the activation is unknown.
        """
        first = tokens_list[self.intermediate_layer_idx[0]]
        if first is None:
            raise ValueError(
                f"aggregator layer {self.intermediate_layer_idx[0]} needed by the DPT head was not kept"
            )
        S = first.shape[1]
        step = S if frames_chunk_size is None or frames_chunk_size <= 0 else int(frames_chunk_size)
        vals: list[Tensor] = []
        confs: list[Tensor] = []
        for f0 in range(0, S, step):
            v, c = self._forward_frames(tokens_list, image_hw, patch_start_idx, f0, min(f0 + step, S))
            vals.append(v)
            confs.append(c)
        if len(vals) == 1:
            return vals[0], confs[0]
        return torch.cat(vals, dim=1), torch.cat(confs, dim=1)
