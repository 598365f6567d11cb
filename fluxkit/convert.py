"""Foreign checkpoint layouts <-> BFL names, and model sizes read back from a state dict.

fluxkit's modules carry BFL's checkpoint names (spec §2.1, §3.2). Other layouts -- diffusers' `FluxTransformer2DModel`
and `AutoencoderKL`, ComfyUI key prefixes -- are translated here by key tables generated from the model sizes, so the
same table drives both directions. Every conversion first checks that its input has exactly the expected keys and
shapes and raises a ValueError listing the differences: a checkpoint is never half-converted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from .params import AutoEncoderParams, FluxParams

StateDict = dict[str, Tensor]
Shapes = dict[str, tuple[int, ...]]

TIME_EMBED_DIM = 256  # width of the sinusoidal timestep/guidance embedding fed to time_in/guidance_in (BFL constant)
FLUX_AXES_DIM = (16, 56, 56)  # every FLUX.1 checkpoint (head_dim 128) uses these RoPE axes
_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI-style single files
# A key prefix that identifies (network, layout). Checked on keys with any ComfyUI prefix already stripped.
_MARKERS = {
    "img_in.": ("transformer", "bfl"),
    "double_blocks.": ("transformer", "bfl"),
    "single_blocks.": ("transformer", "bfl"),
    "x_embedder.": ("transformer", "diffusers"),
    "transformer_blocks.": ("transformer", "diffusers"),
    "single_transformer_blocks.": ("transformer", "diffusers"),
    "encoder.down.": ("autoencoder", "bfl"),
    "decoder.up.": ("autoencoder", "bfl"),
    "encoder.down_blocks.": ("autoencoder", "diffusers"),
    "decoder.up_blocks.": ("autoencoder", "diffusers"),
}


# ---------------------------------------------------------------------------------------------------------------------
# Shared checks


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names) - limit} more)" if len(names) > limit else shown


def check_state_dict(sd: Mapping[str, Tensor], expected: Shapes, what: str) -> None:
    """Raise ValueError unless `sd` holds exactly the keys of `expected`, each with its shape."""
    unexpected = sorted(k for k in sd if k not in expected)
    missing = sorted(k for k in expected if k not in sd)
    wrong = sorted(
        f"{k} {tuple(sd[k].shape)} (expected {shape})"
        for k, shape in expected.items()
        if k in sd and tuple(sd[k].shape) != shape
    )
    problems = [
        f"{len(names)} {label}: {_listing(names)}"
        for label, names in (("unexpected keys", unexpected), ("missing keys", missing), ("wrong shapes", wrong))
        if names
    ]
    if problems:
        raise ValueError(f"{what} does not match the expected layout ({len(expected)} tensors): " + "; ".join(problems))


def strip_prefix(sd: Mapping[str, Tensor]) -> StateDict:
    """Drop a `model.diffusion_model.` / `diffusion_model.` prefix that ComfyUI-style single files put on every key."""
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            others = sorted(k for k in sd if not k.startswith(prefix))
            if others:  # e.g. an all-in-one file that also holds a VAE and text encoders
                raise ValueError(f"{len(others)} keys lack the {prefix!r} prefix the other keys carry: "
                                 f"{_listing(others)}")
            return {k[len(prefix) :]: v for k, v in sd.items()}
    return dict(sd)


def _classify(keys: Iterable[str]) -> tuple[str, str]:
    keys = list(keys)
    found = {kind for k in keys for prefix, kind in _MARKERS.items() if k.startswith(prefix)}
    if len(found) != 1:
        state = "no known" if not found else f"conflicting ({sorted(found)})"
        raise ValueError(f"cannot tell the checkpoint layout: {state} key markers among {len(keys)} keys "
                         f"(first: {_listing(sorted(keys), 5)})")
    return found.pop()


def detect_layout(keys: Iterable[str]) -> str:
    """'bfl' or 'diffusers', for a transformer or an autoencoder state dict (prefix already stripped)."""
    return _classify(keys)[1]


def detect_network(keys: Iterable[str]) -> str:
    """'transformer' or 'autoencoder'."""
    return _classify(keys)[0]


def _shape(sd: Mapping[str, Tensor], key: str, role: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"state dict has no {key!r} ({role}); cannot infer the model size")
    return tuple(sd[key].shape)


def _count(keys: Iterable[str], prefix: str) -> int:
    """Number of numbered children under `prefix` (max index + 1, so a gap shows up as missing keys later)."""
    indices = [int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)]
    return max(indices) + 1 if indices else 0


# ---------------------------------------------------------------------------------------------------------------------
# Transformer


class _FluxSizes(NamedTuple):
    """The sizes that fix a transformer's keys and shapes; attribute names match FluxParams (duck-typed)."""

    in_channels: int
    out_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_hidden_dim: int
    head_dim: int
    depth: int
    depth_single_blocks: int
    qkv_bias: bool
    guidance_embed: bool


