"""diffusers-named pipelines over the one `FluxPipeline` recipe: each `__call__` takes diffusers' arguments, builds
a conditioning hook (fluxkit.conditioning) and calls the base pipeline. No sampling code lives here.

    from fluxkit import FluxFillPipeline
    pipe = FluxFillPipeline.from_pretrained("black-forest-labs/FLUX.1-Fill-dev")
    image = pipe("a cat", image=photo, mask_image=mask).images[0]

Defaults follow diffusers (strength 0.6 for img2img/inpaint, 1.0 for Fill; Kontext `_auto_resize=True`), except
where diffusers falls back to its fixed 1024x1024: steps and guidance come from the model (as in `FluxPipeline`),
and height/width default to the input image's size (diffusers would resize every input to 1024x1024).
"""

from __future__ import annotations

from PIL import Image
from torch import Tensor

from .conditioning import Control, Fill, Img2Img, Inpaint, Kontext
from .pipeline import FluxPipeline

# FLUX.1-Kontext's training resolutions (w, h) (BFL / diffusers PREFERRED_KONTEXT_RESOLUTIONS), for a 1024^2 model.
KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)  # fmt: skip


def _required(value, name: str):
    if value is None:
        raise ValueError(f"{name} is required")
    return value


def _image_hw(image) -> tuple[int, int]:
    first = image[0] if isinstance(image, (list, tuple)) else image
    if isinstance(first, Image.Image):
        return first.height, first.width
    if isinstance(first, Tensor):
        return tuple(first.shape[-2:])
    raise ValueError(f"image must be a PIL image, a list of them or a tensor, got {type(first).__name__}")


def _size(image, height: int | None, width: int | None) -> tuple[int, int]:
    """height/width default to the input image's size; that size must then suit the model (multiples of 16)."""
    img_h, img_w = _image_hw(image)
    if (height is None and img_h % 16) or (width is None and img_w % 16):
        raise ValueError(f"the image is {img_w}x{img_h} (WxH); pass height= and width= (multiples of 16) to resize it")
    return height or img_h, width or img_w


class FluxImg2ImgPipeline(FluxPipeline):
    """diffusers' FluxImg2ImgPipeline: start from `image` noised by `strength` (1.0 = ignore the image)."""

    def __call__(self, prompt=None, *, image=None, strength: float = 0.6, height=None, width=None, **kwargs):
        hook = Img2Img(_required(image, "image"), strength)
        height, width = _size(image, height, width)
        return super().__call__(prompt, height=height, width=width, conditioning=hook, **kwargs)


class FluxInpaintPipeline(FluxPipeline):
    """diffusers' FluxInpaintPipeline: regenerate where `mask_image` is white, on any text-to-image model."""

    def __call__(
        self, prompt=None, *, image=None, mask_image=None, strength: float = 0.6, height=None, width=None, **kwargs
    ):
        hook = Inpaint(_required(image, "image"), _required(mask_image, "mask_image"), strength)
        height, width = _size(image, height, width)
        return super().__call__(prompt, height=height, width=width, conditioning=hook, **kwargs)


class FluxFillPipeline(FluxPipeline):
    """diffusers' FluxFillPipeline for FLUX.1-Fill (in_channels 384): inpaint where `mask_image` is white; outpaint
    with `fluxkit.conditioning.pad_for_outpaint`."""

    def __call__(
        self, prompt=None, *, image=None, mask_image=None, strength: float = 1.0, height=None, width=None, **kwargs
    ):
        hook = Fill(_required(image, "image"), _required(mask_image, "mask_image"), strength)
        height, width = _size(image, height, width)
        return super().__call__(prompt, height=height, width=width, conditioning=hook, **kwargs)


class FluxControlPipeline(FluxPipeline):
    """diffusers' FluxControlPipeline for Canny/Depth models (in_channels 128): `control_image` is the edge or
    depth map (see fluxkit.control)."""

    def __call__(self, prompt=None, *, control_image=None, height=None, width=None, **kwargs):
        hook = Control(_required(control_image, "control_image"))
        height, width = _size(control_image, height, width)
        return super().__call__(prompt, height=height, width=width, conditioning=hook, **kwargs)


def kontext_size(height: int, width: int, area: int, multiple: int = 16) -> tuple[int, int]:
    """The preferred Kontext resolution closest in aspect ratio to (height, width), as (h, w), scaled from the
    1024^2 list to `area` and floored to `multiple` (diffusers' `_auto_resize`; for a 1024^2 model, unscaled)."""
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    scale = (area / 1024**2) ** 0.5
    return max(multiple, int(h * scale) // multiple * multiple), max(multiple, int(w * scale) // multiple * multiple)


class FluxKontextPipeline(FluxPipeline):
    """diffusers' FluxKontextPipeline: edit `image` as the prompt says (context tokens appended to the sequence).

    The context image is floored to multiples of 16 and, with `_auto_resize`, resized to the preferred resolution
    of its aspect ratio (scaled to the model's default area, so unscaled for FLUX.1-Kontext-dev). The output has
    the aspect of height/width (default: the context image's) and the area `max_area` (default: the model's
    default area, 1024^2 for FLUX.1-Kontext-dev as in diffusers).
    """

    def __call__(
        self, image=None, prompt=None, *, height=None, width=None, max_area=None, _auto_resize=True, **kwargs
    ):  # image first, as in diffusers' FluxKontextPipeline
        hook = None
        default_h, default_w = self.spec.default_size
        model_area = default_h * default_w
        area = max_area if max_area is not None else model_area
        if isinstance(area, bool) or not isinstance(area, int) or area < 256:
            raise ValueError(f"max_area must be an integer >= 256 (pixels), got {max_area!r}")
        if image is not None:
            image = self._context_image(image, model_area, _auto_resize)
            hook = Kontext(image)
            default_h, default_w = _image_hw(image)
        height, width = height or default_h, width or default_w
        # diffusers' rule: keep the requested aspect ratio, rescale to max_area, floor to multiples of 16.
        aspect = width / height
        width = round((area * aspect) ** 0.5) // 16 * 16
        height = round((area / aspect) ** 0.5) // 16 * 16
        return super().__call__(prompt, height=height, width=width, conditioning=hook, **kwargs)

    @staticmethod
    def _context_image(image, area: int, auto_resize: bool):
        images = image if isinstance(image, (list, tuple)) else [image]
        if not all(isinstance(i, Image.Image) for i in images):
            if auto_resize:
                raise ValueError("_auto_resize needs PIL images; pass _auto_resize=False for a tensor image")
            return image
        h, w = images[0].height // 16 * 16, images[0].width // 16 * 16
        if auto_resize:
            h, w = kontext_size(h, w, area)
        resized = [i if i.size == (w, h) else i.resize((w, h), Image.LANCZOS) for i in images]
        return resized if isinstance(image, (list, tuple)) else resized[0]
