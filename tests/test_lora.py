"""Runtime LoRA on a tiny Flux: runtime vs fused, exact unfuse, no base drift over 100 switches, mixing, per-call
scale, unload, quantized bases, the adapter-management API and saving in diffusers' format."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from fluxkit.lora import LoraLinear, LoraLoaderMixin, linear_shapes
from fluxkit.lora_formats import METADATA_KEY
from fluxkit.model import Flux
from fluxkit.params import FluxParams

PARAMS = FluxParams(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=48, hidden_size=32, mlp_ratio=4.0,
                    num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6))


class Holder(LoraLoaderMixin):
    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.transformer = Flux(PARAMS).eval()
        self.text_encoder = SimpleNamespace()  # no CLIP: a MiniLM-like encoder


def kohya_lora(model: nn.Module, seed: int, skip: str = "never") -> dict[str, torch.Tensor]:
    """A kohya LoRA on every linear module (rank 2, alpha 1) but those whose name contains `skip`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, n_in) in linear_shapes(model).items():
        if skip in name:
            continue
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(2, n_in, generator=g) * 0.3
        sd[f"{key}.lora_up.weight"] = torch.randn(out, 2, generator=g) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(1.0)
    return sd


def forward(model: Flux, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(1, 16, 64, generator=g), torch.randn(1, 5, 48, generator=g)
    img_ids = torch.randint(0, 8, (1, 16, 3), generator=g).float()
    with torch.no_grad():
        return model(img, img_ids, txt, torch.zeros(1, 5, 3), torch.tensor([0.7]), torch.randn(1, 32, generator=g),
                     torch.tensor([3.5]))


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors, looked up through LoRA wrappers, under their LoRA-free names."""
    return {k.replace(".base.", "."): v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}


def bit_identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_runtime_equals_fused_and_unfuse_is_exact():
    holder = Holder()
    model = holder.transformer
    plain, original = forward(model), base_state(model)
    holder.load_lora_weights(kohya_lora(model, 1))
    runtime = forward(model)
    assert (runtime - plain).abs().max() > 1e-2  # the LoRA does something
    holder.fuse_lora(lora_scale=0.8)
    holder.set_lora_scale(5.0)  # fused adapters are in the weights: the runtime scale no longer touches them
    fused = forward(model)
    assert not bit_identical(base_state(model), original)
    holder.unfuse_lora()
    assert bit_identical(base_state(model), original)
    holder.set_lora_scale(0.8)
    assert torch.allclose(forward(model), fused, atol=1e-5)
    holder.set_lora_scale(1.0)
    assert torch.equal(forward(model), runtime)


def test_hundred_adapter_switches_leave_base_bit_identical():
    holder = Holder()
    model = holder.transformer
    original = base_state(model)
    holder.load_lora_weights(kohya_lora(model, 1), adapter_name="a")
    holder.load_lora_weights(kohya_lora(model, 2, skip="single"), adapter_name="b")
    outputs = {}
    for i in range(100):
        names = [["a"], ["b"], ["a", "b"], []][i % 4]
        holder.set_adapters(names, [0.5 + i / 100] * len(names))
        if i % 5 == 0:  # every combination, at varying weights
            outputs.setdefault(tuple(names), forward(model))
    assert bit_identical(base_state(model), original)
    assert len(outputs) == 4 and not torch.equal(outputs[("a",)], outputs[("b",)])


def _probe(module: LoraLinear) -> torch.Tensor:
    x = torch.eye(module.in_features)
    with torch.no_grad():
        return module(x) - module.base(x)


def test_mixed_adapters_add_their_weighted_deltas():
    holder = Holder()
    model = holder.transformer
    holder.load_lora_weights(kohya_lora(model, 1), adapter_name="a")
    holder.load_lora_weights(kohya_lora(model, 2), adapter_name="b")
    assert holder.get_active_adapters() == ["b"]  # the newest is the active one, as in diffusers
    names = ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "final_layer.adaLN_modulation.1")
    alone = {}
    for adapter in ("a", "b"):
        holder.set_adapters(adapter)
        alone[adapter] = {n: _probe(model.get_submodule(n)) for n in names}
    holder.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
    for n in names:
        assert torch.allclose(_probe(model.get_submodule(n)), 0.7 * alone["a"][n] - 0.4 * alone["b"][n], atol=1e-5)
    holder.disable_lora()
    assert not _probe(model.get_submodule(names[0])).any() and holder.get_active_adapters() == []
    holder.enable_lora()
    assert holder.get_active_adapters() == ["a", "b"]


def test_per_call_scale_applies_for_one_call_then_restores():
    holder = Holder()
    model = holder.transformer
    with pytest.raises(ValueError, match="no LoRA is loaded"):
        with holder.temporary_lora_scale(0.5):
            pass
    holder.load_lora_weights(kohya_lora(model, 1))
    qkv = model.get_submodule("double_blocks.1.txt_attn.qkv")
    full = _probe(qkv)
    with holder.temporary_lora_scale(0.25):
        assert torch.allclose(_probe(qkv), 0.25 * full, atol=1e-6)
    assert torch.equal(_probe(qkv), full)
    with holder.temporary_lora_scale(None):
        assert torch.equal(_probe(qkv), full)
    with pytest.raises(ValueError, match="must be a number"):
        holder.set_lora_scale("0.5")


def test_unload_restores_the_original_module_tree():
    holder = Holder()
    model = holder.transformer
    tree = [(n, type(m)) for n, m in model.named_modules()]
    original, plain = base_state(model), forward(model)
    holder.load_lora_weights(kohya_lora(model, 1), adapter_name="a")
    holder.load_lora_weights(kohya_lora(model, 2, skip="double"), adapter_name="b")
    holder.set_adapters(["a", "b"])
    holder.fuse_lora(adapter_names=["a"])
    assert any(isinstance(m, LoraLinear) for m in model.modules())
    holder.unload_lora_weights()
    assert [(n, type(m)) for n, m in model.named_modules()] == tree
    assert bit_identical(model.state_dict(), original)
    assert torch.equal(forward(model), plain)
    assert holder.get_list_adapters() == {"transformer": [], "text_encoder": []}


class Int8Linear(nn.Module):
    """A stand-in quantized linear: int8 weights with a per-row scale and no float `weight` parameter."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("qscale", scale)
        self.bias = linear.bias

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.qscale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)


