"""Captions and edit instructions, worded from a structured `Scene` (see `fluxkit.data.scenes`).

Every caption states exactly the attributes in `scene.stated` (the checker tests those and nothing else); the rng
only picks among phrasings. This module reads scenes by attribute and imports nothing from `scenes`, which imports it.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fluxkit.data.scenes import Scene, SceneObject

NUMBERS = ("zero", "one", "two", "three")
POSITION_PHRASES = {
    "top left": ("in the top left corner", "at the top left", "in the upper left corner"),
    "top right": ("in the top right corner", "at the top right", "in the upper right corner"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left corner"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right corner"),
    "top": ("at the top", "near the top", "at the top of the image"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom of the image"),
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "center": ("in the center", "in the middle", "at the center of the image"),
}
MOVE_TARGETS = {"top left": "the top left corner", "top right": "the top right corner", "top": "the top",
                "bottom left": "the bottom left corner", "bottom right": "the bottom right corner",
                "bottom": "the bottom", "left": "the left", "right": "the right", "center": "the center"}
RELATION_PHRASES = {
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
}
INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
BACKGROUND_PHRASES = ("on a {} background", "against a {} background", "with a {} background", "on {}")
SINGLE_TEMPLATES = ("{obj}{pos}{bg}", "there is {obj}{pos}{bg}", "an image of {obj}{pos}{bg}",
                    "a picture showing {obj}{pos}{bg}", "{obj}{bg}{pos}")
COUNT_TEMPLATES = ("{num} {things}{bg}", "there are {num} {things}{bg}", "an image with {num} {things}{bg}",
                   "{num} {things} shown{bg}")
RELATION_TEMPLATES = ("{a} {rel} {b}{bg}", "there is {a} {rel} {b}{bg}", "an image of {a} {rel} {b}{bg}")
SIGN_TEMPLATES = ("a sign that says {q}{bg}", "a sign reading {q}{bg}", "a board with the word {q}{bg}",
                  "the text {q} written on a sign{bg}", "a sign with {q} on it{bg}", "a signboard saying {q}{bg}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: SceneObject, rng: random.Random, with_size: bool) -> str:
    """'a small red circle' / 'a red circle' / 'a small circle colored red'."""
    words = f"{obj.size} {obj.colour} {obj.shape}" if with_size else f"{obj.colour} {obj.shape}"
    if rng.random() < 0.2:  # colour after the noun, for variety
        words = f"{obj.size} {obj.shape} colored {obj.colour}" if with_size else f"{obj.shape} colored {obj.colour}"
    return f"{_article(words)} {words}"


def _background(scene: Scene, rng: random.Random) -> str:
    if "background" not in scene.stated:
        return ""
    return " " + rng.choice(BACKGROUND_PHRASES).format(scene.background)


def _count_caption(scene: Scene, rng: random.Random, bg: str) -> str:
    obj, n = scene.objects[0], len(scene.objects)
    size = f"{obj.size} " if "size" in scene.stated else ""
    noun = f"{size}{obj.colour} {obj.shape}" + ("s" if n > 1 else "")
    if n == 1:
        return rng.choice(("one ", "a single ", "exactly one ", "only one ")) + noun + bg
    num = NUMBERS[n] if rng.random() < 0.8 else str(n)
    extra = "a pair of {things}{bg}" if n == 2 else "a group of {num} {things}{bg}"
    return rng.choice((*COUNT_TEMPLATES, extra)).format(num=num, things=noun, bg=bg)


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption stating exactly `scene.stated`, in a phrasing drawn from `rng`."""
    bg = _background(scene, rng)
    if scene.kind == "single":
        obj = scene.objects[0]
        pos = " " + rng.choice(POSITION_PHRASES[obj.position]) if "position" in scene.stated else ""
        text = rng.choice(SINGLE_TEMPLATES).format(obj=object_phrase(obj, rng, "size" in scene.stated),
                                                   pos=pos, bg=bg)
        if pos and rng.random() < 0.2:  # lead with the position: "in the top left corner, a small red circle"
            text = f"{pos.strip()}, {object_phrase(obj, rng, 'size' in scene.stated)}{bg}"
        return text
    if scene.kind == "count":
        return _count_caption(scene, rng, bg)
    if scene.kind == "relation":
        a, b, relation = scene.objects[0], scene.objects[1], scene.relation
        if rng.random() < 0.4:  # say it the other way round: "a green triangle below a yellow star"
            a, b, relation = b, a, INVERSE[relation]
        return rng.choice(RELATION_TEMPLATES).format(a=object_phrase(a, rng, False), b=object_phrase(b, rng, False),
                                                     rel=rng.choice(RELATION_PHRASES[relation]), bg=bg)
    quote = "'{}'" if rng.random() < 0.8 else '"{}"'
    return rng.choice(SIGN_TEMPLATES).format(q=quote.format(scene.sign.text), bg=bg)


def _refer(scene: Scene, index: int, all_of_them: bool) -> str:
    """A phrase picking out objects[index]; identical objects in a count scene are 'one of' / 'all the' them."""
    obj, n = scene.objects[index], len(scene.objects)
    if scene.kind == "count" and n > 1:
        noun = f"{obj.colour} {obj.shape}s"
        return f"the {NUMBERS[n]} {noun}" if all_of_them else f"one of the {noun}"
    return f"the {obj.colour} {obj.shape}"


def recolor_instruction(scene: Scene, index: int, colour: str, rng: random.Random) -> str:
    ref = _refer(scene, index, all_of_them=True)
    return rng.choice((f"make {ref} {colour}", f"change {ref} to {colour}", f"turn {ref} {colour}",
                       f"recolor {ref} {colour}", f"paint {ref} {colour}"))


def remove_instruction(scene: Scene, index: int, rng: random.Random) -> str:
    ref = _refer(scene, index, all_of_them=False)
    return rng.choice((f"remove {ref}", f"delete {ref}", f"take away {ref}", f"erase {ref}"))


def move_instruction(scene: Scene, index: int, position: str, rng: random.Random) -> str:
    ref = _refer(scene, index, all_of_them=False)
    where = MOVE_TARGETS[position]
    return rng.choice((f"move {ref} to {where}", f"shift {ref} to {where}", f"drag {ref} to {where}"))
