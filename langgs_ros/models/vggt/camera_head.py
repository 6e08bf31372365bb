"""Camera head of VGGT: iterative refinement of the 9-D pose encoding (VGGT arXiv 2503.11651, Sec. 3.3).

The head reads the camera token (index 0) of every frame from the *last* aggregator layer, applies a
LayerNorm and then refines a pose encoding over ``num_iterations`` (4) steps. Each step embeds the
previous *raw* (not activated) accumulated encoding — the learned ``empty_pose_tokens`` in the first
step — turns it into DiT-style adaLN shift/scale/gate, modulates the camera tokens, runs the trunk
(``trunk_depth`` self-attention blocks over the S frames of a sequence, no RoPE, no qk-norm) and a
GELU MLP that outputs a 9-D delta. The delta is accumulated; the activation (linear translation,
linear quaternion, ReLU field of view) is applied to a copy for output only.

Pose encoding layout (``absT_quaR_FoV``): ``[t_x, t_y, t_z, q_x, q_y, q_z, q_w, fov_h, fov_w]`` —
translation of the camera-from-world transform, an unnormalised scalar-last quaternion of its
rotation, and vertical/horizontal fields of view in radians (decode with
:func:`langgs_ros.models.vggt.pose_encoding.pose_encoding_to_extri_intri`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from langgs_ros.models.vggt.layers import Block, Mlp

__all__ = ["POSE_ENCODING_DIM", "CameraHead", "activate_pose"]

#: Length of the ``absT_quaR_FoV`` pose encoding.
POSE_ENCODING_DIM = 9


def _act(x: Tensor, kind: str) -> Tensor:
    if kind == "linear":
        return x
    if kind == "relu":
        return F.relu(x)
    if kind == "exp":
        return torch.exp(x)
    if kind == "inv_log":
        return torch.sign(x) * torch.expm1(x.abs())
    raise ValueError(f"unknown activation {kind!r}")


def activate_pose(
    pose_enc: Tensor, trans_act: str = "linear", quat_act: str = "linear", fov_act: str = "relu"
) -> Tensor:
    """Apply per-component activations to a raw (B, S, 9) pose encoding.

    Args:
        pose_enc: Raw accumulated encoding (..., 9).
        trans_act: Activation of entries 0-2 (translation).
        quat_act: Activation of entries 3-6 (quaternion, xyzw).
        fov_act: Activation of entries 7-8 (fov_h, fov_w in radians); ReLU keeps them non-negative.

    Returns:
        Activated encoding (..., 9), same dtype.

    Raises:
        ValueError: For an unknown activation name.

    Source: VGGT arXiv 2503.11651, Sec. 3.3 (camera predictions).
    """
    t = _act(pose_enc[..., :3], trans_act)
    q = _act(pose_enc[..., 3:7], quat_act)
    fov = _act(pose_enc[..., 7:], fov_act)
    return torch.cat((t, q, fov), dim=-1)


class CameraHead(nn.Module):
    """Iterative camera-parameter head (adaLN-modulated transformer trunk over camera tokens).

    Args:
        dim_in: Channels of the aggregated tokens (2 * aggregator embed_dim).
        trunk_depth: Self-attention blocks in the trunk (4 in VGGT-1B).
        num_heads: Heads of the trunk blocks.
        mlp_ratio: MLP expansion of the trunk blocks.
        init_values: LayerScale init of the trunk blocks.
        trans_act: Translation activation (``"linear"``).
        quat_act: Quaternion activation (``"linear"``).
        fov_act: Field-of-view activation (``"relu"``).

    Parameter names (``trunk``, ``token_norm``, ``trunk_norm``, ``empty_pose_tokens``, ``embed_pose``,
    ``poseLN_modulation.1``, ``pose_branch``) follow the reference. Epsilons: trunk blocks,
    ``token_norm`` and ``trunk_norm`` 1e-5; the affine-free adaLN norm 1e-6.

    Source: VGGT arXiv 2503.11651, Sec. 3.3 ("Camera predictions": four extra self-attention layers
    on the camera tokens, followed by a linear layer).
    """

    def __init__(
        self,
        dim_in: int = 2048,
        trunk_depth: int = 4,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        init_values: float = 0.01,
        trans_act: str = "linear",
        quat_act: str = "linear",
        fov_act: str = "relu",
    ) -> None:
        super().__init__()
        self.trans_act = trans_act
        self.quat_act = quat_act
        self.fov_act = fov_act
        dim = POSE_ENCODING_DIM
        self.trunk = nn.Sequential(
            *[
                Block(dim_in, num_heads, mlp_ratio=mlp_ratio, init_values=init_values, norm_eps=1e-5)
                for _ in range(trunk_depth)
            ]
        )
        self.token_norm = nn.LayerNorm(dim_in, eps=1e-5)
        self.trunk_norm = nn.LayerNorm(dim_in, eps=1e-5)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, dim))
        self.embed_pose = nn.Linear(dim, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in, bias=True))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, dim, bias=True)

    def forward(self, tokens: Tensor, num_iterations: int = 4) -> list[Tensor]:
        """Predict pose encodings from the last aggregator layer.

        Args:
            tokens: Last-layer aggregated tokens, shape (B, S, P, dim_in); only token 0 (the camera
                token) of each frame is read. Computation happens in the dtype of ``tokens`` (the
                model passes float32).
            num_iterations: Refinement steps (4 in VGGT).

        Returns:
            List of ``num_iterations`` activated encodings, each (B, S, 9); the last is the final
            prediction. Layout: translation (3), quaternion xyzw (4), fov_h, fov_w (radians).

        Raises:
            ValueError: If ``num_iterations < 1``.
        """
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        cam = self.token_norm(tokens[:, :, 0])
        B, S, _ = cam.shape
        cam_adaln = self.adaln_norm(cam)
        raw: Tensor | None = None
        outputs: list[Tensor] = []
        for _ in range(num_iterations):
            if raw is None:
                cond = self.embed_pose(self.empty_pose_tokens.expand(B, S, -1).to(cam.dtype))
            else:
                cond = self.embed_pose(raw.detach())
            shift, scale, gate = self.poseLN_modulation(cond).chunk(3, dim=-1)
            x = cam + gate * (cam_adaln * (1 + scale) + shift)
            x = self.trunk(x)
            delta = self.pose_branch(self.trunk_norm(x))
            raw = delta if raw is None else raw + delta
            outputs.append(activate_pose(raw, self.trans_act, self.quat_act, self.fov_act))
        return outputs
