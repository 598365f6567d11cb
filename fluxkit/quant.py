"""Weight-only quantization as module swaps: `nn.Linear` -> a linear that stores its weight quantized and
dequantizes it on the fly in `forward`, then runs an ordinary matmul in the input's dtype.

Kinds: `int8` (per-output-channel symmetric codes, fp32 scales), `fp8` (float8_e4m3fn codes, one fp32 scale per
tensor: the layout of ComfyUI's "scaled fp8" Flux files), `fp8_channel` (one scale per output channel) and the GGML
block types of fluxkit.gguf (`q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1`, `q4_k`, `q5_k`, `q6_k`).

What stays in full precision by default (FLUX_FULL_PRECISION): the input embedders and the final layer, the same
list city96's Flux GGUF converter keeps in F32. They hold ~0.5% of FLUX.1's weights, so quantizing them saves
almost nothing, and they are the sensitive ends of the network: the conditioning vector they build modulates
every block, and the final layer writes the velocity directly. `img_in` must stay: Flux reads its compute dtype
from `img_in.weight`. Norms and biases are never quantized.

A quantized linear is a drop-in for code that calls it: `in_features`, `out_features`, `bias`, `forward(x)` and
`dequantize(dtype)` (the full weight). Its `weight` buffer holds the *codes* (int8, float8 or raw GGML bytes), so
code that reads `.weight` as a float matrix fails loudly; a LoRA wrapper needs only the attributes above.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import gguf as ggml
from .atomic import atomic_save_safetensors
from .convert import (
    check_state_dict,
    detect_layout,
    detect_network,
    expected_bfl_shapes,
    flux_params_from_state_dict,
    strip_prefix,
)
from .gguf import BLOCK_QTYPES
from .loading import CheckpointError, load_flux_transformer, load_safetensors
from .model import Flux
from .params import FluxParams

KINDS = ("int8", "fp8", "fp8_channel", *BLOCK_QTYPES)
FLUX_FULL_PRECISION = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_CODE_DTYPES = (torch.int8, *_FP8_DTYPES)
_FLOAT_QTYPE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
QUANT_METADATA_KEY = "fluxkit.quantization"  # safetensors metadata: the kinds in the file, comma-separated
COMFY_FP8_MARKER = "scaled_fp8"  # ComfyUI's marker tensor: "the float8 weights in this file carry scale_weight"
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class QuantLinear(nn.Module):
    """Base of the quantized linears: holds in/out features, a float bias, and the default dequantization dtype."""

    kind: str

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype  # what dequantize() returns by default; forward computes in the input's dtype
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The full weight [out_features, in_features] in `dtype` (default: self.dtype)."""
        raise NotImplementedError

    def _bias(self, x: Tensor) -> Tensor | None:
        return None if self.bias is None else self.bias.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize(x.dtype), self._bias(x))  # [..., out]

    def _apply(self, fn, recurse: bool = True):
        # Module.to(dtype) / .half() cast every floating tensor: an fp8 weight upcast to bf16 is no longer quantized
        # and an fp32 scale cast to bf16 loses precision. The stored buffers therefore pass through `fn` viewed as
        # integers of the same width: device moves, pinning and to_empty apply to them, dtype casts do not. The bias
        # and the default dequantization dtype do follow casts.
        stored = {name: self._buffers.pop(name) for name in list(self._buffers)}
        super()._apply(fn, recurse)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        for name, t in stored.items():
            self._buffers[name] = fn(t.view(_SAME_WIDTH_INT[t.element_size()])).view(t.dtype)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"kind={self.kind}"


