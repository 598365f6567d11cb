"""Checkpoint I/O: find a model, read its safetensors, build the network on the meta device and load it strictly.

Sources: a BFL single file (`flux1-dev.safetensors`, `ae.safetensors`, with or without a ComfyUI key prefix), a
diffusers component folder (`transformer/`, `vae/`: config.json + one or sharded safetensors), an in-memory state
dict, or a Hugging Face repo id resolved through the local cache first. Pickle checkpoints are never opened.
Key translation lives in `convert.py`; this module only moves bytes and checks that they fit.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .atomic import atomic_save_safetensors, atomic_write_text
from .autoencoder import AutoEncoder
from .convert import (
    FLUX_AXES_DIM,
    StateDict,
    ae_params_from_state_dict,
    check_state_dict,
    detect_layout,
    detect_network,
    expected_ae_shapes,
    expected_bfl_shapes,
    flux_params_from_state_dict,
    strip_prefix,
    transformer_bfl_to_diffusers,
    transformer_diffusers_to_bfl,
    vae_bfl_to_diffusers,
    vae_diffusers_to_bfl,
)
from .model import Flux
from .params import AutoEncoderParams, FluxParams

Source = str | os.PathLike | Mapping[str, Tensor]
_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # what diffusers' from_pretrained looks for
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save zip archive, raw pickle protocol 2+


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose tensors do not fit the network it is loaded into."""


class ModelNotFoundError(FileNotFoundError):
    """Neither a local path nor a Hugging Face repo that is cached (or could be downloaded)."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> StateDict:
    """All tensors of a `.safetensors` file, or of the shards a `*.safetensors.index.json` lists, on `device`."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        return _load_sharded(path, device)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:  # memory-mapped; validates the header
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except SafetensorError as err:
        with path.open("rb") as f:
            hint = " (it looks like a pickle/torch.save file: those are not loaded)" if f.read(4).startswith(
                _PICKLE_MAGIC) else ""
        raise CheckpointError(f"{path}: not a readable safetensors file: {err}{hint}") from None


def _load_sharded(index_path: Path, device: str | torch.device) -> StateDict:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path}: not a shard index with a 'weight_map' ({err!r})") from None
    sd: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:  # shards sit next to the index; refuse paths that climb elsewhere
            raise CheckpointError(f"{index_path}: shard name {shard!r} is not a plain file name")
        part = load_safetensors(index_path.parent / shard, device)
        listed = {key for key, name in weight_map.items() if name == shard}
        if part.keys() != listed:
            stray = sorted(part.keys() ^ listed)
            raise CheckpointError(f"{index_path.parent / shard}: {len(stray)} keys differ from the index: {stray[:10]}")
        sd.update(part)
    return sd


def _weights_in(folder: Path) -> Path:
    candidates = sorted(folder.glob("*.safetensors.index.json")) or sorted(folder.glob("*.safetensors"))
    if len(candidates) != 1:
        found = [c.name for c in candidates] or [f"none ({len(list(folder.glob('*.bin')))} pickle .bin files ignored)"]
        raise CheckpointError(f"{folder}: expected one *.safetensors file or one shard index, found {found}")
    return candidates[0]


def _read_source(source: Source, device: str | torch.device) -> tuple[StateDict, dict | None, str]:
    """(state dict without any ComfyUI prefix, the diffusers config.json if there is one, a name for messages)."""
    if isinstance(source, Mapping):
        return strip_prefix({k: v.to(device) for k, v in source.items()}), None, "state dict"
    path = Path(source)
    if not path.is_dir():
        return strip_prefix(load_safetensors(path, device)), None, str(path)
    if (path / "model_index.json").is_file():
        raise CheckpointError(f"{path} is a whole diffusers pipeline; pass its transformer/ or vae/ folder")
    config_path = path / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    return strip_prefix(load_safetensors(_weights_in(path), device)), config, str(path)


# ---------------------------------------------------------------------------------------------------------------------
# diffusers config.json <-> params (defaults are the diffusers constructors' defaults, as from_pretrained applies them)


def _expect_class(config: Mapping, name: str) -> None:
    if config.get("_class_name", name) != name:
        raise ValueError(f"config.json describes a {config['_class_name']}, expected a {name}")


