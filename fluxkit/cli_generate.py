"""`fluxkit generate`: prompts in, images (with their parameters embedded) out."""

from __future__ import annotations

import argparse
import re
import secrets
import sys
from pathlib import Path

from .sizes import ASPECT_RATIOS, size_for_aspect

# Parameters stored in each image and restored by --from-image (CLI dest names).
REPLAYED = (
    "model",
    "transformer",
    "quantize",
    "lora",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance",
    "true_cfg",
    "dtype",
)


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="one or more prompts")
    p.add_argument("--prompt-file", type=Path, help="a text file with one prompt per line")
    p.add_argument("--from-image", type=Path, help="regenerate an image made by fluxkit from its embedded parameters")
    p.add_argument(
        "--model", help="built-in name, local folder or Hugging Face repo id (default: fluxkit-tiny-schnell)"
    )
    p.add_argument(
        "--transformer", help="a single-file transformer replacing the model's own (BFL or fp8 safetensors, GGUF)"
    )
    p.add_argument(
        "--quantize", help="quantize the transformer's weights: int8, fp8, fp8_channel, q8_0, q4_0, q4_k, ..."
    )
    p.add_argument(
        "--lora",
        action="append",
        metavar="PATH[:SCALE]",
        help="a LoRA file, folder or Hub repo, with an optional weight (default 1); repeatable",
    )
    p.add_argument("--negative-prompt", help="negative prompt (used with --true-cfg > 1)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--aspect-ratio", choices=ASPECT_RATIOS, help="instead of --width/--height")
    p.add_argument("--megapixels", type=float, help="image area for --aspect-ratio (default: the model's default area)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", help="distilled guidance; 'A:B' ramps linearly from A to B over the steps")
    p.add_argument("--true-cfg", type=float, help="true classifier-free guidance scale (> 1 enables; default 1)")
    p.add_argument("--seed", type=int, nargs="+", help="one image per seed (default: random)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (seeds count up from --seed)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    p.add_argument(
        "--output",
        "-o",
        help="file name or pattern with {index}, {seed}, {prompt} (default: outputs/{prompt}-{seed}.{format})",
    )
    p.add_argument("--format", choices=("png", "jpg", "webp"), help="image format (default: from --output, else png)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", help="auto, bf16, fp16, fp32 (auto: bf16 where the device is fast at it)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the transformer blocks (pays off over many images)"
    )
    g = p.add_argument_group("image conditioning")
    g.add_argument("--image", type=Path, help="start from this image (img2img; with --mask: inpainting, or Fill)")
    g.add_argument("--strength", type=float, help="how much of --image to repaint, 0-1 (default 0.6; Fill 1.0)")
    g.add_argument("--mask", type=Path, help="white = regenerate (a Fill model fills, any other model inpaints)")
    g.add_argument("--outpaint", metavar="L,R,T,B", help="pad --image by these pixels and fill the border")
    g.add_argument("--control", choices=("canny", "depth"), help="structure control (a Canny/Depth model)")
    g.add_argument("--control-image", type=Path, help="photo whose edges/depth steer the image")
    g.add_argument("--control-map", action="store_true", help="--control-image already is the edge/depth map")
    g.add_argument("--depth-model", help="transformers depth model, local folder or cached id (default: BFL's)")
    g.add_argument("--edit", type=Path, metavar="IMAGE", help="edit IMAGE as the prompt says (a Kontext model)")
    g.add_argument("--region", action="append", metavar="MASK:PROMPT",
                   help="PROMPT where MASK is white (repeatable); MASK is an image file, a box name (left, right, top, "
                   "bottom, top-left, ..., left-third, center-third, right-third, top-third, middle-third, "
                   "bottom-third) or x0,y0,x1,y1 fractions of the image")
    p.set_defaults(run=run)


