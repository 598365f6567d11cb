"""Teach the tiny model a new concept with `fluxkit train-lora`, then measure it (fluxkit issue 4, item 6).

    .venv/bin/python -m benchmarks.lora_concept --out runs/lora-concept            # fluxkit-tiny-dev by default

1. Data: `--images` pictures of something the tiny family never saw, named by a rare token, drawn in the scene
   generator's style (its colours and backgrounds): a shape (a ring, or a plus-shaped cross: "a red sks shape in the
   top left corner", at the generator's sizes and positions, placed by `make_object`, 4x supersampled edges) or a
   frame along the picture's edges ("a red sks frame on a white background"); plus `--regular-images` ordinary
   scenes against drift. `--prior mixed` mixes the generator's renders of them, with their captions, into the
   training folder. `--prior renders` and `--prior model` use DreamBooth's prior-preservation loss instead
   (`train-lora --with_prior_preservation`, one class image beside each concept image in every batch), with the
   generator's renders or the model's own samples of those captions (generated here, inside the timed budget) as
   the class images.
2. Training: the `fluxkit train-lora` command itself, run in-process; its wall time (model load and caching
   included) is the number compared with the 10-minute budget.
3. Concept: held-out prompts with the token (other phrasings, colours and places), generated with and without the
   LoRA; `find_concept` looks for a shape among the colour-segmented blobs of `fluxkit.eval.checker`, by template
   matching against the generator's four shapes and the concept, and for a frame in the band along the edges.
4. Prompt following: the standard `fluxkit eval` suite, with and without the LoRA.
Writes report.json, report.md and image grids to --out, and prints the table; the exit status is 0 when every
target is met. Re-running with the same --out continues the same training run (finished: nothing to train) and
measures again; a longer --train-steps continues it further.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage.measure import label, regionprops

from fluxkit.data.captions import BACKGROUND_PHRASES, POSITION_PHRASES, caption
from fluxkit.data.render import render
from fluxkit.data.scenes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SIZES,
    SUPERSAMPLE,
    Scene,
    SceneObject,
    contrasts,
    make_object,
    sample_scene,
)
from fluxkit.eval.checker import MIN_AREA_FRACTION, PALETTE_NAMES, nearest_colours, segment

CONCEPTS = ("ring", "cross", "frame")
KNOWN_SHAPES = ("circle", "square", "triangle", "star")  # what the tiny family was trained on
RING_HOLE = 0.5  # inner / outer diameter
CROSS_ARM = 1 / 3  # arm width / extent
FRAME_WIDTH = 1 / 8  # a frame's band / the image's shorter side: one 16-px token at 128 px
FRAME_MIN_SHARE = 0.7  # a frame covers at least this share of its band in one colour ...
FRAME_MAX_INSIDE = 0.3  # ... and at most this share of the band just inside it
TEMPLATE = 24  # blobs and templates are compared at TEMPLATE x TEMPLATE
MIN_IOU = 0.6  # a blob is the concept when the concept is its best template and matches at least this well
MAX_ASPECT = 1.5  # rings and crosses have square bounding boxes; blurred ones stay within this ratio
TEMPLATES = ("{obj}{pos}{bg}", "there is {obj}{pos}{bg}", "an image of {obj}{pos}{bg}", "{obj}{bg}{pos}")


# ------------------------------------------------------------------------------------------------ drawing
def concept_alpha(concept: str, centre: tuple[float, float], extent: float, width: int, height: int) -> np.ndarray:
    """Anti-aliased coverage (H, W) float32 in [0, 1] of the concept with bbox side `extent` at `centre`; a frame
    borders the whole picture and ignores both."""
    if concept == "frame":
        return frame_band(width, height).astype(np.float32)
    s = SUPERSAMPLE
    canvas = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = centre[0] * s, centre[1] * s, extent * s / 2
    if concept == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        inner = r * RING_HOLE
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif concept == "cross":
        arm = r * CROSS_ARM
        draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=255)
        draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=255)
    else:
        raise ValueError(f"concept must be one of {CONCEPTS}, got {concept!r}")
    return np.asarray(canvas.reduce(s), dtype=np.float32) / 255.0  # (H, W) box-filtered coverage


def frame_band(width: int, height: int, inset: int | None = None) -> np.ndarray:
    """(H, W) bool: the frame's band along the picture's edges, or with `inset` the band of the same width that
    starts `inset` pixels inside the frame (what a frame borders; a sign's board ends well inside it)."""
    band = max(2, round(min(width, height) * FRAME_WIDTH))
    ys, xs = np.arange(height)[:, None], np.arange(width)[None, :]
    to_edge = np.minimum(np.minimum(ys, height - 1 - ys), np.minimum(xs, width - 1 - xs))  # (H, W)
    start = 0 if inset is None else band + inset
    return (to_edge >= start) & (to_edge < start + band)


@dataclass(frozen=True)
class ConceptScene:
    placement: SceneObject  # where and how large (a circle's bbox: the concepts have square bboxes too)
    background: str
    stated: frozenset[str]  # of "size", "position", "background"

    def render(self, concept: str, width: int, height: int) -> np.ndarray:
        """(H, W, 3) uint8, composited like `fluxkit.data.render.render`."""
        alpha = concept_alpha(concept, self.placement.centre, self.placement.extent, width, height)[..., None]
        image = np.empty((height, width, 3), np.float32)
        image[:] = BACKGROUNDS[self.background]
        image += (np.asarray(COLOURS[self.placement.colour], np.float32) - image) * alpha
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)

    def caption(self, concept: str, token: str, rng: random.Random) -> str:
        """A frame has no size or position to state: "a red sks frame on a white background"."""
        obj, shape = self.placement, concept != "frame"
        words = f"{obj.size} {obj.colour}" if "size" in self.stated and shape else obj.colour
        phrase = f"a {words} {token} {'shape' if shape else 'frame'}"
        pos = " " + rng.choice(POSITION_PHRASES[obj.position]) if "position" in self.stated and shape else ""
        bg = " " + rng.choice(BACKGROUND_PHRASES).format(self.background) if "background" in self.stated else ""
        return rng.choice(TEMPLATES).format(obj=phrase, pos=pos, bg=bg)


