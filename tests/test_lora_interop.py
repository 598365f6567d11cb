"""LoRAs in both directions between fluxkit and diffusers' FluxPipeline (with PEFT) on one tiny random Flux folder:
kohya, XLabs and PEFT/diffusers files built here give the same image in both (within 2/255), and a LoRA saved by
fluxkit loads in diffusers with the same image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fluxkit import FluxPipeline
from fluxkit.lora import LoraLoaderMixin, linear_shapes

pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (a test dependency)")

# Until the pipeline inherits the mixin itself.
Pipe = FluxPipeline if issubclass(FluxPipeline, LoraLoaderMixin) else type("Pipe", (LoraLoaderMixin, FluxPipeline), {})
PROMPT = "a red circle above a blue square"
H = 32  # the tiny folder's hidden size


@pytest.fixture(scope="module")
def pair(tiny_dev_folder):
    from diffusers import FluxPipeline as DiffusersFlux

    ours = Pipe.from_pretrained(tiny_dev_folder, torch_dtype=torch.float32)
    ref = DiffusersFlux.from_pretrained(tiny_dev_folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


@pytest.fixture
def clean(pair):
    yield pair
    for pipe in pair:
        pipe.unload_lora_weights()


def _image(pipe, **kw):
    args = dict(height=32, width=48, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=16,
                output_type="np", generator=torch.Generator("cpu").manual_seed(7))
    return pipe(PROMPT, **args, **kw).images


def _rnd(g, *shape):
    return torch.randn(*shape, generator=g) * 0.3


def _same_image_in_both(pair, sd: dict, **load) -> np.ndarray:
    ours, ref = pair
    plain = _image(ours)
    ours.load_lora_weights(dict(sd), **load)
    ref.load_lora_weights(dict(sd), **load)
    a, b = _image(ref), _image(ours)
    assert np.abs(a - b).max() <= 2 / 255
    assert np.abs(b - plain).max() > 0.05, "the LoRA should change the image"
    return b


def test_kohya_lora_with_clip_part(clean):
    ours, _ = clean
    g = torch.Generator().manual_seed(1)
    sd = {}
    # diffusers reads kohya's double and single blocks, except linear1 (it hard-codes FLUX.1-dev's split) and silently
    # drops img_in/txt_in/time_in/vector_in/guidance_in/final_layer (converted without the `transformer.` prefix).
    for name, (out, n_in) in linear_shapes(ours.transformer).items():
        if name.startswith(("double_blocks", "single_blocks")) and "linear1" not in name:
            key = "lora_unet_" + name.replace(".", "_")
            sd.update({f"{key}.lora_down.weight": _rnd(g, 4, n_in), f"{key}.lora_up.weight": _rnd(g, out, 4),
                       f"{key}.alpha": torch.tensor(2.0)})
    for name, (out, n_in) in linear_shapes(ours.text_encoder.clip).items():
        if ".layers." in name:
            key = "lora_te1_text_model_" + name.replace(".", "_")
            sd.update({f"{key}.lora_down.weight": _rnd(g, 2, n_in), f"{key}.lora_up.weight": _rnd(g, out, 2),
                       f"{key}.alpha": torch.tensor(4.0)})
    _same_image_in_both(clean, sd)
    assert ours.get_list_adapters() == {"transformer": ["default_0"], "text_encoder": ["default_0"]}


def test_xlabs_lora(clean):
    g = torch.Generator().manual_seed(2)
    sd = {}
    for lora, rows in (("qkv_lora1", 3 * H), ("proj_lora1", H), ("qkv_lora2", 3 * H), ("proj_lora2", H)):
        sd[f"double_blocks.0.processor.{lora}.down.weight"] = _rnd(g, 4, H)
        sd[f"double_blocks.0.processor.{lora}.up.weight"] = _rnd(g, rows, 4)
    sd["single_blocks.0.processor.qkv_lora.down.weight"] = _rnd(g, 4, H)
    sd["single_blocks.0.processor.qkv_lora.up.weight"] = _rnd(g, 3 * H, 4)
    _same_image_in_both(clean, sd)


def _peft_lora(pair, seed: int) -> dict[str, torch.Tensor]:
    """diffusers-format LoRA: q/k/v slices with their own A, mixed ranks and alphas, norm_out, x_embedder, CLIP."""
    ours, ref = pair
    g = torch.Generator().manual_seed(seed)
    modules = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
               "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.ff_context.net.2",
               "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp",
               "single_transformer_blocks.0.proj_out", "norm_out.linear", "x_embedder",
               "time_text_embed.timestep_embedder.linear_1"]
    sd = {}
    for i, m in enumerate(modules):
        linear, r = ref.transformer.get_submodule(m), 1 + i % 3
        sd.update({f"transformer.{m}.lora_A.weight": _rnd(g, r, linear.in_features),
                   f"transformer.{m}.lora_B.weight": _rnd(g, linear.out_features, r),
                   f"transformer.{m}.alpha": torch.tensor(float(1 + i % 4))})
    for m in ("text_model.encoder.layers.0.self_attn.v_proj", "text_model.encoder.layers.1.mlp.fc1"):
        out, n_in = linear_shapes(ours.text_encoder.clip)[m.removeprefix("text_model.")]
        sd.update({f"text_encoder.{m}.lora_A.weight": _rnd(g, 2, n_in), f"text_encoder.{m}.lora_B.weight":
                   _rnd(g, out, 2), f"text_encoder.{m}.alpha": torch.tensor(2.0)})
    return sd


def test_peft_loras_mixed_and_scaled_per_call(clean):
    ours, ref = clean
    _same_image_in_both(clean, _peft_lora(clean, 3), adapter_name="a")
    _same_image_in_both(clean, _peft_lora(clean, 4), adapter_name="b")
    for pipe in clean:
        pipe.set_adapters(["a", "b"], adapter_weights=[0.6, 1.0])
    assert np.abs(_image(ref) - _image(ours)).max() <= 2 / 255
    with ours.temporary_lora_scale(0.5):
        b = _image(ours)
    a = _image(ref, joint_attention_kwargs={"scale": 0.5})
    # diffusers 0.42 keeps the last call's scale in `_lora_scale` and applies it to the next text-encoder LoRA it loads.
    ref._lora_scale = 1.0
    assert np.abs(a - b).max() <= 2 / 255 and np.abs(b - _image(ours)).max() > 0.02


def test_lora_saved_by_fluxkit_loads_in_diffusers(clean, tmp_path):
    """Every linear module, linear1 and the final layer included: diffusers reads them in fluxkit's saved form."""
    ours, ref = clean
    g = torch.Generator().manual_seed(5)
    sd = {}
    for i, (name, (out, n_in)) in enumerate(linear_shapes(ours.transformer).items()):
        key, r = "lora_unet_" + name.replace(".", "_"), 2 + i % 2
        sd.update({f"{key}.lora_down.weight": _rnd(g, r, n_in), f"{key}.lora_up.weight": _rnd(g, out, r) / 2,
                   f"{key}.alpha": torch.tensor(float(1 + i % 3))})
    sd.update({k: v for k, v in _peft_lora(clean, 6).items() if k.startswith("text_encoder.")})
    ours.load_lora_weights(sd, adapter_name="mine")
    ours.save_lora_weights(tmp_path, adapter_name="mine")
    ref.load_lora_weights(tmp_path, adapter_name="mine")
    assert np.abs(_image(ref) - _image(ours)).max() <= 2 / 255


