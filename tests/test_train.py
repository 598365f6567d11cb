"""`fluxkit train`: every stage of the tiny-family recipe runs a few steps on test-sized configs (configs/test-*.toml),
resumes exactly, learns, and exports a folder the pipeline loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fluxkit.train import load_config, run_stage
from fluxkit.train.cache import LatentCache
from fluxkit.train.config import parse_override
from fluxkit.train.distill import KEY_TIMES, DevTask, teacher_grid
from fluxkit.train.flow import BaseTask, export_run, position_ids
from fluxkit.train.loop import Dist, RunFolder, make_optimizer, step_generator

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGES = ("ae", "cache", "base", "dev", "schnell")


def config(stage: str, *overrides: str):
    return load_config(CONFIGS / f"test-{stage}.toml", list(overrides))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The whole recipe, 3 steps per stage, each stage reading the previous one's run."""
    runs_dir = tmp_path_factory.mktemp("runs")
    for stage in STAGES:
        result = run_stage(config(stage), runs_dir, quiet=True)
        assert result.finished, stage
    return runs_dir


@pytest.mark.parametrize("stage", ["ae", "base", "dev", "schnell"])
def test_stage_writes_checkpoint_curve_and_samples(runs, stage):
    run = runs / f"test-{stage}"
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step-00000003"
    state = torch.load(latest / "state.pt", weights_only=True)
    assert state["step"] == 3 and len(state["history"]) == 3 and "optimizer" in state
    assert load_file(latest / "model.safetensors").keys() == load_file(latest / "ema.safetensors").keys()
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000003"]
    assert (run / "loss.png").stat().st_size > 1000
    assert {p.name for p in (run / "samples").glob("*.png")} == {"step-00000002.png", "step-00000003.png"}
    assert json.loads((run / "done.json").read_text())["steps"] == 3


def test_ae_stage_stores_data_derived_factors(runs):
    meta = json.loads((runs / "test-ae" / "ae.json").read_text())
    done = json.loads((runs / "test-ae" / "done.json").read_text())
    assert meta["params"]["scale_factor"] == done["scale_factor"] != 1.0  # the preset's 1.0 was replaced
    assert set(done["psnr_by_size"]) == {"32x32", "48x32", "32x48"} and done["psnr"] > 0


def test_cache_holds_scaled_latents_and_captions_grouped_by_size(runs):
    from fluxkit.data import SceneDataset
    from fluxkit.train.ae import images_to_tensor

    cache = LatentCache.load(runs / "test-cache")
    assert len(cache) == 40 and sorted(b.size for b in cache.buckets) == [(32, 32), (32, 48), (48, 32)]
    assert cache.prompts == ["a red circle above a blue square", "a sign that says 'OPEN'"]
    assert cache.empty_txt.shape == (1, 32, 384) and cache.prompt_vec.shape == (2, 384)
    bucket = next(b for b in cache.buckets if b.size == (48, 32))
    assert bucket.latents.shape[1:] == (16, 4, 6)  # (height, width) / 8
    # Row 0 is scene index[0]: its caption and its latent (AutoEncoder.encode: scaled + shifted) match a re-encode.
    sample = SceneDataset(0, 40, sizes=((32, 32), (48, 32), (32, 48)))[int(bucket.index[0])]
    assert bucket.captions[0] == sample.caption
    with torch.no_grad():
        z = cache.load_ae().encode(images_to_tensor([sample.image]))
    assert torch.allclose(z[0], bucket.latents[0], atol=0.05 * z.abs().max().item())
    assert 0.3 < bucket.latents.std() < 3  # scale_factor brings latents to about unit variance


def test_cache_resume_skips_finished_chunks(runs, tmp_path):
    import shutil

    shutil.copytree(runs / "test-ae", tmp_path / "test-ae")
    run_stage(config("cache", "data.n=32"), tmp_path, quiet=True)
    chunk = tmp_path / "test-cache" / "chunks" / "chunk-00000.safetensors"
    before = chunk.stat().st_mtime_ns
    (tmp_path / "test-cache" / "chunks" / "chunk-00001.safetensors").unlink()
    (tmp_path / "test-cache" / "done.json").unlink()
    assert run_stage(config("cache", "data.n=32"), tmp_path, resume=True, quiet=True).finished
    assert chunk.stat().st_mtime_ns == before  # untouched; only the missing chunk was encoded again
    assert (tmp_path / "test-cache" / "chunks" / "chunk-00001.safetensors").is_file()