def test_quantized_base_takes_runtime_lora_and_refuses_fusing():
    quant, ref = Holder(), Holder()
    for name in linear_shapes(quant.transformer):
        if name.startswith("double_blocks."):
            parent, _, child = name.rpartition(".")
            q = Int8Linear(quant.transformer.get_submodule(name))
            setattr(quant.transformer.get_submodule(parent), child, q)
            dense = ref.transformer.get_submodule(name)
            with torch.no_grad():
                dense.weight.copy_(q.dequantized())
    sd = kohya_lora(quant.transformer, 1)
    quant.load_lora_weights(dict(sd))
    ref.load_lora_weights(dict(sd))
    assert isinstance(quant.transformer.double_blocks[0].img_attn.qkv.base, Int8Linear)
    assert torch.allclose(forward(quant.transformer), forward(ref.transformer), atol=1e-5)
    before = base_state(quant.transformer)
    with pytest.raises(ValueError, match=r"cannot fuse LoRA into 20 modules: quantized base \(Int8Linear\).*: "
                                         r"transformer.double_blocks.0.img_mod.lin, .* \(10 more\)$"):
        quant.fuse_lora()
    assert bit_identical(base_state(quant.transformer), before)  # refused as a whole: nothing fused


@pytest.mark.parametrize("kind", ["int8", "fp8", "q8_0"])
def test_lora_on_fluxkit_quantized_linears(kind):
    """The quantized linears of fluxkit.quant take runtime adapters like any linear; fusing them is refused."""
    quant = pytest.importorskip("fluxkit.quant")
    q, ref = Holder(), Holder()
    quant.quantize_model(q.transformer, kind)
    layers = quant.quantized_layers(q.transformer)
    with torch.no_grad():
        for name, layer in layers.items():
            ref.transformer.get_submodule(name).weight.copy_(layer.dequantize(torch.float32))
    sd = kohya_lora(q.transformer, 1)
    q.load_lora_weights(dict(sd))
    ref.load_lora_weights(dict(sd))
    assert isinstance(q.transformer.single_blocks[1].linear1.base, quant.QuantLinear)
    assert torch.allclose(forward(q.transformer), forward(ref.transformer), atol=1e-4)
    with pytest.raises(ValueError, match=f"cannot fuse LoRA into {len(layers)} modules: quantized base"):
        q.fuse_lora()


