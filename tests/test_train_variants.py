"""`fluxkit train` stages fill / canny / kontext / regional on test-sized configs: they run and export, start as their
init model, feed the model exactly what the inference hooks build, learn, resume exactly, and their exports (model
folders and BFL-layout LoRA files) load in FluxFillPipeline / FluxControlPipeline / FluxKontextPipeline (regional:
FluxPipeline with RegionalPrompts)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fluxkit import sampling
from fluxkit.conditioning import Control, Fill, Kontext
from fluxkit.data import SceneDataset, render
from fluxkit.pipeline import FluxPipeline
from fluxkit.regional import RegionalPrompts
from fluxkit.train import load_config, run_stage
from fluxkit.train.loop import Dist, RunFolder, make_optimizer, step_generator
from fluxkit.train.variants import TASKS, load_init
from fluxkit.train.variants_data import KONTEXT_KINDS, edit_pair, fill_mask, kontext_examples, scene_datasets

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VARIANTS = ("fill", "canny", "kontext", "regional")
EXTRA = {"fill": 64 + 4 * 8 * 8, "canny": 64, "kontext": 0, "regional": 0}  # the test autoencoder downsamples 8x
LORA_VARIANTS = ("fill", "kontext", "regional")


def config(stage: str, *overrides: str):
    return load_config(CONFIGS / f"test-{stage}.toml", list(overrides))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """test-ae -> test-cache -> test-base -> test-dev, then 3 steps of each variant (full) and of fill, kontext and
    regional as LoRAs (kontext's also training the QK norm scales)."""
    runs_dir = tmp_path_factory.mktemp("runs")
    for stage in ("ae", "cache", "base", "dev", *VARIANTS):
        assert run_stage(config(stage), runs_dir, quiet=True).finished, stage
    for stage in LORA_VARIANTS:
        lora = run_stage(lora_config(stage), runs_dir, quiet=True)
        assert lora.finished
    return runs_dir


def lora_config(stage: str):
    norms = ["kontext.train_norms=true", "kontext.norm_lr_mult=20"] if stage == "kontext" else []
    return config(stage, f"name=test-{stage}-lora", f"{stage}.mode=lora", *norms)


def init_model(runs: Path, stage: str):
    return load_init(runs, "test-dev", config(stage).spec().flux, torch.device("cpu")).eval()


def random_inputs(batch: int, seq: int, channels: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, seq, channels, generator=gen)
    txt, vec = torch.randn(batch, 16, 384, generator=gen), torch.randn(batch, 384, generator=gen)
    img_ids = sampling.image_ids(batch, 2, 2)
    return x, img_ids, txt, sampling.text_ids(batch, 16), torch.tensor([0.3, 0.8][:batch]), vec, torch.full(
        (batch,), 3.5)


@pytest.mark.parametrize("stage", VARIANTS)
def test_variant_run_finishes_with_samples_and_a_widened_export(runs, stage):
    run = runs / f"test-{stage}"
    done = json.loads((run / "done.json").read_text())
    assert done["steps"] == 3 and done["in_channels"] == 64 + EXTRA[stage] and done["mode"] == "full"
    assert {p.name for p in (run / "samples").glob("*.png")} == {"step-00000002.png", "step-00000003.png"}
    grid = Image.open(run / "samples" / "step-00000003.png")
    assert grid.height > 3 * 32  # condition, output and target rows
    spec = json.loads((run / "export" / "fluxkit.json").read_text())["spec"]
    assert spec["flux"]["in_channels"] == 64 + EXTRA[stage] and spec["name"] == f"test-{stage}"


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("stage", VARIANTS)
def test_model_starts_as_its_init_on_plain_latents(runs, stage, mode):
    task = TASKS[stage](config(stage, f"{stage}.mode={mode}"), Dist(), runs)
    assert task.model.img_in.in_features == 64 + EXTRA[stage] == task.spec.flux.in_channels
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    if mode == "lora":  # adapters on every linear, a widened img_in in full instead; the rest of the init is frozen
        assert task.norms == [] and task.lr_multipliers == {}
        full = {"img_in.weight", "img_in.bias"} if EXTRA[stage] else set()
        assert {n for n in trainable if ".adapters.lora." not in n} == full
        assert ("img_in.adapters.lora.down" in trainable) == (not EXTRA[stage])
        assert "double_blocks.0.img_attn.qkv.adapters.lora.up" in trainable and "final_layer.linear.base.weight" \
            not in trainable
    x, img_ids, txt, txt_ids, t, vec, g = random_inputs(2, 4, 64)
    extra = torch.zeros(2, 4, EXTRA[stage])
    with torch.no_grad():
        widened = task.model.eval()(torch.cat((x, extra), dim=2), img_ids, txt, txt_ids, t, vec, g)
        torch.testing.assert_close(widened, init_model(runs, stage)(x, img_ids, txt, txt_ids, t, vec, g))


def hook_input(stage: str, b, pipe, x: torch.Tensor):
    """What the pipeline feeds the transformer for noise x, by the hook protocol (`Conditioning`): encode, then
    prepare after the noise draw, then model_input; Fill/Control get the batch's posterior-sample seed."""
    h, w = (s // 8 for s in b.images.shape[-2:])
    batch, seeded = x.shape[0], torch.Generator().manual_seed(b.cond_seed) if b.cond_seed is not None else None
    img_ids = sampling.image_ids(batch, h // 2, w // 2)
    sigmas = sampling.get_schedule(4, x.shape[1], shift=sampling.ShiftConfig())
    if stage == "fill":
        hook = Fill(b.images, b.masks)
        hook.encode(pipe, batch, torch.Generator().manual_seed(123), (h, w))  # the start image's draw (unused)
        x_start, img_ids, _, _ = hook.prepare(pipe, x, img_ids, sigmas, seeded, (h, w))
        assert torch.equal(x_start, x)  # strength 1: the start is the noise itself
    elif stage == "canny":
        hook = Control(b.images)
        hook.encode(pipe, batch, seeded, (h, w))
    else:
        hook = Kontext(b.images)
        hook.encode(pipe, batch, None, (h, w))
        _, img_ids, _, _ = hook.prepare(pipe, x, img_ids, sigmas, None, (h, w))
    return hook.model_input(x), img_ids


@pytest.mark.parametrize("stage", ["fill", "canny", "kontext"])
def test_training_input_is_what_the_inference_hook_builds(runs, stage):
    task = TASKS[stage](config(stage), Dist(), runs)
    b = task.batch(step_generator(0, stage, 5, 0))
    batch, seq = b.flow.x0.shape[:2]
    x = torch.randn(batch, seq, 64, generator=torch.Generator().manual_seed(2))
    pipe = FluxPipeline(task.model, task.ae, None, task.spec)
    mine, mine_ids = b.model_input(x)
    theirs, their_ids = hook_input(stage, b, pipe, x)
    assert mine.shape == (batch, seq * (2 if stage == "kontext" else 1), 64 + EXTRA[stage])
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    assert torch.equal(mine_ids, their_ids)
    # What the condition shows: fill's image is the target scene itself (the hook masks it), canny's a white-on-black
    # edge map, kontext's the scene before the edit (the target is the scene after it).
    with torch.no_grad():
        shown = sampling.pack(task.ae.encode(b.images * 2 - 1))  # [B, L, 64] posterior mean
    if stage == "fill":
        torch.testing.assert_close(shown, b.flow.x0, atol=1e-5, rtol=1e-5)
        assert 0 < b.masks.mean() < 1 and set(b.masks.unique().tolist()) <= {0.0, 1.0}
    elif stage == "canny":
        assert ((b.images == 0) | (b.images == 1)).all() and 0 < b.images.mean() < 0.5
    else:
        assert not torch.allclose(shown, b.flow.x0, atol=1e-3) and all(b.prompts)


def test_regional_training_text_and_mask_are_what_the_pipeline_feeds_its_transformer(runs):
    """Per example (the hook shares its regions across a call): FluxPipeline with RegionalPrompts feeds the
    transformer the batch's joint text [global; regions] and attention mask, and training passes the mask on."""
    task = TASKS["regional"](config("regional"), Dist(), runs)
    b = task.batch(step_generator(0, "regional", 5, 0))
    batch, seq = b.flow.x0.shape[:2]
    (height, width), n_regions = b.images.shape[-2:], len(b.regions[0])
    length = task.spec.max_sequence_length
    assert all(len(rs) == n_regions >= 2 for rs in b.regions)  # one layout per batch
    joint = (n_regions + 1) * length + seq
    assert b.flow.txt.shape[1] == (n_regions + 1) * length and b.attn_mask.shape == (batch, 1, joint, joint)
    calls = []
    task.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    pipe = FluxPipeline(task.model.eval(), task.ae, task.encoder, task.spec)
    x = torch.randn(batch, seq, 64, generator=torch.Generator().manual_seed(3))
    for i in range(batch):
        masks = [torch.from_numpy(r.mask(width, height)).float() for r in b.regions[i]]
        pipe(b.prompts[i], conditioning=RegionalPrompts([r.prompt for r in b.regions[i]], masks), height=height,
             width=width, num_inference_steps=1, latents=x[i : i + 1], guidance_scale=3.5, output_type="latent")
        (img, img_ids, txt, txt_ids, _, vec, _), kwargs = calls[-1]
        torch.testing.assert_close(txt[0], b.flow.txt[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(vec[0], b.flow.vec[i], atol=1e-5, rtol=0)
        assert torch.equal(kwargs["attn_mask"][0], b.attn_mask[i]) and torch.equal(txt_ids[0], b.flow.txt_ids[i])
        # each region's text sees exactly its region's image tokens
        for k, r in enumerate(b.regions[i]):
            row = b.attn_mask[i, 0, (k + 1) * length, (n_regions + 1) * length:]  # [seq]
            inside = torch.from_numpy(r.mask(width, height)).reshape(height // 16, 16, width // 16, 16).float()
            assert torch.equal(row, inside.mean((1, 3)).flatten() >= 0.5) and row.any()
    # the loss's forward gets the mask too
    task.batch_losses(task.net, b, step_generator(0, "regional", 1, 0))
    (_, _, txt, *_), kwargs = calls[-1]
    assert torch.equal(kwargs["attn_mask"], b.attn_mask) and torch.equal(txt, b.flow.txt)


@pytest.mark.parametrize("stage", ["canny", "kontext"])
def test_the_pipeline_feeds_its_transformer_the_training_input(runs, stage):
    """End to end through FluxPipeline (start latents given, so no noise draw): the transformer's first call sees
    what training builds. (Fill draws the start image's posterior first, so only the hook protocol matches it.)"""
    task = TASKS[stage](config(stage), Dist(), runs)
    b = task.batch(step_generator(0, stage, 7, 0))
    batch, seq = b.flow.x0.shape[:2]
    x = torch.randn(batch, seq, 64, generator=torch.Generator().manual_seed(3))
    calls = []
    task.model.register_forward_pre_hook(lambda module, args: calls.append(args))
    hook = Control(b.images) if stage == "canny" else Kontext(b.images)
    gen = torch.Generator().manual_seed(b.cond_seed) if b.cond_seed is not None else None
    FluxPipeline(task.model.eval(), task.ae, None, task.spec)(
        prompt_embeds=b.flow.txt, pooled_prompt_embeds=b.flow.vec, conditioning=hook, height=b.images.shape[-2],
        width=b.images.shape[-1], num_inference_steps=1, latents=x, generator=gen, guidance_scale=3.5,
        output_type="latent")
    img, img_ids, txt, _, t, vec, g = calls[0]
    mine, mine_ids = b.model_input(x)
    torch.testing.assert_close(img, mine, rtol=0, atol=1e-6)
    assert torch.equal(img_ids, mine_ids) and torch.equal(txt, b.flow.txt) and torch.equal(vec, b.flow.vec)
    assert t.tolist() == [1.0] * batch and g.tolist() == [task.opts.guidance] * batch


@pytest.mark.parametrize("stage", VARIANTS)
def test_loss_goes_down_when_overfitting_one_batch(runs, stage):
    cfg = config(stage, "optim.lr=0.003")
    task = TASKS[stage](cfg, Dist(), runs)
    opt = make_optimizer(task.model, cfg.optim)
    batch, losses = task.batch(step_generator(0, stage, 0, 0)), []
    for _ in range(25):
        loss = task.batch_losses(task.net, batch, step_generator(0, stage, 1, 0))["loss"]  # the same t and noise
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_resume_after_time_budget_equals_uninterrupted_run(runs):
    args = ("train.steps=4", "fill.mode=lora")
    straight = run_stage(config("fill", "name=straight-fill", *args), runs, quiet=True)
    cut = run_stage(config("fill", "name=cut-fill", *args), runs, max_minutes=1e-9, quiet=True)
    assert (cut.finished, cut.step) == (False, 1)
    resumed = run_stage(config("fill", "name=cut-fill", *args), runs, resume=True, quiet=True)
    assert resumed.finished and resumed.step == 4
    for a, b in ((straight.model, resumed.model), (straight.ema, resumed.ema)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    a, b = (load_file(runs / f"{name}/lora.safetensors") for name in ("straight-fill", "cut-fill"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def scene_inputs(size=(48, 32)):
    """A scene image, a mask over its first object's box, and its edge map, as PIL images."""
    sample = SceneDataset(5, 1, sizes=(size,), kinds=("single",))[0]
    mask = fill_mask(sample.scene, "object", random.Random(0), 0.08)
    edges = render(sample.scene).edges()
    return (Image.fromarray(sample.image), Image.fromarray(mask.astype(np.uint8) * 255),
            Image.fromarray(edges.astype(np.uint8) * 255).convert("RGB"))


def generate(pipe, stage: str, **kw):
    image, mask, edges = scene_inputs()
    common = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", **kw)
    if stage == "fill":
        return pipe("a red circle", image=image, mask_image=mask, **common).images
    if stage == "canny":
        return pipe("a red circle", control_image=edges, **common).images
    if stage == "regional":
        left, right = torch.zeros(32, 48), torch.zeros(32, 48)
        left[:, :24], right[:, 24:] = 1, 1
        hook = RegionalPrompts(["a red circle", "a blue square"], [left, right])
        return pipe("a white background", conditioning=hook, height=32, width=48, **common).images
    return pipe(image, "make the circle blue", max_area=48 * 32, _auto_resize=False, **common).images


PIPELINES = {"fill": "FluxFillPipeline", "canny": "FluxControlPipeline", "kontext": "FluxKontextPipeline",
             "regional": "FluxPipeline"}


@pytest.mark.parametrize("stage", VARIANTS)
def test_export_generates_in_its_pipeline(runs, stage):
    import fluxkit

    pipe = getattr(fluxkit, PIPELINES[stage]).from_pretrained(runs / f"test-{stage}" / "export",
                                                             torch_dtype=torch.float32)
    assert pipe.transformer.img_in.in_features == 64 + EXTRA[stage]
    images = generate(pipe, stage)
    assert images.shape == (1, 32, 48, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("stage", LORA_VARIANTS)
def test_lora_export_loads_onto_the_init_model_and_equals_the_trained_one(runs, stage):
    import fluxkit

    run = runs / f"test-{stage}-lora"
    assert json.loads((run / "done.json").read_text())["lora"] == "lora.safetensors"
    base = getattr(fluxkit, PIPELINES[stage]).from_pretrained(runs / "test-dev" / "export", torch_dtype=torch.float32,
                                                             transformer=init_model(runs, stage))
    report = base.load_lora_weights(run / "lora.safetensors")
    assert report.img_in_width == (64 + EXTRA[stage] if EXTRA[stage] else None)
    # the kontext LoRA carries replacement QK norm scales: the loader reads the file as a BFL control LoRA
    assert (report.format, report.norm_scales) == (("bfl-control", 6) if stage == "kontext" else ("bfl", 0))
    assert base.transformer.img_in.in_features == base.transformer.params.in_channels == 64 + EXTRA[stage]
    merged = fluxkit.FluxPipeline.from_pretrained(run / "export", torch_dtype=torch.float32).transformer
    inputs = random_inputs(2, 4, 64 + EXTRA[stage])
    trained = TASKS[stage](lora_config(stage), Dist(), runs).model
    trained.load_state_dict(RunFolder(run).load_ema(), strict=True)  # the EMA weights the export was made from
    norms = {k: v for k, v in load_file(run / "lora.safetensors").items() if k.endswith("_norm.scale")}
    if stage == "kontext":  # the trained QK norm scales ship whole (BFL's replacement norm scales) and have moved
        assert len(norms) == 6 and "double_blocks.0.img_attn.norm.query_norm.scale" in norms  # 3 attentions x q, k
        init = init_model(runs, stage).state_dict()
        assert max((v - init[k]).abs().max() for k, v in norms.items()) > 1e-2
    else:
        assert not norms
    with torch.no_grad():
        loaded = base.transformer(*inputs)
        x, *rest = random_inputs(2, 4, 64)
        plain = base.transformer(torch.cat((x, torch.zeros(2, 4, EXTRA[stage])), dim=2), *rest)
        assert (plain - init_model(runs, stage)(x, *rest)).abs().max() > 1e-4  # the LoRA changed the model
        torch.testing.assert_close(loaded, trained.eval()(*inputs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded, merged(*inputs), atol=1e-5, rtol=1e-5)
    assert generate(base, stage).shape == (1, 32, 48, 3)


def test_lora_variant_folder_is_the_base_plus_its_adapter(runs, tmp_path):
    """`fluxkit train --export RUN --out weights/tiny-fill --base ../tiny-dev`: how the tiny tools variants ship."""
    import shutil

    import fluxkit
    from fluxkit.cli import main as fluxkit_main
    from fluxkit.train.variants import export_lora_variant

    shutil.copytree(runs / "test-dev" / "export", tmp_path / "dev")
    run = runs / "test-fill-lora"
    assert fluxkit_main(["train", "--export", str(run), "--out", str(tmp_path / "fill"), "--base", "../dev"]) == 0
    meta = json.loads((tmp_path / "fill" / "fluxkit.json").read_text())
    assert meta["transformer"].startswith("../dev/") and meta["lora"] == "lora.safetensors"
    assert sorted(p.name for p in (tmp_path / "fill").iterdir()) == ["fluxkit.json", "lora.safetensors"]
    variant = fluxkit.FluxFillPipeline.from_pretrained(tmp_path / "fill", torch_dtype=torch.float32)
    assert variant.get_active_adapters() == ["test-fill-lora"]
    assert variant.transformer.img_in.in_features == 64 + EXTRA["fill"]
    by_hand = fluxkit.FluxFillPipeline.from_pretrained(tmp_path / "dev", torch_dtype=torch.float32)
    by_hand.load_lora_weights(run / "lora.safetensors")
    np.testing.assert_array_equal(generate(variant, "fill"), generate(by_hand, "fill"))
    # --name: a run trained under another name ships under the one given, which is also its adapter's name
    assert fluxkit_main(["train", "--export", str(run), "--out", str(tmp_path / "fill2"), "--base", "../dev",
                         "--name", "tiny-fill"]) == 0
    renamed = fluxkit.FluxFillPipeline.from_pretrained(tmp_path / "fill2", torch_dtype=torch.float32)
    assert renamed.get_active_adapters() == ["tiny-fill"]
    assert json.loads((tmp_path / "fill2" / "fluxkit.json").read_text())["spec"]["name"] == "tiny-fill"
    with pytest.raises(ValueError, match="no fluxkit.json"):
        export_lora_variant(run, tmp_path / "other", "../nowhere")
    with pytest.raises(ValueError, match="not a finished LoRA-mode variant run"):
        export_lora_variant(runs / "test-fill", tmp_path / "other", "../dev")  # a full-mode run has no LoRA
    (tmp_path / "fill" / "lora.safetensors").unlink()
    with pytest.raises(ValueError, match="names the LoRA"):
        fluxkit.FluxFillPipeline.from_pretrained(tmp_path / "fill")


def test_fill_masks_cover_what_they_say():
    sample = SceneDataset(3, 1, sizes=((48, 32),), kinds=("single",))[0]
    rng = random.Random(0)
    obj = fill_mask(sample.scene, "object", rng, 0.08)
    assert obj[sample.masks[0]].all() and obj.mean() < 0.9  # the object is inside, most of the frame is not
    for _ in range(5):
        border = fill_mask(sample.scene, "outpaint", rng, 0.08)
        assert border.any() and not border[12:20, 20:28].any()  # some side, never the centre
        edges = border[0].all() or border[-1].all() or border[:, 0].all() or border[:, -1].all()
        assert edges
        assert 0 < fill_mask(sample.scene, "rectangles", rng, 0.08).mean() < 1


def test_lora_may_train_the_qk_norm_scales_at_their_own_rate(runs):
    cfg = config("kontext", "kontext.mode=lora", "kontext.train_norms=true", "kontext.norm_lr_mult=20")
    task = TASKS["kontext"](cfg, Dist(), runs)
    # test config: one double block (img + txt attention) and one single block, each with a query and a key scale
    assert len(task.norms) == 6 and all(n.endswith(("query_norm.scale", "key_norm.scale")) for n in task.norms)
    assert task.lr_multipliers == dict.fromkeys(task.norms, 20.0)
    opt = make_optimizer(task.model, cfg.optim, task.lr_multipliers)
    params = dict(task.model.named_parameters())
    fast = [g for g in opt.param_groups if g["lr_mult"] == 20.0]
    assert [id(p) for g in fast for p in g["params"]] == [id(params[n]) for n in task.norms]
    assert all(g["weight_decay"] == 0.0 for g in fast)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in params.values())
    with pytest.raises(ValueError, match="name no parameter"):
        make_optimizer(task.model, cfg.optim, {"nope.scale": 2.0})
    with pytest.raises(ValueError, match="norm_lr_mult must be positive"):
        config("kontext", "kontext.norm_lr_mult=0")


def test_kontext_pairs_replace_scenes_no_edit_fits():
    datasets = scene_datasets(0, 50, ((48, 32),), KONTEXT_KINDS)
    singles = [SceneDataset(1, 3, sizes=((48, 32),), kinds=("single",))[i] for i in range(3)]
    assert edit_pair(singles[0].scene, random.Random(0), ("remove",)) is None  # one object cannot be removed
    ex = kontext_examples(singles, random.Random(0), ("remove",), datasets)
    assert len(ex.prompts) == 3 and all(t.shape == (32, 48, 3) for t in ex.targets + ex.conditions)
    assert all(not np.array_equal(a, b) for a, b in zip(ex.targets, ex.conditions))  # an object is gone


def test_variant_config_errors_name_the_key(runs):
    with pytest.raises(ValueError, match="fill.mode must be 'full' or 'lora'"):
        config("fill", "fill.mode=half")
    with pytest.raises(ValueError, match=r"fill.masks must be a non-empty list from"):
        config("fill", "fill.masks=['ellipse']")
    with pytest.raises(ValueError, match=r"\[fill\] has unknown keys \['edges'\]"):
        config("fill", "fill.edges=['scene']")
    with pytest.raises(ValueError, match="kontext.edits"):
        config("kontext", "kontext.edits=[]")
    with pytest.raises(ValueError, match="lora_targets"):
        TASKS["canny"](config("canny", "canny.mode=lora", "canny.lora_targets=['nope']"), Dist(), runs)


def test_init_may_be_a_model_folder(runs):
    params = config("fill").spec().flux
    folder = load_init(runs, str(runs / "test-dev" / "export"), params, torch.device("cpu"))  # bf16 weights
    run = init_model(runs, "fill")
    assert all(p.requires_grad and p.dtype == torch.float32 for p in folder.parameters())
    for (name, a), b in zip(folder.state_dict().items(), run.state_dict().values()):
        assert torch.equal(a, b.to(torch.bfloat16).float()), name
    with pytest.raises(ValueError, match="is not the config's model"):
        load_init(runs, str(runs / "test-dev" / "export"), replace(params, depth=2), torch.device("cpu"))


def test_a_guidance_distilled_model_may_seed_a_model_without_guidance(runs):
    """Continuing the base from a dev folder: every weight but guidance_in carries over, and the model runs."""
    params = replace(config("fill").spec().flux, guidance_embed=False)
    base = load_init(runs, str(runs / "test-dev" / "export"), params, torch.device("cpu"))
    dev = load_init(runs, str(runs / "test-dev" / "export"), replace(params, guidance_embed=True), torch.device("cpu"))
    assert base.params == params and not any(k.startswith("guidance_in") for k in base.state_dict())
    shared = {k: v for k, v in dev.state_dict().items() if not k.startswith("guidance_in")}
    assert shared.keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in shared.items())
    x, img_ids, txt, txt_ids, t, vec, _ = random_inputs(2, 4, 64)
    assert base(x, img_ids, txt, txt_ids, t, vec).shape == x.shape
    with pytest.raises(ValueError, match="is not the config's model"):  # any other difference is refused
        load_init(runs, str(runs / "test-dev" / "export"), replace(params, guidance_embed=True, depth=2),
                  torch.device("cpu"))


def test_a_model_may_be_continued_under_centred_position_ids(runs):
    """centered_ids is no weight: a corner-id dev folder seeds a centred base, which then uses centred ids."""
    params = replace(config("fill").spec().flux, guidance_embed=False, centered_ids=True)
    folder, cpu = str(runs / "test-dev" / "export"), torch.device("cpu")
    corner = load_init(runs, folder, replace(params, centered_ids=False), cpu)
    centred = load_init(runs, folder, params, cpu)
    assert centred.params == params and corner.params.centered_ids is False
    assert all(torch.equal(v, centred.state_dict()[k]) for k, v in corner.state_dict().items())
    x, img_ids, txt, txt_ids, t, vec, _ = random_inputs(2, 4, 64)
    with torch.no_grad():  # same weights, other frame: the image-text attention, hence the output, differs
        assert not torch.allclose(centred(x, img_ids, txt, txt_ids, t, vec), corner(x, img_ids, txt, txt_ids, t, vec))
    with pytest.raises(ValueError, match="is not the config's model"):
        load_init(runs, folder, replace(params, depth=2), cpu)
