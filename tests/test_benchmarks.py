"""Smoke tests of the benchmark scripts: each one's main() runs at toy scale (test-sized random models, 32^2 images,
a few steps) and prints its table; the asserts check the rows and that the numbers mean what the tables say."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch

# benchmarks/ is a package of scripts at the repository root (run as `python -m benchmarks.NAME`), not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import full_size, quant_quality, step_cache, tiny_e2e  # noqa: E402
from fluxkit.model import Flux  # noqa: E402

# Small everything, on one thread: tiny matmuls gain nothing from two, and lose much when the cores are shared.
QUALITY = ["--size", "32", "--num-prompts", "2", "--seeds", "0", "--eval-categories", "colour", "--eval-seeds", "0",
           "--threads", "1"]
TOY_FLUX = ["--depth", "1", "--single", "1", "--hidden", "64", "--heads", "2", "--size", "32", "--steps", "2",
            "--txt-tokens", "8", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    """The scripts' --threads sets torch's global thread count: give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _table_lines(out: str, first_words: list[str]) -> list[str]:
    """The printed lines that start with one of `first_words` (a table's rows)."""
    return [line for line in out.splitlines() if line.split() and line.split()[0] in first_words]


def test_quant_quality_table(tiny_dev_folder, tmp_path, capsys):
    # --eval none here: the eval path is covered by the step-cache test, which shares it.
    rows = quant_quality.main(["--models", str(tiny_dev_folder), "--kinds", "int8", "q8_0", "q4_0", "q4_k",
                               "--steps", "3", *QUALITY, "--eval", "none", "--json", str(tmp_path / "q.json")])
    assert [r["kind"] for r in rows] == ["bf16", "int8", "q8_0", "q4_0", "q4_k"]
    by_kind = {r["kind"]: r for r in rows}
    assert by_kind["bf16"]["psnr"] == math.inf
    # The test model's 32-wide linears cannot hold 256-value K-quant blocks: listed with the reason, not dropped.
    assert "256" in by_kind["q4_k"]["skipped"]
    for kind in ("int8", "q8_0"):
        assert 30 < by_kind[kind]["psnr"] < math.inf  # issue 5's bar, met with margin at 8 bits
        assert by_kind[kind]["mib"] < by_kind["bf16"]["mib"]
    assert by_kind["q8_0"]["psnr"] > by_kind["q4_0"]["psnr"]  # fewer bits, larger error
    for kind in ("int8", "q8_0", "q4_0"):
        assert by_kind[kind]["worst"] <= by_kind[kind]["psnr"] + 1e-9  # the worst image's MSE >= the pooled MSE
    assert all(r["eval"] is None and r["s_per_image"] > 0 for r in rows[:-1])
    out = capsys.readouterr().out
    assert len(_table_lines(out, [str(tiny_dev_folder)[-24:]])) == 5
    assert json.loads((tmp_path / "q.json").read_text())["rows"][1]["kind"] == "int8"


def test_psnr():
    a = torch.rand(2, 8, 8, 3).numpy()
    assert quant_quality.psnr(a, a) == math.inf
    assert quant_quality.psnr(a * 0, a * 0 + 0.1) == pytest.approx(20.0)  # MSE 0.01 -> 20 dB
    with pytest.raises(ValueError, match="one shape"):
        quant_quality.psnr(a, a[:1])


def test_step_cache_table(tiny_dev_folder, capsys):
    rows = step_cache.main(["--model", str(tiny_dev_folder), "--steps", "4", "--fbcache", "0", "1e9",
                            "--teacache", "0", "--teacache-rescale", "identity", *QUALITY])
    assert [(r["setting"], r["threshold"]) for r in rows] == [
        ("none", None), ("fbcache", 0.0), ("fbcache", 1e9), ("teacache/identity", 0.0)]
    none, fb_off, fb_all, tea_off = rows
    assert none["call_ratio"] == 1.0 and none["psnr"] == math.inf and none["speedup"] == 1.0
    # Threshold 0 never skips: the same calls and exactly the uncached images.
    for r in (fb_off, tea_off):
        assert r["calls"] == r["full"] == 2 * 4 and r["psnr"] == math.inf
    # An unreachable threshold skips every step after each image's first: steps x fewer full calls, another image.
    assert fb_all["call_ratio"] == 4.0 and fb_all["eval_call_ratio"] == 4.0
    assert fb_all["psnr"] < 60
    assert all(0.0 <= r["eval"] <= 1.0 for r in rows) and none["eval_delta_points"] == 0.0
    out = capsys.readouterr().out
    assert len(_table_lines(out, ["none", "fbcache", "teacache/identity"])) == 4