def _size(args, default: tuple[int, int]) -> tuple[int, int]:
    """(height, width) from --width/--height or --aspect-ratio/--megapixels, each a multiple of 16."""
    if args.aspect_ratio:
        if args.megapixels is not None and args.megapixels <= 0:
            raise ValueError(f"--megapixels must be positive, got {args.megapixels}")
        return size_for_aspect(args.aspect_ratio, args.megapixels * 1e6 if args.megapixels else default[0] * default[1])
    return args.height or default[0], args.width or default[1]


def _guidance(text: str | None, steps: int) -> float | list[float] | None:
    if text is None:
        return None
    try:
        if ":" in str(text):
            a, b = (float(v) for v in str(text).split(":"))
            return [a + (b - a) * i / max(steps - 1, 1) for i in range(steps)]
        return float(text)
    except ValueError:
        raise ValueError(f"--guidance must be a number or 'A:B', got {text!r}") from None


def _prompts(args) -> list[str]:
    prompts = list(args.prompts)
    if args.prompt_file:
        if not args.prompt_file.is_file():
            raise ValueError(f"--prompt-file {args.prompt_file} does not exist")
        prompts += [ln.strip() for ln in args.prompt_file.read_text().splitlines() if ln.strip()]
    if not prompts:
        raise ValueError("no prompt given: pass PROMPT arguments, --prompt-file or --from-image")
    return prompts


def _apply_replay(args) -> None:
    from .imageio import read_params

    saved = read_params(args.from_image)
    for key in REPLAYED:  # flags given on the command line win over the saved values
        if getattr(args, key) is None and saved.get(key) is not None:
            setattr(args, key, saved[key])
    if not args.prompts and not args.prompt_file:
        args.prompts = [saved["prompt"]]
    if args.seed is None and saved.get("seed") is not None:
        args.seed = [saved["seed"]]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "image"


def _output_paths(args, jobs: list[tuple[str, int]], fmt: str) -> list[Path]:
    pattern = args.output or f"outputs/{{prompt}}-{{seed}}.{fmt}"
    if len(jobs) > 1 and not any(k in pattern for k in ("{index", "{seed", "{prompt")):
        raise ValueError(
            f"--output {pattern!r} names one file but {len(jobs)} images are generated; "
            "use a pattern with {index}, {seed} or {prompt}"
        )
    try:
        paths = [Path(pattern.format(index=i, seed=s, prompt=_slug(p))) for i, (p, s) in enumerate(jobs)]
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"bad --output pattern {pattern!r}: {e}") from None
    if len(set(paths)) != len(paths):
        raise ValueError(f"--output pattern {pattern!r} gives the same file name to several images")
    return paths


def run(args) -> int:
    import torch

    from .devices import default_device, parse_dtype

    if args.from_image:
        _apply_replay(args)
    prompts = _prompts(args)
    if args.aspect_ratio and (args.width or args.height):
        raise ValueError("give either --aspect-ratio or --width/--height, not both")
    if args.megapixels and not args.aspect_ratio:
        raise ValueError("--megapixels needs --aspect-ratio")
    seeds = _seeds(args)
    jobs = [(p, s) for p in prompts for s in seeds]
    fmt = args.format or (Path(args.output).suffix.lstrip(".").lower() if args.output else "") or "png"
    paths = _output_paths(args, jobs, fmt)

    pipe, model_name = _load(
        args,
        default_device() if args.device == "auto" else torch.device(args.device),
        None if args.dtype in (None, "auto") else parse_dtype(args.dtype),
    )
    height, width = _size(args, _input_size(args) or pipe.spec.default_size)
    conditioning = _conditioning(args, pipe, (height, width))
    steps = args.steps or pipe.spec.default_steps
    guidance = _guidance(args.guidance, steps)
    from .imageio import save_image

    bar = None if args.quiet else _progress(len(jobs) * steps)
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start : start + args.batch_size]
        gens = [torch.Generator("cpu").manual_seed(s) for _, s in chunk]
        out = pipe(
            [p for p, _ in chunk],
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            true_cfg_scale=args.true_cfg or 1.0,
            negative_prompt=args.negative_prompt,
            generator=gens,
            callback_on_step_end=bar,
            conditioning=conditioning,
        )
        for (prompt, seed), image, path in zip(chunk, out.images, paths[start : start + len(chunk)]):
            params = _image_params(args, pipe, model_name, prompt, seed, (width, height), steps)
            save_image(image, path, params, fmt)
            if not args.quiet:
                print(path, file=sys.stderr if bar else sys.stdout)
    if bar is not None:
        bar.close()
        for path in paths:
            print(path)
    return 0


