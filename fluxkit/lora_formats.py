"""LoRA files in the wild -> low-rank updates on fluxkit's BFL-named modules, and back to diffusers' layout (spec §8).

Every format names a module, a role (down/up/bias/alpha) and sometimes a scale; only the naming differs:

| format                 | example key                                                            | names        |
|------------------------|------------------------------------------------------------------------|--------------|
| diffusers / PEFT       | `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`             | diffusers    |
| kohya / sd-scripts     | `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`              | BFL, `_`     |
| kohya, diffusers names | `lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight`     | diffusers, _ |
| kohya CLIP             | `lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha`          | CLIP, `_`    |
| ComfyUI                | `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`        | BFL          |
| BFL / control LoRA     | `double_blocks.0.img_attn.qkv.lora_B.bias`, `*.norm.query_norm.scale`  | BFL          |
| fal Kontext            | `base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight`          | BFL          |
| XLabs                  | `double_blocks.0.processor.qkv_lora1.down.weight`                      | XLabs        |

So conversion is: strip a known prefix, split off the role suffix, resolve the module name against tables built from the
model (never from hard-coded FLUX.1-dev sizes), check every shape, and return `LoraPiece`s. A diffusers name that is one
row slice of a fused BFL tensor (to_q of `img_attn.qkv`, proj_mlp of `linear1`) becomes a piece with a row offset; the
BFL<->diffusers split sizes come from `convert._transformer_rules`, the same table the checkpoint converter uses.
Anything that cannot be applied is reported per reason, never dropped silently.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from .convert import _listing, _swap_halves, _transformer_rules, expected_bfl_shapes
from .params import FluxParams

METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry: the PEFT LoraConfig as JSON
Shapes = Mapping[str, tuple[int, int]]  # module name -> (out_features, in_features)

# Tensor-name suffix -> role. `.down/.up.weight` are XLabs'; the others are kohya's and PEFT's spellings.
_ROLES = (
    (".lora_down.weight", "down"), (".lora_A.weight", "down"), (".lora_up.weight", "up"), (".lora_B.weight", "up"),
    (".lora_B.bias", "bias"), (".lora_up.bias", "bias"), (".down.weight", "down"), (".up.weight", "up"),
    (".alpha", "alpha"),
)
# Key prefix -> namespace of the module name that follows. Checked in order; "" catches BFL/diffusers names as is.
_PREFIXES = (
    ("lora_unet_", "bfl_"), ("lora_transformer_", "diffusers_"), ("lora_te1_", "clip_"), ("lora_te_", "clip_"),
    ("lora_te2_", "t5"), ("text_encoders.clip_l.transformer.", "clip"), ("text_encoders.t5xxl.transformer.", "t5"),
    ("text_encoder_2.", "t5"), ("text_encoder.", "clip"), ("transformer.", "transformer"),
    ("model.diffusion_model.", "transformer"), ("diffusion_model.", "transformer"),
    ("base_model.model.", "transformer"), ("", "transformer"),
)
_XLABS = re.compile(r"(double|single)_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12]?)")


@dataclass
class LoraPiece:
    """Rows [offset, offset + up.shape[0]) of `module`'s output gain scale * up @ down @ x (+ bias)."""

    component: str  # "transformer" or "text_encoder"
    module: str  # fluxkit module name: BFL names for the transformer, the CLIP model's own names
    down: Tensor  # A [r, in]
    up: Tensor  # B [rows, r]
    scale: float  # alpha / r
    offset: int = 0
    bias: Tensor | None = None  # [rows]


@dataclass
class ConvertedLora:
    format: str
    pieces: list[LoraPiece]
    norm_scales: dict[str, Tensor]  # BFL RMSNorm parameter -> replacement value (control LoRAs)
    unmatched: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys that cannot be applied
    ignored: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys dropped as having no effect
    examples: dict[str, str] = field(default_factory=dict)  # reason -> the details of its first case

    def unmatched_message(self) -> str:
        n = sum(len(keys) for keys in self.unmatched.values())
        parts = [
            f"{reason}{f' (e.g. {self.examples[reason]})' if self.examples.get(reason) else ''}: {_listing(keys)}"
            for reason, keys in self.unmatched.items()
        ]
        return f"{n} LoRA keys could not be applied ({self.format} format): " + "; ".join(parts)

    def add(self, table: dict[str, list[str]], problem: Problem, keys: list[str]) -> None:
        table.setdefault(problem.reason, []).extend(keys)
        self.examples.setdefault(problem.reason, problem.detail)


