"""Conditioning hooks: image-to-image, inpainting, Fill, structure control and Kontext on the one pipeline.

`FluxPipeline._generate` runs one recipe and calls a hook at fixed points (see `Conditioning`): each variant is a hook,
never a copy of the sampling loop. Generator use follows diffusers' pipelines of the same names, so one generator
gives the same image: where diffusers *samples* the VAE posterior we do too, in the same order (the start image before
the noise draw, Fill's masked image after it); BFL's code uses the posterior mean (flux-spec §5.1). Kontext uses the
mean in both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .sampling import image_ids, pack

Size = tuple[int, int]  # unpacked latent (h, w) of the generated image


class Conditioning:
    """The hook protocol. The pipeline calls, in this order:

    1. `encode(pipe, batch, generator, size)` before it draws the initial noise (VAE encodes that consume the
       generator first, as diffusers' img2img / control pipelines do);
    2. `prepare(pipe, x, img_ids, sigmas, generator, size) -> (x, img_ids, sigmas, start)` after the noise draw and
       the schedule: may change the start state, append position ids, or start later in the schedule;
    3. `text(pipe, txt, txt_ids, img_ids, size) -> (txt, txt_ids, attn_mask)` may append text tokens and give a
       joint attention mask (regional prompts);
    4. per step, `model_input(x)` builds the transformer's image input from the state x, and `after_step(x, i)`
       edits the state after Euler step i.
    A hook holds the tensors of the run it is used in; it can be reused for another call.
    """

    starts_late = False  # it picks the start index (img2img family): at most one per composition
    adds_text = False  # it implements `text` (regional prompts): at most one per composition
    adds_tokens = False  # it appends image tokens along the sequence (Kontext)

    def extra_channels(self, pipe) -> int:
        """Channels `model_input` appends to the packed latent (the model's img_in must be that much wider)."""
        return 0

    def encode(self, pipe, batch: int, generator, size: Size) -> None:
        return None

    def prepare(self, pipe, x: Tensor, img_ids: Tensor, sigmas: Tensor, generator, size: Size):
        return x, img_ids, sigmas, 0

    def text(self, pipe, txt: Tensor, txt_ids: Tensor, img_ids: Tensor, size: Size):
        return txt, txt_ids, None

    def model_input(self, x: Tensor) -> Tensor:
        return x

    def after_step(self, x: Tensor, i: int) -> Tensor:
        return x


def model_layout(pipe) -> str:
    """'base', 'control' or 'fill' from the transformer's input width (Fill 384, Canny/Depth 128, others 64)."""
    packed = pipe.transformer.params.latent_channels * 4  # one packed latent: 64
    extra = pipe.transformer.img_in.in_features - packed
    return {0: "base", packed: "control", packed + 4 * pipe.vae.params.downscale**2: "fill"}.get(extra, "unknown")


def check_conditioning(cond, pipe) -> None:
    """At the API boundary: `cond` is a hook (or None) and the transformer's input width is what it needs."""
    if cond is not None and not isinstance(cond, Conditioning):
        raise ValueError(f"conditioning must be a fluxkit.conditioning hook, got {type(cond).__name__}")
    have = pipe.transformer.img_in.in_features
    need = pipe.transformer.params.latent_channels * 4 + (cond.extra_channels(pipe) if cond is not None else 0)
    if have == need:
        return
    what = {"base": "a text-to-image model", "control": "a Canny/Depth control model", "fill": "a Fill model"}
    used = type(cond).__name__ if cond is not None else "no conditioning"
    raise ValueError(
        f"{used} needs a transformer with img_in width {need}, but this one takes {have} "
        f"({what.get(model_layout(pipe), 'a model of unknown layout')}); "
        "use FluxFillPipeline / Fill for Fill models and FluxControlPipeline / Control for control models"
    )


# -- image inputs: PIL images (or lists of them) or float tensors in [0, 1], as diffusers takes them ------------------
ImageInput = Image.Image | Sequence[Image.Image] | Tensor


def check_image(image, name: str):
    """Type and range check at construction; sizes are checked when the generation size is known."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (list, tuple)) and image and all(isinstance(i, Image.Image) for i in image):
        return list(image)
    numeric = isinstance(image, Tensor) and (image.is_floating_point() or image.dtype == torch.bool)
    if numeric and image.ndim in (2, 3, 4):
        if image.numel() and (image.min() < 0 or image.max() > 1):
            raise ValueError(f"{name} tensor values must lie in [0, 1], got [{image.min():.3g}, {image.max():.3g}]")
        return image
    raise ValueError(
        f"{name} must be a PIL image, a non-empty list of them, or a float tensor [N, C, H, W] in [0, 1]; "
        f"got {type(image).__name__}"
    )


def _as_tensor(image, size: Size | None, name: str, channels: int, multiple: int) -> Tensor:
    """-> float32 [N, channels, H, W] in [0, 1]. PIL images are resized to `size` (LANCZOS, as diffusers does)."""
    if isinstance(image, Tensor):
        x = image.float()
        x = x[None, None] if x.ndim == 2 else x[None] if x.ndim == 3 else x  # [N, C, H, W]
        if x.shape[1] != channels:
            raise ValueError(f"{name} tensor must have {channels} channel(s), got shape {tuple(image.shape)}")
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            raise ValueError(f"{name} is {x.shape[-2]}x{x.shape[-1]} but the image is {size[0]}x{size[1]} (HxW)")
    else:
        images = image if isinstance(image, list) else [image]
        if size is not None:  # PIL sizes are (W, H)
            images = [i if i.size == size[::-1] else i.resize(size[::-1], Image.LANCZOS) for i in images]
        mode = "RGB" if channels == 3 else "L"
        arrays = [np.asarray(i.convert(mode), dtype=np.float32) / 255.0 for i in images]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(f"the {name} images differ in size: {[i.size for i in images]}")
        x = torch.from_numpy(np.stack(arrays)).reshape(len(arrays), arrays[0].shape[0], arrays[0].shape[1], -1)
        x = x.permute(0, 3, 1, 2)  # [N, C, H, W]
    if size is None and (x.shape[-2] % multiple or x.shape[-1] % multiple):
        raise ValueError(f"{name} is {x.shape[-2]}x{x.shape[-1]} (HxW); both sides must be multiples of {multiple}")
    return x


def to_pixels(image, size: Size | None, name: str, multiple: int = 1) -> Tensor:
    """An image input -> [N, 3, H, W] in [-1, 1], at `size` (pixels) or its own size when None."""
    return _as_tensor(image, size, name, 3, multiple) * 2.0 - 1.0


def to_mask(mask, size: Size, name: str) -> Tensor:
    """A mask input (white = regenerate) -> [N, 1, H, W] of 0/1, binarized at 0.5 as diffusers' mask processor does."""
    return (_as_tensor(mask, size, name, 1, 1) >= 0.5).float()


def pad_for_outpaint(
    image: Image.Image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0, fill=(128, 128, 128)
) -> tuple[Image.Image, Image.Image]:
    """Outpainting = Fill on a larger canvas: -> (padded image, mask that is white on the new border).

    The border is filled with mid grey (what Fill's masking turns every masked pixel into anyway). The padded size
    must suit the model (a multiple of 16 pixels); choose the padding accordingly.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image, got {type(image).__name__}")
    for name, value in (("left", left), ("right", right), ("top", top), ("bottom", bottom)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    width, height = image.width + left + right, image.height + top + bottom
    canvas = Image.new("RGB", (width, height), fill)
    canvas.paste(image.convert("RGB"), (left, top))
    mask = Image.new("L", (width, height), 255)
    mask.paste(0, (left, top, left + image.width, top + image.height))
    return canvas, mask


# -- helpers shared by the hooks ------------------------------------------------------------------------------------
def pixel_size(pipe, size: Size) -> Size:
    f = pipe.vae.params.downscale
    return size[0] * f, size[1] * f


def vae_latents(pipe, pixels: Tensor, batch: int, generator, sample: bool, name: str) -> Tensor:
    """Pixels [N, 3, H, W] in [-1, 1] (N = 1 or batch) -> packed latents [batch, L, 64] in the transformer's dtype.

    Sampling follows diffusers' `_encode_vae_image`: one generator draws for the N images at once, and with a list
    image i draws with generator i. One difference: a single image with a list of generators is first repeated,
    so that every generated image draws from its own generator and its result does not depend on the batch it is
    in (diffusers draws once, from the first generator; image 0 still matches it).
    """
    if sample and isinstance(generator, (list, tuple)) and len(generator) > 1:
        pixels = to_batch(pixels, batch, name)
    if isinstance(generator, (list, tuple)):
        generator = list(generator[: pixels.shape[0]])
    with torch.inference_mode(), pipe._placed("vae"):
        weight = next(pipe.vae.parameters())
        pixels = pixels.to(weight.device, weight.dtype)
        z = pipe.vae.encode(pixels, sample=sample, generator=generator if sample else None)  # [N, 16, h, w]
    return to_batch(pack(z.to(pipe.device, pipe.transformer.dtype)), batch, name)


def to_batch(x: Tensor, batch: int, name: str) -> Tensor:
    """One item -> `batch` copies; `batch` items are kept; any other count is an error."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise ValueError(f"{name} has {x.shape[0]} images for {batch} generated images; pass 1 or {batch}")


def start_index(num_steps: int, strength: float) -> int:
    """diffusers' img2img convention (`get_timesteps`): skip int(n - min(n * strength, n)) of the n steps.

    BFL's demos use int((1 - strength) * n), which rounds differently for ~2% of (n, strength) pairs (flux-spec §5.6);
    we follow diffusers so that the diffusers-named pipelines match it step for step.
    """
    start = int(max(num_steps - min(num_steps * strength, num_steps), 0))
    if start >= num_steps:
        raise ValueError(f"strength {strength} with {num_steps} steps leaves no step to run; raise either")
    return start


def pack_mask(mask: Tensor, downscale: int) -> Tensor:
    """Pixel mask [B, 1, H, W] -> Fill's packed mask [B, L, 4 * f * f] (BFL `prepare_fill`, flux-spec §7.1).

    Each f x f pixel block becomes f*f channels of one latent pixel (channel py*f + px), then the usual 2x2 packing.
    """
    b, _, height, width = mask.shape
    h, w = height // downscale, width // downscale
    m = mask.view(b, h, downscale, w, downscale).permute(0, 2, 4, 1, 3)  # [B, f, f, h, w]
    return pack(m.reshape(b, downscale * downscale, h, w))  # [B, h/2 * w/2, 4 * f * f]


def _fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


# -- the hooks --------------------------------------------------------------------------------------------------------
class Img2Img(Conditioning):
    """Start from `image` noised to the sigma of the start index (SDEdit), on any model. strength 1.0 starts from
    pure noise (the image is unused); small strengths keep the image close. Start index, noising and generator use
    follow diffusers' FluxImg2ImgPipeline (`get_timesteps`, `scale_noise`, posterior sample before the noise)."""

    starts_late = True

    def __init__(self, image: ImageInput, strength: float = 0.6):
        self.image = check_image(image, "image")
        self.strength = _fraction(strength, "strength")

    def encode(self, pipe, batch, generator, size):
        self.pixels = to_pixels(self.image, pixel_size(pipe, size), "image")  # [N, 3, H, W]
        self.latents = vae_latents(pipe, self.pixels, batch, generator, sample=True, name="image")  # [B, L, 64]

    def prepare(self, pipe, x, img_ids, sigmas, generator, size):
        start = start_index(len(sigmas) - 1, self.strength)
        self.noise, self.sigmas = x, sigmas
        sigma = sigmas[start].to(x.dtype)
        return sigma * x + (1.0 - sigma) * self.latents, img_ids, sigmas, start  # flow-matching forward process


class Inpaint(Img2Img):
    """Img2Img that regenerates only where `mask_image` is white, on any model (diffusers' FluxInpaintPipeline).
    After every step the unmasked latents are reset to the image's latents noised to the next sigma, so the result
    keeps the image outside the mask up to the VAE round trip. The mask is binarized, then resized (nearest)."""

    def __init__(self, image: ImageInput, mask_image: ImageInput, strength: float = 0.6):
        super().__init__(image, strength)
        self.mask_image = check_image(mask_image, "mask_image")

    def encode(self, pipe, batch, generator, size):
        super().encode(pipe, batch, generator, size)
        mask = to_mask(self.mask_image, pixel_size(pipe, size), "mask_image")  # [M, 1, H, W]
        mask = F.interpolate(mask, size=size).to(self.latents.device, self.latents.dtype)  # [M, 1, h, w]
        channels = pipe.transformer.params.latent_channels
        self.mask = to_batch(pack(mask.repeat(1, channels, 1, 1)), batch, "mask_image")  # [B, L, C*4]

    def after_step(self, x, i):
        sigma = self.sigmas[i + 1].to(x.dtype)
        known = sigma * self.noise + (1.0 - sigma) * self.latents  # the image at the next noise level
        return (1 - self.mask) * known + self.mask * x


class Fill(Img2Img):
    """FLUX.1-Fill (in_channels 384): the masked image's latents and the packed mask ride along as 320 extra input
    channels every step (flux-spec §7.1; diffusers' FluxFillPipeline). Pixels under the (binarized) mask are zeroed
    before encoding; as in diffusers the masked image's posterior is sampled with the generator after the noise."""

    def __init__(self, image: ImageInput, mask_image: ImageInput, strength: float = 1.0):
        super().__init__(image, strength)
        self.mask_image = check_image(mask_image, "mask_image")

    def extra_channels(self, pipe) -> int:
        f = pipe.vae.params.downscale
        return pipe.transformer.params.latent_channels * 4 + 4 * f * f

    def prepare(self, pipe, x, img_ids, sigmas, generator, size):
        out = super().prepare(pipe, x, img_ids, sigmas, generator, size)
        batch = x.shape[0]
        mask = to_mask(self.mask_image, pixel_size(pipe, size), "mask_image")  # [M, 1, H, W]
        masked = self.pixels * (1 - mask)  # [max(N, M), 3, H, W]; 0 is mid grey in [-1, 1]
        masked_latents = vae_latents(pipe, masked, batch, generator, sample=True, name="image")  # [B, L, 64]
        mask = to_batch(pack_mask(mask, pipe.vae.params.downscale), batch, "mask_image").to(masked_latents)
        self.cond = torch.cat((masked_latents, mask), dim=2)  # [B, L, 64 + 256]
        return out

    def model_input(self, x):
        return torch.cat((x, self.cond), dim=2)  # [B, L, 64 + 320]


class Control(Conditioning):
    """Canny/Depth structure control (in_channels 128): the control image's latents are concatenated to the noisy
    latents along channels every step (flux-spec §7.2; diffusers' FluxControlPipeline).

    `control_image` is the structure map itself (an edge or depth picture, see fluxkit.control), not a photo. As in
    diffusers it is encoded by sampling the posterior with the generator, before the noise draw; a BFL control LoRA
    on a dev base works the same once its img_in is 128 wide.
    """

    def __init__(self, control_image: ImageInput):
        self.control_image = check_image(control_image, "control_image")

    def extra_channels(self, pipe) -> int:
        return pipe.transformer.params.latent_channels * 4

    def encode(self, pipe, batch, generator, size):
        pixels = to_pixels(self.control_image, pixel_size(pipe, size), "control_image")
        # diffusers repeats the image to the batch first, so every generated image draws its own posterior sample.
        pixels = to_batch(pixels, batch, "control_image")
        self.tokens = vae_latents(pipe, pixels, batch, generator, sample=True, name="control_image")  # [B, L, 64]

    def model_input(self, x):
        return torch.cat((x, self.tokens), dim=2)  # [B, L, 128]


class Kontext(Conditioning):
    """In-context editing (FLUX.1-Kontext, flux-spec §7.4): the context image's tokens are appended to the image
    sequence with position ids (1, row, col); the model's prediction for them is dropped, and the schedule's shift
    uses the noise tokens only. The image is encoded with the posterior mean at its own size (a multiple of 16
    pixels; `FluxKontextPipeline` resizes it to a preferred resolution first).
    """

    adds_tokens = True

    def __init__(self, image: ImageInput):
        self.image = check_image(image, "image")

    def encode(self, pipe, batch, generator, size):
        pixels = to_pixels(self.image, None, "image", multiple=2 * pipe.vae.params.downscale)  # [N, 3, Hc, Wc]
        self.tokens = vae_latents(pipe, pixels, batch, None, sample=False, name="image")  # [B, Lc, 64]
        f = 2 * pipe.vae.params.downscale  # pixels per token side
        grid = (pixels.shape[-2] // f, pixels.shape[-1] // f)
        self.ids = image_ids(batch, *grid, index=1, device=self.tokens.device)  # [B, Lc, 3]

    def prepare(self, pipe, x, img_ids, sigmas, generator, size):
        return x, torch.cat((img_ids, self.ids.to(img_ids)), dim=1), sigmas, 0

    def model_input(self, x):
        return torch.cat((x, self.tokens.to(x.dtype)), dim=1)  # [B, L + Lc, 64]


class Compose(Conditioning):
    """Several hooks in one run, applied in the given order (e.g. `Compose(Control(edges), Img2Img(photo, 0.7))`).

    At most one hook may pick the start point and at most one may add text; Kontext's 64-channel context tokens
    cannot be combined with channel-concatenating hooks (Fill, Control).
    """

    def __init__(self, *hooks: Conditioning):
        if not hooks or not all(isinstance(h, Conditioning) for h in hooks):
            raise ValueError(f"Compose needs one or more conditioning hooks, got {[type(h).__name__ for h in hooks]}")
        for flag, what in (("starts_late", "start point (Img2Img, Inpaint, Fill)"), ("adds_text", "text")):
            if sum(getattr(h, flag) for h in hooks) > 1:
                raise ValueError(f"Compose: more than one hook sets the {what}: {[type(h).__name__ for h in hooks]}")
        self.hooks: Sequence[Conditioning] = hooks
        self.starts_late = any(h.starts_late for h in hooks)
        self.adds_text = any(h.adds_text for h in hooks)
        self.adds_tokens = any(h.adds_tokens for h in hooks)

    def extra_channels(self, pipe) -> int:
        extra = [h.extra_channels(pipe) for h in self.hooks]
        if self.adds_tokens and any(extra):
            raise ValueError("Compose: Kontext context tokens cannot be combined with Fill or Control channels")
        return sum(extra)

    def encode(self, pipe, batch, generator, size):
        for h in self.hooks:
            h.encode(pipe, batch, generator, size)

    def prepare(self, pipe, x, img_ids, sigmas, generator, size):
        start = 0
        for h in self.hooks:
            x, img_ids, sigmas, s = h.prepare(pipe, x, img_ids, sigmas, generator, size)
            start = max(start, s)
        return x, img_ids, sigmas, start

    def text(self, pipe, txt, txt_ids, img_ids, size):
        mask = None
        for h in self.hooks:
            txt, txt_ids, m = h.text(pipe, txt, txt_ids, img_ids, size)
            mask = m if m is not None else mask
        return txt, txt_ids, mask

    def model_input(self, x):
        for h in self.hooks:
            x = h.model_input(x)
        return x

    def after_step(self, x, i):
        for h in self.hooks:
            x = h.after_step(x, i)
        return x
