"""GGUF: GGML block quantization in torch, and reading/writing `.gguf` files (city96's Flux layout).

A GGML-quantized weight is stored row by row; each row of `in_features` values is cut into blocks of 32 (legacy
types) or 256 (K types) values, and each block becomes `type_size` bytes: one or two fp16 scales and packed integer
codes. A tensor is kept here as those raw bytes, uint8 [..., row_bytes], and dequantized in torch. The bit layouts
follow ggml's `ggml-quants.c`; the `gguf` package's numpy `gguf.quants` (the same layouts) is the test oracle.

Files: tensors keep their checkpoint (BFL) names; GGUF lists dimensions fastest-first (`ne`), so a torch [out, in]
weight is recorded as (in, out). The `gguf` package (fluxkit[quant]) is needed for files only, not for the codecs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

QK_K = 256  # values per K-quant super-block


class QType(NamedTuple):
    ggml_id: int  # GGMLQuantizationType value in the file
    block_size: int  # values per block
    type_size: int  # bytes per block


QTYPES: dict[str, QType] = {
    "f32": QType(0, 1, 4),
    "f16": QType(1, 1, 2),
    "bf16": QType(30, 1, 2),
    "q4_0": QType(2, 32, 18),  # fp16 d, 16 bytes of nibbles
    "q4_1": QType(3, 32, 20),  # fp16 d, fp16 m, 16 bytes of nibbles
    "q5_0": QType(6, 32, 22),  # fp16 d, 4 bytes of 5th bits, 16 bytes of nibbles
    "q5_1": QType(7, 32, 24),  # fp16 d, fp16 m, 4 bytes of 5th bits, 16 bytes of nibbles
    "q8_0": QType(8, 32, 34),  # fp16 d, 32 int8
    "q4_k": QType(12, QK_K, 144),  # fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
    "q5_k": QType(13, QK_K, 176),  # as q4_k + 32 bytes of 5th bits
    "q6_k": QType(14, QK_K, 210),  # 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, fp16 d
}
FLOAT_QTYPES = ("f32", "f16", "bf16")
BLOCK_QTYPES = tuple(name for name in QTYPES if name not in FLOAT_QTYPES)
_FLOAT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_BY_ID = {qt.ggml_id: name for name, qt in QTYPES.items()}


def check_qtype(qtype: str, argument: str = "qtype") -> QType:
    if qtype not in QTYPES:
        raise ValueError(f"{argument} must be one of {', '.join(QTYPES)}; got {qtype!r}")
    return QTYPES[qtype]


def row_bytes(n_values: int, qtype: str) -> int:
    """Bytes that one row of `n_values` takes in `qtype` (ValueError if the row does not split into blocks)."""
    qt = check_qtype(qtype)
    if n_values % qt.block_size:
        raise ValueError(f"a row of {n_values} values does not split into {qtype} blocks of {qt.block_size}")
    return n_values // qt.block_size * qt.type_size


# ---------------------------------------------------------------------------------------------------------------------
# Dequantization: blocks uint8 [n, type_size] -> float32 [n, block_size]


def _f16(b: Tensor) -> Tensor:
    """Two little-endian bytes per row [n, 2] -> float32 [n, 1]."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """Bytes [..., k] -> [..., 2, k]: low nibbles first (values 0..k-1 of a run), high nibbles second."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _bits(qh: Tensor, n: int) -> Tensor:
    """Bytes [..., k] -> bit planes [..., n, k]: plane j holds bit j of every byte."""
    shifts = torch.arange(n, dtype=torch.uint8, device=qh.device)[:, None]
    return (qh.unsqueeze(-2) >> shifts) & 1


def _fifth_bits(qh: Tensor) -> Tensor:
    """Legacy q5: 4 bytes = a little-endian uint32 whose bit i is the 5th bit of value i -> [n, 32]."""
    return _bits(qh, 8).transpose(-1, -2).reshape(qh.shape[0], 32)


def _k_scales(s: Tensor) -> tuple[Tensor, Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins, each [n, 8] (ggml `get_scale_min_k4`)."""
    lo, hi, mixed = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = torch.cat((lo & 63, (mixed & 0x0F) | ((lo >> 2) & 0x30)), dim=-1)
    mins = torch.cat((hi & 63, (mixed >> 4) | ((hi >> 2) & 0x30)), dim=-1)
    return scales.float(), mins.float()


def _dq_q8_0(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * b[:, 2:].view(torch.int8).float()


def _dq_q4_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 2:]).flatten(1).to(torch.int8) - 8  # [n, 32]
    return _f16(b[:, :2]) * q.float()


def _dq_q4_1(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 4:]).flatten(1)  # [n, 32]
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _dq_q5_0(b: Tensor) -> Tensor:
    q = (_nibbles(b[:, 6:]).flatten(1) | (_fifth_bits(b[:, 2:6]) << 4)).to(torch.int8) - 16  # [n, 32]
    return _f16(b[:, :2]) * q.float()


def _dq_q5_1(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 8:]).flatten(1) | (_fifth_bits(b[:, 4:8]) << 4)  # [n, 32]
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _dq_q4_k(b: Tensor, qh: Tensor | None = None) -> Tensor:
    n = b.shape[0]
    scales, mins = _k_scales(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * scales)[..., None]  # [n, 8, 1]: one scale per 32-value sub-block
    dm = (_f16(b[:, 2:4]) * mins)[..., None]
    q = _nibbles(b[:, -128:].reshape(n, 4, 32)).reshape(n, 8, 32)  # 32 bytes carry sub-blocks 2i (low), 2i+1
    if qh is not None:  # q5_k: bit j of byte l is the 5th bit of value l of sub-block j
        q = q | (_bits(qh, 8) << 4)
    return (d * q.float() - dm).reshape(n, QK_K)


def _dq_q5_k(b: Tensor) -> Tensor:
    return _dq_q4_k(b, qh=b[:, 16:48])


def _dq_q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    low = _nibbles(b[:, :128].reshape(n, 2, 64)).reshape(n, 8, 32)  # two 128-value halves, 64 bytes each
    high = (b[:, 128:192].reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device)[
        :, None]) & 3  # [n, 2, 4, 32]
    q = ((low | (high.reshape(n, 8, 32) << 4)).to(torch.int8) - 32).reshape(n, 16, 16)
    d = _f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8).float()  # [n, 16]: one scale per 16 values
    return (d[..., None] * q.float()).reshape(n, QK_K)


_DEQUANT: dict[str, Callable[[Tensor], Tensor]] = {
    "q8_0": _dq_q8_0, "q4_0": _dq_q4_0, "q4_1": _dq_q4_1, "q5_0": _dq_q5_0, "q5_1": _dq_q5_1,
    "q4_k": _dq_q4_k, "q5_k": _dq_q5_k, "q6_k": _dq_q6_k,
}


def dequantize(packed: Tensor, qtype: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Raw bytes uint8 [..., row_bytes] -> values [..., n_values] in `dtype` (computed in float32)."""
    qt = check_qtype(qtype)
    if packed.dtype != torch.uint8 or packed.shape[-1] % qt.type_size:
        raise ValueError(f"packed {qtype} data must be uint8 [..., k*{qt.type_size}], got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    if qtype in _FLOAT_DTYPES:
        return packed.view(_FLOAT_DTYPES[qtype]).to(dtype)
    lead, n_blocks = packed.shape[:-1], packed.shape[-1] // qt.type_size
    values = _DEQUANT[qtype](packed.reshape(-1, qt.type_size))  # [blocks, block_size] float32
    return values.reshape(*lead, n_blocks * qt.block_size).to(dtype)