def _image_params(args, pipe, model_name: str, prompt: str, seed: int, size: tuple[int, int], steps: int) -> dict:
    """What the saved image records of its generation (`--from-image` replays it)."""
    return {
        "prompt": prompt,
        "seed": seed,
        "model": model_name,
        "transformer": args.transformer,
        "quantize": args.quantize,
        "lora": args.lora,
        "negative_prompt": args.negative_prompt,
        "width": size[0],
        "height": size[1],
        "steps": steps,
        "guidance": args.guidance,
        "true_cfg": args.true_cfg or 1.0,
        "dtype": str(pipe.dtype).split(".")[-1],
        "fluxkit": _version(),
        **_conditioning_params(args),
    }


def _seeds(args) -> list[int]:
    """The seeds of each prompt: several --seed values, or --num-images consecutive ones from --seed (random if
    none)."""
    if args.num_images < 1 or args.batch_size < 1:
        raise ValueError("--num-images and --batch-size must be >= 1")
    if args.seed is not None and len(args.seed) > 1 and args.num_images != 1:
        raise ValueError("give either several --seed values or --num-images, not both")
    return (
        args.seed
        if args.seed and len(args.seed) > 1
        else [(args.seed[0] if args.seed else secrets.randbelow(2**31)) + k for k in range(args.num_images)]
    )


def _open_image(path, flag: str):
    from PIL import Image

    if not path.is_file():
        raise ValueError(f"{flag} {path} does not exist")
    try:
        return Image.open(path).convert("RGB")
    except OSError as e:
        raise ValueError(f"{flag} {path} is not a readable image: {e}") from None


def _outpaint(args) -> tuple[int, int, int, int] | None:
    if not args.outpaint:
        return None
    try:
        left, right, top, bottom = (int(v) for v in args.outpaint.split(","))
    except ValueError:
        raise ValueError(f"--outpaint must be L,R,T,B (four integers), got {args.outpaint!r}") from None
    return left, right, top, bottom


def _input_size(args) -> tuple[int, int] | None:
    """(height, width) of the image being edited, as the default output size (with --outpaint: the padded size)."""
    inputs = [("--image", args.image), ("--edit", args.edit), ("--control-image", args.control_image)]
    given = [(flag, path) for flag, path in inputs if path is not None]
    if not given or args.width or args.height or args.aspect_ratio:
        return None
    flag, path = given[0]
    image = _open_image(path, flag)
    pad = _outpaint(args) or (0, 0, 0, 0)
    height, width = image.height + pad[2] + pad[3], image.width + pad[0] + pad[1]
    if height % 16 or width % 16:
        raise ValueError(f"{path} gives a {width}x{height} image; pass --width/--height (multiples of 16) to resize")
    return height, width


