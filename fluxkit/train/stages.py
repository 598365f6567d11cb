"""One entry point for every stage (ae, cache, base, dev, schnell and the fill / canny / kontext / regional variants):
`run_stage(cfg, runs_dir, ...)`, used by the CLI, torchrun and the tests."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from ..devices import bf16_is_fast
from .config import TrainConfig
from .loop import Dist, RunFolder, init_distributed, train


def resolve_bf16(cfg: TrainConfig, dist: Dist, quiet: bool) -> TrainConfig:
    """`train.bf16 = "auto"` made concrete for this device (the run folder keeps "auto", so resume works anywhere)."""
    if cfg.train.bf16 != "auto":
        return cfg
    fast = bf16_is_fast(dist.device)
    if not fast and not quiet and dist.is_main:
        print(f"note: {dist.device} has no fast bf16 (no AVX512-BF16/AMX); training in fp32", file=sys.stderr)
    return replace(cfg, train=replace(cfg.train, bf16=fast))


@dataclass
class StageResult:
    finished: bool
    run: RunFolder
    step: int | None = None  # the training step reached (None for the cache stage)
    model: nn.Module | None = None  # this rank's trained weights (the DDP test compares them across ranks)
    ema: nn.Module | None = None


def run_stage(cfg: TrainConfig, runs_dir: str | Path, *, resume: bool = False, max_minutes: float | None = None,
              quiet: bool = False, dist: Dist | None = None) -> StageResult:
    """Run (or with `resume`, continue) the stage `cfg` describes in runs_dir/cfg.name.

    Stops cleanly with a checkpoint after `max_minutes`; `finished` says whether the stage completed (exported).
    """
    from .ae import AETask
    from .cache import build_cache
    from .distill import DevTask, SchnellTask
    from .flow import BaseTask
    from .variants import TASKS as VARIANT_TASKS

    if max_minutes is not None and max_minutes <= 0:
        raise ValueError(f"max_minutes must be positive, got {max_minutes}")
    runs_dir = Path(runs_dir)
    dist = dist or init_distributed("auto")
    deadline = time.monotonic() + 60 * max_minutes if max_minutes is not None else math.inf
    run = RunFolder.prepare(cfg, runs_dir, resume, dist)
    cfg = resolve_bf16(cfg, dist, quiet)
    if cfg.stage == "cache":
        return StageResult(build_cache(cfg, run, dist, runs_dir, max_minutes=max_minutes, quiet=quiet), run)
    if cfg.stage == "ae":
        task = AETask(cfg, dist, runs_dir)
    elif cfg.stage == "base":
        task = BaseTask(cfg, dist, runs_dir)
    elif cfg.stage == "dev":
        task = DevTask(cfg, dist, runs_dir)
    elif cfg.stage in VARIANT_TASKS:
        task = VARIANT_TASKS[cfg.stage](cfg, dist, runs_dir)
    else:
        task = SchnellTask(cfg, dist, runs_dir, run, deadline, quiet)
        if not task.ready:  # the time budget ran out while the teacher trajectories were being computed
            return StageResult(False, run, 0)
    left = None if max_minutes is None else max(0.0, (deadline - time.monotonic()) / 60)
    result = train(task, cfg, run, dist, max_minutes=left, quiet=quiet)
    return StageResult(result.finished, run, result.step, result.model, result.ema)
