"""Benchmark (c): a full-size FLUX.1-schnell-shaped transformer (12B, random weights) at 512^2, 4 steps, on the CPU:
peak resident memory and seconds per step for bf16, int8, fp8, q8_0 and q4_0.

    python -m benchmarks.full_size                                   # the real thing: ~1 hour on 2 cores
    python -m benchmarks.full_size --kinds q4_0 int8 --json full.json
    python -m benchmarks.full_size --kinds q4_0 int8 --dtype fp32 --steps 2   # an AVX2 CPU: bf16 is emulated there
    python -m benchmarks.full_size --depth 1 --single 1 --hidden 64 --heads 2 --size 64 --steps 2   # seconds

No configuration holds more than its weights and one linear in flight: the network is built on the meta device and
each linear of the blocks is drawn (normal, std --std), quantized and swapped in one at a time, so a quantized
model's memory is its quantized size. bf16 is written once to a random-weight safetensors file (in chunks, in
--workdir) and loaded memory-mapped: its weights are file-backed pages the kernel can drop and re-read, so it runs
even where 24 GB of weights do not fit in RAM (skipped when the disk has less than 1.25x the file free). Text
encoders and autoencoder are left out: the pipeline gets random `prompt_embeds` [1, 256, 4096] and
`pooled_prompt_embeds` [1, 768] and returns latents.

Each configuration runs in a fresh child process, so its memory figures are its own. "build pk" is the peak RSS
while drawing/quantizing or mapping the weights (quantizing a linear needs a few float32 copies of it: a cost a model
loaded from a quantized file does not pay); "RSS built" is the resident memory once built (freed heap handed back);
"peak RSS" is the peak while sampling (VmHWM reset after building), weights included: the memory the model needs to
run. "anon" is the largest anonymous (not file-backed) RSS seen at the end of each step; for bf16 it excludes the
mapped weights. "step 1" includes first-touch costs (page faults on the mapped file, first allocations); "s/step" is
the median of the later steps. A quantized kind is skipped when the machine's available memory is below its
estimated size. --dtype auto computes in bf16 where the CPU has native bf16 (AVX512-BF16, AMX) and in fp32 where
it is emulated (AVX2: ~100x slower than fp32); fp32 compute keeps the quantized codes as they are (each linear
dequantizes to fp32 in flight) and skips bf16, whose fp32 copy would not fit.
Targets (issue 5): peak RSS <= 16 GiB (aim 14), <= 60 s per step (aim 45).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import describe_machine
from fluxkit.atomic import atomic_write
from fluxkit.model import Flux
from fluxkit.params import FLUX_SCHNELL, PRESETS, FluxParams
from fluxkit.quant import FLUX_FULL_PRECISION, KINDS

GIB = 2**30
DEFAULT_KINDS = ("bf16", "int8", "fp8", "q8_0", "q4_0")
TARGET_RSS_GIB, TARGET_STEP_S = 16.0, 60.0
REPO_ROOT = Path(__file__).resolve().parents[1]
_FORWARDED = ("size", "steps", "txt_tokens", "depth", "single", "hidden", "heads", "std", "seed", "threads", "dtype")


def flux_params(args: argparse.Namespace) -> FluxParams:
    """FLUX.1-schnell with the size overrides; RoPE axes keep FLUX.1's 1/8 : 7/16 : 7/16 split of the head dim."""
    hidden, heads = args.hidden or FLUX_SCHNELL.hidden_size, args.heads or FLUX_SCHNELL.num_heads
    if hidden % heads:
        raise ValueError(f"--hidden {hidden} is not divisible by --heads {heads}")
    head_dim = hidden // heads
    if head_dim % 32:
        raise ValueError(f"head dim --hidden/--heads = {head_dim} must be a multiple of 32 (RoPE axes split)")
    return replace(FLUX_SCHNELL, hidden_size=hidden, num_heads=heads, axes_dim=(head_dim // 8, head_dim * 7 // 16,
                   head_dim * 7 // 16), depth=FLUX_SCHNELL.depth if args.depth is None else args.depth,
                   depth_single_blocks=FLUX_SCHNELL.depth_single_blocks if args.single is None else args.single)


def _quantized(name: str) -> bool:
    """Whether quantize_model would swap this linear (everything outside FLUX_FULL_PRECISION)."""
    return name.split(".")[0] not in FLUX_FULL_PRECISION


def estimated_bytes(params: FluxParams, kind: str, float_bytes: int = 2) -> int:
    """Bytes of the weights once built: quantized linears in their storage format, every other tensor (and the
    quantized linears' biases) in the compute dtype, `float_bytes` wide (bf16: 2, fp32: 4)."""
    from fluxkit.gguf import BLOCK_QTYPES, row_bytes

    with torch.device("meta"):
        model = Flux(params)
    total = 0
    for name, m in model.named_modules():
        if type(m) is nn.Linear and _quantized(name) and kind != "bf16":
            out, inp = m.out_features, m.in_features
            codes = out * row_bytes(inp, kind) if kind in BLOCK_QTYPES else out * inp
            scales = 4 * out if kind in ("int8", "fp8_channel") else 4 if kind == "fp8" else 0
            total += codes + scales + (float_bytes * out if m.bias is not None else 0)
        elif not any(True for _ in m.children()):
            total += float_bytes * sum(p.numel() for p in m.parameters(recurse=False))
    return total


def _random_tensor(key: str, shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    """Norm scales 1, biases 0, weights N(0, std^2), in bf16: a network whose activations stay finite."""
    if key.endswith(".scale"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if key.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0, std, generator=gen)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress(what: str, total: int, every_s: float = 15.0):
    """done(i) logs "what: i/total" at most every `every_s` seconds: long builds show progress, toy runs stay quiet."""
    last = time.perf_counter()

    def done(i: int) -> None:
        nonlocal last
        if time.perf_counter() - last >= every_s:
            _log(f"  {what}: {i}/{total}")
            last = time.perf_counter()

    return done


# ---------------------------------------------------------------------------------------------------------------------
# Building the networks (in the child process)


def build_quantized(params: FluxParams, kind: str, std: float, seed: int) -> Flux:
    """Flux with every block linear quantized to `kind`, drawn and quantized one linear at a time."""
    from fluxkit.quant import quantize_linear

    with torch.device("meta"):
        model = Flux(params)
    gen = torch.Generator().manual_seed(seed)
    targets = [name for name, m in model.named_modules() if type(m) is nn.Linear and _quantized(name)]
    progress = _progress(f"{kind}: linears drawn and quantized", len(targets))
    for i, name in enumerate(targets):
        linear = model.get_submodule(name)  # on the meta device: give it real random tensors, then swap it out
        linear.weight = nn.Parameter(_random_tensor(f"{name}.weight", linear.weight.shape, std, gen), False)
        if linear.bias is not None:
            linear.bias = nn.Parameter(_random_tensor(f"{name}.bias", linear.bias.shape, std, gen), False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantize_linear(linear, kind))
        del linear  # the bf16 weight is freed before the next one is drawn
        progress(i + 1)
    for name, p in list(model.named_parameters()):
        if p.is_meta:  # embedders, final layer, norm scales: full precision
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, nn.Parameter(_random_tensor(name, p.shape, std, gen), False))
    return model.eval()


def write_random_safetensors(path: Path, params: FluxParams, std: float, seed: int) -> Path:
    """A BFL-named bf16 checkpoint of random weights, written tensor by tensor (never the whole model in memory).
    An existing file with the same header (shapes, std, seed) is reused."""
    from fluxkit.convert import expected_bfl_shapes

    shapes = expected_bfl_shapes(params)
    entries, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        entries[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    entries["__metadata__"] = {"format": "pt", "fluxkit.random": f"std={std} seed={seed}"}
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads the header to 8 bytes with spaces
    prefix = len(header).to_bytes(8, "little") + header
    if path.is_file() and path.stat().st_size == len(prefix) + offset:
        with path.open("rb") as f:
            if f.read(len(prefix)) == prefix:
                _log(f"reusing {path}")
                return path
    gen = torch.Generator().manual_seed(seed)
    _log(f"writing {offset / GIB:.2f} GiB of random bf16 weights to {path}")
    progress = _progress("tensors written", len(shapes))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(prefix)
            for i, (key, shape) in enumerate(shapes.items()):
                f.write(_random_tensor(key, shape, std, gen).view(torch.uint8).numpy().data)
                progress(i + 1)

    atomic_write(path, write)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# One configuration (the child process)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim): drawing and quantizing the weights leaves free
    chunks that a model loaded from a quantized file would never have allocated."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the RSS after building keeps those chunks
        pass


def run_worker(args: argparse.Namespace) -> dict:
    """Build or load the model, sample once, and report times and memory."""
    from fluxkit.autoencoder import AutoEncoder
    from fluxkit.loading import load_flux_transformer
    from fluxkit.pipeline import FluxPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    params, kind, dtype = flux_params(args), args.worker, compute_dtype(args.dtype)
    start = time.perf_counter()
    if kind == "bf16":  # dtype=None keeps the mapped bf16 tensors as they are (no copy)
        model = load_flux_transformer(args.file, params=params, dtype=None)
    else:
        # fp32 compute: the quantized linears dequantize to the input's dtype, their stored codes stay as they are;
        # only biases, norm scales and the small full-precision layers around the blocks become fp32
        model = build_quantized(params, kind, args.std, args.seed).to(dtype)
    build_s = time.perf_counter() - start
    build_peak = _status_bytes("VmHWM")
    _release_free_memory()
    rss_built = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS: the peak below is the sampling peak, weights included
    spec = replace(PRESETS["flux-schnell"], flux=params)
    with torch.device("meta"):  # the pipeline reads only the autoencoder's downscale factor for latent output
        vae = AutoEncoder(spec.ae)
    pipe = FluxPipeline(model, vae, None, spec)
    gen = torch.Generator().manual_seed(args.seed)
    txt = torch.randn(1, args.txt_tokens, params.context_in_dim, generator=gen).to(dtype)  # [1, L_txt, 4096]
    vec = torch.randn(1, params.vec_in_dim, generator=gen).to(dtype)  # [1, 768]
    marks, anon = [time.perf_counter()], []

    def on_step(_pipe, i, _t, tensors):
        marks.append(time.perf_counter())
        anon.append(_status_bytes("RssAnon"))
        _log(f"  {kind}: step {i + 1}/{args.steps}: {marks[-1] - marks[-2]:.1f} s")
        return tensors

    latents = pipe(prompt_embeds=txt, pooled_prompt_embeds=vec, height=args.size, width=args.size,
                   num_inference_steps=args.steps, generator=gen, output_type="latent",
                   callback_on_step_end=on_step).images  # [1, L_img, 64]
    steps = [b - a for a, b in zip(marks, marks[1:])]
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"kind": kind, "dtype": str(dtype).removeprefix("torch."), "weights_gib": weights / GIB,
            "step_tflop": step_flops(params, latents.shape[1], args.txt_tokens) / 1e12,
            "build_s": build_s, "build_peak_gib": build_peak / GIB, "rss_built_gib": rss_built / GIB,
            "peak_rss_gib": _status_bytes("VmHWM") / GIB,
            "anon_gib": max(anon) / GIB, "step_s": steps, "finite": bool(latents.isfinite().all())}


# ---------------------------------------------------------------------------------------------------------------------
# The parent: one child per configuration


def _available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def compute_dtype(name: str) -> torch.dtype:
    """--dtype: auto is bf16 where the CPU computes it natively (AVX512-BF16/AMX) and fp32 where bf16 is emulated."""
    from fluxkit.devices import cpu_has_fast_bf16

    if name == "auto":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def skip_reason(args: argparse.Namespace, params: FluxParams, kind: str, file: Path) -> str | None:
    """Why `kind` cannot run here (None: it can)."""
    if kind == "bf16" and compute_dtype(args.dtype) != torch.bfloat16:
        return "bf16 weights computed in fp32 would need an fp32 copy of the model (2x the bf16 size)"
    try:
        need = estimated_bytes(params, kind, compute_dtype(args.dtype).itemsize)
    except ValueError as err:  # a K-quant on widths not divisible by 256
        return str(err)
    if kind == "bf16":
        free = shutil.disk_usage(file.parent).free
        if not file.is_file() and free < 1.25 * need:
            return f"{free / GIB:.1f} GiB free on {file.parent}, the bf16 file needs {need / GIB:.1f} GiB (+25%)"
        return None
    available = _available_bytes()
    if need * 1.1 + GIB > available:  # the weights, allocator slack and the interpreter
        return f"needs ~{need / GIB:.1f} GiB of RAM, {available / GIB:.1f} GiB available"
    return None


def run_case(args: argparse.Namespace, kind: str, file: Path) -> dict:
    """Run one configuration in a fresh `python -m benchmarks.full_size --worker KIND` process."""
    with tempfile.TemporaryDirectory(prefix="fluxkit-full-size-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.full_size", "--worker", kind, "--result", str(result),
               "--file", str(file)]
        for name in _FORWARDED:
            if getattr(args, name) is not None:
                cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=env)
        if done.returncode != 0 or not result.is_file():
            why = " (SIGKILL: out of memory?)" if done.returncode == -9 else ""
            return {"kind": kind, "failed": f"child exited with status {done.returncode}{why}"}
        return json.loads(result.read_text())


