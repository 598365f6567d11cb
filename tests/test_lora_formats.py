"""Every LoRA format, built here with random tensors for a tiny model: detection, conversion onto BFL modules (the
effective weight delta, probed through the model, equals one computed independently or by diffusers' own
converter), alphas and metadata, control LoRAs, strictness and file reading."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fluxkit.lora import LoraLinear, LoraLoaderMixin, linear_shapes, read_lora
from fluxkit.lora_formats import METADATA_KEY, detect_format
from fluxkit.model import Flux
from fluxkit.params import FluxParams

PARAMS = FluxParams(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=48, hidden_size=32, mlp_ratio=4.0,
                    num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6))
H, MLP = 32, 128


class Holder(LoraLoaderMixin):
    """The two attributes the mixin needs, without a whole pipeline."""

    def __init__(self, clip: nn.Module | None = None, seed: int = 0):
        torch.manual_seed(seed)
        self.transformer = Flux(PARAMS).eval()
        self.text_encoder = SimpleNamespace(clip=clip)


def tiny_clip() -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    cfg = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return CLIPTextModel(cfg).eval()


def rnd(*shape) -> torch.Tensor:
    return torch.randn(*shape) * 0.5


def delta(root: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight delta [out, in], bias delta [out]) the LoRA adds to module `name`, measured by probing it."""
    module = root.get_submodule(name)
    assert isinstance(module, LoraLinear), f"{name} carries no LoRA"
    eye, zero = torch.eye(module.in_features), torch.zeros(1, module.in_features)
    with torch.no_grad():
        bias = module(zero)[0] - module.base(zero)[0]
        return (module(eye) - module.base(eye) - bias).T, bias


def close(a, b) -> bool:
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def swap(t):
    a, b = t.chunk(2)
    return torch.cat((b, a))


