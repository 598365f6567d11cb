"""Stage `base`: rectified-flow pretraining of the tiny Flux transformer on cached latents, plus what every
transformer stage shares (batches from the cache, the timestep distribution, sample grids, export).

Rectified flow (the FLUX.1 / SD3 objective): x_t = (1 - t) x0 + t noise, the network predicts the velocity
noise - x0. Timesteps are logit-normal (SD3, Esser et al. 2024) and then pushed towards noise by the same
resolution-dependent shift the sampler applies (`ShiftConfig.mu` of the image token count), so training spends its
effort where sampling will look. ~10% of captions are replaced by the empty prompt so that the same network also
predicts the unconditional velocity, which classifier-free guidance needs.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .. import sampling
from ..atomic import atomic_write
from ..hub import save_native
from ..model import Flux
from ..params import FluxParams, ModelSpec
from ..sampling import ShiftConfig
from .cache import LatentCache
from .config import FlowOptions, TrainConfig, config_from_dict
from .loop import Dist, RunFolder, resolve_run
from .report import save_grid, to_uint8

EXPORT_DIR = "export"


def init_flux(params: FluxParams, seed: int, gradient_checkpointing: bool = False) -> Flux:
    """A fresh transformer with adaLN-Zero init (DiT, Peebles & Xie 2023): every block starts as the identity
    (modulation gates 0) and the output as 0, which trains more stably than PyTorch's default init alone."""
    torch.manual_seed(seed)
    model = Flux(params)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("_mod.lin", "modulation.lin", "adaLN_modulation.1")) or name == "final_layer.linear":
                module.weight.zero_()
                module.bias.zero_()
    model.gradient_checkpointing = gradient_checkpointing
    return model


