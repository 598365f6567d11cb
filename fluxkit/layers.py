"""The FLUX.1 transformer's building blocks. Attribute names are the BFL checkpoint keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .math import attention, rope_embedding


class EmbedND(nn.Module):
    """Multi-axis RoPE: position ids [B, L, n_axes] -> cos/sin tables [2, B, 1, L, head_dim]."""

    def __init__(self, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        return rope_embedding(ids, self.axes_dim, self.theta)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm over the head dim, computed in fp32; the learnable weight is called `scale` in BFL checkpoints."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # torch's fused kernel accumulates in fp32 for bf16/fp16 inputs, like BFL's explicit upcast, in one pass.
        return F.rms_norm(x, (x.shape[-1],), self.scale.to(x.dtype), eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, L, 3*H*D] laid out (K H D) -> three [B, H, L, D]."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)  # each [B, H, L, D]
    return q, k, v


class SelfAttention(nn.Module):
    """Per-stream attention weights of a double block; the attention itself is joint (see DoubleStreamBlock)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor

    def modulate(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.shift, x, 1 + self.scale)  # (1 + scale) * x + shift, one pass

    def gated(self, x: Tensor, branch: Tensor) -> Tensor:
        return torch.addcmul(x, self.gate, branch)  # x + gate * branch, one pass


class Modulation(nn.Module):
    """adaLN: SiLU(vec) -> Linear -> 3 (single) or 6 (double) vectors of width dim, broadcast over tokens."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)  # each [B, 1, dim]
        first = ModulationOut(*out[:3])
        return first, (ModulationOut(*out[3:]) if self.multiplier == 6 else None)


def _mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden, mlp_hidden, bias=True),
        nn.GELU(approximate="tanh"),
        nn.Linear(mlp_hidden, hidden, bias=True),
    )


class DoubleStreamBlock(nn.Module):
    """MM-DiT block: separate weights for the image and text streams, one joint attention over [txt; img]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = _mlp(hidden_size, mlp_hidden)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden)

    def _qkv(self, x: Tensor, mod: ModulationOut, norm: nn.LayerNorm, attn: SelfAttention) -> tuple[Tensor, ...]:
        h = mod.modulate(norm(x))  # [B, L, C]
        q, k, v = split_qkv(attn.qkv(h), self.num_heads)  # each [B, H, L, D]
        q, k = attn.norm(q, k, v)
        return q, k, v

    def forward(
        self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self._qkv(img, img_mod1, self.img_norm1, self.img_attn)
        txt_q, txt_k, txt_v = self._qkv(txt, txt_mod1, self.txt_norm1, self.txt_attn)

        # Text tokens come first in the joint sequence.
        q = torch.cat((txt_q, img_q), dim=2)  # [B, H, L_txt + L_img, D]
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe, mask)  # [B, L, C]
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img_mod1.gated(img, self.img_attn.proj(img_attn))
        img = img_mod2.gated(img, self.img_mlp(img_mod2.modulate(self.img_norm2(img))))
        txt = txt_mod1.gated(txt, self.txt_attn.proj(txt_attn))
        txt = txt_mod2.gated(txt, self.txt_mlp(txt_mod2.modulate(self.txt_norm2(txt))))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence; one fused input and one fused output projection."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)  # [q | k | v | mlp]
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)  # input [attn | gelu(mlp)]
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, mask: Tensor | None = None) -> Tensor:
        mod, _ = self.modulation(vec)
        h = mod.modulate(self.pre_norm(x))  # [B, L, C]
        qkv, mlp = torch.split(self.linear1(h), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = split_qkv(qkv, self.num_heads)  # each [B, H, L, D]
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe, mask)  # [B, L, C]
        out = self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=-1))
        return mod.gated(x, out)


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)  # BFL order: shift first
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)
