"""The transformer: parity with diffusers' FluxTransformer2DModel (the oracle) and real-size key layouts."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fluxkit.convert import expected_bfl_shapes, transformer_diffusers_to_bfl
from fluxkit.model import Flux
from fluxkit.params import FLUX_DEV, FLUX_SCHNELL, TEST_FLUX


def _diffusers_model(guidance: bool, in_channels: int = 64):
    from conftest import tiny_diffusers_transformer

    torch.manual_seed(0)
    return tiny_diffusers_transformer(guidance, in_channels, layers=2, std=0.3).eval()


def _inputs(batch=2, h2=3, w2=4, l_txt=7, in_channels=64):
    img = torch.randn(batch, h2 * w2, in_channels)
    ids = torch.zeros(h2 * w2, 3)
    ids[:, 1] = torch.arange(h2 * w2) // w2
    ids[:, 2] = torch.arange(h2 * w2) % w2
    return dict(
        img=img,
        txt=torch.randn(batch, l_txt, 48),
        y=torch.randn(batch, 32),
        t=torch.tensor([0.3, 0.9]),
        g=torch.tensor([3.5, 1.0]),
        img_ids=ids,
        txt_ids=torch.zeros(l_txt, 3),
    )


@pytest.mark.parametrize("guidance", [True, False], ids=["dev-like", "schnell-like"])
@pytest.mark.parametrize("in_channels", [64, 128])
def test_forward_equals_diffusers_fp32(guidance, in_channels):
    ref = _diffusers_model(guidance, in_channels)
    params = replace(TEST_FLUX, depth=2, depth_single_blocks=2, guidance_embed=guidance, in_channels=in_channels)
    ours = Flux(params).eval()
    ours.load_state_dict(transformer_diffusers_to_bfl(ref.state_dict()), strict=True)
    x = _inputs(in_channels=in_channels)
    b = x["img"].shape[0]
    with torch.no_grad():
        expected = ref(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            pooled_projections=x["y"],
            timestep=x["t"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            guidance=x["g"] if guidance else None,
            return_dict=False,
        )[0]
        got = ours(
            x["img"],
            x["img_ids"].expand(b, -1, -1),
            x["txt"],
            x["txt_ids"].expand(b, -1, -1),
            x["t"],
            x["y"],
            x["g"] if guidance else None,
        )
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel <= 1e-5, rel
    assert expected.abs().mean() > 0.1


def test_every_weight_matters():
    """Perturbing one bias deep in the network changes the output: parity is not vacuous."""
    params = replace(TEST_FLUX, depth=2, depth_single_blocks=2)
    torch.manual_seed(0)
    model = Flux(params).eval()
    x = _inputs()
    b = 2
    args = (x["img"], x["img_ids"].expand(b, -1, -1), x["txt"], x["txt_ids"].expand(b, -1, -1), x["t"], x["y"], x["g"])
    with torch.no_grad():
        before = model(*args)
        model.single_blocks[1].linear2.bias.add_(1e-2)
        assert (model(*args) - before).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_complex_form_equals_the_real_form(dtype):
    """Eager RoPE (one complex multiply) and the form torch.compile sees (multiply, swap pairs, multiply, add) agree,
    also on a permuted, non-contiguous q as the blocks pass it; and rotating moves the values (not a no-op)."""
    from fluxkit.math import _rotate_real, apply_rope, rope_embedding

    torch.manual_seed(0)
    ids = torch.randint(0, 40, (2, 9, 3)).float()
    pe = rope_embedding(ids, (4, 6, 6), 10_000)
    q = torch.randn(2, 9, 3, 16, dtype=dtype).permute(0, 2, 1, 3)  # [B, H, L, D], strided like split_qkv's
    k = torch.randn(2, 3, 9, 16, dtype=dtype)
    got_q, got_k = apply_rope(q, k, pe)
    assert got_q.dtype == dtype
    torch.testing.assert_close(got_q, _rotate_real(q, pe), atol=1e-6, rtol=0)
    torch.testing.assert_close(got_k, _rotate_real(k, pe), atol=1e-6, rtol=0)
    assert (got_q.float() - q.float()).abs().max() > 0.1


def test_compiled_blocks_match_eager_and_compile_once_per_kind():
    """compile_repeated_blocks: same velocities as eager; the 2 double and 2 single blocks share 2 compiled graphs."""
    import torch._dynamo

    params = replace(TEST_FLUX, depth=2, depth_single_blocks=2)
    torch.manual_seed(0)
    model = Flux(params).eval()
    x = _inputs()
    args = (x["img"], x["img_ids"].expand(2, -1, -1), x["txt"], x["txt_ids"].expand(2, -1, -1), x["t"], x["y"], x["g"])
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(*args)
        model.compile_repeated_blocks()
        counters = torch._dynamo.utils.counters
        counters.clear()
        compiled = model(*args)
        again = model(*args)
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=1e-4), (compiled - eager).abs().max()
    assert torch.equal(again, compiled)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_dev_model_requires_guidance():
    model = Flux(TEST_FLUX)
    x = _inputs()
    with pytest.raises(ValueError, match="guidance"):
        model(
            x["img"],
            x["img_ids"][None].expand(2, -1, -1),
            x["txt"],
            x["txt_ids"][None].expand(2, -1, -1),
            x["t"],
            x["y"],
        )


@pytest.mark.parametrize("params, count", [(FLUX_DEV, 780), (FLUX_SCHNELL, 776)], ids=["flux-dev", "flux-schnell"])
def test_full_size_keys_and_shapes_equal_bfl_files(params, count):
    with torch.device("meta"):
        model = Flux(params)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == count
    assert shapes == expected_bfl_shapes(params)
    n_params = sum(v.numel() for v in model.state_dict().values())
    assert n_params == (11_901_408_320 if params.guidance_embed else 11_891_178_560)


def test_params_validation_names_values():
    with pytest.raises(ValueError, match="axes_dim"):
        replace(TEST_FLUX, axes_dim=(4, 6, 8))
    with pytest.raises(ValueError, match="num_heads"):
        replace(TEST_FLUX, num_heads=5)


def test_centred_ids_put_the_caption_in_the_middle_of_every_image_size():
    from fluxkit import sampling

    ids = torch.cat((sampling.image_ids(2, 4, 8), sampling.image_ids(2, 6, 10, index=1)), dim=1)
    centred = sampling.centre_image_ids(ids)
    target, context = centred[:, :32], centred[:, 32:]
    assert torch.equal(target[0, :8, 2], torch.arange(8) - 3.5)
    assert torch.equal(target[0, ::8, 1], torch.arange(4) - 1.5)
    assert torch.equal(context[0, :10, 2], torch.arange(10) - 4.5)  # a Kontext context image: centred on itself
    assert torch.equal(centred[..., 0], ids[..., 0]) and torch.equal(ids[0, :8, 2], torch.arange(8.0))  # input kept

    # The angle between a text token and an image token is the same at every width for the same offset from the
    # middle: column 3 of 8 and column 4 of 10 are both half a token left of it. Counted from the corner it is not.
    txt = sampling.text_ids(1, 2)
    for centred_ids, same in ((True, True), (False, False)):
        model = Flux(replace(TEST_FLUX, centered_ids=centred_ids))
        narrow = model.position_embedding(txt, sampling.image_ids(1, 2, 8))[:, :, :, 2 + 3]
        wide = model.position_embedding(txt, sampling.image_ids(1, 2, 10))[:, :, :, 2 + 4]
        assert torch.equal(narrow, wide) is same

    # The model applies it in forward (pe computed inside) exactly as callers that precompute `pe` do.
    torch.manual_seed(0)
    model = Flux(replace(TEST_FLUX, centered_ids=True, guidance_embed=False)).eval()
    x = _inputs()
    img_ids, txt_ids = x["img_ids"][None].expand(2, -1, -1), x["txt_ids"][None].expand(2, -1, -1)
    args = (x["img"], img_ids, x["txt"], txt_ids, x["t"], x["y"])
    with torch.no_grad():
        inside = model(*args)
        given = model(*args, pe=model.position_embedding(txt_ids, img_ids))
        corner = Flux(replace(model.params, centered_ids=False))
        corner.load_state_dict(model.state_dict())
        from_corner = corner.eval()(*args)
    torch.testing.assert_close(inside, given, rtol=0, atol=0)
    assert (inside - from_corner).abs().max() > 1e-3  # the same weights see different positions
