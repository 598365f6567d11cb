"""The command line: generation end to end on a tiny diffusers folder, metadata replay, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fluxkit.cli import main
from fluxkit.imageio import read_params


def test_generate_writes_images_with_parameters_and_replays(tiny_dev_folder, tmp_path, capsys):
    out = tmp_path / "img-{seed}.png"
    code = main(
        [
            "generate",
            "a red circle",
            "--model",
            str(tiny_dev_folder),
            "--width",
            "48",
            "--height",
            "32",
            "--steps",
            "2",
            "--guidance",
            "4.0",
            "--seed",
            "5",
            "6",
            "--output",
            str(out),
            "--quiet",
            "--dtype",
            "fp32",
        ]
    )
    assert code == 0
    first = tmp_path / "img-5.png"
    assert first.is_file() and (tmp_path / "img-6.png").is_file()
    params = read_params(first)
    assert params["prompt"] == "a red circle" and params["seed"] == 5 and params["steps"] == 2
    assert Image.open(first).size == (48, 32)

    replay = tmp_path / "replay.png"
    assert main(["generate", "--from-image", str(first), "--output", str(replay), "--quiet"]) == 0
    # The original was generated in a batch of two, the replay alone: CPU matmul kernels may round the last bit
    # differently for another batch size, so the replay matches within 2/255 rather than bitwise.
    assert np.abs(np.asarray(Image.open(first), float) - np.asarray(Image.open(replay), float)).max() <= 2
    assert (
        np.abs(np.asarray(Image.open(first), float) - np.asarray(Image.open(tmp_path / "img-6.png"), float)).max() > 0
    )


def test_compile_flag_gives_the_eager_image(tiny_dev_folder, tmp_path):
    """--compile runs the blocks through torch.compile (Flux.compile_repeated_blocks): same picture as eager."""
    import torch._dynamo

    torch._dynamo.reset()
    common = ["a red circle", "--model", str(tiny_dev_folder), "--width", "32", "--height", "32", "--steps", "2",
              "--seed", "3", "--quiet", "--dtype", "fp32"]
    assert main(["generate", *common, "--output", str(tmp_path / "eager.png")]) == 0
    counters = torch._dynamo.utils.counters
    counters.clear()
    assert main(["generate", *common, "--compile", "--output", str(tmp_path / "compiled.png")]) == 0
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])  # the blocks did go through Dynamo
    eager, compiled = (np.asarray(Image.open(tmp_path / f"{n}.png"), float) for n in ("eager", "compiled"))
    assert np.abs(eager - compiled).max() <= 2


def test_aspect_ratio_and_jpeg_metadata(tiny_dev_folder, tmp_path):
    out = tmp_path / "wide.jpg"
    assert (
        main(
            [
                "generate",
                "a blue square",
                "--model",
                str(tiny_dev_folder),
                "--aspect-ratio",
                "16:9",
                "--megapixels",
                "0.004",
                "--steps",
                "1",
                "--seed",
                "1",
                "-o",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    w, h = Image.open(out).size
    assert w % 16 == 0 and h % 16 == 0 and w > h
    assert read_params(out)["prompt"] == "a blue square"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate"], "no prompt given"),
        (["generate", "x", "--model", "/nonexistent/folder/model"], "not found"),
        (["generate", "x", "--aspect-ratio", "16:9", "--width", "64"], "either --aspect-ratio"),
        (["generate", "x", "y", "--output", "one.png", "--model", "/x"], "names one file"),
    ],
)
def test_bad_input_is_one_line_and_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_every_help_works():
    for args in (["--help"], ["generate", "--help"], ["convert", "--help"]):
        res = subprocess.run([sys.executable, "-m", "fluxkit.cli", *args], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert "usage" in res.stdout


def test_convert_round_trip(tiny_dev_folder, tmp_path):
    bfl = tmp_path / "flux1-tiny.safetensors"
    assert main(["convert", str(tiny_dev_folder / "transformer"), str(bfl), "--to", "bfl"]) == 0
    back = tmp_path / "transformer"
    assert main(["convert", str(bfl), str(back), "--to", "diffusers", "--axes-dim", "4,6,6"]) == 0
    from safetensors.torch import load_file

    a = load_file(next((tiny_dev_folder / "transformer").glob("*.safetensors")))
    b = load_file(next(back.glob("*.safetensors")))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert json.loads((back / "config.json").read_text())["num_layers"] == 1


def test_quantized_transformer_files_stand_in_for_the_base(tiny_dev_folder, tmp_path):
    gguf, int8 = tmp_path / "t.gguf", tmp_path / "t8.safetensors"
    src = str(tiny_dev_folder / "transformer")
    assert main(["convert", src, str(gguf), "--to", "gguf", "--type", "q8_0"]) == 0
    assert main(["convert", src, str(int8), "--to", "int8"]) == 0
    common = ["a red circle", "--model", str(tiny_dev_folder), "--steps", "2", "--seed", "3", "-q", "--width", "32",
              "--height", "32", "--dtype", "fp32"]
    outs = {}
    for name, extra in {"base": [], "gguf": ["--transformer", str(gguf)], "int8": ["--transformer", str(int8)],
                        "q4": ["--quantize", "q4_0"]}.items():
        outs[name] = tmp_path / f"{name}.png"
        assert main(["generate", *common, *extra, "-o", str(outs[name])]) == 0
    pix = {k: np.asarray(Image.open(v), float) for k, v in outs.items()}
    for name in ("gguf", "int8"):  # 8-bit weights: close to the base image
        assert np.abs(pix[name] - pix["base"]).mean() < 3.0
    assert read_params(outs["q4"])["quantize"] == "q4_0"


def test_image_conditioning_flags(tiny_dev_folder, tmp_path):
    base = tmp_path / "base.png"
    common = ["--model", str(tiny_dev_folder), "--steps", "2", "--seed", "1", "-q", "--dtype", "fp32"]
    assert main(["generate", "a red circle", "--width", "32", "--height", "32", "-o", str(base), *common]) == 0
    edited = tmp_path / "img2img.png"
    assert main(["generate", "a blue square", "--image", str(base), "--strength", "0.5", "-o", str(edited),
                 *common]) == 0
    assert Image.open(edited).size == (32, 32)  # the input image's size by default
    assert read_params(edited)["strength"] == 0.5
    mask = tmp_path / "left.png"
    Image.fromarray(np.pad(np.full((32, 16), 255, np.uint8), ((0, 0), (0, 16)))).save(mask)
    regional = tmp_path / "regional.png"
    assert main(["generate", "two shapes", "--width", "32", "--height", "32", "--region", f"{mask}:a red circle",
                 "-o", str(regional), *common]) == 0
    for box in ("left", "0,0,0.5,1"):  # a named box or fractions: the same mask as the file, so the same image
        named = tmp_path / f"regional-{box}.png"
        assert main(["generate", "two shapes", "--width", "32", "--height", "32", "--region", f"{box}:a red circle",
                     "-o", str(named), *common]) == 0
        np.testing.assert_array_equal(np.asarray(Image.open(named)), np.asarray(Image.open(regional)))
    assert main(["generate", "x", "--region", "leftish:a red circle", *common]) == 2
    assert main(["generate", "x", "--region", f"{tmp_path / 'missing.png'}:a red circle", *common]) == 2
    assert main(["generate", "x", "--region", "0.5,0,0.2,1:a red circle", *common]) == 2
    assert main(["generate", "x", "--strength", "0.5", *common]) == 2  # --strength needs --image