def sample_concept_scene(rng: random.Random, width: int, height: int) -> ConceptScene:
    """A random colour, background, size and position, with the generator's odds of stating each."""
    background = rng.choice(tuple(BACKGROUNDS))
    colour = rng.choice([c for c in COLOURS if contrasts(c, background)])
    placement = make_object(rng, width, height, "circle", colour, rng.choice(tuple(SIZES)), rng.choice(POSITIONS))
    stated = frozenset(a for a, odds in (("size", 0.6), ("position", 0.7), ("background", 0.5)) if rng.random() < odds)
    return ConceptScene(placement, background, stated)


def ordinary_scene(rng: random.Random, size: int) -> tuple[Scene, str]:
    """One of the generator's own scenes (size x size) and its caption: the regular images against drift."""
    scene = sample_scene(rng, size, size)
    return scene, caption(scene, rng)


def make_dataset(folder: Path, concept: str, n: int, seed: int, size: int, token: str, regular: int = 0) -> list[str]:
    """n concept images + `regular` ordinary scenes of the generator, each with a same-name .txt caption, in `folder`
    (the `--instance_data_dir` layout); returns the captions.

    The ordinary scenes are DreamBooth's prior preservation with the generator's renders standing in for the
    model's own samples: they keep the adapter from drifting what the model already draws."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, captions = random.Random(seed), []
    for i in range(n + regular):
        if i < n:
            scene = sample_concept_scene(rng, size, size)
            pixels, text = scene.render(concept, size, size), scene.caption(concept, token, rng)
        else:
            ordinary, text = ordinary_scene(rng, size)
            pixels = render(ordinary).image
        name = f"{'concept' if i < n else 'regular'}-{i:03d}"
        Image.fromarray(pixels).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(text + "\n")
        captions.append(text)
    return captions


# ------------------------------------------------------------------------------------------------ checker
@functools.cache
def templates(concept: str) -> dict[str, np.ndarray]:
    """Binary TEMPLATE x TEMPLATE masks of the four known shapes (the generator's renders) and the concept."""
    size, out = 64, {}
    for shape in KNOWN_SHAPES:
        obj = SceneObject(shape, "black", "large", (size / 2, size / 2), size - 8, "center")
        mask = render(Scene("single", size, size, "white", frozenset({"colour", "shape"}), (obj,))).masks[0]
        out[shape] = _normalise(mask)
    out[concept] = _normalise(concept_alpha(concept, (size / 2, size / 2), size - 8, size, size) >= 0.5)
    return out


def _normalise(mask: np.ndarray) -> np.ndarray:
    """A blob's mask cropped to its bbox and resized to TEMPLATE x TEMPLATE (bool)."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    image = Image.fromarray(crop.astype(np.uint8) * 255).resize((TEMPLATE, TEMPLATE), Image.BILINEAR)
    return np.asarray(image) >= 128


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _on_background(mask: np.ndarray, index: np.ndarray, background: int) -> bool:
    """Whether the background is the commonest palette colour 3-4 px around the blob (a sign's letter "O" sits on
    its board). Nearer pixels hold the blurred edge's mixed colours, not the surroundings."""
    filled = ndimage.binary_fill_holes(mask)
    rim = ndimage.binary_dilation(filled, iterations=4) & ~ndimage.binary_dilation(filled, iterations=2)
    around = index[rim]
    around = around[around >= 0]
    return around.size > 0 and np.bincount(around).argmax() == background


@dataclass(frozen=True)
class ConceptHit:
    colour: str
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1)
    iou: float  # with the concept's template


