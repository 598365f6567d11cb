"""Replicate-style predictions: create, get, list, cancel, a server-sent event stream, and `Prefer: wait`.

Enough of Replicate's HTTP API that its official Python client, given this service as `base_url`, runs
`replicate.run("black-forest-labs/flux-schnell", input={...})` unchanged: the model-scoped create endpoint, the
`Prefer: wait` header, polling GET /v1/predictions/{id}, and a prediction body with every field the client's model
requires. Progress appears in `logs` as tqdm lines ("50%|#####     | 2/4"), which the client's
`prediction.progress` parses; the event stream sends the same lines as `logs` events, then `output`, `error` and
`done` events (the four types the client's stream decoder accepts).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .app import service
from .job_request import InputError, from_prediction
from .jobs import TERMINAL, JobRecord
from .schemas import Prediction, PredictionCreate, PredictionList

router = APIRouter(prefix="/v1", tags=["predictions (Replicate-style)"])
JOB_ID = re.compile(r"[0-9a-f]{32}")
VERSION = "fluxkit"


def parse_prefer(header: str | None, limit: float) -> float | None:
    """`Prefer: wait` -> `limit` seconds, `wait=N` -> N (1..limit); None without a wait preference.
    Other preferences are ignored, as RFC 7240 asks of preferences a server does not implement."""
    if not header:
        return None
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        if not value:
            return limit
        if not value.strip().isdigit() or not 1 <= int(value) <= limit:
            raise InputError(f"Prefer: wait=N needs a whole number of seconds in 1..{limit:g}, got {value!r}",
                             "Prefer", 400)
        return float(value)
    return None


def progress_line(step: int, total: int) -> str:
    pct = int(100 * step / total) if total else 0
    bar = "#" * (pct // 10)
    return f"{pct:3d}%|{bar:<10}| {step}/{total}"


def to_prediction(rec: JobRecord, request: Request) -> Prediction:
    svc = service(request)
    base = str(request.base_url) + f"v1/predictions/{rec.id}"
    total = rec.request.get("steps", 0)
    step = total if rec.status == "succeeded" else (rec.step or 0)
    seeds = rec.request.get("seeds") or [None]
    logs = f"Using seed: {seeds[0]}"  # as Replicate's FLUX models log it; the seed is drawn when the job is accepted
    if rec.status != "starting" and total:
        logs += "\n" + progress_line(step, total)
    metrics = {"image_count": len(rec.request.get("seeds", []))}
    if rec.started_at and rec.completed_at:
        metrics["predict_time"] = round(rec.completed_at - rec.started_at, 4)
        metrics["total_time"] = round(rec.completed_at - rec.created_at, 4)
    return Prediction(
        id=rec.id,
        model=rec.model,
        version=VERSION,
        status=rec.status,
        input=rec.input,
        output=[svc.file_url(request, n) for n in rec.output] if rec.output is not None else None,
        logs=logs,
        error=rec.error,
        metrics=metrics,
        created_at=_iso(rec.created_at),
        started_at=_iso(rec.started_at),
        completed_at=_iso(rec.completed_at),
        urls={"get": base, "cancel": base + "/cancel", "stream": base + "/stream"},
    )


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z") if t is not None else None


def _get(request: Request, prediction_id: str) -> JobRecord:
    rec = service(request).worker.view(prediction_id) if JOB_ID.fullmatch(prediction_id) else None
    if rec is None:
        raise InputError(f"no prediction {prediction_id!r}", "id", 404)
    return rec


async def _create(request: Request, model: str | None, body: PredictionCreate, prefer: str | None) -> JSONResponse:
    svc = service(request)
    if body.webhook or body.webhook_completed or body.webhook_events_filter:
        raise InputError("webhooks are not supported: this service makes no outbound requests", "webhook")
    wait = parse_prefer(prefer, svc.config.limits.wait_s)
    engine = svc.engine(model)
    job_request = from_prediction(body.input, engine.info, svc.config.limits, svc.loras())
    raw = body.input.model_dump(exclude_unset=True)  # echoed back as the prediction's input, as sent
    job = svc.worker.submit(svc.new_id(), "prediction", job_request, raw)
    if wait is not None:
        await svc.worker.wait(job.id, wait)
    rec = svc.worker.view(job.id)
    pred = to_prediction(rec, request)
    if wait is not None and pred.status not in TERMINAL:
        # Replicate's blocking API answers an unfinished prediction as "starting", and its client relies on that
        # to keep polling (it takes any other state as final); GET shows the true state.
        pred.status = "starting"
    return JSONResponse(pred.model_dump(), status_code=201, headers={"Location": pred.urls["get"]})


_CREATED = {201: {"model": Prediction}, 404: {}, 422: {}, 429: {}}


@router.post("/predictions", status_code=201, response_model=Prediction, responses=_CREATED)
async def create_prediction(request: Request, body: PredictionCreate, prefer: str | None = Header(None)):
    """Start a prediction on `version` (a served model name; default: the first model)."""
    return await _create(request, body.version, body, prefer)


@router.post("/models/{owner}/{name}/predictions", status_code=201, response_model=Prediction, responses=_CREATED)
async def create_model_prediction(
    request: Request, owner: str, name: str, body: PredictionCreate, prefer: str | None = Header(None)
):
    """Start a prediction on model `owner/name` (as `replicate.run("owner/name", input=...)` does)."""
    if body.version is not None and body.version != f"{owner}/{name}":
        raise InputError(f"version {body.version!r} disagrees with the model in the path", "version")
    return await _create(request, f"{owner}/{name}", body, prefer)


@router.get("/predictions", response_model=PredictionList)
def list_predictions(request: Request) -> PredictionList:
    """The 100 most recent predictions, newest first."""
    recs = service(request).store.recent(100)
    return PredictionList(results=[to_prediction(service(request).worker.view(r.id) or r, request) for r in recs])


@router.get("/predictions/{prediction_id}", response_model=Prediction, responses={404: {}})
def get_prediction(request: Request, prediction_id: str) -> Prediction:
    return to_prediction(_get(request, prediction_id), request)


@router.post("/predictions/{prediction_id}/cancel", response_model=Prediction, responses={404: {}})
def cancel_prediction(request: Request, prediction_id: str) -> Prediction:
    """Cancel a waiting or running prediction; a finished one is returned unchanged."""
    _get(request, prediction_id)
    service(request).worker.cancel(prediction_id)
    return to_prediction(_get(request, prediction_id), request)


@router.get("/predictions/{prediction_id}/stream", responses={200: {"content": {"text/event-stream": {}}}, 404: {}})
async def stream_prediction(request: Request, prediction_id: str) -> StreamingResponse:
    """Server-sent events: `logs` (progress lines), then `output` (one per image URL), `error`, and `done`."""
    _get(request, prediction_id)
    limit = service(request).config.limits.stream_s
    return StreamingResponse(
        _events(request, prediction_id, limit), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(request: Request, prediction_id: str, limit: float):
    count, last = 0, None
    deadline = time.monotonic() + limit

    def event(kind: str, data: str) -> str:
        nonlocal count
        count += 1
        lines = "".join(f"data: {line}\n" for line in data.split("\n"))
        return f"event: {kind}\nid: {count}\n{lines}\n"

    while time.monotonic() < deadline:
        pred = to_prediction(_get(request, prediction_id), request)
        if pred.logs and pred.logs != last:
            last = pred.logs
            yield event("logs", pred.logs)
        if pred.status in TERMINAL:
            for url in pred.output or []:
                yield event("output", url)
            if pred.status == "failed":
                yield event("error", pred.error or "failed")
            reason = {"succeeded": {}, "failed": {"reason": "error"}, "canceled": {"reason": "canceled"}}
            yield event("done", json.dumps(reason[pred.status]))
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.05)
    yield event("error", f"the stream ended after {limit:g} s; poll the prediction instead")
