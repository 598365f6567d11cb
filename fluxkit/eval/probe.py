"""Caption probes: which words of its prompt does a model use?

For each attribute (colour, shape, size, position, background, relation, count) the probe builds scenes whose
caption states it, and a counterfactual caption that differs in that attribute alone (another colour, the mirrored
position, the inverse relation, ...; same phrasing, drawn from the same rng). The model scores both captions on the
scene's own render by its denoising error at fixed noise levels, with the same noise for both: a model that uses the
attribute has the lower error under the true caption. This is the diffusion-classifier test (Li et al. 2023, "Your
Diffusion Model is Secretly a Zero-Shot Classifier"), reduced to a choice between two captions, so chance is 50%.

It needs no sampling and no checker, so it is fast, and it separates "the model ignores the word" (50%) from "the model
reads the word but draws badly" (high probe accuracy, low pass rate in `fluxkit eval`). Training runs can track it per
checkpoint long before generation pass rates move.

fluxkit eval --probe --model fluxkit-tiny-dev --out runs/probe-dev
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..data.captions import INVERSE, caption
from ..data.render import render
from ..data.scenes import BACKGROUNDS, COLOURS, SHAPES, WORDS, Scene, contrasts, random_sign_text, sample_scene
from .compare import wilson_interval

ATTRIBUTES = ("colour", "shape", "size", "position", "background", "relation", "count", "text")
MIRROR = {"top left": "bottom right", "top right": "bottom left", "bottom left": "top right",
          "bottom right": "top left", "top": "bottom", "bottom": "top", "left": "right", "right": "left"}
KIND_OF = {"colour": "single", "shape": "single", "size": "single", "position": "single", "background": "single",
           "relation": "relation", "count": "count", "text": "sign"}
ALWAYS_STATED = ("relation", "count", "text")  # the caption of their kind of scene always states them
CHANNELS = ("both", "tokens", "pooled")  # what of the counterfactual's encoding the model is given
TIMESTEPS = (0.95, 0.8, 0.6, 0.4)  # noise levels scored; word choices show most at high noise, details lower
PROBE_ITEMS, QUICK_PROBE_ITEMS = 64, 16


@dataclass(frozen=True)
class ProbeItem:
    attribute: str
    scene: Scene
    caption: str
    counterfactual: str  # the caption with only `attribute` changed


def counterfactual_scene(scene: Scene, attribute: str, rng: random.Random) -> Scene | None:
    """`scene` with `attribute` changed as its caption will state it, or None where it has no counterpart (a centred
    object has no mirrored position). Only the stated value changes: the pixels of the true scene are what is scored."""
    obj = scene.objects[0] if scene.objects else None
    if attribute == "colour":
        colour = rng.choice([c for c in COLOURS if c != obj.colour and contrasts(c, scene.background)])
        return replace(scene, objects=(replace(obj, colour=colour),))
    if attribute == "shape":
        return replace(scene, objects=(replace(obj, shape=rng.choice([s for s in SHAPES if s != obj.shape])),))
    if attribute == "size":
        return replace(scene, objects=(replace(obj, size="small" if obj.size == "large" else "large"),))
    if attribute == "position":
        if obj.position not in MIRROR:
            return None
        return replace(scene, objects=(replace(obj, position=MIRROR[obj.position]),))
    if attribute == "background":
        options = [b for b in BACKGROUNDS
                   if b != scene.background and all(contrasts(o.colour, b) for o in scene.objects)]
        return replace(scene, background=rng.choice(options)) if options else None
    if attribute == "relation":
        return replace(scene, relation=INVERSE[scene.relation])
    if attribute == "count":
        n = rng.choice([k for k in (1, 2, 3) if k != len(scene.objects)])
        return replace(scene, objects=(obj,) * n)
    if attribute == "text":  # another text of the same length and kind (a listed word, or random letters)
        text = scene.sign.text
        if text in WORDS:
            other = rng.choice([w for w in WORDS if len(w) == len(text) and w != text])
        else:
            other = text
            while other == text:
                other = random_sign_text(rng, len(text))
        return replace(scene, sign=replace(scene.sign, text=other))
    raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")


def build_probe(attribute: str, n: int, seed: int = 0, size: tuple[int, int] = (128, 128)) -> list[ProbeItem]:
    """`n` deterministic items probing `attribute` on scenes of `size` (width, height), of training colour x shape
    pairs."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    if n <= 0:
        raise ValueError(f"a probe needs at least one item, got n={n}")
    width, height = size
    items, i = [], 0
    while len(items) < n:
        rng = random.Random(f"fluxkit-probe/{seed}/{attribute}/{i}")
        i += 1
        scene = sample_scene(rng, width, height, (KIND_OF[attribute],))
        if attribute not in scene.stated and attribute not in ALWAYS_STATED:
            continue
        other = counterfactual_scene(scene, attribute, rng)
        if other is None:
            continue
        phrasing = rng.random()  # both captions draw their phrasing from copies of one rng
        true, false = caption(scene, random.Random(phrasing)), caption(other, random.Random(phrasing))
        if true != false:
            items.append(ProbeItem(attribute, scene, true, false))
    return items


