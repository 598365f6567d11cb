"""Why a tiny model fails the suite: two measured diagnostics (issue 3).

    python -m benchmarks.diagnose_tiny words --model fluxkit-tiny-dev        # how much each attribute word is used
    python -m benchmarks.diagnose_tiny latents --model fluxkit-tiny-dev      # what latent errors do to the decode
    python -m benchmarks.diagnose_tiny denoise --model runs/tiny-base/export # one-step denoising, in checker terms
    python -m benchmarks.diagnose_tiny context --model runs/tiny-kontext/export  # how much a Kontext model copies
    python -m benchmarks.diagnose_tiny prior --model runs/tiny-base-cont/export  # where it puts things at pure noise
    python -m benchmarks.diagnose_tiny synthetic      # can the architecture learn position words at all?
    python -m benchmarks.diagnose_tiny signs --blocks 3 6   # ... and read a sign's word into its letters?
    python -m benchmarks.diagnose_tiny encoder        # how far apart MiniLM keeps two captions, layer by layer

`fluxkit eval --probe` is the product's general form of `words`: every attribute, scored as a paired choice.

`words`: on single-object scenes at 128x128, the flow loss of the model's velocity against the true target
(noise - x0) with the scene's own caption, and with the caption's shape word (then colour word) swapped for another
one. The loss is taken at fixed t over the same noise, so the rise in loss is how much the model relies on that word
at that noise level: a word it ignores costs nothing when it is wrong.

`latents`: the checker (`fluxkit eval`'s) on true renders encoded and decoded by the model's autoencoder, with the
latent left as it is or perturbed: white noise, a 3x3 blur, or each 2x2 token patch replaced by its mean (what a
transformer that gets a token's average right but not its inner detail would produce). It tells how exact the
transformer's output has to be for the decoder to draw the right colour and shape.

`denoise`: the same scenes noised to each --times t, the model's one-step estimate x0 = x_t - t v decoded and
scored by the checker. Unlike the flow loss, this is comparable between models on different autoencoders, and it
moves early in training, before sampled images pass the suite.

`context`: on edit pairs (the scene before an edit as context tokens, the scene after it as the target, the
instruction as the prompt; tiny-kontext's training data, other seeds), the flow loss of a Kontext model at fixed t
with the context, without it, and of copying the context outright (velocity noise - context latents, whose loss
does not depend on t). A model that uses the context well beats both the no-context loss and the copy at every t.
`--out` writes the decoded one-step estimates x0 = x_t - t v at each t between the context and the target.

`prior`: the model's estimate x0 = noise - v at t = 1 (pure noise: what it expects before it has seen any of the
image), decoded, over --scenes noise draws, for prompts that differ only in a mirrored position word ("a large red
square on the left" / "on the right", ...). Printed: where the red is (its centroid, as fractions of the width and
height) and how much there is. A model that reads the position word moves the red to that side: x < 0.5 for "left".

`synthetic`: a fresh transformer of the tiny preset's width (1 double + 2 single blocks) trained from scratch on a
toy task where position is all there is: a bright block in one half of an otherwise flat 16x16 latent, captioned with
MiniLM's states for "a large red square on the left" (right, at the top, at the bottom). Every 100 steps: the flow
loss at t = 1 with the true caption and with the mirrored one. If the true caption's loss falls below the mirrored
one's, the architecture (RoPE with text at position 0, joint attention) can bind position words to image positions.
`--train-scenes` sets how many scenes are drawn (default 1024; the first 64 held out, the rest trained on and
repeated): how often each scene comes back decides whether the varied captions' position words are learned.

`signs`: the same kind of run on sign scenes whose text is one of the listed words, scored with the true text and
with another listed word of the same length (`--score-t`: the noise level, default t = 1, where the model can only
draw what the caption tells it). `--boards fixed` puts one board in the middle of a white image, so the word is all
that varies; `--boards varied` draws backgrounds, boards, places and phrasings as the training data does. In between,
`placed` keeps the board centred and the caption fixed but draws the colours, and `moved` keeps the colours and the
caption but draws the place.

`relations`: the same kind of run on two-object scenes, scored with the true relation and the inverse one
(`--layout placed`: a red circle and a blue square in fixed grid cells per relation, so the relation words are
position words; `fixed`: the same two objects placed anywhere the relation holds; `varied`: as the training data).

`encoder`: for caption pairs that differ in one word (left / right, red / blue, ...), how far apart the frozen
MiniLM keeps their token states after each layer (0 = the embeddings, 6 = the last, which the tiny models read): the
largest distance over the real tokens, as a share of the mean token norm. A word the encoder barely separates from
its opposite gives the transformer a small signal to learn from.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fluxkit.devices import bf16_is_fast
from fluxkit.train.ae import images_to_tensor  # uint8 renders -> [B, 3, H, W] in [-1, 1]

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black")


def swap_word(caption: str, word: str, words: tuple[str, ...], rng: random.Random) -> str | None:
    """The caption with `word` (the object's shape or colour; not a "light ..." background tint) replaced by another
    of `words`, or None if the caption does not name it."""
    pattern = rf"(?<!light )\b{word}\b"
    if not re.search(pattern, caption):
        return None
    return re.sub(pattern, rng.choice([w for w in words if w != word]), caption, count=1)


@torch.no_grad()
def word_losses(pipe, n: int, times: tuple[float, ...], repeats: int, seed: int) -> dict[float, dict[str, float]]:
    """{t: {"right" | "shape swapped" | "colour swapped": mean flow loss}} over n single-object scenes."""
    from fluxkit import sampling
    from fluxkit.data import SceneDataset
    from fluxkit.train.flow import position_ids

    data = SceneDataset(seed, 8 * n, sizes=((128, 128),), kinds=("single",))
    rng, picked = random.Random(seed), []
    for i in range(len(data)):
        sample = data[i]
        obj = sample.scene.objects[0]
        shape = swap_word(sample.caption, obj.shape, SHAPES, rng)
        colour = swap_word(sample.caption, obj.colour, COLOURS, rng)
        if shape and colour:
            picked.append((sample, {"right": sample.caption, "shape swapped": shape, "colour swapped": colour}))
        if len(picked) == n:
            break
    model = pipe.transformer
    x0 = sampling.pack(pipe.vae.encode(images_to_tensor([s.image for s, _ in picked])))  # [n, L, 64]
    length = pipe.spec.max_sequence_length
    img_ids, txt_ids = position_ids(n, 16, 16, length, "cpu")
    embedded = {k: pipe.encode_prompt([c[k] for _, c in picked], None, max_sequence_length=length)
                for k in picked[0][1]}
    guidance = torch.full((n,), pipe.spec.default_guidance) if model.params.guidance_embed else None
    out = {}
    for t in times:
        losses = {k: [] for k in embedded}
        for r in range(repeats):
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + r))
            x_t = (1 - t) * x0 + t * noise
            for k, (txt, vec) in embedded.items():
                v = model(x_t, img_ids, txt, txt_ids, torch.full((n,), t), vec, guidance)
                losses[k].append(float(((v.float() - (noise - x0)) ** 2).mean()))
        out[t] = {k: float(np.mean(v)) for k, v in losses.items()}
    return out


def token_mean(z: Tensor) -> Tensor:
    """Each 2x2 patch (one transformer token) replaced by its per-channel mean."""
    return F.interpolate(F.avg_pool2d(z, 2), scale_factor=2, mode="nearest")


def blur3(z: Tensor) -> Tensor:
    """A [1 2 1] x [1 2 1] / 16 blur per channel (edges replicated)."""
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16).expand(z.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(z, (1, 1, 1, 1), mode="replicate"), kernel, groups=z.shape[1])


@torch.no_grad()
def latent_checks(pipe, n: int, noise: float, seed: int) -> dict[str, dict[str, float]]:
    """{perturbation: {"pass": rate, check: rate}} of the checker on n single-object scenes decoded after it."""
    from fluxkit.data import SceneDataset
    from fluxkit.eval.checker import check

    data = SceneDataset(seed, n, sizes=((128, 128),), kinds=("single",))
    samples = [data[i] for i in range(n)]
    z = pipe.vae.encode(images_to_tensor([s.image for s in samples]))
    gen = torch.Generator().manual_seed(seed)
    perturbations: dict[str, Callable[[Tensor], Tensor]] = {
        "none": lambda z: z,
        f"white noise, std {noise:g}": lambda z: z + noise * torch.randn(z.shape, generator=gen),
        "3x3 blur": blur3,
        "2x2 token mean": token_mean,
    }
    out = {}
    for name, perturb in perturbations.items():
        decoded = ((pipe.vae.decode(perturb(z)).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        results = [check(image, s.scene) for image, s in zip(decoded, samples)]
        names = sorted({c for r in results for c in r.checks})
        out[name] = {"pass": float(np.mean([r.passed for r in results])),
                     **{c: float(np.mean([r.checks[c] for r in results if c in r.checks])) for c in names}}
    return out


@torch.no_grad()
def denoise_checks(pipe, n: int, times: tuple[float, ...], seed: int) -> dict[float, dict[str, float]]:
    """{t: {"pass": rate, check: rate}}: the checker on decoded one-step x0 estimates of n single-object scenes."""
    from fluxkit import sampling
    from fluxkit.data import SceneDataset
    from fluxkit.eval.checker import check
    from fluxkit.train.flow import position_ids

    data = SceneDataset(seed, n, sizes=((128, 128),), kinds=("single",))
    samples = [data[i] for i in range(n)]
    model = pipe.transformer
    z = pipe.vae.encode(images_to_tensor([s.image for s in samples]))  # [n, 16, 16, 16]
    x0 = sampling.pack(z)
    txt, vec = pipe.encode_prompt([s.caption for s in samples], None,
                                  max_sequence_length=pipe.spec.max_sequence_length)
    img_ids, txt_ids = position_ids(n, *z.shape[-2:], txt.shape[1], "cpu")
    guidance = torch.full((n,), pipe.spec.default_guidance) if model.params.guidance_embed else None
    out = {}
    for t in times:
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        x_t = (1 - t) * x0 + t * noise
        v = model(x_t, img_ids, txt, txt_ids, torch.full((n,), t), vec, guidance).float()
        decoded = pipe.vae.decode(sampling.unpack(x_t - t * v, *z.shape[-2:]))
        images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        results = [check(image, s.scene) for image, s in zip(images, samples)]
        names = sorted({c for r in results for c in r.checks})
        out[t] = {"pass": float(np.mean([r.passed for r in results])),
                  **{c: float(np.mean([r.checks[c] for r in results if c in r.checks])) for c in names}}
    return out


@torch.no_grad()
def context_losses(pipe, n: int, times: tuple[float, ...], repeats: int, seed: int,
                   out: Path | None = None) -> dict[float, dict[str, float]]:
    """{t: {"with context" | "without context" | "copy the context": mean flow loss}} over n edit pairs at 128x128."""
    from fluxkit import sampling
    from fluxkit.train.flow import position_ids
    from fluxkit.train.report import save_grid, to_uint8
    from fluxkit.train.variants_data import KONTEXT_KINDS, context_tokens, kontext_examples, scene_datasets, unit_images

    datasets = scene_datasets(seed, 4 * n, ((128, 128),), KONTEXT_KINDS)
    ex = kontext_examples([datasets[0][i] for i in range(n)], random.Random(seed), ("recolor", "remove", "move"),
                          datasets)
    model = pipe.transformer
    z = pipe.vae.encode(images_to_tensor(ex.targets))  # [n, 16, 16, 16]
    x0 = sampling.pack(z)
    context, context_ids = context_tokens(pipe.vae, unit_images(ex.conditions))
    txt, vec = pipe.encode_prompt(ex.prompts, None, max_sequence_length=pipe.spec.max_sequence_length)
    img_ids, txt_ids = position_ids(n, *z.shape[-2:], txt.shape[1], "cpu")
    guidance = torch.full((n,), pipe.spec.default_guidance) if model.params.guidance_embed else None
    copy = float(F.mse_loss(context, x0))  # (noise - context) - (noise - x0), the same at every t
    out_rows, estimates = {}, []
    for t in times:
        sums = {"with context": 0.0, "without context": 0.0}
        for r in range(repeats):
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + r))
            x_t = (1 - t) * x0 + t * noise
            tt = torch.full((n,), t)
            v = model(torch.cat((x_t, context), dim=1), torch.cat((img_ids, context_ids), dim=1), txt, txt_ids, tt,
                      vec, guidance)[:, : x0.shape[1]].float()
            sums["with context"] += float(F.mse_loss(v, noise - x0)) / repeats
            plain = model(x_t, img_ids, txt, txt_ids, tt, vec, guidance).float()
            sums["without context"] += float(F.mse_loss(plain, noise - x0)) / repeats
            if r == 0:
                estimates.append(pipe.vae.decode(sampling.unpack(x_t - t * v, *z.shape[-2:]))[:8])
        out_rows[t] = {**sums, "copy the context": copy}
    if out is not None:
        rows = [to_uint8(images_to_tensor(ex.conditions[:8])), *(to_uint8(e) for e in estimates),
                to_uint8(images_to_tensor(ex.targets[:8]))]
        save_grid(rows, out, ["context", *(f"x0 at t={t}" for t in times), "target"])
    return out_rows


MIRRORED_PAIRS = (("a large red square on the left", "a large red square on the right"),
                  ("a large red square at the top", "a large red square at the bottom"),
                  ("a large red square in the top left corner", "a large red square in the bottom right corner"))


@torch.no_grad()
def red_centroid(pipe, prompt: str, n: int, seed: int) -> tuple[float, float, float]:
    """(x, y, mass) of red in the decoded t = 1 estimates x0 = noise - v over n noise draws: the centroid of the
    redness R - (G + B) / 2 (clipped at 0) as fractions of the width and height, and its mean per pixel (0-255)."""
    from fluxkit import sampling

    model, length = pipe.transformer, pipe.spec.max_sequence_length
    txt, vec = pipe.encode_prompt([prompt] * n, None, max_sequence_length=length)
    noise = torch.randn(n, 64, 64, generator=torch.Generator().manual_seed(seed))  # [n, L, 64]: 8x8 tokens, 128x128
    g = torch.full((n,), 1.0) if model.params.guidance_embed else None
    v = model(noise, sampling.image_ids(n, 8, 8), txt, sampling.text_ids(n, length), torch.ones(n), vec, g)
    images = (pipe.vae.decode(sampling.unpack(noise - v.float(), 16, 16)).clamp(-1, 1) + 1) * 127.5  # [n, 3, H, W]
    red = (images[:, 0] - (images[:, 1] + images[:, 2]) / 2).clamp(min=0).mean(0)  # [H, W]
    h, w = red.shape
    total = red.sum()
    x = float((red.sum(0) * (torch.arange(w) + 0.5)).sum() / total / w)
    y = float((red.sum(1) * (torch.arange(h) + 0.5)).sum() / total / h)
    return x, y, float(red.mean())


ENCODER_PAIRS = (("left / right", "a large red square on the left", "a large red square on the right"),
                 ("top / bottom", "a large red square at the top", "a large red square at the bottom"),
                 ("top left / bottom right", "a red circle in the top left corner",
                  "a red circle in the bottom right corner"),
                 ("above / below", "a red circle above a blue square", "a red circle below a blue square"),
                 ("red / blue", "a large red square on the left", "a large blue square on the left"),
                 ("square / circle", "a large red square on the left", "a large red circle on the left"),
                 ("large / small", "a large red square on the left", "a small red square on the left"),
                 ("two / three", "two red circles", "three red circles"))


@torch.no_grad()
def encoder_distances(pairs=ENCODER_PAIRS, length: int = 32) -> dict[str, list[float]]:
    """{pair name: [distance after layer 0 (embeddings), 1, ..., last]} for MiniLM token states (module docstring)."""
    from fluxkit.text import MiniLMEncoder

    encoder = MiniLMEncoder.from_package(torch.float32)
    model = encoder.model

    def states(prompt: str) -> tuple[list[Tensor], Tensor]:
        ids, mask, _ = encoder.tokenizer([prompt], length)
        x = model.embeddings(ids)
        key_bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min  # as MiniLM.forward
        out = [x[0]]
        for layer in model.encoder.layer:
            x = layer(x, key_bias)
            out.append(x[0])
        return out, mask[0].bool()

    rows = {}
    for name, a, b in pairs:
        (xs, real), (ys, _) = states(a), states(b)
        rows[name] = [float((x - y)[real].norm(dim=-1).max() / x[real].norm(dim=-1).mean()) for x, y in zip(xs, ys,
                                                                                                         strict=True)]
    return rows


SYNTHETIC_LATENTS = ("flat", "scenes")
SYNTHETIC_CAPTIONS = ("fixed", "phrasing", "varied", "anchored", "curriculum")
_HALVES = ("left", "right", "top", "bottom")  # k ^ 1 mirrors: left <-> right, top <-> bottom


def synthetic_position(steps: int, seed: int, log_every: int = 100, latents: str = "flat", captions: str = "fixed",
                       blocks: tuple[int, int] = (1, 2), scenes: int = 1024, report=None,
                       init: str | None = None) -> list[tuple[int, float, float]]:
    """[(step, t=1 loss with the true caption, with the mirrored caption)] of a from-scratch run on a task where
    position is what the caption adds (module docstring). Each scene puts one object in the left, right, top or
    bottom half; the first 64 are held out and scored every `log_every` steps.

    latents: "flat" = a bright block on a flat latent (the original toy); "scenes" = the autoencoder's latents of
    rendered scenes with one large object at that position. captions: "fixed" = a large red square on white, one
    phrasing per position ("a large red square on the left"); "phrasing" = the same scene, captioned in the
    generator's many phrasings; "varied" = colour, shape and background drawn too (5, 4 and 3 of them), the caption
    stating all of them as training captions do; "anchored" = varied, except that a quarter of the training scenes
    (drawn at random, none held out) are the fixed red square on white, so that position words alone predict where
    something appears in them; "curriculum" = the first half of the steps on fixed red squares on white (in the
    generator's phrasings, background stated), the second half on varied scenes. ("flat" needs "fixed": its block
    has no colour or shape.)
    blocks: (double, single) blocks of the tiny-width transformer (the shipped models have (3, 6)).
    report: called with each (step, true, mirrored) row as it is measured (long runs print as they go).
    init: a tiny-family base model (built-in name or folder, no guidance input) whose transformer weights the run
    starts from instead of a fresh init; `blocks` must then be its depth."""
    from dataclasses import replace

    from fluxkit import FluxPipeline, sampling
    from fluxkit.data.captions import caption
    from fluxkit.data.scenes import Scene, make_object

    if latents not in SYNTHETIC_LATENTS or captions not in SYNTHETIC_CAPTIONS:
        raise ValueError(f"latents must be one of {SYNTHETIC_LATENTS} and captions one of {SYNTHETIC_CAPTIONS}, "
                         f"got {latents!r}, {captions!r}")
    if latents == "flat" and captions != "fixed":
        raise ValueError("flat latents have no colour, shape or background to caption: use captions='fixed'")
    if scenes <= 64:
        raise ValueError(f"scenes must exceed the 64 held-out ones, got {scenes}")
    rng = random.Random(f"synthetic/{seed}")
    # curriculum: after the `scenes` varied ones, as many fixed ones again, trained on for the first half of the steps
    n_all = 2 * scenes - 64 if captions == "curriculum" else scenes
    where = torch.arange(n_all) % 4  # [N]: index into _HALVES
    drawn = []
    for i, k in enumerate(where.tolist()):
        # anchored: a quarter of the training scenes (never the held-out ones) are the fixed red square on white
        fixed = (captions in ("fixed", "phrasing") or (captions == "anchored" and i >= 64 and rng.random() < 0.25)
                 or (captions == "curriculum" and i >= scenes))
        colour = "red" if fixed else rng.choice(("red", "green", "blue", "yellow", "purple"))
        shape = "square" if fixed else rng.choice(SHAPES)
        background = "white" if fixed else rng.choice(("white", "gray", "black"))
        obj = make_object(rng, 128, 128, shape, colour, "large", _HALVES[k])
        drawn.append(Scene("single", 128, 128, background, frozenset({"colour", "shape", "size", "position"}), (obj,)))

    def text(scene: Scene, k: int, i: int) -> str:
        if captions == "fixed":
            return f"a large red square {('on the left', 'on the right', 'at the top', 'at the bottom')[k]}"
        stated = scene.stated | {"background"} if captions in ("varied", "anchored", "curriculum") else scene.stated
        moved = replace(scene, stated=stated, objects=(replace(scene.objects[0], position=_HALVES[k]),))
        return caption(moved, random.Random(f"synthetic/{seed}/{i}"))  # one phrasing per scene, for both captions

    pipe = FluxPipeline.from_pretrained("fluxkit-tiny-dev", torch_dtype=torch.float32, device="cpu")
    order = list(enumerate(zip(drawn, where.tolist(), strict=True)))
    true_captions = [text(sc, k, i) for i, (sc, k) in order]
    mirror_captions = [text(sc, k ^ 1, i) for i, (sc, k) in order]
    with torch.no_grad():
        if latents == "scenes":
            x0_all = encode_scenes(pipe, drawn)
        else:
            blocks_at = [(slice(4, 12), slice(0, 8)), (slice(4, 12), slice(8, 16)), (slice(0, 8), slice(4, 12)),
                         (slice(8, 16), slice(4, 12))]  # left, right, top, bottom of a 16x16 latent
            x0_all = torch.full((scenes, 16, 16, 16), -0.5)
            for i, k in enumerate(where.tolist()):
                x0_all[(i, slice(None), *blocks_at[k])] = 1.0
            x0_all = sampling.pack(x0_all)  # [N, 64, 64]
    pooled = captions != "fixed" or latents != "flat"  # the original toy fed no pooled vector
    first_half = (scenes, n_all) if captions == "curriculum" else None
    return train_toy(pipe, x0_all, true_captions, mirror_captions, steps, seed, log_every, blocks, init, report,
                     pooled=pooled, first_half=first_half)


def encode_scenes(pipe, scenes: list) -> Tensor:
    """The autoencoder's latents of rendered 128x128 scenes, packed -> [N, 64, 64]."""
    from fluxkit import sampling
    from fluxkit.data.render import render

    pixels = images_to_tensor([render(sc).image for sc in scenes])  # [N, 3, 128, 128]
    return sampling.pack(torch.cat([pipe.vae.encode(pixels[i : i + 64]) for i in range(0, len(scenes), 64)]))


def train_toy(pipe, x0_all: Tensor, true_captions: list[str], other_captions: list[str], steps: int, seed: int,
              log_every: int, blocks: tuple[int, int], init: str | None, report, pooled: bool = True,
              first_half: tuple[int, int] | None = None, score_t: float = 1.0) -> list[tuple[int, float, float]]:
    """A tiny-width transformer trained on the packed latents `x0_all` [N, 64, 64] under `true_captions`; rows 0-63
    are held out and scored every `log_every` steps at t = `score_t` under both caption lists ->
    [(step, true loss, other loss)]. `first_half`: (lo, hi) rows drawn for the first half of the steps (the rest
    draw from 64..lo)."""
    from dataclasses import replace

    from fluxkit import FluxPipeline, sampling
    from fluxkit.params import TINY_FLUX
    from fluxkit.train.flow import init_flux

    with torch.no_grad():
        length = pipe.spec.max_sequence_length
        true_txt, true_vec = pipe.encode_prompt(true_captions, None, max_sequence_length=length)
        other_txt, other_vec = pipe.encode_prompt(other_captions, None, max_sequence_length=length)
    params = replace(TINY_FLUX, guidance_embed=False, depth=blocks[0], depth_single_blocks=blocks[1])
    start = None
    if init is not None:
        start = FluxPipeline.from_pretrained(init, torch_dtype=torch.float32, device="cpu").transformer
        # The position-id convention is no weight: a model trained with centred ids goes on with them.
        params = replace(params, centered_ids=start.params.centered_ids)
    model = init_flux(params, seed)
    if start is not None:
        if start.params != model.params:
            raise ValueError(f"init {init!r} is not a tiny base of depth {blocks} (guidance embedding, width or "
                             f"depth differ): {start.params}")
        model.load_state_dict(start.state_dict(), strict=True)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4)
    fast_bf16 = bf16_is_fast("cpu")
    train_hi = first_half[0] if first_half is not None else len(x0_all)

    def loss(rows: Tensor, txt: Tensor, vec: Tensor, t: Tensor, gen: torch.Generator) -> Tensor:
        x0 = x0_all[rows]
        noise = torch.randn(x0.shape, generator=gen)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        b = len(rows)
        v = model(x_t, sampling.image_ids(b, 8, 8), txt[rows], sampling.text_ids(b, txt.shape[1]), t,
                  vec[rows] if pooled else torch.zeros(b, vec.shape[1]), None)
        return (v.float() - (noise - x0)).square().mean()

    gen, out = torch.Generator().manual_seed(seed), []
    held_out = torch.arange(64)
    for step in range(steps + 1):
        if step % log_every == 0:
            with torch.no_grad():
                ts = torch.full((64,), score_t)
                true = loss(held_out, true_txt, true_vec, ts, torch.Generator().manual_seed(seed + 1))
                other = loss(held_out, other_txt, other_vec, ts, torch.Generator().manual_seed(seed + 1))
            out.append((step, float(true), float(other)))
            if report is not None:
                report(*out[-1])
        if step == steps:
            break
        early = first_half is not None and step < steps // 2
        rows = torch.randint(*(first_half if early else (64, train_hi)), (32,), generator=gen)
        t = torch.sigmoid(torch.randn(32, generator=gen))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast_bf16):  # emulated bf16 is slower than fp32
            total = loss(rows, true_txt, true_vec, t, gen)
        opt.zero_grad()
        total.backward()
        opt.step()
    return out


