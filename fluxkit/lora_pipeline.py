"""diffusers' LoRA pipeline API (FluxLoraLoaderMixin) over fluxkit's runtime adapters (`fluxkit.lora`).

`LoraLoaderMixin` gives a pipeline with `self.transformer` (a Flux) and `self.text_encoder` load_lora_weights,
set_adapters, get_active_adapters, fuse_lora / unfuse_lora, unload_lora_weights, delete_adapters, a per-call scale and
save_lora_weights. Loading reads any supported file (`fluxkit.lora.read_lora`), converts it onto the BFL-named modules
(`fluxkit.lora_formats`), checks everything, and only then swaps modules; unmatched keys are an error that lists them.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .convert import _listing
from .lora import (
    FUSABLE_DTYPES,
    WEIGHT_NAME,
    LoraAdapter,
    LoraLinear,
    attach,
    detach,
    fuse,
    fuse_problems,
    linear_shapes,
    read_lora,
    save_adapter,
    set_active,
    set_scale,
    unfuse,
)
from .lora_formats import LoraPiece, convert_lora

log = logging.getLogger(__name__)


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
        if not isinstance(base, nn.Linear) or base.weight.dtype not in FUSABLE_DTYPES or getattr(
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
        if p.dtype in FUSABLE_DTYPES:
            return p.dtype, p.device
    raise ValueError(f"{type(root).__name__} has no floating-point parameter to take the LoRA dtype from")
