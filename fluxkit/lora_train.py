"""`fluxkit train-lora`: DreamBooth-style LoRA training on a folder of captioned images, with the options of diffusers'
`train_dreambooth_lora_flux.py`, on any model `FluxPipeline.from_pretrained` loads, quantized bases included.

The recipe, top to bottom:
1. Data: every image in `--instance_data_dir` with its same-name `.txt` caption (else `--instance_prompt`); the short
   side is resized to `--resolution` and a centred square is cropped (no aspect buckets). Latents (posterior mean) and
   text embeddings are computed once; the text encoder is not used again (it leaves the accelerator).
2. Adapters: the base transformer is frozen; each `--target_modules` linear (quantized ones too) is wrapped by a
   `fluxkit.lora.LoraLinear` holding one trainable adapter, A ~ N(0, 1/r) and B = 0 (PEFT's "gaussian" init, which
   diffusers' script uses), so training starts from the base model exactly.
3. Loss: the base recipe's rectified flow (`fluxkit.train.flow.noisy`: logit-normal timesteps pushed by the sampler's
   resolution shift, velocity target noise - x0). Guidance-distilled (dev-like) models are fed `--guidance_scale`.
4. Loop: AdamW on the adapters only, gradient accumulation, LR schedule, grad clipping, a progress bar, log.jsonl and
   loss.png. Checkpoints go through `fluxkit.train.loop.RunFolder` (`output_dir/checkpoints/step-N`, each with a
   loadable `pytorch_lora_weights.safetensors`); every random draw of step s comes from a generator seeded by
   (seed, s), so a resumed run continues exactly as the uninterrupted one would.
5. Output: `output_dir/pytorch_lora_weights.safetensors` in diffusers' format (`pipe.load_lora_weights` in fluxkit
   and in diffusers), validation images in `output_dir/validation/`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import sampling
from .atomic import atomic_write_text
from .lora import WEIGHT_NAME, LoraAdapter, attach, linear_shapes, save_adapter, set_active

# diffusers' default set (attn.to_q/k/v, to_out.0, add_*_proj, to_add_out, ff(_context).net.0.proj/.2) on BFL modules.
# BFL fuses q, k, v (and in single blocks the MLP input) into one linear, so the whole fused module is trained:
# double blocks' qkv/proj/MLP of both streams, and single blocks' linear1 (q, k, v, mlp-in) and linear2 (out).
DEFAULT_TARGETS = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "txt_attn.qkv", "txt_attn.proj",
                   "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ADAPTER = "lora"  # the trained adapter's name (not "train": nn.ModuleDict keys may not shadow Module methods)
STAGE = "lora"  # step_generator's stream name
DIFFUSERS_GUIDANCE = 3.5  # diffusers' --guidance_scale default
# Options that may change between sessions of one run (--resume_from_checkpoint): lengthening it, checkpoint and
# validation settings, speed and display. Every other option must match the saved args.json.
RESUMABLE = {"max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "validation_prompt",
             "num_validation_images", "validation_epochs", "validation_steps", "validation_inference_steps",
             "resume_from_checkpoint", "gradient_checkpointing", "quiet", "device"}


def add_parser(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--pretrained_model_name_or_path", "--model", dest="model", default="fluxkit-tiny-dev",
      help="built-in name, fluxkit/diffusers folder or Hub repo id (default: fluxkit-tiny-dev)")
    a("--instance_data_dir", type=Path, required=True, help="images + same-name .txt captions")
    a("--instance_prompt", help="caption of the images that have no .txt file")
    a("--resolution", type=int, help="square training size, a multiple of 16 (default: the model's image size); "
      "short side resized, then centre-cropped")
    a("--train_batch_size", type=int, default=4)
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--learning_rate", type=float, default=1e-4)
    a("--lr_scheduler", default="constant", choices=SCHEDULERS)
    a("--lr_warmup_steps", type=int, default=0)
    a("--max_train_steps", type=int, default=500, help="optimizer steps")
    a("--rank", type=int, default=4)
    a("--lora_alpha", type=float, help="scale alpha/rank (default: alpha = rank)")
    a("--target_modules", default=",".join(DEFAULT_TARGETS),
      help="comma-separated BFL module names or dotted suffixes (default: %(default)s)")
    a("--output_dir", type=Path, default=Path("flux-dreambooth-lora"))
    a("--seed", type=int, default=0)
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, help="checkpoints kept (default: all)")
    a("--resume_from_checkpoint", choices=("latest",), help="continue output_dir's run from its latest checkpoint")
    a("--validation_prompt", help="render validation images with this prompt during training")
    a("--num_validation_images", type=int, default=4)
    a("--validation_epochs", type=int, help="validate every N epochs (default 50, diffusers')")
    a("--validation_steps", type=int, help="validate every N optimizer steps instead")
    a("--validation_inference_steps", type=int, help="sampling steps of validation images (default: the model's)")
    a("--gradient_checkpointing", action="store_true", help="recompute block activations in backward (less memory)")
    a("--guidance_scale", type=float, help=f"guidance fed to dev-like models while training (default "
      f"{DIFFUSERS_GUIDANCE}); not for models without guidance embedding")
    a("--quantize", help="train on a quantized base: int8, fp8, q8_0, q4_0, ... (fluxkit.quant)")
    a("--mixed_precision", default="no", choices=("no", "bf16"),
      help="bf16: frozen base in bf16 and bf16 autocast; the adapters stay fp32")
    a("--max_sequence_length", type=int, help="text tokens (default: the model's)")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-4)
    a("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    a("--logit_mean", type=float, default=0.0, help="timesteps: sigmoid(N(logit_mean, logit_std)), then shifted")
    a("--logit_std", type=float, default=1.0)
    a("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    a("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = train_lora(args)
    print(f"wrote {result.lora_path} after {result.step} steps (last loss {result.history[-1]:.4g})"
          if result.history else f"wrote {result.lora_path}")
    return 0


def check_args(args: argparse.Namespace) -> None:
    """Every option checked before anything loads; ValueError names the option and its value."""
    positive = ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "rank", "checkpointing_steps",
                "num_validation_images", "checkpoints_total_limit", "validation_epochs", "validation_steps",
                "validation_inference_steps", "max_sequence_length", "resolution")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if args.resolution is not None and args.resolution % 16:
        raise ValueError(f"--resolution must be a multiple of 16 (8x autoencoder, 2x2 patches), got {args.resolution}")
    for name in ("learning_rate", "logit_std"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise ValueError(f"--lora_alpha must be > 0, got {args.lora_alpha}")
    if args.lr_warmup_steps < 0 or args.max_grad_norm < 0 or args.adam_weight_decay < 0:
        raise ValueError(f"--lr_warmup_steps, --max_grad_norm and --adam_weight_decay must be >= 0, got "
                         f"{args.lr_warmup_steps}, {args.max_grad_norm}, {args.adam_weight_decay}")
    if args.lr_scheduler == "constant" and args.lr_warmup_steps:
        raise ValueError(f"--lr_scheduler constant has no warmup (--lr_warmup_steps {args.lr_warmup_steps}); "
                         "use constant_with_warmup")
    if not (0 <= args.adam_beta1 < 1 and 0 <= args.adam_beta2 < 1):
        raise ValueError(f"--adam_beta1/--adam_beta2 must be in [0, 1), got {args.adam_beta1}, {args.adam_beta2}")
    if args.validation_epochs is not None and args.validation_steps is not None:
        raise ValueError("pass --validation_epochs or --validation_steps, not both")
    if args.quantize is not None:
        from .quant import KINDS

        if args.quantize not in KINDS:
            raise ValueError(f"--quantize must be one of {', '.join(KINDS)}, got {args.quantize!r}")


# ------------------------------------------------------------------------------------------------ data
@dataclass
class TrainData:
    latents: Tensor  # [N, 16, h, w] float32, CPU
    txt: Tensor  # [N, L, C] text token states
    vec: Tensor  # [N, P] pooled text vectors
    captions: list[str]


def read_instance_data(folder: Path, instance_prompt: str | None) -> list[tuple[Path, str]]:
    """(image, caption) pairs: the same-name .txt file, else `instance_prompt`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--instance_data_dir {folder} is not a folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ValueError(f"--instance_data_dir {folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    pairs, missing, empty = [], [], []
    for image in images:
        txt = image.with_suffix(".txt")
        text = txt.read_text(encoding="utf-8").strip() if txt.is_file() else instance_prompt
        (missing if text is None else empty if not text.strip() else pairs).append((image, text))
    if missing:
        raise ValueError(f"{len(missing)} images have no .txt caption and no --instance_prompt was given: "
                         f"{', '.join(p.name for p, _ in missing[:5])}")
    if empty:
        raise ValueError(f"empty captions for {', '.join(p.name for p, _ in empty[:5])}")
    return pairs


def load_image(path: Path, resolution: int) -> Tensor:
    """An image file -> [3, R, R] in [-1, 1]: short side resized to R (bicubic), centred square crop."""
    try:
        image = Image.open(path).convert("RGB")
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    scale = resolution / min(image.size)
    w, h = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)  # [R, R, 3]
    return x.permute(2, 0, 1)  # [3, R, R]


