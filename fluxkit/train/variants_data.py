"""Training batches of the conditioned variants (fill, canny, kontext, regional), from the scene generator, built
exactly as the inference hooks in `fluxkit.conditioning` and `fluxkit.regional` build the model input.

Two halves:
1. Examples (numpy, PIL-free): per scene a target image, the image the hook takes (Fill: the scene and a mask;
   Canny: its edge map; Kontext: the scene before an edit), and the prompt (caption or edit instruction).
2. Tensors: the same helpers and order as the hooks. Fill: pixels under the binarized mask zeroed (mid grey), the
   VAE posterior *sampled* (diffusers' FluxFillPipeline), then `pack_mask`; Canny: the edge map's posterior sampled;
   Kontext: the posterior mean, tokens with position ids (1, row, col). The sample's generator is seeded from the
   step's generator and its seed kept in the batch, so a test can hand the same seed to the hook and compare.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .. import sampling
from ..autoencoder import AutoEncoder
from ..conditioning import pack_mask, to_mask, to_pixels
from ..control import canny
from ..data import Sample, Scene, SceneDataset, edit_move, edit_recolor, edit_remove, render
from ..data.regions import GLOBAL_PHRASES, NoRoom, RegionSpec, region_map, regional_scene
from .flow import FlowBatch, position_ids
from .loop import Dist

KONTEXT_KINDS = ("single", "count", "relation")  # scenes with objects to edit
EDITS: dict[str, Callable[[Scene, random.Random], tuple[Scene, str]]] = {
    "recolor": edit_recolor, "remove": edit_remove, "move": edit_move,
}


@dataclass
class Examples:
    """One batch of raw examples of one image size."""

    targets: list[np.ndarray]  # (H, W, 3) uint8: what the model learns to produce
    conditions: list[np.ndarray]  # (H, W, 3) uint8: the hook's image (fill: the scene itself, masked by the hook)
    prompts: list[str]
    masks: list[np.ndarray] | None = None  # (H, W) bool, fill only: True = regenerate
    regions: list[tuple[RegionSpec, ...]] | None = None  # regional only: each scene's regions (prompt + box)


# ------------------------------------------------------------------------------------------------ scenes
def scene_datasets(seed: int, n: int, sizes, kinds) -> list[SceneDataset]:
    """One dataset per image size (a batch shares a size), each its own seed, as the ae stage draws them."""
    return [SceneDataset(seed + k, n, sizes=(size,), kinds=tuple(kinds)) for k, size in enumerate(sizes)]


def draw_samples(datasets: list[SceneDataset], batch: int, gen: torch.Generator, dist: Dist) -> list[Sample]:
    """A size drawn per step, then `batch` scenes from this rank's shard (indices i with i % world == rank)."""
    data = datasets[int(torch.randint(len(datasets), (), generator=gen))]
    shard = (data.n - dist.rank + dist.world - 1) // dist.world
    picks = torch.randint(shard, (batch,), generator=gen) * dist.world + dist.rank
    return [data[int(i)] for i in picks]


def python_rng(gen: torch.Generator) -> random.Random:
    """A Python RNG for the structural choices of one step (masks, edits), seeded from the step's generator."""
    return random.Random(int(torch.randint(1 << 62, (), generator=gen)))


# ------------------------------------------------------------------------------------------------ fill masks
def _box_mask(height: int, width: int, box: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), bool)
    mask[max(0, int(np.floor(y0))) : min(height, int(np.ceil(y1))), max(0, int(np.floor(x0))) : min(width, int(
        np.ceil(x1)))] = True
    return mask