def test_tiny_e2e_tables(tiny_dev_folder, tiny_schnell_folder, capsys):
    result = tiny_e2e.main(["--schnell", str(tiny_schnell_folder), "--schnell-steps", "1", "2", "--dev",
                            str(tiny_dev_folder), "--dev-steps", "1", "--size", "32", "--batches", "2",
                            "--repeat", "1", "--no-cold", "--threads", "1"])
    warm = result["warm"]
    assert [(r["steps"], r["dtype"]) for r in warm] == [(1, "bf16"), (2, "bf16"), (1, "fp32"), (2, "fp32"),
                                                        (1, "bf16"), (1, "fp32")]
    assert all(r["s_per_image"] > 0 and r["batch"] == 2 for r in warm)
    assert len(result["split"]) == 3 * 2
    assert all(r[k] > 0 for r in result["split"] for k in ("encode_s", "denoise_s", "decode_s"))
    assert result["cold"] == []
    out = capsys.readouterr().out
    assert "fp32/bf16" in out and "cold" not in out
    # Three warm rows (bf16 and fp32 side by side) and six split rows (one per dtype).
    assert len(_table_lines(out, [str(tiny_schnell_folder)[-24:], str(tiny_dev_folder)[-24:]])) == 3 + 6


def test_cold_generate(tiny_schnell_folder):
    assert tiny_e2e.cold_generate(str(tiny_schnell_folder), 1, (32, 32), threads=1) > 0


def test_full_size_table(tmp_path, capsys):
    rows = full_size.main([*TOY_FLUX, "--kinds", "bf16", "q4_0", "q4_k", "--workdir", str(tmp_path),
                           "--dtype", "bf16", "--json", str(tmp_path / "f.json")])
    bf16, q4_0, q4_k = rows
    for r in (bf16, q4_0):
        assert len(r["step_s"]) == 2 and all(s > 0 for s in r["step_s"]) and r["finite"]
        assert r["peak_rss_gib"] >= 0.9 * r["rss_built_gib"] > 0
    assert q4_0["weights_gib"] < bf16["weights_gib"]
    assert "256" in q4_k["skipped"]
    assert not list(tmp_path.glob("*.safetensors"))  # the bf16 file is removed unless --keep-file
    out = capsys.readouterr().out
    assert len(_table_lines(out, ["bf16", "q4_0", "q4_k"])) == 2 * 3  # as each finishes, and in the summary


def test_full_size_fp32_compute_keeps_codes_and_skips_bf16(tmp_path):
    bf16, q8_0 = full_size.main([*TOY_FLUX, "--kinds", "bf16", "q8_0", "--dtype", "fp32", "--workdir", str(tmp_path)])
    assert "fp32 copy" in bf16["skipped"]
    assert q8_0["dtype"] == "float32" and q8_0["finite"] and len(q8_0["step_s"]) == 2
    params = full_size.flux_params(_toy_args())  # 8-bit codes, everything else (biases, norms, txt_in, ...) fp32
    assert q8_0["weights_gib"] * full_size.GIB == full_size.estimated_bytes(params, "q8_0", float_bytes=4)
    assert full_size.estimated_bytes(params, "q8_0", 4) > full_size.estimated_bytes(params, "q8_0")


def test_full_size_step_flops_counts_every_linear():
    from torch.utils.flop_counter import FlopCounterMode

    params = full_size.flux_params(_toy_args())
    model, img, txt = Flux(params), 16, 8
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, img, 64), torch.zeros(1, img, 3), torch.randn(1, txt, params.context_in_dim),
              torch.zeros(1, txt, 3), torch.rand(1), torch.randn(1, params.vec_in_dim))
    # the counter sees the matmuls of every linear (not CPU attention): step_flops less its attention term
    attention = (params.depth + params.depth_single_blocks) * 4 * (img + txt) ** 2 * params.hidden_size
    assert counter.get_total_flops() == full_size.step_flops(params, img, txt) - attention


def _toy_args() -> argparse.Namespace:
    return argparse.Namespace(hidden=64, heads=2, depth=1, single=1)


@pytest.mark.parametrize("kind", ["int8", "fp8", "q8_0", "q4_0"])
def test_full_size_estimate_matches_the_built_model(kind):
    params = full_size.flux_params(_toy_args())
    model = full_size.build_quantized(params, kind, 0.02, 0)
    built = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert built == full_size.estimated_bytes(params, kind)
    assert not any(t.is_meta for t in model.parameters())