@torch.no_grad()
def cache_data(pipe, pairs: list[tuple[Path, str]], resolution: int, max_len: int, batch: int = 8) -> TrainData:
    """Encode every image (posterior mean) and caption once; the frozen encoders are not needed again."""
    vae = pipe.vae
    weight = next(vae.parameters())
    latents = []
    for i in range(0, len(pairs), batch):
        x = torch.stack([load_image(p, resolution) for p, _ in pairs[i : i + batch]])  # [b, 3, R, R]
        latents.append(vae.encode(x.to(weight.device, weight.dtype)).float().cpu())  # [b, 16, R/8, R/8]
    captions = [c for _, c in pairs]
    txt, vec = pipe.encode_prompt(captions, max_sequence_length=max_len)  # [N, L, C], [N, P]
    return TrainData(torch.cat(latents), txt.float().cpu(), vec.float().cpu(), captions)


def stream_rows(n: int, batch: int, index: int, seed: int) -> Tensor:
    """Rows of micro-batch `index`: items [index*batch, (index+1)*batch) of an endless stream of per-epoch shuffles
    (epoch e from a generator of (seed, e)); any micro-batch is computed without replaying those before it."""
    from .train.loop import step_generator

    start = index * batch
    epochs = range(start // n, (start + batch - 1) // n + 1)
    stream = torch.cat([torch.randperm(n, generator=step_generator(seed, "lora-epoch", e, 0)) for e in epochs])
    offset = start - epochs[0] * n
    return stream[offset : offset + batch]


# ------------------------------------------------------------------------------------------------ adapters
class LoraParams(nn.Module):
    """The trained adapters as one module (keys `<module, '/' for '.'>.down|up`): what a checkpoint stores."""

    def __init__(self, adapters: dict[str, LoraAdapter]):
        super().__init__()
        self.adapters = nn.ModuleDict({name.replace(".", "/"): a for name, a in adapters.items()})


def resolve_targets(model: nn.Module, spec: str) -> list[str]:
    """--target_modules (comma-separated names or dotted suffixes of linear modules) -> module names."""
    linears = list(linear_shapes(model))
    patterns = [s.strip() for s in spec.split(",") if s.strip()]
    if not patterns:
        raise ValueError(f"--target_modules names no module: {spec!r}")
    names: list[str] = []
    for pattern in patterns:
        found = [n for n in linears if n == pattern or n.endswith("." + pattern)]
        if not found:
            raise ValueError(f"--target_modules {pattern!r} matches no linear module; names are fluxkit's BFL ones "
                             f"(e.g. {', '.join(DEFAULT_TARGETS[:3])}, linear1), not diffusers' (attn.to_q, ...)")
        names += [n for n in found if n not in names]
    return names


def add_trainable_lora(model: nn.Module, names: list[str], rank: int, alpha: float, seed: int) -> LoraParams:
    """Wrap each named module and give it a fresh trainable fp32 adapter: A ~ N(0, 1/r) (std 1/r), B = 0."""
    gen = torch.Generator().manual_seed(seed)
    device = next(p.device for p in model.parameters())
    adapters = {}
    for name in names:
        module = model.get_submodule(name)
        down = torch.randn(rank, module.in_features, generator=gen) / rank  # A [r, in]
        up = torch.zeros(module.out_features, rank)  # B [out, r]
        adapters[name] = LoraAdapter(down, up, torch.full((rank,), alpha / rank)).to(device).requires_grad_(True)
    attach(model, ADAPTER, adapters)
    set_active(model, {ADAPTER: 1.0})
    return LoraParams(adapters)


def lr_factor(step: int, scheduler: str, warmup: int, total: int) -> float:
    """The LR multiplier at (0-based) `step`; transformers' get_scheduler schedules, with warmup reaching the full
    rate at its last step (step + 1) / warmup, so no step runs at LR 0. linear/cosine decay to 0 at `total`."""
    if scheduler == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    if scheduler == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1.0 - progress) if scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# ------------------------------------------------------------------------------------------------ training