def score_probe(pipe, items: list[ProbeItem], timesteps: tuple[float, ...] = TIMESTEPS, draws: int = 2,
                guidance: float = 1.0, batch_size: int = 16, seed: int = 0, channel: str = "both") -> list[dict]:
    """Per item: the summed squared velocity error under the true and the counterfactual caption, over `timesteps`
    x `draws` noise samples shared by both captions. A guidance-distilled model is fed `guidance` (1.0 = its
    unguided, conditional prediction). `channel` says what of the counterfactual's encoding the model gets: "both",
    or only its "tokens" (the true caption's pooled vector kept) or only its "pooled" vector (the true tokens
    kept), which tells through which input (txt_in's sequence or vector_in's pooled vector) an attribute is read."""
    import torch

    if not items:
        raise ValueError("score_probe needs at least one item")
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {CHANNELS}, got {channel!r}")
    if any(not 0 < t <= 1 for t in timesteps) or draws < 1:
        raise ValueError(f"timesteps must lie in (0, 1] and draws >= 1, got {timesteps}, {draws}")
    model, vae = pipe.transformer, pipe.vae
    results = []
    for start in range(0, len(items), batch_size):
        part = items[start : start + batch_size]
        sizes = {(it.scene.width, it.scene.height) for it in part}
        if len(sizes) != 1:
            raise ValueError(f"a probe batch must share one image size, got {sorted(sizes)}")
        pixels = torch.from_numpy(np.stack([render(it.scene).image for it in part])).permute(0, 3, 1, 2)
        pixels = pixels.float() / 127.5 - 1.0  # [B, 3, H, W]
        with torch.inference_mode():
            with pipe._placed("vae"):
                weight = next(vae.parameters())
                latents = vae.encode(pixels.to(weight.device, weight.dtype)).float()  # [B, 16, h, w]
            txt, vec = pipe.encode_prompt([it.caption for it in part] + [it.counterfactual for it in part])
            n = len(part)
            if channel == "tokens":  # the counterfactual keeps the true pooled vector
                vec = torch.cat((vec[:n], vec[:n]))
            elif channel == "pooled":  # the counterfactual keeps the true token states
                txt = torch.cat((txt[:n], txt[:n]))
            with pipe._placed("transformer"):
                errors = _errors(model, latents, txt, vec, timesteps, draws, guidance, seed + start)
        for j, it in enumerate(part):
            results.append({"attribute": it.attribute, "caption": it.caption, "counterfactual": it.counterfactual,
                            "error_true": errors[0][j], "error_counterfactual": errors[1][j]})
    return results


def _errors(model, latents, txt, vec, timesteps, draws, guidance, seed) -> tuple[list[float], list[float]]:
    import torch

    from .. import sampling

    batch, dev, dt = latents.shape[0], model.device, model.dtype
    h, w = latents.shape[-2:]
    x0 = sampling.pack(latents).to(dev)  # [B, L, 64]
    x0 = torch.cat((x0, x0))  # true captions, then counterfactuals: the same images and noise
    img_ids = sampling.image_ids(2 * batch, h // 2, w // 2, device=dev)
    txt_ids = sampling.text_ids(2 * batch, txt.shape[1], dev)
    pe = model.position_embedding(txt_ids, img_ids)
    g = torch.full((2 * batch,), float(guidance), device=dev, dtype=dt) if model.params.guidance_embed else None
    total = torch.zeros(2 * batch)
    gen = torch.Generator().manual_seed(seed)
    for t in timesteps:
        for _ in range(draws):
            noise = torch.randn(x0[:batch].shape, generator=gen).to(dev)
            noise = torch.cat((noise, noise))
            x_t = (1 - t) * x0 + t * noise
            tt = torch.full((2 * batch,), t, device=dev, dtype=dt)
            v = model(x_t.to(dt), img_ids, txt.to(dev, dt), txt_ids, tt, vec.to(dev, dt), g, pe=pe).float()
            total += (v - (noise - x0)).square().mean(dim=(1, 2)).cpu()
    return total[:batch].tolist(), total[batch:].tolist()


def summarize(results: list[dict]) -> dict:
    """Per attribute and overall: n, accuracy (the true caption's error strictly lower; ties count half), its 95%
    Wilson interval, and the mean relative error increase under the counterfactual."""
    summary = {}
    groups = {a: [r for r in results if r["attribute"] == a] for a in ATTRIBUTES}
    groups["overall"] = results
    for name, rows in groups.items():
        if not rows:
            continue
        wins = sum(1.0 if r["error_true"] < r["error_counterfactual"] else
                   0.5 if r["error_true"] == r["error_counterfactual"] else 0.0 for r in rows)
        gap = float(np.mean([(r["error_counterfactual"] - r["error_true"]) / r["error_true"] for r in rows]))
        lo, hi = wilson_interval(round(wins), len(rows))
        summary[name] = {"n": len(rows), "accuracy": wins / len(rows), "interval": [lo, hi], "gap": gap}
    return summary


def format_probe(summary: dict) -> str:
    lines = [f"{'attribute':12} {'n':>4}  {'prefers true':>12}  {'95% interval':>13}  {'error gap':>9}"]
    for name, s in summary.items():
        lo, hi = s["interval"]
        lines.append(f"{name:12} {s['n']:4d}  {s['accuracy']:12.1%}  {lo:6.1%}-{hi:6.1%}  {s['gap']:+9.2%}")
    lines.append("chance is 50%: a model that ignores an attribute prefers neither caption")
    return "\n".join(lines)


def run_probe(pipe, n: int, out: Path | None = None, attributes: tuple[str, ...] = ATTRIBUTES, seed: int = 0,
              size: tuple[int, int] = (128, 128), guidance: float = 1.0, batch_size: int = 16,
              channel: str = "both") -> dict:
    """Build, score and print the probe; with `out`, write probe.json (summary + items) there."""
    results = []
    for attribute in attributes:
        results += score_probe(pipe, build_probe(attribute, n, seed, size), guidance=guidance,
                               batch_size=batch_size, seed=seed, channel=channel)
    summary = summarize(results)
    print(format_probe(summary))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "probe.json", json.dumps({"summary": summary, "channel": channel, "items": results},
                                                         indent=1))
    return summary
