"""One validated generation job, built from either API's body: sizes, defaults and the configured limits applied once.

`JobRequest` is what the worker runs and what the job store keeps (as JSON), so a job restored after a crash runs
exactly as accepted: a random seed is drawn here, at acceptance, never later.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import secrets
from dataclasses import asdict, dataclass, fields

from ..sizes import size_for_aspect
from .config import Limits
from .schemas import MAX_SEED, ImageGenerationRequest, PredictionInput

LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class InputError(ValueError):
    """A request the service refuses (HTTP 4xx): `field` names the input, `status` the HTTP code."""

    def __init__(self, message: str, field: str | None = None, status: int = 422):
        super().__init__(message)
        self.field, self.status = field, status


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about a loaded model."""

    name: str
    multiple: int  # width and height must be multiples of this (2 x the autoencoder's downscale)
    default_size: tuple[int, int]  # (height, width)
    default_steps: int
    guidance: bool  # takes a distilled guidance value (dev-like)
    default_guidance: float
    fill: bool  # a Fill model: a mask means Fill, not latent inpainting


@dataclass(frozen=True)
class JobRequest:
    model: str
    prompt: str
    height: int
    width: int
    steps: int
    seeds: tuple[int, ...]  # one image per seed
    guidance: float | None = None
    negative_prompt: str | None = None
    true_cfg: float = 1.0
    lora: str | None = None
    lora_scale: float = 1.0
    go_fast: bool = False
    image: str | None = None  # data URI / base64, kept as sent so a restored job can decode it again
    mask: str | None = None
    strength: float = 0.8
    output_format: str = "png"
    output_quality: int = 95

    @property
    def n(self) -> int:
        return len(self.seeds)

    def batch_key(self) -> tuple:
        """Jobs with equal keys run as one batch: one model, size, schedule and adapter state for all images."""
        if self.image is not None:
            return ("alone", id(self))  # each conditioning hook holds its own image
        return (self.model, self.height, self.width, self.steps, self.guidance, self.true_cfg,
                self.negative_prompt is not None, self.lora, self.lora_scale if self.lora else None, self.go_fast)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JobRequest:
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "seeds" else v) for k, v in d.items() if k in known})


def from_prediction(inp: PredictionInput, info: ModelInfo, limits: Limits, loras: list[str]) -> JobRequest:
    """Replicate's input -> JobRequest."""
    _check_common(inp.prompt, inp.num_outputs, inp.negative_prompt, inp.true_cfg, limits)
    if inp.width is not None or inp.height is not None:
        if inp.width is None or inp.height is None:
            raise InputError("give both width and height", "width" if inp.width is None else "height")
        if inp.aspect_ratio is not None or inp.megapixels is not None:
            raise InputError("give either width/height or aspect_ratio/megapixels, not both", "aspect_ratio")
        height, width = inp.height, inp.width
    elif inp.image is not None and inp.aspect_ratio is None and inp.megapixels is None:
        height, width = _image_size(inp.image, info.multiple, limits)  # Replicate: the input image sets the size
    else:
        area = _megapixels(inp.megapixels) * 1e6 if inp.megapixels is not None else _area(info.default_size)
        height, width = size_for_aspect(inp.aspect_ratio or "1:1", area, info.multiple)
    if inp.mask is not None and inp.image is None:
        raise InputError("mask needs image", "mask")
    for name in ("image", "mask"):
        if getattr(inp, name) is not None:
            decode_image(getattr(inp, name), name, limits)  # fail now (422), not later in the worker
    height, width = _check_size(height, width, info, limits)
    return JobRequest(
        model=info.name,
        prompt=inp.prompt,
        height=height,
        width=width,
        steps=_steps(inp.num_inference_steps, info, limits),
        seeds=_seeds(inp.seed, inp.num_outputs),
        guidance=_guidance(inp.guidance, info),
        negative_prompt=inp.negative_prompt,
        true_cfg=inp.true_cfg,
        lora=_lora(inp.lora_weights, loras, "lora_weights"),
        lora_scale=inp.lora_scale,
        go_fast=inp.go_fast,
        image=inp.image,
        mask=inp.mask,
        strength=inp.prompt_strength,
        output_format=inp.output_format,
        output_quality=inp.output_quality,
    )


