"""Attention and rotary position embeddings: the numerics shared by every block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices for one position axis.

    pos [B, L] integer-valued positions -> [B, L, dim/2, 2, 2] (cos, -sin; sin, cos) per rotated pair.
    Frequencies omega_j = theta^(-2j/dim) are computed in float64 (as the original BFL release and diffusers do) so
    large positions keep their precision; the result is float32.
    """
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)  # [dim/2]
    angles = pos.to(torch.float64)[..., None] * omega  # [B, L, dim/2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    rot = torch.stack([cos, -sin, sin, cos], dim=-1)  # [B, L, dim/2, 4]
    return rot.unflatten(-1, (2, 2)).float()  # [B, L, dim/2, 2, 2]


def rope_embedding(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> Tensor:
    """ids [B, L, n_axes] -> pe [B, 1, L, head_dim/2, 2, 2]; pair k of the head dim rotates by axis a's angle."""
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"position ids have {ids.shape[-1]} axes, the model expects {len(axes_dim)}")
    pe = torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3)
    return pe.unsqueeze(1)  # broadcast over heads


def apply_rope(xq: Tensor, xk: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate interleaved pairs (2k, 2k+1) of q and k [B, H, L, D] by pe; fp32 math, returned in the input dtype."""
    xq_ = xq.float().unflatten(-1, (-1, 1, 2))  # [B, H, L, D/2, 1, 2]
    xk_ = xk.float().unflatten(-1, (-1, 1, 2))
    # out_pair = R @ x_pair, written as a broadcast multiply-add over R's columns.
    q_out = pe[..., 0] * xq_[..., 0] + pe[..., 1] * xq_[..., 1]  # [B, H, L, D/2, 2]
    k_out = pe[..., 0] * xk_[..., 0] + pe[..., 1] * xk_[..., 1]
    return q_out.flatten(-2).type_as(xq), k_out.flatten(-2).type_as(xk)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, mask: Tensor | None = None) -> Tensor:
    """Joint attention over the [txt; img] sequence. q, k, v [B, H, L, D] -> [B, L, H*D].

    `mask` (optional, bool [B, 1|H, L, L], True = may attend) is only used by regional prompting; FLUX.1 itself
    attends to every token, text padding included.
    """
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, L, D]
    return x.transpose(1, 2).flatten(2)  # [B, L, H*D]


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10_000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (or a guidance value): [B] -> [B, dim], cos half first.

    The x1000 happens in t's own dtype, as in BFL and diffusers, so bf16 rounding (3.5 -> 3504) is reproduced.
    """
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb
