"""The conditioned-generation checkers (fluxkit.eval.tasks) validated on the data generator's own outputs: they pass
the true outcome of every item and reject wrong ones; then the task runner end to end on tiny random pipelines.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from fluxkit import FluxFillPipeline, FluxPipeline
from fluxkit.cli import main
from fluxkit.data.render import render
from fluxkit.data.scenes import IMAGE_SIZES, make_object, position_of
from fluxkit.eval import cli as eval_cli
from fluxkit.eval.task_run import run_task_eval, score_task, summarize_task
from fluxkit.eval.tasks import (
    TASK_KINDS,
    TASKS,
    TaskItem,
    build_task_items,
    check_task,
    edge_iou,
    ground_truth,
)
from fluxkit.model import Flux

PER_SIZE = 20  # items per training size: 60 per task


@pytest.fixture(scope="module")
def items():
    return {task: [it for size in IMAGE_SIZES for it in build_task_items(task, PER_SIZE, size=size)]
            for task in TASKS}


def _swap_regions(item: TaskItem) -> np.ndarray:
    """The expected picture with region k's object translated into region k+1: every object in a wrong region."""
    boxes, scene = [r.box for r in item.regions], item.expected
    objects = []
    for k, obj in enumerate(scene.objects):
        src, dst = boxes[k], boxes[(k + 1) % len(boxes)]
        x, y = obj.centre[0] + dst[0] - src[0], obj.centre[1] + dst[1] - src[1]
        objects.append(replace(obj, centre=(x, y), position=position_of(x, y, scene.width, scene.height)))
    return render(replace(scene, objects=tuple(objects))).image


def _wrong(task: str, items: list[TaskItem]) -> list[np.ndarray]:
    if task == "fill":
        return [it.condition for it in items]  # the hole left unfilled (mid grey)
    if task == "edit":
        return [it.source for it in items]  # the unedited before image
    if task == "control":  # another item's true render (of the same size)
        return [ground_truth(items[i + 1 if (i + 1) % PER_SIZE else i + 1 - PER_SIZE]) for i in range(len(items))]
    return [_swap_regions(it) for it in items]


# -- the checkers on ground truth and on wrong outputs ----------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_ground_truth_scores_at_least_99_percent(items, task):
    # Measured on 100 items at each training size: 100% for every task; control edge IoU 0.71-0.94 (mean 0.80).
    results = [check_task(ground_truth(it), it) for it in items[task]]
    rate = np.mean([r.passed for r in results])
    assert rate >= 0.99, f"{task} ground truth pass rate {rate:.3f}"
    if task in ("fill", "edit"):
        assert max(r.metrics["outside_mae"] for r in results) == 0.0  # outside the mask nothing changes