def shifted_timesteps(batch: int, seq_len: int, gen: torch.Generator, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """t [B] = time_shift(mu(seq_len), sigmoid(N(mean, std))): logit-normal, then the sampler's shift."""
    u = torch.sigmoid(torch.randn(batch, generator=gen) * std + mean)
    shift = math.exp(ShiftConfig().mu(seq_len))
    return shift / (shift + (1 / u - 1))  # fluxkit.sampling.time_shift, in torch


def position_ids(batch: int, h: int, w: int, txt_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(img_ids [B, (h/2)(w/2), 3], txt_ids [B, txt_len, 3]) for an unpacked latent of size (h, w)."""
    return sampling.image_ids(batch, h // 2, w // 2, device=device), sampling.text_ids(batch, txt_len, device)


@dataclass
class FlowBatch:
    x0: Tensor  # [B, L, 64] packed clean latents
    txt: Tensor  # [B, L_txt, 384]
    vec: Tensor  # [B, 384]
    img_ids: Tensor  # [B, L, 3]
    txt_ids: Tensor  # [B, L_txt, 3]
    weight: Tensor | None = None  # [B, L] per-token loss weights (`token_weights`), or None: all equal


def token_weights(cache: LatentCache, edge: float = 0.0, objects: float = 0.0, band: int = 1) -> None:
    """Set each bucket's `loss_weight` [n, L] to 1 + edge * (share of the token's pixels on a region edge)
    + objects * (share of its pixels covered by an object or a sign board).

    The scenes are rendered again from the cache's SceneDataset arguments (deterministic per index); a region edge is
    `RenderResult.edges` widened by `band` pixels. A token covers 16x16 pixels (8x autoencoder, 2x2 packing), so an
    outline crossing it weighs about 1 + edge / 4 and a token inside an object 1 + objects. Masked losses of this kind
    are common in subject fine-tuning. Edges are aimed at outlines, which decide shape and take few pixels; objects at
    placement: near pure noise most of the loss is the background's, and where an object goes (its position words)
    changes only the few tokens it covers."""
    from scipy import ndimage

    from ..data.dataset import SceneDataset
    from ..data.render import render
    from ..data.scenes import KINDS

    if cache.scenes is None:
        raise ValueError("flow.edge_weight and flow.object_weight need the cache's scene arguments (cache.json "
                         "'scenes'): rebuild the cache, or use one cache instead of a mix of several")
    meta = cache.scenes
    data = SceneDataset(meta["seed"], meta["n"], sizes=tuple(tuple(s) for s in meta["sizes"]),
                        kinds=tuple(meta.get("kinds", KINDS)), pairs=meta["pairs"], state=tuple(meta.get("state", ())),
                        pin=meta.get("pin"))
    patch = 16

    def share(mask, width: int, height: int) -> Tensor:  # (H, W) bool -> [tokens], the packed row-major order
        part = mask.reshape(height // patch, patch, width // patch, patch).mean(axis=(1, 3))
        return torch.from_numpy(part.astype("float32")).flatten()

    for bucket in cache.buckets:
        width, height = bucket.size
        rows = []
        for i in bucket.index.tolist():
            drawn = render(data[i].scene)  # the dataset's own render lacks the sign layers
            weight = torch.ones((height // patch) * (width // patch))
            if edge:
                edges = drawn.edges()
                if band:
                    edges = ndimage.binary_dilation(edges, iterations=band)
                weight += edge * share(edges, width, height)
            if objects:
                covered = np.zeros(drawn.image.shape[:2], bool)
                for mask in (*drawn.masks, drawn.board_mask):
                    if mask is not None:
                        covered |= mask
                weight += objects * share(covered, width, height)
            rows.append(weight)
        bucket.loss_weight = torch.stack(rows)


def draw_batch(cache: LatentCache, batch: int, gen: torch.Generator, dist: Dist, dropout: float = 0.0) -> FlowBatch:
    """A bucketed batch from this rank's shard of the cache; `dropout` of the captions become the empty prompt."""
    bucket, rows = cache.draw(batch, gen, dist.rank, dist.world)
    latents = bucket.latents[rows]  # [B, 16, h, w]
    txt, vec = bucket.txt[rows].float(), bucket.vec[rows].float()  # [B, L_txt, 384], [B, 384]
    if dropout > 0:
        drop = torch.rand(batch, generator=gen) < dropout  # [B]
        txt = torch.where(drop[:, None, None], cache.empty_txt.float(), txt)
        vec = torch.where(drop[:, None], cache.empty_vec.float(), vec)
    dev = dist.device
    weight = bucket.loss_weight[rows].to(dev) if bucket.loss_weight is not None else None
    return FlowBatch(sampling.pack(latents).to(dev), txt.to(dev), vec.to(dev),
                     *position_ids(batch, *latents.shape[-2:], txt.shape[1], dev), weight)


def flow_loss(pred: Tensor, target: Tensor, weight: Tensor | None) -> dict[str, Tensor]:
    """{"loss": MSE, token-weighted when `weight` [B, L] is given (normalised by the weights' sum, so its scale
    matches the plain MSE), "mse": the plain MSE (logged, comparable across weightings)}."""
    se = (pred.float() - target).square()  # [B, L, C]
    mse = se.mean()
    if weight is None:
        return {"loss": mse}
    return {"loss": (se.mean(-1) * weight).sum() / weight.sum(), "mse": mse.detach()}


def noisy(b: FlowBatch, gen: torch.Generator, mean: float = 0.0, std: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t [B, L, 64], t [B], velocity target noise - x0 [B, L, 64]) with logit-normal(mean, std) shifted t."""
    batch, seq_len = b.x0.shape[:2]
    t = shifted_timesteps(batch, seq_len, gen, mean, std).to(b.x0.device)
    noise = torch.randn(b.x0.shape, generator=gen).to(b.x0.device)
    x_t = (1 - t[:, None, None]) * b.x0 + t[:, None, None] * noise
    return x_t, t, noise - b.x0


@torch.no_grad()
def generate_latents(model: Flux, txt: Tensor, vec: Tensor, size: tuple[int, int], steps: int, *, shifted: bool,
                     guidance: float | None = None, cfg_scale: float = 1.0, empty: tuple[Tensor, Tensor] | None = None,
                     seed: int = 0, bf16: bool = True) -> Tensor:
    """Euler sampling from precomputed text embeddings -> latents [B, 16, h, w]; seeds seed, seed+1, ... per image.

    `guidance` feeds a guidance-distilled model; `cfg_scale` > 1 runs true CFG against `empty` (the base model).
    """
    width, height = size
    batch, dev = txt.shape[0], model.device
    gens = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    noise = sampling.get_noise(batch, model.params.latent_channels, height, width, generator=gens,
                               dtype=torch.float32, device=dev)  # [B, 16, h, w]
    h, w = noise.shape[-2:]
    x = sampling.pack(noise)  # [B, L, 64]
    img_ids, txt_ids = position_ids(batch, h, w, txt.shape[1], dev)
    pe = model.position_embedding(txt_ids, img_ids)
    sigmas = sampling.get_schedule(steps, x.shape[1], shift=ShiftConfig() if shifted else None).to(dev)
    g = torch.full((batch,), float(guidance), device=dev) if model.params.guidance_embed else None
    txt, vec = txt.to(dev).float(), vec.to(dev).float()
    if cfg_scale != 1.0:
        e_txt, e_vec = (e.to(dev).float().expand(batch, *e.shape[1:]) for e in empty)

    def velocity(x: Tensor, t: Tensor, i: int) -> Tensor:
        v = model(x, img_ids, txt, txt_ids, t, vec, g, pe=pe).float()
        if cfg_scale != 1.0:
            v_uncond = model(x, img_ids, e_txt, txt_ids, t, e_vec, g, pe=pe).float()
            v = v_uncond + cfg_scale * (v - v_uncond)
        return v

    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        x = sampling.denoise(velocity, x, sigmas)
    return sampling.unpack(x.float(), h, w)


class FlowTask:
    """What the three transformer stages share: the cache, the model spec, sample grids and the export."""

    shifted = True  # the sampler's schedule for this model (schnell: linear)

    def __init__(self, cfg: TrainConfig, dist: Dist, runs_dir: Path):
        self.cfg, self.dist = cfg, dist
        names = (cfg.options.cache,) if isinstance(cfg.options.cache, str) else cfg.options.cache
        loaded = {name: LatentCache.load(resolve_run(Path(runs_dir), name, "cache")) for name in dict.fromkeys(names)}
        self.cache = LatentCache.concat([loaded[name] for name in names])  # a cache listed twice is read once
        self.spec: ModelSpec = replace(cfg.spec(), ae=self.cache.ae_params)
        self._ae = None

    def ae(self):
        if self._ae is None:
            self._ae = self.cache.load_ae(self.dist.device)
        return self._ae

    def sample_kwargs(self) -> dict:
        return {"cfg_scale": self.cfg.sample.guidance, "empty": (self.cache.empty_txt, self.cache.empty_vec)}

    def samples(self, ema: nn.Module, path: Path) -> None:
        """One row per `sample.steps` entry, `sample.count` of the cache's sample prompts, fixed seeds."""
        sc = self.cfg.sample
        idx = [i % len(self.cache.prompts) for i in range(sc.count)]
        txt, vec = self.cache.prompt_txt[idx], self.cache.prompt_vec[idx]
        rows = []
        for steps in sc.steps:
            z = generate_latents(ema, txt, vec, sc.size, steps, shifted=self.shifted, seed=sc.seed,
                                 bf16=self.cfg.train.bf16, **self.sample_kwargs())
            with torch.no_grad():
                rows.append(to_uint8(self.ae().decode(z)))
        save_grid(rows, path, [f"{s} steps" for s in sc.steps])

    def finish(self, ema: nn.Module, run: RunFolder) -> dict:
        """The shipped format (fluxkit.hub): bf16 transformer + this run's autoencoder, loadable by from_pretrained."""
        save_native(run.root / EXPORT_DIR, ema, self.spec, ae=self.ae())
        return {"export": EXPORT_DIR, "model": self.spec.name}


class BaseTask(FlowTask):
    def __init__(self, cfg: TrainConfig, dist: Dist, runs_dir: Path):
        super().__init__(cfg, dist, runs_dir)
        if self.spec.flux.guidance_embed:
            raise ValueError(f"the base stage trains a model without guidance embedding; preset {cfg.model!r} has one")
        self.opts: FlowOptions = cfg.options
        self.model = self.net = init_flux(self.spec.flux, cfg.seed, cfg.train.gradient_checkpointing)
        if self.opts.init:
            from .variants import load_init

            self.model.load_state_dict(load_init(runs_dir, self.opts.init, self.spec.flux, dist.device).state_dict())
        if self.opts.edge_weight or self.opts.object_weight:
            token_weights(self.cache, self.opts.edge_weight, self.opts.object_weight)

    def losses(self, net: nn.Module, step: int, gen: torch.Generator) -> dict[str, Tensor]:
        b = draw_batch(self.cache, self.cfg.train.batch_size, gen, self.dist, self.opts.caption_dropout)
        x_t, t, target = noisy(b, gen, self.opts.logit_mean, self.opts.logit_std)
        pred = net(x_t, b.img_ids, b.txt, b.txt_ids, t, b.vec)  # [B, L, 64]
        return flow_loss(pred, target, b.weight)


def export_run(run_root: Path, out: Path, ae_path: str = "ae.safetensors", name: str | None = None,
               guidance: float | None = None) -> Path:
    """Copy a finished transformer run's export into `out` (e.g. fluxkit/weights/tiny-dev) with the autoencoder at
    `ae_path` relative to `out`, so that several shipped models can share one file ("../ae.safetensors"), under the
    spec name `name` (default: the run's, e.g. the preset's "tiny-dev") and with `guidance` as the folder's default
    guidance (default: the preset's; tiny-dev ships with the value its evaluation measured best).

    An autoencoder already at that path must hold the same tensors (models of one family share it).
    """
    from ..hub import spec_from_dict
    from ..loading import load_flux_transformer, load_safetensors

    src = Path(run_root) / EXPORT_DIR
    meta_file = src / "fluxkit.json"
    if not meta_file.is_file():
        raise ValueError(f"{run_root} has no export ({meta_file} missing): the run has not finished")
    if Path(ae_path).is_absolute():
        raise ValueError(f"ae_path must be relative to the output folder, got {ae_path!r}")
    meta = json.loads(meta_file.read_text())
    spec = spec_from_dict(meta["spec"])
    if name:
        spec = replace(spec, name=name)
    if guidance is not None:
        if not spec.flux.guidance_embed:
            raise ValueError(f"{run_root} is a model without guidance input: a default guidance applies only to a "
                             "guidance-distilled (dev) run")
        if not math.isfinite(guidance) or guidance < 0:
            raise ValueError(f"default guidance must be a finite number >= 0, got {guidance}")
        spec = replace(spec, default_guidance=float(guidance))
    model = load_flux_transformer(src / meta["transformer"], params=spec.flux)
    ae_src, ae_dst = src / meta["ae"], Path(out) / ae_path
    if ae_dst.is_file():
        mine, theirs = load_safetensors(ae_src), load_safetensors(ae_dst)
        if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine):
            raise ValueError(f"{ae_dst} holds a different autoencoder than {ae_src}; models sharing it must come "
                             "from the same ae run")
    else:
        atomic_write(ae_dst, lambda tmp: shutil.copyfile(ae_src, tmp))
    save_native(Path(out), model, spec, ae=None, ae_path=ae_path)
    return Path(out)