def test_detect_format():
    assert detect_format(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]) == "kohya"
    assert detect_format(["diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight"]) == "kohya-comfyui"
    assert detect_format(["lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight"]) == \
        "kohya-diffusers-names"
    assert detect_format(["double_blocks.0.processor.qkv_lora1.down.weight"]) == "xlabs"
    assert detect_format(["img_in.lora_A.weight", "double_blocks.0.img_attn.norm.query_norm.scale"]) == "bfl-control"
    assert detect_format(["base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight"]) == "fal-kontext"
    assert detect_format(["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]) == "diffusers"
    assert detect_format(["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]) == "bfl"


def _kohya(model: nn.Module, clip: nn.Module | None, prefix: str = "lora_unet_", dotted: bool = False):
    """A kohya LoRA on every linear module (ranks 1-4, some without alpha); -> (state dict, expected deltas)."""
    sd, expected = {}, {}
    for i, (name, (out, n_in)) in enumerate(linear_shapes(model).items()):
        r = 1 + i % 4
        key = prefix + (name if dotted else name.replace(".", "_"))
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = rnd(r, n_in), rnd(out, r)
        scale = 1.0
        if i % 3:
            sd[f"{key}.alpha"] = torch.tensor(float(i % 5 + 1))
            scale = (i % 5 + 1) / r
        expected[("transformer", name)] = scale * sd[f"{key}.lora_up.weight"] @ sd[f"{key}.lora_down.weight"]
    for name, (out, n_in) in (linear_shapes(clip) if clip is not None else {}).items():
        if "layers" not in name:
            continue
        key = ("text_encoders.clip_l.transformer.text_model." + name) if dotted else \
            "lora_te1_text_model_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = rnd(2, n_in), rnd(out, 2)
        sd[f"{key}.alpha"] = torch.tensor(1.0)
        expected[("text_encoder", name)] = 0.5 * sd[f"{key}.lora_up.weight"] @ sd[f"{key}.lora_down.weight"]
    return sd, expected


def _check(holder: Holder, expected: dict) -> None:
    roots = {"transformer": holder.transformer, "text_encoder": holder.text_encoder.clip}
    for (component, name), want in expected.items():
        got, bias = delta(roots[component], name)
        assert close(got, want), f"{component} {name}"
        assert not bias.any()


@pytest.mark.parametrize("variant", ["kohya", "kohya-comfyui"])
def test_kohya_every_module_and_clip(variant):
    holder = Holder(tiny_clip())
    comfy = variant == "kohya-comfyui"
    sd, expected = _kohya(holder.transformer, holder.text_encoder.clip, "diffusion_model." if comfy else "lora_unet_",
                          dotted=comfy)
    report = holder.load_lora_weights(sd, adapter_name="k")
    assert report.format == variant
    # One CLIP layer: q, k, v, out_proj, fc1, fc2.
    assert report.modules == {"transformer": len(linear_shapes(Flux(PARAMS))), "text_encoder": 6}
    _check(holder, expected)


def test_kohya_matches_diffusers_converter():
    """The same kohya file, read by fluxkit directly and after diffusers' kohya -> diffusers conversion."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    direct, via = Holder(), Holder()
    sd, _ = _kohya(direct.transformer, None)
    # diffusers hard-codes FLUX.1-dev's linear1 split, and ignores alpha on the final layer: leave those out.
    sd = {k: v for k, v in sd.items() if "linear1" not in k and not ("final_layer" in k and k.endswith("alpha"))}
    direct.load_lora_weights(dict(sd))
    via.load_lora_weights(_convert_kohya_flux_lora_to_diffusers(dict(sd)))
    names = [n for n, m in direct.transformer.named_modules() if isinstance(m, LoraLinear)]
    assert len(names) == len(linear_shapes(direct.transformer)) - 2  # all but the two linear1
    for name in names:
        assert close(delta(direct.transformer, name)[0], delta(via.transformer, name)[0]), name


def test_diffusers_slices_alphas_and_clip():
    """Separate A matrices per q/k/v slice of the fused BFL tensors, per-module alphas, norm_out's row swap."""
    holder = Holder(tiny_clip())
    sd = {}

    def add(module: str, n_in: int, rows: int, r: int, alpha: float | None = None):
        sd[f"{module}.lora_A.weight"], sd[f"{module}.lora_B.weight"] = rnd(r, n_in), rnd(rows, r)
        if alpha is not None:
            sd[f"{module}.alpha"] = torch.tensor(alpha)
        scale = (alpha or r) / r
        return scale * sd[f"{module}.lora_B.weight"] @ sd[f"{module}.lora_A.weight"]

    d = "transformer.transformer_blocks.1.attn"
    q, k = add(f"{d}.to_q", H, H, 2, 4.0), add(f"{d}.to_k", H, H, 3)
    add_v = add(f"{d}.add_v_proj", H, H, 1, 0.5)
    s = "transformer.single_transformer_blocks.0"
    mlp, v = add(f"{s}.proj_mlp", H, MLP, 4, 2.0), add(f"{s}.attn.to_v", H, H, 2)
    norm_out = add("transformer.norm_out.linear", H, 2 * H, 2, 8.0)
    clip_q = add("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 32, 32, 2, 1.0)
    holder.load_lora_weights(sd)

    zeros = torch.zeros(H, H)
    assert close(delta(holder.transformer, "double_blocks.1.img_attn.qkv")[0], torch.cat((q, k, zeros)))
    assert close(delta(holder.transformer, "double_blocks.1.txt_attn.qkv")[0], torch.cat((zeros, zeros, add_v)))
    assert close(delta(holder.transformer, "single_blocks.0.linear1")[0], torch.cat((zeros, zeros, v, mlp)))
    assert close(delta(holder.transformer, "final_layer.adaLN_modulation.1")[0], swap(norm_out))
    assert close(delta(holder.text_encoder.clip, "encoder.layers.0.self_attn.q_proj")[0], clip_q)


def test_diffusers_metadata_alpha_pattern_and_rslora(tmp_path):
    holder = Holder()
    a, b = rnd(4, H), rnd(H, 4)
    sd = {"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": a,
          "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": b,
          "transformer.proj_out.lora_A.weight": rnd(4, H), "transformer.proj_out.lora_B.weight": rnd(64, 4)}
    config = {"transformer.r": 4, "transformer.lora_alpha": 2, "transformer.use_rslora": False,
              "transformer.alpha_pattern": {"^transformer_blocks.0.attn.to_out.0": 16}}
    save_file(sd, tmp_path / "pytorch_lora_weights.safetensors", metadata={METADATA_KEY: json.dumps(config)})
    holder.load_lora_weights(tmp_path)
    assert close(delta(holder.transformer, "double_blocks.0.img_attn.proj")[0], 16 / 4 * b @ a)
    proj = sd["transformer.proj_out.lora_B.weight"] @ sd["transformer.proj_out.lora_A.weight"]
    assert close(delta(holder.transformer, "final_layer.linear")[0], 2 / 4 * proj)
    holder.unload_lora_weights()

    config["transformer.use_rslora"] = True  # scale alpha / sqrt(r)
    save_file(sd, tmp_path / "rs.safetensors", metadata={METADATA_KEY: json.dumps(config)})
    holder.load_lora_weights(tmp_path, weight_name="rs.safetensors")
    assert close(delta(holder.transformer, "final_layer.linear")[0], 2 / 2 * proj)
    holder.unload_lora_weights()

    sd["transformer.proj_out.alpha"] = torch.tensor(4.0)  # alphas in two places: which one holds is undecidable
    save_file(sd, tmp_path / "both.safetensors", metadata={METADATA_KEY: json.dumps(config)})
    with pytest.raises(ValueError, match="both `.alpha` keys and lora_adapter_metadata"):
        holder.load_lora_weights(tmp_path, weight_name="both.safetensors")


@pytest.mark.parametrize("prefix", ["lora_transformer_", "base_model.model."])
def test_diffusers_names_with_underscores_or_peft_prefix(prefix):
    holder = Holder()
    module = "single_transformer_blocks.1.attn.to_k"
    module = module.replace(".", "_") if prefix.endswith("_") else module
    a, b = rnd(2, H), rnd(H, 2)
    suffixes = ("lora_down", "lora_up") if prefix.endswith("_") else ("lora_A", "lora_B")
    sd = {f"{prefix}{module}.{suffixes[0]}.weight": a, f"{prefix}{module}.{suffixes[1]}.weight": b,
          f"{prefix}{module}.alpha": torch.tensor(1.0)}
    holder.load_lora_weights(sd)
    want = torch.zeros(3 * H + MLP, H)
    want[H : 2 * H] = 0.5 * b @ a
    assert close(delta(holder.transformer, "single_blocks.1.linear1")[0], want)


def test_xlabs_matches_diffusers_converter_and_refuses_single_proj():
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    sd = {}
    for i in range(2):
        for lora, rows in (("qkv_lora1", 3 * H), ("proj_lora1", H), ("qkv_lora2", 3 * H), ("proj_lora2", H)):
            sd[f"double_blocks.{i}.processor.{lora}.down.weight"] = rnd(4, H)
            sd[f"double_blocks.{i}.processor.{lora}.up.weight"] = rnd(rows, 4)
    sd["single_blocks.1.processor.qkv_lora.down.weight"], sd["single_blocks.1.processor.qkv_lora.up.weight"] = \
        rnd(4, H), rnd(3 * H, 4)
    direct, via = Holder(), Holder()
    report = direct.load_lora_weights({f"diffusion_model.{k}": v for k, v in sd.items()})
    assert report.format == "xlabs" and report.modules["transformer"] == 9
    via.load_lora_weights(_convert_xlabs_flux_lora_to_diffusers(dict(sd)))
    up, down = (sd[f"double_blocks.1.processor.qkv_lora2.{w}.weight"] for w in ("up", "down"))
    assert close(delta(direct.transformer, "double_blocks.1.txt_attn.qkv")[0], up @ down)  # x-flux: scale 1
    for name in ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.1.txt_attn.proj",
                 "single_blocks.1.linear1"):
        assert close(delta(direct.transformer, name)[0], delta(via.transformer, name)[0]), name

    sd["single_blocks.1.processor.proj_lora.down.weight"] = rnd(4, H)
    sd["single_blocks.1.processor.proj_lora.up.weight"] = rnd(H, 4)
    with pytest.raises(ValueError, match="linear2's output") as err:
        Holder().load_lora_weights(sd)
    assert "single_blocks.1.processor.proj_lora.down.weight" in str(err.value)


def _bfl_lora(model: nn.Module, prefix: str, widen: int | None = None):
    """BFL-named lora_A/lora_B(+bias) on every linear; -> (state dict, {module: (weight delta, bias delta)})."""
    sd, expected = {}, {}
    for name, (out, n_in) in linear_shapes(model).items():
        n_in = widen if (widen and name == "img_in") else n_in
        a, b, bias = rnd(3, n_in), rnd(out, 3), rnd(out)
        sd.update({f"{prefix}{name}.lora_A.weight": a, f"{prefix}{name}.lora_B.weight": b,
                   f"{prefix}{name}.lora_B.bias": bias})
        expected[name] = (b @ a, bias)
    return sd, expected


def test_control_lora_widens_img_in_replaces_norms_and_unload_restores():
    holder = Holder()
    model = holder.transformer
    original_img_in, original_params = model.img_in, model.params
    sd, expected = _bfl_lora(model, "", widen=128)
    norms = {f"double_blocks.0.{s}_attn.norm.{n}_norm.scale": rnd(16) for s in ("img", "txt") for n in ("query", "key")}
    norms["single_blocks.1.norm.key_norm.scale"] = rnd(16)
    before = {k: model.get_parameter(k).clone() for k in norms}
    report = holder.load_lora_weights({**sd, **norms})
    assert report.format == "bfl-control" and report.norm_scales == 5 and report.img_in_width == 128
    assert model.img_in.in_features == 128 and model.params.in_channels == 128
    for name, (w, b) in expected.items():
        got_w, got_b = delta(model, name)
        assert close(got_w, w) and close(got_b, b), name
    assert all(torch.equal(model.get_parameter(k), v) for k, v in norms.items())
    with torch.no_grad():  # the widened model runs on 128-channel inputs; the extra base columns are zero
        assert not model.img_in.base.weight[:, 64:].any()
        assert torch.equal(model.img_in.base.weight[:, :64], original_img_in.weight)

    holder.set_adapters([], None)  # inactive: the original norm scales are back
    assert all(torch.equal(model.get_parameter(k), before[k]) for k in norms)
    holder.unload_lora_weights()
    assert model.img_in is original_img_in and model.params == original_params
    assert all(torch.equal(model.get_parameter(k), before[k]) for k in norms)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_fal_kontext_and_comfyui_bfl_names():
    for prefix, fmt in (("base_model.model.", "fal-kontext"), ("diffusion_model.", "bfl")):
        holder = Holder()
        sd, expected = _bfl_lora(holder.transformer, prefix)
        assert holder.load_lora_weights(sd).format == fmt
        for name, (w, b) in expected.items():
            got_w, got_b = delta(holder.transformer, name)
            assert close(got_w, w) and close(got_b, b), name


def _small_kohya() -> dict[str, torch.Tensor]:
    return {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": rnd(2, H),
            "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": rnd(H, 2)}


def test_strictness_unknown_keys_error_or_warn():
    holder = Holder()
    sd = {**_small_kohya(), "lora_unet_double_blocks_0_img_attn_proj.hada_w1_a": rnd(2, H),
          "lora_unet_double_blocks_7_img_attn_proj.lora_down.weight": rnd(2, H),
          "lora_unet_double_blocks_7_img_attn_proj.lora_up.weight": rnd(H, 2)}
    with pytest.raises(ValueError) as err:
        holder.load_lora_weights(sd)
    message = str(err.value)
    assert "3 LoRA keys could not be applied" in message and "hada_w1_a" in message
    assert "no such module in this model (e.g. double_blocks_7_img_attn_proj)" in message
    assert not any(isinstance(m, LoraLinear) for m in holder.transformer.modules())  # nothing half-loaded

    with pytest.warns(UserWarning, match="hada_w1_a"):
        report = holder.load_lora_weights(sd, strict=False)
    assert report.skipped == 3 and report.modules == {"transformer": 1}


def test_zero_matches_shape_mismatch_and_listing_limit():
    holder = Holder()
    sd1 = {f"lora_unet_down_blocks_{i}_attentions_0_proj_in.lora_down.weight": rnd(2, 8) for i in range(12)}
    with pytest.raises(ValueError, match=r"no key of the LoRA .* matches this model.*\(2 more\)"):
        holder.load_lora_weights(sd1, strict=False)  # zero matches stays an error without strict
    dev = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": rnd(2, 3072),
           "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": rnd(9216, 2)}
    with pytest.raises(ValueError, match=r"does not fit this model \(e.g. double_blocks.0.img_attn.qkv takes up \[96,"):
        holder.load_lora_weights(dev)


def test_text_encoder_keys_zero_t5_and_dora():
    t5 = {"lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(2, 8),
          "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.zeros(8, 2),
          "lora_te2_encoder_block_0_layer_0_SelfAttention_q.alpha": torch.tensor(2.0)}
    report = Holder().load_lora_weights({**_small_kohya(), **t5})
    assert report.ignored == 3  # all-zero tensors cannot change anything
    t5["lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = rnd(8, 2)
    with pytest.raises(ValueError, match="T5 text-encoder LoRA is not supported"):
        Holder().load_lora_weights({**_small_kohya(), **t5})
    clip_key = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": rnd(2, 32),
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": rnd(37, 2)}
    with pytest.raises(ValueError, match="needs a CLIP text encoder"):
        Holder(clip=None).load_lora_weights({**_small_kohya(), **clip_key})
    with pytest.raises(ValueError, match="DoRA"):
        Holder().load_lora_weights({**_small_kohya(), "lora_unet_double_blocks_0_img_attn_proj.dora_scale": rnd(H)})


def test_read_lora_sources(tmp_path):
    sd = _small_kohya()
    with pytest.raises(ValueError, match="only .safetensors"):
        read_lora(tmp_path / "lora.bin")
    save_file(sd, tmp_path / "style.safetensors")
    tensors, _, where = read_lora(tmp_path)  # the only .safetensors file in the folder
    assert where.endswith("style.safetensors") and set(tensors) == set(sd)
    save_file(sd, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"pass weight_name= one of \['other.safetensors', 'style.safetensors'\]"):
        read_lora(tmp_path)
    with pytest.raises(ValueError, match="needs a folder or a repo"):
        read_lora(tmp_path / "style.safetensors", weight_name="x.safetensors")
    with pytest.raises(ValueError, match="must be tensors"):
        read_lora({"a.lora_A.weight": [1, 2]})
    with pytest.raises(FileNotFoundError, match="someone/flux-style-lora"):  # a repo id: resolved through the HF cache
        read_lora("someone/flux-style-lora", weight_name="style.safetensors")