def find_concept(image: np.ndarray, concept: str) -> ConceptHit | None:
    """The largest blob (one palette colour, holes kept, mostly surrounded by the background) whose best-matching
    template is the concept, or None. A frame is found by `find_frame`."""
    height, width = image.shape[:2]
    index = nearest_colours(image)  # (H, W) palette index, -1 for none
    if concept == "frame":
        return find_frame(index)
    background = PALETTE_NAMES.index(segment(image).background)
    min_area = max(12.0, MIN_AREA_FRACTION * width * height)
    hits = []
    for colour in np.unique(index):
        if colour < 0 or colour == background:
            continue
        components = label(index == colour, connectivity=1)  # (H, W) int
        for region in regionprops(components):
            y0, x0, y1, x1 = region.bbox
            if region.area < min_area or max(y1 - y0, x1 - x0) > MAX_ASPECT * min(y1 - y0, x1 - x0):
                continue
            if not _on_background(components == region.label, index, background):
                continue
            blob = _normalise(region.image)
            scores = {name: _iou(blob, t) for name, t in templates(concept).items()}
            if max(scores, key=scores.get) == concept and scores[concept] >= MIN_IOU:
                hits.append((region.area, ConceptHit(PALETTE_NAMES[colour], (x0, y0, x1, y1), scores[concept])))
    return max(hits, key=lambda h: h[0])[1] if hits else None


def find_frame(index: np.ndarray) -> ConceptHit | None:
    """A frame in a palette-index map (H, W): one colour holds >= FRAME_MIN_SHARE of the band along the edges and
    <= FRAME_MAX_INSIDE of the band just inside it (so neither a plain background nor the background around a large
    sign is a frame). Its `iou` is the band share."""
    height, width = index.shape
    band, inside = index[frame_band(width, height)], index[frame_band(width, height, inset=4)]
    known = band[band >= 0]
    if known.size == 0:
        return None
    colour = int(np.bincount(known).argmax())
    share = float(np.mean(band == colour))
    if share < FRAME_MIN_SHARE or np.mean(inside == colour) > FRAME_MAX_INSIDE:
        return None
    return ConceptHit(PALETTE_NAMES[colour], (0, 0, width, height), share)


# ------------------------------------------------------------------------------------------------ measuring
def concept_scores(pipe, scenes: list[ConceptScene], prompts: list[str], seeds: list[int], concept: str, size: int,
                   steps: int | None = None, batch: int = 16) -> tuple[dict, list[np.ndarray]]:
    """Generate every prompt (one seed each) -> ({present, right_colour} rates, images)."""
    images = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        out = pipe(prompts[i : i + batch], height=size, width=size, num_inference_steps=steps, generator=gens,
                   output_type="np").images
        images += [(im * 255).round().astype(np.uint8) for im in out]
    hits = [find_concept(im, concept) for im in images]
    right = [h is not None and h.colour == s.placement.colour for h, s in zip(hits, scenes)]
    return {"present": float(np.mean([h is not None for h in hits])), "right_colour": float(np.mean(right))}, images


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fluxkit-tiny-dev", help="built-in name, folder or repo id")
    p.add_argument("--concept", default="ring", choices=CONCEPTS)
    p.add_argument("--token", default="sks", help="the rare word that names the concept")
    p.add_argument("--images", type=int, default=20, help="training images of the concept")
    p.add_argument("--regular-images", type=int, default=20,
                   help="ordinary generator scenes trained alongside (prior preservation); 0: none")
    p.add_argument("--prior", choices=tuple(PRIORS), default="mixed",
                   help="the regular scenes: renders mixed into the data, or class images of DreamBooth's "
                        "prior-preservation loss, rendered by the generator or sampled from the model")
    p.add_argument("--size", type=int, default=128, help="image size (training, concept prompts and the suite)")
    p.add_argument("--train-steps", type=int, default=1000)
    p.add_argument("--prior-loss-weight", type=float, default=1.0, help="class loss weight")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--target-modules", help="train-lora's --target_modules (default: its default, every linear of "
                   "the blocks); e.g. txt_attn.qkv,txt_attn.proj,txt_mlp.0,txt_mlp.2 for the text stream only")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                   help="fp32 (no) trains ~1.8x faster than bf16 autocast on this CPU at the tiny size")
    p.add_argument("--steps", type=int, help="sampling steps when measuring (default: the model's)")
    p.add_argument("--concept-prompts", type=int, default=50, help="held-out concept prompts (one seed each)")
    p.add_argument("--quick", action="store_true", help="4 suite prompts per category instead of the full suite")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="suite seeds per prompt")
    p.add_argument("--budget-minutes", type=float, default=10.0, help="the training time allowed (checked)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 2 is faster on an idle 2-core machine, 1 never stalls on a busy one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/lora-concept"))
    return p.parse_args(argv)