@pytest.mark.parametrize("stage", ["ae", "base", "schnell"])
def test_resume_after_time_budget_equals_uninterrupted_run(runs, stage):
    straight = run_stage(config(stage, f"name=straight-{stage}", "train.steps=4"), runs, quiet=True)
    # A budget of ~0 minutes stops after the first step with a checkpoint; --resume then runs steps 2-4.
    cut = run_stage(config(stage, f"name=cut-{stage}", "train.steps=4"), runs, max_minutes=1e-9, quiet=True)
    while cut.step == 0:  # schnell stops inside its teacher trajectories too: one file per call, then training
        cut = run_stage(config(stage, f"name=cut-{stage}", "train.steps=4"), runs, resume=True, max_minutes=1e-9,
                        quiet=True)
    assert (cut.finished, cut.step) == (False, 1)
    resumed = run_stage(config(stage, f"name=cut-{stage}", "train.steps=4"), runs, resume=True, quiet=True)
    assert resumed.finished and resumed.step == 4
    for a, b in ((straight.model, resumed.model), (straight.ema, resumed.ema)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    opt_a = torch.load(runs / f"straight-{stage}/checkpoints/step-00000004/state.pt", weights_only=True)
    opt_b = torch.load(runs / f"cut-{stage}/checkpoints/step-00000004/state.pt", weights_only=True)
    assert opt_a["history"] == opt_b["history"]
    assert all(torch.equal(opt_a["optimizer"]["state"][k]["exp_avg"], opt_b["optimizer"]["state"][k]["exp_avg"])
               for k in opt_a["optimizer"]["state"])


def test_existing_run_needs_resume_and_same_config(runs):
    with pytest.raises(ValueError, match="already exists; pass --resume"):
        run_stage(config("base"), runs, quiet=True)
    with pytest.raises(ValueError, match=r"differs .* in \['optim.lr'\]"):
        run_stage(config("base", "optim.lr=0.5"), runs, resume=True, quiet=True)
    # A finished run resumed with more steps continues training, and its done.json and export follow: they are
    # removed while it runs (another stage must not take the shorter run's export) and rewritten at the end.
    assert run_stage(config("base", "name=more-base"), runs, quiet=True).step == 3
    done, weights = runs / "more-base" / "done.json", runs / "more-base" / "export" / "transformer.safetensors"
    before = load_file(weights)
    cut = run_stage(config("base", "name=more-base", "train.steps=5"), runs, resume=True, max_minutes=1e-9,
                    quiet=True)
    assert (cut.finished, cut.step, done.is_file()) == (False, 4, False)
    assert run_stage(config("base", "name=more-base", "train.steps=5"), runs, resume=True, quiet=True).step == 5
    assert json.loads(done.read_text())["steps"] == 5
    after = load_file(weights)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("stage", ["ae", "base"])
def test_loss_goes_down_when_overfitting_one_batch(runs, stage):
    from fluxkit.train.ae import AETask

    cfg = config(stage, "optim.lr=0.003")
    task = AETask(cfg, Dist()) if stage == "ae" else BaseTask(cfg, Dist(), runs)
    opt = make_optimizer(task.model, cfg.optim)
    losses = []
    for _ in range(30):
        loss = task.losses(task.net, 0, step_generator(0, stage, 0, 0))["loss"]  # the same batch, t and noise
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_cache_kinds_weight_the_scene_mix(runs, tmp_path):
    import shutil

    shutil.copytree(runs / "test-ae", tmp_path / "test-ae")
    cfg = config("cache", "name=mix", "data.n=24", 'data.kinds=["single", "single", "sign"]')
    assert run_stage(cfg, tmp_path, quiet=True).finished
    cache = LatentCache.load(tmp_path / "mix")
    captions = [c for b in cache.buckets for c in b.captions]
    signs = sum("'" in c or '"' in c for c in captions)
    assert len(captions) == 24 and 0 < signs < 24  # only single objects and signs were drawn
    assert json.loads((tmp_path / "mix" / "cache.json").read_text())["scenes"]["kinds"] == ["single", "single", "sign"]
    with pytest.raises(ValueError, match="data.kinds"):
        config("cache", 'data.kinds=["single", "blob"]')


def test_cache_curriculum_states_and_pins_its_scenes(runs, tmp_path):
    import shutil

    shutil.copytree(runs / "test-ae", tmp_path / "test-ae")
    cfg = config("cache", "name=pinned", "data.n=16", 'data.kinds=["single"]', 'data.state=["position"]',
                 'data.pin={colour = "red", shape = "square", position = ["left", "right"]}')
    assert run_stage(cfg, tmp_path, quiet=True).finished
    captions = [c for b in LatentCache.load(tmp_path / "pinned").buckets for c in b.captions]
    assert len(captions) == 16 and all("red" in c and "square" in c for c in captions)
    assert all(("left" in c) != ("right" in c) for c in captions)  # a listed pin: one of the two, stated
    scenes = json.loads((tmp_path / "pinned" / "cache.json").read_text())["scenes"]
    assert scenes["state"] == ["position"]
    assert scenes["pin"] == {"colour": "red", "shape": "square", "position": ["left", "right"]}
    # a base run re-renders the cache's scenes for its loss weights: it must draw the pinned ones
    task = BaseTask(config("base", "name=b", "flow.cache=pinned", "flow.object_weight=4"), Dist(), tmp_path)
    from fluxkit.data import SceneDataset

    data = SceneDataset(scenes["seed"], scenes["n"], sizes=tuple(tuple(s) for s in scenes["sizes"]),
                        kinds=("single",), state=("position",), pin=scenes["pin"])
    for bucket in task.cache.buckets:
        i = int(bucket.index[0])
        assert torch.allclose(bucket.loss_weight[0], 1 + 4 * _object_share(data[i].scene))
    with pytest.raises(ValueError, match="data.state"):
        config("cache", 'data.state=["colour"]')
    with pytest.raises(ValueError, match="data.pin: colour must be one of"):
        config("cache", 'data.pin={colour = "teal"}')


def test_base_trains_on_a_mix_of_caches(runs, tmp_path):
    import shutil

    shutil.copytree(runs / "test-ae", tmp_path / "test-ae")
    shutil.copytree(runs / "test-cache", tmp_path / "test-cache")
    cfg = config("cache", "name=signs", "data.n=8", "data.seed=3", 'data.kinds=["sign"]')
    assert run_stage(cfg, tmp_path, quiet=True).finished
    one, signs = LatentCache.load(tmp_path / "test-cache"), LatentCache.load(tmp_path / "signs")
    task = BaseTask(config("base", "name=mixed", 'flow.cache=["test-cache", "signs", "signs"]'), Dist(), tmp_path)
    assert len(task.cache) == len(one) + 2 * len(signs)  # listed twice: twice the share
    for bucket in task.cache.buckets:  # each size's bucket holds that size's scenes of every cache listed
        parts = [b for c in (one, signs, signs) for b in c.buckets if b.size == bucket.size]
        assert bucket.captions == [c for b in parts for c in b.captions]
        torch.testing.assert_close(bucket.latents, torch.cat([b.latents for b in parts]))
    assert torch.isfinite(task.losses(task.net, 0, step_generator(0, "base", 0, 0))["loss"])
    with pytest.raises(ValueError, match="one cache instead of a mix"):  # loss weights re-render one cache's scenes
        BaseTask(config("base", "name=m2", 'flow.cache=["test-cache", "signs"]', "flow.object_weight=2"), Dist(),
                 tmp_path)
    with pytest.raises(ValueError, match="non-empty list"):
        config("base", "flow.cache=[]")
    shutil.copytree(runs / "test-base", tmp_path / "test-base")  # the distillation stages take a mix too
    dev = DevTask(config("dev", "name=dev-mixed", 'distill.cache=["test-cache", "signs"]'), Dist(), tmp_path)
    assert len(dev.cache) == len(one) + len(signs)
    assert torch.isfinite(dev.losses(dev.net, 0, step_generator(0, "dev", 0, 0))["loss"])
    with pytest.raises(ValueError, match="non-empty list"):
        config("dev", "distill.cache=[]")


def test_base_init_continues_from_another_runs_ema(runs):
    task = BaseTask(config("base", "name=base-continued", "flow.init=test-base"), Dist(), runs)
    ema = load_file(runs / "test-base" / "checkpoints" / "step-00000003" / "ema.safetensors")
    assert ema.keys() == task.model.state_dict().keys()
    for k, v in task.model.state_dict().items():
        torch.testing.assert_close(v, ema[k], msg=k)
    fresh = BaseTask(config("base", "name=base-fresh"), Dist(), runs).model.state_dict()
    assert any(not torch.equal(fresh[k], ema[k]) for k in ema)  # the init changed the weights
    with pytest.raises(ValueError, match="nope"):
        BaseTask(config("base", "name=base-bad", "flow.init=nope"), Dist(), runs)


def test_edge_weight_raises_the_loss_weight_of_outline_tokens_only(runs):
    from fluxkit.data import SceneDataset
    from fluxkit.data.render import render
    from fluxkit.train.flow import draw_batch, flow_loss

    task = BaseTask(config("base", "name=base-edges", "flow.edge_weight=8"), Dist(), runs)
    cache, meta = task.cache, task.cache.scenes
    data = SceneDataset(meta["seed"], meta["n"], sizes=tuple(tuple(s) for s in meta["sizes"]), pairs=meta["pairs"])
    for bucket in cache.buckets:
        width, height = bucket.size
        assert bucket.loss_weight.shape == (len(bucket), (width // 16) * (height // 16))
        assert bucket.loss_weight.min() == 1.0 and bucket.loss_weight.max() <= 9.0
        for row, i in enumerate(bucket.index.tolist()[:4]):  # token (r, c) is weighted iff its 16x16 block has edges
            sample = data[i]
            scene_edges = render(sample.scene).edges().reshape(height // 16, 16, width // 16, 16).any(axis=(1, 3))
            weighted = (bucket.loss_weight[row] > 1).reshape(height // 16, width // 16).numpy()
            assert (weighted >= scene_edges).all() and weighted.any()  # the 1-px widening may reach a neighbour
    b = draw_batch(cache, 4, torch.Generator().manual_seed(0), Dist())
    assert b.weight is not None and b.weight.shape == b.x0.shape[:2]
    pred, target = torch.zeros_like(b.x0), torch.zeros_like(b.x0)
    target[b.weight > 1] = 1.0  # errors only on outline tokens: the weighted loss is above the plain one
    out = flow_loss(pred, target, b.weight)
    assert out["loss"] > out["mse"] > 0
    assert flow_loss(pred, target, torch.ones_like(b.weight))["loss"] == pytest.approx(out["mse"].item())
    with pytest.raises(ValueError, match="edge_weight"):
        config("base", "flow.edge_weight=-1")


def _object_share(scene) -> torch.Tensor:
    """[tokens]: the share of each 16x16 pixel block inside an object or sign board."""
    import numpy as np

    from fluxkit.data.render import render

    drawn = render(scene)
    covered = np.zeros((scene.height, scene.width), bool)
    for mask in (*drawn.masks, drawn.board_mask):
        if mask is not None:
            covered |= mask
    share = covered.reshape(scene.height // 16, 16, scene.width // 16, 16).mean(axis=(1, 3)).flatten()
    return torch.from_numpy(share).float()


def test_object_weight_raises_the_loss_weight_of_tokens_inside_objects(runs):
    from fluxkit.data import SceneDataset

    task = BaseTask(config("base", "name=base-objects", "flow.object_weight=4"), Dist(), runs)
    cache, meta = task.cache, task.cache.scenes
    data = SceneDataset(meta["seed"], meta["n"], sizes=tuple(tuple(s) for s in meta["sizes"]), pairs=meta["pairs"])
    checked = 0
    for bucket in cache.buckets:
        width, height = bucket.size
        assert bucket.loss_weight.min() == 1.0 and bucket.loss_weight.max() <= 5.0
        for row, i in enumerate(bucket.index.tolist()[:4]):
            assert torch.allclose(bucket.loss_weight[row], 1 + 4 * _object_share(data[i].scene))
            checked += 1
    assert checked > 0
    both = BaseTask(config("base", "name=base-both", "flow.object_weight=4", "flow.edge_weight=8"), Dist(), runs)
    plain = [b.loss_weight for b in cache.buckets]
    for bucket, objects_only in zip(both.cache.buckets, plain, strict=True):  # the two weightings add up
        assert (bucket.loss_weight >= objects_only).all() and (bucket.loss_weight > objects_only).any()
    with pytest.raises(ValueError, match="object_weight"):
        config("base", "flow.object_weight=-1")


def test_dev_student_starts_as_the_base_teacher(runs):
    task = DevTask(config("dev", "name=dev-init"), Dist(), runs)
    cache = task.cache
    x = torch.randn(2, 4, 64)
    img_ids, txt_ids = position_ids(2, 4, 4, 32, torch.device("cpu"))
    txt, vec, t = cache.prompt_txt.float(), cache.prompt_vec.float(), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        teacher = task.teacher(x, img_ids, txt, txt_ids, t, vec)
        for g in (1.0, 7.0):  # the zero-initialised guidance embedding contributes nothing yet
            student = task.model(x, img_ids, txt, txt_ids, t, vec, torch.full((2,), g))
            torch.testing.assert_close(student, teacher)


def test_dev_guidance_init_takes_an_earlier_devs_guidance_input(runs, tmp_path):
    """distill.guidance_init: the student's guidance_in comes from a dev run or an exported dev folder (the rest from
    the teacher); a model without one is refused by name."""
    dev = RunFolder(runs / "test-dev").load_ema()
    expected = {k: v for k, v in dev.items() if k.startswith("guidance_in.")}
    assert any(v.abs().sum() > 0 for k, v in expected.items() if "out_layer" in k)  # trained, not the silent init
    export_run(runs / "test-dev", tmp_path / "dev")
    for ref in ("test-dev", str(tmp_path / "dev")):
        task = DevTask(config("dev", "name=dev-ginit", f"distill.guidance_init={ref!r}"), Dist(), runs)
        got = task.model.state_dict()
        for k, v in expected.items():
            exact = ref == "test-dev"  # the export may store bf16
            torch.testing.assert_close(got[k], v.float(), rtol=0 if exact else 1e-2, atol=0 if exact else 1e-3)
        torch.testing.assert_close(got["img_in.weight"], task.teacher.img_in.weight)
    with pytest.raises(ValueError, match="has no guidance input"):
        DevTask(config("dev", "name=dev-ginit", "distill.guidance_init='test-base'"), Dist(), runs)


def test_schnell_trajectories_hold_the_linear_schedule_points(runs):
    times, keys = teacher_grid(20, 64)
    assert [float(times[k]) for k in keys] == list(KEY_TIMES)
    assert bool((times[1:] < times[:-1]).all()) and len(times) == 21 + 3
    files = sorted((runs / "test-schnell" / "trajectories").glob("*.safetensors"))
    states = torch.cat([load_file(p)["states"] for p in files if p.name.startswith("32x32")])
    assert states.shape[1:] == (5, 4, 64)
    # The first state is the trajectory's Gaussian noise, the last the teacher's image latent.
    assert 0.5 < states[:, 0].std() < 1.5 and not torch.allclose(states[:, 0], states[:, -1])


def test_export_loads_in_the_pipeline_and_shares_one_autoencoder(runs, tmp_path):
    from fluxkit.pipeline import FluxPipeline

    for name in ("test-dev", "test-schnell"):
        export_run(runs / name, tmp_path / name, ae_path="../ae.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae.safetensors", "test-dev", "test-schnell"]
    pipe = FluxPipeline.from_pretrained(tmp_path / "test-schnell")
    assert pipe.spec.name == "tiny-schnell" and not pipe.spec.shift_schedule
    assert pipe.vae.scale_factor == json.loads((runs / "test-ae" / "ae.json").read_text())["params"]["scale_factor"]
    image = pipe("a red circle", height=32, width=48, steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 32, 48, 3)
    dev = FluxPipeline.from_pretrained(tmp_path / "test-dev")
    assert dev.transformer.params.guidance_embed
    export_run(runs / "test-dev", tmp_path / "renamed", name="my-dev")  # --name
    assert FluxPipeline.from_pretrained(tmp_path / "renamed").spec.name == "my-dev"
    assert dev.spec.default_guidance == 3.5  # the preset's
    export_run(runs / "test-dev", tmp_path / "g5", guidance=5.0)  # --default-guidance
    assert FluxPipeline.from_pretrained(tmp_path / "g5").spec.default_guidance == 5.0
    with pytest.raises(ValueError, match="without guidance input"):
        export_run(runs / "test-schnell", tmp_path / "bad", guidance=5.0)
    with pytest.raises(ValueError, match="finite number"):
        export_run(runs / "test-dev", tmp_path / "bad", guidance=float("nan"))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="different autoencoder"):
        (tmp_path / "ae.safetensors").write_bytes((runs / "test-ae" / "ae.safetensors").read_bytes())  # fp32 != bf16
        export_run(runs / "test-dev", tmp_path / "test-dev", ae_path="../ae.safetensors")


def test_a_checkpoint_exports_as_a_model_with_the_weights_it_names(runs, tmp_path):
    from fluxkit.cli import main
    from fluxkit.pipeline import FluxPipeline
    from fluxkit.train.flow import export_checkpoint

    ckpts = runs / "test-dev" / "checkpoints"
    for step, weights in ((2, "ema"), (2, "model"), (None, "ema")):  # None: the latest, step 3
        out = export_checkpoint(runs / "test-dev", tmp_path / f"{step}-{weights}", step, weights)
        pipe = FluxPipeline.from_pretrained(out, torch_dtype=torch.float32)
        assert pipe.spec.name == "tiny-dev" and pipe.transformer.params.guidance_embed
        source = load_file(ckpts / f"step-{step or 3:08d}" / f"{weights}.safetensors")
        mine = pipe.transformer.state_dict()
        assert source.keys() == mine.keys()
        assert all(torch.equal(source[k].to(torch.bfloat16).float(), mine[k]) for k in source)  # stored as bf16
        assert pipe.vae.scale_factor == json.loads((runs / "test-ae" / "ae.json").read_text())["params"]["scale_factor"]
    raw = load_file(tmp_path / "2-model" / "transformer.safetensors")
    ema = load_file(tmp_path / "2-ema" / "transformer.safetensors")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the two weight sets differ after training
    # The CLI, and what it refuses: a step the run did not keep, a stage without a transformer, --weights alone.
    assert main(["train", "--export", str(runs / "test-base"), "--checkpoint", "latest", "--weights", "model",
                 "--out", str(tmp_path / "base"), "--name", "base-at-3"]) == 0
    assert FluxPipeline.from_pretrained(tmp_path / "base").spec.name == "base-at-3"
    with pytest.raises(ValueError, match=r"no checkpoint at step 1; it has steps \[2, 3\]"):
        export_checkpoint(runs / "test-base", tmp_path / "x", 1)
    with pytest.raises(ValueError, match="'ae' run"):
        export_checkpoint(runs / "test-ae", tmp_path / "x")
    export = ["train", "--export", str(runs / "test-base"), "--out", str(tmp_path / "y")]
    assert main([*export, "--weights", "model"]) == 2
    assert main([*export, "--checkpoint", "two"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_ae_run_adopted_from_weights_feeds_the_cache(runs, tmp_path):
    from fluxkit.train.ae import adopt_ae, load_trained_ae

    trained = runs / "test-ae" / "ae.safetensors"
    run = adopt_ae(config("ae"), trained, tmp_path, Dist())
    assert (run.root / "ae.safetensors").read_bytes() == trained.read_bytes()  # copied unchanged
    mine, theirs = (json.loads((r / "ae.json").read_text()) for r in (run.root, runs / "test-ae"))
    for key in ("scale_factor", "shift_factor"):  # measured again from the same weights and scenes
        assert mine["params"][key] == pytest.approx(theirs["params"][key], rel=1e-4)
    assert mine["psnr"] == pytest.approx(theirs["psnr"], rel=1e-4)
    assert json.loads((run.root / "done.json").read_text())["adopted_from"] == str(trained)
    assert run_stage(config("cache", "name=adopted-cache", "cache.ae=test-ae"), tmp_path, quiet=True).finished
    assert load_trained_ae(run.root).params == load_trained_ae(runs / "test-ae").params
    save_file({"decoder.conv_in.weight": torch.zeros(1)}, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="does not match the autoencoder"):
        adopt_ae(config("ae", "name=other"), tmp_path / "wrong.safetensors", tmp_path, Dist())
    assert not (tmp_path / "other").exists()  # nothing half-written


def test_ae_fine_tune_starts_from_init_and_adds_the_scale_equivariance_term(runs, tmp_path):
    from fluxkit.train.ae import AETask

    trained = load_file(runs / "test-ae" / "ae.safetensors")
    for init in ("test-ae", str(runs / "test-ae" / "ae.safetensors")):  # a run name, or a weights file
        cfg = config("ae", "name=ae-se", f"ae.init={init}", "ae.scale_equivariance_weight=2.0")
        task = AETask(cfg, Dist(), runs)
        assert all(torch.equal(v, trained[k]) for k, v in task.model.state_dict().items())
    terms = task.losses(task.net, 0, step_generator(0, "ae", 0, 0))
    assert terms["scale_eq"] > 0
    rest = terms["l1"] + terms["mse"] + 0.5 * terms["edge"] + 1e-4 * terms["kl"]  # configs/test-ae.toml's weights
    assert terms["loss"].item() == pytest.approx((rest + 2.0 * terms["scale_eq"]).item(), rel=1e-5)
    plain = AETask(config("ae"), Dist(), runs).losses(task.net, 0, step_generator(0, "ae", 0, 0))
    assert "scale_eq" not in plain  # weight 0: the half-size decode is not even run
    with pytest.raises(ValueError, match="ae.init run 'nope' not found"):
        AETask(config("ae", "ae.init=nope"), Dist(), runs)
    save_file({"decoder.conv_in.weight": torch.zeros(1)}, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="does not fit the config's autoencoder"):
        AETask(config("ae", f"ae.init={tmp_path / 'wrong.safetensors'}"), Dist(), runs)


def test_every_config_in_the_repo_loads():
    """The shipped recipe's configs (and the test ones) parse and pass every option check, e.g. a layout or mask kind
    that does not exist."""
    from fluxkit.train.config import STAGES

    paths = sorted(CONFIGS.glob("*.toml"))
    stages = {load_config(p, []).stage for p in paths}
    assert stages == set(STAGES), stages  # every stage has a config
    with pytest.raises(ValueError, match="regional.layouts must be a non-empty list"):
        load_config(CONFIGS / "tiny-regional.toml", ['regional.layouts=["quadrants"]'])


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"\[train\] has unknown keys \['stepz'\]"):
        config("base", "train.stepz=3")
    with pytest.raises(ValueError, match="train.steps must be of type int"):
        config("base", "train.steps=2.5")
    with pytest.raises(ValueError, match=r"do not apply to stage 'base' \(its own table is \[flow\]\)"):
        config("base", "distill.teacher=x")
    with pytest.raises(ValueError, match=r"\[model.flux\] has unknown keys"):
        config("base", "model.flux.width=3")
    with pytest.raises(ValueError, match="num_heads"):
        config("base", "model.flux.num_heads=3")  # FluxParams' own check: 32 is not divisible by 3
    assert parse_override("sample.steps=[1, 2]") == (["sample", "steps"], [1, 2])
    assert parse_override("name=my-run") == (["name"], "my-run")


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_auto_follows_the_device(monkeypatch, capsys, fast):
    import fluxkit.train.stages as stages

    monkeypatch.setattr(stages, "bf16_is_fast", lambda device: fast)
    cpu = Dist(0, 1, torch.device("cpu"))
    cfg = config("base")
    assert cfg.train.bf16 == "auto"  # the default
    assert stages.resolve_bf16(cfg, cpu, quiet=False).train.bf16 is fast
    assert ("no fast bf16" in capsys.readouterr().err) is not fast
    for explicit in (True, False):  # an explicit setting wins over the device
        cfg = config("base", f"train.bf16={str(explicit).lower()}")
        assert stages.resolve_bf16(cfg, cpu, True).train.bf16 is explicit
    with pytest.raises(ValueError, match='train.bf16 must be true, false or "auto"'):
        config("base", "train.bf16=yes")


def test_cli_runs_a_stage_and_reports_bad_input(runs, capsys):
    from fluxkit.cli import main

    argv = ["train", str(CONFIGS / "test-base.toml"), "--runs-dir", str(runs), "--set", "name=cli-base",
            "--set", "train.steps=1", "--quiet"]
    assert main(argv) == 0
    assert "cli-base: finished" in capsys.readouterr().out
    assert main(argv) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["train", "--export", str(runs / "test-base")]) == 2


def test_a_config_may_name_a_folder_inside_a_run(tmp_path, monkeypatch):
    from fluxkit.train.loop import resolve_run

    runs = tmp_path / "runs"
    (runs / "tiny-dev-600" / "export").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_run(runs, "tiny-dev-600", "init") == runs / "tiny-dev-600"
    assert resolve_run(runs, "tiny-dev-600/export", "init") == runs / "tiny-dev-600" / "export"
    (tmp_path / "tiny-dev-600" / "export").mkdir(parents=True)  # a path from the working directory comes first
    assert resolve_run(runs, "tiny-dev-600/export", "init") == Path("tiny-dev-600/export")
    with pytest.raises(ValueError, match="init run 'nowhere/export' not found"):
        resolve_run(runs, "nowhere/export", "init")


def test_centred_position_ids_go_from_the_config_to_the_teacher_check_and_the_exported_model(runs, tmp_path):
    import shutil

    from fluxkit.loading import save_diffusers_transformer
    from fluxkit.pipeline import FluxPipeline
    from fluxkit.train.flow import export_checkpoint

    for name in ("test-ae", "test-cache", "test-base"):
        shutil.copytree(runs / name, tmp_path / name)
    centred = config("base", "name=base-centred", "model.flux.centered_ids=true")
    assert centred.spec().flux.centered_ids and not config("base").spec().flux.centered_ids
    assert run_stage(centred, tmp_path, quiet=True).finished
    # A student must see positions as its teacher did: the mismatch is refused by name, either way round.
    with pytest.raises(ValueError, match="centered_ids=False"):
        DevTask(config("dev", "name=dev-a", "model.flux.centered_ids=true"), Dist(), tmp_path)
    with pytest.raises(ValueError, match="centered_ids=True"):
        DevTask(config("dev", "name=dev-b", "distill.teacher=base-centred"), Dist(), tmp_path)
    DevTask(config("dev", "name=dev-c", "distill.teacher=base-centred", "model.flux.centered_ids=true"), Dist(),
            tmp_path)
    pipe = FluxPipeline.from_pretrained(export_checkpoint(tmp_path / "base-centred", tmp_path / "model"))
    assert pipe.transformer.params.centered_ids  # saved in fluxkit.json, so sampling uses the ids it trained with
    with pytest.raises(ValueError, match="centred image position ids"):  # diffusers would sample it wrongly
        save_diffusers_transformer(pipe.transformer, tmp_path / "diffusers")
    assert not (tmp_path / "diffusers").exists()
    assert not FluxPipeline.from_pretrained(export_checkpoint(tmp_path / "test-base", tmp_path / "m2")) \
        .transformer.params.centered_ids
