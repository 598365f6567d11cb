"""Regional-prompt scenes (fluxkit.data.regions) and the regional fine-tune's batches of them."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fluxkit.data import HELD_OUT_PAIRS, IMAGE_SIZES, SceneDataset
from fluxkit.data.regions import LAYOUTS, region_boxes, region_map, regional_scene
from fluxkit.data.scenes import COLOURS
from fluxkit.eval.checker import segment
from fluxkit.train.variants_data import regional_examples, regional_text


@pytest.mark.parametrize("layout", LAYOUTS)
def test_region_boxes_tile_the_frame(layout):
    for width, height in IMAGE_SIZES:
        for seed in range(5):
            boxes = region_boxes(layout, width, height, random.Random(seed))
            cover = np.zeros((height, width), int)
            for x0, y0, x1, y1 in boxes.values():
                assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
                cover[y0:y1, x0:x1] += 1
            assert (cover == 1).all(), (layout, width, height)  # every pixel in exactly one region
    assert len(region_boxes(layout, 128, 128, random.Random(0))) == {"thirds": 3, "rows": 3}.get(
        layout, 2)


def test_uneven_cuts_vary_and_need_an_rng():
    cuts = {tuple(region_boxes("uneven", 128, 128, random.Random(s)).values())[0] for s in range(20)}
    assert len(cuts) > 5
    with pytest.raises(ValueError, match="pass rng"):
        region_boxes("uneven", 128, 128)
    with pytest.raises(ValueError, match="layout must be one of"):
        region_boxes("diagonal", 128, 128)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_region_holds_its_own_object_rendered_where_it_says(layout):
    for k in range(8):
        rng = random.Random(k)
        scene, regions, background = regional_scene(rng, layout, 128, 128)
        assert len(scene.objects) == len(regions) and scene.background == background
        assert len({r.colour for r in regions}) == len(regions)  # one colour per region
        for obj, r in zip(scene.objects, regions, strict=True):
            x0, y0, x1, y1 = obj.bbox
            assert r.box[0] <= x0 and x1 <= r.box[2] and r.box[1] <= y0 and y1 <= r.box[3]
            assert (obj.colour, obj.shape) == (r.colour, r.shape) and (r.colour, r.shape) not in HELD_OUT_PAIRS
            assert r.colour in r.prompt and r.shape in r.prompt
        # the checker finds each object, in its colour, inside its region
        from fluxkit.data import render

        blobs = segment(render(scene).image).blobs
        for r in regions:
            assert any(b.colour == r.colour and r.mask(128, 128)[int(b.centre[1]), int(b.centre[0])] for b in blobs)


def test_region_map_tints_each_region_with_its_colour():
    _, regions, _ = regional_scene(random.Random(3), "thirds", 128, 128)
    picture = region_map(regions, 128, 128)
    for r in regions:
        want = (np.asarray(COLOURS[r.colour]) + 128) // 2
        assert (picture[r.mask(128, 128)] == want).all()


def test_regional_batches_share_a_layout_and_build_the_hooks_mask():
    samples = [SceneDataset(0, 4, sizes=((160, 96),), kinds=("single",))[i] for i in range(4)]
    ex = regional_examples(samples, random.Random(1), ("thirds", "rows", "left/right"))
    counts = {len(rs) for rs in ex.regions}
    assert len(counts) == 1 and counts <= {2, 3}
    assert all(t.shape == (96, 160, 3) for t in ex.targets) and all("background" in p for p in ex.prompts)
    n = counts.pop()
    txt, region_txt = torch.randn(4, 8, 5), torch.randn(4, n, 8, 5)
    joint, mask = regional_text(txt, region_txt, ex.regions, (96, 160), (6, 10))
    assert joint.shape == (4, (n + 1) * 8, 5) and torch.equal(joint[:, 8:16], region_txt[:, 0])
    assert mask.shape == (4, 1, (n + 1) * 8 + 60, (n + 1) * 8 + 60)
    assert torch.equal(mask, mask.transpose(-1, -2))
    # a region's text sees only its own tokens' image columns, and the global prompt sees every image token
    assert mask[:, 0, :8, (n + 1) * 8:].all()
    per_token = mask[:, 0, 8:(n + 1) * 8:8, (n + 1) * 8:]  # [B, n, 60]: region k's first text token vs the image tokens
    assert (per_token.sum(1) == 1).all()  # the regions tile the frame: each image token is in exactly one
    with pytest.raises(ValueError, match="no layout"):
        regional_examples([SceneDataset(0, 1, sizes=((32, 32),), kinds=("single",))[0]], random.Random(0), ("thirds",))