def row_line(r: dict) -> str:
    if "skipped" in r or "failed" in r:
        return f"{r['kind']:<8} {'skipped: ' + r['skipped'] if 'skipped' in r else 'FAILED: ' + r['failed']}"
    steps = r["step_s"]
    per_step = statistics.median(steps[1:]) if len(steps) > 1 else steps[0]
    meets = r["peak_rss_gib"] <= TARGET_RSS_GIB and per_step <= TARGET_STEP_S
    return (f"{r['kind']:<8} {r['weights_gib']:>8.2f} {r['build_s']:>8.1f} {r['build_peak_gib']:>8.2f} "
            f"{r['rss_built_gib']:>9.2f} "
            f"{r['peak_rss_gib']:>9.2f} {r['anon_gib']:>7.2f} {steps[0]:>8.2f} {per_step:>8.2f} "
            f"{r['step_tflop'] * 1e3 / per_step:>8.1f} "
            f"{'yes' if meets else 'no':>6}{'' if r['finite'] else '  (non-finite latents)'}")


HEADER = (f"{'kind':<8} {'weights':>8} {'build s':>8} {'build pk':>8} {'RSS built':>9} {'peak RSS':>9} {'anon':>7} "
          f"{'step 1 s':>8} {'s/step':>8} {'GFLOP/s':>8} {'meets':>6}   (GiB unless marked s)")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS), choices=["bf16", *KINDS], metavar="KIND")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--txt-tokens", type=int, default=256, help="length of the random prompt embeddings")
    parser.add_argument("--depth", type=int, help="double blocks (default: FLUX.1's 19)")
    parser.add_argument("--single", type=int, help="single blocks (default: FLUX.1's 38)")
    parser.add_argument("--hidden", type=int, help="hidden size (default: FLUX.1's 3072)")
    parser.add_argument("--heads", type=int, help="attention heads (default: FLUX.1's 24)")
    parser.add_argument("--std", type=float, default=0.02, help="std of the random weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads in each child (default: torch's choice)")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="compute dtype; auto: bf16 on CPUs with native bf16, fp32 where it is emulated (AVX2)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()), help="where the bf16 file goes")
    parser.add_argument("--keep-file", action="store_true", help="keep the bf16 file for the next run")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # child process: run this one kind
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        params = flux_params(args)
    except ValueError as err:
        parser.error(str(err))
    if args.worker:
        args.result.write_text(json.dumps(run_worker(args)))
        return []
    print(describe_machine())
    n = _param_count(params)
    print(f"FLUX.1-schnell-shaped transformer: {n / 1e9:.2f}B parameters ({params.depth} double + "
          f"{params.depth_single_blocks} single blocks, hidden {params.hidden_size}), random weights std {args.std}; "
          f"{args.size}^2, {args.steps} steps, {args.txt_tokens} text tokens, "
          f"{str(compute_dtype(args.dtype)).removeprefix('torch.')} compute, "
          f"{step_flops(params, (args.size // 16) ** 2, args.txt_tokens) / 1e12:.2f} TFLOP per step; "
          f"targets: peak RSS <= {TARGET_RSS_GIB:g} GiB, <= {TARGET_STEP_S:g} s/step", flush=True)
    file = args.workdir / (f"fluxkit-random-{params.depth}x{params.depth_single_blocks}-{params.hidden_size}"
                           f"-seed{args.seed}.safetensors")
    print(HEADER, flush=True)
    rows = []
    for kind in args.kinds:
        reason = skip_reason(args, params, kind, file)
        if reason is None and kind == "bf16":
            write_random_safetensors(file, params, args.std, args.seed)
        rows.append({"kind": kind, "skipped": reason} if reason else run_case(args, kind, file))
        print(row_line(rows[-1]), flush=True)
    if file.is_file() and not args.keep_file:
        file.unlink()
    print("\nsummary\n" + HEADER)
    print("\n".join(row_line(r) for r in rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": describe_machine(), "params_b": n / 1e9, "rows": rows,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    return rows


def step_flops(params: FluxParams, img_tokens: int, txt_tokens: int) -> int:
    """Multiply-adds x 2 of one transformer call: each linear's weights times the tokens it sees (image-stream
    weights the image tokens, text-stream the text tokens, single blocks both, modulation and the embedders of
    timestep/vector one), plus attention's QK^T and AV over the joint sequence."""
    with torch.device("meta"):
        model = Flux(params)
    joint = img_tokens + txt_tokens
    total = 0
    for name, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        parts = name.split(".")
        if name.endswith(("_mod.lin", "modulation.lin", "adaLN_modulation.1")) or parts[0] in (
                "time_in", "vector_in", "guidance_in"):
            tokens = 1
        elif parts[0] == "double_blocks":
            tokens = img_tokens if parts[2].startswith("img_") else txt_tokens
        elif parts[0] == "single_blocks":
            tokens = joint
        elif parts[0] == "txt_in":
            tokens = txt_tokens
        else:  # img_in, final_layer.linear
            tokens = img_tokens
        total += 2 * m.in_features * m.out_features * tokens
    blocks = params.depth + params.depth_single_blocks
    return total + blocks * 4 * joint * joint * params.hidden_size


def _param_count(params: FluxParams) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Flux(params).parameters())


if __name__ == "__main__":
    main()