@dataclass
class LoraTrainResult:
    lora_path: Path
    step: int
    history: list[float]  # loss per optimizer step, the whole run (resumed sessions included)
    pipe: object  # the FluxPipeline, its transformer holding the trained adapter `ADAPTER`


@dataclass
class _Setup:
    pipe: object
    data: TrainData
    lora: LoraParams
    guidance: float | None
    resolution: int
    validation: tuple[Tensor, Tensor] | None  # the validation prompt's (txt [1, L, C], vec [1, P])


def train_lora(args: argparse.Namespace) -> LoraTrainResult:
    """Run (or, with --resume_from_checkpoint latest, continue) the training that `args` describes."""
    from .train.report import plot_losses

    check_args(args)
    pairs = read_instance_data(args.instance_data_dir, args.instance_prompt)
    run_folder, options = _check_output(args)
    s = _setup(args, pairs)
    atomic_write_text(run_folder.root / "args.json", json.dumps(options, indent=2))  # once loading has worked
    model = s.pipe.transformer
    opt = torch.optim.AdamW(s.lora.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                            weight_decay=args.adam_weight_decay)
    state = run_folder.load_checkpoint(s.lora, None) if args.resume_from_checkpoint else None
    start, history, elapsed = 0, [], 0.0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        start, history, elapsed = state["step"], list(state["history"]), state["elapsed_s"]
        if start > args.max_train_steps:
            raise ValueError(f"--max_train_steps {args.max_train_steps} is below the step of the latest checkpoint "
                             f"({start})")
    total, n = args.max_train_steps, len(s.data.captions)
    model.gradient_checkpointing = args.gradient_checkpointing
    model.train()
    bar = tqdm(total=total, initial=start, desc="train-lora", disable=args.quiet, dynamic_ncols=True)
    began = time.monotonic()
    for step in range(start, total):
        loss, lr = _optimizer_step(args, s, opt, step)
        history.append(loss)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.2e}")
        run_folder.log({"step": done, "lr": lr, "loss": loss})
        if done % 50 == 0:
            plot_losses(history, run_folder.root / "loss.png", "LoRA")
        if done % args.checkpointing_steps == 0 or done == total:
            state = {"step": done, "optimizer": opt.state_dict(), "history": history,
                     "elapsed_s": elapsed + time.monotonic() - began}
            keep = args.checkpoints_total_limit or 1 << 30
            ckpt = run_folder.save_checkpoint(done, s.lora, None, state, keep)
            save_adapter(ckpt, ADAPTER, model)  # a LoRA file per checkpoint, as diffusers' script writes
        if s.validation is not None and _validation_due(args, done, n):
            _validate(args, s, run_folder.root / "validation" / f"step-{done:08d}")
    bar.close()
    elapsed += time.monotonic() - began
    model.eval()
    path = save_adapter(args.output_dir, ADAPTER, model)
    plot_losses(history, run_folder.root / "loss.png", "LoRA")
    run_folder.mark_done({"steps": total, "final_loss": history[-1] if history else None,
                          "train_seconds": round(elapsed, 1), "lora": WEIGHT_NAME, "images": n,
                          "modules": len(s.lora.adapters)})
    return LoraTrainResult(path, total, history, s.pipe)


