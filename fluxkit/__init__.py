"""fluxkit: a from-scratch, checkpoint-compatible FLUX.1 engine.

    from fluxkit import FluxPipeline
    pipe = FluxPipeline.from_pretrained("fluxkit-tiny-schnell")
    image = pipe("a red circle above a blue square", num_inference_steps=4).images[0]

Imports are lazy so that `import fluxkit` stays light (no transformers, server or training code until used).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "FluxPipeline": "fluxkit.pipeline",
    "FluxPipelineOutput": "fluxkit.pipeline",
    "FluxImg2ImgPipeline": "fluxkit.pipelines",
    "FluxInpaintPipeline": "fluxkit.pipelines",
    "FluxFillPipeline": "fluxkit.pipelines",
    "FluxControlPipeline": "fluxkit.pipelines",
    "FluxKontextPipeline": "fluxkit.pipelines",
    "Flux": "fluxkit.model",
    "AutoEncoder": "fluxkit.autoencoder",
    "FluxParams": "fluxkit.params",
    "AutoEncoderParams": "fluxkit.params",
    "ModelSpec": "fluxkit.params",
    "PRESETS": "fluxkit.params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fluxkit' has no attribute {name!r}")
