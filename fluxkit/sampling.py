"""Sampling as plain functions: noise -> pack/ids -> schedule -> Euler loop -> unpack.

The network is passed to `denoise` as a callable, so the loop knows nothing of text, guidance or conditioning.
Noise, schedule and update follow diffusers' FluxPipeline + FlowMatchEulerDiscreteScheduler bit for bit, so the
same `torch.Generator` gives the same image in both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

Generator = torch.Generator | Sequence[torch.Generator] | None


def latent_size(height: int, width: int, downscale: int = 8) -> tuple[int, int]:
    """Unpacked latent (h, w) for an image; both even so that 2x2 packing works."""
    return 2 * (height // (downscale * 2)), 2 * (width // (downscale * 2))


def get_noise(
    batch: int,
    channels: int,
    height: int,
    width: int,
    *,
    generator: Generator,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    downscale: int = 8,
) -> Tensor:
    """Initial noise [B, C, h, w], drawn exactly as diffusers' `randn_tensor` draws it.

    A CPU generator draws on the CPU (then the tensor moves); a list draws one sample per generator.
    """
    device = torch.device(device)
    h, w = latent_size(height, width, downscale)
    if isinstance(generator, Sequence) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, Sequence):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch} images")
        draws = [torch.randn((1, channels, h, w), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(draws).to(device)
    rand_device = generator.device if generator is not None else device
    return torch.randn((batch, channels, h, w), generator=generator, device=rand_device, dtype=dtype).to(device)


def pack(x: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), C*4]; channel index c*4 + dy*2 + dx, tokens row-major."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [B, h/2, w/2, C, 2, 2]
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: Tensor, h: int, w: int) -> Tensor:
    """Inverse of `pack` for an unpacked latent of size (h, w)."""
    b, _, d = x.shape
    x = x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # [B, C, h/2, 2, w/2, 2]
    return x.reshape(b, d // 4, h, w)


def image_ids(batch: int, h2: int, w2: int, index: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """Position ids [B, h2*w2, 3] = (index, row, col) over the packed grid; index 1 marks Kontext context tokens."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    return ids.reshape(1, h2 * w2, 3).expand(batch, -1, -1).to(device)


def centre_image_ids(ids: Tensor) -> Tensor:
    """Image ids [B, L, 3] with each image's rows and columns shifted so that its grid's middle is (0, 0).

    Each value of the first axis (0: the generated image, 1: a Kontext context image) is one image, centred on its
    own middle: an 8-token row becomes -3.5 ... 3.5, so "left" is a negative column at every image width.
    """
    out = ids.clone()
    for index in ids[..., 0].unique():
        member = ids[..., 0] == index
        for axis in (1, 2):
            values = ids[..., axis][member]
            centre = (values.min() + values.max()) / 2
            out[..., axis] = torch.where(member, out[..., axis] - centre, out[..., axis])
    return out


def text_ids(batch: int, length: int, device: torch.device | str = "cpu") -> Tensor:
    """Text tokens all sit at position (0, 0, 0): RoPE leaves them unrotated."""
    return torch.zeros(batch, length, 3, device=device)


@dataclass(frozen=True)
class ShiftConfig:
    """The resolution-dependent shift (diffusers scheduler config / BFL get_schedule defaults)."""

    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    def mu(self, image_seq_len: int) -> float:
        # Linear in the token count through (256, 0.5) and (4096, 1.15); extrapolates outside (BFL sampling.py).
        m = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return image_seq_len * m + (self.base_shift - m * self.base_seq_len)


def time_shift(mu: float, sigmas: np.ndarray) -> np.ndarray:
    """e^mu / (e^mu + (1/t - 1)); the same as a static shift s = e^mu. Kept in the array's dtype (float32)."""
    with np.errstate(divide="ignore"):
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)


def get_schedule(
    num_steps: int,
    image_seq_len: int,
    *,
    shift: ShiftConfig | None,
    sigmas: Sequence[float] | None = None,
) -> Tensor:
    """Sigmas [num_steps + 1] from 1 towards 0, terminal 0 appended; `shift=None` gives schnell's linear schedule.

    Computed in float32 numpy as diffusers' FlowMatchEulerDiscreteScheduler does, so both give identical values.
    """
    if sigmas is None:
        if num_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
        base = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    else:
        base = np.asarray(sigmas, dtype=np.float32)
        if base.ndim != 1 or len(base) == 0 or not np.all((base > 0) & (base <= 1)):
            raise ValueError(f"sigmas must be a non-empty 1-D list of values in (0, 1], got {list(sigmas)}")
    if shift is not None:
        base = time_shift(shift.mu(image_seq_len), base)
    out = torch.from_numpy(np.asarray(base)).to(torch.float32)
    return torch.cat([out, torch.zeros(1)])


# velocity(x [B, L, C], sigma [B], step index) -> predicted velocity (noise - x0), same shape as x.
Velocity = Callable[[Tensor, Tensor, int], Tensor]
# callback(step index, sigma, x after the step) -> None; raise to cancel.
StepCallback = Callable[[int, float, Tensor], None]


def euler_step(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """x_{next} = x + (sigma_next - sigma) * v; accumulated in fp32 like diffusers' scheduler, returned in x's dtype."""
    return (x.float() + v * (sigma_next - sigma)).to(x.dtype)


def denoise(
    velocity: Velocity,
    x: Tensor,
    sigmas: Tensor,
    *,
    start: int = 0,
    callback: StepCallback | None = None,
    after_step: Callable[[Tensor, int], Tensor] | None = None,
) -> Tensor:
    """Integrate the flow from sigmas[start] to 0 with Euler steps.

    `after_step(x, i)` lets a conditioning hook edit the state after step i (inpainting's latent blending).
    """
    batch = x.shape[0]
    for i in range(start, len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = velocity(x, sigma.expand(batch).to(x.dtype), i)
        x = euler_step(x, v, sigma, sigma_next)
        if after_step is not None:
            x = after_step(x, i)
        if callback is not None:
            callback(i, float(sigma), x)
    return x
