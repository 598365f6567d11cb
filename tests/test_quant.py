"""Weight-only quantization: per-kind accuracy on a tiny Flux, the quantized linears' contract, save/reload without
re-quantizing, strict loading, ComfyUI fp8 files, GGUF conversion, T5 and the pipeline hook."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fluxkit import gguf as ggml
from fluxkit.loading import CheckpointError, save_bfl
from fluxkit.model import Flux
from fluxkit.params import TEST_FLUX
from fluxkit.quant import (
    FLUX_FULL_PRECISION,
    KINDS,
    GGUFLinear,
    QuantLinear,
    ScaledLinear,
    convert_to_gguf,
    load_quantized_transformer,
    quantize_linear,
    quantize_model,
    quantize_module,
    save_quantized,
)

K_PARAMS = replace(TEST_FLUX, hidden_size=256, num_heads=2, axes_dim=(16, 56, 56))  # every block row splits into 256s
# Relative output error of the tiny model per kind, ~2.5x the measured values (q8_0 .0017, int8 .0024, q6_k .0058,
# fp8 .0086, fp8_channel .0093, q5_k .0132, q5_1 .0140, q5_0 .0142, q4_k .0253, q4_1 .0276, q4_0 .0316).
MAX_OUTPUT_ERROR = {"q8_0": 0.005, "int8": 0.006, "q6_k": 0.015, "fp8": 0.025, "fp8_channel": 0.025, "q5_k": 0.035,
                    "q5_1": 0.035, "q5_0": 0.035, "q4_k": 0.065, "q4_1": 0.07, "q4_0": 0.08}


def random_flux(params=K_PARAMS, seed=0) -> Flux:
    """Weights with std 0.8/sqrt(fan_in): every layer moves the output, and weight errors are neither amplified
    chaotically (std >= 1/sqrt(fan_in)) nor washed out."""
    torch.manual_seed(seed)
    model = Flux(params).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.8 / p.shape[-1] ** 0.5)
    return model


def inputs(params=K_PARAMS, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return dict(img=torch.randn(1, 16, params.in_channels, generator=g), img_ids=ids.reshape(1, 16, 3),
                txt=torch.randn(1, 8, params.context_in_dim, generator=g), txt_ids=torch.zeros(1, 8, 3),
                timesteps=torch.tensor([0.7]), y=torch.randn(1, params.vec_in_dim, generator=g),
                guidance=torch.tensor([3.5]))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def model() -> Flux:
    return random_flux()


@pytest.fixture(scope="module")
def reference(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs())


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_stays_close_to_the_full_precision_model(model, reference, kind):
    quantized = quantize_model(copy.deepcopy(model), kind)
    with torch.no_grad():
        err = rel_error(quantized(**inputs()), reference)
    assert 1e-5 < err < MAX_OUTPUT_ERROR[kind]  # changed (it is quantized), but not by much


def test_more_bits_mean_less_error(model, reference):
    with torch.no_grad():
        errors = [rel_error(quantize_model(copy.deepcopy(model), kind)(**inputs()), reference)
                  for kind in ("q4_0", "q4_k", "q5_k", "q6_k", "q8_0")]
    assert errors == sorted(errors, reverse=True)


def test_blocks_are_quantized_and_the_ends_are_not(model):
    quantized = quantize_model(copy.deepcopy(model), "q8_0")
    swapped = [name for name, m in quantized.named_modules() if isinstance(m, GGUFLinear)]
    kept = [name for name, m in quantized.named_modules() if type(m) is nn.Linear]
    assert len(swapped) == 10 * K_PARAMS.depth + 3 * K_PARAMS.depth_single_blocks  # 5 per stream, 3 per single
    assert all(name.startswith(("double_blocks.", "single_blocks.")) for name in swapped)
    assert kept and all(name.startswith(FLUX_FULL_PRECISION) for name in kept)
    assert quantized.dtype == torch.float32  # still read from img_in


def test_int8_and_fp8_match_a_straightforward_reference():
    linear = nn.Linear(64, 24)
    w = linear.weight.detach()
    s = w.abs().amax(dim=1, keepdim=True) / 127
    assert torch.equal(quantize_linear(linear, "int8").dequantize(torch.float32), (w / s).round().clamp(-127, 127) * s)
    s = w.abs().amax() / 448
    expected = (w / s).to(torch.float8_e4m3fn).float() * s
    assert torch.equal(quantize_linear(linear, "fp8").dequantize(torch.float32), expected)
    s = w.abs().amax(dim=1, keepdim=True) / 448
    expected = (w / s).to(torch.float8_e4m3fn).float() * s
    assert torch.allclose(quantize_linear(linear, "fp8_channel").dequantize(torch.float32), expected, rtol=1e-6)
    for kind in ("int8", "fp8_channel"):  # an all-zero row must not turn into NaN
        zero = nn.Linear(32, 2)
        with torch.no_grad():
            zero.weight[0] = 0
        assert torch.equal(quantize_linear(zero, kind).dequantize(torch.float32)[0], torch.zeros(32))


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_bit_moves_equal_torchs_cast_for_every_code(fp8):
    from fluxkit.quant import _float8_as_float16

    codes = torch.arange(256, dtype=torch.uint8).view(fp8)
    expected = codes.float()
    finite = expected.isfinite()  # e4m3fn's two NaN codes are rejected at load; e5m2's inf/NaN pass through as such
    values, factor = _float8_as_float16(codes)
    got = values.float() * factor
    assert torch.equal(got[finite], expected[finite])
    assert torch.equal(got.view(torch.int32)[128:].sign(), torch.full((128,), -1, dtype=torch.int32))  # sign bit kept


@pytest.mark.parametrize("kind", ["int8", "fp8", "fp8_channel", "q4_k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_is_a_matmul_with_the_dequantized_weight(kind, dtype):
    q = quantize_linear(nn.Linear(256, 40), kind).to(dtype)
    x = torch.randn(2, 5, 256, dtype=dtype)
    expected = F.linear(x.float(), q.dequantize(torch.float32), q.bias.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_error(q(x), expected) < tol and q(x).dtype == dtype and q(x).shape == (2, 5, 40)


def test_module_to_dtype_casts_the_bias_but_never_the_stored_weight():
    q = quantize_linear(nn.Linear(64, 8), "fp8")
    codes, scale = q.weight.clone(), q.scale_weight.clone()
    q.to(torch.bfloat16)
    assert q.weight.dtype == torch.float8_e4m3fn and torch.equal(q.weight.view(torch.uint8), codes.view(torch.uint8))
    assert q.scale_weight.dtype == torch.float32 and torch.equal(q.scale_weight, scale)
    assert q.bias.dtype == torch.bfloat16 and q.dtype == torch.bfloat16 and q.dequantize().dtype == torch.bfloat16
    g = quantize_linear(nn.Linear(64, 8), "q4_0").half()
    assert g.weight.dtype == torch.uint8 and g.dtype == torch.float16


class ToyLoRA(nn.Module):
    """What fluxkit's LoRA relies on: any module with in_features, out_features and forward(x)."""

    def __init__(self, base: nn.Module, rank: int = 4):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