class ScaledLinear(QuantLinear):
    """weight = codes * scale: int8 codes with a scale per output channel, or float8 codes with one scale per tensor
    ([]) or per channel ([out]). Buffers `weight` and `scale_weight` are named as in ComfyUI's scaled-fp8 files."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, storage: torch.dtype = torch.int8,
                 per_channel: bool = True, dtype: torch.dtype = torch.bfloat16):
        if storage != torch.int8 and storage not in _FP8_DTYPES:
            raise ValueError(f"storage must be torch.int8 or a float8 dtype, got {storage}")
        super().__init__(in_features, out_features, bias, dtype)
        self.kind = "int8" if storage == torch.int8 else "fp8_channel" if per_channel else "fp8"
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=storage))
        self.register_buffer("scale_weight", torch.empty((out_features,) if per_channel else (), dtype=torch.float32))

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str) -> ScaledLinear:
        w = linear.weight.detach().float()  # [out, in]
        per_channel = kind != "fp8"
        amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()  # [out] or []
        top = 127 if kind == "int8" else FP8_MAX
        scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))  # an all-zero row keeps scale 1
        codes = (w / (scale[:, None] if per_channel else scale)).clamp(-top, top)
        storage = torch.int8 if kind == "int8" else torch.float8_e4m3fn
        with torch.device("meta"):  # every tensor is replaced below
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, storage, per_channel,
                      linear.weight.dtype)
        new.weight = codes.round().to(storage) if kind == "int8" else codes.to(storage)  # fp8 rounds to nearest
        new.scale_weight = scale
        return _with_bias(new, linear)

    def _codes_and_scale(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(codes [out, in], scale [] or [out]) in `dtype`, with weight = codes * scale."""
        if self.weight.dtype in _FP8_DTYPES:
            codes, factor = _float8_as_float16(self.weight)
            return codes.to(dtype), (self.scale_weight * factor).to(dtype)
        return self.weight.to(dtype), self.scale_weight.to(dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        codes, scale = self._codes_and_scale(torch.float32)
        return (codes * (scale[:, None] if scale.ndim else scale)).to(dtype or self.dtype)  # [out, in]

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float16:  # unscaled int8 codes (up to 127) could overflow an fp16 matmul
            return super().forward(x)
        # x @ (codes * s)^T == (x @ codes^T) * s for a per-output-channel (or scalar) s: the scale moves to the
        # smaller output and the weight needs only a cast (~1.0-1.1x a bf16 linear instead of ~1.3x).
        codes, scale = self._codes_and_scale(x.dtype)
        y = F.linear(x, codes)  # [..., out]
        return y * scale if self.bias is None else torch.addcmul(self.bias.to(x.dtype), y, scale)


def _float8_as_float16(codes: Tensor) -> tuple[Tensor, float]:
    """float8 codes -> (float16 values, factor) with codes == values * factor, by moving bits: PyTorch's float8 cast
    is 1.3-2.5x slower on the CPU, this is exact. e5m2 is the top byte of an fp16. e4m3fn's s|eeee|mmm placed in
    fp16's bit positions reads as value/256 for normal and subnormal codes alike (fp16's exponent bias is 8 larger,
    and both subnormal ranges line up); its NaN codes (0x7f, 0xff) would read as +-480/256, so loading rejects them.

    For e4m3fn, the code widened as a signed int8 and shifted left by 7 has its sign in bit 15 and its seven other bits
    in 13..7; sign extension also sets bit 14, which the mask 0xBFFF clears: three in-place passes in all.
    """
    if codes.dtype == torch.float8_e5m2:
        return (codes.view(torch.uint8).to(torch.int16) << 8).view(torch.float16), 1.0
    bits = codes.view(torch.int8).to(torch.int16)
    bits.bitwise_left_shift_(7).bitwise_and_(-0x4001)  # -0x4001 is 0xBFFF as an int16
    return bits.view(torch.float16), 256.0


class GGUFLinear(QuantLinear):
    """weight = GGML blocks, raw bytes uint8 [out, row_bytes], dequantized in torch by fluxkit.gguf."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, qtype: str = "q8_0",
                 dtype: torch.dtype = torch.bfloat16):
        if qtype not in BLOCK_QTYPES:
            raise ValueError(f"qtype must be one of {', '.join(BLOCK_QTYPES)}, got {qtype!r}")
        super().__init__(in_features, out_features, bias, dtype)
        self.kind = self.qtype = qtype
        self.register_buffer("weight", torch.empty(out_features, ggml.row_bytes(in_features, qtype),
                                                   dtype=torch.uint8))

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtype: str) -> GGUFLinear:
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, qtype, linear.weight.dtype)
        new.weight = ggml.quantize(linear.weight.detach(), qtype)  # [out, row_bytes]
        return _with_bias(new, linear)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return ggml.dequantize(self.weight, self.qtype, dtype or self.dtype)  # [out, in]


def _with_bias(new: QuantLinear, linear: nn.Linear) -> QuantLinear:
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    return new


def quantize_linear(linear: nn.Linear, kind: str) -> QuantLinear:
    """One nn.Linear -> its quantized stand-in (kind in KINDS)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if linear.weight.is_meta:
        raise ValueError("cannot quantize a linear whose weight is on the meta device (load the weights first)")
    if kind in BLOCK_QTYPES:
        return GGUFLinear.from_linear(linear, kind)
    return ScaledLinear.from_linear(linear, kind)


# ---------------------------------------------------------------------------------------------------------------------
# Swapping the linears of a model


def _matches(name: str, entry: str) -> bool:
    """`entry` names the module or an ancestor in whole dotted segments: 'final_layer' covers 'final_layer.linear',
    'wo' covers 'encoder.block.0.layer.1.DenseReluDense.wo', 'double_blocks.1' does not cover 'double_blocks.10'."""
    return f".{entry}." in f".{name}."


def _targets(module: nn.Module, skip: Sequence[str], block_size: int, what: str) -> dict[str, nn.Linear]:
    """The linears outside `skip` that a quantization with `block_size`-value blocks will replace (checked)."""
    if isinstance(skip, str):
        raise ValueError(f"skip must be a sequence of module names, not the string {skip!r}")
    names = [name for name, _ in module.named_modules()]
    unknown = [entry for entry in skip if not any(_matches(name, entry) for name in names)]
    if unknown:
        raise ValueError(f"skip entries {unknown} match no module of this {type(module).__name__}")
    done = [name for name, m in module.named_modules() if isinstance(m, QuantLinear)]
    if done:
        raise ValueError(f"this {type(module).__name__} is already quantized ({len(done)} layers, e.g. {done[0]}: "
                         f"{module.get_submodule(done[0]).kind}); start from a full-precision model")
    # Exactly nn.Linear: subclasses (e.g. MultiheadAttention's out_proj) are read through `.weight` by their owners.
    targets = {name: m for name, m in module.named_modules()
               if name and type(m) is nn.Linear and not any(_matches(name, entry) for entry in skip)}
    bad = [f"{name} ({m.in_features})" for name, m in targets.items() if m.in_features % block_size]
    if bad:
        raise ValueError(f"{what} needs in_features divisible by {block_size}; {len(bad)} linears are not: "
                         f"{', '.join(bad[:5])}. Add them to skip, or use a 32-value type (q8_0, q4_0, q5_0...)")
    return targets


def quantize_module(module: nn.Module, kind: str, *, skip: Sequence[str] | None = None) -> nn.Module:
    """Swap every nn.Linear of any network (e.g. a transformers T5EncoderModel) outside `skip` for a quantized
    linear of `kind`, in place. skip=None keeps the model's own `_keep_in_fp32_modules` in full precision: that is
    transformers' list of layers that need it, e.g. T5's `wo`, whose input T5 also casts to `wo.weight.dtype`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if skip is None:
        skip = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    block_size = ggml.QTYPES[kind].block_size if kind in BLOCK_QTYPES else 1
    targets = _targets(module, skip, block_size, kind)
    for name in list(targets):
        linear = targets.pop(name)  # drop every reference so the full-precision weight is freed layer by layer
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, quantize_linear(linear, kind))
        del linear
    return module


def quantize_model(model: Flux, kind: str, *, skip: Sequence[str] = FLUX_FULL_PRECISION) -> Flux:
    """Quantize a Flux transformer in place: every linear of the double and single blocks by default (module docs)."""
    if not isinstance(model, Flux):
        raise ValueError(f"quantize_model takes a fluxkit Flux, got {type(model).__name__}; see quantize_module")
    if not isinstance(skip, str) and not any(_matches("img_in", entry) for entry in skip):
        raise ValueError(f"skip must include 'img_in' (Flux reads its compute dtype from img_in.weight); got {skip}")
    return quantize_module(model, kind, skip=skip)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Swap every quantized linear back for an nn.Linear holding its dequantized weight (in `dtype`, default each
    layer's own), in place. For checkpoints quantized only to be stored small: the model then runs at the speed of
    a full-precision one and costs its memory."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"this {type(model).__name__} has no quantized layers to dequantize")
    for name, m in layers.items():
        weight = m.dequantize(dtype or m.dtype)  # [out, in]
        with torch.device("meta"):
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if m.bias is not None:
            linear.bias = nn.Parameter(m.bias.detach().to(weight.dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Saving


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a quantized model's tensors as stored, without re-quantizing.

    GGML kinds -> `.gguf` (city96's Flux layout: BFL names, general.architecture "flux", other tensors in their own
    float type). int8/fp8 -> `.safetensors` with BFL keys: `X.weight` codes + `X.scale_weight` scales, metadata
    "fluxkit.quantization" naming the kinds; a per-tensor fp8 file also carries ComfyUI's `scaled_fp8` marker, so
    ComfyUI reads it as a scaled-fp8 checkpoint.
    """
    kinds = sorted({m.kind for m in quantized_layers(model).values()})
    if not kinds:
        raise ValueError("the model has no quantized layers; save it with fluxkit.loading.save_bfl")
    path = Path(path)
    if any(kind in BLOCK_QTYPES for kind in kinds):
        if not all(kind in BLOCK_QTYPES for kind in kinds):
            raise ValueError(f"GGML and int8/fp8 layers cannot share one file; the model has {kinds}")
        if path.suffix != ".gguf":
            raise ValueError(f"a model quantized to {', '.join(kinds)} is saved as a .gguf file; got path {path}")
        return _save_gguf(model, path, {})
    if path.suffix != ".safetensors":
        raise ValueError(f"a model quantized to {', '.join(kinds)} is saved as a .safetensors file; got path {path}")
    sd = {key: t.detach().contiguous() for key, t in model.state_dict().items()}
    if kinds == ["fp8"]:
        sd[COMFY_FP8_MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn)
    metadata = {"format": "pt", QUANT_METADATA_KEY: ",".join(kinds)}
    atomic_save_safetensors(path, sd, metadata)
    return path


def _save_gguf(model: nn.Module, path: Path, convert: dict[str, str]) -> Path:
    """Every state-dict tensor into one .gguf: GGUFLinear weights as stored, keys in `convert` quantized to the type
    given there, everything else in its own float type (lossless)."""
    sd = model.state_dict()
    packed = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, GGUFLinear)}
    specs = []
    for key, t in sd.items():
        if key in packed:
            specs.append((key, packed[key].qtype, (packed[key].out_features, packed[key].in_features)))
            continue
        qtype = convert.get(key) or _FLOAT_QTYPE.get(t.dtype)
        if qtype is None:
            raise ValueError(f"{key} is {t.dtype}: GGUF holds float32/float16/bfloat16 tensors or GGML blocks")
        specs.append((key, qtype, tuple(t.shape)))
    qtypes = {key: qtype for key, qtype, _ in specs}
    return ggml.write_gguf(path, specs, lambda key: sd[key] if key in packed else ggml.quantize(sd[key], qtypes[key]))


