"""Benchmark (b): the shipped tiny models end to end, bf16 and fp32 side by side.

    python -m benchmarks.tiny_e2e                  # tiny-schnell at 1/2/4 steps, tiny-dev at its default steps, 128^2
    python -m benchmarks.tiny_e2e --batches 1 8 --dtypes bf16 fp32 --repeat 5 --json tiny_e2e.json
    python -m benchmarks.tiny_e2e --random-weights --dtypes fp32   # the architectures' cost, before weights ship

Three tables, all measured in this one run:
1. warm seconds per image, at each batch size, in each dtype, and the fp32 / bf16 ratio (> 1: bf16 is faster);
2. where the time goes at batch 1: text encoding (`encode_prompt`), denoising (the sampler from prompt embeddings
   to latents) and decoding (the autoencoder), timed separately;
3. cold `fluxkit generate`: the wall time of a fresh `python -m fluxkit generate` process that writes one image,
   from process start (interpreter, imports, model loading, first call) to exit, per model at its last step count.
Warm timings are the median of --repeat calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import describe_machine, random_weight_folder, timeit
from benchmarks.quant_quality import suite_prompts, write_json
from fluxkit.devices import parse_dtype

REPO_ROOT = Path(__file__).resolve().parents[1]


def _images(n: int, size: tuple[int, int]) -> list[str]:
    """n prompts, cycling through the eval suite's (a batch holds different prompts, as real batches do)."""
    prompts = suite_prompts(min(n, 8), size)
    return [prompts[i % len(prompts)] for i in range(n)]


def warm_rows(pipe, name: str, dtype: str, steps_list: list[int], batches: list[int], size: tuple[int, int],
              repeat: int) -> list[dict]:
    """Seconds per image of full pipeline calls, one row per (steps, batch)."""
    rows = []
    for steps in steps_list:
        for batch in batches:
            prompts = _images(batch, size)

            def call(prompts=prompts, steps=steps):
                gens = [torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))]
                pipe(prompts, height=size[0], width=size[1], num_inference_steps=steps, generator=gens)

            seconds = timeit(call, warmup=1, repeat=repeat)
            rows.append({"model": name, "steps": steps, "batch": batch, "dtype": dtype, "s_per_image": seconds / batch})
    return rows


def split_rows(pipe, name: str, dtype: str, steps_list: list[int], size: tuple[int, int], repeat: int) -> list[dict]:
    """Text encoding / denoising / decoding seconds of one image, one row per step count."""
    from fluxkit.sampling import latent_size, unpack

    prompt = _images(1, size)
    txt, vec = pipe.encode_prompt(prompt)
    h, w = latent_size(size[0], size[1], pipe.vae.params.downscale)
    encode = timeit(lambda: pipe.encode_prompt(prompt), warmup=1, repeat=repeat)
    rows = []
    for steps in steps_list:
        def denoise(steps=steps):
            return pipe(prompt_embeds=txt, pooled_prompt_embeds=vec, height=size[0], width=size[1],
                        num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0),
                        output_type="latent").images

        latents = denoise()  # [1, L_img, 64]
        rows.append({"model": name, "steps": steps, "dtype": dtype, "encode_s": encode,
                     "denoise_s": timeit(denoise, warmup=0, repeat=repeat),
                     "decode_s": timeit(lambda latents=latents: pipe.decode(unpack(latents, h, w)), warmup=1,
                                        repeat=repeat)})
    return rows


def cold_generate(model: str, steps: int, size: tuple[int, int], threads: int | None) -> float:
    """Wall seconds of a fresh `python -m fluxkit generate` process writing one image, start to exit."""
    with tempfile.TemporaryDirectory(prefix="fluxkit-cold-") as tmp:
        cmd = [sys.executable, "-m", "fluxkit", "generate", _images(1, size)[0], "--model", model,
               "--steps", str(steps), "--height", str(size[0]), "--width", str(size[1]), "--seed", "0",
               "--quiet", "--output", str(Path(tmp) / "image.png")]
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0 or not (Path(tmp) / "image.png").is_file():
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds


