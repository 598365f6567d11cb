"""GGUF: GGML block quantization in torch, and reading/writing `.gguf` files (city96's Flux layout).

A GGML-quantized weight is stored row by row; each row of `in_features` values is cut into blocks of 32 (legacy
types) or 256 (K types) values, and each block becomes `type_size` bytes: one or two fp16 scales and packed integer
codes. A tensor is kept here as those raw bytes, uint8 [..., row_bytes], and dequantized in torch. The bit layouts
follow ggml's `ggml-quants.c`; the `gguf` package's numpy `gguf.quants` (the same layouts) is the test oracle.

Files: tensors keep their checkpoint (BFL) names; GGUF lists dimensions fastest-first (`ne`), so a torch [out, in]
weight is recorded as (in, out). The `gguf` package (fluxkit[quant]) is needed for files only, not for the codecs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_write
from .loading import CheckpointError

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
# Dequantization: blocks uint8 [n, type_size] -> values [n, block_size] in `dt`
# Per-block scales are combined in float32 (small tensors) and rounded to `dt` once; the per-value work then runs in
# `dt` itself (addcmul rounds d*q + m once). With dt = float32 this is ggml's arithmetic exactly. With bf16 it is ~3x
# faster than float32 math plus a cast (same-dtype vectorised kernels, half the memory traffic) and adds one bf16
# rounding of the block scale and min: <= 5% more error than the float32 values rounded to bf16 (q8_0: 4%).


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


def _dq_q8_0(b: Tensor, dt: torch.dtype) -> Tensor:
    return b[:, 2:].view(torch.int8).to(dt) * _f16(b[:, :2]).to(dt)


def _dq_q4_0(b: Tensor, dt: torch.dtype) -> Tensor:
    q = _nibbles(b[:, 2:]).flatten(1).view(torch.int8) - 8  # [n, 32] in -8..7
    return q.to(dt) * _f16(b[:, :2]).to(dt)


def _dq_q4_1(b: Tensor, dt: torch.dtype) -> Tensor:
    q = _nibbles(b[:, 4:]).flatten(1)  # [n, 32] in 0..15
    return torch.addcmul(_f16(b[:, 2:4]).to(dt), q.to(dt), _f16(b[:, :2]).to(dt))  # m + q*d, rounded once


def _dq_q5_0(b: Tensor, dt: torch.dtype) -> Tensor:
    q = (_nibbles(b[:, 6:]).flatten(1) | (_fifth_bits(b[:, 2:6]) << 4)).view(torch.int8) - 16  # [n, 32]
    return q.to(dt) * _f16(b[:, :2]).to(dt)


def _dq_q5_1(b: Tensor, dt: torch.dtype) -> Tensor:
    q = _nibbles(b[:, 8:]).flatten(1) | (_fifth_bits(b[:, 4:8]) << 4)  # [n, 32] in 0..31
    return torch.addcmul(_f16(b[:, 2:4]).to(dt), q.to(dt), _f16(b[:, :2]).to(dt))


def _dq_q4_k(b: Tensor, dt: torch.dtype, qh: Tensor | None = None) -> Tensor:
    n = b.shape[0]
    scales, mins = _k_scales(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * scales).to(dt)[..., None]  # [n, 8, 1]: one scale per 32-value sub-block
    neg_dm = (_f16(b[:, 2:4]) * -mins).to(dt)[..., None]
    q = _nibbles(b[:, -128:].reshape(n, 4, 32)).reshape(n, 8, 32)  # 32 bytes carry sub-blocks 2i (low), 2i+1
    if qh is not None:  # q5_k: bit j of byte l is the 5th bit of value l of sub-block j
        q = q | (_bits(qh, 8) << 4)
    return torch.addcmul(neg_dm, q.to(dt), d).reshape(n, QK_K)


def _dq_q5_k(b: Tensor, dt: torch.dtype) -> Tensor:
    return _dq_q4_k(b, dt, qh=b[:, 16:48])


def _dq_q6_k(b: Tensor, dt: torch.dtype) -> Tensor:
    n = b.shape[0]
    low = _nibbles(b[:, :128].reshape(n, 2, 64)).reshape(n, 8, 32)  # two 128-value halves, 64 bytes each
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device)[:, None]
    high = (b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3  # [n, 2, 4, 32]
    q = ((low | (high.reshape(n, 8, 32) << 4)).view(torch.int8) - 32).reshape(n, 16, 16)
    d = (_f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8).float()).to(dt)  # [n, 16]: one scale per 16 values
    return (d[..., None] * q.to(dt)).reshape(n, QK_K)


_DEQUANT: dict[str, Callable[[Tensor, torch.dtype], Tensor]] = {
    "q8_0": _dq_q8_0, "q4_0": _dq_q4_0, "q4_1": _dq_q4_1, "q5_0": _dq_q5_0, "q5_1": _dq_q5_1,
    "q4_k": _dq_q4_k, "q5_k": _dq_q5_k, "q6_k": _dq_q6_k,
}


def dequantize(packed: Tensor, qtype: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Raw bytes uint8 [..., row_bytes] -> values [..., n_values] in `dtype` (float32: bit-exact ggml)."""
    qt = check_qtype(qtype)
    if packed.dtype != torch.uint8 or packed.shape[-1] % qt.type_size:
        raise ValueError(f"packed {qtype} data must be uint8 [..., k*{qt.type_size}], got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    if qtype in _FLOAT_DTYPES:
        return packed.view(_FLOAT_DTYPES[qtype]).to(dtype)
    lead, n_blocks = packed.shape[:-1], packed.shape[-1] // qt.type_size
    values = _DEQUANT[qtype](packed.reshape(-1, qt.type_size), dtype)  # [blocks, block_size]
    return values.reshape(*lead, n_blocks * qt.block_size)


# ---------------------------------------------------------------------------------------------------------------------
# Quantization: values float32 [n, block_size] -> blocks uint8 [n, type_size]
# The legacy types repeat gguf-py's numpy quantizers operation for operation (so bytes match them exactly); gguf-py
# 0.19 has no quantizer for the K types, so those are fitted here (see _fit_affine).


def _f16_bytes(x: Tensor) -> Tensor:
    """float32 [n, 1] -> its fp16 bytes [n, 2]."""
    return x.to(torch.float16).view(torch.uint8)


def _round_away(x: Tensor) -> Tensor:
    """Round half away from zero, as ggml's roundf (floor(a + 0.5) differs for a just below 0.5)."""
    a = x.abs()
    whole = a.floor()
    return x.sign() * (whole + (2 * (a - whole)).floor())


def _inverse(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _pack_nibbles(q: Tensor) -> Tensor:
    """Codes 0..15 [..., 2, k] -> bytes [..., k] (inverse of _nibbles)."""
    return (q[..., 0, :] & 0x0F) | (q[..., 1, :] << 4)


def _pack_bits(bits: Tensor) -> Tensor:
    """Bit planes 0/1 [..., n, k] -> bytes [..., k] (inverse of _bits)."""
    shifts = torch.arange(bits.shape[-2], dtype=torch.uint8, device=bits.device)[:, None]
    return (bits << shifts).sum(dim=-2, dtype=torch.uint8)


def _signed_absmax(x: Tensor) -> Tensor:
    """Per row, the value of largest magnitude with its sign (the first one on ties) [..., 1]."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))


def _q_q8_0(x: Tensor) -> Tensor:
    d = x.abs().amax(dim=-1, keepdim=True) / 127
    q = _round_away(x * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat((_f16_bytes(d), q), dim=-1)


def _q_q4_0(x: Tensor) -> Tensor:
    d = _signed_absmax(x) / -8
    q = (x * _inverse(d) + 8.5).trunc().clamp(0, 15).to(torch.uint8)
    return torch.cat((_f16_bytes(d), _pack_nibbles(q.view(-1, 2, 16))), dim=-1)


def _q_q4_1(x: Tensor) -> Tensor:
    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    d = (hi - lo) / 15
    q = ((x - lo) * _inverse(d) + 0.5).trunc().clamp(0, 15).to(torch.uint8)
    return torch.cat((_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q.view(-1, 2, 16))), dim=-1)


def _q5_tail(q: Tensor) -> Tensor:
    """Codes 0..31 [n, 32] -> 4 bytes of 5th bits (little-endian uint32) + 16 bytes of nibbles."""
    qh = _pack_bits((q >> 4).view(-1, 4, 8).transpose(-1, -2))  # [n, 4]
    return torch.cat((qh, _pack_nibbles(q.view(-1, 2, 16))), dim=-1)


def _q_q5_0(x: Tensor) -> Tensor:
    d = _signed_absmax(x) / -16
    q = (x * _inverse(d) + 16.5).trunc().clamp(0, 31).to(torch.uint8)
    return torch.cat((_f16_bytes(d), _q5_tail(q)), dim=-1)


def _q_q5_1(x: Tensor) -> Tensor:
    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    d = (hi - lo) / 31
    q = ((x - lo) * _inverse(d) + 0.5).trunc().clamp(0, 31).to(torch.uint8)
    return torch.cat((_f16_bytes(d), _f16_bytes(lo), _q5_tail(q)), dim=-1)


def _least_squares(x: Tensor, q: Tensor, affine: bool) -> tuple[Tensor, Tensor]:
    """Best (a, b) with x ~ a*q + b per row [..., 1] (b = 0 when not affine, or when the fit wants b > 0)."""
    sqq, sqx = (q * q).sum(-1, keepdim=True), (q * x).sum(-1, keepdim=True)
    a0 = sqx / sqq.clamp(min=1e-30)
    if not affine:
        return a0, torch.zeros_like(a0)
    n, sq, sx = x.shape[-1], q.sum(-1, keepdim=True), x.sum(-1, keepdim=True)
    det = n * sqq - sq * sq
    ok = det > 0
    a = torch.where(ok, (n * sqx - sq * sx) / det.clamp(min=1e-30), a0)
    b = torch.where(ok, (sqq * sx - sq * sqx) / det.clamp(min=1e-30), 0)
    keep = b <= 0  # K types only store b = -dmin*m <= 0 (ggml clamps the min at 0 likewise)
    return torch.where(keep, a, a0), torch.where(keep, b, 0)


def _fit_affine(x: Tensor, nmax: int, affine: bool, steps: int = 5) -> tuple[Tensor, Tensor]:
    """Per sub-block [..., k] scale a and offset b (x ~ a*q + b, q in [0, nmax] or [-nmax, nmax-1]).

    A small grid search in the spirit of ggml's make_qkx2_quants / make_qx_quants (unweighted, 5 trial grids): each
    trial rounds against a slightly stretched grid, refits (a, b) by least squares, and the lowest error wins.
    """
    lo = x.amin(-1, keepdim=True).clamp(max=0) if affine else torch.zeros_like(x[..., :1])
    span = (x.amax(-1, keepdim=True) - lo) if affine else _signed_absmax(x)
    best_a, best_b, best_err = None, None, None
    for stretch in torch.linspace(-0.5, 0.5, steps).tolist():
        if affine:
            q = ((x - lo) * _inverse(span) * (nmax + stretch)).round().clamp(0, nmax)
        else:  # symmetric: the largest-magnitude value maps to -nmax, as in ggml
            q = (x * _inverse(span) * -(nmax + stretch)).round().clamp(-nmax, nmax - 1)
        a, b = _least_squares(x, q, affine)
        err = (a * q + b - x).square().sum(-1, keepdim=True)
        if best_err is None:
            best_a, best_b, best_err = a, b, err
        else:
            better = err < best_err
            best_a, best_b = torch.where(better, a, best_a), torch.where(better, b, best_b)
            best_err = torch.minimum(err, best_err)
    return best_a.squeeze(-1), best_b.squeeze(-1)


def _six_bit(values: Tensor) -> tuple[Tensor, Tensor]:
    """Non-negative per-sub-block values [n, 8] -> (fp16-rounded super-block scale [n, 1], codes 0..63 [n, 8])."""
    d = (values.amax(-1, keepdim=True) / 63).to(torch.float16).float()
    return d, (values * _inverse(d)).round().clamp(0, 63)


def _pack_k_scales(sc: Tensor, mn: Tensor) -> Tensor:
    """Codes 0..63 [n, 8] each -> 12 bytes (inverse of _k_scales)."""
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    hi = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    mixed = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return torch.cat((lo, hi, mixed), dim=-1)


def _q_k_affine(x: Tensor, five_bit: bool) -> Tensor:
    """q4_k / q5_k: x = d*sc_j*q - dmin*m_j over 8 sub-blocks of 32 values."""
    n, nmax = x.shape[0], 31 if five_bit else 15
    x = x.view(n, 8, 32)
    a, b = _fit_affine(x, nmax, affine=True)  # [n, 8] each
    d, sc = _six_bit(a.clamp(min=0))
    dmin, m = _six_bit(-b)
    step, offset = (d * sc)[..., None], (dmin * m)[..., None]  # [n, 8, 1]: what dequantization will use
    q = ((x + offset) * _inverse(step)).round().clamp(0, nmax).to(torch.uint8)  # [n, 8, 32]
    parts = [_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, m)]
    if five_bit:
        parts.append(_pack_bits(q >> 4))  # [n, 32]
    parts.append(_pack_nibbles(q.view(n, 4, 2, 32)).view(n, 128))
    return torch.cat(parts, dim=-1)


def _q_q6_k(x: Tensor) -> Tensor:
    """q6_k: x = d*sc_j*(q - 32) over 16 sub-blocks of 16 values, sc_j int8."""
    n = x.shape[0]
    x = x.view(n, 16, 16)
    a, _ = _fit_affine(x, 32, affine=False)  # [n, 16], signed
    iscale = -128 * _inverse(_signed_absmax(a))  # [n, 1]
    sc = (a * iscale).round().clamp(-128, 127)
    d = _inverse(iscale).to(torch.float16).float()
    q = (x * _inverse(d * sc)[..., None]).round().clamp(-32, 31).to(torch.int16) + 32  # [n, 16, 16]
    q = q.to(torch.uint8).view(n, 2, 4, 32)  # [half, quarter, 32] as _dq_q6_k lays the 256 values out
    low = _pack_nibbles((q & 0x0F).view(n, 2, 2, 64))  # quarters (0, 2) -> low nibbles, (1, 3) -> high: [n, 2, 64]
    high = ((q >> 4) << torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=x.device)[:, None]).sum(
        dim=2, dtype=torch.uint8)  # [n, 2, 32]
    return torch.cat((low.view(n, 128), high.view(n, 64), sc.to(torch.int8).view(torch.uint8),
                      _f16_bytes(d)), dim=-1)


_QUANT: dict[str, Callable[[Tensor], Tensor]] = {
    "q8_0": _q_q8_0, "q4_0": _q_q4_0, "q4_1": _q_q4_1, "q5_0": _q_q5_0, "q5_1": _q_q5_1,
    "q4_k": lambda x: _q_k_affine(x, five_bit=False), "q5_k": lambda x: _q_k_affine(x, five_bit=True),
    "q6_k": _q_q6_k,
}


def quantize(values: Tensor, qtype: str) -> Tensor:
    """Values [..., n_values] (any float dtype) -> raw bytes uint8 [..., row_bytes] (quantized in float32)."""
    qt = check_qtype(qtype)
    n_bytes = row_bytes(values.shape[-1], qtype)
    if qtype in _FLOAT_DTYPES:
        return values.to(_FLOAT_DTYPES[qtype]).contiguous().view(torch.uint8)
    blocks = values.detach().float().reshape(-1, qt.block_size)
    return _QUANT[qtype](blocks).reshape(*values.shape[:-1], n_bytes)


# ---------------------------------------------------------------------------------------------------------------------
# Files


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its type, its torch-order shape and its raw bytes uint8 [..., row_bytes]."""

    qtype: str
    shape: tuple[int, ...]
    data: Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.data, self.qtype, dtype).reshape(self.shape)


def _gguf_package():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading or writing .gguf files needs the gguf package (pip install 'fluxkit[quant]')") \
            from None
    return gguf


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, GGUFTensor], dict[str, object]]:
    """(tensors by name, metadata key -> value) of a .gguf file.

    The tensors are views of a copy-on-write memory map: nothing is read from disk until used, and the model that
    holds them shares the page cache instead of doubling peak memory.
    """
    gguf = _gguf_package()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        reader = gguf.GGUFReader(path, mode="c")
    except ValueError as err:  # bad magic, unknown version, duplicated tensor names
        raise CheckpointError(f"{path}: not a readable GGUF file: {err}") from None
    metadata = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors, unsupported = {}, []
    for t in reader.tensors:
        qtype = _BY_ID.get(int(t.tensor_type))
        if qtype is None:
            unsupported.append(f"{t.name} ({t.tensor_type.name})")
            continue
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first (ne order)
        data = torch.from_numpy(t.data.view(np.uint8)).reshape(*shape[:-1], -1)
        tensors[t.name] = GGUFTensor(qtype, shape, data)
    if unsupported:
        raise CheckpointError(f"{path}: {len(unsupported)} tensors use GGML types fluxkit does not read "
                              f"({', '.join(unsupported[:5])}); supported: {', '.join(QTYPES)}")
    return tensors, metadata