def convert_to_gguf(src: str | os.PathLike | Flux, dst: str | os.PathLike, qtype: str, *,
                    skip: Sequence[str] = FLUX_FULL_PRECISION, params: FluxParams | None = None) -> Path:
    """A full-precision transformer (a Flux, or any checkpoint load_flux_transformer reads) -> a city96-style .gguf:
    the linears quantize_model would replace in `qtype` (any of fluxkit.gguf.QTYPES, f16/bf16/f32 included), every
    other tensor in its own float type. Tensors are quantized and written one at a time."""
    spec = ggml.check_qtype(qtype, "qtype")
    if Path(dst).suffix != ".gguf":
        raise ValueError(f"dst must be a .gguf path, got {dst}")
    model = src if isinstance(src, nn.Module) else load_flux_transformer(src, params=params)
    if not isinstance(model, Flux):
        raise ValueError(f"src must be a fluxkit Flux or a transformer checkpoint, got {type(model).__name__}")
    targets = _targets(model, skip, spec.block_size, qtype)
    return _save_gguf(model, Path(dst), {f"{name}.weight": qtype for name in targets})


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_quantized_transformer(path: str | os.PathLike, params: FluxParams | None = None,
                               dtype: torch.dtype = torch.bfloat16, axes_dim: tuple[int, ...] | None = None) -> Flux:
    """A single-file transformer -> Flux in eval mode, with quantized layers kept exactly as stored.

    - `.gguf` (city96's layout, general.architecture "flux"): GGML-block weights -> GGUFLinear; F32/F16/BF16
      tensors -> ordinary tensors in `dtype`.
    - `.safetensors` with int8 or float8 weights (save_quantized's files; ComfyUI "scaled fp8": float8 `X.weight`
      + fp32 `X.scale_weight`, optional `scaled_fp8` marker; plain fp8 files without scales) -> ScaledLinear.
      ComfyUI's `X.scale_input` (an activation scale for fp8 x fp8 matmuls) has no use in weight-only compute and
      is dropped.
    - anything else (BFL or diffusers, file or folder) goes to fluxkit.loading.load_flux_transformer.
    `img_in` is always loaded in full precision (dequantized if stored quantized): Flux reads its compute dtype
    from it. Loading is strict: CheckpointError lists missing, unexpected and misshapen tensors.
    """
    path = Path(path)
    if path.suffix == ".gguf":
        plain, layers = _from_gguf(path, dtype)
    else:
        sd = load_safetensors(path) if path.is_file() else None  # memory-mapped
        if sd is None or not any(t.dtype in _CODE_DTYPES for t in sd.values()):
            return load_flux_transformer(path, params=params, dtype=dtype, axes_dim=axes_dim)
        plain, layers = _from_scaled_safetensors(_stripped(sd, path), dtype, path)
    return _assemble(plain, layers, params, dtype, path, axes_dim)