def flux_params_from_diffusers_config(config: Mapping) -> FluxParams:
    _expect_class(config, "FluxTransformer2DModel")
    if config.get("patch_size", 1) != 1:
        raise ValueError(f"patch_size {config['patch_size']} is not supported (FLUX packs 2x2 patches outside)")
    heads, head_dim = config.get("num_attention_heads", 24), config.get("attention_head_dim", 128)
    in_channels = config.get("in_channels", 64)
    return FluxParams(
        in_channels=in_channels, out_channels=config.get("out_channels") or in_channels,
        vec_in_dim=config.get("pooled_projection_dim", 768), context_in_dim=config.get("joint_attention_dim", 4096),
        hidden_size=heads * head_dim, num_heads=heads, depth=config.get("num_layers", 19),
        depth_single_blocks=config.get("num_single_layers", 38),
        axes_dim=tuple(config.get("axes_dims_rope", FLUX_AXES_DIM)),
        guidance_embed=config.get("guidance_embeds", False),
    )


def diffusers_config_from_flux_params(params: FluxParams) -> dict:
    if (params.mlp_ratio, params.theta, params.qkv_bias) != (4.0, 10_000, True):
        raise ValueError("diffusers' FluxTransformer2DModel fixes mlp_ratio 4, theta 10000 and qkv biases; got "
                         f"{params.mlp_ratio}, {params.theta}, {params.qkv_bias}")
    return {
        "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": params.in_channels,
        "out_channels": params.out_channels, "num_layers": params.depth,
        "num_single_layers": params.depth_single_blocks,
        "attention_head_dim": params.head_dim, "num_attention_heads": params.num_heads,
        "joint_attention_dim": params.context_in_dim, "pooled_projection_dim": params.vec_in_dim,
        "guidance_embeds": params.guidance_embed, "axes_dims_rope": list(params.axes_dim),
    }