def test_cli_generate_with_two_loras_and_replay(tiny_dev_folder, clean, tmp_path, monkeypatch):
    import fluxkit.pipeline
    from fluxkit.cli import main
    from fluxkit.imageio import read_params

    monkeypatch.setattr(fluxkit.pipeline, "FluxPipeline", Pipe)  # a no-op once FluxPipeline has the mixin
    ours, _ = clean
    save_file(_peft_lora(clean, 8), tmp_path / "a.safetensors")
    (tmp_path / "b").mkdir()
    save_file({k: v for k, v in _peft_lora(clean, 9).items() if k.startswith("transformer.")},
              tmp_path / "b" / "pytorch_lora_weights.safetensors")
    out = tmp_path / "img.png"
    loras = [f"{tmp_path / 'a.safetensors'}:0.5", str(tmp_path / "b")]
    argv = ["generate", PROMPT, "--model", str(tiny_dev_folder), "--width", "48", "--height", "32", "--steps", "2",
            "--guidance", "3.5", "--seed", "7", "--output", str(out), "--quiet", "--dtype", "fp32"]
    assert main([*argv, "--lora", loras[0], "--lora", loras[1]]) == 0
    assert read_params(out)["lora"] == loras

    ours.load_lora_weights(tmp_path / "a.safetensors", adapter_name="a")
    ours.load_lora_weights(tmp_path / "b", adapter_name="b")
    ours.set_adapters(["a", "b"], [0.5, 1.0])
    want = ours(PROMPT, height=32, width=48, num_inference_steps=2, guidance_scale=3.5,
                generator=[torch.Generator("cpu").manual_seed(7)]).images[0]
    assert np.abs(np.asarray(want, float) - np.asarray(Image.open(out), float)).max() <= 1
    replay = tmp_path / "replay.png"
    assert main(["generate", "--from-image", str(out), "--output", str(replay), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(replay)))