def _stripped(sd: dict, path: Path) -> dict:
    try:
        return strip_prefix(sd)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _from_gguf(path: Path, dtype: torch.dtype) -> tuple[dict[str, Tensor], dict[str, QuantLinear]]:
    tensors, metadata = ggml.read_gguf(path)
    arch = metadata.get("general.architecture")
    if arch != "flux":
        raise CheckpointError(f"{path}: general.architecture is {arch!r}, expected 'flux' (a Flux transformer GGUF)")
    plain, layers, tensors = {}, {}, _stripped(tensors, path)
    for key, t in tensors.items():
        if t.qtype in BLOCK_QTYPES and key.endswith(".weight") and len(t.shape) == 2:
            layer = key.removesuffix(".weight")
            with torch.device("meta"):
                layers[layer] = GGUFLinear(t.shape[1], t.shape[0], f"{layer}.bias" in tensors, t.qtype, dtype)
            layers[layer].weight = t.data  # [out, row_bytes], a view of the memory map
        else:
            plain[key] = t.dequantize(dtype)
    return plain, layers


def _from_scaled_safetensors(sd: dict[str, Tensor], dtype: torch.dtype,
                             path: Path) -> tuple[dict[str, Tensor], dict[str, QuantLinear]]:
    sd = dict(sd)
    sd.pop(COMFY_FP8_MARKER, None)
    layers = {}
    for key in [k for k, t in sd.items() if t.dtype in _CODE_DTYPES and k.endswith(".weight") and t.ndim == 2]:
        layer = key.removesuffix(".weight")
        codes, scale = sd.pop(key), sd.pop(f"{layer}.scale_weight", None)
        if codes.dtype == torch.float8_e4m3fn and ((codes.view(torch.uint8) & 0x7F) == 0x7F).any():
            raise CheckpointError(f"{path}: {key} holds NaN float8 codes")
        if codes.dtype in _FP8_DTYPES:
            sd.pop(f"{layer}.scale_input", None)
            scale = torch.ones(()) if scale is None else scale  # plain fp8 files store unscaled weights
        elif scale is None:
            raise CheckpointError(f"{path}: int8 weight {key} has no {layer}.scale_weight")
        if scale.numel() not in (1, codes.shape[0]):
            raise CheckpointError(f"{path}: {layer}.scale_weight has shape {tuple(scale.shape)}; expected one scale "
                                  f"or one per output channel ({codes.shape[0]})")
        per_channel = scale.numel() > 1 or codes.dtype == torch.int8
        with torch.device("meta"):
            m = ScaledLinear(codes.shape[1], codes.shape[0], f"{layer}.bias" in sd, codes.dtype, per_channel, dtype)
        m.weight = codes
        m.scale_weight = scale.float().reshape(-1).expand(codes.shape[0]).clone() if per_channel else \
            scale.float().reshape(())
        layers[layer] = m
    odd = sorted(key for key, t in sd.items() if not t.is_floating_point())
    if odd:
        raise CheckpointError(f"{path}: {len(odd)} tensors are neither float nor the codes of a linear: {odd[:10]}")
    return sd, layers


