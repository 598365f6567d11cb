"""Stages `fill`, `canny`, `kontext` and `regional`: fine-tune a finished transformer (e.g. tiny-dev) into the
conditioned FLUX.1 tools variants or for regional prompts, on scenes generated and encoded on the fly
(fluxkit.train.variants_data).

- fill (in_channels 384): noisy latents + masked-image latents + packed mask; target = the whole scene.
- canny (in_channels 128): noisy latents + the edge map's latents; target = the scene.
- kontext (in_channels 64): context tokens (the scene before an edit, ids (1, row, col)) appended along the sequence,
  the prediction cut back to the noise tokens; target = the scene after the edit, prompt = the instruction.
- regional (in_channels 64): text [global; one prompt per region] under fluxkit.regional's joint attention mask;
  target = a scene with one object in each region (fluxkit.data.regions).

The loss is the base stage's rectified flow (logit-normal t + the sampler's shift, computed on the noise tokens), with
a guidance-distilled init fed `guidance` (diffusers' LoRA trainers do the same). img_in is widened with zero columns,
as BFL's Fill/Control were made, so at step 0 the model equals its initialisation on the plain latents.

mode "full" trains every weight and exports a model folder. mode "lora" freezes the init, trains a rank-r LoRA on
every linear (BFL's control-LoRA recipe) plus the widened img_in in full, and writes `lora.safetensors` in BFL's
control-LoRA layout (`<module>.lora_A/lora_B.weight`, img_in as a full-rank pair with `lora_B.bias`) that
`pipe.load_lora_weights` applies to the init model (widening its img_in); the merged model is exported too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..atomic import atomic_save_safetensors, atomic_write, atomic_write_text
from ..autoencoder import AutoEncoder
from ..conditioning import Control, Fill, Kontext
from ..hub import save_native
from ..lora import LoraAdapter, attach, linear_shapes, lora_modules, set_active
from ..model import Flux
from ..params import AutoEncoderParams, FluxParams
from ..sampling import unpack
from .ae import load_trained_ae
from .cache import CACHE_META
from .config import TrainConfig, VariantOptions
from .flow import EXPORT_DIR, noisy
from .loop import Dist, RunFolder, resolve_run
from .report import save_grid, to_uint8
from .variants_data import (
    KONTEXT_KINDS,
    Examples,
    VariantBatch,
    build_batch,
    canny_examples,
    draw_samples,
    fill_examples,
    kontext_examples,
    python_rng,
    regional_examples,
    scene_datasets,
)

ADAPTER = "lora"
LORA_FILE = "lora.safetensors"
QK_NORMS = ("norm.query_norm.scale", "norm.key_norm.scale")  # the attention's RMSNorm scales (BFL names)


# ------------------------------------------------------------------------------------------------ model set-up
def load_init(runs_dir: Path, ref: str, params: FluxParams, device: torch.device) -> Flux:
    """The model to start from, fp32 and trainable: a finished run's EMA weights, or a fluxkit model folder."""
    from ..hub import spec_from_dict
    from ..loading import load_flux_transformer

    root = resolve_run(Path(runs_dir), ref, "init")
    if (root / "fluxkit.json").is_file():  # e.g. the shipped fluxkit/weights/tiny-dev
        meta = json.loads((root / "fluxkit.json").read_text())
        have = spec_from_dict(meta["spec"]).flux
        # A guidance-distilled model may seed a model without guidance input (e.g. continuing the base from the shipped
        # tiny-dev, whose other weights are the base's after a short distillation): its guidance_in is dropped. The
        # position-id convention (centered_ids) is no weight, so a model may be continued under the other one.
        same_weights = replace(have, centered_ids=params.centered_ids)
        if same_weights != params and not (
            same_weights.guidance_embed and replace(same_weights, guidance_embed=False) == params
        ):
            raise ValueError(f"init model {root} is not the config's model {params}")
        model = load_flux_transformer(root / meta["transformer"], params=have, dtype=torch.float32)
        if same_weights != params:
            model.guidance_in = nn.Identity()
        model.params = params
        return model.requires_grad_(True).to(device)
    model = Flux(params)
    try:
        model.load_state_dict(RunFolder(root).load_ema(), strict=True)
    except RuntimeError as e:
        raise ValueError(f"init run {ref!r} does not fit {params}: {e}") from None
    return model.to(device)


def widen_img_in(model: Flux, extra: int) -> None:
    """Append `extra` zero input columns to img_in (the new inputs start with no effect) and update the params."""
    old = model.img_in
    wide = nn.Linear(old.in_features + extra, old.out_features, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, : old.in_features] = old.weight  # [hidden, in + extra]
        wide.bias.copy_(old.bias)
    model.img_in = wide
    model.params = replace(model.params, in_channels=old.in_features + extra)


