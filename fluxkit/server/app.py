"""The FastAPI application: models loaded once at start-up, the job store and worker, the two APIs, files and the UI.

    create_app(config)              -> FastAPI app (uvicorn runs it; `fluxkit serve` does that)
    serve_in_background(app, port)  -> context manager running it on loopback in a thread (tests, benchmarks)

Errors are JSON in the calling API's shape: OpenAI's `{"error": {"message", "type", "param", "code"}}` under
/v1/images, RFC 7807 problem details (`{"detail", "title", "status"}`, what Replicate's client reads) elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import threading
import time
import uuid
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServeConfig
from .engine import Engine, list_loras
from .job_request import InputError
from .jobs import JobStore
from .schemas import ModelCard, ModelList, ServerInfo
from .worker import QueueFull, Worker

log = logging.getLogger(__name__)
WEB_DIR = Path(__file__).parent / "web"
OUTPUT_NAME = re.compile(r"[0-9a-f]{32}-\d{1,2}\.(png|jpg|webp)")
MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}


class Service:
    """What the routes share: configuration, resident models, job store and worker."""

    def __init__(self, config: ServeConfig, engines: dict[str, Engine], worker_threads: int = 1):
        self.config, self.engines = config, engines
        self.store = JobStore(config.database)
        self.worker = Worker(
            engines, self.store, config.outputs, config.max_batch, config.batch_wait_ms / 1000,
            config.limits.max_queue, config.max_attempts, worker_threads,
        )

    def engine(self, name: str | None) -> Engine:
        name = name or self.config.default_model
        if name not in self.engines:
            raise InputError(f"model {name!r} is not served here; served: {sorted(self.engines)}", "model", 404)
        return self.engines[name]

    def loras(self) -> list[str]:
        return list_loras(self.config.lora_dir)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex  # 128 random bits: output URLs are unguessable

    def file_url(self, request: Request, name: str) -> str:
        return str(request.base_url) + f"v1/files/{name}"


def service(request: Request) -> Service:
    return request.app.state.service


def require_token(request: Request) -> None:
    """With a token configured, every API call needs `Authorization: Bearer TOKEN` (or Replicate's `Token TOKEN`)."""
    token = service(request).config.token
    if not token:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() not in ("bearer", "token") or not secrets.compare_digest(given.strip(), token):
        raise HTTPException(401, "missing or wrong API token (Authorization: Bearer TOKEN)",
                            headers={"WWW-Authenticate": "Bearer"})


def create_app(config: ServeConfig, engines: dict[str, Engine] | None = None, worker_threads: int = 1) -> FastAPI:
    """The service app. `engines` (name -> Engine, or anything with `info` and `run`) skips loading: tests share
    loaded models, and Ray Serve passes remote engines (with one worker thread per replica)."""
    from . import openai_api, replicate_api

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = engines or {
            m.name: Engine.load(m, config.device, config.dtype, config.lora_dir) for m in config.models
        }
        svc = Service(config, loaded, worker_threads)
        svc.worker.start()
        app.state.service = svc
        try:
            yield
        finally:
            svc.worker.stop()
            svc.store.close()

    app = FastAPI(title="fluxkit serve", version=_version(), lifespan=lifespan,
                  description="FLUX.1 image generation: OpenAI- and Replicate-compatible APIs.")
    guarded = [Depends(require_token)]
    app.include_router(openai_api.router, dependencies=guarded)
    app.include_router(replicate_api.router, dependencies=guarded)
    _add_info_routes(app, guarded)
    _add_error_handlers(app)
    app.mount("/ui", StaticFiles(directory=WEB_DIR), name="ui")
    return app


def _add_info_routes(app: FastAPI, guarded) -> None:
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/healthz")
    def healthz(request: Request) -> dict:
        svc = service(request)
        return {"status": "ok", "queued": svc.worker.queue_length(), "jobs": svc.store.counts()}

    @app.get("/v1/info", dependencies=guarded)
    def info(request: Request) -> ServerInfo:
        svc = service(request)
        cfg = svc.config
        return ServerInfo(auth_required=bool(cfg.token), loras=svc.loras(), limits=vars(cfg.limits),
                          max_batch=cfg.max_batch)

    @app.get("/v1/models", dependencies=guarded)
    def models(request: Request) -> ModelList:
        cards = []
        for name, eng in service(request).engines.items():
            i = eng.info
            cards.append(ModelCard(id=name, default_height=i.default_size[0], default_width=i.default_size[1],
                                   default_steps=i.default_steps, guidance=i.guidance,
                                   default_guidance=i.default_guidance if i.guidance else None))
        return ModelList(data=cards)

    @app.get("/v1/loras", dependencies=guarded)
    def loras(request: Request) -> list[str]:
        return service(request).loras()

    # Output files are not behind the token: their names carry 128 random bits (like Replicate's delivery URLs),
    # and <img src> cannot send an Authorization header.
    @app.get("/v1/files/{name}", responses={200: {"content": {"image/png": {}}}, 404: {}})
    def file(name: str, request: Request) -> FileResponse:
        path = service(request).config.outputs / name
        if not OUTPUT_NAME.fullmatch(name) or not path.is_file():
            raise HTTPException(404, f"no output file {name!r}")
        return FileResponse(path, media_type=MEDIA_TYPES[name.rsplit(".", 1)[1]])


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/images")


def _error(request: Request, status: int, message: str, field: str | None = None, headers=None) -> JSONResponse:
    if _is_openai(request):
        status = 400 if status == 422 else status  # OpenAI answers invalid input with 400
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": field, "code": None}}
    else:
        body = {"detail": message, "title": _TITLES.get(status, "Error"), "status": status}
        if field:
            body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)


_TITLES = {400: "Bad request", 401: "Unauthorized", 404: "Not found", 409: "Conflict", 413: "Too large",
           422: "Invalid input", 429: "Too many requests", 500: "Internal error", 504: "Timeout"}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InputError)
    async def input_error(request: Request, e: InputError):
        return _error(request, e.status, str(e), e.field)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg')}"
        return _error(request, 400 if _is_openai(request) else 422, message, loc[-1] if loc else None)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException and starlette's 404/405
    async def http_error(request: Request, e: StarletteHTTPException):
        return _error(request, e.status_code, str(e.detail), headers=e.headers)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull):
        return _error(request, 429, str(e), headers={"Retry-After": "1"})


def _version() -> str:
    from .. import __version__

    return __version__


@contextlib.contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 120.0):
    """Run `app` with uvicorn in a daemon thread; -> its base URL ("http://127.0.0.1:PORT"). Stops on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="fluxkit-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the server did not start (see the log above)")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{host}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