def _assemble(plain: dict[str, Tensor], layers: dict[str, QuantLinear], params: FluxParams | None,
              dtype: torch.dtype, path: Path, axes_dim: tuple[int, ...] | None = None) -> Flux:
    """Check the logical tensors against the BFL layout, then build Flux on the meta device and assign them."""
    logical = {**plain, **{f"{name}.weight": torch.empty(m.out_features, m.in_features, device="meta")
                           for name, m in layers.items()}}
    try:
        if (detect_network(logical), detect_layout(logical)) != ("transformer", "bfl"):
            raise ValueError("a quantized checkpoint must hold a BFL-named transformer")
        params = params or flux_params_from_state_dict(logical, axes_dim)
        check_state_dict(logical, expected_bfl_shapes(params), "quantized transformer checkpoint")
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    # The full-precision tensors are copied out of the memory map: they are ~1% of a quantized model, and a matmul
    # over an unaligned mapped weight can take another kernel path (last-bit differences from a saved model).
    state = {key: t.to(dtype, copy=True) for key, t in plain.items()}
    if "img_in" in layers:  # Flux reads its compute dtype from img_in.weight
        state["img_in.weight"] = layers.pop("img_in").dequantize(dtype)
    with torch.device("meta"):
        model = Flux(params)
    for name, m in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m)
        state.update({f"{name}.{key}": t for key, t in m.named_buffers()})
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"Flux still holds meta tensors after loading {path}: {left[:10]}")
    return model.eval()
