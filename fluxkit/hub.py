"""Where models come from: the built-in tiny family, fluxkit folders, diffusers folders and Hugging Face repo ids.

A fluxkit folder is `fluxkit.json` (the ModelSpec) + BFL-named safetensors for the transformer and the autoencoder:

    fluxkit.json              {"format": "fluxkit", "spec": {...}, "transformer": "...", "ae": "..."}
    transformer.safetensors   BFL keys (img_in, double_blocks.N..., final_layer...)
    ae.safetensors            BFL autoencoder keys (may be shared between models: a relative path)

The transformer may also be stored quantized (int8/fp8 safetensors or GGUF, `quantize_native`): kept quantized on
load, or expanded to full precision when fluxkit.json says `"dequantize": true` (quantized only to ship it small).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from .atomic import atomic_save_safetensors, atomic_write_text
from .devices import parse_dtype
from .params import AutoEncoderParams, FluxParams, ModelSpec

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
BUILTIN = {
    "fluxkit-tiny-schnell": "tiny-schnell",
    "fluxkit-tiny-dev": "tiny-dev",
    # The FLUX.1 tools variants, each tiny-dev plus a LoRA (as BFL's FLUX.1-Canny-dev-lora on FLUX.1-dev).
    "fluxkit-tiny-fill": "tiny-fill",
    "fluxkit-tiny-canny": "tiny-canny",
    "fluxkit-tiny-kontext": "tiny-kontext",
    "fluxkit-tiny-regional": "tiny-regional",  # regional prompts (fluxkit.regional), trained with the masks
}
DEFAULT_MODEL = "fluxkit-tiny-schnell"
DIFFUSERS_PATTERNS = [
    "model_index.json",
    "transformer/*",
    "vae/*",
    "text_encoder/*",
    "text_encoder_2/*",
    "tokenizer/*",
    "tokenizer_2/*",
    "scheduler/*",
]


def spec_to_dict(spec: ModelSpec) -> dict:
    return dataclasses.asdict(spec)


def spec_from_dict(d: dict) -> ModelSpec:
    flux = FluxParams(**{**d["flux"], "axes_dim": tuple(d["flux"]["axes_dim"])})
    ae = AutoEncoderParams(**{**d["ae"], "ch_mult": tuple(d["ae"]["ch_mult"])})
    rest = {k: v for k, v in d.items() if k not in ("flux", "ae")}
    rest["default_size"] = tuple(rest.get("default_size", (1024, 1024)))
    return ModelSpec(flux=flux, ae=ae, **rest)


def builtin_folder(name: str) -> Path | None:
    key = BUILTIN.get(name) or (name if name in BUILTIN.values() else None)
    return WEIGHTS_DIR / key if key else None


def available_builtins() -> list[str]:
    return [name for name, key in BUILTIN.items() if (WEIGHTS_DIR / key / "fluxkit.json").is_file()]


def load_pipeline(
    cls,
    name_or_path,
    *,
    torch_dtype=None,
    device=None,
    transformer=None,
    vae=None,
    text_encoder=None,
    quantize: str | None = None,
):
    """Build a pipeline from any supported source. `transformer` may be a module or a single-file path that stands
    in for the source's own transformer (the base then supplies text encoders, autoencoder and scheduler)."""
    from .devices import default_dtype

    device = torch.device(device or "cpu")
    dtype = parse_dtype(torch_dtype) or default_dtype(device)
    folder = _locate(name_or_path)
    if (folder / "fluxkit.json").is_file():
        parts = _load_native(folder, dtype, transformer, vae, text_encoder)
    elif (folder / "model_index.json").is_file():
        parts = _load_diffusers(folder, dtype, transformer, vae, text_encoder)
    else:
        raise ValueError(
            f"{folder} is neither a fluxkit folder (fluxkit.json) nor a diffusers folder (model_index.json)"
        )
    model, ae, enc, spec, sched, lora = parts
    if quantize is not None:
        from .quant import quantize_model

        quantize_model(model, quantize)
    pipe = cls(model, ae, enc, spec, sched)
    if lora is not None:  # a LoRA variant folder: the base transformer with the variant's adapter active
        pipe.load_lora_weights(lora, adapter_name=spec.name)
    return pipe.to(device=device, dtype=None)


