"""The shipped FLUX.1-tools variants (fluxkit-tiny-fill, -canny and -kontext) and fluxkit-tiny-regional: tiny-dev plus
a LoRA. Each loads by name offline in its diffusers-named pipeline, and the adapter does its job, measured against the
same pipeline with the adapter's weight set to 0 (tiny-dev ignoring the condition, or for Kontext and regional prompts
given the condition untrained): with it, Fill keeps the pixels outside the mask better, Canny's output edges overlap
the control edges more, Kontext keeps the unedited part of the picture better, and each region holds a blob of its
prompt's colour more often."""

from __future__ import annotations

import numpy as np
import pytest

import fluxkit
from fluxkit.eval.task_run import generate_task
from fluxkit.eval.tasks import build_task_items, check_task

VARIANTS = {  # name -> (pipeline, eval task, img_in width, metric, better)
    "fluxkit-tiny-fill": ("FluxFillPipeline", "fill", 64 + 64 + 256, "outside_mae", "lower"),
    "fluxkit-tiny-canny": ("FluxControlPipeline", "control", 64 + 64, "edge_iou", "higher"),
    "fluxkit-tiny-kontext": ("FluxKontextPipeline", "edit", 64, "outside_mae", "lower"),
    "fluxkit-tiny-regional": ("FluxPipeline", "regional", 64, "colours_held", "higher"),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    name = request.param
    pipeline, *_ = VARIANTS[name]
    return name, getattr(fluxkit, pipeline).from_pretrained(name)


def test_variant_loads_as_tiny_dev_plus_its_adapter(variant):
    name, pipe = variant
    _, _, width, _, _ = VARIANTS[name]
    assert pipe.get_active_adapters() == [name.removeprefix("fluxkit-")]
    assert pipe.transformer.img_in.in_features == pipe.transformer.params.in_channels == width
    assert pipe.transformer.params.guidance_embed  # a dev base


def _mean_metric(pipe, task: str, metric: str, items) -> float:
    images = generate_task(pipe, items)
    return float(np.mean([check_task(np.asarray(img), it).metrics[metric] for img, it in zip(images, items)]))


def test_the_adapter_does_its_job(variant):
    name, pipe = variant
    _, task, _, metric, better = VARIANTS[name]
    items = build_task_items(task, n=6, seeds=(0,))
    with_adapter = _mean_metric(pipe, task, metric, items)
    pipe.set_adapters([name.removeprefix("fluxkit-")], adapter_weights=[0.0])
    try:
        without = _mean_metric(pipe, task, metric, items)
    finally:
        pipe.set_adapters([name.removeprefix("fluxkit-")], adapter_weights=[1.0])
    assert (with_adapter < without) if better == "lower" else (with_adapter > without), (with_adapter, without)


def test_variants_fit_the_weight_budget_as_small_adapters():
    from fluxkit.hub import WEIGHTS_DIR

    for name in VARIANTS:
        folder = WEIGHTS_DIR / name.removeprefix("fluxkit-")
        assert sorted(p.name for p in folder.iterdir()) == ["fluxkit.json", "lora.safetensors"]
        assert (folder / "lora.safetensors").stat().st_size < 2 * 2**20


def test_eval_adapter_weight_scales_the_variants_adapter(tmp_path, capsys):
    from fluxkit.cli import main

    common = ["eval", "--task", "fill", "--items", "2", "--seeds", "0", "--steps", "2"]
    assert main([*common, "--model", "fluxkit-tiny-fill", "--adapter-weight", "0", "--out", str(tmp_path)]) == 0
    assert "overall" in capsys.readouterr().out
    assert main(["eval", "--quick", "--model", "fluxkit-tiny-dev", "--adapter-weight", "0"]) == 2
    assert "has no adapter" in capsys.readouterr().err