class Problem(NamedTuple):
    """Why some keys cannot be applied: a reason shared by many keys, and the details of one case."""

    reason: str
    detail: str = ""


class _Target(NamedTuple):
    component: str
    module: str
    offset: int
    rows: int
    in_features: int
    swap: bool = False  # diffusers' norm_out rows are [scale; shift], BFL's [shift; scale] (spec §1.7)


def detect_format(keys) -> str:
    """The format name, by spec §8's detection order (the conversion itself resolves every key on its own)."""
    keys = list(keys)
    if any(".processor." in k for k in keys):
        return "xlabs"
    if any(".lora_down." in k or ".lora_up." in k for k in keys):
        if any(k.startswith("lora_transformer_") for k in keys):
            return "kohya-diffusers-names"
        return "kohya-comfyui" if any(k.startswith("diffusion_model.") for k in keys) else "kohya"
    if any(k.endswith(("query_norm.scale", "key_norm.scale")) for k in keys):
        return "bfl-control"
    if any(k.startswith("base_model.model.") for k in keys):
        return "fal-kontext"
    if any(k.startswith(("transformer.", "text_encoder.")) for k in keys):
        return "diffusers"
    return "bfl"


class _Names:
    """Module-name tables of one model, in every naming a LoRA file may use."""

    def __init__(self, params: FluxParams, transformer: Shapes, clip: Shapes | None):
        self.params, self.transformer, self.clip = params, transformer, clip
        self.diffusers: dict[str, _Target] = {}
        self.norms = {k: k for k in expected_bfl_shapes(params) if k.endswith("_norm.scale")}  # param -> BFL param
        if params.qkv_bias:  # the diffusers layout needs qkv biases (convert._transformer_rules)
            self._add_diffusers_rules()
        self.bfl_us = {name.replace(".", "_"): name for name in transformer}
        self.diffusers_us = {name.replace(".", "_"): name for name in self.diffusers}
        # transformers 5 flattened CLIPTextModel (no `text_model.`); files of either age must match.
        self.clip_names = {_clip_canonical(n): n for n in clip or {}}
        self.clip_us = {name.replace(".", "_"): name for name in self.clip_names}

    def _add_diffusers_rules(self) -> None:
        for rule in _transformer_rules(self.params):
            if rule.bfl.endswith("_norm.scale"):
                self.norms[rule.diffusers[0]] = rule.bfl
            if not rule.bfl.endswith(".weight") or rule.bfl.removesuffix(".weight") not in self.transformer:
                continue
            bfl = rule.bfl.removesuffix(".weight")
            out, n_in = self.transformer[bfl]
            offset = 0
            for name, rows in zip(rule.diffusers, rule.split or (out,), strict=True):
                self.diffusers[name.removesuffix(".weight")] = _Target("transformer", bfl, offset, rows, n_in,
                                                                       rule.swap_halves)
                offset += rows

    def resolve(self, namespace: str, module: str) -> _Target | Problem:
        """The target of `module` in `namespace`, or the reason there is none."""
        if namespace == "t5":
            return Problem("T5 text-encoder LoRA is not supported (diffusers drops it too)")
        if namespace in ("clip", "clip_"):
            if self.clip is None:
                return Problem("text-encoder LoRA needs a CLIP text encoder, and this pipeline has none")
            table = self.clip_names if namespace == "clip" else self.clip_us
            name = table.get(_clip_canonical(module) if namespace == "clip" else module.removeprefix("text_model_"))
            return self._whole("text_encoder", name, self.clip) if name else Problem("no such CLIP module", module)
        if namespace == "bfl_":
            module = self.bfl_us.get(module, module)
        elif namespace == "diffusers_":
            module = self.diffusers_us.get(module, module)
        if module in self.transformer:
            return self._whole("transformer", module, self.transformer)
        if module in self.diffusers:
            return self.diffusers[module]
        if _XLABS.fullmatch(module):
            return self._xlabs(module)
        return Problem("no such module in this model", module)

    @staticmethod
    def _whole(component: str, name: str, shapes: Shapes) -> _Target:
        out, n_in = shapes[name]
        return _Target(component, name, 0, out, n_in)

    def _xlabs(self, module: str) -> _Target | Problem:
        """x-flux processors (spec §8.3): lora1 = image stream, lora2 = text stream; qkv adds to the fused qkv."""
        kind, i, what, stream = _XLABS.fullmatch(module).groups()
        if kind == "double":
            s = {"1": "img", "2": "txt"}.get(stream)
            name = f"double_blocks.{i}.{s}_attn.{'qkv' if what == 'qkv' else 'proj'}" if s else ""
            if name not in self.transformer:
                return Problem("no such module in this model", module)
            return self._whole("transformer", name, self.transformer)
        if what == "proj":  # x-flux adds proj_lora(linear2(x)) to linear2's *output*: not a LoRA on linear2's input
            return Problem("x-flux single-block proj_lora acts on linear2's output and is not supported")
        name = f"single_blocks.{i}.linear1"
        if name not in self.transformer:
            return Problem("no such module in this model", module)
        return _Target("transformer", name, 0, 3 * self.params.hidden_size, self.transformer[name][1])