def measure(args: argparse.Namespace) -> dict:
    from fluxkit.pipeline import FluxPipeline

    warm, split, cold = [], [], []
    for name, steps_arg in ((args.schnell, args.schnell_steps), (args.dev, args.dev_steps)):
        for dtype in args.dtypes:
            pipe = FluxPipeline.from_pretrained(name, torch_dtype=parse_dtype(dtype))
            size = (args.size, args.size) if args.size else tuple(pipe.spec.default_size)
            steps_list = steps_arg or [pipe.spec.default_steps]
            warm += warm_rows(pipe, name, dtype, steps_list, args.batches, size, args.repeat)
            split += split_rows(pipe, name, dtype, steps_list, size, args.repeat)
            del pipe
        if args.cold:
            cold.append({"model": name, "steps": steps_list[-1], "size": list(size),
                         "wall_s": cold_generate(name, steps_list[-1], size, args.threads)})
    return {"warm": warm, "split": split, "cold": cold}


def format_tables(result: dict, dtypes: list[str]) -> str:
    first, last = dtypes[0], dtypes[-1]
    by_key = {(r["model"], r["steps"], r["batch"], r["dtype"]): r["s_per_image"] for r in result["warm"]}
    keys = list(dict.fromkeys((r["model"], r["steps"], r["batch"]) for r in result["warm"]))
    compare = len(dtypes) > 1  # the ratio column: last dtype's time / first dtype's time
    lines = ["warm seconds per image", f"{'model':<24} {'steps':>5} {'batch':>5} "
             + " ".join(f"{d:>8}" for d in dtypes) + (f" {last + '/' + first:>10}" if compare else "")]
    for model, steps, batch in keys:
        values = [by_key[(model, steps, batch, d)] for d in dtypes]
        lines.append(f"{model[-24:]:<24} {steps:>5} {batch:>5} " + " ".join(f"{v:>8.4f}" for v in values)
                     + (f" {values[-1] / values[0]:>9.2f}x" if compare else ""))
    lines += ["", "batch-1 split (seconds)",
              f"{'model':<24} {'steps':>5} {'dtype':>6} {'encode':>8} {'denoise':>8} {'decode':>8} {'sum':>8}"]
    for r in result["split"]:
        total = r["encode_s"] + r["denoise_s"] + r["decode_s"]
        lines.append(f"{r['model'][-24:]:<24} {r['steps']:>5} {r['dtype']:>6} {r['encode_s']:>8.4f} "
                     f"{r['denoise_s']:>8.4f} {r['decode_s']:>8.4f} {total:>8.4f}")
    if result["cold"]:
        lines += ["", "cold `fluxkit generate` (process start to exit, one image, default dtype)",
                  f"{'model':<24} {'steps':>5} {'size':>9} {'wall s':>8}"]
        lines += [f"{r['model'][-24:]:<24} {r['steps']:>5} {'x'.join(map(str, r['size'])):>9} {r['wall_s']:>8.2f}"
                  for r in result["cold"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schnell", default="fluxkit-tiny-schnell", help="the schnell-like model")
    parser.add_argument("--schnell-steps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dev", default="fluxkit-tiny-dev", help="the dev-like model")
    parser.add_argument("--dev-steps", type=int, nargs="+", help="default: the model's default steps")
    parser.add_argument("--size", type=int, help="image side (default: each model's default size)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], help="first is the ratio's denominator")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--no-cold", dest="cold", action="store_false", help="skip the cold `fluxkit generate` runs")
    parser.add_argument("--threads", type=int, help="torch threads, here and in the cold process")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--random-weights", action="store_true",
                        help="time the tiny-schnell / tiny-dev architectures with random weights (before they ship)")
    args = parser.parse_args(argv)
    for dtype in args.dtypes:
        parse_dtype(dtype)  # a precise error for a bad name before anything is loaded
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe_machine())
    with tempfile.TemporaryDirectory(prefix="fluxkit-e2e-") as tmp:
        if args.random_weights:
            args.schnell, args.dev = (str(random_weight_folder(p, tmp)) for p in ("tiny-schnell", "tiny-dev"))
        result = measure(args)
    print(format_tables(result, args.dtypes))
    write_json(args.json, {"machine": describe_machine(), "args": vars(args), **result})
    return result


if __name__ == "__main__":
    main()