@pytest.mark.parametrize("task", TASKS)
def test_wrong_outputs_score_at_most_20_percent(items, task):
    # Measured on 100 items at each training size: 0% for every task (control: IoU of another item's edges
    # 0.00-0.13, mean 0.04, at 128x128).
    results = [check_task(image, it) for image, it in zip(_wrong(task, items[task]), items[task], strict=True)]
    rate = np.mean([r.passed for r in results])
    assert rate <= 0.20, f"{task} wrong-output pass rate {rate:.3f}"


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_ground_truth_through_the_shipped_autoencoder(items, task):
    """The ceiling of any model decoding with the tiny family's autoencoder: true outcomes after an encode/decode
    round trip. Every miss measured is a star the autoencoder rounds into a circle or triangle, not a checker error."""
    from fluxkit.hub import WEIGHTS_DIR
    from fluxkit.loading import load_autoencoder
    from fluxkit.params import TINY_AE

    ae = load_autoencoder(WEIGHTS_DIR / "ae.safetensors", TINY_AE, torch.float32).eval()
    passed = []
    for start in range(0, len(items[task]), PER_SIZE):  # one training size per block
        block = items[task][start:start + PER_SIZE]
        x = torch.from_numpy(np.stack([ground_truth(it) for it in block])).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.inference_mode():
            y = ae.decode(ae.encode(x))  # [B, 3, H, W] in ~[-1, 1]
        decoded = ((y / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        passed += [check_task(image, it).passed for image, it in zip(decoded, block, strict=True)]
    # Measured (60 items: 20 at each training size): fill 93.3%, control 100%, edit 98.3%, regional 96.7%.
    assert np.mean(passed) >= 0.9, f"{task} round-trip pass rate {np.mean(passed):.3f}"


def _towards_grey(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Every pixel outside `mask` moved 20 levels towards mid grey: the same palette colours, MAE exactly 20."""
    out = image.astype(np.int16)
    out[~mask] += np.where(out[~mask] < 128, 20, -20)
    return out.astype(np.uint8)


def test_each_check_catches_its_own_mistake(items):
    fill = items["fill"][0]
    obj = fill.expected.objects[fill.index]
    other = next(c for c in ("red", "blue", "green") if c != obj.colour)
    recoloured = render(replace(fill.expected, objects=tuple(replace(o, colour=other) if o is obj else o
                                                             for o in fill.expected.objects))).image
    assert check_task(recoloured, fill).checks == {"object": False, "preserved": True}
    result = check_task(_towards_grey(ground_truth(fill), fill.mask), fill)
    assert result.checks == {"object": True, "preserved": False} and result.metrics["outside_mae"] == 20.0

    for edit in items["edit"][:3]:  # recolor, remove, move
        after = ground_truth(edit)
        if edit.kind != "remove":  # (a removed object pasted back is the before image: the wrong-output test)
            half = after.copy()  # the after image with the changed object's old pixels pasted back
            old_mask = render(edit.before).masks[edit.index]
            half[old_mask] = edit.source[old_mask]
            assert not check_task(half, edit).checks["edited"], edit.id
        assert check_task(_towards_grey(after, edit.mask), edit).checks == {"edited": True, "preserved": False}

    regional = next(it for it in items["regional"] if it.kind == "left/right")
    scene, (a, b) = regional.expected, regional.expected.objects
    result = check_task(render(replace(scene, objects=(a,))).image, regional)  # the right region left empty
    assert result.checks == {"placed": False, "no_leak": True} and result.metrics["regions_held"] == 0.5
    assert result.metrics["colours_held"] == 0.5
    other = next(s for s in ("circle", "square", "triangle", "star") if s != b.shape)  # right colour, wrong shape
    result = check_task(render(replace(scene, objects=(a, replace(b, shape=other)))).image, regional)
    assert result.metrics == {"regions_held": 0.5, "colours_held": 1.0} and not result.passed
    rng = random.Random(0)
    for cell in ("top left", "left", "bottom left"):  # a copy of the right object in the left region
        try:
            copy = make_object(rng, scene.width, scene.height, b.shape, b.colour, "small", cell, avoid=(a, b))
            break
        except ValueError:
            continue
    leaked = render(replace(scene, objects=(a, b, copy))).image
    assert check_task(leaked, regional).checks == {"placed": True, "no_leak": False}


def test_edge_iou_tolerance_and_control_figures():
    line = np.zeros((32, 32), bool)
    line[:, 10] = True
    shifted = np.roll(line, 1, axis=1)
    assert edge_iou(line, shifted, tolerance=0) == 0.0
    assert edge_iou(line, shifted, tolerance=1) == pytest.approx(2 / 4)  # dilated bands cols 9-11 and 10-12
    assert edge_iou(line, line) == 1.0 and edge_iou(line, np.zeros_like(line)) == 0.0
    control = build_task_items("control", 1)[0]
    blank = np.empty_like(control.condition)
    blank[:] = ground_truth(control)[0, 0]  # the background alone: no edges at all
    assert check_task(blank, control).metrics["edge_iou"] == 0.0


def test_items_are_deterministic_and_describe_their_task():
    for task in TASKS:
        a, b = build_task_items(task, 6, seeds=(0, 1)), build_task_items(task, 6, seeds=(0, 1))
        assert [it.prompt for it in a] == [it.prompt for it in b] and len(a) == 12
        assert [it.kind for it in a[::2]] == [TASK_KINDS[task][k % len(TASK_KINDS[task])] for k in range(6)]
        assert [it.seed for it in a[:2]] == [0, 1] and a[0].prompt == a[1].prompt
    assert build_task_items("fill", 3, suite_seed=1)[0].prompt != build_task_items("fill", 3)[0].prompt
    fill = build_task_items("fill", 1)[0]
    x0, y0, x1, y1 = fill.expected.objects[fill.index].bbox
    assert fill.mask[int(y0):int(y1), int(x0):int(x1)].all() and (fill.condition[fill.mask] == 128).all()
    control = build_task_items("control", 1)[0]
    assert np.array_equal(control.condition[..., 0] > 0, render(control.expected).edges())
    for regional in build_task_items("regional", 3):
        masks = [r.mask(regional.expected.width, regional.expected.height) for r in regional.regions]
        assert sum(m.astype(int) for m in masks).max() == 1  # disjoint
        for r, o in zip(regional.regions, regional.expected.objects, strict=True):
            assert r.box[0] <= o.centre[0] < r.box[2] and r.box[1] <= o.centre[1] < r.box[3]


def test_bad_input_raises_clear_errors():
    item = build_task_items("fill", 1)[0]
    with pytest.raises(ValueError, match="is 64x64 but item fill-000-s0 is 128x128"):
        check_task(np.zeros((64, 64, 3), np.uint8), item)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        check_task(np.zeros((128, 128, 3), np.float32), item)
    with pytest.raises(ValueError, match="TaskItem"):
        check_task(np.zeros((128, 128, 3), np.uint8), "fill-000")
    with pytest.raises(ValueError, match="task must be one of"):
        build_task_items("inpaint", 4)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        build_task_items("fill", 0)
    with pytest.raises(ValueError, match="multiples of 16"):
        build_task_items("edit", 2, size=(100, 100))
    with pytest.raises(ValueError, match="seeds"):
        build_task_items("edit", 2, seeds=())
    with pytest.raises(ValueError, match="does not fit in region"):
        build_task_items("regional", 3, size=(32, 32))
    with pytest.raises(ValueError, match="2 images for 1 items"):
        score_task([item], [Image.new("RGB", (128, 128))] * 2, log=lambda _: None)
    with pytest.raises(ValueError, match="every item must be a 'fill' TaskItem"):
        score_task([item, build_task_items("edit", 1)[0]], [Image.new("RGB", (128, 128))] * 2, log=lambda _: None)


# -- the runner on tiny random pipelines (plumbing only: random weights score ~0) --------------------------------------
def _variant(pipe: FluxPipeline, in_channels: int) -> FluxPipeline:
    """The tiny pipeline with a random transformer `in_channels` wide (Fill 384, Control 128), short prompts."""
    torch.manual_seed(0)
    model = Flux(dataclasses.replace(pipe.transformer.params, in_channels=in_channels)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    spec = dataclasses.replace(pipe.spec, flux=model.params, max_sequence_length=16)
    return FluxPipeline(model, pipe.vae, pipe.text_encoder, spec, pipe.scheduler)


def _spy(pipe: FluxPipeline, calls: list) -> FluxPipeline:
    """Record (hook, prompts, size) of every generation the pipeline runs."""
    generate = pipe._generate

    def recorded(req):
        calls.append((req.conditioning, list(req.prompts), (req.height, req.width)))
        return generate(req)

    pipe._generate = recorded
    return pipe


@pytest.fixture(scope="module")
def tiny(tiny_dev_folder):
    base = FluxPipeline.from_pretrained(tiny_dev_folder, torch_dtype=torch.float32)
    fill = _variant(base, 384)
    fill = FluxFillPipeline(fill.transformer, fill.vae, fill.text_encoder, fill.spec, fill.scheduler)  # a subclass
    return {"base": _variant(base, 64), "fill": fill, "control": _variant(base, 128)}


@pytest.mark.parametrize("task, model, hook", [("fill", "fill", "Fill"), ("control", "control", "Control"),
                                               ("edit", "base", "Kontext"), ("regional", "base", "RegionalPrompts")])
def test_runner_calls_the_right_mode_and_writes_results(tiny, task, model, hook, tmp_path):
    size = 32  # the smallest size whose halves fit a shape (2 items: no thirds layout)
    items = build_task_items(task, 2, size=(size, size))
    calls, base_calls = [], []
    pipe = _spy(tiny[model], calls)
    with_baseline = task in ("control", "regional")
    baseline = _spy(tiny["base"], base_calls) if with_baseline else None
    try:
        summary = run_task_eval(pipe, task, items, steps=1, batch_size=2, baseline=baseline, out=tmp_path,
                                log=lambda _: None)
    finally:
        for p in (pipe, tiny["base"]):
            p.__dict__.pop("_generate", None)  # back to the class method for the next test
    per_item = task == "regional"  # each item has its own region prompts: one call each
    calls = [c for c in calls if c[0] is not None]  # regional: pipe and baseline are one pipeline here
    assert [type(c[0]).__name__ for c in calls] == [hook] * (2 if per_item else 1)
    assert [p for c in calls for p in c[1]] == [it.prompt for it in items] and calls[0][2] == (size, size)
    if task == "regional":
        assert calls[0][0].prompts == [r.prompt for r in items[0].regions]
    if task == "fill":
        assert np.array_equal(np.asarray(calls[0][0].mask_image[1]) > 0, items[1].mask)
    # the baseline: text-to-image on the items' (global) prompts, batched
    base_calls = [c for c in base_calls if c[0] is None]
    assert [c[0] for c in base_calls] == ([None] if with_baseline else [])
    if with_baseline:
        assert base_calls[0][1] == [it.prompt for it in items]
    assert set(summary) == {*{it.kind for it in items}, "overall"} and summary["overall"]["n"] == 2
    assert 0.0 <= summary["overall"]["pass_rate"] <= 1.0 and summary["overall"]["seconds_per_image"] > 0
    assert ("baseline" in summary["overall"]) == with_baseline
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["task"] == task and [row["id"] for row in saved["items"]] == [it.id for it in items]
    grid = Image.open(tmp_path / "grid.png")
    tile = size + 4  # 2 px frame
    assert grid.size == (2 * (4 if with_baseline else 3) * tile + 2 * (tile // 4), tile)


def test_runner_rejects_a_model_of_the_wrong_layout(tiny):
    with pytest.raises(ValueError, match="task 'fill' needs a 'fill'-layout model.*'base'"):
        run_task_eval(tiny["base"], "fill", build_task_items("fill", 1, size=(32, 32)), steps=1)
    with pytest.raises(ValueError, match="control and regional tasks only"):
        run_task_eval(tiny["base"], "edit", build_task_items("edit", 1, size=(32, 32)), baseline=tiny["base"])
    with pytest.raises(ValueError, match="every item must be a 'edit'"):
        run_task_eval(tiny["base"], "edit", build_task_items("regional", 1, size=(32, 32)))


def test_summary_groups_by_kind_with_baseline():
    items = build_task_items("control", 4, size=(64, 64))
    truth = [check_task(ground_truth(it), it) for it in items]
    blank = [check_task(np.zeros((64, 64, 3), np.uint8), it) for it in items]
    summary = summarize_task(items, truth, blank)
    assert list(summary) == [*TASK_KINDS["control"], "overall"]
    assert summary["overall"]["pass_rate"] == 1.0 and summary["overall"]["baseline"]["metrics"]["edge_iou"] == 0.0


def test_eval_cli_scores_a_task_and_rejects_misuse(tmp_path, capsys):
    assert eval_cli.TASKS == TASKS
    code = main(["eval", "--task", "edit", "--ground-truth", "--items", "3", "--seeds", "0", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "recolor" in out and "overall" in out and "100.0%" in out
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["overall"]["n"] == 3
    assert main(["eval", "--items", "3", "--ground-truth"]) == 2
    assert "--items and --baseline-model need --task" in capsys.readouterr().err
    assert main(["eval", "--task", "fill", "--baseline-model", "x", "--ground-truth"]) == 2
    assert "control or regional only" in capsys.readouterr().err
