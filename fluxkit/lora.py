"""Runtime LoRA: adapters applied by an explicit module swap, mixed with weights, scaled per call, fused and unfused.

Each targeted linear-like module (an `nn.Linear`, or any module with `in_features`/`out_features` and `forward(x)`,
such as a quantized linear) is replaced by `LoraLinear(base)`, which computes

    base(x) + scale * sum over active adapters a of weight_a * (B_a diag(s_a) A_a x + b_a)

and never modifies `base`. One adapter on one module is a single (A [R, in], B [out, R], s [R], b [out]) even when the
file gave several row slices with different A matrices (diffusers' to_q/to_k/to_v of BFL's fused qkv): the A's are
stacked and each B is placed in its own column block at its row offset, so a slice only sees its own A. That keeps
the forward at two matmuls per adapter and makes the fused delta simply B diag(s) A. Slices that share one A and scale
(a fused LoRA that diffusers split) keep a single A. `s` holds alpha/r per rank component, since slices may differ.

Fusing adds the delta to the base weights after keeping a copy; unfusing copies the originals back (bit-exact).
Quantized bases are not fused: requantizing would change the stored weights; runtime adapters work on them.

Below the module swap: reading LoRA files (safetensors only) and saving one adapter in diffusers' format. The
pipeline API (`LoraLoaderMixin`: load_lora_weights, set_adapters, fuse_lora, ...) lives in `fluxkit.lora_pipeline`;
its names stay importable from here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .convert import _listing
from .lora_formats import LoraPiece, ModuleLora, to_diffusers

log = logging.getLogger(__name__)
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FUSABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Names that moved to fluxkit.lora_pipeline, still importable from fluxkit.lora (resolved on first use, because
# lora_pipeline itself imports this module).
_PIPELINE_NAMES = ("LoraLoadReport", "LoraLoaderMixin")


def is_linear_like(module: nn.Module) -> bool:
    """An nn.Linear, or any module with integer in_features/out_features (e.g. a quantized linear)."""
    return isinstance(module, nn.Linear) or (
        isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
    )


class LoraAdapter(nn.Module):
    """One adapter on one module: x -> B (s * (A x)) + b."""

    def __init__(self, down: Tensor, up: Tensor, rank_scale: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.down = nn.Parameter(down, requires_grad=False)  # A [R, in]
        self.up = nn.Parameter(up, requires_grad=False)  # B [out, R]
        self.register_buffer("rank_scale", rank_scale)  # alpha / r per rank component [R]
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None  # [out]

    @classmethod
    def from_pieces(cls, pieces: list[LoraPiece], out_features: int, dtype: torch.dtype, device) -> LoraAdapter:
        """Stack the row-slice pieces of one module into one adapter (see the module docstring)."""
        first = pieces[0]
        spans = sorted((p.offset, p.offset + p.up.shape[0]) for p in pieces)
        disjoint = all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
        shared = disjoint and all(p.scale == first.scale and torch.equal(p.down, first.down) for p in pieces)
        downs = [first.down] if shared else [p.down for p in pieces]
        rank = sum(d.shape[0] for d in downs)
        up = torch.zeros(out_features, rank)  # [out, R]
        col = 0
        for p in pieces:
            rows, r = p.up.shape
            up[p.offset : p.offset + rows, col : col + r] = p.up.float()
            col += 0 if shared else r
        scales = [torch.full((d.shape[0],), p.scale) for d, p in zip(downs, [first] if shared else pieces)]
        bias = None
        if any(p.bias is not None for p in pieces):
            bias = torch.zeros(out_features)
            for p in pieces:
                if p.bias is not None:
                    bias[p.offset : p.offset + p.bias.shape[0]] += p.bias.float()
        down = torch.cat([d.float() for d in downs])  # [R, in]
        kw = dict(device=device, dtype=dtype)
        return cls(down.to(**kw), up.to(**kw), torch.cat(scales).to(**kw), bias.to(**kw) if bias is not None else None)

    def forward(self, x: Tensor) -> Tensor:
        h = F.linear(x.to(self.down.dtype), self.down) * self.rank_scale  # [..., R]
        return F.linear(h, self.up, self.bias).to(x.dtype)  # [..., out]

    def delta(self) -> tuple[Tensor, Tensor | None]:
        """(weight delta [out, in], bias delta [out] or None) in float32."""
        weight = self.up.float() @ (self.rank_scale.float()[:, None] * self.down.float())
        return weight, self.bias.float() if self.bias is not None else None


class LoraLinear(nn.Module):
    """A linear-like module plus named adapters; the wrapped `base` is never modified except by `fuse`."""

    def __init__(self, base: nn.Module):
        super().__init__()
        if not is_linear_like(base):
            raise ValueError(f"LoRA needs a linear-like module (in_features/out_features), got {type(base).__name__}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = nn.ModuleDict()
        self.active: dict[str, float] = {}  # active adapter -> its weight (set_adapters)
        self.scale = 1.0  # per-call scale (joint_attention_kwargs={"scale": s})
        self.fused: dict[str, float] = {}  # adapter -> weight it was fused with
        self._original: tuple[Tensor, Tensor | None] | None = None

    def __getattr__(self, name: str):
        # `weight`, `bias` and any other attribute of the wrapped module, so code reading `model.img_in.weight` works.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(super().__getattr__("base"), name)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)  # [..., out]
        for name, weight in self.active.items():
            if name in self.adapters and name not in self.fused:
                out = out + (weight * self.scale) * self.adapters[name](x)
        return out

    def fuse_problem(self) -> str | None:
        base = self.base
        if not isinstance(base, nn.Linear) or base.weight.dtype not in FUSABLE_DTYPES:
            return (f"quantized base ({type(base).__name__}): fusing would need requantizing, which changes the "
                    "stored weights; use the runtime adapters, which work on quantized bases")
        if base.bias is None and any(self.adapters[n].bias is not None for n in self.adapters):
            return "a LoRA bias on a module without a bias"
        return None

    def fuse(self, weights: dict[str, float]) -> None:
        """Add weight * delta of the named adapters into the base weights, keeping a copy of the originals."""
        weights = {n: w for n, w in weights.items() if n in self.adapters and n not in self.fused}
        if not weights:
            return
        base = self.base
        if self._original is None:
            bias = base.bias.detach().clone() if base.bias is not None else None
            self._original = (base.weight.detach().clone(), bias)
        with torch.no_grad():
            for name, w in weights.items():
                d_weight, d_bias = self.adapters[name].delta()
                base.weight.copy_((base.weight.float() + w * d_weight).to(base.weight.dtype))
                if d_bias is not None:
                    base.bias.copy_((base.bias.float() + w * d_bias).to(base.bias.dtype))
        self.fused.update(weights)

    def unfuse(self) -> None:
        """Copy the original weights back (exact; nothing is subtracted)."""
        if self._original is None:
            return
        with torch.no_grad():
            self.base.weight.copy_(self._original[0])
            if self._original[1] is not None:
                self.base.bias.copy_(self._original[1])
        self._original = None
        self.fused.clear()


# ---------------------------------------------------------------------------------------------------------------------
# Whole-model operations


def linear_shapes(root: nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear-like module under `root` -> (out_features, in_features); a LoraLinear counts as its base."""
    shapes = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = prefix + child_name
            if is_linear_like(child):
                shapes[name] = (child.out_features, child.in_features)
            else:
                walk(child, name + ".")

    walk(root, "")
    return shapes