def add_lora(model: Flux, opts: VariantOptions, skip: set[str], seed: int) -> list[str]:
    """Freeze the model and give each target linear a trainable adapter (A ~ N(0, 1/r), B = 0: starts as a no-op),
    rank min(rank, in, out), scale alpha / rank. Returns the adapted module names."""
    model.requires_grad_(False)
    shapes = {n: s for n, s in linear_shapes(model).items() if n not in skip}
    names = [n for n in shapes if not opts.lora_targets or any(n == p or n.endswith("." + p)
                                                                for p in opts.lora_targets)]
    missing = [p for p in opts.lora_targets if not any(n == p or n.endswith("." + p) for n in shapes)]
    if missing:
        raise ValueError(f"{opts.table()}.lora_targets {missing} match no linear module (BFL names, e.g. img_attn.qkv, "
                         f"linear1; excluded: {sorted(skip)})")
    gen, device = torch.Generator().manual_seed(seed), model.img_in.weight.device
    adapters = {}
    for name in names:
        out_f, in_f = shapes[name]
        r = min(opts.rank, in_f, out_f)
        down, up = torch.randn(r, in_f, generator=gen) / r, torch.zeros(out_f, r)  # A [r, in], B [out, r]
        adapters[name] = LoraAdapter(down, up, torch.full((r,), opts.alpha / opts.rank)).to(device)
        adapters[name].requires_grad_(True)
    attach(model, ADAPTER, adapters)
    set_active(model, {ADAPTER: 1.0})
    return names


def merged_model(model: Flux) -> Flux:
    """A plain Flux with every adapter added into its base weights (the model the LoRA file turns the init into)."""
    loras = lora_modules(model)
    prefixes = tuple(f"{name}." for name in loras)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for name, m in loras.items():
        delta, _ = m.adapters[ADAPTER].delta()  # [out, in]
        sd[f"{name}.weight"] = m.base.weight.detach().float() + delta
        sd[f"{name}.bias"] = m.base.bias.detach()
    merged = Flux(model.params)
    merged.load_state_dict(sd, strict=True)
    return merged.to(model.img_in.weight.device)


def lora_state_dict(model: Flux, init_img_in: tuple[Tensor, Tensor] | None,
                    norms: Sequence[str] = ()) -> dict[str, Tensor]:
    """BFL control-LoRA layout (flux-spec §8.4): `<module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r] with the
    scale folded in (the file's scale is 1). A widened img_in, trained in full, becomes an exact full-rank pair on the
    zero-padded init img_in, plus `img_in.lora_B.bias` = its bias change. `norms` (trained QK RMSNorm scales) are
    stored whole under their own names: BFL's replacement norm scales."""
    params = dict(model.named_parameters())
    sd = {name: params[name].detach().float().contiguous() for name in norms}
    for name, m in lora_modules(model).items():
        a = m.adapters[ADAPTER]
        sd[f"{name}.lora_A.weight"] = a.down.detach().float().contiguous()
        sd[f"{name}.lora_B.weight"] = (a.up.detach().float() * a.rank_scale.float()).contiguous()
    if init_img_in is not None:
        weight, bias = model.img_in.weight.detach().float(), model.img_in.bias.detach().float()
        w0, b0 = init_img_in
        delta = weight - F.pad(w0.float(), (0, weight.shape[1] - w0.shape[1]))  # [hidden, in]
        out_f, in_f = delta.shape
        eye = torch.eye(min(out_f, in_f), device=delta.device)
        down, up = (eye, delta) if in_f <= out_f else (delta, eye)  # up @ down == delta, rank min(out, in)
        sd["img_in.lora_A.weight"], sd["img_in.lora_B.weight"] = down.contiguous(), up.contiguous()
        sd["img_in.lora_B.bias"] = (bias - b0.float()).contiguous()
    return {k: v.cpu() for k, v in sd.items()}


def cache_autoencoder(runs_dir: Path, ref: str, device: torch.device) -> AutoEncoder:
    """The autoencoder a cache run encoded with (the one the init model learned the latents of)."""
    root = resolve_run(Path(runs_dir), ref, "cache")
    meta_path = root / CACHE_META
    if not meta_path.is_file():
        raise ValueError(f"{root} is not a finished cache run ({CACHE_META} missing): finish the cache stage")
    meta = json.loads(meta_path.read_text())
    ae = load_trained_ae(root / meta["ae"], device)
    p = meta["ae_params"]
    if ae.params != AutoEncoderParams(**{**p, "ch_mult": tuple(p["ch_mult"])}):
        raise ValueError(f"the autoencoder at {root / meta['ae']} changed since cache {ref!r} was built")
    return ae


