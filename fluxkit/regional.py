"""Regional prompts: several prompts, each bound to a mask, in one generation.

The pipeline's own prompt is the global prompt (it also gives the pooled vector). Each region's prompt is encoded
to the same length and appended, so the text sequence is [global; region 1; ...; region R], and a joint attention
mask over [text; image] decides who sees whom:

- image tokens see every image token and the global prompt, plus the prompt of each region they lie in;
- region k's text tokens see only themselves and the image tokens of region k;
- the global prompt's tokens see themselves and every image token.

The mask is symmetric. Image tokens in no region (and Kontext context tokens) are steered by the global prompt only.
FLUX.1 was not trained with masks, so this is steering, not a guarantee; a region needs enough tokens to matter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .conditioning import Conditioning, ImageInput, check_image, pixel_size, to_mask
from .sampling import text_ids


def attention_mask(text_len: int, region_tokens: Tensor, extra_tokens: int = 0) -> Tensor:
    """Bool [L, L] over the joint sequence [global text; region texts; image tokens; extra tokens], True = may attend.

    `text_len` tokens per prompt (global and each region), `region_tokens` bool [R, N]: which of the N image tokens
    lie in region k; `extra_tokens` image tokens after those (Kontext context) belong to no region.
    """
    regions, n_img = region_tokens.shape
    segment = torch.arange(regions + 1).repeat_interleave(text_len)  # text token -> 0 (global) or region k
    text_text = segment[:, None] == segment[None, :]  # [T, T] block diagonal
    in_region = F.pad(region_tokens.bool(), (0, extra_tokens))  # [R, N + extra]
    everywhere = torch.ones(1, n_img + extra_tokens, dtype=torch.bool)
    text_img = torch.cat((everywhere, in_region))[segment]  # [T, N + extra]: row = its segment's image tokens
    img_img = torch.ones(n_img + extra_tokens, n_img + extra_tokens, dtype=torch.bool)
    top = torch.cat((text_text, text_img), dim=1)
    bottom = torch.cat((text_img.T, img_img), dim=1)
    return torch.cat((top, bottom), dim=0)  # [T + N + extra, T + N + extra]


NAMED_BOXES = {  # name -> (x0, y0, x1, y1) as fractions of the width and height
    "left": (0, 0, 0.5, 1), "right": (0.5, 0, 1, 1), "top": (0, 0, 1, 0.5), "bottom": (0, 0.5, 1, 1),
    "top-left": (0, 0, 0.5, 0.5), "top-right": (0.5, 0, 1, 0.5), "bottom-left": (0, 0.5, 0.5, 1),
    "bottom-right": (0.5, 0.5, 1, 1), "left-third": (0, 0, 1 / 3, 1), "center-third": (1 / 3, 0, 2 / 3, 1),
    "right-third": (2 / 3, 0, 1, 1), "top-third": (0, 0, 1, 1 / 3), "middle-third": (0, 1 / 3, 1, 2 / 3),
    "bottom-third": (0, 2 / 3, 1, 1),
}


def box_mask(box: str, width: int, height: int) -> Tensor:
    """A rectangular region mask [H, W] in {0, 1}: a name from NAMED_BOXES ("left", "top-right", "center-third", ...)
    or "x0,y0,x1,y1" as fractions of the width and height (e.g. "0,0,0.5,1" = the left half)."""
    if box in NAMED_BOXES:
        x0, y0, x1, y1 = NAMED_BOXES[box]
    else:
        try:
            x0, y0, x1, y1 = (float(v) for v in box.split(","))
        except ValueError:
            raise ValueError(f"region box must be one of {sorted(NAMED_BOXES)} or 'x0,y0,x1,y1' fractions of the "
                             f"image, got {box!r}") from None
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"region box {box!r} needs 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    mask = torch.zeros(height, width)
    mask[round(y0 * height) : round(y1 * height), round(x0 * width) : round(x1 * width)] = 1
    return mask


def region_tokens(masks: Sequence, image_size: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Pixel masks at the image size -> bool [R, h2 * w2]: a token is in a region when half its pixels are."""
    rows = []
    for k, mask in enumerate(masks):
        m = to_mask(mask, image_size, f"masks[{k}]")  # [1, 1, H, W]
        if m.shape[0] != 1:
            raise ValueError(f"masks[{k}] must be a single mask, got {m.shape[0]}")
        rows.append(F.adaptive_avg_pool2d(m, grid).flatten() >= 0.5)  # [h2 * w2]
    return torch.stack(rows)


class RegionalPrompts(Conditioning):
    """`pipe(global_prompt, conditioning=RegionalPrompts(prompts, masks))`: prompt k steers the pixels where mask k
    is white. Masks are PIL images or tensors [H, W] in [0, 1] at the generation size (PIL masks are resized)."""

    adds_text = True

    def __init__(self, prompts: Sequence[str], masks: Sequence[ImageInput]):
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
        if isinstance(masks, (str, Tensor)) or len(masks) != len(prompts):
            n = "one tensor" if isinstance(masks, Tensor) else f"{len(masks)}"
            raise ValueError(f"masks must be a list with one mask per prompt: {len(prompts)} prompts, {n} masks")
        self.prompts = list(prompts)
        self.masks = [check_image(m, f"masks[{k}]") for k, m in enumerate(masks)]

    def text(self, pipe, txt, txt_ids, img_ids, size):
        batch, length = txt.shape[:2]
        grid = (size[0] // 2, size[1] // 2)
        tokens = region_tokens(self.masks, pixel_size(pipe, size), grid)  # [R, N]
        regions, _ = pipe.encode_prompt(self.prompts, max_sequence_length=length)  # [R, L, C]; pooled unused
        regions = regions.reshape(1, -1, regions.shape[-1]).expand(batch, -1, -1)  # [B, R*L, C]
        txt = torch.cat((txt, regions.to(txt)), dim=1)  # [B, (R+1)*L, C]
        extra = img_ids.shape[1] - tokens.shape[1]
        mask = attention_mask(length, tokens, extra).to(txt.device)  # [L_all, L_all]
        return txt, text_ids(batch, txt.shape[1], device=txt_ids.device), mask.expand(batch, 1, -1, -1)