@pytest.mark.parametrize("kind", ["int8", "fp8", "q5_k"])
def test_a_lora_wraps_any_quantized_linear(kind):
    base = quantize_linear(nn.Linear(256, 16), kind)
    lora = ToyLoRA(base)
    x = torch.randn(3, 256)
    assert torch.equal(lora(x), base(x))  # zero-initialised up projection: no change
    lora(x).square().sum().backward()
    assert lora.up.weight.grad.abs().sum() > 0
    assert [name for name, _ in base.named_parameters()] == ["bias"]  # the quantized weight is a buffer: no grad
    with torch.no_grad():
        lora.up.weight.normal_()
    assert not torch.allclose(lora(x), base(x))


def test_bad_quantization_requests_are_precise_value_errors(model):
    with pytest.raises(ValueError, match="kind must be one of"):
        quantize_model(copy.deepcopy(model), "int4")
    with pytest.raises(ValueError, match="skip must include 'img_in'"):
        quantize_model(copy.deepcopy(model), "int8", skip=("txt_in",))
    with pytest.raises(ValueError, match=r"skip entries \['img_inn'\] match no module"):
        quantize_model(copy.deepcopy(model), "int8", skip=("img_in", "img_inn"))
    with pytest.raises(ValueError, match="not the string"):
        quantize_module(copy.deepcopy(model), "int8", skip="img_in")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(quantize_model(copy.deepcopy(model), "int8"), "q8_0")
    with pytest.raises(ValueError, match="q4_k needs in_features divisible by 256"):
        quantize_model(random_flux(TEST_FLUX), "q4_k")  # hidden size 32
    with pytest.raises(ValueError, match="takes a fluxkit Flux"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "int8")


