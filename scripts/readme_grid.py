"""The README's picture: the shipped tiny models' real output for a few prompts, one row per model, captioned.

    .venv/bin/python scripts/readme_grid.py [--out docs/images/tiny-grid.png] [--seed 0]

Every image is generated with the built-in weights (no cherry-picking: one seed for all prompts, given on the
command line) and the picture is written through a temp file + rename.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from fluxkit import FluxPipeline
from fluxkit.atomic import atomic_write

PROMPTS = (
    "a red circle above a blue square",
    "two yellow stars on a black background",
    "a small green triangle in the top left corner",
    "a large blue circle",
    "a white square to the right of a pink triangle",
    "three orange circles on a gray background",
    "a sign that says 'OPEN'",
    "a large purple star",  # a held-out colour x shape pair: never seen in training
)
ROWS = (("fluxkit-tiny-schnell", 4, None), ("fluxkit-tiny-dev", 20, 5.0))  # each model's default steps and guidance
CELL, LABEL, GAP = 128, 44, 4


def generate_row(model: str, steps: int, guidance: float | None, seed: int) -> list[Image.Image]:
    pipe = FluxPipeline.from_pretrained(model)
    kwargs = {} if guidance is None else {"guidance_scale": guidance}
    generators = [torch.Generator("cpu").manual_seed(seed) for _ in PROMPTS]
    return pipe(list(PROMPTS), num_inference_steps=steps, generator=generators, height=CELL, width=CELL,
                **kwargs).images


def compose(rows: list[tuple[str, list[Image.Image]]]) -> Image.Image:
    side = 150  # row-title column
    width = side + len(PROMPTS) * (CELL + GAP)
    height = LABEL + len(rows) * (CELL + GAP)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, prompt in enumerate(PROMPTS):
        lines = textwrap.wrap(prompt, 21)[:3]
        draw.multiline_text((side + j * (CELL + GAP) + 2, 2), "\n".join(lines), fill="black", spacing=1)
    for i, (title, images) in enumerate(rows):
        y = LABEL + i * (CELL + GAP)
        draw.multiline_text((4, y + CELL // 2 - 12), title.replace(" ", "\n", 1), fill="black")
        for j, image in enumerate(images):
            canvas.paste(image.convert("RGB"), (side + j * (CELL + GAP), y))
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/tiny-grid.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    for model, steps, guidance in ROWS:
        name = model.removeprefix("fluxkit-")
        title = f"{name} {steps} steps" + ("" if guidance is None else f", g {guidance}")
        rows.append((title, generate_row(model, steps, guidance, args.seed)))
    grid = compose(rows)
    atomic_write(args.out, lambda tmp: grid.save(tmp, format="PNG"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