def write_gguf(path: str | os.PathLike, specs: Sequence[tuple[str, str, tuple[int, ...]]],
               pack: Callable[[str], Tensor], arch: str = "flux", strings: Mapping[str, str] | None = None) -> Path:
    """Write a .gguf file from (name, qtype, torch-order shape) specs; `pack(name)` returns that tensor's raw bytes.

    The header is written from the specs first and `pack` is called once per tensor, in order, so a converter
    holds one quantized tensor at a time, not the whole model. The file appears atomically.
    """
    gguf = _gguf_package()
    sizes = {name: row_bytes(shape[-1], qtype) * math.prod(shape[:-1]) for name, qtype, shape in specs}

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch=arch)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in (strings or {}).items():
            writer.add_string(key, value)
        for name, qtype, shape in specs:  # float32 only tells the writer that `shape` counts values, not bytes
            writer.add_tensor_info(name, shape, np.dtype(np.float32), sizes[name],
                                   raw_dtype=gguf.GGMLQuantizationType(QTYPES[qtype].ggml_id))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, qtype, _ in specs:
            data = pack(name)
            if data.dtype != torch.uint8 or data.numel() != sizes[name]:
                raise ValueError(f"pack({name!r}) returned {data.dtype} {tuple(data.shape)}; expected "
                                 f"{sizes[name]} bytes of {qtype}")
            writer.write_tensor_data(data.detach().cpu().contiguous().numpy())
        writer.close()

    atomic_write(path, write)
    return Path(path)