# ---------------------------------------------------------------------------------------------------------------------
# Saving and loading


@pytest.mark.parametrize("kind", ["int8", "fp8", "fp8_channel", "q8_0", "q4_k", "q5_1"])
def test_save_and_reload_is_bit_identical(model, kind, tmp_path):
    quantized = quantize_model(copy.deepcopy(model), kind)
    path = save_quantized(quantized, tmp_path / ("m.gguf" if kind.startswith("q") else "m.safetensors"))
    loaded = load_quantized_transformer(path, params=K_PARAMS, dtype=torch.float32)
    before, after = quantized.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for key, t in before.items():
        assert after[key].dtype == t.dtype and torch.equal(after[key].reshape(-1).view(torch.uint8),
                                                           t.reshape(-1).view(torch.uint8)), key
    with torch.no_grad():
        assert torch.equal(loaded(**inputs()), quantized(**inputs()))
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as f:
            assert f.metadata()["fluxkit.quantization"] == kind
            assert ("scaled_fp8" in f.keys()) == (kind == "fp8")  # ComfyUI's marker for per-tensor fp8  # noqa: SIM118


def test_saving_needs_a_quantized_model_and_the_right_suffix(model, tmp_path):
    with pytest.raises(ValueError, match="no quantized layers"):
        save_quantized(model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="saved as a .gguf file"):
        save_quantized(quantize_model(copy.deepcopy(model), "q8_0"), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="saved as a .safetensors file"):
        save_quantized(quantize_model(copy.deepcopy(model), "int8"), tmp_path / "m.gguf")


@pytest.fixture(scope="module")
def int8_file(model, tmp_path_factory):
    return save_quantized(quantize_model(copy.deepcopy(model), "int8"), tmp_path_factory.mktemp("q") / "m.safetensors")


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("single_blocks.0.linear2.bias"), r"missing keys: single_blocks\.0\.linear2\.bias"),
    (lambda sd: sd.update(extra=torch.zeros(2)), "unexpected keys: extra"),
    (lambda sd: sd.update({"txt_in.scale_weight": torch.ones(256)}), r"unexpected keys: txt_in\.scale_weight"),
    (lambda sd: sd.pop("double_blocks.0.img_mlp.0.scale_weight"), r"has no double_blocks\.0\.img_mlp\.0\.scale_w"),
    (lambda sd: sd.update({"final_layer.linear.weight": torch.zeros(64, 128)}), r"wrong shapes: final_layer"),
])
def test_loading_is_strict(int8_file, tmp_path, edit, match):
    sd = load_file(int8_file)
    edit(sd)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=match):
        load_quantized_transformer(tmp_path / "bad.safetensors", params=K_PARAMS)


def test_gguf_loading_is_strict(model, tmp_path):
    path = save_quantized(quantize_model(copy.deepcopy(model), "q8_0"), tmp_path / "m.gguf")
    tensors, _ = ggml.read_gguf(path)
    specs = [(k, t.qtype, t.shape) for k, t in tensors.items() if k != "double_blocks.0.txt_attn.proj.weight"]
    ggml.write_gguf(tmp_path / "cut.gguf", specs, lambda key: tensors[key].data)
    with pytest.raises(CheckpointError, match=r"missing keys: double_blocks\.0\.txt_attn\.proj\.weight"):
        load_quantized_transformer(tmp_path / "cut.gguf", params=K_PARAMS)


