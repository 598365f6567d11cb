"""Argument checking for `FluxPipeline.__call__`, done once at the boundary: a wrong value is a `ValueError` that names
the argument and the value, and no argument is accepted and then ignored."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .conditioning import check_conditioning

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def as_prompt_list(value, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {type(value).__name__}: {value!r}")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


@dataclass
class Request:
    prompts: list[str] | None
    prompts_2: list[str] | None
    negative_prompts: list[str] | None
    negative_prompts_2: list[str] | None
    true_cfg_scale: float
    height: int
    width: int
    num_inference_steps: int
    sigmas: Sequence[float] | None
    guidance_per_step: list[float] | None
    num_images_per_prompt: int
    generator: Any
    latents: Tensor | None
    prompt_embeds: Tensor | None
    pooled_prompt_embeds: Tensor | None
    negative_prompt_embeds: Tensor | None
    negative_pooled_prompt_embeds: Tensor | None
    output_type: str
    return_dict: bool
    max_sequence_length: int | None
    callback_on_step_end: Callable | None
    conditioning: Any

    @property
    def do_true_cfg(self) -> bool:
        return self.true_cfg_scale > 1.0

    @classmethod
    def validate(cls, pipe, a: dict) -> Request:
        """Check the arguments of `FluxPipeline.__call__` (given as its locals) against the loaded model."""
        spec = pipe.spec
        prompts, lists, n_prompts = _check_prompts(a)
        per = _positive_int(a["num_images_per_prompt"], "num_images_per_prompt")
        true_cfg = _number(a["true_cfg_scale"], "true_cfg_scale")
        has_negative = lists["negative_prompt"] is not None or a["negative_prompt_embeds"] is not None
        if has_negative and true_cfg <= 1.0:
            raise ValueError(f"a negative prompt only takes effect with true_cfg_scale > 1 (got {true_cfg})")
        if a["negative_prompt_embeds"] is not None and a["negative_pooled_prompt_embeds"] is None:
            raise ValueError("negative_prompt_embeds needs negative_pooled_prompt_embeds as well")

        height, width = _check_size(pipe, a["height"], a["width"])

        steps = a["num_inference_steps"]
        sigmas = a["sigmas"]
        if sigmas is not None:
            if steps is not None and steps != len(sigmas):
                raise ValueError(f"num_inference_steps={steps} but {len(sigmas)} sigmas were given")
            steps = len(sigmas)
        steps = _positive_int(steps if steps is not None else spec.default_steps, "num_inference_steps")
        guidance = _guidance_schedule(a["guidance_scale"], spec.default_guidance, steps)

        max_len = a["max_sequence_length"]
        if max_len is not None:
            limit = pipe.text_encoder.max_sequence_length
            if _positive_int(max_len, "max_sequence_length") > limit:
                raise ValueError(f"max_sequence_length {max_len} exceeds the text encoder's limit of {limit}")
        if a["output_type"] not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {a['output_type']!r}")
        _check_generator(a["generator"], n_prompts * per)
        if a["joint_attention_kwargs"]:
            unknown = set(a["joint_attention_kwargs"]) - {"scale"}
            if unknown:
                raise ValueError(f"joint_attention_kwargs: unsupported keys {sorted(unknown)} (supported: 'scale')")
            if not hasattr(pipe, "set_lora_scale"):
                raise ValueError("joint_attention_kwargs={'scale': ...} needs LoRA support, which is not loaded")
        cb_inputs = set(a["callback_on_step_end_tensor_inputs"] or ())
        if cb_inputs - {"latents"}:
            raise ValueError(f"callback_on_step_end_tensor_inputs supports only 'latents', got {sorted(cb_inputs)}")
        latents = a["latents"]
        if latents is not None and (not isinstance(latents, Tensor) or latents.ndim != 3):
            raise ValueError("latents must be a packed tensor [B, L, C] (as diffusers' FluxPipeline takes them)")
        check_conditioning(a["conditioning"], pipe)  # the hook's type and the model's input width
        return cls(
            prompts,
            lists["prompt_2"],
            lists["negative_prompt"],
            lists["negative_prompt_2"],
            true_cfg,
            height,
            width,
            steps,
            sigmas,
            guidance,
            per,
            a["generator"],
            latents,
            a["prompt_embeds"],
            a["pooled_prompt_embeds"],
            a["negative_prompt_embeds"],
            a["negative_pooled_prompt_embeds"],
            a["output_type"],
            a["return_dict"],
            max_len,
            a["callback_on_step_end"],
            a["conditioning"],
        )


def _check_prompts(a: dict) -> tuple[list[str] | None, dict[str, list[str] | None], int]:
    """(prompts, the other prompt lists broadcast to one entry per prompt, the number of prompts)."""
    prompts = as_prompt_list(a["prompt"], "prompt")
    if (prompts is None) == (a["prompt_embeds"] is None):
        raise ValueError("pass exactly one of prompt or prompt_embeds")
    if a["prompt_embeds"] is not None and a["pooled_prompt_embeds"] is None:
        raise ValueError("prompt_embeds needs pooled_prompt_embeds as well")
    n_prompts = len(prompts) if prompts is not None else a["prompt_embeds"].shape[0]
    lists = {name: as_prompt_list(a[name], name) for name in ("prompt_2", "negative_prompt", "negative_prompt_2")}
    for name, value in lists.items():
        if value is not None and len(value) != n_prompts:
            if len(value) == 1:
                lists[name] = value * n_prompts
            else:
                raise ValueError(f"{name} has {len(value)} entries but there are {n_prompts} prompts")
    return prompts, lists, n_prompts


def _check_size(pipe, height, width) -> tuple[int, int]:
    """(height, width): the model's default size where None; each a multiple of the packed latent's pixel step."""
    default_h, default_w = pipe.spec.default_size
    height = _positive_int(height if height is not None else default_h, "height")
    width = _positive_int(width if width is not None else default_w, "width")
    multiple = pipe.vae.params.downscale * 2
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            raise ValueError(f"{name} must be a multiple of {multiple}, got {value}")
    return height, width


def _guidance_schedule(value, default: float, steps: int) -> list[float]:
    """A float -> the same value every step; a sequence -> one value per step (a guidance schedule)."""
    if value is None:
        value = default
    if isinstance(value, (list, tuple)):
        if len(value) != steps:
            raise ValueError(f"guidance_scale schedule has {len(value)} values for {steps} steps")
        return [_number(v, "guidance_scale") for v in value]
    return [_number(value, "guidance_scale")] * steps


def _check_generator(generator, n_images: int) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) not in (1, n_images):
            raise ValueError(f"got {len(generator)} generators for {n_images} images")
        return
    raise ValueError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
