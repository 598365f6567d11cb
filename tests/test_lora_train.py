"""`fluxkit train-lora` on a tiny random diffusers-layout Flux: a short run writes a diffusers-format LoRA that loads in
fluxkit (and diffusers) and changes the image; overfitting lowers the loss; resume matches an uninterrupted run;
quantized bases train without changing; bad input is a ValueError naming the option."""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from safetensors.torch import load_file

from fluxkit import FluxPipeline
from fluxkit.cli import main as cli_main
from fluxkit.lora import WEIGHT_NAME, LoraLinear, detach, set_active
from fluxkit.lora_train import (
    ADAPTER,
    DEFAULT_TARGETS,
    add_parser,
    cache_data,
    flow_loss,
    lr_factor,
    read_instance_data,
    stream_rows,
    train_lora,
)
from fluxkit.quant import QuantLinear
from fluxkit.train.loop import step_generator

CAPTIONS = ("a red circle on white", "a blue square on black", "a yellow star on green")
COLOURS = ((220, 30, 30), (30, 70, 220), (250, 220, 20))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These networks are tiny: one thread beats two, which spin-wait against each other on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three 40x32 images (cropped to 32x32 when training) with .txt captions."""
    folder = tmp_path_factory.mktemp("instance")
    for i, (caption, colour) in enumerate(zip(CAPTIONS, COLOURS)):
        pixels = np.full((32, 40, 3), 255 * (i % 2), np.uint8)
        pixels[8:24, 12 + 4 * i : 28 + 4 * i] = colour
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return folder


def parse(model, data, out, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser)
    return parser.parse_args(["--model", str(model), "--instance_data_dir", str(data), "--output_dir", str(out),
                              "--resolution", "32", "--max_sequence_length", "16", "--train_batch_size", "2",
                              "--learning_rate", "1e-2", "--device", "cpu", "--quiet", *extra])


def image(pipe, prompt: str = CAPTIONS[0]) -> np.ndarray:
    return pipe(prompt, height=32, width=32, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=16,
                output_type="np", generator=torch.Generator().manual_seed(3)).images


def test_short_run_writes_a_diffusers_lora_that_changes_the_image(tiny_dev_folder, data, tmp_path):
    out = tmp_path / "run"
    args = parse(tiny_dev_folder, data, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                 "--gradient_checkpointing", "--validation_prompt", "a red circle", "--validation_steps", "2",
                 "--num_validation_images", "1", "--validation_inference_steps", "2")
    result = train_lora(args)
    assert result.lora_path == out / WEIGHT_NAME and result.step == 4 and len(result.history) == 4
    sd = load_file(result.lora_path)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in sd
    assert "transformer.single_transformer_blocks.0.proj_out.lora_B.weight" in sd
    assert sd["transformer.transformer_blocks.0.ff.net.2.lora_B.weight"].abs().max() > 0  # B moved off its zero init
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    assert (out / "checkpoints" / "step-00000002" / WEIGHT_NAME).is_file()
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-00000002-0.png", "step-00000004-0.png"]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert json.loads((out / "done.json").read_text())["modules"] == 2 * 4 + 2  # 1 double + 1 single block

    pipe = FluxPipeline.from_pretrained(tiny_dev_folder, torch_dtype=torch.float32)
    plain = image(pipe)
    report = pipe.load_lora_weights(out)
    assert report.modules["transformer"] == 10
    ours = image(pipe)
    assert np.abs(ours - plain).max() > 1 / 255, "the trained LoRA should change the image"

    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft")
    from diffusers import FluxPipeline as DiffusersFlux

    ref = DiffusersFlux.from_pretrained(tiny_dev_folder, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(out, weight_name=WEIGHT_NAME)
    assert np.abs(image(ref) - ours).max() <= 2 / 255


def test_overfitting_two_images_lowers_the_loss(tiny_dev_folder, data, tmp_path):
    result = train_lora(parse(tiny_dev_folder, data, tmp_path / "run", "--max_train_steps", "30", "--rank", "8",
                              "--checkpointing_steps", "100", "--lr_scheduler", "cosine", "--lr_warmup_steps", "3"))
    model = result.pipe.transformer
    cached = cache_data(result.pipe, read_instance_data(data, None), 32, 16)  # what the run trained on

    def fixed_loss(active: bool) -> float:
        """The mean loss over 8 fixed (t, noise) draws on every image, with or without the trained adapter."""
        set_active(model, {ADAPTER: 1.0} if active else {})
        rows = torch.arange(len(CAPTIONS))
        with torch.no_grad():
            return float(np.mean([flow_loss(model, cached, rows, step_generator(9, "eval", i, 0), 3.5,
                                            torch.device("cpu")).item() for i in range(8)]))

    base, trained = fixed_loss(False), fixed_loss(True)
    assert trained < 0.7 * base, (base, trained)  # measured: 12.4 -> 4.7
    assert np.mean(result.history[-5:]) < np.mean(result.history[:5])


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_dev_folder, data, tmp_path):
    common = ("--gradient_accumulation_steps", "2", "--checkpointing_steps", "3", "--lr_scheduler",
              "constant_with_warmup", "--lr_warmup_steps", "2")
    whole = train_lora(parse(tiny_dev_folder, data, tmp_path / "whole", "--max_train_steps", "6", *common))
    train_lora(parse(tiny_dev_folder, data, tmp_path / "split", "--max_train_steps", "3", *common))
    resumed = train_lora(parse(tiny_dev_folder, data, tmp_path / "split", "--max_train_steps", "6",
                               "--resume_from_checkpoint", "latest", *common))
    assert resumed.history == whole.history and len(whole.history) == 6
    a, b = load_file(whole.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ValueError, match="rank"):  # the recipe may not change between sessions
        train_lora(parse(tiny_dev_folder, data, tmp_path / "split", "--max_train_steps", "8", "--rank", "2",
                         "--resume_from_checkpoint", "latest", *common))
    with pytest.raises(ValueError, match="--max_train_steps 4 is below"):
        train_lora(parse(tiny_dev_folder, data, tmp_path / "split", "--max_train_steps", "4",
                         "--resume_from_checkpoint", "latest", *common))


@pytest.mark.parametrize("kind", ["q8_0", "int8"])
def test_quantized_base_trains_and_is_never_modified(tiny_dev_folder, data, tmp_path, kind):
    result = train_lora(parse(tiny_dev_folder, data, tmp_path / "run", "--max_train_steps", "3", "--quantize", kind,
                              "--mixed_precision", "bf16", "--target_modules", "img_attn.qkv,linear1,linear2"))
    model = result.pipe.transformer
    wrapped = model.double_blocks[0].img_attn.qkv
    assert isinstance(wrapped, LoraLinear) and isinstance(wrapped.base, QuantLinear)
    assert wrapped.adapters[ADAPTER].up.abs().max() > 0  # the adapter trained
    detach(model, ADAPTER)
    fresh = FluxPipeline.from_pretrained(tiny_dev_folder, torch_dtype=torch.bfloat16, quantize=kind).transformer
    after, before = model.state_dict(), fresh.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), "training changed the quantized base"
    assert len(load_file(result.lora_path)) == 2 * (3 + 4 + 1)  # lora_A/B of q, k, v; q, k, v, mlp; proj_out


def test_prior_preservation_generates_class_images_and_adds_their_loss(tiny_dev_folder, data, tmp_path):
    steps = ("--max_train_steps", "3", "--checkpointing_steps", "100")

    def run(name: str, prompt: str, weight: str):
        prior = ("--with_prior_preservation", "--class_data_dir", str(tmp_path / prompt), "--class_prompt", prompt,
                 "--num_class_images", "3", "--sample_batch_size", "2", "--prior_loss_weight", weight)
        return train_lora(parse(tiny_dev_folder, data, tmp_path / name, *steps, *prior))

    green0, blue0 = run("g0", "a green square", "0"), run("b0", "a blue star", "0")
    # The class images are the base model's samples of the class prompt, seeds seed + i.
    pipe = FluxPipeline.from_pretrained(tiny_dev_folder, torch_dtype=torch.float32)
    classes = tmp_path / "a green square"
    names = sorted(p.name for p in classes.iterdir())
    assert names == ["class-00000.png", "class-00001.png", "class-00002.png"]
    expected = pipe(["a green square"] * 2, height=32, width=32, max_sequence_length=16, output_type="np",
                    generator=[torch.Generator().manual_seed(k) for k in (1, 2)]).images
    for k in (1, 2):
        saved = np.asarray(Image.open(classes / names[k]), dtype=np.float32) / 255
        assert np.abs(saved - expected[k - 1]).max() <= 1 / 255
    # The class loss is weighted by --prior_loss_weight: at 0, other class images change nothing; at 1 they do.
    for key, value in load_file(green0.lora_path).items():
        assert torch.equal(value, load_file(blue0.lora_path)[key]), key
    before = {n: (classes / n).stat().st_mtime_ns for n in names}
    green1, blue1 = run("g1", "a green square", "1"), run("b1", "a blue star", "1")
    assert any(not torch.equal(v, load_file(blue1.lora_path)[k]) for k, v in load_file(green1.lora_path).items())
    assert all(w > p for w, p in zip(green1.history, green0.history))  # the logged loss includes the class term
    assert {n: (classes / n).stat().st_mtime_ns for n in names} == before  # a full folder is not generated again
    assert json.loads((tmp_path / "g1" / "done.json").read_text())["class_images"] == 3


@pytest.mark.parametrize(("extra", "match"), [
    (("--with_prior_preservation",), "--class_data_dir"),
    (("--class_prompt", "a shape"), "--with_prior_preservation"),
    (("--with_prior_preservation", "--class_data_dir", "{tmp}/c", "--num_class_images", "2"), "--class_prompt"),
    (("--with_prior_preservation", "--class_data_dir", "{tmp}/c", "--prior_loss_weight", "-1"), "--prior_loss_weight"),
])
def test_bad_prior_preservation_options_are_named(tiny_dev_folder, data, tmp_path, extra, match):
    extra = [e.format(tmp=tmp_path) for e in extra]
    with pytest.raises(ValueError, match=match):
        train_lora(parse(tiny_dev_folder, data, tmp_path / "run", "--max_train_steps", "1", *extra))


@pytest.mark.parametrize(("extra", "match"), [
    (("--resolution", "40"), "--resolution"),
    (("--rank", "0"), "--rank"),
    (("--lr_scheduler", "constant", "--lr_warmup_steps", "5"), "constant_with_warmup"),
    (("--validation_epochs", "2", "--validation_steps", "2"), "not both"),
    (("--quantize", "int3"), "--quantize"),
    (("--device", "gpu0"), "--device"),
    (("--target_modules", "attn.to_q"), "attn.to_q"),
])
def test_bad_options_are_named(tiny_dev_folder, data, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        train_lora(parse(tiny_dev_folder, data, tmp_path / "run", "--max_train_steps", "1", *extra))


def test_bad_data_and_folders(tiny_dev_folder, tiny_schnell_folder, data, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    Image.new("RGB", (32, 32)).save(bare / "x.png")
    with pytest.raises(ValueError, match="x.png.*--instance_prompt|--instance_prompt.*x.png"):
        train_lora(parse(tiny_dev_folder, bare, tmp_path / "a"))
    with pytest.raises(ValueError, match="not a folder"):
        train_lora(parse(tiny_dev_folder, tmp_path / "missing", tmp_path / "a"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image"):
        train_lora(parse(tiny_dev_folder, tmp_path / "empty", tmp_path / "a"))
    with pytest.raises(ValueError, match="--guidance_scale"):
        train_lora(parse(tiny_schnell_folder, data, tmp_path / "c", "--guidance_scale", "3.5"))
    train_lora(parse(tiny_dev_folder, bare, tmp_path / "d", "--instance_prompt", "a red circle",
                     "--max_train_steps", "1"))
    with pytest.raises(ValueError, match="already holds a run"):
        train_lora(parse(tiny_dev_folder, bare, tmp_path / "d", "--instance_prompt", "a red circle"))
    assert cli_main(["train-lora", "--instance_data_dir", str(data), "--rank", "-1"]) == 2  # one line, status 2


def test_every_epoch_visits_each_image_once_and_schedules():
    rows = torch.cat([stream_rows(5, 2, i, seed=1) for i in range(10)])  # 20 items = 4 epochs of 5
    for epoch in rows.view(4, 5):
        assert sorted(epoch.tolist()) == [0, 1, 2, 3, 4]
    assert not torch.equal(rows[:5], rows[5:10])  # reshuffled per epoch
    assert torch.equal(stream_rows(5, 3, 3, seed=1), rows[9:12])  # any micro-batch, without replaying the others
    assert [lr_factor(s, "constant_with_warmup", 4, 10) for s in (0, 3, 9)] == [0.25, 1.0, 1.0]
    assert lr_factor(4, "linear", 4, 10) == 1.0 and lr_factor(9, "linear", 4, 10) == pytest.approx(1 / 6)
    assert lr_factor(7, "cosine", 4, 10) == pytest.approx(0.5) and lr_factor(0, "constant", 0, 10) == 1.0
    assert len(DEFAULT_TARGETS) == 10


# ------------------------------------------------------------------------------------ the concept demonstration
def _benchmark():
    """benchmarks/lora_concept.py, loaded by path (the benchmarks folder is not an installed package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lora_concept.py"
    spec = importlib.util.spec_from_file_location("lora_concept", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while the file executes
    spec.loader.exec_module(module)
    return module


def test_concept_checker_finds_the_new_shape_and_nothing_else():
    from fluxkit.data.render import render
    from fluxkit.eval.suite import build_suite

    bench = _benchmark()
    suite = build_suite(quick=True, seeds=(0,))
    for concept in bench.CONCEPTS:
        rng = random.Random(0)
        scenes = [bench.sample_concept_scene(rng, 128, 128) for _ in range(24)]
        for blur in (0.0, 1.0):  # crisp renders, and blurred like a small model's samples
            images = [np.asarray(Image.fromarray(s.render(concept, 128, 128)).filter(ImageFilter.GaussianBlur(blur)))
                      for s in scenes]
            hits = [bench.find_concept(im, concept) for im in images]
            assert all(h is not None and h.colour == s.placement.colour for h, s in zip(hits, scenes)), concept
        other = next(c for c in bench.CONCEPTS if c != concept)
        assert not any(bench.find_concept(s.render(other, 128, 128), concept) for s in scenes[:8])
        # The generator's own shapes and signs (a letter O is a ring, but on a board, not on the background).
        assert not any(bench.find_concept(render(item.scene).image, concept) for item in suite)


def test_concept_dataset_is_a_train_lora_folder(tmp_path):
    bench = _benchmark()
    captions = bench.make_dataset(tmp_path, "cross", 3, seed=0, size=64, token="sks", regular=2)
    pairs = read_instance_data(tmp_path, None)
    assert [c for _, c in pairs] == captions and len(pairs) == 5
    assert all("sks shape" in c for c in captions[:3]) and not any("sks" in c for c in captions[3:])
    assert all(bench.find_concept(np.asarray(Image.open(p).convert("RGB")), "cross") for p, _ in pairs[:3])


def test_frame_concept_is_captioned_without_place_and_a_plain_picture_is_no_frame(tmp_path):
    bench = _benchmark()
    captions = bench.make_dataset(tmp_path, "frame", 6, seed=0, size=96, token="zq")
    assert all("zq frame" in c and "corner" not in c and "small" not in c for c in captions)
    plain = np.full((96, 96, 3), 200, np.uint8)
    plain[:] = (230, 30, 30)  # red everywhere: the band is red, but so is the inside
    assert bench.find_concept(plain, "frame") is None
    plain[40:60, 40:60] = (30, 30, 230)  # a blue square in the middle changes nothing
    assert bench.find_concept(plain, "frame") is None
    plain[12:-12, 12:-12] = (255, 255, 255)  # a white inside makes the red band a frame
    hit = bench.find_concept(plain, "frame")
    assert hit is not None and hit.colour == "red" and hit.iou == 1.0


@pytest.mark.parametrize("prior", ["mixed", "renders", "model"])
def test_concept_benchmark_runs_end_to_end(tiny_dev_folder, tmp_path, prior):
    bench = _benchmark()
    status = bench.main(["--model", str(tiny_dev_folder), "--out", str(tmp_path), "--images", "3", "--regular-images",
                         "2", "--train-steps", "2", "--concept-prompts", "2", "--quick", "--seeds", "0", "--steps", "1",
                         "--threads", "1", "--prior", prior])
    report = json.loads((tmp_path / "report.json").read_text())
    assert status == 1 and not report["verdicts"]["concept with LoRA >= 80%"]  # a random model learns nothing
    assert report["train"]["steps"] == 2 and (tmp_path / "concept-grid.png").is_file()
    assert set(report["results"]) == {"with", "without"}
    captions = sorted(p.name for p in (tmp_path / "data").glob("*.txt"))
    if prior == "mixed":  # renders mixed into the training folder
        assert len(captions) == 5 and not (tmp_path / "classes").exists() and report["train"]["class_images"] == 0
    else:  # renders or the model's own samples, in the prior-preservation loss
        assert len(captions) == 3 and report["train"]["class_images"] == 2
        assert "--with_prior_preservation" in report["command"]
        assert sorted(p.name for p in (tmp_path / "classes").iterdir()) == [
            "class-000.png", "class-000.txt", "class-001.png", "class-001.txt"]