def comfy_scaled_fp8(model: Flux) -> dict[str, torch.Tensor]:
    """The layout of ComfyUI's scaled-fp8 FLUX.1 file (keys as recorded from comfyanonymous/flux_dev_scaled_fp8_test):
    every linear (img_in and final_layer too) float8 with a scalar fp32 scale_weight and scale_input, float8 biases,
    bf16 norm scales, the `scaled_fp8` marker, all under `model.diffusion_model.`."""
    sd = {}
    for key, t in model.state_dict().items():
        if key.endswith(".weight"):
            layer = key.removesuffix(".weight")
            scale = t.abs().amax() / 448
            sd[key] = (t / scale).to(torch.float8_e4m3fn)
            sd[f"{layer}.scale_weight"], sd[f"{layer}.scale_input"] = scale.float(), torch.tensor(1.25)
        else:
            sd[key] = t.to(torch.float8_e4m3fn if key.endswith(".bias") else torch.bfloat16)
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return {f"model.diffusion_model.{k}": v for k, v in sd.items()}


def test_comfyui_scaled_fp8_files_load(model, tmp_path):
    sd = comfy_scaled_fp8(model)
    save_file(sd, tmp_path / "flux-fp8-scaled.safetensors")
    loaded = load_quantized_transformer(tmp_path / "flux-fp8-scaled.safetensors", params=K_PARAMS,
                                        dtype=torch.float32)
    assert type(loaded.img_in) is nn.Linear  # dequantized: Flux reads its dtype from it
    fp8 = {name: m for name, m in loaded.named_modules() if isinstance(m, ScaledLinear)}
    assert len(fp8) == sum(1 for k in sd if k.endswith(".scale_weight")) - 1
    assert all(m.kind == "fp8" and m.scale_weight.ndim == 0 for m in fp8.values())

    # Reference: the same numbers dequantized by hand into an ordinary model.
    plain = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()}
    dense = {}
    for key, t in plain.items():
        if key.endswith(".weight"):
            dense[key] = t.float() * plain[key.removesuffix(".weight") + ".scale_weight"]
        elif not key.endswith((".scale_weight", ".scale_input")) and key != "scaled_fp8":
            dense[key] = t.float()
    reference = Flux(K_PARAMS).eval()
    reference.load_state_dict(dense)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()), reference(**inputs()), rtol=1e-4, atol=1e-5)

    nan = dict(sd)
    nan["model.diffusion_model.single_blocks.0.linear1.weight"][0, 0] = float("nan")
    save_file(nan, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="NaN float8 codes"):
        load_quantized_transformer(tmp_path / "nan.safetensors", params=K_PARAMS)


def test_plain_fp8_and_plain_bfl_files_load(model, tmp_path):
    fp8 = {k: (v.to(torch.float8_e4m3fn) if k.endswith(".weight") and not k.startswith("img_in") else v)
           for k, v in model.state_dict().items()}
    save_file(fp8, tmp_path / "fp8.safetensors")
    loaded = load_quantized_transformer(tmp_path / "fp8.safetensors", params=K_PARAMS, dtype=torch.float32)
    layer = loaded.double_blocks[0].img_attn.qkv
    assert isinstance(layer, ScaledLinear) and layer.scale_weight.item() == 1.0
    assert torch.equal(layer.dequantize(torch.float32), fp8["double_blocks.0.img_attn.qkv.weight"].float())

    save_bfl(model, tmp_path / "bf.safetensors")  # nothing quantized: loading.load_flux_transformer's job
    plain = load_quantized_transformer(tmp_path / "bf.safetensors", params=K_PARAMS, dtype=torch.float32)
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))


