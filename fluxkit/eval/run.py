"""Run the evaluation suite: generate, check, print a table, write results.json and an image grid.

The generator is a callable supplied by the caller, `generate(prompts, seeds) -> list[PIL.Image]` (one image per
prompt, of the suite's size), so this module knows nothing about models. `score_ground_truth` feeds the scenes' own
renders through the same path: the checker's ceiling, and a self-test.

The command line is `fluxkit eval` (fluxkit/eval/cli.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fluxkit.atomic import atomic_write, atomic_write_text
from fluxkit.data.render import render
from fluxkit.eval.checker import CheckResult, check
from fluxkit.eval.compare import wilson_interval
from fluxkit.eval.suite import EvalItem

Generate = Callable[[list[str], list[int]], list[Image.Image]]


def summarize(items: Sequence[EvalItem], results: Sequence[CheckResult]) -> dict:
    """Per category and overall: item pass rate with its 95% Wilson interval, pass rate of each check, mean OCR
    character accuracy."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.category, []).append(i)
    groups["overall"] = list(range(len(items)))
    summary = {}
    for name, idx in groups.items():
        checks: dict[str, list[bool]] = {}
        for i in idx:
            for check_name, ok in results[i].checks.items():
                checks.setdefault(check_name, []).append(ok)
        accuracies = [results[i].char_accuracy for i in idx if results[i].char_accuracy is not None]
        passed = sum(results[i].passed for i in idx)
        summary[name] = {
            "n": len(idx),
            "pass_rate": passed / len(idx),
            "ci95": list(wilson_interval(passed, len(idx))),
            "checks": {c: float(np.mean(v)) for c, v in sorted(checks.items())},
            "char_accuracy": float(np.mean(accuracies)) if accuracies else None,
        }
    summary["overall"]["fails_only_on"] = sole_failures(results)
    return summary


def sole_failures(results: Sequence[CheckResult]) -> dict[str, int]:
    """{check: items failing that check and no other}, most first: what fixing one ability alone would gain."""
    counts: dict[str, int] = {}
    for r in results:
        failed = [name for name, ok in r.checks.items() if not ok]
        if len(failed) == 1:
            counts[failed[0]] = counts.get(failed[0], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def format_table(summary: dict) -> str:
    lines = [f"{'category':<12} {'n':>4} {'pass':>6} {'95% interval':>13} {'chars':>6}  checks"]
    for name, row in summary.items():
        chars = "" if row["char_accuracy"] is None else f"{row['char_accuracy']:6.1%}"
        checks = " ".join(f"{c}={v:.0%}" for c, v in row["checks"].items())
        interval = "{:.1%}-{:.1%}".format(*row["ci95"])
        lines.append(f"{name:<12} {row['n']:>4} {row['pass_rate']:6.1%} {interval:>13} {chars:>6}  {checks}")
    sole = summary.get("overall", {}).get("fails_only_on")
    if sole:
        lines.append("failing one check only: " + ", ".join(f"{c} {n}" for c, n in sole.items()))
    return "\n".join(lines)


def save_grid(images: Sequence[Image.Image], results: Sequence[CheckResult], path: Path, columns: int = 16) -> None:
    """Tiles in suite order, each framed green (passed) or red (failed)."""
    if not images:
        raise ValueError("save_grid needs at least one image")
    border = 2
    w, h = max(im.width for im in images) + 2 * border, max(im.height for im in images) + 2 * border
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h), (40, 40, 40))
    for k, (image, result) in enumerate(zip(images, results, strict=True)):
        x, y = (k % columns) * w, (k // columns) * h
        grid.paste((40, 180, 60) if result.passed else (210, 40, 40), (x, y, x + w, y + h))
        grid.paste(image.convert("RGB"), (x + border, y + border))
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def _evaluate(
    images_for: Callable[[list[EvalItem]], list[Image.Image]],
    suite: Sequence[EvalItem],
    out_dir: str | Path | None,
    batch_size: int,
    log: Callable[[str], None],
) -> dict:
    if not suite:
        raise ValueError("suite is empty")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    images, results, seconds = [], [], 0.0
    for start in range(0, len(suite), batch_size):
        batch = list(suite[start : start + batch_size])
        t0 = time.perf_counter()
        produced = images_for(batch)
        seconds += time.perf_counter() - t0
        if len(produced) != len(batch):
            raise ValueError(f"generate returned {len(produced)} images for {len(batch)} prompts")
        for item, image in zip(batch, produced, strict=True):
            if not isinstance(image, Image.Image):
                raise ValueError(f"generate must return PIL images, got {type(image).__name__} for {item.id}")
            images.append(image)
            results.append(check(np.asarray(image.convert("RGB")), item.scene))
        log(f"evaluated {len(results)}/{len(suite)}")
    summary = summarize(suite, results)
    summary["overall"]["seconds_per_image"] = seconds / len(suite)
    log(format_table(summary))
    log(f"generation: {seconds / len(suite):.3f} s/image")
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        per_item = [
            {
                "id": it.id,
                "category": it.category,
                "prompt": it.prompt,
                "seed": it.seed,
                "size": [it.scene.width, it.scene.height],
                "passed": r.passed,
                "checks": r.checks,
                "text_read": r.text_read,
                "char_accuracy": r.char_accuracy,
                "notes": r.notes,
            }
            for it, r in zip(suite, results, strict=True)
        ]
        payload = json.dumps({"summary": summary, "items": per_item}, indent=1)
        atomic_write_text(out / "results.json", payload)
        save_grid(images, results, out / "grid.png")
    return summary


def run_eval(
    generate: Generate,
    suite: Sequence[EvalItem],
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    log: Callable[[str], None] = print,
) -> dict:
    """Generate every suite item's image (in batches), check it, report. Returns the summary dict
    ({category or "overall": {n, pass_rate, checks, char_accuracy}}); writes results.json and grid.png to out_dir."""
    return _evaluate(
        lambda batch: generate([it.prompt for it in batch], [it.seed for it in batch]), suite, out_dir, batch_size, log
    )


def score_ground_truth(
    suite: Sequence[EvalItem],
    out_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    transform: Callable[[list[Image.Image]], list[Image.Image]] | None = None,
) -> dict:
    """The suite scored on the generator's own renders of each spec (the checker's ceiling).

    `transform` maps each batch of renders before checking: an autoencoder round trip gives the ceiling that the
    autoencoder sets on any model decoding through it.
    """

    def images_for(batch: list[EvalItem]) -> list[Image.Image]:
        images = [Image.fromarray(render(it.scene).image) for it in batch]
        return transform(images) if transform is not None else images

    return _evaluate(images_for, suite, out_dir, 64 if transform is None else 16, log)