# ------------------------------------------------------------------------------------------------ the task
class VariantTask:
    """What the three stages share; subclasses say how many input channels they add and how examples are made."""

    kind = ""
    scene_kinds: tuple[str, ...] = ("single", "count", "relation", "sign")

    def __init__(self, cfg: TrainConfig, dist: Dist, runs_dir: Path):
        from ..text import MiniLMEncoder

        self.cfg, self.dist, self.opts = cfg, dist, cfg.options
        spec = cfg.spec()
        if spec.text_encoder != "minilm":
            raise ValueError(f"the {cfg.stage} stage encodes prompts with MiniLM; preset {cfg.model!r} expects "
                             f"{spec.text_encoder!r}")
        self.ae = cache_autoencoder(runs_dir, self.opts.cache, dist.device)
        model = load_init(runs_dir, self.opts.init, spec.flux, dist.device)
        extra = self.extra_channels(spec.flux.latent_channels, self.ae.params.downscale)
        self.init_img_in = (model.img_in.weight.detach().clone(), model.img_in.bias.detach().clone()) if extra else None
        if extra:
            widen_img_in(model, extra)
        self.spec = replace(spec, name=cfg.name, flux=model.params, ae=self.ae.params)
        if self.opts.mode == "lora":
            add_lora(model, self.opts, {"img_in"} if extra else set(), cfg.seed)
            if extra:  # a widened img_in is trained in full (BFL's control LoRAs); kontext's gets an adapter
                model.img_in.requires_grad_(True)
        norms = {n: p for n, p in model.named_parameters() if n.endswith(QK_NORMS)}
        if self.opts.mode == "lora" and self.opts.train_norms:
            for p in norms.values():
                p.requires_grad_(True)
        self.norms = [n for n, p in norms.items() if p.requires_grad]  # the trained QK scales
        self.lr_multipliers = {n: self.opts.norm_lr_mult for n in self.norms} if self.opts.norm_lr_mult != 1 else {}
        model.gradient_checkpointing = cfg.train.gradient_checkpointing
        self.model = self.net = model.train()
        # bf16 only where the device computes it fast (as the cache stage held MiniLM when it embedded captions).
        dtype = torch.bfloat16 if cfg.train.bf16 else None
        self.encoder = MiniLMEncoder.from_package(dtype=dtype).to(dist.device)
        self.datasets = scene_datasets(cfg.data.seed, cfg.data.n, cfg.data.sizes, self.scene_kinds)

    # -- what each stage defines --------------------------------------------------------------------------------
    def extra_channels(self, latent_channels: int, downscale: int) -> int:
        """Input channels the stage adds to img_in (0: none, the condition rides along the sequence)."""
        return 0

    def examples(self, samples: list, rng, datasets: list) -> Examples:
        """Raw examples for scenes `samples` (drawn from `datasets`), choices drawn from the Python RNG `rng`."""
        raise NotImplementedError

    def hook(self, b: VariantBatch):
        """The inference hook (fluxkit.conditioning) for the batch's raw inputs: what the sample grids run."""
        raise NotImplementedError

    # -- training -------------------------------------------------------------------------------------------------
    def encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        txt, vec = self.encoder.encode(prompts, None, self.spec.max_sequence_length)  # [B, L, 384], [B, 384]
        return txt.float(), vec.float()

    def guidance(self, batch: int, device: torch.device) -> Tensor | None:
        return torch.full((batch,), self.opts.guidance, device=device) if self.spec.flux.guidance_embed else None

    def batch(self, gen: torch.Generator) -> VariantBatch:
        """This rank's batch for one step; every draw comes from `gen`."""
        samples = draw_samples(self.datasets, self.cfg.train.batch_size, gen, self.dist)
        ex = self.examples(samples, python_rng(gen), self.datasets)
        return build_batch(self.kind, ex, self.ae, self.encode_text, gen, self.opts.caption_dropout, self.dist.device)

    def losses(self, net: nn.Module, step: int, gen: torch.Generator) -> dict[str, Tensor]:
        return self.batch_losses(net, self.batch(gen), gen)

    def batch_losses(self, net: nn.Module, b: VariantBatch, gen: torch.Generator) -> dict[str, Tensor]:
        """Rectified flow on one batch: t, noise from `gen`; the model sees the noisy latents with the condition."""
        x_t, t, target = noisy(b.flow, gen, self.opts.logit_mean, self.opts.logit_std)  # shift from noise tokens
        img, img_ids = b.model_input(x_t)
        pred = net(img, img_ids, b.flow.txt, b.flow.txt_ids, t, b.flow.vec, self.guidance(len(t), t.device),
                   attn_mask=b.attn_mask)
        return {"loss": F.mse_loss(pred[:, : x_t.shape[1]].float(), target)}  # the noise tokens only

    # -- sample grids and export ----------------------------------------------------------------------------------
    def sample_batch(self) -> VariantBatch:
        """Fixed examples at sample.size (scenes of another seed than training's), without caption dropout."""
        sc = self.cfg.sample
        datasets = scene_datasets(sc.seed + 7_919, sc.count, (sc.size,), self.scene_kinds)
        gen = torch.Generator().manual_seed(sc.seed)
        ex = self.examples([datasets[0][i] for i in range(sc.count)], python_rng(gen), datasets)
        return build_batch(self.kind, ex, self.ae, self.encode_text, gen, 0.0, self.dist.device)

    def generate(self, pipe, b: VariantBatch, steps: int, seed: int, cfg_kw: dict) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] for the batch through the pipeline and the stage's hook."""
        height, width = b.images.shape[-2:]
        return pipe(prompt_embeds=b.flow.txt, pooled_prompt_embeds=b.flow.vec, conditioning=self.hook(b),
                    height=height, width=width, num_inference_steps=steps, output_type="pt",
                    generator=[torch.Generator().manual_seed(seed + i) for i in range(len(b.prompts))],
                    **cfg_kw).images

    def samples(self, ema: nn.Module, path: Path) -> None:
        """Rows: the condition, the output for each `sample.steps` entry (through the inference pipeline and the
        stage's hook), the target."""
        from ..pipeline import FluxPipeline

        sc, b = self.cfg.sample, self.sample_batch()
        pipe = FluxPipeline(ema, self.ae, self.encoder, self.spec)  # the encoder: the regional hook encodes prompts
        n = len(b.prompts)
        if self.spec.flux.guidance_embed:
            cfg_kw = {"guidance_scale": sc.guidance}
        else:  # an init without guidance input samples with true CFG against the empty prompt, as the base stage
            empty_txt, empty_vec = self.encode_text([""] * n)
            cfg_kw = {"true_cfg_scale": sc.guidance, "negative_prompt_embeds": empty_txt,
                      "negative_pooled_prompt_embeds": empty_vec}
        condition = b.images if b.masks is None else b.images * (1 - b.masks) + 0.5 * b.masks  # masked: grey
        rows = [to_uint8(condition * 2 - 1)]
        for steps in sc.steps:
            with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.bf16):
                out = self.generate(pipe, b, steps, sc.seed, cfg_kw)
            rows.append(to_uint8(out * 2 - 1))
        with torch.no_grad():
            h, w = (side // self.ae.params.downscale for side in b.images.shape[-2:])
            rows.append(to_uint8(self.ae.decode(unpack(b.flow.x0, h, w))))
        save_grid(rows, path, ["condition", *(f"{s} steps" for s in sc.steps), "target"])

    def finish(self, ema: nn.Module, run: RunFolder) -> dict:
        """Full: the model folder. LoRA: lora.safetensors (load_lora_weights on the init model) + the merged model."""
        summary = {"export": EXPORT_DIR, "model": self.spec.name, "in_channels": self.spec.flux.in_channels,
                   "mode": self.opts.mode}
        dtype = getattr(torch, self.opts.export_dtype)
        if self.opts.mode == "lora":
            sd = {k: v.to(dtype) for k, v in lora_state_dict(ema, self.init_img_in, self.norms).items()}
            metadata = {"format": "pt", "fluxkit_init": self.opts.init}
            atomic_save_safetensors(run.root / LORA_FILE, sd, metadata)
            ema = merged_model(ema)
            summary.update(lora=LORA_FILE, lora_parameters=sum(v.numel() for v in sd.values()))
        save_native(run.root / EXPORT_DIR, ema, self.spec, ae=self.ae, dtype=dtype)
        return summary


class FillTask(VariantTask):
    kind = "fill"

    def extra_channels(self, latent_channels: int, downscale: int) -> int:
        return latent_channels * 4 + 4 * downscale**2  # masked-image latents (64) + packed mask (256 at 8x)

    def examples(self, samples, rng, datasets) -> Examples:
        return fill_examples(samples, rng, self.opts.masks, self.opts.mask_margin)

    def hook(self, b: VariantBatch) -> Fill:
        return Fill(b.images, b.masks)


class CannyTask(VariantTask):
    kind = "canny"

    def extra_channels(self, latent_channels: int, downscale: int) -> int:
        return latent_channels * 4  # the control picture's latents

    def examples(self, samples, rng, datasets) -> Examples:
        return canny_examples(samples, rng, self.opts.edges)

    def hook(self, b: VariantBatch) -> Control:
        return Control(b.images)


class KontextTask(VariantTask):
    kind = "kontext"
    scene_kinds = KONTEXT_KINDS

    def examples(self, samples, rng, datasets) -> Examples:
        return kontext_examples(samples, rng, self.opts.edits, datasets)

    def hook(self, b: VariantBatch) -> Kontext:
        return Kontext(b.images)


class RegionalTask(VariantTask):
    """Regional prompts (fluxkit.regional): the text is [global; region 1; ...; region R] under the hook's joint
    attention mask, the target a scene with each region's object inside its region. The init model was never trained
    with masks: untouched, tiny-dev draws a small blob or nothing under them (docs/training.md, session 15)."""

    kind = "regional"
    scene_kinds = ("single",)  # only the sizes of the drawn scenes are used

    def examples(self, samples, rng, datasets) -> Examples:
        return regional_examples(samples, rng, self.opts.layouts)

    def hook(self, b: VariantBatch, i: int):
        from ..regional import RegionalPrompts

        height, width = b.images.shape[-2:]
        masks = [torch.from_numpy(r.mask(width, height)).float() for r in b.regions[i]]
        return RegionalPrompts([r.prompt for r in b.regions[i]], masks)

    def generate(self, pipe, b: VariantBatch, steps: int, seed: int, cfg_kw: dict) -> Tensor:
        """The hook shares its regions across a call, so each example is its own call."""
        (height, width), outs = b.images.shape[-2:], []
        for i, prompt in enumerate(b.prompts):
            kw = {k: v[i : i + 1] for k, v in cfg_kw.items() if isinstance(v, Tensor)}
            gen = torch.Generator().manual_seed(seed + i)
            outs.append(pipe(prompt, conditioning=self.hook(b, i), height=height, width=width,
                             num_inference_steps=steps, output_type="pt", generator=gen, **{**cfg_kw, **kw}).images)
        return torch.cat(outs)


TASKS = {"fill": FillTask, "canny": CannyTask, "kontext": KontextTask, "regional": RegionalTask}


def export_lora_variant(run_root: Path, out: Path, base: str, name: str | None = None) -> Path:
    """Ship a finished LoRA-mode variant run as a model folder `out` that reuses the shipped base model's files: its
    fluxkit.json points at the base's transformer and autoencoder (`base` is the base folder relative to `out`, e.g.
    "../tiny-dev") and at the run's lora.safetensors, copied into `out`. Loading the folder gives the base pipeline
    with the variant's adapter active, as BFL's FLUX.1-Canny-dev-lora on FLUX.1-dev. `name` (default: the run's
    config name) is the spec name and so the adapter name."""
    import os
    import shutil

    run_root, out = Path(run_root), Path(out)
    lora, done = run_root / LORA_FILE, run_root / "done.json"
    if not done.is_file() or not lora.is_file():
        raise ValueError(f"{run_root} is not a finished LoRA-mode variant run ({done.name} and {LORA_FILE} needed)")
    if Path(base).is_absolute():
        raise ValueError(f"base must be relative to the output folder, got {base!r}")
    base_dir = Path(os.path.normpath(out / base))  # out may not exist yet: resolve ".." in the text
    base_meta_file = base_dir / "fluxkit.json"
    if not base_meta_file.is_file():
        raise ValueError(f"base model folder {base_dir} has no fluxkit.json")
    base_meta = json.loads(base_meta_file.read_text())
    if base_meta.get("lora"):
        raise ValueError(f"base {base_dir} is itself a LoRA variant; point at the model it was made from")
    name = name or json.loads((run_root / "config.json").read_text()).get("name", run_root.name)
    meta = {
        "format": "fluxkit",
        "spec": {**base_meta["spec"], "name": name},
        "transformer": os.path.normpath(os.path.join(base, base_meta["transformer"])),
        "ae": os.path.normpath(os.path.join(base, base_meta["ae"])),
        "lora": LORA_FILE,
    }
    atomic_write(out / LORA_FILE, lambda tmp: shutil.copyfile(lora, tmp))
    atomic_write_text(out / "fluxkit.json", json.dumps(meta, indent=2) + "\n")  # last: the folder is complete
    return out
