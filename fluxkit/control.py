"""Structure maps for Canny/Depth control (flux-spec §7.2): edge and depth pictures that `Control` encodes.

Canny uses scikit-image. Depth is either given by the user (any grayscale depth picture or array) or estimated with
a transformers depth model whose weights are already on this machine (BFL uses depth-anything-large); nothing is
downloaded here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

DEPTH_MODEL = "LiheYoung/depth-anything-large-hf"  # what BFL's DepthImageEncoder uses
KINDS = ("canny", "depth")


def _check_pil(image, name: str = "image") -> Image.Image:
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name} must be a PIL image, got {type(image).__name__}")
    return image


def canny(image: Image.Image, low_threshold: float = 50, high_threshold: float = 200, sigma: float = 1.0):
    """White edges on black, RGB, the size of `image`.

    Thresholds are on the 0-255 gradient scale of BFL's `cv2.Canny(img, 50, 200)`; scikit-image smooths with a
    Gaussian (`sigma`) first and uses the L2 gradient norm, so edge maps are close to OpenCV's, not identical.
    """
    from skimage.feature import canny as sk_canny

    gray = np.asarray(_check_pil(image).convert("L"))  # uint8: skimage scales the thresholds by 1/255 for it
    if not 0 <= low_threshold <= high_threshold:
        raise ValueError(f"need 0 <= low_threshold <= high_threshold, got {low_threshold} and {high_threshold}")
    edges = sk_canny(gray, sigma=sigma, low_threshold=low_threshold, high_threshold=high_threshold)  # bool [H, W]
    return Image.fromarray(edges.astype(np.uint8) * 255).convert("RGB")


def depth_to_image(depth, size: tuple[int, int] | None = None) -> Image.Image:
    """A depth map (array/tensor [H, W], or a PIL image) -> an RGB depth picture, min-max normalised to 0-255
    (near = bright for disparity-like maps such as Depth Anything's), resized bicubically to `size` = (H, W)."""
    if isinstance(depth, Image.Image):
        depth = np.asarray(depth.convert("L"), dtype=np.float32)
    d = torch.as_tensor(np.asarray(depth, dtype=np.float32) if not isinstance(depth, Tensor) else depth).float()
    if d.ndim != 2:
        raise ValueError(f"depth must be a 2-D map [H, W], got shape {tuple(d.shape)}")
    if size is not None and tuple(d.shape) != tuple(size):
        d = F.interpolate(d[None, None], size=size, mode="bicubic", align_corners=False)[0, 0]
    lo, hi = d.min(), d.max()
    d = (d - lo) / (hi - lo) if hi > lo else torch.zeros_like(d)  # a flat map has no structure to keep
    return Image.fromarray((d * 255).round().clamp(0, 255).to(torch.uint8).numpy()).convert("RGB")


def estimate_depth(image: Image.Image, model: str = DEPTH_MODEL, device: str | torch.device = "cpu") -> Image.Image:
    """Depth picture for `image` from a transformers depth model (a local folder or a Hub id already in the cache).

    Raises FileNotFoundError, saying what to do, when the weights are not on this machine.
    """
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    _check_pil(image)
    try:
        processor = AutoImageProcessor.from_pretrained(model, local_files_only=True)
        net = AutoModelForDepthEstimation.from_pretrained(model, local_files_only=True).to(device).eval()
    except OSError as e:
        raise FileNotFoundError(
            f"depth model {model!r} is not available locally ({type(e).__name__}). Download it once "
            f"(`huggingface-cli download {model}`), pass a local folder, or give a depth map as the control image"
        ) from None
    inputs = processor(images=image.convert("RGB"), return_tensors="pt").to(device)
    with torch.inference_mode():
        depth = net(**inputs).predicted_depth  # [1, h', w'] at the processor's resolution
    return depth_to_image(depth[0].float().cpu(), size=(image.height, image.width))


def control_image(kind: str, image: Image.Image, depth_model: str = DEPTH_MODEL) -> Image.Image:
    """The structure map of `kind` ('canny' or 'depth') for a photo `image`."""
    if kind == "canny":
        return canny(image)
    if kind == "depth":
        return estimate_depth(image, depth_model)
    raise ValueError(f"control kind must be one of {KINDS}, got {kind!r}")