def expected_bfl_shapes(params: FluxParams | _FluxSizes) -> Shapes:
    """Every BFL transformer key and its shape (spec §2.1): 780 tensors for flux-dev, 776 for flux-schnell."""
    p, shapes = params, {}
    h, mlp = p.hidden_size, p.mlp_hidden_dim

    def linear(name: str, n_in: int, n_out: int, bias: bool = True) -> None:
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    def qk_norm(name: str) -> None:
        shapes[f"{name}.query_norm.scale"] = shapes[f"{name}.key_norm.scale"] = (p.head_dim,)

    linear("img_in", p.in_channels, h)
    linear("txt_in", p.context_in_dim, h)
    embedders = {"time_in": TIME_EMBED_DIM, "vector_in": p.vec_in_dim}
    if p.guidance_embed:
        embedders["guidance_in"] = TIME_EMBED_DIM
    for name, n_in in embedders.items():
        linear(f"{name}.in_layer", n_in, h)
        linear(f"{name}.out_layer", h, h)
    for i in range(p.depth):
        for stream in ("img", "txt"):
            block = f"double_blocks.{i}.{stream}"
            linear(f"{block}_mod.lin", h, 6 * h)  # shift, scale, gate for attention and MLP
            linear(f"{block}_attn.qkv", h, 3 * h, bias=p.qkv_bias)
            qk_norm(f"{block}_attn.norm")
            linear(f"{block}_attn.proj", h, h)
            linear(f"{block}_mlp.0", h, mlp)
            linear(f"{block}_mlp.2", mlp, h)
    for i in range(p.depth_single_blocks):
        block = f"single_blocks.{i}"
        linear(f"{block}.linear1", h, 3 * h + mlp)  # [q | k | v | mlp]
        linear(f"{block}.linear2", h + mlp, h)  # input [attention | gelu(mlp)]
        qk_norm(f"{block}.norm")
        linear(f"{block}.modulation.lin", h, 3 * h)
    linear("final_layer.linear", h, p.out_channels)
    linear("final_layer.adaLN_modulation.1", h, 2 * h)
    return shapes


class _Rule(NamedTuple):
    bfl: str
    diffusers: tuple[str, ...]  # one name, or the pieces whose row concatenation is the BFL tensor
    split: tuple[int, ...] = ()  # row counts of those pieces
    swap_halves: bool = False  # BFL final adaLN rows are [shift; scale], diffusers' [scale; shift] (spec §1.7)


