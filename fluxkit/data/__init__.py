"""Procedural training data: structured scenes, their captions, renders and edits."""

from fluxkit.data.captions import caption
from fluxkit.data.dataset import Sample, SceneDataset
from fluxkit.data.render import RenderResult, render
from fluxkit.data.scenes import (
    HELD_OUT_PAIRS,
    IMAGE_SIZES,
    Scene,
    SceneObject,
    Sign,
    edit_move,
    edit_recolor,
    edit_remove,
    sample_scene,
)

__all__ = ["HELD_OUT_PAIRS", "IMAGE_SIZES", "RenderResult", "Sample", "Scene", "SceneDataset", "SceneObject", "Sign",
           "caption", "edit_move", "edit_recolor", "edit_remove", "render", "sample_scene"]