CHECKPOINT_WEIGHTS = ("ema", "model")


def export_checkpoint(run_root: Path, out: Path, step: int | None = None, weights: str = "ema",
                      name: str | None = None) -> Path:
    """Write a loadable model folder from one checkpoint of a base, dev or schnell run, finished or not: to sample,
    score (`fluxkit eval`) or probe the model a run had at step `step` (None: its latest checkpoint).

    `weights` picks the checkpoint's "ema" weights (what a finished run exports) or its raw "model" weights. The
    spec comes from the run's saved config, the autoencoder (copied into `out`) from its training cache.
    """
    from .ae import load_trained_ae
    from .cache import CACHE_META

    run = RunFolder(Path(run_root))
    if weights not in CHECKPOINT_WEIGHTS:
        raise ValueError(f"weights must be one of {CHECKPOINT_WEIGHTS}, got {weights!r}")
    saved_file = run.root / "config.json"
    if not saved_file.is_file():
        raise ValueError(f"{run.root} is not a run folder (config.json missing)")
    saved = json.loads(saved_file.read_text())
    if saved.get("stage") not in ("base", "dev", "schnell"):
        raise ValueError(f"{run.root} is a {saved.get('stage')!r} run; checkpoints export from base, dev and schnell "
                         "runs (variants: --export with --base)")
    steps = sorted(int(p.name.split("-")[1]) for p in run.checkpoints.glob("step-*") if p.is_dir())
    ckpt = run.latest() if step is None else run.checkpoints / f"step-{step:08d}"
    if ckpt is None or not ckpt.is_dir():
        raise ValueError(f"{run.root} has no checkpoint at step {step if step is not None else '(latest)'}; "
                         f"it has steps {steps or 'none'}")
    caches = saved["options"]["cache"]
    cache_root = resolve_run(run.root.parent, caches if isinstance(caches, str) else caches[0], "cache")
    ae = load_trained_ae((cache_root / json.loads((cache_root / CACHE_META).read_text())["ae"]).resolve())
    spec = replace(run_spec(run.root), ae=ae.params, **({"name": name} if name else {}))
    model = Flux(spec.flux)
    model.load_state_dict(_load_weights(ckpt / f"{weights}.safetensors"), strict=True)
    save_native(Path(out), model, spec, ae=ae)
    return Path(out)


def run_spec(run_root: Path) -> ModelSpec:
    """The model spec a training run was made with, rebuilt from its saved config.json (TrainConfig.to_dict())."""
    saved_file = Path(run_root) / "config.json"
    if not saved_file.is_file():
        raise ValueError(f"{run_root} is not a run folder (config.json missing)")
    saved = json.loads(saved_file.read_text())
    table = {"stage": saved["stage"], "name": saved["name"], "seed": saved["seed"],
             "model": {"preset": saved["model"], "flux": saved["flux_overrides"], "ae": saved["ae_overrides"]}}
    return config_from_dict(table, str(saved_file)).spec()


def _load_weights(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ValueError(f"{path} does not exist (a run without EMA weights has only model.safetensors)")
    return load_file(path)