def _conditioning(args, pipe, size: tuple[int, int]):
    """The conditioning hook the image flags ask for, or None for plain text-to-image; size = (height, width)."""
    from . import conditioning as cond
    from .control import DEPTH_MODEL, control_image
    from .regional import RegionalPrompts

    for flag, needs in (("mask", "image"), ("strength", "image"), ("outpaint", "image"), ("control", "control_image")):
        if getattr(args, flag) is not None and getattr(args, needs) is None:
            raise ValueError(f"--{flag} needs --{needs.replace('_', '-')}")
    if args.control_image is not None and args.control is None:
        raise ValueError("--control-image needs --control canny|depth")
    if args.outpaint and args.mask:
        raise ValueError("--outpaint makes its own mask; drop --mask")
    hooks = []
    if args.image:
        image, mask = _open_image(args.image, "--image"), args.mask and _open_image(args.mask, "--mask")
        if args.outpaint:
            image, mask = cond.pad_for_outpaint(image, *_outpaint(args))
        if mask is None:
            hooks.append(cond.Img2Img(image, 0.6 if args.strength is None else args.strength))
        elif cond.model_layout(pipe) == "fill":
            hooks.append(cond.Fill(image, mask, 1.0 if args.strength is None else args.strength))
        else:
            hooks.append(cond.Inpaint(image, mask, 0.6 if args.strength is None else args.strength))
    if args.control:
        photo = _open_image(args.control_image, "--control-image")
        structure = photo if args.control_map else control_image(args.control, photo, args.depth_model or DEPTH_MODEL)
        hooks.append(cond.Control(structure))
    if args.edit:
        image = _open_image(args.edit, "--edit")
        hooks.append(cond.Kontext(image.resize((image.width // 16 * 16, image.height // 16 * 16))))
    if args.region:
        pairs = [r.split(":", 1) for r in args.region]
        if any(len(p) != 2 or not p[1].strip() for p in pairs):
            raise ValueError(f"--region must be MASK:PROMPT, got {args.region}")
        masks = [_region_mask(m, size) for m, _ in pairs]
        hooks.append(RegionalPrompts([p.strip() for _, p in pairs], masks))
    if not hooks:
        return None
    return hooks[0] if len(hooks) == 1 else cond.Compose(*hooks)


def _region_mask(mask: str, size: tuple[int, int]):
    """--region's MASK: an image file, a box name or x0,y0,x1,y1 fractions (fluxkit.regional.box_mask)."""
    from .regional import NAMED_BOXES, box_mask

    if Path(mask).is_file():
        return _open_image(Path(mask), "--region").convert("L")
    if mask in NAMED_BOXES or mask.count(",") == 3:
        return box_mask(mask, size[1], size[0])
    raise ValueError(f"--region mask {mask!r}: no such file, not a box name ({', '.join(NAMED_BOXES)}), not "
                     "x0,y0,x1,y1 fractions")


def _conditioning_params(args) -> dict:
    """The image flags in use, stored with the image (paths as given)."""
    keys = ("image", "strength", "mask", "outpaint", "control", "control_image", "edit", "region")
    return {k: (str(v) if isinstance(v, Path) else v) for k in keys if (v := getattr(args, k)) not in (None, False)}


def _version() -> str:
    from . import __version__

    return __version__


def _load(args, device, dtype):
    from .hub import DEFAULT_MODEL, available_builtins
    from .pipeline import FluxPipeline

    name = args.model
    if name is None:
        if DEFAULT_MODEL not in available_builtins():
            raise ValueError(
                "no built-in model in this install; pass --model with a local folder, a diffusers "
                "folder or a Hugging Face repo id (e.g. black-forest-labs/FLUX.1-schnell)"
            )
        name = DEFAULT_MODEL
    if args.quiet:
        _silence_loading()
    pipe = FluxPipeline.from_pretrained(
        name, torch_dtype=dtype, device=device, transformer=args.transformer, quantize=args.quantize
    )
    if args.compile:
        pipe.transformer.compile_repeated_blocks()
    loras = [_lora_spec(spec) for spec in args.lora or ()]
    for i, (path, _) in enumerate(loras):
        report = pipe.load_lora_weights(path, adapter_name=f"lora_{i}")
        if not args.quiet:
            print(report, file=sys.stderr)
    if loras:  # all active at once, each with its weight
        pipe.set_adapters([f"lora_{i}" for i in range(len(loras))], [weight for _, weight in loras])
    return pipe, name


def _lora_spec(spec: str) -> tuple[str, float]:
    """--lora PATH[:SCALE] -> (PATH, SCALE); SCALE defaults to 1."""
    path, sep, scale = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass  # the colon belongs to the path (C:\...)
    return spec, 1.0


def _silence_loading() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


class _progress:
    """A tqdm bar on stderr fed by callback_on_step_end."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, pipe, i, t, kwargs):
        self.bar.update(1)
        return kwargs

    def close(self) -> None:
        self.bar.close()