def _clip_canonical(name: str) -> str:
    return name.removeprefix("text_model.")


def _split_key(key: str) -> tuple[str, str, str] | None:
    """key -> (namespace, module, role), or None for a tensor kind no LoRA loader applies (DoRA, LoHa, diff ...)."""
    suffix, role = next(((s, r) for s, r in _ROLES if key.endswith(s)), (None, None))
    if suffix is None:
        return None
    stem = key[: -len(suffix)]
    prefix, namespace = next((p, ns) for p, ns in _PREFIXES if stem.startswith(p))
    return namespace, stem[len(prefix) :], role


def _norm_param(key: str, names: _Names) -> str | None:
    """The BFL RMSNorm parameter a full-replacement norm key (control LoRAs) stands for."""
    for prefix, namespace in _PREFIXES:
        if namespace == "transformer" and key.startswith(prefix) and key[len(prefix):] in names.norms:
            return names.norms[key[len(prefix):]]
    return None


def convert_lora(
    sd: Mapping[str, Tensor],
    params: FluxParams,
    transformer: Shapes,
    clip: Shapes | None = None,
    metadata: Mapping[str, str] | None = None,
) -> ConvertedLora:
    """A LoRA state dict of any supported format -> pieces on the model described by `params` and module shapes.

    `metadata` is the safetensors header (diffusers keeps alpha/rank in its `lora_adapter_metadata` entry).
    """
    names = _Names(params, transformer, clip)
    config = _peft_config(metadata)
    out = ConvertedLora(detect_format(sd), [], {})
    groups: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    conflicts: set[tuple[str, str]] = set()
    for key, tensor in sd.items():
        norm = _norm_param(key, names)
        if norm is not None:
            out.norm_scales[norm] = tensor
            continue
        parts = _split_key(key)
        if parts is None:
            out.add(out.unmatched, Problem("not a LoRA tensor (DoRA, LoHa/LoKr and full-diff keys are not supported)"),
                    [key])
            continue
        group = groups.setdefault(parts[:2], {})
        if parts[2] in group:  # e.g. both `.lora_A.weight` and `.lora_down.weight`: which one holds is undecidable
            out.add(out.unmatched, Problem("two tensors for the same role", parts[1]), [key])
            conflicts.add(parts[:2])
        group[parts[2]] = (key, tensor)
    if config and any("alpha" in g for g in groups.values()):
        raise ValueError("the LoRA has both `.alpha` keys and lora_adapter_metadata; it is ambiguous which scale holds")
    for (namespace, module), group in groups.items():
        target = names.resolve(namespace, module)
        problem = target if isinstance(target, Problem) else _check(group, target)
        keys = [k for k, _ in group.values()]
        if (namespace, module) in conflicts:
            out.add(out.unmatched, Problem("two tensors for the same role", module), keys)
        elif problem is None:
            out.pieces.append(_piece(group, target, _scale(group, target, module, config)))
        elif all(not t.any() for role, (_, t) in group.items() if role != "alpha"):
            out.add(out.ignored, Problem(f"all-zero tensors, no effect ({problem.reason})", problem.detail), keys)
        else:
            out.add(out.unmatched, problem, keys)
    for name, tensor in out.norm_scales.items():
        if tuple(tensor.shape) != (params.head_dim,):
            raise ValueError(f"norm replacement {name} has shape {tuple(tensor.shape)}, expected ({params.head_dim},)")
    return out


