"""Stage `ae`: train the tiny FLUX autoencoder on rendered scenes, then fix its latent scale and shift from data.

Loss per batch (one image size per batch, sizes drawn per step): L1 + MSE + an L1 on image gradients (sharp letter
strokes and shape edges) on the reconstruction of a posterior sample, plus a small KL(q(z|x) || N(0, 1)) so the
latents stay bounded and smooth, as the LDM/FLUX autoencoders are trained (without their GAN and LPIPS terms).
Optional: a scale-equivariance term (the decoder maps the 2x-pooled latent to the 2x-pooled image) and `ae.init`, to
fine-tune an existing autoencoder with it.
At the end: shift_factor = mean, scale_factor = 1/std of the posterior means over `stats_scenes` scenes, so that
z = scale * (latent - shift) has unit variance for the transformer; PSNR on held-out scenes by size and kind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from ..atomic import atomic_save_safetensors, atomic_write, atomic_write_text
from ..autoencoder import AutoEncoder
from ..data import SceneDataset
from ..params import AutoEncoderParams
from .config import AEOptions, TrainConfig
from .loop import Dist, RunFolder, resolve_run
from .report import save_grid, to_uint8

AE_FILE, AE_META = "ae.safetensors", "ae.json"


class AEForward(nn.Module):
    """The VAE training pass as one module call, so DistributedDataParallel sees (and syncs) every parameter."""

    def __init__(self, ae: AutoEncoder):
        super().__init__()
        self.ae = ae

    def forward(self, x: Tensor, eps: Tensor, pooled: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        mean, logvar = self.ae.encode_moments(x)  # [B, z, h, w] each, unscaled
        z = mean + torch.exp(0.5 * logvar) * eps  # reparameterised posterior sample
        small = self.ae.decoder(F.avg_pool2d(z, 2)) if pooled else None  # [B, 3, H/2, W/2]
        return self.ae.decoder(z), mean, logvar, small  # reconstruction [B, 3, H, W]


def images_to_tensor(images: list[np.ndarray]) -> Tensor:
    """(H, W, 3) uint8 images of one size -> [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def gradient_l1(a: Tensor, b: Tensor) -> Tensor:
    """Mean |finite difference of a - that of b| along x and y."""
    dx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
    dy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


class AETask:
    def __init__(self, cfg: TrainConfig, dist: Dist, runs_dir: Path | None = None):
        self.cfg, self.dist = cfg, dist
        self.opts: AEOptions = cfg.options
        self.params = cfg.spec().ae
        torch.manual_seed(cfg.seed)
        self.model = AutoEncoder(self.params)
        if self.opts.init:
            load_init_ae(self.model, self.opts.init, runs_dir)
        self.net = AEForward(self.model)
        # One dataset per size: a batch must share a size, and SceneDataset picks the size inside each item.
        self.datasets = [SceneDataset(cfg.data.seed + k, cfg.data.n, sizes=(size,))
                         for k, size in enumerate(cfg.data.sizes)]
        crop, f = self.opts.crop, self.params.downscale
        if crop and (crop % f or crop > min(min(s) for s in cfg.data.sizes)):
            raise ValueError(f"ae.crop must be a multiple of {f} no larger than the smallest image side, got {crop}")

    def batch(self, step: int, gen: torch.Generator) -> Tensor:
        """This rank's batch: one size drawn per step, scene indices drawn from the rank's shard (i % world == rank)."""
        data = self.datasets[int(torch.randint(len(self.datasets), (), generator=gen))]
        shard = math.ceil((data.n - self.dist.rank) / self.dist.world)
        picks = torch.randint(shard, (self.cfg.train.batch_size,), generator=gen) * self.dist.world + self.dist.rank
        images = [data[int(i)].image for i in picks]
        if self.opts.crop:
            c = self.opts.crop
            h, w = images[0].shape[:2]
            ys = torch.randint(h - c + 1, (len(images),), generator=gen).tolist()
            xs = torch.randint(w - c + 1, (len(images),), generator=gen).tolist()
            images = [im[y : y + c, x : x + c] for im, y, x in zip(images, ys, xs)]
        return images_to_tensor(images).to(self.dist.device)

    def losses(self, net: nn.Module, step: int, gen: torch.Generator) -> dict[str, Tensor]:
        x = self.batch(step, gen)  # [B, 3, H, W]
        f = self.params.downscale
        eps = torch.randn(x.shape[0], self.params.z_channels, x.shape[2] // f, x.shape[3] // f, generator=gen)
        o = self.opts
        rec, mean, logvar, small = net(x, eps.to(x.device), o.scale_equivariance_weight > 0)
        rec = rec.float()
        mean, logvar = mean.float(), logvar.float()
        l1, mse, edge = (rec - x).abs().mean(), F.mse_loss(rec, x), gradient_l1(rec, x)
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()  # KL(N(mean, var) || N(0, 1)) per element
        loss = o.l1_weight * l1 + o.mse_weight * mse + o.edge_weight * edge + o.kl_weight * kl
        out = {"l1": l1, "mse": mse, "edge": edge, "kl": kl}
        if small is not None:
            target = F.avg_pool2d(x, 2)  # [B, 3, H/2, W/2]
            out["scale_eq"] = (small.float() - target).abs().mean() + F.mse_loss(small.float(), target)
            loss = loss + o.scale_equivariance_weight * out["scale_eq"]
        return {"loss": loss, **out}

    @torch.no_grad()
    def samples(self, ema: nn.Module, path: Path) -> None:
        """Two rows: fixed held-out scenes and their reconstructions (posterior mean)."""
        data = SceneDataset(self.opts.eval_seed, self.cfg.sample.count, sizes=(self.cfg.sample.size,), pairs="any")
        x = images_to_tensor([data[i].image for i in range(len(data))]).to(self.dist.device)
        mean, _ = ema.encode_moments(x)
        save_grid([to_uint8(x), to_uint8(ema.decoder(mean))], path, ["scene", "recon"])

    def finish(self, ema: nn.Module, run: RunFolder) -> dict:
        weights = {k: v.detach().float().contiguous().cpu() for k, v in ema.state_dict().items()}
        atomic_save_safetensors(run.root / AE_FILE, weights)
        return describe_ae(ema, self.cfg, run.root, self.dist.device)


def describe_ae(ae: AutoEncoder, cfg: TrainConfig, root: Path, device: torch.device) -> dict:
    """Data-derived scale/shift and held-out PSNR of a trained autoencoder, written to root/ae.json; the summary."""
    opts: AEOptions = cfg.options
    shift, scale = latent_statistics(ae, cfg.data.sizes, opts.stats_scenes, opts.eval_seed + 1, device)
    params = dataclasses.replace(ae.params, scale_factor=scale, shift_factor=shift)
    psnr = reconstruction_psnr(ae, cfg.data.sizes, opts.eval_scenes, opts.eval_seed, device)
    atomic_write_text(root / AE_META, json.dumps({"params": dataclasses.asdict(params), **psnr}, indent=2))
    return {"scale_factor": scale, "shift_factor": shift, **psnr}


def load_init_ae(ae: AutoEncoder, ref: str, runs_dir: Path | None) -> None:
    """Load the weights to fine-tune from: an ae run (its name under runs_dir, or a path) or a .safetensors file."""
    path = Path(ref).expanduser()
    if path.suffix != ".safetensors":
        if runs_dir is None:
            raise ValueError(f"ae.init {ref!r} names a run, but no runs dir was given")
        path = resolve_run(Path(runs_dir), ref, "ae.init") / AE_FILE
    if not path.is_file():
        raise ValueError(f"ae.init: no autoencoder weights at {path}")
    try:
        ae.load_state_dict(load_file(path), strict=True)
    except RuntimeError as e:
        raise ValueError(f"ae.init {path} does not fit the config's autoencoder: {e}") from None


def adopt_ae(cfg: TrainConfig, weights: Path, runs_dir: Path, dist: Dist) -> RunFolder:
    """A finished `ae` run made from already-trained weights (e.g. the shipped fluxkit/weights/ae.safetensors), so the
    later stages can start without retraining it: the file is copied unchanged (exports that share it stay
    bit-identical), its scale/shift factors and PSNR are measured as the ae stage's ending measures them."""
    weights = Path(weights)
    if weights.suffix != ".safetensors" or not weights.is_file():
        raise ValueError(f"--from-weights needs an existing .safetensors file, got {weights}")
    ae = AutoEncoder(cfg.spec().ae)
    try:
        ae.load_state_dict(load_file(weights), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights} does not match the autoencoder of preset {cfg.model!r}: {e}") from None
    ae = ae.to(dist.device).eval().requires_grad_(False)
    run = RunFolder.prepare(cfg, runs_dir, False, dist)
    atomic_write(run.root / AE_FILE, lambda tmp: shutil.copyfile(weights, tmp))
    summary = describe_ae(ae, cfg, run.root, dist.device)
    run.mark_done({"stage": "ae", "adopted_from": str(weights), **summary})
    return run


@torch.no_grad()
def latent_statistics(ae: AutoEncoder, sizes, n: int, seed: int, device: torch.device) -> tuple[float, float]:
    """(mean, 1/std) of all posterior-mean latent elements over n training-distribution scenes."""
    data = SceneDataset(seed, n, sizes=tuple(sizes))
    total, total_sq, count = 0.0, 0.0, 0
    for samples in _by_size(data):
        mean, _ = ae.encode_moments(images_to_tensor([s.image for s in samples]).to(device))
        total += mean.double().sum().item()
        total_sq += mean.double().square().sum().item()
        count += mean.numel()
    mu = total / count
    std = math.sqrt(max(total_sq / count - mu * mu, 1e-12))
    return mu, 1.0 / std


@torch.no_grad()
def reconstruction_psnr(ae: AutoEncoder, sizes, n: int, seed: int, device: torch.device) -> dict:
    """Mean per-image PSNR (dB, pixels in [0, 1]) on n held-out scenes (held-out colour x shape pairs included)."""
    data = SceneDataset(seed, n, sizes=tuple(sizes), pairs="any")
    by_size, by_kind, every = defaultdict(list), defaultdict(list), []
    for samples in _by_size(data):
        x = images_to_tensor([s.image for s in samples]).to(device)
        mean, _ = ae.encode_moments(x)
        rec = ae.decoder(mean).float().clamp(-1, 1)
        mse = ((rec - x) / 2).square().mean(dim=(1, 2, 3)).clamp(min=1e-10)  # [B], in [0, 1] units
        for sample, value in zip(samples, (-10 * torch.log10(mse)).tolist()):
            by_size[f"{sample.scene.width}x{sample.scene.height}"].append(value)
            by_kind[sample.scene.kind].append(value)
            every.append(value)
    return {"psnr": float(np.mean(every)), "psnr_by_size": {k: float(np.mean(v)) for k, v in sorted(by_size.items())},
            "psnr_by_kind": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())}}


def _by_size(data: SceneDataset, batch: int = 32):
    """Yield lists of `Sample`s, each list of one image size."""
    groups = defaultdict(list)
    for i in range(len(data)):
        sample = data[i]
        groups[sample.image.shape].append(sample)
    for members in groups.values():
        for start in range(0, len(members), batch):
            yield members[start : start + batch]


def load_trained_ae(run_root: Path, device: torch.device | str = "cpu") -> AutoEncoder:
    """The autoencoder an `ae` run wrote (fp32, eval mode), with its data-derived scale and shift factors."""
    meta_path = Path(run_root) / AE_META
    if not meta_path.is_file():
        raise ValueError(f"{run_root} holds no trained autoencoder ({AE_META} missing): finish the ae stage first")
    p = json.loads(meta_path.read_text())["params"]
    ae = AutoEncoder(AutoEncoderParams(**{**p, "ch_mult": tuple(p["ch_mult"])}))
    ae.load_state_dict(load_file(Path(run_root) / AE_FILE), strict=True)
    return ae.to(device).eval().requires_grad_(False)