SIGN_BOARDS = ("fixed", "placed", "moved", "varied")


def synthetic_signs(steps: int, seed: int, log_every: int = 100, boards: str = "fixed",
                    blocks: tuple[int, int] = (3, 6), scenes: int = 1024, report=None, init: str | None = None,
                    score_t: float = 1.0) -> list[tuple[int, float, float]]:
    """[(step, loss with the true sign text, with another listed word of the same length)] of a run on sign scenes
    whose text is one of the listed words (`fluxkit.data.scenes.WORDS`), scored on the 64 held-out scenes at
    t = `score_t`. boards: "fixed" = one board (yellow on black, centred on white, "a sign that says 'WORD'"):
    the text is all that changes; "placed" = centred and captioned as fixed, with background and board colours
    drawn as the training data does; "moved" = fixed colours and caption, placed as the training data does;
    "varied" = backgrounds, boards and places drawn and captioned as the training data does."""
    from dataclasses import replace

    from fluxkit import FluxPipeline
    from fluxkit.data.captions import caption
    from fluxkit.data.scenes import BACKGROUNDS, BOARDS, WORDS, Scene, make_sign, place_sign

    if boards not in SIGN_BOARDS:
        raise ValueError(f"boards must be one of {SIGN_BOARDS}, got {boards!r}")
    if scenes <= 64:
        raise ValueError(f"scenes must exceed the 64 held-out ones, got {scenes}")
    rng = random.Random(f"synthetic-signs/{seed}")
    drawn, true_captions, other_captions = [], [], []
    for i in range(scenes):
        word = WORDS[i % len(WORDS)]
        other = rng.choice([w for w in WORDS if len(w) == len(word) and w != word])
        if boards != "varied":
            background = rng.choice(tuple(BACKGROUNDS)) if boards == "placed" else "white"
            sign = make_sign(rng, 128, 128, word, background, None if boards == "placed" else BOARDS[2])
            if boards != "moved":
                sign = place_sign(sign, "center", 128, 128)
            scene = Scene("sign", 128, 128, background, frozenset({"text"}), sign=sign)
            true_captions.append(f"a sign that says '{word}'")
            other_captions.append(f"a sign that says '{other}'")
        else:
            background = rng.choice(tuple(BACKGROUNDS))
            scene = Scene("sign", 128, 128, background, frozenset({"text"} | ({"background"} if rng.random() < 0.5
                          else set())), sign=make_sign(rng, 128, 128, word, background))
            phrasing = rng.random()
            true_captions.append(caption(scene, random.Random(phrasing)))
            other_captions.append(caption(replace(scene, sign=replace(scene.sign, text=other)),
                                          random.Random(phrasing)))
        drawn.append(scene)
    pipe = FluxPipeline.from_pretrained("fluxkit-tiny-dev", torch_dtype=torch.float32, device="cpu")
    with torch.no_grad():
        x0_all = encode_scenes(pipe, drawn)
    return train_toy(pipe, x0_all, true_captions, other_captions, steps, seed, log_every, blocks, init, report,
                     score_t=score_t)