def test_fused_adapters_are_guarded_and_other_adapters_stay_runtime():
    holder = Holder()
    model = holder.transformer
    holder.load_lora_weights(kohya_lora(model, 1), adapter_name="a")
    holder.fuse_lora()
    for call in (lambda: holder.set_adapters("a"), lambda: holder.delete_adapters("a")):
        with pytest.raises(ValueError, match="fused into the weights; call unfuse_lora"):
            call()
    with pytest.raises(ValueError, match="already fused"):
        holder.fuse_lora(adapter_names="a")
    fused_a = forward(model)
    holder.load_lora_weights(kohya_lora(model, 2), adapter_name="b")  # loads on top of the fused weights
    holder.set_adapters("b", 0.5)
    both = forward(model)
    holder.unfuse_lora()
    holder.set_adapters(["a", "b"], [1.0, 0.5])
    assert torch.allclose(forward(model), both, atol=1e-5)
    holder.set_adapters("a")
    assert torch.allclose(forward(model), fused_a, atol=1e-5)


def test_adapter_names_listing_and_deletion():
    holder = Holder()
    model = holder.transformer
    holder.load_lora_weights(kohya_lora(model, 1, skip="single"))
    holder.load_lora_weights(kohya_lora(model, 2, skip="double"))
    assert holder.get_list_adapters() == {"transformer": ["default_0", "default_1"], "text_encoder": []}
    with pytest.raises(ValueError, match="already loaded"):
        holder.load_lora_weights(kohya_lora(model, 3), adapter_name="default_1")
    with pytest.raises(ValueError, match="without '.'"):
        holder.load_lora_weights(kohya_lora(model, 3), adapter_name="a.b")
    with pytest.raises(ValueError, match=r"distinct loaded adapters \(loaded: \['default_0', 'default_1'\]\)"):
        holder.set_adapters(["default_0", "nope"])
    with pytest.raises(ValueError, match="one number per adapter"):
        holder.set_adapters(["default_0", "default_1"], [1.0])
    holder.delete_adapters("default_0")
    assert not isinstance(model.double_blocks[0].img_attn.qkv, LoraLinear)  # emptied wrappers are swapped back
    assert isinstance(model.single_blocks[0].linear1, LoraLinear)
    assert holder.get_active_adapters() == ["default_1"]


def test_save_writes_diffusers_names_and_reloads_to_the_same_deltas(tmp_path):
    source = Holder()
    sd = kohya_lora(source.transformer, 1)
    # Mixed ranks and scales on the fused single-block input projection.
    sd["lora_unet_single_blocks_0_linear1.lora_down.weight"] = torch.randn(5, 32)
    sd["lora_unet_single_blocks_0_linear1.lora_up.weight"] = torch.randn(224, 5)
    sd["lora_unet_single_blocks_0_linear1.alpha"] = torch.tensor(10.0)
    source.load_lora_weights(sd, adapter_name="style")
    path = source.save_lora_weights(tmp_path)
    assert path.name == "pytorch_lora_weights.safetensors"
    with safe_open(path, framework="pt") as f:
        keys, config = set(f.keys()), json.loads(f.metadata()[METADATA_KEY])
    for name in ("single_transformer_blocks.0.proj_mlp", "transformer_blocks.1.attn.add_k_proj", "norm_out.linear",
                 "x_embedder", "time_text_embed.guidance_embedder.linear_2"):
        assert f"transformer.{name}.lora_A.weight" in keys, name
    assert config["transformer.r"] == 2 and config["transformer.lora_alpha"] == 1.0
    assert config["transformer.rank_pattern"]["^single_transformer_blocks.0.proj_mlp"] == 5
    assert config["transformer.alpha_pattern"]["^single_transformer_blocks.0.attn.to_q"] == 10.0

    copy = Holder()
    assert copy.load_lora_weights(path).format == "diffusers"
    for name, module in source.transformer.named_modules():
        if isinstance(module, LoraLinear):
            assert torch.allclose(_probe(copy.transformer.get_submodule(name)), _probe(module), atol=1e-5), name
