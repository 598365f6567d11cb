"""`FluxPipeline`: diffusers' FluxPipeline API over fluxkit's own networks and sampler.

`__call__` validates its arguments once, then runs one recipe with numbered steps (encode -> noise -> schedule ->
denoise -> decode). Conditioning (img2img, fill, control, kontext, regional prompts) plugs into that recipe through
`fluxkit.conditioning` hooks; the sampling loop itself is `fluxkit.sampling.denoise`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import sampling
from .autoencoder import AutoEncoder
from .lora import LoraLoaderMixin
from .model import Flux
from .params import ModelSpec
from .request import Request as _Request
from .request import as_prompt_list as _as_list
from .sampling import ShiftConfig
from .text import TextEncoder

log = logging.getLogger(__name__)


@dataclass
class FluxPipelineOutput:
    images: Any  # list[PIL.Image] | np.ndarray [B, H, W, 3] | Tensor [B, 3, H, W] | packed latents


@dataclass(frozen=True)
class SchedulerConfig:
    """What of diffusers' FlowMatchEulerDiscreteScheduler config the Flux sampler uses."""

    use_dynamic_shifting: bool = True
    shift: ShiftConfig = ShiftConfig()

    @classmethod
    def from_diffusers(cls, cfg: dict) -> SchedulerConfig:
        if not cfg.get("use_dynamic_shifting", False) and float(cfg.get("shift", 1.0)) != 1.0:
            raise ValueError(f"static scheduler shift {cfg['shift']} is not supported; Flux uses dynamic or no shift")
        return cls(
            use_dynamic_shifting=bool(cfg.get("use_dynamic_shifting", False)),
            shift=ShiftConfig(
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.15),
            ),
        )


def _repeat(x: Tensor, n: int) -> Tensor:
    """[B, ...] -> [B*n, ...] with each prompt's copies adjacent (diffusers' order)."""
    return x.repeat_interleave(n, dim=0)