def fill_mask(scene: Scene, kind: str, rng: random.Random, margin: float) -> np.ndarray:
    """(H, W) bool mask of one kind: "object" (an object's or the sign's box grown by margin * short side),
    "rectangles" (1-3 boxes of 15-50% of each side) or "outpaint" (borders of 10-35% on 1-4 sides)."""
    h, w = scene.height, scene.width
    if kind == "object":
        boxes = [o.bbox for o in scene.objects] + ([scene.sign.bbox] if scene.sign is not None else [])
        x0, y0, x1, y1 = rng.choice(boxes)
        grow = margin * min(h, w)
        return _box_mask(h, w, (x0 - grow, y0 - grow, x1 + grow, y1 + grow))
    if kind == "rectangles":
        mask = np.zeros((h, w), bool)
        for _ in range(rng.randint(1, 3)):
            bw, bh = rng.uniform(0.15, 0.5) * w, rng.uniform(0.15, 0.5) * h
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            mask |= _box_mask(h, w, (x, y, x + bw, y + bh))
        return mask
    if kind == "outpaint":  # the part pad_for_outpaint would add around a smaller picture
        sides = [s for s in ("left", "right", "top", "bottom") if rng.random() < 0.5] or [rng.choice(
            ("left", "right", "top", "bottom"))]
        mask = np.zeros((h, w), bool)
        for side in sides:
            extent = max(1, round(rng.uniform(0.1, 0.35) * (w if side in ("left", "right") else h)))
            region = {"left": np.s_[:, :extent], "right": np.s_[:, w - extent :], "top": np.s_[:extent, :],
                      "bottom": np.s_[h - extent :, :]}[side]
            mask[region] = True
        return mask
    raise ValueError(f"unknown fill mask kind {kind!r}; known: object, rectangles, outpaint")


def fill_examples(samples: list[Sample], rng: random.Random, kinds: tuple[str, ...], margin: float) -> Examples:
    masks = [fill_mask(s.scene, rng.choice(kinds), rng, margin) for s in samples]
    images = [s.image for s in samples]
    return Examples(images, images, [s.caption for s in samples], masks)


# ------------------------------------------------------------------------------------------------ canny edges
def edge_map(sample: Sample, source: str) -> np.ndarray:
    """White-on-black (H, W, 3) uint8 edges: "scene" = region boundaries of the render, "canny" = fluxkit.control's
    Canny of the pixels (what `--control canny` computes from a picture)."""
    if source == "scene":
        edges = render(sample.scene).edges()  # (H, W) bool
        return np.repeat(edges[..., None].astype(np.uint8) * 255, 3, axis=2)
    if source == "canny":
        return np.asarray(canny(Image.fromarray(sample.image)))
    raise ValueError(f"unknown edge source {source!r}; known: scene, canny")


def canny_examples(samples: list[Sample], rng: random.Random, sources: tuple[str, ...]) -> Examples:
    edges = [edge_map(s, rng.choice(sources)) for s in samples]
    return Examples([s.image for s in samples], edges, [s.caption for s in samples])


# ------------------------------------------------------------------------------------------------ kontext edits
def edit_pair(scene: Scene, rng: random.Random, edits: tuple[str, ...]) -> tuple[Scene, str] | None:
    """(scene after, instruction) of one applicable edit, tried in random order; None if none applies."""
    order = list(edits)
    rng.shuffle(order)
    for name in order:
        try:
            return EDITS[name](scene, rng)
        # Not every edit fits every scene: one object cannot be removed, a crowded frame has no free cell, and a
        # shape may have no unused colour on this background (random.choice of an empty list: IndexError).
        except (ValueError, IndexError):
            continue
    return None


def kontext_examples(samples: list[Sample], rng: random.Random, edits: tuple[str, ...],
                     datasets: list[SceneDataset], tries: int = 100) -> Examples:
    """Before = the scene, after = its edit; a scene no edit fits is replaced by another of its size from `datasets`."""
    before, after, prompts = [], [], []
    for item in samples:
        pair = edit_pair(item.scene, rng, edits)
        if pair is None:
            size = ((item.scene.width, item.scene.height),)
            data = next(d for d in datasets if d.sizes == size)
            for _ in range(tries):
                item = data[rng.randrange(data.n)]
                if (pair := edit_pair(item.scene, rng, edits)) is not None:
                    break
            else:
                raise ValueError(f"no edit of {edits} applies to {tries} scenes of size {size[0]}; add 'recolor'")
        before.append(item.image)
        after.append(render(pair[0]).image)
        prompts.append(pair[1])
    return Examples(after, before, prompts)