RELATION_SCENES = ("placed", "fixed", "varied")
RELATION_CELLS = {"above": ("top", "bottom"), "below": ("bottom", "top"), "left of": ("left", "right"),
                  "right of": ("right", "left")}  # relation -> grid cells of the two objects, for "placed"


def synthetic_relations(steps: int, seed: int, log_every: int = 100, layout: str = "fixed",
                        blocks: tuple[int, int] = (3, 6), scenes: int = 1024, report=None, init: str | None = None,
                        score_t: float = 1.0) -> list[tuple[int, float, float]]:
    """[(step, loss with the true relation, with the inverse one)] of a run on two-object scenes, scored on the 64
    held-out scenes at t = `score_t`. layout: "placed" = a small red circle and a small blue square on white,
    captioned "a red circle above a blue square" ("below", "to the left of", ...), each object in its own grid
    cell per relation (top / bottom, left / right): the relation words act as position words; "fixed" = the same
    two objects and caption, placed anywhere that makes the relation hold (only their offset tells it); "varied" =
    objects, backgrounds and phrasings drawn and captioned as the training data does."""
    from fluxkit import FluxPipeline

    if scenes <= 64:
        raise ValueError(f"scenes must exceed the 64 held-out ones, got {scenes}")
    drawn, true_captions, other_captions = relation_scenes(layout, seed, scenes)
    pipe = FluxPipeline.from_pretrained("fluxkit-tiny-dev", torch_dtype=torch.float32, device="cpu")
    with torch.no_grad():
        x0_all = encode_scenes(pipe, drawn)
    return train_toy(pipe, x0_all, true_captions, other_captions, steps, seed, log_every, blocks, init, report,
                     score_t=score_t)


