"""Regional prompts: the joint attention mask exactly, its exact consequences in the network, and its effect on
images from a tiny random model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fluxkit import FluxPipeline, sampling
from fluxkit.model import Flux
from fluxkit.params import TEST_FLUX
from fluxkit.regional import RegionalPrompts, attention_mask, region_tokens

KW = dict(height=64, width=64, num_inference_steps=3, guidance_scale=3.5, max_sequence_length=16, output_type="np")


def _gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def _halves(size=64):
    left, right = torch.zeros(size, size), torch.zeros(size, size)
    left[:, : size // 2] = 1
    right[:, size // 2 :] = 1
    return left, right


@pytest.fixture(scope="module")
def pipe(tiny_dev_folder):
    return FluxPipeline.from_pretrained(tiny_dev_folder, torch_dtype=torch.float32)


def test_attention_mask_allows_exactly_the_documented_pairs():
    text_len, regions = 2, torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1]], dtype=torch.bool)  # token 1 is in both
    mask = attention_mask(text_len, regions, extra_tokens=1)
    # sequence: global text 0-1, region-0 text 2-3, region-1 text 4-5, image tokens 6-9, one context token 10
    kind = ["g", "g", "r0", "r0", "r1", "r1", "i0", "i1", "i2", "i3", "i4"]
    in_region = {"r0": {"i0", "i1"}, "r1": {"i1", "i3"}}

    def allowed(q: str, k: str) -> bool:
        if q[0] == "i" and k[0] == "i":
            return True  # image <-> image: always
        if "g" in (q, k):
            return q == k or "i" in (q[0], k[0])  # global text: itself and every image token
        if q[0] == "r" and k[0] == "r":
            return q == k  # region texts: only themselves
        text, img = (q, k) if q[0] == "r" else (k, q)
        return img in in_region[text]  # region text <-> the image tokens of that region

    expected = torch.tensor([[allowed(q, k) for k in kind] for q in kind])
    assert torch.equal(mask, expected)
    assert not mask[6, 4] and mask[7, 4] and mask[7, 2] and not mask[2, 4] and mask[10, 0]  # spot checks by hand
    assert torch.equal(mask, mask.T)


def test_region_tokens_use_half_of_each_patch():
    mask = torch.zeros(32, 32)
    mask[:, :8] = 1  # exactly half of the first token column
    mask[:16, 16:] = 1  # the top-right token
    tokens = region_tokens([mask], (32, 32), (2, 2))
    assert tokens.tolist() == [[True, True, True, False]]


def test_image_tokens_outside_a_region_never_see_its_prompt_in_one_double_block():
    """Exact: after one double block (no single blocks) an image token attends only to keys computed from the
    global prompt, its own regions' prompts and image tokens, so changing region 2's text cannot reach it."""
    torch.manual_seed(0)
    model = Flux(dataclasses.replace(TEST_FLUX, depth=1, depth_single_blocks=0)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    text_len, grid = 3, (2, 4)
    regions = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    mask = attention_mask(text_len, regions)[None, None]
    img = torch.randn(1, 8, 64)
    ids = sampling.image_ids(1, *grid)
    txt = torch.randn(1, 3 * text_len, 48)
    changed = txt.clone()
    changed[:, 2 * text_len :] = torch.randn(1, text_len, 48)  # region 2's text only
    args = (torch.full((1,), 0.5), torch.randn(1, 32), torch.full((1,), 3.5))

    def run(t):
        return model(img, ids, t, sampling.text_ids(1, t.shape[1]), *args, attn_mask=mask)

    with torch.inference_mode():
        a, b = run(txt), run(changed)
    outside = ~regions[1]
    assert torch.allclose(a[0, outside], b[0, outside], atol=1e-6)
    assert (a[0, regions[1]] - b[0, regions[1]]).abs().max() > 1e-3


def test_a_region_with_an_empty_mask_changes_nothing(pipe):
    base = pipe("a photo", generator=_gen(0), **KW).images
    empty = RegionalPrompts(["a red circle"], [torch.zeros(64, 64)])
    assert np.abs(base - pipe("a photo", generator=_gen(0), conditioning=empty, **KW).images).max() < 1e-5


def test_changing_a_region_prompt_changes_mostly_that_region(pipe):
    left, right = _halves()
    ratios = []
    for seed in (0, 1):
        hooks = [RegionalPrompts(["a red circle", p2], [left, right]) for p2 in ("a blue square", "a yellow star")]
        images = [pipe("a photo", generator=_gen(seed), conditioning=h, **KW).images[0] for h in hooks]
        change = np.abs(images[0] - images[1]).mean(-1)  # [H, W]
        ratios.append(change[:, 48:].mean() / change[:, :16].mean())  # inside region 2 vs far inside region 1
    assert min(ratios) > 1.5


def test_regional_with_true_cfg_and_validation(pipe):
    left, right = _halves()
    hook = RegionalPrompts(["a red circle", "a blue square"], [left, right])
    args = dict(generator=_gen(0), conditioning=hook, **KW)
    plain = pipe("a photo", **args).images
    args["generator"] = _gen(0)
    cfg = pipe("a photo", true_cfg_scale=2.0, negative_prompt="blurry", **args).images
    assert cfg.shape == plain.shape and np.abs(cfg - plain).max() > 1e-3
    with pytest.raises(ValueError, match="one mask per prompt"):
        RegionalPrompts(["a", "b"], [left])
    with pytest.raises(ValueError, match="non-empty strings"):
        RegionalPrompts("a red circle", [left])
    with pytest.raises(ValueError, match=r"masks\[0\] is 32x32"):
        pipe("a photo", conditioning=RegionalPrompts(["a"], [torch.zeros(32, 32)]), **KW)


def test_box_masks_by_name_and_by_fractions():
    from fluxkit.regional import NAMED_BOXES, box_mask

    left, right = _halves(64)
    assert torch.equal(box_mask("left", 64, 64), left) and torch.equal(box_mask("0.5,0,1,1", 64, 64), right)
    third = box_mask("center-third", 96, 48)  # [H, W]
    assert third.shape == (48, 96) and third[:, 32:64].all() and third.sum() == 48 * 32
    corner = box_mask("bottom-right", 160, 96)
    assert corner[48:, 80:].all() and corner.sum() == 48 * 80
    assert all(box_mask(name, 128, 128).any() for name in NAMED_BOXES)
    with pytest.raises(ValueError, match="one of .*x0,y0,x1,y1"):
        box_mask("upper", 64, 64)
    with pytest.raises(ValueError, match="0 <= x0 < x1 <= 1"):
        box_mask("0.6,0,0.4,1", 64, 64)