def test_full_size_random_file_loads_memory_mapped(tmp_path):
    from fluxkit.loading import load_flux_transformer

    params = full_size.flux_params(_toy_args())
    path = full_size.write_random_safetensors(tmp_path / "w.safetensors", params, 0.02, 0)
    assert path.stat().st_size > full_size.estimated_bytes(params, "bf16")  # data + header
    model = load_flux_transformer(path, params=params, dtype=None)
    w = model.double_blocks[0].img_attn.qkv.weight
    assert w.dtype == torch.bfloat16 and abs(w.float().std().item() - 0.02) < 0.002
    assert torch.equal(model.double_blocks[0].img_attn.norm.query_norm.scale, torch.ones(32, dtype=torch.bfloat16))
    mtime = path.stat().st_mtime_ns
    full_size.write_random_safetensors(path, params, 0.02, 0)  # same header: reused, not rewritten
    assert path.stat().st_mtime_ns == mtime


def test_diagnose_tiny_swaps_the_object_word_and_perturbs_latents_as_documented():
    import random

    from benchmarks.diagnose_tiny import COLOURS, SHAPES, blur3, swap_word, token_mean

    rng = random.Random(0)
    swapped = swap_word("a green star on light green", "green", COLOURS, rng)
    assert swapped.endswith("star on light green") and not swapped.startswith("a green")  # the tint stays
    assert swap_word("a red circle", "square", SHAPES, rng) is None
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    pooled = token_mean(z)
    assert torch.allclose(token_mean(pooled), pooled)  # constant on each 2x2 token already
    assert torch.allclose(pooled[..., ::2, ::2], torch.nn.functional.avg_pool2d(z, 2))
    assert torch.allclose(blur3(torch.full((1, 16, 6, 6), 3.0)), torch.full((1, 16, 6, 6), 3.0))
    assert not torch.allclose(blur3(z), z)


def test_diagnose_tiny_synthetic_starts_blind_to_the_caption_and_learns():
    from benchmarks.diagnose_tiny import synthetic_position

    rows = synthetic_position(steps=20, seed=0, log_every=10)
    assert [r[0] for r in rows] == [0, 10, 20]
    assert rows[0][1] == rows[0][2]  # adaLN-Zero init: the output ignores the text, so both captions score alike
    assert rows[-1][1] < rows[0][1]  # the loss falls


def test_diagnose_tiny_synthetic_on_scene_latents_with_varied_captions():
    from benchmarks.diagnose_tiny import synthetic_position

    rows = synthetic_position(steps=4, seed=0, log_every=4, latents="scenes", captions="varied", scenes=96)
    assert [r[0] for r in rows] == [0, 4]
    assert rows[0][1] == rows[0][2]  # the true and mirrored captions differ, the zero-init output does not
    assert rows[-1][1] < rows[0][1]
    for captions in ("anchored", "curriculum"):  # the two schedules that fix the appearance in some scenes
        reported: list[tuple] = []
        rows = synthetic_position(steps=4, seed=0, log_every=2, latents="scenes", captions=captions, scenes=96,
                                  report=lambda *row, out=reported: out.append(row))
        assert reported == rows and rows[-1][1] < rows[0][1]
    with pytest.raises(ValueError, match="flat latents"):
        synthetic_position(steps=1, seed=0, latents="flat", captions="varied")
    with pytest.raises(ValueError, match="captions must be one of|latents must be one of"):
        synthetic_position(steps=1, seed=0, captions="nope")


def test_diagnose_tiny_prior_finds_red_where_the_estimate_puts_it(monkeypatch):
    from benchmarks.diagnose_tiny import red_centroid
    from fluxkit import FluxPipeline

    pipe = FluxPipeline.from_pretrained("fluxkit-tiny-dev", torch_dtype=torch.float32, device="cpu")
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    left = torch.where(torch.arange(128) < 32, 1.0, 0.0)[None, None, :] * red  # red in the left quarter
    monkeypatch.setattr(pipe.vae, "decode", lambda z: left.expand(len(z), 3, 128, 128) - (left == 0).float())
    x, y, mass = red_centroid(pipe, "a large red square on the left", 2, seed=0)
    assert x == pytest.approx(0.125, abs=0.01) and y == pytest.approx(0.5, abs=0.01) and mass > 0


