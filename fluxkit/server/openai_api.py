"""OpenAI-compatible image generation: `POST /v1/images/generations`.

The official `openai` client works unchanged (`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=TOKEN or "none")`,
then `client.images.generate(model=..., prompt=..., n=..., size="1024x768", response_format="b64_json")`).
fluxkit's extras (seed, steps, guidance, negative_prompt, true_cfg, lora, lora_scale, go_fast) go in `extra_body`.
The call waits for the images; the job is also a prediction in the store (GET /v1/predictions/{id}).
"""

from __future__ import annotations

import base64
import time

from fastapi import APIRouter, HTTPException, Request

from .app import service
from .job_request import from_openai
from .schemas import ImageData, ImageGenerationRequest, ImagesResponse

router = APIRouter(prefix="/v1", tags=["images (OpenAI-compatible)"])


@router.post("/images/generations", response_model=ImagesResponse, responses={400: {}, 404: {}, 429: {}})
async def generate_images(request: Request, body: ImageGenerationRequest) -> ImagesResponse:
    svc = service(request)
    engine = svc.engine(body.model)
    job_request = from_openai(body, engine.info, svc.config.limits, svc.loras())
    job = svc.worker.submit(svc.new_id(), "openai", job_request, body.model_dump(exclude_unset=True))
    await svc.worker.wait(job.id, svc.config.limits.sync_s)
    rec = svc.worker.view(job.id)
    if rec.status == "canceled":
        raise HTTPException(409, f"the job was cancelled (prediction {job.id})")
    if rec.status == "failed":
        raise HTTPException(500, f"generation failed: {rec.error} (prediction {job.id})")
    if rec.status != "succeeded":
        raise HTTPException(
            504, f"the images were not ready within {svc.config.limits.sync_s:g} s; the job goes on as "
            f"prediction {job.id} (GET /v1/predictions/{job.id})",
        )
    data = []
    for name in rec.output or []:
        if body.response_format == "url":
            data.append(ImageData(url=svc.file_url(request, name)))
        else:
            raw = (svc.config.outputs / name).read_bytes()
            data.append(ImageData(b64_json=base64.b64encode(raw).decode("ascii")))
    return ImagesResponse(created=int(rec.created_at or time.time()), data=data)