PRIORS = {"mixed": "renders, mixed in", "renders": "renders, prior-preservation loss",
          "model": "model samples, prior-preservation loss"}
DATA_OPTIONS = ("model", "concept", "token", "images", "regular_images", "prior", "size", "seed")


def make_class_images(folder: Path, args: argparse.Namespace) -> None:
    """`--regular-images` generator scenes as class images (.png + same-name .txt caption): the generator's renders
    (`--prior renders`) or the model's own samples of their captions (`--prior model`); those already there are
    kept (a resumed run)."""
    from fluxkit.pipeline import FluxPipeline

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed + 2)  # other scenes than the training data's and the held-out prompts'
    scenes = [sample_scene(rng, args.size, args.size) for _ in range(args.regular_images)]
    captions = [caption(scene, rng) for scene in scenes]  # after all scenes: the order the measured runs drew in
    todo = [i for i in range(len(captions)) if not (folder / f"class-{i:03d}.png").is_file()]
    if args.prior == "renders":
        for i in todo:
            (folder / f"class-{i:03d}.txt").write_text(captions[i] + "\n")
            Image.fromarray(render(scenes[i]).image).save(folder / f"class-{i:03d}.png")
        return
    pipe = FluxPipeline.from_pretrained(args.model, device="cpu") if todo else None
    for start in range(0, len(todo), 8):
        part = todo[start : start + 8]
        images = pipe([captions[i] for i in part], height=args.size, width=args.size, num_inference_steps=args.steps,
                      generator=[torch.Generator().manual_seed(2000 + i) for i in part]).images
        for i, image in zip(part, images):
            (folder / f"class-{i:03d}.txt").write_text(captions[i] + "\n")
            image.save(folder / f"class-{i:03d}.png")  # last: a .png present means its pair is whole


