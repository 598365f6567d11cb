"""What `fluxkit serve` serves and how: models by public name, folders, batching, limits, binding and the API token.

A TOML file (every key optional except the models, which `--model` may give instead):

    host = "127.0.0.1"                # anything but loopback needs a token
    port = 8000
    database = "serve/jobs.sqlite"     # the job store
    outputs = "serve/outputs"          # generated images
    lora_dir = "loras"                 # LoRA files selectable by name; nothing outside it is reachable
    device = "auto"
    dtype = "auto"

    [batching]
    max_batch = 4                      # images per forward pass
    wait_ms = 10                       # how long the first request of a batch waits for compatible ones

    [limits]
    max_pixels = 2_100_000
    max_steps = 50
    max_n = 4
    max_prompt_chars = 2000
    max_queue = 64                     # jobs waiting (not counting the running batch)

    [models."black-forest-labs/flux-schnell"]
    source = "fluxkit-tiny-schnell"    # built-in name, local folder or Hub repo id, as for `fluxkit generate`
    quantize = "int8"                  # optional
    megapixels = 0.25                  # optional: default image area (else the model's default size)

The token comes from `token` in the file or, better, the environment variable FLUXKIT_API_TOKEN.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

TOKEN_ENV = "FLUXKIT_API_TOKEN"


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 2_100_000  # a little over 1440x1440
    max_steps: int = 50
    max_n: int = 4
    max_prompt_chars: int = 2000
    max_queue: int = 64
    max_input_bytes: int = 16_000_000  # an input image or mask, as sent (base64)
    wait_s: float = 60.0  # longest `Prefer: wait`
    sync_s: float = 600.0  # longest wait of an OpenAI images request (the openai client's default timeout)
    stream_s: float = 3600.0  # longest server-sent event stream

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"limits.{f.name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    name: str  # the public name clients use ("black-forest-labs/flux-schnell")
    source: str  # what FluxPipeline.from_pretrained loads
    quantize: str | None = None
    megapixels: float | None = None

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"model name must be non-empty without spaces, got {self.name!r}")
        if not self.source:
            raise ValueError(f"model {self.name!r}: source must be a model name, folder or repo id")
        if self.megapixels is not None and not (isinstance(self.megapixels, (int, float)) and self.megapixels > 0):
            raise ValueError(f"model {self.name!r}: megapixels must be a positive number, got {self.megapixels!r}")


@dataclass(frozen=True)
class ServeConfig:
    models: tuple[ModelConfig, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    database: Path = Path("serve/jobs.sqlite")
    outputs: Path = Path("serve/outputs")
    lora_dir: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 4
    batch_wait_ms: float = 10.0
    max_attempts: int = 2  # a job that was running during this many crashes is failed, not retried again
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("no model to serve: give --model NAME=SOURCE or a [models.NAME] table in the config")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be distinct, got {names}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_batch < 1 or self.batch_wait_ms < 0 or self.max_attempts < 1:
            raise ValueError(
                f"need max_batch >= 1, batch_wait_ms >= 0, max_attempts >= 1; got {self.max_batch}, "
                f"{self.batch_wait_ms}, {self.max_attempts}"
            )
        if not is_loopback(self.host) and not self.token:
            raise ValueError(
                f"binding to {self.host!r} exposes the service beyond this machine; set an API token "
                f"({TOKEN_ENV}=... or token in the config file) or bind to 127.0.0.1"
            )

    @property
    def default_model(self) -> str:
        return self.models[0].name

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def parse_model_arg(text: str) -> ModelConfig:
    """`--model NAME=SOURCE` or `--model SOURCE` (then the source is also the public name)."""
    name, sep, source = text.partition("=")
    return ModelConfig(name=name, source=source) if sep else ModelConfig(name=text, source=text)


_TOP_KEYS = {"host", "port", "token", "database", "outputs", "lora_dir", "device", "dtype", "max_attempts"}


def load_config(path: str | Path | None = None, **overrides) -> ServeConfig:
    """Read the TOML file (if any), then apply overrides that are not None; the token falls back to the env."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {path}: {e}") from None
    unknown = set(data) - _TOP_KEYS - {"models", "batching", "limits"}
    if unknown:
        raise ValueError(f"config file {path}: unknown keys {sorted(unknown)}")
    kwargs = {k: data[k] for k in _TOP_KEYS if k in data}
    batching = _table(data, "batching", {"max_batch", "wait_ms"})
    if "max_batch" in batching:
        kwargs["max_batch"] = batching["max_batch"]
    if "wait_ms" in batching:
        kwargs["batch_wait_ms"] = batching["wait_ms"]
    limits = _table(data, "limits", {f.name for f in fields(Limits)})
    models = []
    for name, table in _table(data, "models", None).items():
        if not isinstance(table, dict):
            raise ValueError(f"config: [models.{name!r}] must be a table with a source")
        extra = set(table) - {"source", "quantize", "megapixels"}
        if extra:
            raise ValueError(f"config: [models.{name!r}] has unknown keys {sorted(extra)}")
        models.append(ModelConfig(name=name, source=table.get("source", ""), quantize=table.get("quantize"),
                                  megapixels=table.get("megapixels")))
    if overrides.get("models"):
        models = list(overrides.pop("models"))
    overrides.pop("models", None)
    kwargs.update({k: v for k, v in overrides.items() if v is not None and k != "limits"})
    kwargs["limits"] = replace(Limits(**limits), **(overrides.get("limits") or {}))
    kwargs.setdefault("token", os.environ.get(TOKEN_ENV) or None)
    for key in ("database", "outputs", "lora_dir"):
        if kwargs.get(key) is not None:
            kwargs[key] = Path(kwargs[key]).expanduser()
    return ServeConfig(models=tuple(models), **kwargs)


def _table(data: dict, name: str, allowed: set[str] | None) -> dict:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise ValueError(f"config: {name} must be a table")
    if allowed is not None and set(table) - allowed:
        raise ValueError(f"config: [{name}] has unknown keys {sorted(set(table) - allowed)}")
    return table