def test_diagnose_tiny_denoise_recovers_nearly_clean_scenes_and_not_pure_noise():
    from benchmarks.diagnose_tiny import denoise_checks
    from fluxkit import FluxPipeline

    pipe = FluxPipeline.from_pretrained("fluxkit-tiny-dev", torch_dtype=torch.float32, device="cpu")
    torch.set_num_threads(1)
    rows = denoise_checks(pipe, 8, (0.02, 1.0), seed=11)
    assert set(rows[0.02]) >= {"pass", "colour", "shape"}
    assert rows[0.02]["pass"] >= 0.75  # x_t is almost x0: the estimate decodes to the scene
    assert rows[1.0]["shape"] < rows[0.02]["shape"]  # from pure noise, the estimate is a blurred average


def test_diagnose_tiny_context_compares_a_kontext_prediction_with_no_context_and_a_copy(tmp_path):
    from PIL import Image

    from benchmarks.diagnose_tiny import context_losses
    from fluxkit import FluxPipeline

    pipe = FluxPipeline.from_pretrained("fluxkit-tiny-dev", torch_dtype=torch.float32, device="cpu")
    torch.set_num_threads(1)
    rows = context_losses(pipe, 4, (0.3, 0.9), repeats=1, seed=11, out=tmp_path / "x0.png")
    assert list(rows) == [0.3, 0.9]
    for row in rows.values():
        assert set(row) == {"with context", "without context", "copy the context"}
        assert row["with context"] != row["without context"]  # the context tokens reach the prediction
    assert rows[0.3]["copy the context"] == rows[0.9]["copy the context"] > 0  # an edit changes the scene
    assert rows[0.9]["without context"] > rows[0.3]["without context"]  # more noise, less known
    grid = Image.open(tmp_path / "x0.png")
    assert grid.height > 4 * 128  # context, two estimates, target


def test_diagnose_tiny_encoder_distances_end_at_the_states_the_models_read():
    from benchmarks.diagnose_tiny import encoder_distances
    from fluxkit.text import MiniLMEncoder

    a, b = "a large red square on the left", "a large red square on the right"
    rows = encoder_distances((("same", a, a), ("left / right", a, b)))
    assert len(rows["same"]) == 7 and all(d == 0 for d in rows["same"])  # embeddings + 6 layers
    assert all(d > 0 for d in rows["left / right"])
    encoder = MiniLMEncoder.from_package(torch.float32)
    seq, _ = encoder.encode([a, b], None, 32)  # what txt_in receives
    real = encoder.tokenizer([a], 32)[1][0].bool()
    x, y = seq[0][real], seq[1][real]
    last = float((x - y).norm(dim=-1).max() / x.norm(dim=-1).mean())
    assert rows["left / right"][-1] == pytest.approx(last, rel=1e-4)