def _check(group: dict[str, tuple[str, Tensor]], t: _Target) -> Problem | None:
    """The reason `group` cannot be applied to `t`, or None. img_in may differ in width (control LoRAs widen it)."""
    if "down" not in group or "up" not in group:
        return Problem("a LoRA down/A or up/B matrix without its partner", t.module)
    down, up = group["down"][1], group["up"][1]
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        return Problem("down and up are not a rank-r pair", f"{t.module}: {tuple(down.shape)}, {tuple(up.shape)}")
    if up.shape[0] != t.rows or (down.shape[1] != t.in_features and t.module != "img_in"):
        return Problem("shape does not fit this model", f"{t.module} takes up [{t.rows}, r] and down [r, "
                       f"{t.in_features}], got {tuple(up.shape)} and {tuple(down.shape)}")
    if "alpha" in group and group["alpha"][1].numel() != 1:
        return Problem("alpha is not a single number", f"{t.module}: shape {tuple(group['alpha'][1].shape)}")
    if "bias" in group and tuple(group["bias"][1].shape) != (t.rows,):
        bias_shape = tuple(group["bias"][1].shape)
        return Problem("lora_B bias does not fit", f"{t.module} has {t.rows} rows, bias {bias_shape}")
    return None


def _piece(group: dict[str, tuple[str, Tensor]], t: _Target, scale: float) -> LoraPiece:
    up, bias = group["up"][1], group["bias"][1] if "bias" in group else None
    if t.swap:
        up, bias = _swap_halves(up), (_swap_halves(bias) if bias is not None else None)
    return LoraPiece(t.component, t.module, group["down"][1], up, scale, t.offset, bias)


