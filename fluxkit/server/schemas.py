"""Request and response bodies of the HTTP API (pydantic), as OpenAI's and Replicate's clients send and read them.

Static bounds live here and show up in the OpenAPI schema; bounds that depend on the configuration (pixels, steps,
n, prompt length) are checked in `job_request`. Unknown fields are rejected, never ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..sizes import ASPECT_RATIOS

AspectRatio = Literal[ASPECT_RATIOS]  # type: ignore[valid-type]
MAX_SEED = 2**53 - 1  # exact in JavaScript numbers, so the web UI can show and resend it
Status = Literal["starting", "processing", "succeeded", "failed", "canceled"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationExtras(_Strict):
    """fluxkit inputs shared by both APIs."""

    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed of the first image; image k uses seed + k")
    negative_prompt: str | None = Field(None, description="used with true_cfg > 1")
    true_cfg: float = Field(1.0, ge=1.0, le=20.0, description="true classifier-free guidance scale (> 1 enables)")
    go_fast: bool = Field(False, description="skip transformer steps that barely change the image (step cache)")


class PredictionInput(GenerationExtras):
    """Replicate's FLUX.1 input schema, plus fluxkit's width/height, negative_prompt and true_cfg."""

    prompt: str
    aspect_ratio: AspectRatio | None = Field(None, description="default 1:1; not with width/height")
    width: int | None = Field(None, ge=16, le=16384)
    height: int | None = Field(None, ge=16, le=16384)
    megapixels: float | str | None = Field(None, description='image area in megapixels, e.g. "1" or "0.25"')
    num_outputs: int = Field(1, ge=1, le=4)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0.0, le=100.0, description="distilled guidance (dev-like models)")
    output_format: Literal["webp", "jpg", "png"] = "webp"
    output_quality: int = Field(80, ge=0, le=100, description="jpg/webp quality")
    lora_weights: str | None = Field(None, description="name of a LoRA in the server's LoRA folder")
    lora_scale: float = Field(1.0, ge=-4.0, le=4.0)
    image: str | None = Field(None, description="data: URI of an image to start from (img2img / inpainting)")
    prompt_strength: float = Field(0.8, ge=0.0, le=1.0, description="how much of `image` to repaint")
    mask: str | None = Field(None, description="data: URI of a mask (white = repaint); needs image")


class PredictionCreate(_Strict):
    input: PredictionInput
    version: str | None = Field(None, description="a served model name (default: the first model)")
    stream: bool | None = Field(None, description="accepted for compatibility: a stream URL is always given")
    webhook: str | None = Field(None, description="not supported: the service makes no outbound requests")
    webhook_completed: str | None = None
    webhook_events_filter: list[str] | None = None


class Prediction(BaseModel):
    id: str
    model: str
    version: str
    status: Status
    input: dict
    output: list[str] | None
    logs: str
    error: str | None
    metrics: dict
    created_at: str
    started_at: str | None
    completed_at: str | None
    urls: dict[str, str]
    source: str = "api"
    data_removed: bool = False


class PredictionList(BaseModel):
    previous: str | None = None
    next: str | None = None
    results: list[Prediction]


class ImageGenerationRequest(GenerationExtras):
    """OpenAI's images.generate body, plus fluxkit's seed, steps, guidance, LoRA and the GenerationExtras."""

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str | None = Field(None, description='"WIDTHxHEIGHT" (multiples of 16) or "auto"')
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    user: str | None = Field(None, description="an end-user id, recorded with the job")
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0.0, le=100.0)
    lora: str | None = None
    lora_scale: float = Field(1.0, ge=-4.0, le=4.0)


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "fluxkit"
    default_width: int
    default_height: int
    default_steps: int
    guidance: bool = Field(description="whether the model takes a distilled guidance value")
    default_guidance: float | None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class ServerInfo(BaseModel):
    auth_required: bool
    loras: list[str]
    limits: dict
    max_batch: int