def _transformer_rules(p: FluxParams | _FluxSizes) -> list[_Rule]:
    """The BFL <-> diffusers key table of spec §2.3, for one set of sizes."""
    if not p.qkv_bias:
        raise ValueError("the diffusers layout has no form for a transformer without qkv biases (qkv_bias=False)")
    h, rules = p.hidden_size, []

    def linear(bfl: str, *diffusers: str, split: tuple[int, ...] = (), swap: bool = False) -> None:
        for suffix in ("weight", "bias"):
            rules.append(_Rule(f"{bfl}.{suffix}", tuple(f"{d}.{suffix}" for d in diffusers), split, swap))

    def qk_norm(bfl: str, diffusers_q: str, diffusers_k: str) -> None:
        rules.append(_Rule(f"{bfl}.query_norm.scale", (f"{diffusers_q}.weight",)))
        rules.append(_Rule(f"{bfl}.key_norm.scale", (f"{diffusers_k}.weight",)))

    linear("img_in", "x_embedder")
    linear("txt_in", "context_embedder")
    embedders = {"time_in": "timestep_embedder", "vector_in": "text_embedder"}
    if p.guidance_embed:
        embedders["guidance_in"] = "guidance_embedder"
    for bfl, name in embedders.items():
        linear(f"{bfl}.in_layer", f"time_text_embed.{name}.linear_1")
        linear(f"{bfl}.out_layer", f"time_text_embed.{name}.linear_2")
    # Per stream: modulation, q/k/v projections, q/k norms, output projection, feed-forward.
    streams = (("img", "norm1", "to_{}", "norm_{}", "to_out.0", "ff"),
               ("txt", "norm1_context", "add_{}_proj", "norm_added_{}", "to_add_out", "ff_context"))
    for i in range(p.depth):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for stream, mod, proj, norm, out, ff in streams:
            linear(f"{b}.{stream}_mod.lin", f"{d}.{mod}.linear")
            linear(f"{b}.{stream}_attn.qkv", *(f"{d}.attn.{proj.format(c)}" for c in "qkv"), split=(h, h, h))
            qk_norm(f"{b}.{stream}_attn.norm", f"{d}.attn.{norm.format('q')}", f"{d}.attn.{norm.format('k')}")
            linear(f"{b}.{stream}_attn.proj", f"{d}.attn.{out}")
            linear(f"{b}.{stream}_mlp.0", f"{d}.{ff}.net.0.proj")
            linear(f"{b}.{stream}_mlp.2", f"{d}.{ff}.net.2")
    for i in range(p.depth_single_blocks):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        linear(f"{b}.linear1", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp",
               split=(h, h, h, p.mlp_hidden_dim))
        linear(f"{b}.linear2", f"{d}.proj_out")
        qk_norm(f"{b}.norm", f"{d}.attn.norm_q", f"{d}.attn.norm_k")
        linear(f"{b}.modulation.lin", f"{d}.norm.linear")
    linear("final_layer.linear", "proj_out")
    linear("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return rules


def _diffusers_shapes(rules: list[_Rule], bfl_shapes: Shapes) -> Shapes:
    shapes = {}
    for rule in rules:
        rows = rule.split or (bfl_shapes[rule.bfl][0],)
        for name, n in zip(rule.diffusers, rows, strict=True):
            shapes[name] = (n, *bfl_shapes[rule.bfl][1:])
    return shapes


# Where each size is read, per layout.
_SIZE_KEYS = {
    "bfl": dict(img_in="img_in.weight", txt_in="txt_in.weight", vector_in="vector_in.in_layer.weight",
                final="final_layer.linear.weight", guidance="guidance_in.in_layer.weight", double="double_blocks.",
                single="single_blocks.", double_mlp="double_blocks.0.img_mlp.0.weight",
                double_norm="double_blocks.0.img_attn.norm.query_norm.scale",
                single_norm="single_blocks.0.norm.query_norm.scale", single_mlp="single_blocks.0.linear1.weight"),
    "diffusers": dict(img_in="x_embedder.weight", txt_in="context_embedder.weight",
                      vector_in="time_text_embed.text_embedder.linear_1.weight", final="proj_out.weight",
                      guidance="time_text_embed.guidance_embedder.linear_1.weight", double="transformer_blocks.",
                      single="single_transformer_blocks.", double_mlp="transformer_blocks.0.ff.net.0.proj.weight",
                      double_norm="transformer_blocks.0.attn.norm_q.weight",
                      single_norm="single_transformer_blocks.0.attn.norm_q.weight",
                      single_mlp="single_transformer_blocks.0.proj_mlp.weight"),
}


def _flux_sizes(sd: Mapping[str, Tensor], layout: str) -> _FluxSizes:
    names = _SIZE_KEYS[layout]
    hidden, in_channels = _shape(sd, names["img_in"], "image input projection")
    depth, single = _count(sd, names["double"]), _count(sd, names["single"])
    if depth:
        mlp = _shape(sd, names["double_mlp"], "first double block MLP")[0]
        head_dim = _shape(sd, names["double_norm"], "first double block query norm")[0]
    elif single:
        mlp = _shape(sd, names["single_mlp"], "first single block MLP")[0]
        mlp -= 3 * hidden if layout == "bfl" else 0  # BFL linear1 rows are [q | k | v | mlp]
        head_dim = _shape(sd, names["single_norm"], "first single block query norm")[0]
    else:
        raise ValueError("state dict has no transformer blocks; cannot infer the model size")
    return _FluxSizes(
        in_channels=in_channels,
        out_channels=_shape(sd, names["final"], "output projection")[0],
        vec_in_dim=_shape(sd, names["vector_in"], "pooled text embedder")[1],
        context_in_dim=_shape(sd, names["txt_in"], "text input projection")[1],
        hidden_size=hidden,
        mlp_hidden_dim=mlp,
        head_dim=head_dim,
        depth=depth,
        depth_single_blocks=single,
        qkv_bias=layout == "diffusers" or "double_blocks.0.img_attn.qkv.bias" in sd or not depth,
        guidance_embed=names["guidance"] in sd,
    )


def transformer_diffusers_to_bfl(sd: Mapping[str, Tensor], params: FluxParams | None = None) -> StateDict:
    """diffusers `FluxTransformer2DModel` state dict -> BFL keys; sizes are read from the keys unless given."""
    sizes = params or _flux_sizes(sd, "diffusers")
    rules = _transformer_rules(sizes)
    check_state_dict(sd, _diffusers_shapes(rules, expected_bfl_shapes(sizes)), "diffusers transformer state dict")
    out = {}
    for rule in rules:
        tensor = torch.cat([sd[name] for name in rule.diffusers]) if rule.split else sd[rule.diffusers[0]]
        out[rule.bfl] = _swap_halves(tensor) if rule.swap_halves else tensor
    return out


def transformer_bfl_to_diffusers(sd: Mapping[str, Tensor], params: FluxParams | None = None) -> StateDict:
    """BFL transformer state dict -> diffusers keys. Split pieces are views of the fused BFL tensors."""
    sizes = params or _flux_sizes(sd, "bfl")
    check_state_dict(sd, expected_bfl_shapes(sizes), "BFL transformer state dict")
    out = {}
    for rule in _transformer_rules(sizes):
        tensor = _swap_halves(sd[rule.bfl]) if rule.swap_halves else sd[rule.bfl]
        out.update(zip(rule.diffusers, tensor.split(rule.split) if rule.split else (tensor,), strict=True))
    return out


def _swap_halves(t: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat((second, first))


def detect_variant(sd: Mapping[str, Tensor]) -> str:
    """'dev', 'schnell', 'fill' or 'control' from the keys (the rule diffusers' single-file loader uses, spec §2.1)."""
    names = _SIZE_KEYS[detect_layout(sd)]
    if names["guidance"] not in sd:
        return "schnell"
    in_channels = _shape(sd, names["img_in"], "image input projection")[1]
    return {384: "fill", 128: "control"}.get(in_channels, "dev")


def flux_params_from_state_dict(sd: Mapping[str, Tensor], axes_dim: tuple[int, ...] | None = None) -> FluxParams:
    """FluxParams with every size read from the tensor shapes (BFL or diffusers keys).

    The RoPE split of the head dimension leaves no trace in the weights: FLUX.1's (16, 56, 56) is assumed for
    head_dim 128, any other head_dim needs an explicit `axes_dim`.
    """
    s = _flux_sizes(sd, detect_layout(sd))
    if s.hidden_size % s.head_dim:
        raise ValueError(f"hidden size {s.hidden_size} is not a multiple of the q/k norm width {s.head_dim}")
    if axes_dim is None:
        if s.head_dim != sum(FLUX_AXES_DIM):
            raise ValueError(f"the RoPE axes_dim cannot be read from the weights for head_dim {s.head_dim}; "
                             f"pass axes_dim explicitly (FLUX.1's {FLUX_AXES_DIM} needs head_dim 128)")
        axes_dim = FLUX_AXES_DIM
    mlp_ratio = s.mlp_hidden_dim / s.hidden_size
    if int(s.hidden_size * mlp_ratio) != s.mlp_hidden_dim:
        raise ValueError(f"MLP width {s.mlp_hidden_dim} is not expressible as hidden size {s.hidden_size} x a ratio")
    return FluxParams(
        in_channels=s.in_channels, out_channels=s.out_channels, vec_in_dim=s.vec_in_dim,
        context_in_dim=s.context_in_dim, hidden_size=s.hidden_size, mlp_ratio=mlp_ratio,
        num_heads=s.hidden_size // s.head_dim, depth=s.depth, depth_single_blocks=s.depth_single_blocks,
        axes_dim=tuple(axes_dim), qkv_bias=s.qkv_bias, guidance_embed=s.guidance_embed,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Autoencoder


class _AESizes(NamedTuple):
    """The sizes that fix the autoencoder's keys and shapes; names match AutoEncoderParams (duck-typed)."""

    in_channels: int
    out_ch: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int


class _AEEntry(NamedTuple):
    diffusers: str
    shape: tuple[int, ...]  # BFL shape
    linear: bool = False  # a 1x1 conv in BFL, an nn.Linear in diffusers: drop the trailing (1, 1)


def _ae_table(p: AutoEncoderParams | _AESizes) -> dict[str, _AEEntry]:
    """BFL key -> (diffusers key, BFL shape) for the whole autoencoder (spec §3.2)."""
    table = {}

    def conv(bfl: str, dif: str, n_in: int, n_out: int, k: int = 3, linear: bool = False) -> None:
        table[f"{bfl}.weight"] = _AEEntry(f"{dif}.weight", (n_out, n_in, k, k), linear)
        table[f"{bfl}.bias"] = _AEEntry(f"{dif}.bias", (n_out,))

    def norm(bfl: str, dif: str, channels: int) -> None:
        for suffix in ("weight", "bias"):
            table[f"{bfl}.{suffix}"] = _AEEntry(f"{dif}.{suffix}", (channels,))

    def resnet(bfl: str, dif: str, n_in: int, n_out: int) -> None:
        norm(f"{bfl}.norm1", f"{dif}.norm1", n_in)
        conv(f"{bfl}.conv1", f"{dif}.conv1", n_in, n_out)
        norm(f"{bfl}.norm2", f"{dif}.norm2", n_out)
        conv(f"{bfl}.conv2", f"{dif}.conv2", n_out, n_out)
        if n_in != n_out:
            conv(f"{bfl}.nin_shortcut", f"{dif}.conv_shortcut", n_in, n_out, k=1)

    def mid(bfl: str, dif: str, c: int) -> None:
        resnet(f"{bfl}.block_1", f"{dif}.resnets.0", c, c)
        norm(f"{bfl}.attn_1.norm", f"{dif}.attentions.0.group_norm", c)
        for b, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            conv(f"{bfl}.attn_1.{b}", f"{dif}.attentions.0.{d}", c, c, k=1, linear=True)
        resnet(f"{bfl}.block_2", f"{dif}.resnets.1", c, c)

    widths, levels = [p.ch * m for m in p.ch_mult], len(p.ch_mult)
    conv("encoder.conv_in", "encoder.conv_in", p.in_channels, p.ch)
    n_in = p.ch
    for i, width in enumerate(widths):
        for j in range(p.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", n_in, width)
            n_in = width
        if i < levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", width, width)
    mid("encoder.mid", "encoder.mid_block", widths[-1])
    norm("encoder.norm_out", "encoder.conv_norm_out", widths[-1])
    conv("encoder.conv_out", "encoder.conv_out", widths[-1], 2 * p.z_channels)  # mean and logvar

    conv("decoder.conv_in", "decoder.conv_in", p.z_channels, widths[-1])
    mid("decoder.mid", "decoder.mid_block", widths[-1])
    n_in = widths[-1]
    for i in reversed(range(levels)):  # BFL numbers decoder levels finest-first, diffusers in execution order
        up = f"decoder.up_blocks.{levels - 1 - i}"
        for j in range(p.num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", f"{up}.resnets.{j}", n_in, widths[i])
            n_in = widths[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", f"{up}.upsamplers.0.conv", widths[i], widths[i])
    norm("decoder.norm_out", "decoder.conv_norm_out", widths[0])
    conv("decoder.conv_out", "decoder.conv_out", widths[0], p.out_ch)
    return table


def expected_ae_shapes(params: AutoEncoderParams | _AESizes) -> Shapes:
    """Every BFL autoencoder key and its shape: 244 tensors for FLUX.1's `ae.safetensors`."""
    return {key: entry.shape for key, entry in _ae_table(params).items()}


def _ae_sizes(sd: Mapping[str, Tensor], layout: str) -> _AESizes:
    bfl = layout == "bfl"
    ch, in_channels = _shape(sd, "encoder.conv_in.weight", "encoder input conv")[:2]
    levels = _count(sd, "encoder.down." if bfl else "encoder.down_blocks.")
    first_block = "encoder.down.{}.block.0" if bfl else "encoder.down_blocks.{}.resnets.0"
    widths = [_shape(sd, f"{first_block.format(i)}.conv1.weight", f"encoder level {i}")[0] for i in range(levels)]
    if not widths or any(w % ch for w in widths):
        raise ValueError(f"encoder level widths {widths} are not multiples of the input conv width {ch}")
    return _AESizes(
        in_channels=in_channels,
        out_ch=_shape(sd, "decoder.conv_out.weight", "decoder output conv")[0],
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=_count(sd, "encoder.down.0.block." if bfl else "encoder.down_blocks.0.resnets."),
        z_channels=_shape(sd, "decoder.conv_in.weight", "decoder input conv")[1],
    )


def vae_diffusers_to_bfl(sd: Mapping[str, Tensor]) -> StateDict:
    """diffusers `AutoencoderKL` (FLUX layout: no quant convs) state dict -> BFL `ae.safetensors` keys."""
    table = _ae_table(_ae_sizes(sd, "diffusers"))
    expected = {e.diffusers: e.shape[:2] if e.linear else e.shape for e in table.values()}
    check_state_dict(sd, expected, "diffusers autoencoder state dict")
    return {key: sd[e.diffusers][:, :, None, None] if e.linear else sd[e.diffusers] for key, e in table.items()}


def vae_bfl_to_diffusers(sd: Mapping[str, Tensor]) -> StateDict:
    """BFL `ae.safetensors` state dict -> diffusers `AutoencoderKL` keys."""
    sizes = _ae_sizes(sd, "bfl")
    if sizes.ch_mult[0] != 1:  # diffusers' first level starts at the conv_in width
        raise ValueError(f"the diffusers layout needs ch_mult[0] == 1, got ch_mult {sizes.ch_mult}")
    table = _ae_table(sizes)
    check_state_dict(sd, {key: e.shape for key, e in table.items()}, "BFL autoencoder state dict")
    return {e.diffusers: sd[key].flatten(1) if e.linear else sd[key] for key, e in table.items()}


def ae_params_from_state_dict(
    sd: Mapping[str, Tensor],
    norm_groups: int = AutoEncoderParams.norm_groups,
    scale_factor: float = AutoEncoderParams.scale_factor,
    shift_factor: float = AutoEncoderParams.shift_factor,
) -> AutoEncoderParams:
    """AutoEncoderParams read from the shapes (BFL or diffusers keys). GroupNorm's group count and the latent
    scale/shift leave no trace in the weights, so they are arguments (defaults: FLUX.1's)."""
    s = _ae_sizes(sd, detect_layout(sd))
    return AutoEncoderParams(
        in_channels=s.in_channels, ch=s.ch, out_ch=s.out_ch, ch_mult=s.ch_mult, num_res_blocks=s.num_res_blocks,
        z_channels=s.z_channels, scale_factor=scale_factor, shift_factor=shift_factor, norm_groups=norm_groups,
    )