def train(args: argparse.Namespace) -> tuple[list[str], float]:
    """Write the data set (and with `--prior renders|model` the class images), run `fluxkit train-lora` in-process ->
    (its command line, wall seconds of both)."""
    from fluxkit.cli import main as fluxkit_main

    saved, mine = args.out / "data-options.json", {k: getattr(args, k) for k in DATA_OPTIONS}
    if saved.is_file() and {"prior": "mixed", **json.loads(saved.read_text())} != mine:  # older runs: mixed
        raise SystemExit(f"{args.out} was made with other data options ({saved}); choose another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(mine))
    began = time.monotonic()
    mixed = args.regular_images if args.prior == "mixed" else 0
    make_dataset(args.out / "data", args.concept, args.images, args.seed, args.size, args.token, mixed)
    prior = []
    if args.prior != "mixed" and args.regular_images:
        make_class_images(args.out / "classes", args)
        prior = ["--with_prior_preservation", "--class_data_dir", str(args.out / "classes"), "--num_class_images",
                 str(args.regular_images), "--prior_loss_weight", str(args.prior_loss_weight)]
    noun = "frame" if args.concept == "frame" else "shape"
    command = ["train-lora", "--model", args.model, "--instance_data_dir", str(args.out / "data"),
               "--output_dir", str(args.out / "lora"), "--resolution", str(args.size), "--rank", str(args.rank),
               "--learning_rate", str(args.learning_rate), "--lr_scheduler", "constant_with_warmup",
               "--lr_warmup_steps", str(min(50, args.train_steps)), "--train_batch_size", str(args.batch_size),
               "--max_train_steps", str(args.train_steps), "--checkpointing_steps", "200", "--seed", str(args.seed),
               "--mixed_precision", args.mixed_precision, "--resume_from_checkpoint", "latest", "--device", "cpu",
               "--validation_prompt", f"a red {args.token} {noun}", "--validation_steps", "250", *prior]
    if args.steps is not None:
        command += ["--validation_inference_steps", str(args.steps)]
    if args.target_modules:
        command += ["--target_modules", args.target_modules]
    if fluxkit_main(command) != 0:
        raise SystemExit(2)
    return ["fluxkit", *command], time.monotonic() - began


def main(argv: list[str] | None = None) -> int:
    from fluxkit.eval.cli import make_generate
    from fluxkit.eval.run import run_eval
    from fluxkit.eval.suite import build_suite
    from fluxkit.pipeline import FluxPipeline
    from fluxkit.train.report import save_grid

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command, wall = train(args)
    done = json.loads((args.out / "lora" / "done.json").read_text())
    rng = random.Random(args.seed + 1)  # held out: other scenes and phrasings than the training captions
    scenes = [sample_concept_scene(rng, args.size, args.size) for _ in range(args.concept_prompts)]
    prompts = [s.caption(args.concept, args.token, rng) for s in scenes]
    seeds = list(range(1000, 1000 + len(prompts)))
    pipe = FluxPipeline.from_pretrained(args.model, device="cpu")
    suite = build_suite(quick=args.quick, seeds=tuple(args.seeds), size=(args.size, args.size))
    generate = make_generate(pipe, args.size, args.size, args.steps, None, 1.0)
    results, grids = {}, []
    for name in ("without", "with"):
        if name == "with":
            pipe.load_lora_weights(args.out / "lora")
        concept, images = concept_scores(pipe, scenes, prompts, seeds, args.concept, args.size, args.steps)
        grids.append(images[:16])
        suite_summary = run_eval(generate, suite, args.out / f"eval-{name}", log=lambda _: None)
        results[name] = {"concept": concept, "suite_pass_rate": suite_summary["overall"]["pass_rate"]}
    save_grid(grids, args.out / "concept-grid.png", ["without LoRA", "with LoRA"])
    report = summarise(args, command, wall, done, results, len(suite))
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    (args.out / "report.md").write_text(report["table"] + "\n")
    print(report["table"])
    return 0 if all(report["verdicts"].values()) else 1


def summarise(args, command: list[str], wall: float, done: dict, results: dict, suite_items: int) -> dict:
    with_, without = results["with"], results["without"]
    drop = 100 * (without["suite_pass_rate"] - with_["suite_pass_rate"])
    verdicts = {
        # This invocation's wall time (loading, caching and validation images included), or on a re-run of a
        # finished run the training time summed over its sessions.
        f"training <= {args.budget_minutes:g} min": max(wall, done["train_seconds"]) <= 60 * args.budget_minutes,
        "concept with LoRA >= 80%": with_["concept"]["present"] >= 0.8,
        "concept without LoRA <= 5%": without["concept"]["present"] <= 0.05,
        "suite drop <= 3 points": drop <= 3.0,
    }
    rows = [
        f"LoRA concept demonstration: {args.concept} as '{args.token}', model {args.model}, {args.images} concept "
        f"+ {args.regular_images} regular images ({PRIORS[args.prior]})",
        f"training: {done['steps']} steps in {done['train_seconds']:.0f} s "
        f"({wall / 60:.1f} min with loading and caching)",
        "",
        "| | without LoRA | with LoRA |",
        "|---|---|---|",
        f"| concept present ({args.concept_prompts} held-out prompts) | {without['concept']['present']:.0%} | "
        f"{with_['concept']['present']:.0%} |",
        f"| concept in the prompt's colour | {without['concept']['right_colour']:.0%} | "
        f"{with_['concept']['right_colour']:.0%} |",
        f"| eval suite pass rate ({suite_items} images) | {without['suite_pass_rate']:.1%} | "
        f"{with_['suite_pass_rate']:.1%} |",
        "",
        *(f"- [{'x' if ok else ' '}] {name}" for name, ok in verdicts.items()),
        "",
        "training command: " + shlex.join(command),
    ]
    return {"results": results, "suite_drop_points": drop, "train_wall_seconds": wall, "train": done,
            "verdicts": verdicts, "command": command, "table": "\n".join(rows)}


if __name__ == "__main__":
    sys.exit(main())
