"""The evaluation checker validated on ground truth: it passes true renders and rejects mismatched specs.

Sign checks call the real tesseract binary (`apt-get install tesseract-ocr`).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from fluxkit.data.render import render
from fluxkit.data.scenes import IMAGE_SIZES, Scene, edit_move, edit_recolor, edit_remove, make_sign
from fluxkit.eval import ocr
from fluxkit.eval.checker import check, classify_shape, segment
from fluxkit.eval.run import run_eval, score_ground_truth
from fluxkit.eval.suite import CATEGORIES, build_suite


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def suites():
    """The quick suite (every category) at each of the three training sizes, with its ground-truth renders."""
    out = {}
    for size in IMAGE_SIZES:
        suite = build_suite(quick=True, seeds=(0,), size=size)
        out[size] = (suite, [render(item.scene).image for item in suite])
    return out


def test_ground_truth_renders_score_at_least_99_percent(suites):
    passed = []
    for suite, images in suites.values():
        assert {item.category for item in suite} == set(CATEGORIES)
        passed += [check(image, item.scene).passed for item, image in zip(suite, images, strict=True)]
    assert np.mean(passed) >= 0.99, f"ground truth pass rate {np.mean(passed):.3f}"


def test_shuffled_specs_score_at_most_20_percent(suites):
    passed = []
    for suite, images in suites.values():
        order = list(range(len(suite)))
        random.Random(0).shuffle(order)
        # spec order[j] is checked against image order[j + 1]: a random permutation where no spec keeps its image
        passed += [check(images[order[(j + 1) % len(order)]], suite[i].scene).passed for j, i in enumerate(order)]
    assert np.mean(passed) <= 0.20, f"shuffled pass rate {np.mean(passed):.3f}"


def _first(suite, category: str):
    return next(item for item in suite if item.category == category).scene


def test_each_check_catches_its_own_mistake(suites):
    suite, _ = suites[(128, 128)]
    rng = random.Random(0)
    single = _first(suite, "position")
    assert check(render(single).image, single).passed
    moved, _ = edit_move(single, rng, index=0)
    assert check(render(moved).image, single).checks == {"colour": True, "shape": True, "position": False}
    recoloured, _ = edit_recolor(single, rng, index=0)
    assert not check(render(recoloured).image, single).checks["colour"]

    size = _first(suite, "size")
    other = "large" if size.objects[0].size == "small" else "small"
    assert not check(render(size).image, replace(size, objects=(replace(size.objects[0], size=other),))).passed

    count = next(item.scene for item in suite if item.category == "count" and len(item.scene.objects) == 2)
    fewer, _ = edit_remove(count, rng)
    assert check(render(fewer).image, count).checks["count"] is False

    relation = _first(suite, "relation")
    a, b = relation.objects
    swapped = replace(relation, objects=(replace(a, centre=b.centre, position=b.position),
                                         replace(b, centre=a.centre, position=a.position)))
    assert check(render(swapped).image, relation).checks == {"colour": True, "shape": True, "relation": False}

    background = _first(suite, "background")
    repainted = replace(background, background="black" if background.background != "black" else "white")
    assert not check(render(background).image, repainted).checks["background"]


def test_sign_text_is_read_by_ocr_and_graded():
    scene = Scene("sign", 128, 128, "gray", frozenset({"text"}),
                  sign=make_sign(random.Random(0), 128, 128, "HOTEL", "gray"))
    result = check(render(scene).image, scene)
    assert result.passed and result.text_read == "HOTEL" and result.char_accuracy == 1.0
    asked = replace(scene, sign=replace(scene.sign, text="HOSEL"))
    wrong = check(render(scene).image, asked)
    assert not wrong.passed and wrong.char_accuracy == pytest.approx(0.8)


def test_char_accuracy_and_edit_distance():
    assert ocr.edit_distance("OPEN", "OPEN") == 0 and ocr.edit_distance("OPEN", "OPFN") == 1
    assert ocr.edit_distance("OPEN", "PEN") == 1 and ocr.edit_distance("", "AB") == 2
    assert ocr.char_accuracy("OPEN", "OPFN") == 0.75 and ocr.char_accuracy("OPEN", "") == 0.0
    assert ocr.char_accuracy("AB", "XXXXXX") == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        ocr.char_accuracy("", "A")


def test_missing_tesseract_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(ocr.shutil, "which", lambda name: None)
    with pytest.raises(ocr.OcrUnavailableError, match="apt-get install tesseract-ocr"):
        ocr.read_line(np.full((20, 60, 3), 255, np.uint8))


def test_shape_classifier_on_ideal_features():
    assert classify_shape(0.785, 0.99) == "circle" and classify_shape(1.0, 1.0) == "square"
    assert classify_shape(0.5, 1.0) == "triangle" and classify_shape(0.38, 0.56) == "star"


def test_segment_ignores_noise_and_finds_background():
    image = np.full((96, 160, 3), (128, 128, 128), np.uint8)
    image[10:40, 20:50] = (220, 30, 30)  # a red square
    image[80:82, 100:102] = (30, 70, 220)  # a 4-pixel blue speck: noise
    seg = segment(image)
    assert seg.background == "gray" and [(b.colour, b.shape) for b in seg.blobs] == [("red", "square")]


def test_check_rejects_bad_images(suites):
    suite, images = suites[(160, 96)]
    with pytest.raises(ValueError, match="160x96"):
        check(np.zeros((128, 128, 3), np.uint8), suite[0].scene)
    with pytest.raises(ValueError, match="uint8"):
        check(images[0].astype(np.float32), suite[0].scene)


def test_run_eval_writes_results_and_grid(tmp_path):
    suite = build_suite(quick=True, seeds=(0, 1), categories=("colour", "relation", "sign_word"))
    truth = {item.prompt: Image.fromarray(render(item.scene).image) for item in suite}
    calls = []

    def generate(prompts, seeds):
        calls.append(len(prompts))
        return [truth[p] for p in prompts]

    summary = run_eval(generate, suite, tmp_path, batch_size=10, log=_quiet)
    assert calls == [10, 10, 4] and summary["overall"]["pass_rate"] == 1.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["sign_word"]["char_accuracy"] == 1.0
    assert [it["id"] for it in saved["items"]] == [it.id for it in suite]
    assert Image.open(tmp_path / "grid.png").size == (16 * 132, 2 * 132)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "results.json"]  # no temp files left

    blank = run_eval(lambda p, s: [Image.new("RGB", (128, 128), "white")] * len(p), suite, None, log=_quiet)
    assert blank["overall"]["pass_rate"] == 0.0
    with pytest.raises(ValueError, match="returned 1 images for 16"):
        run_eval(lambda p, s: [truth[p[0]]], suite, None, log=_quiet)
    assert score_ground_truth(suite[:4], log=_quiet)["overall"]["pass_rate"] == 1.0