# ------------------------------------------------------------------------------------------------ regional prompts
def regional_examples(samples: list[Sample], rng: random.Random, layouts: tuple[str, ...],
                      tries: int = 20) -> Examples:
    """Regional scenes at the size of `samples` (their scenes are not used), one layout drawn for the batch (a batch
    shares its region count): target = the scene, condition = its region map, prompt = a background phrase."""
    width, height = samples[0].scene.width, samples[0].scene.height
    for _ in range(tries):
        layout = rng.choice(layouts)
        made = []
        for _ in samples:
            for _ in range(tries):  # a shape may not fit a narrow region, or a background allow too few colours
                try:
                    made.append(regional_scene(rng, layout, width, height))
                    break
                except NoRoom:
                    continue
            else:
                break  # this layout does not suit this size: draw another
        if len(made) == len(samples):
            return Examples([render(scene).image for scene, _, _ in made],
                            [region_map(regions, width, height) for _, regions, _ in made],
                            [rng.choice(GLOBAL_PHRASES).format(bg) for _, _, bg in made],
                            regions=[regions for _, regions, _ in made])
    raise ValueError(f"no layout of {layouts} fits a {width}x{height} image; add 'left/right' or 'top/bottom'")


def regional_text(txt: Tensor, region_txt: Tensor, regions: list[tuple[RegionSpec, ...]], size: tuple[int, int],
                  grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The regional hook's text and mask for a batch whose examples have their own regions (the hook,
    `fluxkit.regional.RegionalPrompts`, shares one set across a batch): txt [B, L, C] (global prompts) and region_txt
    [B, R, L, C] -> ([B, (R+1) L, C], attention mask [B, 1, L_all, L_all]) for an (H, W) = `size` image of
    `grid` = (rows, columns) tokens."""
    from ..regional import attention_mask, region_tokens

    batch, regions_per, length, channels = region_txt.shape
    height, width = size
    masks = [attention_mask(length, region_tokens([torch.from_numpy(r.mask(width, height)).float() for r in rs],
                                                  size, grid)) for rs in regions]
    joint = torch.cat((txt, region_txt.reshape(batch, regions_per * length, channels)), dim=1)
    return joint, torch.stack(masks)[:, None].to(txt.device)


# ------------------------------------------------------------------------------------------------ tensors
@dataclass
class VariantBatch:
    """A batch in the model's terms: the flow part (target latents, text, ids) plus the condition as the hook
    would feed it, and the raw inputs the hook would be given (for sample grids and tests)."""

    flow: FlowBatch  # x0 [B, L, 64] = the targets' latents (posterior mean)
    images: Tensor  # [B, 3, H, W] in [0, 1]: the hook's image input (fill: unmasked scene; canny: edges; kontext;
    # regional: the region map, shown in sample grids)
    masks: Tensor | None  # [B, 1, H, W] in {0, 1}: fill's mask_image
    prompts: list[str]  # after caption dropout
    cond_seed: int | None  # seed of the generator that drew the condition's posterior sample (fill, canny)
    channels: Tensor | None = None  # [B, L, C_extra] concatenated to the noisy latents (fill 320, canny 64)
    context: Tensor | None = None  # [B, Lc, 64] appended along the sequence (kontext)
    context_ids: Tensor | None = None  # [B, Lc, 3]
    attn_mask: Tensor | None = None  # [B, 1, L_all, L_all] bool over [text; image] (regional)
    regions: list[tuple[RegionSpec, ...]] | None = None  # regional: each example's regions

    def model_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(img, img_ids) for noisy latents x [B, L, 64]: the hooks' `model_input` and their position ids."""
        if self.channels is not None:
            return torch.cat((x, self.channels.to(x.dtype)), dim=2), self.flow.img_ids  # [B, L, 64 + C_extra]
        if self.context is not None:
            img = torch.cat((x, self.context.to(x.dtype)), dim=1)  # [B, L + Lc, 64]
            return img, torch.cat((self.flow.img_ids, self.context_ids.to(self.flow.img_ids)), dim=1)
        return x, self.flow.img_ids


def unit_images(images: list[np.ndarray]) -> Tensor:
    """(H, W, C) uint8 images -> [B, C, H, W] float32 in [0, 1], as `conditioning` reads a PIL image."""
    return torch.from_numpy(np.stack(images).astype(np.float32) / 255.0).permute(0, 3, 1, 2)