class FluxPipeline(LoraLoaderMixin):
    """Text-to-image with a FLUX.1-family model. Construct with `from_pretrained`."""

    def __init__(
        self,
        transformer: Flux,
        vae: AutoEncoder,
        text_encoder: TextEncoder,
        spec: ModelSpec,
        scheduler: SchedulerConfig | None = None,
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.spec = spec
        self.scheduler = scheduler or SchedulerConfig(use_dynamic_shifting=spec.shift_schedule)
        self._offload = None  # fluxkit.offload.ModelOffload when offloading is on

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs) -> FluxPipeline:
        """A built-in name (`fluxkit-tiny-schnell`), a local folder (diffusers or fluxkit layout) or a Hub repo id."""
        from .hub import load_pipeline

        return load_pipeline(cls, name_or_path, **kwargs)

    @property
    def device(self) -> torch.device:
        return self._offload.device if self._offload is not None else self.transformer.device

    def _placed(self, name: str):
        """Context in which component `name` sits on the execution device (a no-op unless offloading)."""
        if self._offload is None:
            return contextlib.nullcontext()
        return self._offload.placed(name, getattr(self, name))

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def to(self, device=None, dtype=None) -> FluxPipeline:
        """`.to("cuda")`, `.to(torch.bfloat16)` or both, as in diffusers."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        self.transformer.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device, dtype=dtype)
        return self

    # Memory methods exist from the start so that diffusers code runs; fluxkit.offload implements them.
    def enable_model_cpu_offload(self, device: str | torch.device | None = None) -> None:
        from .offload import enable_model_cpu_offload

        enable_model_cpu_offload(self, device)

    def enable_sequential_cpu_offload(self, device: str | torch.device | None = None) -> None:
        from .offload import enable_sequential_cpu_offload

        enable_sequential_cpu_offload(self, device)

    # -- text -----------------------------------------------------------------------------------------------------
    def encode_prompt(
        self,
        prompt,
        prompt_2=None,
        num_images_per_prompt: int = 1,
        max_sequence_length: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """-> (token states [B*n, L, C], pooled [B*n, P]) in the transformer's dtype."""
        prompts = _as_list(prompt, "prompt")
        prompts_2 = _as_list(prompt_2, "prompt_2")
        if prompts_2 is not None and len(prompts_2) != len(prompts):
            raise ValueError(f"prompt_2 has {len(prompts_2)} entries but prompt has {len(prompts)}")
        length = max_sequence_length or self.spec.max_sequence_length
        with self._placed("text_encoder"):
            seq, pooled = self.text_encoder.encode(prompts, prompts_2, length)
        dev, dt = self.device, self.transformer.dtype
        return _repeat(seq, num_images_per_prompt).to(dev, dt), _repeat(pooled, num_images_per_prompt).to(dev, dt)

    # -- generation -----------------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt=None,
        prompt_2=None,
        negative_prompt=None,
        negative_prompt_2=None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: Sequence[float] | None = None,
        guidance_scale: float | Sequence[float] | None = None,
        num_images_per_prompt: int = 1,
        generator=None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        pooled_prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        negative_pooled_prompt_embeds: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        max_sequence_length: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        joint_attention_kwargs: dict | None = None,
        batch_size: int | None = None,
        steps: int | None = None,
        conditioning=None,
    ):
        """Generate images. Arguments and defaults follow diffusers' FluxPipeline; fluxkit extras:

        - `steps`: shorthand for `num_inference_steps`;
        - `batch_size`: run a list of prompts in chunks of this many prompts (results keep the prompt order);
        - `guidance_scale` may be a sequence with one value per step (a guidance schedule);
        - `true_cfg_scale > 1` without a negative prompt uses the empty prompt as the negative.
        """
        if steps is not None and num_inference_steps is not None and steps != num_inference_steps:
            raise ValueError(f"steps={steps} and num_inference_steps={num_inference_steps} disagree; pass one")
        num_inference_steps = steps if steps is not None else num_inference_steps
        prompts = _as_list(prompt, "prompt")
        if batch_size is not None:
            return self._call_in_batches(prompts, batch_size, locals())
        req = _Request.validate(self, locals())
        with self.temporary_lora_scale((joint_attention_kwargs or {}).get("scale")):
            return self._generate(req)

    def _call_in_batches(self, prompts: list[str] | None, batch_size: int, args: dict):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if prompts is None:
            raise ValueError("batch_size needs a prompt list (prompt=...)")
        for name in ("prompt_2", "negative_prompt", "negative_prompt_2", "latents", "prompt_embeds"):
            if args[name] is not None and not isinstance(args[name], str):
                raise ValueError(f"{name} cannot be combined with batch_size unless it is a single string")
        gens = args["generator"]
        per = args["num_images_per_prompt"]
        if isinstance(gens, (list, tuple)) and len(gens) != len(prompts) * per:
            raise ValueError(f"got {len(gens)} generators for {len(prompts) * per} images")
        outputs: list = []
        kwargs = {k: v for k, v in args.items() if k not in ("self", "prompts", "batch_size", "prompt", "steps")}
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            if isinstance(gens, (list, tuple)):
                kwargs["generator"] = list(gens[start * per : (start + len(chunk)) * per])
            # The base __call__, not self(...): a subclass (FluxImg2ImgPipeline, ...) has built its hook already.
            out = FluxPipeline.__call__(self, prompt=chunk, **kwargs)
            outputs.append(out.images if args["return_dict"] else out[0])
        images = _concat_outputs(outputs, args["output_type"])
        return FluxPipelineOutput(images) if args["return_dict"] else (images,)

    def _generate(self, req: _Request):
        """The recipe. Every front end (Python API, CLI, server) ends here."""
        model = self.transformer
        dev, dt = self.device, model.dtype
        # 1. Text: positive, and negative for true CFG.
        txt, vec, neg = self._embed_text(req)
        batch = txt.shape[0]

        # 2. Initial noise, packed, with position ids. Hooks encode their images first: diffusers' img2img and
        #    control pipelines draw VAE posterior samples from the generator before the noise.
        h, w = sampling.latent_size(req.height, req.width, self.vae.params.downscale)
        cond = req.conditioning
        if cond is not None:
            cond.encode(self, batch, req.generator, (h, w))
        channels = model.params.latent_channels
        if req.latents is not None:
            x = req.latents.to(dev, dt)
        else:
            noise = sampling.get_noise(
                batch,
                channels,
                req.height,
                req.width,
                generator=req.generator,
                dtype=dt,
                device=dev,
                downscale=self.vae.params.downscale,
            )
            x = sampling.pack(noise)  # [B, L_img, C*4]
        img_ids = sampling.image_ids(batch, h // 2, w // 2, device=dev)
        txt_ids = sampling.text_ids(batch, txt.shape[1], device=dev)

        # 3. Schedule: resolution-dependent shift for dev-like models, linear for schnell.
        shift = self.scheduler.shift if self.scheduler.use_dynamic_shifting else None
        sigmas = sampling.get_schedule(req.num_inference_steps, x.shape[1], shift=shift, sigmas=req.sigmas).to(dev)

        # 4. Conditioning hooks (img2img start point, fill/control channels, kontext tokens, regional masks).
        start, attn_mask = 0, None
        if cond is not None:
            x, img_ids, sigmas, start = cond.prepare(self, x, img_ids, sigmas, req.generator, (h, w))
            txt, txt_ids, attn_mask = cond.text(self, txt, txt_ids, img_ids, (h, w))

        # 5. Denoise.
        velocity = self._velocity_fn(txt, vec, txt_ids, img_ids, neg, req, cond, attn_mask)
        callback = self._make_callback(req) if req.callback_on_step_end is not None else None
        after = cond.after_step if cond is not None else None
        with torch.inference_mode(), self._placed("transformer"):
            x = sampling.denoise(velocity, x, sigmas, start=start, callback=callback, after_step=after)

        # 6. Decode and post-process.
        if req.output_type == "latent":
            images = x
        else:
            images = self.decode(sampling.unpack(x, h, w), req.output_type)
        return FluxPipelineOutput(images) if req.return_dict else (images,)

    def _embed_text(self, req: _Request):
        """(txt [B, L, D], vec [B, D], negative (txt, vec) or None), B = prompts x num_images_per_prompt."""
        dev, dt = self.device, self.transformer.dtype
        if req.prompt_embeds is not None:
            txt = _repeat(req.prompt_embeds, req.num_images_per_prompt).to(dev, dt)
            vec = _repeat(req.pooled_prompt_embeds, req.num_images_per_prompt).to(dev, dt)
        else:
            txt, vec = self.encode_prompt(
                req.prompts, req.prompts_2, req.num_images_per_prompt, req.max_sequence_length
            )
        neg = None
        if req.do_true_cfg:
            if req.negative_prompt_embeds is not None:
                neg = (
                    _repeat(req.negative_prompt_embeds, req.num_images_per_prompt).to(dev, dt),
                    _repeat(req.negative_pooled_prompt_embeds, req.num_images_per_prompt).to(dev, dt),
                )
            else:
                negs = req.negative_prompts or [""] * (txt.shape[0] // req.num_images_per_prompt)
                neg = self.encode_prompt(
                    negs, req.negative_prompts_2, req.num_images_per_prompt, req.max_sequence_length
                )
        return txt, vec, neg

    def _velocity_fn(self, txt, vec, txt_ids, img_ids, neg, req: _Request, cond, attn_mask) -> sampling.Velocity:
        model = self.transformer
        batch = txt.shape[0]
        pe = model.position_embedding(txt_ids, img_ids)  # fixed for the whole run
        pe_neg = pe  # the negative prompt has no regional tokens; its own length needs its own ids
        if neg is not None and neg[0].shape[1] != txt.shape[1]:
            neg_ids = sampling.text_ids(batch, neg[0].shape[1], device=txt_ids.device)
            pe_neg = model.position_embedding(neg_ids, img_ids)
        guidance = req.guidance_per_step if model.params.guidance_embed else None

        cache = model.step_cache
        if cache is not None:
            cache.reset()

        def velocity(x: Tensor, t: Tensor, i: int) -> Tensor:
            g = torch.full((batch,), guidance[i], device=x.device, dtype=torch.float32) if guidance else None
            inp = cond.model_input(x) if cond is not None else x
            if cache is not None:
                cache.context = "cond"
            v = model(inp, img_ids, txt, txt_ids, t, vec, g, pe=pe, attn_mask=attn_mask)[:, : x.shape[1]]
            if neg is not None:
                if cache is not None:
                    cache.context = "uncond"
                v_neg = model(inp, img_ids, neg[0], txt_ids, t, neg[1], g, pe=pe_neg)[:, : x.shape[1]]
                v = v_neg + req.true_cfg_scale * (v - v_neg)
            return v

        return velocity

    def _make_callback(self, req: _Request) -> sampling.StepCallback:
        def callback(i: int, sigma: float, x: Tensor) -> None:
            out = req.callback_on_step_end(self, i, torch.tensor(sigma * 1000), {"latents": x})
            if out and "latents" in out and out["latents"] is not x:
                x.copy_(out["latents"])

        return callback

    @torch.inference_mode()
    def decode(self, z: Tensor, output_type: str = "pil"):
        """Unpacked latents [B, 16, h, w] -> images in [0, 1] as PIL / numpy [B, H, W, 3] / tensor [B, 3, H, W]."""
        with self._placed("vae"):
            weight = next(self.vae.parameters())
            x = self.vae.decode(z.to(weight.device, weight.dtype))
        x = (x.float() / 2 + 0.5).clamp(0, 1)  # [B, 3, H, W]
        if output_type == "pt":
            return x
        arr = x.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return arr
        return [Image.fromarray(a) for a in (arr * 255).round().astype(np.uint8)]


def _concat_outputs(parts: list, output_type: str):
    if output_type == "pil":
        return [img for part in parts for img in part]
    if output_type == "np":
        return np.concatenate(parts)
    return torch.cat(parts)