def _scale(group: dict[str, tuple[str, Tensor]], t: _Target, module: str, config: dict) -> float:
    """alpha / r from an `.alpha` key, else from diffusers' metadata, else 1 (alpha defaults to r)."""
    rank = group["down"][1].shape[0]
    if "alpha" in group:
        return float(group["alpha"][1]) / rank
    cfg = config.get(t.component) or config.get("")
    if not cfg:
        return 1.0
    alpha = cfg.get("lora_alpha", 8)  # PEFT LoraConfig's default
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):  # PEFT's pattern rule (peft.utils.other.get_pattern_key)
            alpha = value
            break
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _peft_config(metadata: Mapping[str, str] | None) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` JSON -> {component: LoraConfig dict}; "" when saved without a prefix."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"the LoRA file's {METADATA_KEY} metadata is not valid JSON: {e}") from None
    config: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field_name = key.rpartition(".")
        config.setdefault(component, {})[field_name] = value
    return config


# ---------------------------------------------------------------------------------------------------------------------
# fluxkit -> diffusers


class ModuleLora(NamedTuple):
    """One adapter on one module as the runtime holds it: delta = up @ diag(rank_scale) @ down (+ bias)."""

    component: str
    module: str
    down: Tensor  # [R, in]
    up: Tensor  # [out, R]
    rank_scale: Tensor  # [R]
    bias: Tensor | None  # [out]


def to_diffusers(
    loras: list[ModuleLora], params: FluxParams, norm_scales: Mapping[str, Tensor] | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """-> (state dict with `transformer.<diffusers module>.lora_A/lora_B` keys, safetensors metadata) that diffusers'
    `load_lora_weights` reads with the same effect. Fused BFL targets are split into their diffusers row slices."""
    names = _Names(params, {m.module: (m.up.shape[0], m.down.shape[1]) for m in loras
                            if m.component == "transformer"}, None)
    slices: dict[str, list[tuple[str, str, int, int, bool]]] = {}
    for dname, t in names.diffusers.items():
        slices.setdefault(t.module, []).append((dname, dname, t.offset, t.rows, t.swap))
    sd: dict[str, Tensor] = {}
    ranks: dict[str, dict[str, tuple[int, float]]] = {}
    for m in loras:
        if m.component == "text_encoder":
            # Keys keep CLIP's `text_model.` (older transformers need it, newer diffusers strip it); the config names
            # leave it out, because PEFT matches them as suffixes of whichever module names the CLIP model has.
            name = _clip_canonical(m.module)
            targets = [(f"text_model.{name}", name, 0, m.up.shape[0], False)]
        elif m.module in slices:
            targets = slices[m.module]
        else:
            raise ValueError(f"{m.module} has no diffusers counterpart; cannot save this adapter in diffusers format")
        whole_zero = not m.up.any()
        for key_name, config_name, offset, rows, swap in targets:
            up = _swap_halves(m.up) if swap else m.up
            bias = (_swap_halves(m.bias) if swap else m.bias) if m.bias is not None else None
            bias = bias[offset : offset + rows] if bias is not None else None
            entry = _export_slice(m, up[offset : offset + rows], bias, keep_all=whole_zero)
            if entry is None:
                continue
            down, up_i, bias_i, scale = entry
            prefix = f"{m.component}.{key_name}"
            sd[f"{prefix}.lora_A.weight"] = down.contiguous()
            sd[f"{prefix}.lora_B.weight"] = up_i.contiguous()
            if bias_i is not None:
                sd[f"{prefix}.lora_B.bias"] = bias_i.contiguous()
            alpha = float(f"{scale * down.shape[0]:.7g}")  # alpha = scale * r, without float32 round-off digits
            ranks.setdefault(m.component, {})[config_name] = (down.shape[0], alpha)
    reverse = {bfl: dname for dname, bfl in names.norms.items() if dname != bfl}
    for bfl, tensor in (norm_scales or {}).items():
        if bfl not in reverse:
            raise ValueError(f"norm replacement {bfl} has no diffusers counterpart")
        sd[f"transformer.{reverse[bfl]}"] = tensor
    meta = {}
    for c, table in ranks.items():
        has_bias = any(k.startswith(f"{c}.") and k.endswith(".bias") for k in sd)
        config = _lora_config(table, has_bias, anchored=c == "transformer")
        meta.update({f"{c}.{k}": v for k, v in config.items()})
    return sd, {"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}


def _export_slice(m: ModuleLora, up: Tensor, bias: Tensor | None, keep_all: bool):
    """(down, up, bias, scale) of one row slice with its all-zero rank columns dropped; None if it has no effect."""
    cols = up.any(dim=0) if not keep_all else torch.ones(up.shape[1], dtype=torch.bool)
    if not cols.any() and (bias is None or not bias.any()):
        return None
    cols = cols if cols.any() else torch.ones_like(cols)  # a bias-only slice keeps a (zero) rank-R product
    down, up, s = m.down[cols], up[:, cols], m.rank_scale[cols].float()
    if bool((s == s[0]).all()):
        return down, up, bias, float(s[0])
    return down * s[:, None].to(down.dtype), up, bias, 1.0  # mixed scales: fold them into A, alpha = r


def _lora_config(table: dict[str, tuple[int, float]], lora_bias: bool, anchored: bool) -> dict:
    """A PEFT LoraConfig dict: the most common rank/alpha, one pattern per module for the rest (`^name`, exact from the
    start, as diffusers writes them; unanchored names match as dotted suffixes)."""
    r = Counter(rank for rank, _ in table.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in table.values()).most_common(1)[0][0]
    start = "^" if anchored else ""
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {f"{start}{n}": rank for n, (rank, _) in table.items() if rank != r},
        "alpha_pattern": {f"{start}{n}": a for n, (_, a) in table.items() if a != alpha},
        "target_modules": sorted(table),
        "lora_bias": lora_bias,
        "use_dora": False,
        "use_rslora": False,
    }
