"""Attention and rotary position embeddings: the numerics shared by every block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def rope(pos: Tensor, dim: int, theta: int) -> tuple[Tensor, Tensor]:
    """Rotation angles for one position axis: pos [B, L] -> (cos, sin), each [B, L, dim/2], float32.

    omega_j = theta^(-2j/dim) is computed in float64 (as the original BFL release and diffusers do) so that large
    positions keep their precision.
    """
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)  # [dim/2]
    angles = pos.to(torch.float64)[..., None] * omega  # [B, L, dim/2]
    return torch.cos(angles).float(), torch.sin(angles).float()


def rope_embedding(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> Tensor:
    """ids [B, L, n_axes] -> pe [2, B, 1, L, head_dim]: the cos and signed-sin tables of `apply_rope`.

    Pair k = (2k, 2k+1) of the head dim rotates by its axis' angle (pairs [0, d0/2) axis 0, then axis 1, ...), as
    BFL's per-pair rotation matrices do. Precomputing full-width, contiguous tables once per resolution turns the
    rotation into two multiplies and an add per call, with no strided broadcasting.
    """
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"position ids have {ids.shape[-1]} axes, the model expects {len(axes_dim)}")
    cos, sin = zip(*(rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)), strict=True)
    cos, sin = torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)  # [B, L, D/2]
    cos = cos.repeat_interleave(2, dim=-1)  # [B, L, D]: same angle for both members of a pair
    sin = torch.stack((-sin, sin), dim=-1).flatten(-2)  # [B, L, D]: out[2k] gets -sin, out[2k+1] gets +sin
    return torch.stack((cos, sin)).unsqueeze(2)  # [2, B, 1, L, D]; broadcasts over heads


def apply_rope(xq: Tensor, xk: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate interleaved pairs of q and k [B, H, L, D]: out[2k] = cos x[2k] - sin x[2k+1], out[2k+1] = sin x[2k] +
    cos x[2k+1]. fp32 math, returned in the input dtype.

    Eager, each pair is a complex number and the rotation one complex multiply by cos + i sin: a single elementwise
    pass (3x faster on the CPU than multiply, swap pairs, multiply, add, with the same fp32 results). Under
    torch.compile the real form is kept, since Inductor fuses it into the neighbouring ops and not complex ones.
    """
    if torch.compiler.is_compiling():
        return _rotate_real(xq, pe), _rotate_real(xk, pe)
    rotation = torch.complex(pe[0][..., ::2], pe[1][..., 1::2])  # [B, 1, L, D/2]: cos + i sin per pair
    return _rotate_complex(xq, rotation), _rotate_complex(xk, rotation)


def _rotate_complex(x: Tensor, rotation: Tensor) -> Tensor:
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, H, L, D/2]
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def _rotate_real(x: Tensor, pe: Tensor) -> Tensor:
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    swapped = torch.stack((pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return (xf * pe[0] + swapped * pe[1]).type_as(x)


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
