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

Below the module swap: reading LoRA files (safetensors only) and saving in diffusers' format, and `LoraLoaderMixin`,
diffusers' pipeline API (load_lora_weights, set_adapters, fuse_lora, ...) over the transformer and a CLIP encoder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .convert import _listing
from .lora_formats import LoraPiece, ModuleLora, convert_lora, to_diffusers

log = logging.getLogger(__name__)
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_FUSABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
        if not isinstance(base, nn.Linear) or base.weight.dtype not in _FUSABLE_DTYPES:
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


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline API (diffusers' FluxLoraLoaderMixin)


@dataclass
class LoraLoadReport:
    adapter_name: str
    source: str
    format: str
    modules: dict[str, int]  # component -> modules the adapter touches
    norm_scales: int = 0  # RMSNorm scales replaced (control LoRAs)
    img_in_width: int | None = None  # img_in widened to this many inputs (control LoRAs)
    skipped: int = 0  # unmatched keys skipped under strict=False
    ignored: int = 0  # all-zero keys dropped (no effect)

    def __str__(self) -> str:
        parts = [f"{n} {c} modules" for c, n in self.modules.items() if n]
        if self.norm_scales:
            parts.append(f"{self.norm_scales} norm scales replaced")
        if self.img_in_width:
            parts.append(f"img_in widened to {self.img_in_width} inputs")
        for n, what in ((self.skipped, "unmatched keys skipped"), (self.ignored, "all-zero keys ignored")):
            if n:
                parts.append(f"{n} {what}")
        return f"LoRA {self.adapter_name!r} ({self.format}) from {self.source}: " + ", ".join(parts)


@dataclass
class _LoraState:
    reports: dict[str, LoraLoadReport] = field(default_factory=dict)  # loaded adapters, in load order
    active: dict[str, float] = field(default_factory=dict)
    disabled: dict[str, float] | None = None  # what enable_lora() restores
    fused: dict[str, set[str]] = field(default_factory=dict)  # component -> adapters fused into its weights
    scale: float = 1.0
    norm_overrides: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # adapter -> BFL param -> value
    norm_originals: dict[str, Tensor] = field(default_factory=dict)
    img_in_original: tuple[nn.Module, object] | None = None  # (module, FluxParams) before widening


class LoraLoaderMixin:
    """diffusers' LoRA methods for a pipeline with `self.transformer` (a Flux) and `self.text_encoder` (LoRA on the
    text side applies to a CLIP model at `self.text_encoder.clip`)."""

    def _lora_state(self) -> _LoraState:
        if "_lora" not in self.__dict__:
            self._lora = _LoraState()
        return self._lora

    def _lora_roots(self) -> dict[str, nn.Module]:
        clip = getattr(self.text_encoder, "clip", None)
        return {"transformer": self.transformer, **({"text_encoder": clip} if isinstance(clip, nn.Module) else {})}

    def load_lora_weights(
        self, pretrained_model_name_or_path_or_dict, weight_name: str | None = None,
        adapter_name: str | None = None, strict: bool = True,
    ) -> LoraLoadReport:
        """Load a LoRA of any supported format as a new adapter, which becomes the only active one (as in diffusers).

        Keys that cannot be applied are a ValueError listing them; `strict=False` loads the rest with a warning.
        A file none of whose keys match is always an error.
        """
        state = self._lora_state()
        name = self._new_adapter_name(adapter_name)
        sd, metadata, source = read_lora(pretrained_model_name_or_path_or_dict, weight_name)
        roots = self._lora_roots()
        shapes = {c: linear_shapes(root) for c, root in roots.items()}
        conv = convert_lora(sd, self.transformer.params, shapes["transformer"], shapes.get("text_encoder"), metadata)
        if not conv.pieces and not conv.norm_scales:
            why = conv.unmatched_message() if conv.unmatched else "every tensor is all-zero"
            raise ValueError(f"no key of the LoRA from {source} ({len(sd)} keys) matches this model: {why}")
        if conv.unmatched:
            if strict:
                raise ValueError(conv.unmatched_message() + "; pass strict=False to load the others")
            warnings.warn(conv.unmatched_message() + "; loading the others (strict=False)", stacklevel=2)
        width = self._img_in_width(conv.pieces)
        adapters = self._build_adapters(conv.pieces, roots, shapes, width)
        # Everything is checked: change the model.
        if width is not None:
            self._widen_img_in(width)
        for component, modules in adapters.items():
            attach(roots[component], name, modules)
        for param in conv.norm_scales:
            state.norm_originals.setdefault(param, self.transformer.get_parameter(param).detach().clone())
        state.norm_overrides[name] = dict(conv.norm_scales)
        report = LoraLoadReport(
            name, source, conv.format, {c: len(m) for c, m in adapters.items()}, len(conv.norm_scales), width,
            sum(map(len, conv.unmatched.values())), sum(map(len, conv.ignored.values())),
        )
        state.reports[name] = report
        self.set_adapters([name])
        log.info("%s", report)
        return report

    def _new_adapter_name(self, adapter_name: str | None) -> str:
        taken = self._lora_state().reports
        if adapter_name is None:
            n = len(taken)
            while f"default_{n}" in taken:
                n += 1
            return f"default_{n}"
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
        if adapter_name in taken:
            raise ValueError(f"adapter_name {adapter_name!r} is already loaded; delete_adapters() it or pick another")
        return adapter_name

    def _img_in_width(self, pieces: list[LoraPiece]) -> int | None:
        """The wider img_in a control LoRA needs (spec §8.4), or None; checks that img_in can be widened."""
        widths = [p.down.shape[1] for p in pieces if p.component == "transformer" and p.module == "img_in"]
        module = self.transformer.img_in
        if not widths or max(widths) <= module.in_features:
            return None
        base = module.base if isinstance(module, LoraLinear) else module
        if not isinstance(base, nn.Linear) or base.weight.dtype not in _FUSABLE_DTYPES or getattr(
            module, "fused", None
        ):
            raise ValueError(f"this LoRA widens img_in from {module.in_features} to {max(widths)} inputs (a control "
                             f"LoRA), which needs an unquantized, unfused img_in; it is a {type(base).__name__}")
        return max(widths)

    def _build_adapters(self, pieces, roots, shapes, width) -> dict[str, dict[str, LoraAdapter]]:
        grouped: dict[tuple[str, str], list[LoraPiece]] = {}
        for p in pieces:
            grouped.setdefault((p.component, p.module), []).append(p)
        adapters: dict[str, dict[str, LoraAdapter]] = {}
        for (component, module), group in grouped.items():
            out, n_in = shapes[component][module]
            if (component, module) == ("transformer", "img_in"):
                # An img_in LoRA narrower than img_in gets zero columns: the extra (control) inputs get no update.
                n_in = width or n_in
                group = [replace(p, down=F.pad(p.down, (0, n_in - p.down.shape[1]))) for p in group]
            dtype, device = _float_param(roots[component])
            adapters.setdefault(component, {})[module] = LoraAdapter.from_pieces(group, out, dtype, device)
        return adapters

    def _widen_img_in(self, width: int) -> None:
        """Widen img_in with zero columns (the new inputs start with no effect) and update params.in_channels."""
        model, state = self.transformer, self._lora_state()
        module = model.img_in
        base = module.base if isinstance(module, LoraLinear) else module
        wide = nn.Linear(width, base.out_features, bias=base.bias is not None, device=base.weight.device,
                         dtype=base.weight.dtype)
        with torch.no_grad():
            wide.weight.zero_()
            wide.weight[:, : base.in_features] = base.weight  # [hidden, in] -> [hidden, width]
            if base.bias is not None:
                wide.bias.copy_(base.bias)
        if state.img_in_original is None:
            state.img_in_original = (base, model.params)
        if isinstance(module, LoraLinear):
            module.base, module.in_features = wide, width
            for a in module.adapters.values():
                a.down = nn.Parameter(F.pad(a.down, (0, width - a.down.shape[1])), requires_grad=False)
        else:
            model.img_in = wide
        model.params = dataclasses.replace(model.params, in_channels=width)

    def _push(self) -> None:
        """Send the active adapters and the scale to every LoraLinear, and set the norm scales they imply."""
        state = self._lora_state()
        for root in self._lora_roots().values():
            set_active(root, state.active)
            set_scale(root, state.scale)
        for param, original in state.norm_originals.items():
            value = original
            for name in state.reports:  # the last-loaded active adapter that replaces this norm wins
                if name in state.active and param in state.norm_overrides.get(name, {}):
                    value = state.norm_overrides[name][param]
            target = self.transformer.get_parameter(param)
            with torch.no_grad():
                target.copy_(value.to(target.dtype))

    def _names(self, adapter_names, what: str) -> list[str]:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        loaded = self._lora_state().reports
        unknown = [n for n in names if n not in loaded]
        if unknown or len(set(names)) != len(names):
            raise ValueError(f"{what}: adapter names {names} must be distinct loaded adapters (loaded: {list(loaded)})")
        return names

    def _fused_names(self) -> set[str]:
        return set().union(*self._lora_state().fused.values())

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Activate exactly these adapters, each with a weight (default 1.0); their deltas add up."""
        names = self._names(adapter_names, "set_adapters")
        if adapter_weights is None or isinstance(adapter_weights, (int, float)):
            adapter_weights = [1.0 if adapter_weights is None else adapter_weights] * len(names)
        weights = list(adapter_weights)
        if len(weights) != len(names) or any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in weights):
            raise ValueError(f"adapter_weights must be a number or one number per adapter {names}, got {weights!r}")
        fused = self._fused_names().intersection(names)
        if fused:
            raise ValueError(f"adapters {sorted(fused)} are fused into the weights; call unfuse_lora() first")
        state = self._lora_state()
        state.active, state.disabled = {n: float(w) for n, w in zip(names, weights)}, None
        self._push()

    def get_active_adapters(self) -> list[str]:
        return list(self._lora_state().active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        reports = self._lora_state().reports
        return {c: [n for n, r in reports.items() if r.modules.get(c)] for c in ("transformer", "text_encoder")}

    def disable_lora(self) -> None:
        state = self._lora_state()
        state.disabled, state.active = state.disabled or state.active, {}
        self._push()

    def enable_lora(self) -> None:
        state = self._lora_state()
        if state.disabled is not None:
            state.active, state.disabled = state.disabled, None
            self._push()

    def delete_adapters(self, adapter_names) -> None:
        names = self._names(adapter_names, "delete_adapters")
        fused = self._fused_names().intersection(names)
        if fused:
            raise ValueError(f"adapters {sorted(fused)} are fused into the weights; call unfuse_lora() first")
        state = self._lora_state()
        for name in names:
            for root in self._lora_roots().values():
                detach(root, name)
            for table in (state.reports, state.active, state.norm_overrides, state.disabled or {}):
                table.pop(name, None)
        self._push()

    def _components(self, components) -> list[str]:
        roots = self._lora_roots()
        components = list(roots) if components is None else list(components)
        unknown = [c for c in components if c not in roots]
        if unknown:
            raise ValueError(f"components must be among {list(roots)}, got {unknown}")
        return components

    def fuse_lora(self, components=None, lora_scale: float = 1.0, adapter_names=None) -> None:
        """Add lora_scale * weight * delta of the adapters (default: the active ones) into the base weights."""
        state, roots = self._lora_state(), self._lora_roots()
        names = list(state.active) if adapter_names is None else self._names(adapter_names, "fuse_lora")
        if not names:
            raise ValueError("fuse_lora: no adapter is active and adapter_names was not given")
        components = self._components(components)
        already = self._fused_names().intersection(names)
        if already:
            raise ValueError(f"adapters {sorted(already)} are already fused")
        problems: dict[str, list[str]] = {}  # reason -> modules
        for c in components:
            for module, reason in fuse_problems(roots[c], names).items():
                problems.setdefault(reason, []).append(f"{c}.{module}")
        if problems:
            listing = "; ".join(f"{reason}: {_listing(modules)}" for reason, modules in problems.items())
            raise ValueError(f"cannot fuse LoRA into {sum(map(len, problems.values()))} modules: {listing}")
        weights = {n: lora_scale * state.active.get(n, 1.0) for n in names}
        for c in components:
            fuse(roots[c], weights)
            state.fused.setdefault(c, set()).update(names)

    def unfuse_lora(self, components=None) -> None:
        """Restore the base weights from the copies kept by fuse_lora (bit-exact)."""
        state, roots = self._lora_state(), self._lora_roots()
        for c in self._components(components):
            unfuse(roots[c])
            state.fused.pop(c, None)

    def unload_lora_weights(self) -> None:
        """Remove every adapter and restore the original modules, norm scales, img_in and params."""
        state = self._lora_state()
        state.active = {}
        self._push()  # norm scales back to the originals
        for root in self._lora_roots().values():
            unfuse(root)
            for name in state.reports:
                detach(root, name)
        if state.img_in_original is not None:
            original, params = state.img_in_original
            wide = self.transformer.img_in.weight  # the pipeline may have moved since the widening
            self.transformer.img_in = original.to(device=wide.device, dtype=wide.dtype)
            self.transformer.params = params
        self._lora = _LoraState()

    def set_lora_scale(self, scale: float) -> None:
        """Scale every runtime (unfused) adapter's contribution; diffusers' `joint_attention_kwargs={"scale": s}`."""
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"LoRA scale must be a number, got {scale!r}")
        self._lora_state().scale = float(scale)
        self._push()

    @contextmanager
    def temporary_lora_scale(self, scale: float | None):
        """`with pipe.temporary_lora_scale(s):` one generation at scale s, then the previous scale (None: no-op)."""
        if scale is None:
            yield
            return
        state = self._lora_state()
        if not state.reports:
            raise ValueError(f"a LoRA scale ({scale}) was given but no LoRA is loaded")
        previous = state.scale
        self.set_lora_scale(scale)
        try:
            yield
        finally:
            self.set_lora_scale(previous)

    def save_lora_weights(self, save_directory, adapter_name: str | None = None,
                          weight_name: str = WEIGHT_NAME) -> Path:
        """Write one adapter as diffusers' `pytorch_lora_weights.safetensors` (loads in diffusers and fluxkit)."""
        state = self._lora_state()
        if adapter_name is None:
            if len(state.reports) != 1:
                raise ValueError(f"pass adapter_name= one of {list(state.reports)}")
            adapter_name = next(iter(state.reports))
        self._names(adapter_name, "save_lora_weights")
        roots = self._lora_roots()
        return save_adapter(save_directory, adapter_name, self.transformer, roots.get("text_encoder"), weight_name,
                            state.norm_overrides.get(adapter_name))


def _float_param(root: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The compute dtype and device of a (possibly quantized) model: those of its first float parameter."""
    for p in root.parameters():
        if p.dtype in _FUSABLE_DTYPES:
            return p.dtype, p.device
    raise ValueError(f"{type(root).__name__} has no floating-point parameter to take the LoRA dtype from")