def lora_modules(root: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in root.named_modules() if isinstance(m, LoraLinear)}


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, new)


def attach(root: nn.Module, adapter_name: str, adapters: dict[str, LoraAdapter]) -> None:
    """Swap each named module for a LoraLinear (once) and add the adapter to it."""
    for name, adapter in adapters.items():
        module = root.get_submodule(name)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            _replace(root, name, module)
        module.adapters[adapter_name] = adapter


def detach(root: nn.Module, adapter_name: str) -> None:
    """Remove one adapter; a LoraLinear left without adapters is swapped back for its base module."""
    for name, module in lora_modules(root).items():
        if adapter_name in module.adapters:
            del module.adapters[adapter_name]
            module.active.pop(adapter_name, None)
        if not len(module.adapters):
            module.unfuse()
            _replace(root, name, module.base)


def set_active(root: nn.Module, weights: dict[str, float]) -> None:
    for module in lora_modules(root).values():
        module.active = {n: w for n, w in weights.items() if n in module.adapters}


def set_scale(root: nn.Module, scale: float) -> None:
    for module in lora_modules(root).values():
        module.scale = scale


def fuse_problems(root: nn.Module, names) -> dict[str, str]:
    """Modules holding one of `names` that cannot be fused -> why."""
    return {
        name: problem
        for name, m in lora_modules(root).items()
        if any(n in m.adapters for n in names) and (problem := m.fuse_problem())
    }