def relation_scenes(layout: str, seed: int, n: int) -> tuple[list, list[str], list[str]]:
    """`n` two-object scenes of `layout` (see `synthetic_relations`), their captions and the captions with the
    inverse relation."""
    from fluxkit.data.captions import RELATION_PHRASES, caption
    from fluxkit.data.scenes import RELATIONS, Scene, make_object, make_relation, sample_scene
    from fluxkit.eval.probe import counterfactual_scene

    if layout not in RELATION_SCENES:
        raise ValueError(f"layout must be one of {RELATION_SCENES}, got {layout!r}")
    rng = random.Random(f"synthetic-relations/{seed}")
    drawn, true_captions, other_captions = [], [], []
    for i in range(n):
        relation = RELATIONS[i % len(RELATIONS)]
        if layout == "varied":
            scene = sample_scene(rng, 128, 128, kinds=("relation",))
            phrasing = rng.random()
            true_captions.append(caption(scene, random.Random(phrasing)))
            other_captions.append(caption(counterfactual_scene(scene, "relation", rng), random.Random(phrasing)))
        else:
            if layout == "placed":
                first = make_object(rng, 128, 128, "circle", "red", "small", RELATION_CELLS[relation][0])
                objects = (first, make_object(rng, 128, 128, "square", "blue", "small", RELATION_CELLS[relation][1],
                                              avoid=(first,)))
            else:
                objects = make_relation(rng, 128, 128, ("red", "circle"), ("blue", "square"), relation)
            scene = Scene("relation", 128, 128, "white", frozenset({"colour", "shape", "relation"}), objects,
                          relation)
            inverse = counterfactual_scene(scene, "relation", rng).relation
            true_captions.append(f"a red circle {RELATION_PHRASES[relation][0]} a blue square")
            other_captions.append(f"a red circle {RELATION_PHRASES[inverse][0]} a blue square")
        drawn.append(scene)
    return drawn, true_captions, other_captions