def _locate(name_or_path) -> Path:
    name = str(name_or_path)
    builtin = builtin_folder(name)
    if builtin is not None:
        if not (builtin / "fluxkit.json").is_file():
            raise ValueError(f"built-in model {name!r} is not in this install ({builtin} is missing)")
        return builtin
    path = Path(name).expanduser()
    if path.is_file():
        raise ValueError(
            f"{path} is a single file; load it as the transformer of a base model: "
            f"FluxPipeline.from_pretrained(BASE, transformer={str(path)!r})"
        )
    if path.is_dir():
        return path
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        raise ValueError(
            f"model {name!r} not found: not a built-in ({', '.join(BUILTIN)}), not a local folder, "
            "and not a Hugging Face repo id of the form org/name"
        )
    from .loading import resolve_model_source

    return resolve_model_source(name, allow_patterns=DIFFUSERS_PATTERNS)


def _transformer_override(transformer, base_params: FluxParams | None, dtype):
    """A module, or a single file: BFL/diffusers safetensors, int8/fp8 (ComfyUI "scaled fp8" too) or GGUF.

    The file's sizes are read from its tensors (it may be another variant than the base, e.g. Fill on a dev base);
    the base only supplies the RoPE axes, which tensors cannot reveal for non-FLUX.1 head sizes.
    """
    from .quant import load_quantized_transformer

    if isinstance(transformer, torch.nn.Module):
        return transformer.to(dtype=dtype)
    axes = base_params.axes_dim if base_params is not None else None
    return load_quantized_transformer(transformer, dtype=dtype, axes_dim=axes)


def _load_native(folder: Path, dtype, transformer, vae, text_encoder):
    """A fluxkit folder: fluxkit.json names the transformer and autoencoder files (paths relative to the folder, so
    models can share them) and optionally a `lora` file: the folder is then a variant made of the transformer plus
    that adapter (which may widen img_in, as BFL's control LoRAs do)."""
    from .loading import load_autoencoder

    meta = json.loads((folder / "fluxkit.json").read_text())
    if meta.get("format") != "fluxkit":
        raise ValueError(f"{folder / 'fluxkit.json'} is not a fluxkit model description")
    spec = spec_from_dict(meta["spec"])
    if transformer is not None:
        model = _transformer_override(transformer, spec.flux, dtype)
    else:
        model = _native_transformer(folder, meta, spec.flux, dtype)
    if vae is None:
        vae = load_autoencoder(folder / meta["ae"], params=spec.ae, dtype=dtype)
    enc = text_encoder or _text_encoder(spec.text_encoder, folder, dtype)
    lora = folder / meta["lora"] if meta.get("lora") else None
    if lora is not None and not lora.is_file():
        raise ValueError(f"{folder / 'fluxkit.json'} names the LoRA {lora}, which does not exist")
    from .pipeline import SchedulerConfig

    return model, vae, enc, spec, SchedulerConfig(use_dynamic_shifting=spec.shift_schedule), lora


def _native_transformer(folder: Path, meta: dict, params: FluxParams, dtype):
    """fluxkit.json's transformer: a BFL file, or a quantized one (int8/fp8 safetensors, GGUF) kept quantized, or,
    with `"dequantize": true`, expanded to full precision on load (quantized only to ship it small)."""
    from .quant import dequantize_model, load_quantized_transformer, quantized_layers

    path = folder / meta["transformer"]
    if not path.is_file():
        raise ValueError(f"{folder / 'fluxkit.json'} names the transformer {path}, which does not exist")
    model = load_quantized_transformer(path, params=params, dtype=dtype)
    expand = meta.get("dequantize", False)
    if not isinstance(expand, bool):
        raise ValueError(f"{folder / 'fluxkit.json'}: 'dequantize' must be true or false, got {expand!r}")
    if expand and quantized_layers(model):
        dequantize_model(model, dtype)
    return model


def _text_encoder(kind: str, folder: Path, dtype):
    from .text import MiniLMEncoder, T5ClipEncoder

    if kind == "minilm":
        return MiniLMEncoder.from_package(dtype=dtype)
    if kind == "t5-clip":
        return T5ClipEncoder.from_folder(folder, dtype=dtype)
    raise ValueError(f"unknown text encoder {kind!r} in {folder}")