def test_diagnose_tiny_signs_scores_the_true_word_against_another_and_learns(capsys):
    from benchmarks.diagnose_tiny import main, synthetic_signs

    runs = {}
    for boards in ("fixed", "placed", "moved", "varied"):
        rows = runs[boards] = synthetic_signs(steps=4, seed=0, log_every=4, boards=boards, blocks=(1, 2), scenes=96)
        assert [r[0] for r in rows] == [0, 4]
        assert rows[0][1] == rows[0][2]  # zero-init output: the two words score alike
        assert rows[-1][1] < rows[0][1] and rows[-1][1] != rows[-1][2]  # it learns, and the word now matters
    assert len({runs[b][0][1] for b in runs}) == 4  # each setting draws other images
    half = synthetic_signs(steps=4, seed=0, log_every=4, boards="fixed", blocks=(1, 2), scenes=96, score_t=0.5)
    assert half[0][1] == pytest.approx(runs["fixed"][0][1], rel=0.05)  # a zero output scores |noise - x0|^2 at any t
    assert half[-1][1] != runs["fixed"][-1][1]  # the same trained model, scored at another noise level
    with pytest.raises(ValueError, match="boards must be one of"):
        synthetic_signs(steps=1, seed=0, boards="nope")
    assert main(["signs", "--blocks", "1", "2", "--steps", "1", "--train-scenes", "80"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "t = 1.0" in out[0] and len(out) == 2 and out[1].split()[0] == "0"


def test_diagnose_tiny_relation_scenes_hold_the_relation_their_caption_states():
    from benchmarks.diagnose_tiny import RELATION_CELLS, relation_scenes
    from fluxkit.data.captions import INVERSE
    from fluxkit.data.scenes import relation_of

    for layout in ("placed", "fixed", "varied"):
        scenes, true, other = relation_scenes(layout, seed=0, n=24)
        assert len(scenes) == len(true) == len(other) == 24
        assert {s.relation for s in scenes} == {"above", "below", "left of", "right of"}
        for scene, t, o in zip(scenes, true, other, strict=True):
            assert t != o
            if layout == "placed":
                assert tuple(ob.position for ob in scene.objects) == RELATION_CELLS[scene.relation]
            else:
                assert relation_of(*scene.objects) == scene.relation
            if layout != "varied":
                assert [(ob.colour, ob.shape) for ob in scene.objects] == [("red", "circle"), ("blue", "square")]
                assert scene.background == "white"
                word = {"above": "above", "below": "below", "left of": "left", "right of": "right"}
                assert word[scene.relation] in t.split() and word[INVERSE[scene.relation]] in o.split()
    with pytest.raises(ValueError, match="layout must be one of"):
        relation_scenes("nope", seed=0, n=4)


def test_diagnose_tiny_relations_cli_trains_and_scores(capsys):
    from benchmarks.diagnose_tiny import main

    assert main(["relations", "--layout", "placed", "--blocks", "1", "2", "--steps", "2", "--train-scenes", "80"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "t = 1.0" in out[0] and len(out) == 2
    step, true, inverse = out[1].split()
    assert step == "0" and true == inverse  # zero-init output: both relations score alike before training


def test_diagnose_tiny_synthetic_cli_draws_the_scenes_it_is_told(capsys):
    from benchmarks.diagnose_tiny import main

    args = ["synthetic", "--latents", "scenes", "--captions", "varied", "--blocks", "1", "2", "--steps", "1"]
    with pytest.raises(ValueError, match="must exceed the 64 held-out"):
        main([*args, "--train-scenes", "64"])
    capsys.readouterr()
    assert main([*args, "--train-scenes", "80"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert len(rows) == 1 and rows[0][0] == "0" and rows[0][1] == rows[0][2]  # step 0: zero-init output


def test_diagnose_tiny_synthetic_can_start_from_a_trained_base():
    from benchmarks.diagnose_tiny import synthetic_position

    kwargs = dict(steps=0, seed=0, latents="scenes", captions="varied", scenes=96, blocks=(3, 6))
    fresh = synthetic_position(**kwargs)[0]
    trained = synthetic_position(**kwargs, init="fluxkit-tiny-schnell")[0]  # the shipped depth, no guidance input
    assert trained[1] < 0.5 * fresh[1]  # its weights already draw the scenes' colours and backgrounds
    assert trained[1] != trained[2]  # and read the caption, unlike the zero-initialised output
    with pytest.raises(ValueError, match="not a tiny base"):
        synthetic_position(**kwargs, init="fluxkit-tiny-dev")  # it has a guidance embedding


def test_compare_probes_pairs_items_and_splits_sign_text(tmp_path, capsys):
    import json

    from benchmarks.compare_probes import compare_probes, main

    def item(attribute, caption, ok):
        return {"attribute": attribute, "caption": caption, "counterfactual": caption + "?",
                "error_true": 1.0, "error_counterfactual": 2.0 if ok else 0.5}

    spec = [("colour", "a red circle", True, False), ("colour", "a blue square", True, True),
            ("text", "a sign that says 'OPEN'", False, True), ("text", "a sign that says 'XKZ'", True, True),
            ("text", "a sign reading 'STOP'", False, True)]
    for name, col in (("a", 2), ("b", 3)):
        (tmp_path / name).mkdir()
        items = [item(s[0], s[1], s[col]) for s in spec]
        (tmp_path / name / "probe.json").write_text(json.dumps({"summary": {}, "items": items}))
    rows = compare_probes(tmp_path / "a", tmp_path / "b")
    assert list(rows) == ["colour", "text, listed", "text, random", "overall"]
    assert rows["colour"] | {"p": 0} == {"n": 2, "a": 2, "b": 1, "only_a": 1, "only_b": 0, "p": 0}
    assert rows["text, listed"]["only_b"] == 2 and rows["text, random"]["n"] == 1
    assert rows["overall"]["only_a"] == 1 and rows["overall"]["only_b"] == 2 and rows["overall"]["p"] == 1.0
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "text, listed" in capsys.readouterr().out
    other = json.loads((tmp_path / "b" / "probe.json").read_text())
    other["items"][0]["caption"] = "a green star"
    (tmp_path / "b" / "probe.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="probed different items"):
        compare_probes(tmp_path / "a", tmp_path / "b")
    with pytest.raises(SystemExit, match="no probe.json"):
        main([str(tmp_path / "a"), str(tmp_path / "missing")])
