"""GGML block codecs against the gguf package's numpy reference, and .gguf files written by that package."""

from __future__ import annotations

from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch

from fluxkit import gguf as ggml
from fluxkit.loading import CheckpointError
from fluxkit.model import Flux
from fluxkit.params import TEST_FLUX
from fluxkit.quant import GGUFLinear, load_quantized_transformer

# Relative RMS error of each type on Gaussian weights (measured: q8_0 0.005, q6_k 0.018, q5_k 0.036, q5_1 0.038,
# q5_0 0.043, q4_k 0.072, q4_1 0.078, q4_0 0.086), with some headroom.
MAX_REL_ERROR = {"f32": 0.0, "f16": 1e-3, "bf16": 5e-3, "q8_0": 0.008, "q6_k": 0.025, "q5_k": 0.045, "q5_1": 0.05,
                 "q5_0": 0.05, "q4_k": 0.085, "q4_1": 0.095, "q4_0": 0.1}
NUMPY_QUANTIZES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # gguf 0.19 has no K quantizers


def ggml_type(qtype: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[qtype.upper()]


@pytest.fixture(scope="module")
def weights() -> torch.Tensor:
    """[64, 512] Gaussian rows, plus the blocks that break naive code: all zero, constant, one outlier, negative."""
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    w[1, :256] = 0
    w[2, :256] = 0.01
    w[3, 7] = 1.5
    w[4, :256] = -w[4, :256].abs()
    return w


@pytest.mark.parametrize("qtype", list(ggml.QTYPES))
def test_codec_matches_the_gguf_reference(weights, qtype):
    packed = ggml.quantize(weights, qtype)
    assert packed.dtype == torch.uint8 and packed.shape == (64, ggml.row_bytes(512, qtype))
    ours = ggml.dequantize(packed, qtype)
    reference = gguf.quants.dequantize(packed.numpy(), ggml_type(qtype))
    np.testing.assert_array_equal(ours.numpy(), reference)  # float32 dequantization is ggml's arithmetic exactly
    if qtype in NUMPY_QUANTIZES:  # and our quantizers make the same bytes as gguf's
        np.testing.assert_array_equal(packed.numpy(), gguf.quants.quantize(weights.numpy(), ggml_type(qtype))
                                      .view(np.uint8).reshape(packed.shape))
    rows = weights[5:]  # the Gaussian rows
    assert ((ours[5:] - rows).norm() / rows.norm()).item() <= MAX_REL_ERROR[qtype]
    assert torch.equal(ours[1, :256], torch.zeros(256))  # an all-zero block stays exactly zero


def test_k_quants_beat_the_legacy_types_of_the_same_size(weights):
    def err(qtype):
        return (ggml.dequantize(ggml.quantize(weights[5:], qtype), qtype) - weights[5:]).norm().item()

    assert err("q4_k") < err("q4_0") and err("q5_k") < err("q5_0") and err("q6_k") < err("q5_k") < err("q4_k")


@pytest.mark.parametrize("qtype", ["q8_0", "q4_1", "q5_0", "q4_k", "q5_k", "q6_k"])
def test_bf16_dequantization_costs_almost_nothing(weights, qtype):
    packed = ggml.quantize(weights, qtype)
    exact, fast = ggml.dequantize(packed, qtype), ggml.dequantize(packed, qtype, torch.bfloat16)
    assert fast.dtype == torch.bfloat16
    # bf16 math rounds the block scale (and min) once more than the float32 values rounded to bf16 do; measured
    # against the original weights that costs at most 5% more error than those ideal bf16 weights (q8_0: 4%).
    ideal = (exact.bfloat16().float() - weights).norm()
    assert (fast.float() - weights).norm() <= 1.05 * ideal


def test_codec_errors_are_precise():
    with pytest.raises(ValueError, match="qtype must be one of"):
        ggml.quantize(torch.zeros(4, 32), "q3_k")
    with pytest.raises(ValueError, match="does not split into q4_k blocks of 256"):
        ggml.quantize(torch.zeros(4, 96), "q4_k")
    with pytest.raises(ValueError, match="packed q8_0 data must be uint8"):
        ggml.dequantize(torch.zeros(4, 33, dtype=torch.uint8), "q8_0")


# ---------------------------------------------------------------------------------------------------------------------
# Files

K_PARAMS = replace(TEST_FLUX, hidden_size=256, num_heads=2, axes_dim=(16, 56, 56))  # rows split into 256-blocks
FULL_PRECISION = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")


def city96_style_gguf(model: Flux, path, qtype: str, prefix: str = "") -> None:
    """A file written the way city96's tools/convert.py writes one: the gguf package's GGUFWriter, blocks quantized
    with gguf.quants.quantize, 1-D tensors and the embedders/final layer kept in F32."""
    writer = gguf.GGUFWriter(path=None, arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, t in model.state_dict().items():
        keep = t.ndim == 1 or any(key.startswith(name) for name in FULL_PRECISION)
        target = gguf.GGMLQuantizationType.F32 if keep else ggml_type(qtype)
        data = gguf.quants.quantize(t.float().numpy(), target)
        writer.add_tensor(prefix + key, data, raw_dtype=target)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_written_by_the_gguf_package_loads_and_matches(tmp_path):
    torch.manual_seed(0)
    model = Flux(K_PARAMS).eval()
    path = tmp_path / "flux-q5_1.gguf"
    city96_style_gguf(model, path, "q5_1", prefix="model.diffusion_model.")  # ComfyUI prefixes are accepted too
    loaded = load_quantized_transformer(path, params=K_PARAMS, dtype=torch.float32)

    reader = gguf.GGUFReader(path)
    expected = {t.name.removeprefix("model.diffusion_model."): t for t in reader.tensors}
    quantized = {name: m for name, m in loaded.named_modules() if isinstance(m, GGUFLinear)}
    assert quantized and all(m.qtype == "q5_1" for m in quantized.values())
    assert not any(name.startswith(FULL_PRECISION) for name in quantized)
    for name, m in quantized.items():
        t = expected[f"{name}.weight"]
        assert tuple(int(n) for n in t.shape) == (m.in_features, m.out_features)  # GGUF lists dims fastest-first
        reference = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(m.dequantize(torch.float32).numpy(), reference)

    # The whole model equals one built from the numpy-dequantized weights.
    sd = {key: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()) for key, t in expected.items()}
    reference_model = Flux(K_PARAMS).eval()
    reference_model.load_state_dict(sd)
    inputs = dict(img=torch.randn(1, 8, 64), img_ids=torch.zeros(1, 8, 3), txt=torch.randn(1, 4, 48),
                  txt_ids=torch.zeros(1, 4, 3), timesteps=torch.rand(1), y=torch.randn(1, 32), guidance=torch.ones(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), reference_model(**inputs), rtol=1e-5, atol=1e-6)


def test_our_files_read_back_with_the_gguf_package(tmp_path):
    path = tmp_path / "t.gguf"
    w = torch.randn(6, 64)
    specs = [("a.weight", "q4_0", (6, 64)), ("a.bias", "f32", (6,))]
    data = {"a.weight": ggml.quantize(w, "q4_0"), "a.bias": ggml.quantize(torch.arange(6.0), "f32")}
    ggml.write_gguf(path, specs, data.__getitem__)
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "flux"
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["a.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert tensors["a.weight"].shape.tolist() == [64, 6]  # ne order
    np.testing.assert_array_equal(gguf.quants.dequantize(tensors["a.weight"].data, tensors["a.weight"].tensor_type),
                                  ggml.dequantize(data["a.weight"], "q4_0").numpy())
    ours, metadata = ggml.read_gguf(path)
    assert ours["a.bias"].shape == (6,) and torch.equal(ours["a.bias"].dequantize(), torch.arange(6.0))
    assert metadata["general.architecture"] == "flux"


def test_unreadable_files_are_checkpoint_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        ggml.read_gguf(bad)

    other = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(path=other, arch="llama")
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="general.architecture is 'llama'"):
        load_quantized_transformer(other)

    q2 = tmp_path / "q2k.gguf"
    writer = gguf.GGUFWriter(path=q2, arch="flux")
    writer.add_tensor("img_in.weight", np.zeros((4, 84), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q2_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"img_in.weight \(Q2_K\)"):
        ggml.read_gguf(q2)