def test_convert_to_gguf_from_a_checkpoint_and_from_a_model(model, reference, tmp_path):
    save_bfl(model, tmp_path / "flux.safetensors")
    path = convert_to_gguf(tmp_path / "flux.safetensors", tmp_path / "flux-q4_k.gguf", "q4_k", params=K_PARAMS)
    assert path.read_bytes()[:4] == b"GGUF"
    loaded = load_quantized_transformer(path, params=K_PARAMS, dtype=torch.float32)
    kinds = {m.kind for m in loaded.modules() if isinstance(m, QuantLinear)}
    with torch.no_grad():
        assert kinds == {"q4_k"} and rel_error(loaded(**inputs()), reference) < MAX_OUTPUT_ERROR["q4_k"]

    f16 = load_quantized_transformer(convert_to_gguf(model, tmp_path / "flux-f16.gguf", "f16"), params=K_PARAMS,
                                     dtype=torch.float32)
    assert not any(isinstance(m, QuantLinear) for m in f16.modules())  # float types load as ordinary weights
    with torch.no_grad():
        assert rel_error(f16(**inputs()), reference) < 1e-3
    with pytest.raises(ValueError, match="dst must be a .gguf path"):
        convert_to_gguf(model, tmp_path / "x.safetensors", "q8_0")
    with pytest.raises(ValueError, match="qtype must be one of"):
        convert_to_gguf(model, tmp_path / "x.gguf", "int8")


def test_t5_encoder_quantizes_and_keeps_wo(tmp_path):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=50, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=8)).eval()
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        reference = t5(input_ids=ids).last_hidden_state
        for kind in ("int8", "q8_0"):
            quantized = quantize_module(copy.deepcopy(t5), kind)
            layers = dict(quantized.named_modules())
            assert type(layers["encoder.block.0.layer.1.DenseReluDense.wo"]) is nn.Linear  # _keep_in_fp32_modules
            assert isinstance(layers["encoder.block.0.layer.1.DenseReluDense.wi_0"], QuantLinear)
            assert isinstance(layers["encoder.block.1.layer.0.SelfAttention.q"], QuantLinear)
            assert rel_error(quantized(input_ids=ids).last_hidden_state, reference) < 0.01


def test_pipeline_quantize_argument_and_a_quantized_transformer_module(tiny_dev_folder, tmp_path):
    from fluxkit import FluxPipeline

    args = dict(height=32, width=32, num_inference_steps=2, output_type="np", max_sequence_length=16)
    full = FluxPipeline.from_pretrained(tiny_dev_folder, torch_dtype=torch.float32)
    image = full("a red circle", generator=torch.Generator().manual_seed(0), **args).images
    pipe = FluxPipeline.from_pretrained(tiny_dev_folder, torch_dtype=torch.float32, quantize="q8_0")
    assert any(isinstance(m, GGUFLinear) for m in pipe.transformer.modules())
    quantized = pipe("a red circle", generator=torch.Generator().manual_seed(0), **args).images
    assert 0 < np.abs(quantized - image).max() < 0.05

    path = save_quantized(pipe.transformer, tmp_path / "transformer-q8_0.gguf")
    module = load_quantized_transformer(path, params=pipe.transformer.params, dtype=torch.float32)
    swapped = FluxPipeline.from_pretrained(tiny_dev_folder, torch_dtype=torch.float32, transformer=module)
    again = swapped("a red circle", generator=torch.Generator().manual_seed(0), **args).images
    assert np.abs(again - quantized).max() < 1e-5  # the same codes (last bits: a memory-mapped vs copied img_in)
    assert {m.kind for m in swapped.transformer.modules() if isinstance(m, QuantLinear)} == {"q8_0"}


@pytest.fixture(scope="module")
def native_folder(tmp_path_factory):
    """A fluxkit folder (bf16, MiniLM text encoder) around a random K_PARAMS-shaped transformer."""
    from fluxkit.autoencoder import AutoEncoder
    from fluxkit.hub import save_native
    from fluxkit.params import TEST_AE, ModelSpec

    params = replace(K_PARAMS, vec_in_dim=384, context_in_dim=384)  # MiniLM's width
    spec = ModelSpec("q", params, TEST_AE, text_encoder="minilm", max_sequence_length=16, default_size=(32, 32))
    folder = tmp_path_factory.mktemp("native") / "full"
    torch.manual_seed(0)
    save_native(folder, random_flux(params), spec, ae=AutoEncoder(TEST_AE))
    return folder, params