def _optimizer_step(args: argparse.Namespace, s: _Setup, opt: torch.optim.Optimizer, step: int) -> tuple[float, float]:
    """One update from `gradient_accumulation_steps` micro-batches -> (mean loss, learning rate)."""
    from .train.loop import step_generator

    model, device, accum = s.pipe.transformer, s.pipe.device, args.gradient_accumulation_steps
    lr = args.learning_rate * lr_factor(step, args.lr_scheduler, args.lr_warmup_steps, args.max_train_steps)
    for group in opt.param_groups:
        group["lr"] = lr
    gen = step_generator(args.seed, STAGE, step, 0)  # every draw of this step: exact resume without RNG state
    opt.zero_grad(set_to_none=True)
    loss = 0.0
    for k in range(accum):
        rows = stream_rows(len(s.data.captions), args.train_batch_size, step * accum + k, args.seed)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"):
            micro = flow_loss(model, s.data, rows, gen, s.guidance, device, args.logit_mean, args.logit_std)
        (micro / accum).backward()  # gradients of the mean over the accumulated micro-batches
        loss += micro.item() / accum
    if args.max_grad_norm > 0:
        nn.utils.clip_grad_norm_(s.lora.parameters(), args.max_grad_norm)
    opt.step()
    return loss, lr


def flow_loss(model: nn.Module, data: TrainData, rows: Tensor, gen: torch.Generator, guidance: float | None,
              device: torch.device, logit_mean: float = 0.0, logit_std: float = 1.0) -> Tensor:
    """The base recipe's rectified-flow loss (fluxkit.train.flow) on cached rows."""
    from .train.flow import FlowBatch, noisy, position_ids

    latents = data.latents[rows]  # [B, 16, h, w]
    txt, vec = data.txt[rows].to(device), data.vec[rows].to(device)  # [B, L, C], [B, P]
    b = FlowBatch(sampling.pack(latents).to(device), txt, vec,
                  *position_ids(len(rows), *latents.shape[-2:], txt.shape[1], device))
    x_t, t, target = noisy(b, gen, logit_mean, logit_std)  # [B, L_img, 64], [B], [B, L_img, 64]
    g = torch.full((len(rows),), guidance, device=device) if guidance is not None else None
    pred = model(x_t, b.img_ids, b.txt, b.txt_ids, t, b.vec, g)  # [B, L_img, 64]
    return F.mse_loss(pred.float(), target)