def fuse(root: nn.Module, weights: dict[str, float]) -> None:
    """Fuse the named adapters (with these weights) into every module that holds one; check `fuse_problems` first."""
    for module in lora_modules(root).values():
        module.fuse(weights)


def unfuse(root: nn.Module) -> None:
    for module in lora_modules(root).values():
        module.unfuse()


def adapter_weights(root: nn.Module, adapter_name: str, component: str) -> list[ModuleLora]:
    """The tensors of one adapter, per module, for saving."""
    out = []
    for name, module in lora_modules(root).items():
        if adapter_name in module.adapters:
            a = module.adapters[adapter_name]
            bias = a.bias.detach() if a.bias is not None else None
            out.append(ModuleLora(component, name, a.down.detach(), a.up.detach(), a.rank_scale, bias))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Files


def read_lora(source, weight_name: str | None = None) -> tuple[dict[str, Tensor], dict[str, str], str]:
    """A state dict, a .safetensors file, a folder (+ weight_name) or a Hub repo id -> (tensors, metadata, where)."""
    if isinstance(source, Mapping):
        if weight_name is not None:
            raise ValueError(f"weight_name={weight_name!r} applies to a folder or repo, not to a state dict")
        bad = [k for k, v in source.items() if not isinstance(v, Tensor)]
        if bad:
            raise ValueError(f"LoRA state dict values must be tensors; not so for {_listing(bad)}")
        return dict(source), {}, "a state dict"
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"a LoRA source must be a path, a repo id or a state dict, got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.suffix in _PICKLE_SUFFIXES or (weight_name and Path(weight_name).suffix in _PICKLE_SUFFIXES):
        raise ValueError(f"{source}: only .safetensors LoRA files are read (pickled .bin/.pt/.ckpt files can run code)")
    if not path.exists():
        from .loading import resolve_model_source

        path = resolve_model_source(source, allow_patterns=[weight_name or "*.safetensors"])
    if path.is_dir():
        path = path / weight_name if weight_name else _guess_file(path)
    elif weight_name is not None:
        raise ValueError(f"weight_name={weight_name!r} needs a folder or a repo, but {source} is a file")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors LoRA files are read (pickled .bin/.pt/.ckpt files can run code)")
    if not path.is_file():
        raise ValueError(f"no LoRA file {path}")
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}, str(path)


def _guess_file(folder: Path) -> Path:
    if (folder / WEIGHT_NAME).is_file():
        return folder / WEIGHT_NAME
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:  # diffusers picks the only file too
        log.info("LoRA: using %s, the only .safetensors file in %s", files[0].name, folder)
        return files[0]
    found = f"pass weight_name= one of {[f.name for f in files]}" if files else "and no other .safetensors file"
    raise ValueError(f"{folder} has no {WEIGHT_NAME}; {found}")


def save_adapter(
    save_directory, adapter_name: str, transformer: nn.Module, text_encoder: nn.Module | None = None,
    weight_name: str = WEIGHT_NAME, norm_scales: dict[str, Tensor] | None = None,
) -> Path:
    """Write one adapter in diffusers' format (`transformer.<diffusers module>.lora_A/lora_B` + PEFT metadata)."""
    loras = adapter_weights(transformer, adapter_name, "transformer")
    if text_encoder is not None:
        loras += adapter_weights(text_encoder, adapter_name, "text_encoder")
    if not loras:
        raise ValueError(f"no adapter named {adapter_name!r} is attached to the model")
    sd, metadata = to_diffusers(loras, transformer.params, norm_scales)
    path = Path(save_directory) / weight_name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def __getattr__(name: str):
    if name in _PIPELINE_NAMES:
        from . import lora_pipeline

        return getattr(lora_pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