@pytest.mark.parametrize("kind, suffix", [("q8_0", ".gguf"), ("int8", ".safetensors")])
def test_a_fluxkit_folder_ships_quantized_and_loads_expanded(native_folder, kind, suffix, tmp_path):
    """`fluxkit convert FOLDER DST --to gguf|int8`: the transformer stored in about half the bytes, the autoencoder
    referenced across folders, and on load plain linears holding exactly the stored codes' weights."""
    from fluxkit import FluxPipeline
    from fluxkit.cli import main
    from fluxkit.quant import quantized_layers

    folder, params = native_folder
    dst = tmp_path / kind
    to = ["--to", "gguf", "--type", kind] if suffix == ".gguf" else ["--to", kind]
    assert main(["convert", str(folder), str(dst), *to]) == 0
    stored = dst / f"transformer-{kind}{suffix}"
    assert sorted(p.name for p in dst.iterdir()) == ["fluxkit.json", stored.name]
    # ~8.5 bits a weight in the blocks; the ends (FLUX_FULL_PRECISION) stay bf16 and are ~1/3 of this tiny model
    assert stored.stat().st_size < 0.7 * (folder / "transformer.safetensors").stat().st_size

    pipe = FluxPipeline.from_pretrained(dst, torch_dtype=torch.float32)
    assert not quantized_layers(pipe.transformer)
    assert all(type(m) is nn.Linear for m in pipe.transformer.modules() if isinstance(m, nn.Linear))
    full = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32).transformer
    kept = load_quantized_transformer(stored, params=params, dtype=torch.float32)
    assert quantized_layers(kept)
    x = inputs(params)
    with torch.no_grad():
        out, ref, codes = pipe.transformer(**x), full(**x), kept(**x)
    assert 0 < rel_error(out, ref) < MAX_OUTPUT_ERROR[kind]
    assert torch.allclose(out, codes, rtol=1e-4, atol=1e-5)  # the expanded weights are the stored codes' weights
    image = pipe("a red circle", num_inference_steps=1, output_type="np", height=32, width=32).images
    assert image.shape == (1, 32, 32, 3)


def test_quantized_folder_requests_are_refused_clearly(native_folder, tmp_path, capsys):
    import json

    from fluxkit import FluxPipeline
    from fluxkit.cli import main
    from fluxkit.hub import quantize_native

    folder, _ = native_folder
    with pytest.raises(ValueError, match="kind must be one of"):
        quantize_native(folder, tmp_path / "a", "q3_x")
    with pytest.raises(ValueError, match="not a fluxkit folder"):
        quantize_native(tmp_path, tmp_path / "a", "int8")
    assert main(["convert", str(folder), str(tmp_path / "b"), "--to", "diffusers"]) != 0
    assert "is a fluxkit folder: it converts to a quantized folder" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    quantize_native(folder, tmp_path / "q", "q8_0")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_native(tmp_path / "q", tmp_path / "qq", "int8")
    meta = json.loads((tmp_path / "q" / "fluxkit.json").read_text())
    (tmp_path / "q" / "fluxkit.json").write_text(json.dumps({**meta, "dequantize": "yes"}))
    with pytest.raises(ValueError, match="'dequantize' must be true or false"):
        FluxPipeline.from_pretrained(tmp_path / "q")
    (tmp_path / "q" / "fluxkit.json").write_text(json.dumps({**meta, "transformer": "gone.gguf"}))
    with pytest.raises(ValueError, match="names the transformer .*gone.gguf, which does not exist"):
        FluxPipeline.from_pretrained(tmp_path / "q")
    lora = {**json.loads((folder / "fluxkit.json").read_text()), "lora": "lora.safetensors"}
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "fluxkit.json").write_text(json.dumps(lora))
    with pytest.raises(ValueError, match="LoRA variant"):
        quantize_native(tmp_path / "v", tmp_path / "vq", "int8")