@torch.no_grad()
def fill_channels(ae: AutoEncoder, image: Tensor, mask: Tensor, gen: torch.Generator) -> Tensor:
    """Fill's condition [B, L, 64 + 4 f^2] from images [B, 3, H, W] and masks [B, 1, H, W] in [0, 1]."""
    size = tuple(image.shape[-2:])
    pixels, mask = to_pixels(image, size, "image"), to_mask(mask, size, "mask_image")  # [-1, 1], binarized
    masked = pixels * (1 - mask)  # 0 = mid grey under the mask
    latents = sampling.pack(ae.encode(masked, sample=True, generator=gen))  # [B, L, 64]
    return torch.cat((latents, pack_mask(mask, ae.params.downscale).to(latents)), dim=2)  # [B, L, 64 + 4 f^2]


@torch.no_grad()
def control_channels(ae: AutoEncoder, control: Tensor, gen: torch.Generator) -> Tensor:
    """Canny/Depth condition [B, L, 64]: the control picture's posterior sample, packed."""
    pixels = to_pixels(control, tuple(control.shape[-2:]), "control_image")
    return sampling.pack(ae.encode(pixels, sample=True, generator=gen))


@torch.no_grad()
def context_tokens(ae: AutoEncoder, image: Tensor) -> tuple[Tensor, Tensor]:
    """Kontext's context (tokens [B, Lc, 64] from the posterior mean, ids [B, Lc, 3] = (1, row, col))."""
    pixels = to_pixels(image, None, "image", multiple=2 * ae.params.downscale)
    tokens = sampling.pack(ae.encode(pixels))
    f = 2 * ae.params.downscale  # pixels per token side
    return tokens, sampling.image_ids(image.shape[0], image.shape[-2] // f, image.shape[-1] // f, index=1,
                                      device=tokens.device)


@torch.no_grad()
def build_batch(kind: str, ex: Examples, ae: AutoEncoder, encode_text, gen: torch.Generator, dropout: float,
                device: torch.device) -> VariantBatch:
    """Examples -> a VariantBatch on `device`; `encode_text(prompts) -> (txt, vec)`. Draws from `gen`: caption
    dropout, then (fill, canny) the seed of the condition's posterior sample."""
    batch = len(ex.targets)
    drop = (torch.rand(batch, generator=gen) < dropout).tolist() if dropout > 0 else [False] * batch
    prompts = ["" if d else p for p, d in zip(ex.prompts, drop)]  # the empty prompt: what true CFG contrasts with
    targets = to_pixels(unit_images(ex.targets), None, "target").to(device)  # [B, 3, H, W] in [-1, 1]
    x0 = ae.encode(targets)  # [B, 16, h, w], posterior mean as the cache holds it
    txt, vec = encode_text(prompts)
    attn_mask = None
    if kind == "regional":  # the region prompts are never dropped: they are the condition
        region_txt, _ = encode_text([r.prompt for rs in ex.regions for r in rs])  # [B * R, L, C]
        region_txt = region_txt.reshape(batch, -1, *region_txt.shape[1:])  # [B, R, L, C]
        txt, attn_mask = regional_text(txt.to(device), region_txt.to(device), ex.regions, tuple(targets.shape[-2:]),
                                        (x0.shape[-2] // 2, x0.shape[-1] // 2))
    flow = FlowBatch(sampling.pack(x0).float(), txt.float().to(device), vec.float().to(device),
                     *position_ids(batch, *x0.shape[-2:], txt.shape[1], device))
    images = unit_images(ex.conditions).to(device)
    masks = unit_images([m[..., None].astype(np.uint8) * 255 for m in ex.masks]).to(device) if ex.masks else None
    out = VariantBatch(flow, images, masks, prompts, None, attn_mask=attn_mask, regions=ex.regions)
    if kind in ("fill", "canny"):
        out.cond_seed = int(torch.randint(1 << 62, (), generator=gen))
        cond_gen = torch.Generator().manual_seed(out.cond_seed)  # CPU, as the pipelines' generators
        out.channels = (fill_channels(ae, images, masks, cond_gen) if kind == "fill"
                        else control_channels(ae, images, cond_gen)).float()
    elif kind == "kontext":
        out.context, out.context_ids = context_tokens(ae, images)
        out.context = out.context.float()
    elif kind != "regional":
        raise ValueError(f"unknown variant {kind!r}; known: fill, canny, kontext, regional")
    return out