def from_openai(body: ImageGenerationRequest, info: ModelInfo, limits: Limits, loras: list[str]) -> JobRequest:
    """OpenAI's images.generate body -> JobRequest."""
    _check_common(body.prompt, body.n, body.negative_prompt, body.true_cfg, limits)
    height, width = info.default_size
    if body.size not in (None, "auto"):
        match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", body.size)
        if not match:
            raise InputError(f'size must be "WIDTHxHEIGHT" or "auto", got {body.size!r}', "size")
        width, height = int(match[1]), int(match[2])
    _check_size(height, width, info, limits)
    return JobRequest(
        model=info.name,
        prompt=body.prompt,
        height=height,
        width=width,
        steps=_steps(body.steps, info, limits),
        seeds=_seeds(body.seed, body.n),
        guidance=_guidance(body.guidance, info),
        negative_prompt=body.negative_prompt,
        true_cfg=body.true_cfg,
        lora=_lora(body.lora, loras, "lora"),
        lora_scale=body.lora_scale,
        go_fast=body.go_fast,
        output_format="jpg" if body.output_format == "jpeg" else body.output_format,
    )


def _check_common(prompt: str, n: int, negative: str | None, true_cfg: float, limits: Limits) -> None:
    if not prompt.strip():
        raise InputError("prompt must not be empty", "prompt")
    for name, text in (("prompt", prompt), ("negative_prompt", negative or "")):
        if len(text) > limits.max_prompt_chars:
            raise InputError(f"{name} has {len(text)} characters; the limit is {limits.max_prompt_chars}", name)
    if n > limits.max_n:
        raise InputError(f"{n} images requested; the limit is {limits.max_n} per request", "n")
    if negative is not None and true_cfg <= 1.0:
        raise InputError(f"negative_prompt takes effect only with true_cfg > 1 (got {true_cfg})", "negative_prompt")


def _area(size: tuple[int, int]) -> float:
    return float(size[0] * size[1])


def _megapixels(value: float | str) -> float:
    try:
        mp = float(value)
    except ValueError:
        raise InputError(f'megapixels must be a number such as "1" or "0.25", got {value!r}', "megapixels") from None
    if not 0 < mp < 1e4:  # also rejects nan and inf
        raise InputError(f"megapixels must be positive, got {value!r}", "megapixels")
    return mp


def _check_size(height: int, width: int, info: ModelInfo, limits: Limits) -> tuple[int, int]:
    for name, value in (("height", height), ("width", width)):
        if value < info.multiple or value % info.multiple:
            raise InputError(f"{name} must be a positive multiple of {info.multiple}, got {value}", name)
    if height * width > limits.max_pixels:
        raise InputError(
            f"{width}x{height} is {height * width} pixels; the limit is {limits.max_pixels}", "megapixels"
        )
    return height, width


def _steps(steps: int | None, info: ModelInfo, limits: Limits) -> int:
    steps = info.default_steps if steps is None else steps
    if steps > limits.max_steps:
        raise InputError(f"{steps} steps requested; the limit is {limits.max_steps}", "num_inference_steps")
    return steps


def _seeds(seed: int | None, n: int) -> tuple[int, ...]:
    first = secrets.randbelow(MAX_SEED - 16) if seed is None else seed
    return tuple(first + k for k in range(n))


def _guidance(value: float | None, info: ModelInfo) -> float | None:
    if not info.guidance:
        if value is not None:
            raise InputError(f"model {info.name!r} takes no guidance value (it is not guidance-distilled)", "guidance")
        return None
    return info.default_guidance if value is None else value


def _lora(name: str | None, loras: list[str], field: str) -> str | None:
    """A LoRA by name from the configured folder; never a path (no slash, no leading dot)."""
    if name is None:
        return None
    if not LORA_NAME.fullmatch(name):
        raise InputError(f"{field} must be a LoRA name (letters, digits, _ . -), got {name!r}", field)
    if name not in loras:
        raise InputError(f"no LoRA named {name!r}; available: {loras}", field)
    return name


def decode_image(text: str, name: str, limits: Limits | None = None):
    """A data: URI or bare base64 -> PIL image (RGB), or InputError. URLs are refused: the server fetches nothing."""
    from PIL import Image, UnidentifiedImageError

    if limits is not None and len(text) > limits.max_input_bytes:
        raise InputError(f"{name} is {len(text)} bytes; the limit is {limits.max_input_bytes}", name, 413)
    if text.startswith(("http:", "https:")):
        raise InputError(f"{name} must be a data: URI or base64; this service does not fetch URLs", name)
    payload = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        raw = base64.b64decode(payload, validate=True)
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise InputError(f"{name} is not a base64-encoded image: {e}", name) from None
    if limits is not None and image.width * image.height > 16 * limits.max_pixels:  # decompression bombs
        raise InputError(f"{name} is {image.width}x{image.height}; too large", name, 413)
    return image.convert("RGB")


def _image_size(text: str, multiple: int, limits: Limits) -> tuple[int, int]:
    image = decode_image(text, "image", limits)
    height, width = image.height // multiple * multiple, image.width // multiple * multiple
    if not height or not width:
        raise InputError(f"image is {image.width}x{image.height}; both sides must be >= {multiple}", "image")
    return height, width
