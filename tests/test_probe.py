"""The caption probe (`fluxkit eval --probe`): counterfactuals change one attribute, blind models score chance, and
the shipped tiny-dev reads the colour it is told."""

import json
import random
from dataclasses import replace

import pytest

from fluxkit.cli import main
from fluxkit.data.captions import INVERSE
from fluxkit.data.scenes import WORDS
from fluxkit.eval.probe import ATTRIBUTES, MIRROR, build_probe, counterfactual_scene, score_probe, summarize

FIELDS = {"colour", "shape", "size", "position"}  # object fields; background and relation are scene fields


def _difference(a, b) -> set[str]:
    """Which attributes of two scenes differ (object fields of the first object, background, relation, count, the
    sign's text and everything else of the sign)."""
    if a.sign is not None:
        diff = {"text"} if a.sign.text != b.sign.text else set()
        diff |= {"sign"} if replace(a.sign, text=b.sign.text) != b.sign else set()
        return diff | ({"background"} if a.background != b.background else set())
    diff = {f for f in FIELDS if getattr(a.objects[0], f) != getattr(b.objects[0], f)}
    diff |= {f for f in ("background", "relation") if getattr(a, f) != getattr(b, f)}
    return diff | ({"count"} if len(a.objects) != len(b.objects) else set())


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_counterfactual_changes_that_attribute_only(attribute):
    items = build_probe(attribute, 6, seed=3)
    assert len(items) == 6 and all(it.attribute == attribute for it in items)
    assert all(it.caption != it.counterfactual for it in items)
    for i, it in enumerate(items):
        other = counterfactual_scene(it.scene, attribute, random.Random(i))
        assert _difference(it.scene, other) == {attribute}
        if attribute == "position":
            assert other.objects[0].position == MIRROR[it.scene.objects[0].position]
        if attribute == "relation":
            assert other.relation == INVERSE[it.scene.relation]
        if attribute == "text":  # the same length, and a listed word stays a listed word
            assert len(other.sign.text) == len(it.scene.sign.text)
            assert (other.sign.text in WORDS) == (it.scene.sign.text in WORDS)
    assert [it.caption for it in build_probe(attribute, 6, seed=3)] == [it.caption for it in items]  # deterministic


def test_centred_objects_have_no_position_counterfactual():
    scene = next(it.scene for it in build_probe("colour", 40) if it.scene.objects[0].position == "center")
    assert counterfactual_scene(scene, "position", random.Random(0)) is None
    assert all(it.scene.objects[0].position != "center" for it in build_probe("position", 20))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="attribute must be one of"):
        build_probe("texture", 4)
    with pytest.raises(ValueError, match="at least one item"):
        build_probe("colour", 0)


@pytest.fixture(scope="module")
def tiny_dev():
    from fluxkit.pipeline import FluxPipeline

    return FluxPipeline.from_pretrained("fluxkit-tiny-dev")


def test_a_model_blind_to_its_prompt_scores_chance(tiny_dev, monkeypatch):
    items = build_probe("colour", 4) + build_probe("position", 4)
    encode = tiny_dev.encode_prompt
    monkeypatch.setattr(tiny_dev, "encode_prompt", lambda prompts: encode(["a picture"] * len(prompts)))
    summary = summarize(score_probe(tiny_dev, items, timesteps=(0.9,), draws=1, batch_size=8))
    assert summary["overall"]["accuracy"] == 0.5 and summary["overall"]["gap"] == 0.0


def test_tiny_dev_reads_the_colour_it_is_told(tiny_dev):
    results = score_probe(tiny_dev, build_probe("colour", 8), timesteps=(0.8, 0.6), draws=1)
    assert summarize(results)["colour"]["accuracy"] >= 0.75
    # the counterfactual's error is the same call with another caption: swapping the captions swaps the errors
    swapped = [replace(it, caption=it.counterfactual, counterfactual=it.caption) for it in build_probe("colour", 8)]
    back = score_probe(tiny_dev, swapped, timesteps=(0.8, 0.6), draws=1)
    assert [r["error_counterfactual"] for r in back] == pytest.approx([r["error_true"] for r in results], rel=1e-3)


def test_channel_gives_the_counterfactual_only_its_tokens_or_only_its_pooled_vector(tiny_dev):
    items = build_probe("colour", 4)
    both = score_probe(tiny_dev, items, timesteps=(0.8,), draws=1)
    tokens = score_probe(tiny_dev, items, timesteps=(0.8,), draws=1, channel="tokens")
    pooled = score_probe(tiny_dev, items, timesteps=(0.8,), draws=1, channel="pooled")
    # the true caption's error does not depend on the channel; the counterfactual's does, and each half matters
    for r in (tokens, pooled):
        assert [x["error_true"] for x in r] == pytest.approx([x["error_true"] for x in both], rel=1e-3)
    for r in (tokens, pooled):
        assert [x["error_counterfactual"] for x in r] != pytest.approx([x["error_counterfactual"] for x in both],
                                                                       rel=1e-3)
    with pytest.raises(ValueError, match="channel"):
        score_probe(tiny_dev, items, channel="vector")


def test_cli_probe_writes_its_table(tmp_path, capsys):
    assert main(["eval", "--probe", "--items", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "position" in out and "chance is 50%" in out
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved["summary"]["overall"]["n"] == 2 * len(ATTRIBUTES) and len(saved["items"]) == 2 * len(ATTRIBUTES)


def test_cli_probe_rejects_sampling_options(capsys):
    assert main(["eval", "--probe", "--steps", "4"]) != 0
    assert "--probe" in capsys.readouterr().err
    assert main(["eval", "--probe-channel", "tokens", "--quick"]) != 0
    assert "--probe-channel needs --probe" in capsys.readouterr().err
