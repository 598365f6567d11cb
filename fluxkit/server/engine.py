"""A resident model and its LoRA adapters: loaded once, then one batch of compatible jobs per call.

LoRA adapters are read from the configured folder by name on first use and kept (up to `max_loras`, the least
recently used dropped first); switching between them, or to none, changes only which adapters are active: the base
weights are never reloaded or modified.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from .config import ModelConfig
from .job_request import LORA_NAME, JobRequest, ModelInfo, decode_image

log = logging.getLogger(__name__)
StepCallback = Callable[[int], None]  # called with the number of steps done; raise to stop the batch


def list_loras(folder: Path | None) -> list[str]:
    """LoRA names in `folder`: NAME.safetensors files and NAME/ folders holding a .safetensors file. Entries that
    resolve outside the folder (symlinks) are not listed, so no request can name them."""
    if folder is None or not folder.is_dir():
        return []
    names, root = set(), folder.resolve()
    for path in folder.iterdir():
        if not path.resolve().is_relative_to(root):
            continue
        if path.is_file() and path.suffix == ".safetensors":
            names.add(path.stem)
        elif path.is_dir() and any(path.glob("*.safetensors")):
            names.add(path.name)
    return sorted(n for n in names if LORA_NAME.fullmatch(n))


def lora_path(folder: Path, name: str) -> Path:
    """The file or folder of LoRA `name`, which must stay inside `folder` even through symlinks."""
    if not LORA_NAME.fullmatch(name):
        raise ValueError(f"bad LoRA name {name!r}")
    root = folder.resolve()
    for candidate in (folder / f"{name}.safetensors", folder / name):
        if candidate.exists():
            if not candidate.resolve().is_relative_to(root):
                raise ValueError(f"LoRA {name!r} points outside the LoRA folder")
            return candidate
    raise ValueError(f"no LoRA named {name!r} in {folder}")


class Engine:
    """One served model: a FluxPipeline plus the adapters loaded into it."""

    def __init__(self, config: ModelConfig, pipe, lora_dir: Path | None = None, max_loras: int = 8):
        self.config, self.pipe, self.lora_dir, self.max_loras = config, pipe, lora_dir, max_loras
        self._loras: OrderedDict[str, None] = OrderedDict()  # loaded adapter names, most recently used last
        spec, multiple = pipe.spec, pipe.vae.params.downscale * 2
        size = spec.default_size
        if config.megapixels is not None:  # a square of that area, on the size grid
            side = max(multiple, round((config.megapixels * 1e6) ** 0.5 / multiple) * multiple)
            size = (side, side)
        from ..conditioning import model_layout

        self.info = ModelInfo(
            name=config.name,
            multiple=multiple,
            default_size=tuple(size),
            default_steps=spec.default_steps,
            guidance=bool(pipe.transformer.params.guidance_embed),
            default_guidance=spec.default_guidance,
            fill=model_layout(pipe) == "fill",
        )

    @classmethod
    def load(cls, config: ModelConfig, device: str = "auto", dtype: str = "auto", lora_dir: Path | None = None):
        from ..devices import default_device, parse_dtype
        from ..pipeline import FluxPipeline

        dev = default_device() if device == "auto" else torch.device(device)
        pipe = FluxPipeline.from_pretrained(
            config.source, torch_dtype=None if dtype == "auto" else parse_dtype(dtype), device=dev,
            quantize=config.quantize,
        )
        log.info("loaded %s from %s on %s (%s)", config.name, config.source, dev, pipe.dtype)
        return cls(config, pipe, lora_dir)

    def run(self, jobs: list[JobRequest], on_step: StepCallback | None = None) -> list[list]:
        """Generate every image of `jobs` (equal `batch_key`s) in one call -> one list of PIL images per job."""
        first = jobs[0]
        if any(j.batch_key() != first.batch_key() for j in jobs):
            raise ValueError("jobs of one batch must share model, size, steps, guidance and adapters")
        self._use_lora(first.lora, first.lora_scale)

        def callback(pipe, i, t, kwargs):
            if on_step is not None:
                on_step(i + 1)
            return kwargs

        # One generator per image, seeded per image, so an image does not depend on its batch neighbours.
        generators = [torch.Generator("cpu").manual_seed(s) for j in jobs for s in j.seeds]
        cfg = first.true_cfg > 1.0
        transformer = self.pipe.transformer
        if first.go_fast:
            from ..step_cache import FirstBlockCacheConfig

            transformer.enable_cache(FirstBlockCacheConfig())
        try:
            out = self.pipe(
                [j.prompt for j in jobs for _ in j.seeds],
                negative_prompt=[j.negative_prompt or "" for j in jobs for _ in j.seeds] if cfg else None,
                true_cfg_scale=first.true_cfg,
                height=first.height,
                width=first.width,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance,
                generator=generators,
                callback_on_step_end=callback,
                conditioning=self._conditioning(first) if first.image is not None else None,
            )
        finally:
            if first.go_fast:
                transformer.disable_cache()
        images, start = [], 0
        for j in jobs:
            images.append(out.images[start : start + j.n])
            start += j.n
        return images

    def _conditioning(self, job: JobRequest):
        from .. import conditioning as cond

        image = decode_image(job.image, "image")  # its size was checked when the job was accepted
        if job.mask is None:
            return cond.Img2Img(image, job.strength)
        mask = decode_image(job.mask, "mask")
        hook = cond.Fill if self.info.fill else cond.Inpaint
        return hook(image, mask, job.strength)

    def _use_lora(self, name: str | None, scale: float) -> None:
        if name is None:
            if self._loras:
                self.pipe.disable_lora()
            return
        if name not in self._loras:
            if self.lora_dir is None:
                raise ValueError("no LoRA folder is configured")
            if len(self._loras) >= self.max_loras:
                oldest, _ = self._loras.popitem(last=False)
                self.pipe.delete_adapters([oldest])
            self.pipe.load_lora_weights(str(lora_path(self.lora_dir, name)), adapter_name=name)
            self._loras[name] = None
        self._loras.move_to_end(name)
        self.pipe.set_adapters([name], [scale])
