"""Helpers shared by the server tests: tiny resident models, a server on loopback in a thread, a LoRA file."""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve,test]')")

SCHNELL = "black-forest-labs/flux-schnell"
DEV = "black-forest-labs/flux-dev"
MEGAPIXELS = 64 * 64 / 1e6  # a 64x64 default keeps each request near 50 ms on a CPU


def load_engines(schnell_folder, dev_folder=None, lora_dir=None) -> dict:
    import torch

    from fluxkit.pipeline import FluxPipeline
    from fluxkit.server.config import ModelConfig
    from fluxkit.server.engine import Engine

    engines = {}
    for name, folder in ((SCHNELL, schnell_folder), (DEV, dev_folder)):
        if folder is not None:
            pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)
            engines[name] = Engine(ModelConfig(name, str(folder), megapixels=MEGAPIXELS), pipe, lora_dir)
    return engines


def make_config(tmp_path, engines: dict, **kwargs):
    from fluxkit.server.config import Limits, ModelConfig, ServeConfig

    limits = kwargs.pop("limits", {})
    models = tuple(ModelConfig(name, e.config.source, megapixels=MEGAPIXELS) for name, e in engines.items())
    kwargs.setdefault("lora_dir", next(iter(engines.values())).lora_dir)
    return ServeConfig(models=models, database=tmp_path / "jobs.sqlite", outputs=tmp_path / "outputs",
                       limits=Limits(**{"max_pixels": 256 * 256, "max_steps": 60, **limits}), **kwargs)


@contextlib.contextmanager
def running(config, engines: dict):
    """The app on 127.0.0.1 (a free port) in a thread; -> (base URL, the Service). Stops on exit."""
    from fluxkit.server.app import create_app, serve_in_background

    app = create_app(config, engines)
    with serve_in_background(app) as url:
        yield url, app.state.service


def image_array(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0


def wait_status(http, prediction_id: str, timeout: float = 30.0, until=("succeeded", "failed", "canceled")) -> dict:
    """Poll GET /v1/predictions/{id} until its status is in `until` (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pred = http.get(f"/v1/predictions/{prediction_id}").json()
        if pred["status"] in until:
            return pred
        time.sleep(0.02)
    raise AssertionError(f"prediction {prediction_id} still {pred['status']} after {timeout} s")


def write_lora(pipe, path, seed: int = 1, strength: float = 0.5) -> None:
    """A kohya-format LoRA (rank 2) on every linear of `pipe`'s transformer, saved as safetensors."""
    import torch
    from safetensors.torch import save_file

    from fluxkit.lora import linear_shapes

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, n_in) in linear_shapes(pipe.transformer).items():
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(2, n_in, generator=g) * strength
        sd[f"{key}.lora_up.weight"] = torch.randn(out, 2, generator=g) * strength
        sd[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(path))
