"""The FLUX.1 autoencoder (8x down, 16 latent channels), with batch slicing and overlapping-tile encode/decode.

Attribute names are the keys of BFL's `ae.safetensors` (`encoder.down.1.block.0.nin_shortcut.weight`, ...), so the
checkpoint loads with a strict `load_state_dict`. Every size comes from `AutoEncoderParams`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .params import AutoEncoderParams

Generator = torch.Generator | list[torch.Generator] | None


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # A 1x1 projection only where the width changes; BFL checkpoints hold `nin_shortcut` exactly there.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # [B, C_out, H, W]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (only used in the mid blocks)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x_norm = self.norm(x)
        # [B, C, H, W] -> [B, 1, H*W, C]: one head whose width is the channel count (SDPA scales by 1/sqrt(C)).
        q, k, v = (proj(x_norm).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, H*W, C]
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)  # [B, C, H, W]
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Zero-pad right and bottom only (the original LDM choice, which the checkpoint was trained with).
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # [B, C, H/2, W/2]


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, C, 2H, 2W]


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block.{j}` resnets, then an optional `downsample` / `upsample` (BFL's key layout)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, resample: str | None):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], widths[j + 1], groups) for j in range(num_blocks))
        self.resample = resample  # the attribute name, so the checkpoint key reads `down.0.downsample.conv`
        if resample == "downsample":
            self.downsample = Downsample(out_channels)
        elif resample == "upsample":
            self.upsample = Upsample(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.resample is None else getattr(self, self.resample)(x)


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in (1, *p.ch_mult)]  # input width of level i is widths[i], output widths[i + 1]
        last = len(p.ch_mult) - 1
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList(
            Level(widths[i], widths[i + 1], p.num_res_blocks, p.norm_groups, "downsample" if i < last else None)
            for i in range(len(p.ch_mult))
        )
        self.mid = MidBlock(widths[-1], p.norm_groups)
        self.norm_out = _norm(widths[-1], p.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * p.z_channels, kernel_size=3, padding=1)  # mean and logvar

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # [B, ch, H, W]
        for level in self.down:
            h = level(h)  # ends at [B, ch*ch_mult[-1], H/f, W/f]
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 2*z, H/f, W/f]


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        top = widths[-1]
        self.conv_in = nn.Conv2d(p.z_channels, top, kernel_size=3, padding=1)
        self.mid = MidBlock(top, p.norm_groups)
        # BFL indexes `up` by resolution level like the encoder (up.0 is the finest) but runs it from the top down;
        # level i reads from level i+1's width and all but level 0 end in an upsample.
        in_widths = [*widths[1:], top]
        self.up = nn.ModuleList(
            Level(in_widths[i], widths[i], p.num_res_blocks + 1, p.norm_groups, "upsample" if i > 0 else None)
            for i in range(len(widths))
        )
        self.norm_out = _norm(widths[0], p.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], p.out_ch, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # [B, ch*ch_mult[-1], h, w]
        # As BFL: the up path may be held in another dtype than the mid block.
        h = h.to(next(self.up.parameters()).dtype)
        for level in reversed(self.up):
            h = level(h)  # ends at [B, ch, h*f, w*f]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, out_ch, h*f, w*f]


def sample_gaussian(mean: Tensor, logvar: Tensor, generator: Generator = None) -> Tensor:
    """mean + std * eps, with eps drawn exactly as diffusers' `DiagonalGaussianDistribution.sample` draws it.

    diffusers (`utils/torch_utils.py:randn_tensor`) draws eps in the moments' dtype with the moments' shape; on the
    generator's device when that is the CPU (then moves it), else on the moments' device; and with a list of
    generators draws one [1, ...] slice per batch element (a list of one counts as a single generator). Matching it
    makes an img2img run consume the generator exactly as diffusers' pipeline does.
    """
    batch = mean.shape[0]
    if isinstance(generator, list):
        if len(generator) not in (1, batch):
            raise ValueError(f"generator is a list of {len(generator)} generators for a batch of {batch}")
        if len(generator) == 1:
            generator = generator[0]
    first = generator[0] if isinstance(generator, list) else generator
    rand_device = mean.device
    if first is not None and first.device.type != mean.device.type:
        if first.device.type != "cpu":
            raise ValueError(f"generator on {first.device} cannot draw noise for latents on {mean.device}")
        rand_device = torch.device("cpu")
    if isinstance(generator, list):
        shape = (1, *mean.shape[1:])
        eps = torch.cat([torch.randn(shape, generator=g, device=rand_device, dtype=mean.dtype) for g in generator])
        eps = eps.to(mean.device)  # [B, z, h, w]
    else:
        eps = torch.randn(mean.shape, generator=generator, device=rand_device, dtype=mean.dtype).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * eps


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Offsets of the fewest `tile`-long windows that cover [0, length) with neighbours overlapping >= `overlap`.

    The windows are spread evenly (the last one ends exactly at `length`), so no tile is a thin leftover strip.
    """
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))  # >= 2; (n-1) strides of <= tile-overlap span length-tile
    return [(i * (length - tile) + (n - 1) // 2) // (n - 1) for i in range(n)]


def blend_weights(starts: list[int], tile: int, length: int, scale: int) -> list[Tensor]:
    """Per-window 1-D weights in output units (`scale` output samples per input sample), summing to 1 everywhere.

    Each window's weight ramps linearly from ~0 to 1 across the region it shares with the previous window and back
    down across the region it shares with the next, so two neighbours cross-fade linearly over their whole overlap
    and the seam-adjacent pixels (the ones zero padding disturbs most) get the least weight. Dividing by the sum
    makes the weights a partition of unity even where three windows meet.
    """
    weights, total = [], torch.zeros(length * scale)
    for i, start in enumerate(starts):
        w = torch.ones(min(tile, length - start) * scale)
        if i > 0 and (shared := (starts[i - 1] + tile - start) * scale) > 0:
            w[:shared] = (torch.arange(shared) + 0.5) / shared  # pixel centres: the two ramps sum to exactly 1
        if i < len(starts) - 1 and (shared := (start + tile - starts[i + 1]) * scale) > 0:
            w[-shared:] = torch.minimum(w[-shared:], (torch.arange(shared).flip(0) + 0.5) / shared)
        total[start * scale : start * scale + len(w)] += w
        weights.append(w)
    return [w / total[s * scale : s * scale + len(w)] for w, s in zip(weights, starts)]


def run_tiled(fn: Callable[[Tensor], Tensor], x: Tensor, grid: tuple[int, int], tile: int, overlap: int,
              in_scale: int, out_scale: int) -> Tensor:
    """Apply `fn` to overlapping windows of `x` and blend the outputs (see `blend_weights`).

    Windows are laid out on `grid` (the latent height and width) in latent units: window (y0, x0) reads
    x[..., y0*in_scale : (y0+tile)*in_scale, ...] and its output lands at [y0*out_scale, ...].
    """
    (gh, gw), b = grid, x.shape[0]
    ys, xs = tile_starts(gh, tile, overlap), tile_starts(gw, tile, overlap)
    wy, wx = blend_weights(ys, tile, gh, out_scale), blend_weights(xs, tile, gw, out_scale)
    out = None
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            window = x[..., y0 * in_scale : (y0 + tile) * in_scale, x0 * in_scale : (x0 + tile) * in_scale]
            piece = fn(window)  # [B, C, th*out_scale, tw*out_scale]
            if out is None:
                # Accumulate in fp32 so a bf16 model does not add rounding where the windows overlap.
                out = torch.zeros(b, piece.shape[1], gh * out_scale, gw * out_scale, device=piece.device)
            weight = (wy[i][:, None] * wx[j][None, :]).to(piece.device)  # [th*out_scale, tw*out_scale]
            oy, ox = y0 * out_scale, x0 * out_scale
            out[..., oy : oy + piece.shape[-2], ox : ox + piece.shape[-1]] += piece.float() * weight
    return out.to(piece.dtype)


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor
        self.use_slicing = False
        self.tile_size: int | None = None  # pixels; None = tiling off
        self.tile_overlap = 0

    # ---- memory options -------------------------------------------------------------------------------------
    def enable_slicing(self) -> None:
        """Encode/decode a batch one image at a time (peak activation memory of a batch of one)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_size: int = 512, overlap: int = 128) -> None:
        """Encode/decode images larger than `tile_size` pixels in overlapping tiles blended linearly.

        Defaults suit a 1024-px model: 512-px tiles (64 latents) bound decoder activations to those of a 512x512
        decode, and a 128-px (16-latent, 25%) overlap gives the cross-fade room to hide the per-tile differences
        (each tile's GroupNorm statistics and mid-block attention only see that tile). Both are in pixels and must be
        multiples of the downscale factor; overlap must be at most half a tile.
        """
        f = self.params.downscale
        if tile_size <= 0 or tile_size % f:
            raise ValueError(f"tile_size must be a positive multiple of {f} pixels, got {tile_size}")
        if overlap < 0 or overlap % f or 2 * overlap > tile_size:
            raise ValueError(f"overlap must be a multiple of {f} in [0, tile_size/2={tile_size // 2}], got {overlap}")
        self.tile_size, self.tile_overlap = tile_size, overlap

    def disable_tiling(self) -> None:
        self.tile_size = None

    # ---- encode / decode ------------------------------------------------------------------------------------
    def _per_image(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([fn(one) for one in x.split(1)])
        return fn(x)

    def _encode_raw(self, x: Tensor) -> Tensor:
        """[B, C_in, H, W] -> moments [B, 2*z, H/f, W/f], tiled and/or sliced as configured."""
        if x.ndim != 4 or x.shape[1] != self.params.in_channels:
            raise ValueError(f"x must be [B, {self.params.in_channels}, H, W], got shape {tuple(x.shape)}")
        f, height, width = self.params.downscale, x.shape[-2], x.shape[-1]
        if self.tile_size is None or max(height, width) <= self.tile_size:
            return self._per_image(self.encoder, x)
        if height % f or width % f:
            raise ValueError(f"tiled encode needs H and W divisible by {f}, got {height}x{width}")
        tile, overlap = self.tile_size // f, self.tile_overlap // f

        def tiled(one: Tensor) -> Tensor:
            return run_tiled(self.encoder, one, (height // f, width // f), tile, overlap, in_scale=f, out_scale=1)

        return self._per_image(tiled, x)

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, 3, H, W] in [-1, 1] -> (mean, logvar), each [B, z, H/f, W/f], unscaled (for a KL term).

        logvar is clamped to [-30, 20] as the LDM / diffusers `DiagonalGaussianDistribution` does.
        """
        mean, logvar = self._encode_raw(x).chunk(2, dim=1)  # [B, z, h, w] each
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: Tensor, sample: bool = False, generator: Generator = None) -> Tensor:
        """x [B, 3, H, W] in [-1, 1] -> z = scale_factor * (latent - shift_factor), [B, z, H/f, W/f].

        latent is the posterior mean (BFL inference), or with `sample=True` a draw from the posterior using
        `generator` the way diffusers' img2img pipelines draw it (see `sample_gaussian`).
        """
        if generator is not None and not sample:
            raise ValueError("generator was given but sample=False; the mean uses no randomness")
        mean, logvar = self.encode_moments(x)
        latent = sample_gaussian(mean, logvar, generator) if sample else mean
        return self.scale_factor * (latent - self.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """z [B, z, h, w] (scaled as `encode` returns it) -> x [B, 3, h*f, w*f], roughly in [-1, 1], not clamped."""
        if z.ndim != 4 or z.shape[1] != self.params.z_channels:
            raise ValueError(f"z must be [B, {self.params.z_channels}, h, w], got shape {tuple(z.shape)}")
        z = z / self.scale_factor + self.shift_factor
        f, (h, w) = self.params.downscale, z.shape[-2:]
        if self.tile_size is None or max(h, w) * f <= self.tile_size:
            return self._per_image(self.decoder, z)
        tile, overlap = self.tile_size // f, self.tile_overlap // f

        def tiled(one: Tensor) -> Tensor:
            return run_tiled(self.decoder, one, (h, w), tile, overlap, in_scale=1, out_scale=f)

        return self._per_image(tiled, z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def seam_mask(height: int, width: int, tile_size: int, overlap: int, downscale: int) -> Tensor:
    """Bool [H, W] image mask of the seam bands of this decode tiling.

    A band is where two tiles overlap and are blended; with `overlap=0` (hard cuts) it is one latent (`downscale`
    pixels) either side of each cut.
    """
    if height % downscale or width % downscale:
        raise ValueError(f"image size {height}x{width} is not a multiple of the downscale factor {downscale}")
    tile, ov = tile_size // downscale, overlap // downscale
    masks = []
    for length in (height // downscale, width // downscale):
        band = torch.zeros(length * downscale, dtype=torch.bool)
        starts = tile_starts(length, tile, ov)
        pad = 0 if ov else 1  # latents added either side of a hard cut
        for prev, nxt in pairwise(starts):
            band[(nxt - pad) * downscale : (prev + tile + pad) * downscale] = True
        masks.append(band)
    return masks[0][:, None] | masks[1][None, :]  # [H, W]


def seam_error(ae: AutoEncoder, untiled: Tensor, tiled: Tensor) -> dict[str, float]:
    """How far a tiled decode is from the untiled one, in the blended seam bands versus everywhere else.

    `untiled` and `tiled` are `ae.decode` outputs [B, C, H, W] of the same latent without and with `ae`'s current
    tiling. Seams would be visible if the error were concentrated in the bands (`seam_*` >> `interior_*`).
    """
    if ae.tile_size is None:
        raise ValueError("ae has tiling disabled; call ae.enable_tiling(...) with the settings `tiled` was made with")
    if untiled.shape != tiled.shape:
        raise ValueError(f"untiled {tuple(untiled.shape)} and tiled {tuple(tiled.shape)} shapes differ")
    mask = seam_mask(*tiled.shape[-2:], ae.tile_size, ae.tile_overlap, ae.params.downscale)
    if not mask.any():
        raise ValueError(f"a {tiled.shape[-2]}x{tiled.shape[-1]} image fits in one {ae.tile_size}-px tile: no seams")
    err = (tiled.float() - untiled.float()).abs().amax(dim=(0, 1)).cpu()  # [H, W], worst channel / batch element
    return {
        "max": err.max().item(),
        "mean": err.mean().item(),
        "seam_max": err[mask].max().item(),
        "seam_mean": err[mask].mean().item(),
        "interior_max": err[~mask].max().item() if (~mask).any() else 0.0,
        "interior_mean": err[~mask].mean().item() if (~mask).any() else 0.0,
    }
