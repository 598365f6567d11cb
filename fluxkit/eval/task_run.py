"""Run a pipeline over a conditioned-generation task (fluxkit.eval.tasks): generate, score, summarise, and write
results.json plus a grid of (before | condition | output [| baseline]) strips.

Each task's conditioning goes in as a hook on the one pipeline recipe, `FluxPipeline.__call__(pipe, ...,
conditioning=hook)`, so any fluxkit pipeline object works (a plain `FluxPipeline` or a diffusers-named subclass):

- fill: `Fill(masked image, mask, strength=1.0)` on a Fill model (img_in 384);
- control: `Control(edge map)` on a Canny model (img_in 128);
- edit: `Kontext(before image)` with the instruction as the prompt, on a text-to-image-layout model;
- regional: `RegionalPrompts(region prompts, region masks)` with the global prompt, one item per call (each item
  has its own regions).

The control and regional tasks take a baseline: another pipeline (a text-to-image model, e.g. the base the control
model was tuned from, or the same model) run on the same prompts, seeds, steps and guidance without the condition —
the control image, or the region prompts and masks (the global prompt alone): how much the condition steers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fluxkit.atomic import atomic_write, atomic_write_text
from fluxkit.eval.tasks import TASK_KINDS, TASKS, TaskItem, TaskResult, check_task, ground_truth

LAYOUTS = {"fill": "fill", "control": "control", "edit": "base", "regional": "base"}  # model_layout per task
BASELINE_TASKS = ("control", "regional")  # tasks whose condition can be dropped for an unconditioned comparison
BORDER = 2


def _check_items(task: str, items: Sequence[TaskItem]) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not items:
        raise ValueError("items is empty")
    wrong = [getattr(it, "id", repr(it)) for it in items if not isinstance(it, TaskItem) or it.task != task]
    if wrong:
        raise ValueError(f"every item must be a {task!r} TaskItem; these are not: {wrong[:5]}")
    sizes = {(it.expected.width, it.expected.height) for it in items}
    if len(sizes) > 1:
        raise ValueError(f"items must share one size to be batched, got {sorted(sizes)}")


def _hook(task: str, batch: Sequence[TaskItem]):
    """The conditioning hook for a batch of items (regional: a batch of one)."""
    from fluxkit.conditioning import Control, Fill, Kontext
    from fluxkit.regional import RegionalPrompts

    if task == "fill":
        masks = [Image.fromarray(it.mask.astype(np.uint8) * 255) for it in batch]
        return Fill([Image.fromarray(it.condition) for it in batch], masks, strength=1.0)
    if task == "control":
        return Control([Image.fromarray(it.condition) for it in batch])
    if task == "edit":
        return Kontext([Image.fromarray(it.condition) for it in batch])
    (item,) = batch
    scene = item.expected
    masks = [torch.from_numpy(r.mask(scene.width, scene.height)).float() for r in item.regions]  # [H, W] each
    return RegionalPrompts([r.prompt for r in item.regions], masks)


def generate_task(pipe, items: Sequence[TaskItem], *, steps: int | None = None, guidance: float | None = None,
                  batch_size: int = 8, conditioned: bool = True) -> list[Image.Image]:
    """One image per item, in order; `conditioned=False` is plain text-to-image on the items' prompts. One CPU
    generator per item (seeded with item.seed), so an image does not depend on how the items are batched."""
    from fluxkit.pipeline import FluxPipeline

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not items:
        raise ValueError("items is empty")
    task = items[0].task
    per_call = 1 if task == "regional" and conditioned else batch_size
    images: list[Image.Image] = []
    for start in range(0, len(items), per_call):
        batch = list(items[start:start + per_call])
        scene = batch[0].expected
        # The base __call__: a subclass's own __call__ (FluxFillPipeline, ...) would build a hook of its own.
        out = FluxPipeline.__call__(
            pipe, [it.prompt for it in batch], height=scene.height, width=scene.width,
            num_inference_steps=steps, guidance_scale=guidance,
            generator=[torch.Generator("cpu").manual_seed(it.seed) for it in batch],
            conditioning=_hook(task, batch) if conditioned else None,
        )
        images += out.images
    return images


def summarize_task(items: Sequence[TaskItem], results: Sequence[TaskResult],
                   baseline: Sequence[TaskResult] | None = None) -> dict:
    """Per item kind and overall: n, pass rate, each check's pass rate, each metric's mean (and the baseline's)."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.kind, []).append(i)
    groups = {k: groups[k] for k in TASK_KINDS[items[0].task] if k in groups}
    groups["overall"] = list(range(len(items)))

    def rates(rs: list[TaskResult]) -> dict:
        return {"pass_rate": float(np.mean([r.passed for r in rs])),
                "checks": {c: float(np.mean([r.checks[c] for r in rs])) for c in rs[0].checks},
                "metrics": {m: float(np.mean([r.metrics[m] for r in rs])) for m in rs[0].metrics}}

    summary = {}
    for name, idx in groups.items():
        summary[name] = {"n": len(idx), **rates([results[i] for i in idx])}
        if baseline is not None:
            summary[name]["baseline"] = rates([baseline[i] for i in idx])
    return summary


def format_task_table(task: str, summary: dict) -> str:
    """One row per item kind plus overall: n, pass rate, check rates, metric means (and baseline pass/metrics)."""
    overall = summary["overall"]
    checks, metrics = list(overall["checks"]), list(overall["metrics"])
    head = f"{task:<12} {'n':>4} {'pass':>6} " + " ".join(f"{c:>12}" for c in checks + metrics)
    if "baseline" in overall:
        head += f"  {'base pass':>9} " + " ".join(f"{'base ' + m:>14}" for m in metrics)
    lines = [head]
    for name, row in summary.items():
        cells = [f"{row['checks'][c]:12.1%}" for c in checks] + [f"{row['metrics'][m]:12.3f}" for m in metrics]
        line = f"{name:<12} {row['n']:>4} {row['pass_rate']:6.1%} " + " ".join(cells)
        if "baseline" in row:
            base = row["baseline"]
            line += f"  {base['pass_rate']:9.1%} " + " ".join(f"{base['metrics'][m]:14.3f}" for m in metrics)
        lines.append(line)
    return "\n".join(lines)


def _panels(item: TaskItem) -> list[np.ndarray]:
    """The strip's fixed panels: fill source | masked; control target | edges; edit before | target after;
    regional target | region map (each region tinted with its object's colour)."""
    if item.task == "fill":
        return [item.source, item.condition]
    if item.task == "control":
        return [ground_truth(item), item.condition]
    if item.task == "edit":
        return [item.source, ground_truth(item)]
    from fluxkit.data.regions import region_map

    return [ground_truth(item), region_map(item.regions, item.expected.width, item.expected.height)]


def save_task_grid(items: Sequence[TaskItem], images: Sequence[Image.Image], results: Sequence[TaskResult],
                   path: Path, baseline: Sequence[Image.Image] | None = None, strips_per_row: int = 4) -> None:
    """Strips of (panels | output | baseline) per item, in item order; outputs framed green (pass) or red (fail)."""
    w, h = items[0].expected.width + 2 * BORDER, items[0].expected.height + 2 * BORDER
    tiles = 3 + (baseline is not None)
    per_row = min(strips_per_row, len(items))
    grid = Image.new("RGB", (per_row * (tiles * w + w // 4), -(-len(items) // per_row) * h), (40, 40, 40))
    for k, (item, image, result) in enumerate(zip(items, images, results, strict=True)):
        x, y = (k % per_row) * (tiles * w + w // 4), (k // per_row) * h
        strip = [(Image.fromarray(p), None) for p in _panels(item)] + [(image, result.passed)]
        if baseline is not None:
            strip.append((baseline[k], None))
        for j, (tile, passed) in enumerate(strip):
            if passed is not None:
                grid.paste((40, 180, 60) if passed else (210, 40, 40), (x + j * w, y, x + (j + 1) * w, y + h))
            grid.paste(tile.convert("RGB"), (x + j * w + BORDER, y + BORDER))
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def score_task(items: Sequence[TaskItem], images: Sequence[Image.Image], *,
               baseline_images: Sequence[Image.Image] | None = None, out: str | Path | None = None,
               seconds_per_image: float | None = None, log: Callable[[str], None] = print) -> dict:
    """Check every image against its item, log the table, and (with `out`) write results.json and grid.png."""
    if not items or not isinstance(items[0], TaskItem):
        raise ValueError(f"items must be a non-empty list of TaskItems, got {type(items).__name__} {items!r:.60}")
    task = items[0].task
    _check_items(task, items)
    for name, imgs in (("images", images), ("baseline_images", baseline_images)):
        if imgs is not None and len(imgs) != len(items):
            raise ValueError(f"{name} has {len(imgs)} images for {len(items)} items")
    results = [check_task(im, it) for im, it in zip(images, items, strict=True)]
    base = None
    if baseline_images is not None:
        base = [check_task(im, it) for im, it in zip(baseline_images, items, strict=True)]
    summary = summarize_task(items, results, base)
    if seconds_per_image is not None:
        summary["overall"]["seconds_per_image"] = seconds_per_image
    log(format_task_table(task, summary))
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for k, (it, r) in enumerate(zip(items, results, strict=True)):
            row = {"id": it.id, "kind": it.kind, "prompt": it.prompt, "seed": it.seed,
                   "size": [it.expected.width, it.expected.height], "passed": r.passed, "checks": r.checks,
                   "metrics": r.metrics}
            if it.regions:
                row["regions"] = {reg.name: reg.prompt for reg in it.regions}
            if base is not None:
                row["baseline"] = {"passed": base[k].passed, "checks": base[k].checks, "metrics": base[k].metrics}
            rows.append(row)
        payload = json.dumps({"task": task, "summary": summary, "items": rows}, indent=1)
        atomic_write_text(folder / "results.json", payload)
        save_task_grid(items, images, results, folder / "grid.png", baseline_images)
    return summary


def run_task_eval(pipe, task: str, items: Sequence[TaskItem], *, steps: int | None = None,
                  guidance: float | None = None, batch_size: int = 8, baseline=None, out: str | Path | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """Generate every item with `pipe` under its task's conditioning, score and report (see the module docstring).

    baseline: control and regional only, a text-to-image pipeline run on the same prompts and seeds without the
    control image / the region prompts (the global prompt alone); its pass rate and metrics appear beside the
    conditioned ones. Returns the summary dict
    ({item kind or "overall": {n, pass_rate, checks, metrics[, baseline]}}).
    """
    from fluxkit.conditioning import model_layout

    _check_items(task, items)
    need, have = LAYOUTS[task], model_layout(pipe)
    if have != need:
        raise ValueError(f"task {task!r} needs a {need!r}-layout model, but this pipeline's transformer is {have!r} "
                         "(fill: a Fill model, img_in 384; control: a Canny model, img_in 128; edit, regional: 64)")
    if baseline is not None and task not in BASELINE_TASKS:
        raise ValueError(f"a baseline applies to the control and regional tasks only, got task {task!r}")
    if baseline is not None and model_layout(baseline) != "base":
        raise ValueError(f"the baseline must be a text-to-image model, got a {model_layout(baseline)!r} layout")
    t0 = time.perf_counter()
    images = generate_task(pipe, items, steps=steps, guidance=guidance, batch_size=batch_size)
    seconds = (time.perf_counter() - t0) / len(items)
    log(f"generated {len(images)} {task} images ({seconds:.3f} s/image)")
    base_images = None
    if baseline is not None:
        base_images = generate_task(baseline, items, steps=steps, guidance=guidance, batch_size=batch_size,
                                    conditioned=False)
    return score_task(items, images, baseline_images=base_images, out=out, seconds_per_image=seconds, log=log)


def score_task_ground_truth(items: Sequence[TaskItem], out: str | Path | None = None,
                            log: Callable[[str], None] = print) -> dict:
    """The task scored on the generator's own renders of each expected outcome (the checkers' ceiling)."""
    if not items:
        raise ValueError("items is empty")
    return score_task(items, [Image.fromarray(ground_truth(it)) for it in items], out=out, log=log)