def ae_params_from_diffusers_config(config: Mapping) -> AutoEncoderParams:
    _expect_class(config, "AutoencoderKL")
    blocks = list(config.get("block_out_channels", [64]))
    unsupported = {
        "quant convs": config.get("use_quant_conv", True) or config.get("use_post_quant_conv", True),
        "no mid-block attention": not config.get("mid_block_add_attention", True),
        "per-channel latent statistics": config.get("latents_mean") is not None,
        f"activation {config.get('act_fn')}": config.get("act_fn", "silu") != "silu",
        f"block widths {blocks}": any(b % blocks[0] for b in blocks),
    }
    if any(unsupported.values()):
        raise ValueError(f"not a FLUX-layout AutoencoderKL: {', '.join(k for k, v in unsupported.items() if v)}")
    return AutoEncoderParams(
        in_channels=config.get("in_channels", 3), out_ch=config.get("out_channels", 3), ch=blocks[0],
        ch_mult=tuple(b // blocks[0] for b in blocks), num_res_blocks=config.get("layers_per_block", 1),
        z_channels=config.get("latent_channels", 4), norm_groups=config.get("norm_num_groups", 32),
        scale_factor=config.get("scaling_factor", 0.18215),
        shift_factor=config.get("shift_factor") or 0.0,  # diffusers' None means no shift
    )


def diffusers_config_from_ae_params(params: AutoEncoderParams) -> dict:
    levels = len(params.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "in_channels": params.in_channels, "out_channels": params.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [params.ch * m for m in params.ch_mult], "layers_per_block": params.num_res_blocks,
        "act_fn": "silu", "latent_channels": params.z_channels, "norm_num_groups": params.norm_groups,
        "sample_size": params.resolution, "scaling_factor": params.scale_factor, "shift_factor": params.shift_factor,
        "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True, "force_upcast": True,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Loading into fluxkit networks


def _build_and_load(cls: type[nn.Module], params: object, sd: StateDict, dtype: torch.dtype | None) -> nn.Module:
    with torch.device("meta"):  # no memory and no init work for weights that are about to be replaced
        model = cls(params)
    model.load_state_dict(sd, strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer has no checkpoint entry: the module must rebuild it after loading
        raise RuntimeError(f"{cls.__name__} still holds meta tensors after loading: {left[:10]}")
    return (model if dtype is None else model.to(dtype)).eval()


def _flux_from(sd: StateDict, config: dict | None, params: FluxParams | None, dtype, name: str,
               axes_dim: tuple[int, ...] | None = None) -> Flux:
    try:
        if detect_network(sd) != "transformer":
            raise ValueError("it holds an autoencoder, not a transformer")
        if params is None:
            params = flux_params_from_diffusers_config(config) if config else flux_params_from_state_dict(sd, axes_dim)
        if detect_layout(sd) == "diffusers":
            sd = transformer_diffusers_to_bfl(sd, params)
        check_state_dict(sd, expected_bfl_shapes(params), "transformer checkpoint")
    except ValueError as err:  # every way a checkpoint can fail to fit, named with its source
        raise CheckpointError(f"{name}: {err}") from None
    return _build_and_load(Flux, params, sd, dtype)


def _autoencoder_from(sd: StateDict, config: dict | None, params: AutoEncoderParams | None, dtype,
                      name: str) -> AutoEncoder:
    try:
        if detect_network(sd) != "autoencoder":
            raise ValueError("it holds a transformer, not an autoencoder")
        if params is None:
            params = ae_params_from_diffusers_config(config) if config else ae_params_from_state_dict(sd)
        if detect_layout(sd) == "diffusers":
            sd = vae_diffusers_to_bfl(sd)
        check_state_dict(sd, expected_ae_shapes(params), "autoencoder checkpoint")
    except ValueError as err:
        raise CheckpointError(f"{name}: {err}") from None
    return _build_and_load(AutoEncoder, params, sd, dtype)


def load_flux_transformer(source: Source, params: FluxParams | None = None, dtype: torch.dtype | None = None,
                          device: str | torch.device = "cpu", axes_dim: tuple[int, ...] | None = None) -> Flux:
    """A BFL single file, a diffusers `transformer/` folder or a state dict -> Flux in eval mode.

    Params: `params` if given, else the folder's config.json, else read from the tensor shapes. Every key and shape
    is checked before loading (CheckpointError lists the differences); dtype=None keeps the checkpoint's dtype.
    `axes_dim` helps the shape inference for head sizes other than FLUX.1's 128 (e.g. from a base model's config).
    """
    sd, config, name = _read_source(source, device)
    return _flux_from(sd, config, params, dtype, name, axes_dim)


def load_autoencoder(source: Source, params: AutoEncoderParams | None = None, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> AutoEncoder:
    """`ae.safetensors`, a diffusers `vae/` folder (its config supplies scaling/shift factors) or a state dict."""
    sd, config, name = _read_source(source, device)
    return _autoencoder_from(sd, config, params, dtype, name)


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face repos


def resolve_model_source(name_or_path: str | os.PathLike, allow_download: bool = True,
                         allow_patterns: list[str] | None = None) -> Path:
    """A local file/folder as is; otherwise a Hugging Face repo id, taken from the local cache before the network."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    repo_id = str(name_or_path)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelNotFoundError(f"{repo_id!r} is neither an existing file or folder "
                                 "nor a Hugging Face repo id") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass  # not cached (or cached incompletely)
    if constants.HF_HUB_OFFLINE or not allow_download:
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "downloads were not allowed"
    else:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
        except LocalEntryNotFoundError as err:  # snapshot_download's way of saying the Hub was unreachable
            reason = f"the Hub could not be reached ({err.__cause__ or err})"
        except RepositoryNotFoundError as err:  # includes gated repos such as FLUX.1-dev without an accepted licence
            raise ModelNotFoundError(f"{repo_id!r}: no such repo on the Hub, or no access (gated repos need their "
                                     f"licence accepted and `hf auth login`): {err}") from None
    raise ModelNotFoundError(
        f"{repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}. "
        f"Download it on a machine with network access (`hf download {repo_id}`, older clients: "
        f"`huggingface-cli download {repo_id}`) and copy the cache over or point HF_HOME at it, "
        "or pass a local folder or single .safetensors files instead."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _save_safetensors(sd: Mapping[str, Tensor], path: Path) -> None:
    tensors = {k: v.detach().contiguous() for k, v in sd.items()}
    atomic_save_safetensors(path, tensors, {"format": "pt"})


def _state_dict(model_or_sd: nn.Module | Mapping[str, Tensor]) -> StateDict:
    return model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else dict(model_or_sd)


def save_bfl(model_or_sd: nn.Module | Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """A Flux/AutoEncoder (or its BFL state dict) -> one BFL-layout safetensors file."""
    sd = _state_dict(model_or_sd)
    if detect_layout(sd) != "bfl":
        raise ValueError("save_bfl needs BFL keys; convert diffusers state dicts with fluxkit.convert first")
    _save_safetensors(sd, Path(path))
    return Path(path)


def _save_diffusers(sd: StateDict, config: dict, folder: Path) -> Path:
    _save_safetensors(sd, folder / _WEIGHTS_NAME)
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return folder


def save_diffusers_transformer(model: Flux, folder: str | os.PathLike) -> Path:
    """Flux -> a diffusers `transformer/` folder (config.json + diffusion_pytorch_model.safetensors)."""
    if model.params.centered_ids:
        raise ValueError("this model was trained with centred image position ids (FluxParams.centered_ids), which "
                         "diffusers' FluxTransformer2DModel cannot express: keep it in fluxkit's own format")
    config = diffusers_config_from_flux_params(model.params)
    return _save_diffusers(transformer_bfl_to_diffusers(model.state_dict(), model.params), config, Path(folder))


def save_diffusers_autoencoder(model: AutoEncoder, folder: str | os.PathLike) -> Path:
    """AutoEncoder -> a diffusers `vae/` folder."""
    config = diffusers_config_from_ae_params(model.params)
    return _save_diffusers(vae_bfl_to_diffusers(model.state_dict()), config, Path(folder))


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str,
                       axes_dim: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Rewrite a transformer or autoencoder checkpoint in the other layout (`to`: 'bfl' file or 'diffusers' folder).

    The tensors pass through the fluxkit network (strictly loaded), so a converted file is known to load.
    `axes_dim` is only needed for a transformer whose head_dim is not 128 and that has no config.json.
    """
    if to not in ("bfl", "diffusers"):
        raise ValueError(f"to must be 'bfl' or 'diffusers', got {to!r}")
    sd, config, name = _read_source(src, "cpu")
    if detect_network(sd) == "transformer":
        params = None if config or axes_dim is None else flux_params_from_state_dict(sd, axes_dim)
        model = _flux_from(sd, config, params, dtype, name)
        save = save_diffusers_transformer
    else:
        model = _autoencoder_from(sd, config, None, dtype, name)
        save = save_diffusers_autoencoder
    return save_bfl(model, dst) if to == "bfl" else save(model, dst)


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fluxkit convert SRC DST --to {bfl,diffusers}`; sets `run` (cli.py's convention)."""
    parser.add_argument("src", help="BFL .safetensors file, diffusers transformer/ or vae/ folder, or a fluxkit "
                                    "folder (to a quantized fluxkit folder, expanded on load)")
    parser.add_argument("dst", help="output .safetensors file (--to bfl) or folder (--to diffusers)")
    parser.add_argument("--to", required=True, choices=("bfl", "diffusers", "gguf", "int8", "fp8"),
                        help="bfl file, diffusers folder, GGUF file (--type), or int8/fp8 quantized safetensors")
    parser.add_argument("--type", default="q8_0", help="GGUF tensor type for --to gguf: q8_0, q4_0, q4_k, q6_k, ...")
    parser.add_argument("--axes-dim", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                        help="RoPE axes, e.g. 8,28,28; only for non-FLUX.1 head sizes without a config.json")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="cast the weights (default: keep the checkpoint's dtype)")
    parser.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if (Path(args.src) / "fluxkit.json").is_file():
        from .hub import quantize_native

        if args.to not in ("gguf", "int8", "fp8"):
            raise ValueError(f"{args.src} is a fluxkit folder: it converts to a quantized folder (--to gguf, int8 "
                             f"or fp8), not to {args.to}")
        out = quantize_native(args.src, args.dst, args.type if args.to == "gguf" else args.to)
        print(f"wrote {out} and {Path(args.dst) / 'fluxkit.json'}")
        return 0
    if args.to in ("gguf", "int8", "fp8"):
        from .quant import convert_to_gguf, quantize_model, save_quantized

        params = flux_params_from_state_dict(_read_source(args.src, "cpu")[0], args.axes_dim) if args.axes_dim else None
        if args.to == "gguf":
            out = convert_to_gguf(args.src, args.dst, args.type, params=params)
        else:
            out = save_quantized(quantize_model(load_flux_transformer(args.src, params=params), args.to), args.dst)
        print(f"wrote {out}")
        return 0
    out = convert_checkpoint(args.src, args.dst, args.to, axes_dim=args.axes_dim, dtype=dtype)
    print(f"wrote {out}")
    return 0
