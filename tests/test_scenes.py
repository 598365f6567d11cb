"""The procedural scene generator: determinism, vocabulary, captions, masks, sizes and edits."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from fluxkit.data import scenes
from fluxkit.data.captions import POSITION_PHRASES, caption
from fluxkit.data.dataset import SceneDataset
from fluxkit.data.render import render
from fluxkit.data.scenes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    IMAGE_SIZES,
    KINDS,
    MARGIN,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    WORDS,
    Scene,
    contrasts,
    edit_move,
    edit_recolor,
    edit_remove,
    make_object,
    sample_scene,
)


def _scenes(n: int, seed: int = 0, **kwargs) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, *IMAGE_SIZES[i % 3], **kwargs) for i in range(n)]


def test_dataset_items_are_deterministic_and_order_independent():
    a, b = SceneDataset(seed=7, n=12), SceneDataset(seed=7, n=12)
    for i in (11, 3, 0, 3):  # any access order
        x, y = a[i], b[i]
        assert np.array_equal(x.image, y.image) and x.caption == y.caption and x.scene == y.scene
    other = SceneDataset(seed=8, n=12)
    assert [a[i].caption for i in range(12)] != [other[i].caption for i in range(12)]
    with pytest.raises(IndexError):
        a[12]


def test_training_sampler_never_draws_held_out_pairs():
    train = _scenes(3000, seed=1, kinds=("single", "count", "relation"))
    pairs = Counter((o.colour, o.shape) for s in train for o in s.objects)
    assert not set(pairs) & HELD_OUT_PAIRS
    assert len(pairs) == len(COLOURS) * len(SHAPES) - len(HELD_OUT_PAIRS)  # every other pair does appear
    held = _scenes(200, seed=2, kinds=("single", "count", "relation"), pairs="held_out")
    assert {(o.colour, o.shape) for s in held for o in s.objects} == set(HELD_OUT_PAIRS)


def test_every_vocabulary_item_appears():
    sample = _scenes(3000, seed=3)
    objects = [o for s in sample for o in s.objects]
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.size for o in objects} == set(SIZES)
    assert {o.position for o in objects} == set(POSITIONS)
    assert {s.background for s in sample} == set(BACKGROUNDS)
    assert {s.kind for s in sample} == set(KINDS)
    assert {s.relation for s in sample if s.relation} == set(RELATIONS)
    assert {len(s.objects) for s in sample if s.kind == "count"} == {1, 2, 3}
    texts = [s.sign.text for s in sample if s.sign]
    assert set(WORDS) <= set(texts) and any(t not in WORDS for t in texts)
    assert {len(t) for t in texts} == {2, 3, 4, 5}


def test_captions_vary_and_state_what_the_scene_says():
    for scene in _scenes(40, seed=4):
        captions = {caption(scene, random.Random(k)) for k in range(30)}
        assert len(captions) >= 3, captions
        for text in captions:
            if scene.sign:
                assert scene.sign.text in text
            else:
                assert all(o.colour in text and o.shape in text for o in scene.objects)
            assert (scene.background in text) == ("background" in scene.stated)
    relation = next(s for s in _scenes(50, seed=5, kinds=("relation",)) if s.relation == "above")
    both = {caption(relation, random.Random(k)) for k in range(40)}
    assert any("above" in t or "over" in t for t in both) and any("below" in t or "under" in t for t in both)


def _closer(pixels: np.ndarray, rgb, other) -> bool:
    """Every pixel is at least as close to colour `rgb` as to `other` (coverage >= 50%)."""
    pixels = pixels.astype(float)
    return bool((np.linalg.norm(pixels - rgb, axis=-1) <= np.linalg.norm(pixels - other, axis=-1) + 1e-6).all())


def test_masks_match_pixels():
    for scene in _scenes(60, seed=6):
        result = render(scene)
        image, bg = result.image, BACKGROUNDS[scene.background]
        layers = [(m, COLOURS[o.colour], bg) for m, o in zip(result.masks, scene.objects, strict=True)]
        if scene.sign:
            board = scenes.PALETTE[scene.sign.board]
            away = result.board_mask & ~ndimage.binary_dilation(result.text_mask, iterations=2)
            layers += [(away, board, bg), (result.text_mask, scenes.PALETTE[scene.sign.ink], board)]
        for mask, rgb, under in layers:
            inside = ndimage.binary_erosion(mask, iterations=2)  # away from anti-aliased edges and star corners
            assert mask.any() and _closer(image[mask], rgb, under)
            if mask is not result.text_mask:  # letter strokes are too thin to have a fully covered interior
                assert inside.any() and (image[inside] == rgb).all()
        covered = np.zeros(image.shape[:2], bool)
        for mask in [*result.masks, *([result.board_mask] if scene.sign else [])]:
            covered |= ndimage.binary_dilation(mask, iterations=2)
        assert (image[~covered] == bg).all()
        edges = result.edges()
        assert edges.any() and not edges[~covered].any()


def test_circle_mask_area_matches_geometry():
    obj = make_object(random.Random(0), 160, 96, "circle", "red", "large", "center")
    mask = render(Scene("single", 160, 96, "white", frozenset({"colour", "shape"}), (obj,))).masks[0]
    assert abs(mask.sum() / (np.pi * obj.extent**2 / 4) - 1) < 0.03


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_non_square_sizes_render_inside_the_frame(size):
    width, height = size
    rng = random.Random(9)
    for _ in range(30):
        scene = sample_scene(rng, width, height)
        result = render(scene)
        assert result.image.shape == (height, width, 3) and result.image.dtype == np.uint8
        for obj, mask in zip(scene.objects, result.masks, strict=True):
            ys, xs = np.nonzero(mask)
            assert xs.min() > 0 and ys.min() > 0 and xs.max() < width - 1 and ys.max() < height - 1
            centre = ((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2)
            assert np.allclose(centre, obj.centre, atol=1.0)
            assert scenes.position_of(*obj.centre, width, height) == obj.position


def _changed(before: Scene, after: Scene) -> np.ndarray:
    return (render(before).image != render(after).image).any(-1)


def _box(scene: Scene, obj) -> np.ndarray:
    """(H, W) bool: the object's bbox grown to whole pixels (anti-aliased edges may tint any pixel it touches)."""
    x0, y0, x1, y1 = obj.bbox
    box = np.zeros((scene.height, scene.width), bool)
    box[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
    return box


def test_edits_change_only_what_they_say():
    rng = random.Random(10)
    relations = _scenes(20, seed=11, kinds=("relation",))
    for scene in relations:
        old = render(scene)
        new, text = edit_recolor(scene, rng, index=0)
        assert new.objects[0].colour != scene.objects[0].colour and new.objects[0].colour in text
        assert new.objects[1] == scene.objects[1]
        changed = _changed(scene, new)
        assert changed.sum() >= old.masks[0].sum() and not changed[~_box(scene, scene.objects[0])].any()

        new, text = edit_remove(scene, rng, index=1)
        assert new.kind == "single" and new.objects == scene.objects[:1] and text.startswith(("remove", "delete",
                                                                                                "take", "erase"))
        gone = render(new).image[old.masks[1]]
        assert np.array_equal(gone, np.broadcast_to(BACKGROUNDS[scene.background], gone.shape))
        assert not _changed(scene, new)[~_box(scene, scene.objects[1])].any()

        new, text = edit_move(scene, rng, index=0)
        moved, kept = new.objects[0], new.objects[1]
        assert kept == scene.objects[1] and moved.extent == scene.objects[0].extent
        assert moved.position != scene.objects[0].position and new.relation == scenes.relation_of(moved, kept)
        assert not _changed(scene, new)[~(_box(scene, scene.objects[0]) | _box(new, moved))].any()


def test_edit_errors_are_precise():
    single = _scenes(1, seed=12, kinds=("single",))[0]
    with pytest.raises(ValueError, match="at least 2 objects"):
        edit_remove(single, random.Random(0))
    with pytest.raises(ValueError, match="index 3 out of range"):
        edit_recolor(single, random.Random(0), index=3)
    held_colour = next(c for c, s in HELD_OUT_PAIRS if s == single.objects[0].shape)
    if held_colour != single.objects[0].colour:
        with pytest.raises(ValueError, match="not allowed"):
            edit_recolor(single, random.Random(0), colour=held_colour)


def test_count_edits_keep_the_objects_identical():
    count = next(s for s in _scenes(40, seed=13, kinds=("count",)) if len(s.objects) == 3)
    recoloured, text = edit_recolor(count, random.Random(0))
    assert len({o.colour for o in recoloured.objects}) == 1 and "three" in text
    fewer, text = edit_remove(count, random.Random(0))
    assert len(fewer.objects) == 2 and "one of the" in text


def test_invalid_scene_and_arguments_raise():
    with pytest.raises(ValueError, match="colour"):
        make_object(random.Random(0), 128, 128, "circle", "teal", "small")
    with pytest.raises(ValueError, match="multiples of 16"):
        sample_scene(random.Random(0), 100, 128)
    with pytest.raises(ValueError, match="rng must be a random.Random"):
        sample_scene(np.random.default_rng(0), 128, 128)
    with pytest.raises(ValueError, match="stated"):
        Scene("single", 128, 128, "white", frozenset({"colour"}), _scenes(1, kinds=("single",))[0].objects)


def test_curriculum_options_state_and_pin_what_they_name():
    plain = _scenes(300, seed=4, kinds=("single", "count", "relation"))
    stated = _scenes(300, seed=4, kinds=("single", "count", "relation"), state=frozenset({"position"}))
    singles = [s for s in stated if s.kind == "single"]
    assert singles and all("position" in s.stated for s in singles)
    assert any("position" not in s.stated for s in plain if s.kind == "single")  # the default states it 70% of the time
    assert all("position" not in s.stated for s in stated if s.kind != "single")  # other kinds cannot state it
    for s in singles:  # and the caption says it
        text = caption(s, random.Random(0))
        assert any(phrase in text for phrase in POSITION_PHRASES[s.objects[0].position])
    pin = {"colour": "red", "shape": "square", "size": "large", "background": "white"}
    pinned = _scenes(200, seed=5, kinds=("single", "count", "relation"), pin=pin)
    for s in pinned:
        first = s.objects[0]
        assert (first.colour, first.shape, s.background) == ("red", "square", "white")
        assert first.size == "large" or s.kind != "single"  # counts of three and cramped relations shrink
    assert {s.objects[0].position for s in pinned if s.kind == "single"} == set(POSITIONS)
    white = _scenes(100, seed=6, kinds=("single",), pin={"colour": "white"})  # a clashing background is redrawn
    assert all(s.objects[0].colour == "white" and s.background != "white" for s in white)
    # lists: each scene draws from the values listed (a single object's position too); the toy's four halves
    halves = ["left", "right", "top", "bottom"]
    listed = _scenes(200, seed=7, kinds=("single",), pin={"size": "large", "position": halves,
                                                          "colour": ["red", "blue"], "background": ["white", "black"]})
    assert {s.objects[0].position for s in listed} == set(halves)
    assert {s.objects[0].colour for s in listed} == {"red", "blue"}
    assert {s.background for s in listed} == {"white", "black"} and {s.objects[0].size for s in listed} == {"large"}


def test_sign_pins_fix_background_board_and_place():
    plain = _scenes(60, seed=8, kinds=("sign",))
    assert len({s.background for s in plain}) > 3 and len({s.sign.board for s in plain}) > 2
    pinned = _scenes(60, seed=8, kinds=("sign",), pin={"background": "white", "board": "black", "position": "center"})
    for s in pinned:  # every size of IMAGE_SIZES
        x0, y0, x1, y1 = s.sign.bbox
        assert (s.background, s.sign.board, s.sign.ink) == ("white", "black", "yellow")
        assert (x0 + x1) / 2 == pytest.approx(s.width / 2) and (y0 + y1) / 2 == pytest.approx(s.height / 2)
    assert len({s.sign.text for s in pinned}) > 10  # the text is still drawn
    # a board near the frame's edge is pulled in: centred on the top cell where it fits, else at the margin
    top = _scenes(30, seed=9, kinds=("sign",), pin={"position": "top", "board": ["black", "blue"]})
    for s in top:
        x0, y0, x1, y1 = s.sign.bbox
        assert (x0 + x1) / 2 == pytest.approx(s.width / 2) and y0 >= MARGIN - 1e-9 and (y0 + y1) / 2 < s.height / 2
        assert y0 == pytest.approx(MARGIN) or (y0 + y1) / 2 == pytest.approx(s.height / 6)
        assert s.sign.board in ("black", "blue") and contrasts(s.sign.board, s.background)
    assert {s.sign.board for s in top} == {"black", "blue"}
    with pytest.raises(ValueError, match="board must be one of"):
        sample_scene(random.Random(0), 128, 128, ("sign",), pin={"board": "green"})
    listed = _scenes(60, seed=8, kinds=("sign",), pin={"text": "listed"})
    assert {s.sign.text for s in listed} <= set(WORDS) and len({s.sign.text for s in listed}) > 15
    assert not {s.sign.text for s in _scenes(60, seed=8, kinds=("sign",), pin={"text": "random"})} & set(WORDS)
    assert {s.sign.text for s in _scenes(20, seed=8, kinds=("sign",), pin={"text": ["OPEN", "ZZ"]})} == {"OPEN", "ZZ"}
    for bad in ("listed words", ["OPEN", "open"], ["A"], 3, []):
        with pytest.raises(ValueError, match="text must be one of"):
            sample_scene(random.Random(0), 128, 128, ("sign",), pin={"text": bad})
    with pytest.raises(ValueError, match="no board in"):
        sample_scene(random.Random(0), 128, 128, ("sign",), pin={"board": "black", "background": "black"})


@pytest.mark.parametrize(("pin", "state", "message"), [
    ({"texture": "dots"}, (), "unknown attributes"),
    ({"colour": "teal"}, (), "colour must be one of"),
    ({"position": ["left", "middle"]}, (), "position must be one of"),
    ({"position": []}, (), "non-empty list"),
    ({"size": 3}, (), "one value or a non-empty list"),
    ({"colour": "pink", "shape": "square"}, (), "no drawable"),  # a held-out pair
    ({"colour": "white", "background": "white"}, (), "no drawable"),
    ({}, ("colour",), "cannot be stated optionally"),
])
def test_curriculum_options_refuse_what_cannot_be_drawn(pin, state, message):
    with pytest.raises(ValueError, match=message):
        sample_scene(random.Random(0), 128, 128, ("single",), state=frozenset(state), pin=pin)
    with pytest.raises(ValueError, match=message):
        SceneDataset(0, 4, state=state, pin=pin)[0]