def _load_diffusers(folder: Path, dtype, transformer, vae, text_encoder):
    from .loading import load_autoencoder, load_flux_transformer
    from .pipeline import SchedulerConfig

    if transformer is not None:
        from .loading import flux_params_from_diffusers_config

        config = folder / "transformer" / "config.json"
        base = flux_params_from_diffusers_config(json.loads(config.read_text())) if config.is_file() else None
        model = _transformer_override(transformer, base, dtype)
    else:
        model = load_flux_transformer(folder / "transformer", dtype=dtype)
    ae = vae if vae is not None else load_autoencoder(folder / "vae", dtype=dtype)
    enc = text_encoder or _text_encoder("t5-clip", folder, dtype)
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched = (
        SchedulerConfig.from_diffusers(json.loads(sched_file.read_text()))
        if sched_file.is_file()
        else SchedulerConfig(use_dynamic_shifting=model.params.guidance_embed)
    )
    schnell_like = not sched.use_dynamic_shifting
    spec = ModelSpec(
        name=folder.name,
        flux=model.params,
        ae=ae.params,
        text_encoder="t5-clip",
        max_sequence_length=512,
        shift_schedule=sched.use_dynamic_shifting,
        default_steps=4 if schnell_like else 28,
        default_guidance=0.0 if schnell_like else 3.5,
    )
    return model, ae, enc, spec, sched, None


def save_native(
    folder: Path,
    transformer: torch.nn.Module,
    spec: ModelSpec,
    ae: torch.nn.Module | None = None,
    ae_path: str = "ae.safetensors",
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Write a fluxkit folder; `ae=None` with a relative `ae_path` refers to an shared autoencoder."""
    def write(path: Path, sd: dict) -> None:
        atomic_save_safetensors(path, {k: v.detach().to(dtype).contiguous().cpu() for k, v in sd.items()})

    write(folder / "transformer.safetensors", transformer.state_dict())
    if ae is not None:
        write(folder / ae_path, ae.state_dict())
    meta = {"format": "fluxkit", "spec": spec_to_dict(spec), "transformer": "transformer.safetensors", "ae": ae_path}
    atomic_write_text(folder / "fluxkit.json", json.dumps(meta, indent=2))


def quantize_native(src: str | Path, dst: str | Path, kind: str) -> Path:
    """A fluxkit folder -> one whose transformer is stored quantized (`kind`: int8, fp8 or a GGUF type such as
    q8_0) and expanded to full precision on load (`"dequantize": true`): the same model in about half the bytes of
    bf16, for shipping. The autoencoder is referenced, not copied; `dst` may be `src` (the old transformer file is
    then left for the caller to delete). Returns the new transformer file."""
    import os

    from .gguf import BLOCK_QTYPES
    from .quant import (
        KINDS,
        convert_to_gguf,
        load_quantized_transformer,
        quantize_model,
        quantized_layers,
        save_quantized,
    )

    src, dst = Path(src), Path(dst)
    meta_file = src / "fluxkit.json"
    if not meta_file.is_file():
        raise ValueError(f"{src} is not a fluxkit folder (no fluxkit.json)")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    meta = json.loads(meta_file.read_text())
    if meta.get("lora"):
        raise ValueError(f"{src} is a LoRA variant of another folder's transformer; quantize that folder instead")
    spec = spec_from_dict(meta["spec"])
    old = src / meta["transformer"]
    model = load_quantized_transformer(old, params=spec.flux, dtype=None)  # None: tensors keep the stored dtype
    if quantized_layers(model):
        raise ValueError(f"{old} is already quantized; start from a full-precision folder")
    dst.mkdir(parents=True, exist_ok=True)
    if kind in BLOCK_QTYPES:
        out = convert_to_gguf(model, dst / f"transformer-{kind}.gguf", kind)
    else:
        out = save_quantized(quantize_model(model, kind), dst / f"transformer-{kind}.safetensors")
    ae = os.path.relpath((src / meta["ae"]).resolve(), dst.resolve())
    meta = {**meta, "transformer": out.name, "dequantize": True, "ae": ae}
    atomic_write_text(dst / "fluxkit.json", json.dumps(meta, indent=2))
    return out