def _print_rates(label: str, rows: dict) -> None:
    checks = [c for c in next(iter(rows.values())) if c != "pass"]
    print(f"{label:<22} {'pass':>6} " + " ".join(f"{c:>9}" for c in checks))
    for name, row in rows.items():
        print(f"{str(name):<22} {row['pass']:6.0%} " + " ".join(f"{row[c]:9.0%}" for c in checks))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("diagnostic",
                   choices=("words", "latents", "denoise", "context", "prior", "synthetic", "signs", "relations",
                            "encoder"))
    p.add_argument("--model", default="fluxkit-tiny-dev", help="built-in name or folder (a tiny-family model)")
    p.add_argument("--scenes", type=int, default=48, help="single-object scenes (context: edit pairs)")
    p.add_argument("--out", type=Path, help="context: write the x0-estimate grid here (PNG)")
    p.add_argument("--times", type=float, nargs="+", default=[0.5, 0.7, 0.85, 0.95],
                   help="words, denoise: noise levels t")
    p.add_argument("--repeats", type=int, default=2, help="words, context: noise draws per t")
    p.add_argument("--noise", type=float, default=0.2, help="latents: std of the white-noise perturbation")
    p.add_argument("--ae", type=Path, help="latents: autoencoder weights replacing the model's own (e.g. an ae run "
                   "checkpoint's ema.safetensors; the model's scale and shift are kept)")
    p.add_argument("--seed", type=int, default=11, help="scene seed (the training caches use 0 and 2)")
    p.add_argument("--steps", type=int, default=600, help="synthetic: training steps")
    p.add_argument("--latents", choices=SYNTHETIC_LATENTS, default="flat", help="synthetic: toy blocks or scenes")
    p.add_argument("--captions", choices=SYNTHETIC_CAPTIONS, default="fixed", help="synthetic: caption variety")
    p.add_argument("--train-scenes", type=int, default=1024,
                   help="synthetic: scenes drawn, the first 64 held out (the rest are trained on, repeated)")
    p.add_argument("--blocks", type=int, nargs=2, default=(1, 2), metavar=("DOUBLE", "SINGLE"),
                   help="synthetic: transformer depth (the shipped models: 3 6)")
    p.add_argument("--init", help="synthetic, signs: start from this tiny base model's transformer (name or folder)")
    p.add_argument("--boards", choices=SIGN_BOARDS, default="fixed",
                   help="signs: one board; colours (placed) or places (moved) drawn; or boards as trained")
    p.add_argument("--layout", choices=RELATION_SCENES, default="fixed",
                   help="relations: objects in fixed cells, anywhere, or drawn as trained")
    p.add_argument("--score-t", type=float, default=1.0,
                   help="signs, relations: the noise level the held-out loss is taken at")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    from fluxkit import FluxPipeline

    torch.set_num_threads(args.threads)
    if args.diagnostic == "encoder":
        rows = encoder_distances()
        layers = len(next(iter(rows.values())))
        print(f"{'captions differing in':<24} " + " ".join(f"{'layer ' + str(i):>8}" for i in range(layers)))
        for name, row in rows.items():
            print(f"{name:<24} " + " ".join(f"{d:8.3f}" for d in row))
        return 0
    if args.diagnostic == "synthetic":
        print(f"{'step':>5} {'true caption':>13} {'mirrored':>9}   (flow loss at t = 1)")
        synthetic_position(args.steps, args.seed, latents=args.latents, captions=args.captions,
                           blocks=tuple(args.blocks), init=args.init, scenes=args.train_scenes,
                           report=lambda step, true, mirrored: print(f"{step:5d} {true:13.4f} {mirrored:9.4f}",
                                                                     flush=True))
        return 0
    if args.diagnostic == "relations":
        print(f"{'step':>5} {'true':>10} {'inverse':>11}   (flow loss at t = {args.score_t})")
        synthetic_relations(args.steps, args.seed, layout=args.layout, blocks=tuple(args.blocks), init=args.init,
                            scenes=args.train_scenes, score_t=args.score_t,
                            report=lambda step, true, other: print(f"{step:5d} {true:10.4f} {other:11.4f}",
                                                                   flush=True))
        return 0
    if args.diagnostic == "signs":
        print(f"{'step':>5} {'true text':>10} {'other word':>11}   (flow loss at t = {args.score_t})")
        synthetic_signs(args.steps, args.seed, boards=args.boards, blocks=tuple(args.blocks), init=args.init,
                        scenes=args.train_scenes, score_t=args.score_t,
                        report=lambda step, true, other: print(f"{step:5d} {true:10.4f} {other:11.4f}", flush=True))
        return 0
    pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=torch.float32, device="cpu")
    if pipe.spec.text_encoder != "minilm":
        raise SystemExit(f"{args.model} is not a tiny-family model (text encoder {pipe.spec.text_encoder!r})")
    if args.ae is not None:
        from safetensors.torch import load_file

        pipe.vae.load_state_dict(load_file(args.ae), strict=True)
    what = {"context": "edit pairs", "prior": "noise draws"}.get(args.diagnostic, "single-object scenes")
    print(f"model {args.model}, {args.scenes} {what} (seed {args.seed}), 128x128")
    if args.diagnostic == "words":
        print(f"{'t':>5} {'right':>8} {'shape swapped':>15} {'colour swapped':>15}")
        for t, row in word_losses(pipe, args.scenes, tuple(args.times), args.repeats, args.seed).items():
            right = row["right"]
            cells = [f"{row[k]:.4f} ({row[k] / right - 1:+.0%})" for k in ("shape swapped", "colour swapped")]
            print(f"{t:5.2f} {right:8.4f} {cells[0]:>15} {cells[1]:>15}")
    elif args.diagnostic == "latents":
        _print_rates("latent", latent_checks(pipe, args.scenes, args.noise, args.seed))
    elif args.diagnostic == "prior":
        print(f"{'prompt':<48} {'red x':>6} {'red y':>6} {'redness':>8}")
        for prompt in (p for pair in MIRRORED_PAIRS for p in pair):
            x, y, mass = red_centroid(pipe, prompt, args.scenes, args.seed)
            print(f"{prompt:<48} {x:6.3f} {y:6.3f} {mass:8.2f}")
    elif args.diagnostic == "context":
        rows = context_losses(pipe, args.scenes, tuple(args.times), args.repeats, args.seed, args.out)
        names = list(next(iter(rows.values())))
        print(f"{'t':>5} " + " ".join(f"{k:>17}" for k in names))
        for t, row in rows.items():
            print(f"{t:5.2f} " + " ".join(f"{row[k]:17.4f}" for k in names))
    else:
        _print_rates("t", denoise_checks(pipe, args.scenes, tuple(args.times), args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
