"""Shared helpers for the benchmark scripts: machine description and a careful timer."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from fluxkit.devices import cpu_has_fast_bf16

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"native bf16: {cpu_has_fast_bf16()}")


def timeit(fn, *, warmup: int = 2, repeat: int = 5) -> float:
    """Median seconds per call."""
    return timeit_interleaved({"fn": fn}, warmup=warmup, repeat=repeat)["fn"]


def timeit_interleaved(fns: dict, *, warmup: int = 1, repeat: int = 5) -> dict:
    """Median seconds per call of each function, timed round-robin (a, b, a, b, ...) so that a machine whose speed
    drifts during the run (shared virtual CPUs do) biases none of them."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def random_weight_folder(preset: str, root):
    """A fluxkit model folder with `preset`'s architecture, random transformer weights (seed 0) and the shipped tiny
    autoencoder: the cost per image of a model that is not (yet) shipped, since weights' values do not change it."""
    from pathlib import Path

    from safetensors.torch import load_file

    from fluxkit.autoencoder import AutoEncoder
    from fluxkit.hub import WEIGHTS_DIR, save_native
    from fluxkit.model import Flux
    from fluxkit.params import PRESETS

    spec = PRESETS[preset]
    torch.manual_seed(0)
    ae = AutoEncoder(spec.ae)
    if spec.ae == PRESETS["tiny-base"].ae and (WEIGHTS_DIR / "ae.safetensors").is_file():
        ae.load_state_dict(load_file(WEIGHTS_DIR / "ae.safetensors"))
    folder = Path(root) / f"{preset}-random"
    save_native(folder, Flux(spec.flux), spec, ae=ae, dtype=torch.float32)
    return folder