def _check_output(args: argparse.Namespace):
    """(the output folder as a RunFolder, the options to save); a resumed run must keep every option outside
    RESUMABLE, and a folder holding a run is only continued, never overwritten."""
    from .train.loop import RunFolder

    root = Path(args.output_dir)
    saved = root / "args.json"
    mine = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("run", "command")}
    if saved.is_file():
        if not args.resume_from_checkpoint:
            raise ValueError(f"--output_dir {root} already holds a run; pass --resume_from_checkpoint latest to "
                             "continue it, or choose another --output_dir")
        theirs = json.loads(saved.read_text())
        diffs = sorted(k for k in set(mine) | set(theirs) if k not in RESUMABLE and mine.get(k) != theirs.get(k))
        if diffs:
            raise ValueError(f"--resume_from_checkpoint: options {diffs} differ from {saved}; only "
                             f"{sorted(RESUMABLE)} may change between sessions")
    root.mkdir(parents=True, exist_ok=True)
    return RunFolder(root), mine


def _setup(args: argparse.Namespace, pairs: list[tuple[Path, str]]) -> _Setup:
    """Load the base, cache the data, attach the trainable adapters."""
    from .devices import default_device
    from .pipeline import FluxPipeline

    try:
        device = default_device() if args.device == "auto" else torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}") from None
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=dtype, device=device, quantize=args.quantize)
    model = pipe.transformer
    if model.params.guidance_embed:
        guidance = DIFFUSERS_GUIDANCE if args.guidance_scale is None else args.guidance_scale
    elif args.guidance_scale is not None:
        raise ValueError(f"--guidance_scale applies to guidance-distilled (dev-like) models; {args.model} has no "
                         "guidance embedding")
    else:
        guidance = None
    resolution = args.resolution or min(pipe.spec.default_size)
    max_len = args.max_sequence_length or pipe.spec.max_sequence_length
    data = cache_data(pipe, pairs, resolution, max_len)
    validation = None
    if args.validation_prompt is not None:
        validation = pipe.encode_prompt([args.validation_prompt], max_sequence_length=max_len)
    if device.type != "cpu":
        pipe.text_encoder.to("cpu")  # every prompt is embedded: free the accelerator's memory for training
    model.requires_grad_(False)
    targets = resolve_targets(model, args.target_modules)
    alpha = float(args.rank if args.lora_alpha is None else args.lora_alpha)
    lora = add_trainable_lora(model, targets, args.rank, alpha, args.seed)
    return _Setup(pipe, data, lora, guidance, resolution, validation)


def _validation_due(args: argparse.Namespace, done: int, n: int) -> bool:
    """At the last step, and every --validation_steps steps or every --validation_epochs epochs (default 50)."""
    if done == args.max_train_steps:
        return True
    if args.validation_steps is not None:
        return done % args.validation_steps == 0
    per_step, every = args.train_batch_size * args.gradient_accumulation_steps, args.validation_epochs or 50
    return (done * per_step) // (n * every) > ((done - 1) * per_step) // (n * every)  # an epoch boundary passed


def _validate(args: argparse.Namespace, s: _Setup, stem: Path) -> None:
    """--num_validation_images images of the validation prompt (seeds seed, seed+1, ...), as `stem`-i.png."""
    model, (txt, vec) = s.pipe.transformer, s.validation
    k = args.num_validation_images
    model.eval()
    images = s.pipe(prompt_embeds=txt.expand(k, -1, -1), pooled_prompt_embeds=vec.expand(k, -1),
                    height=s.resolution, width=s.resolution, num_inference_steps=args.validation_inference_steps,
                    guidance_scale=s.guidance, generator=[torch.Generator().manual_seed(args.seed + i)
                                                          for i in range(k)]).images
    model.train()
    stem.parent.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(stem.parent / f"{stem.name}-{i}.png")
