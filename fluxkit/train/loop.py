"""The training loop every stage shares: DDP, bf16 autocast, AdamW + LR schedule, EMA, checkpoints and resume.

A stage is a `Task`: it owns the network and computes the loss of one batch; this loop does everything else.
Reproducibility: every random draw of step s on rank r comes from a generator seeded by (seed, stage, s, r), so a
run resumed from a checkpoint of step s continues exactly as the uninterrupted run would, with no RNG state to save.
Under `torchrun` each rank draws its own batch from its own data shard, DDP averages the gradients, and rank 0 alone
logs, plots, samples and writes checkpoints.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as torch_dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from .config import RESUMABLE_CHANGES, OptimConfig, TrainConfig, config_differences
from .report import plot_losses


# ------------------------------------------------------------------------------------------------ distribution
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def mean(self, x: Tensor) -> Tensor:
        """The mean of x over ranks (for logging: every rank's loss counts)."""
        if self.world > 1:
            x = x.detach().clone()
            torch_dist.all_reduce(x)
            x /= self.world
        return x

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (so that all ranks stop at the same step)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item())


def init_distributed(device: str = "auto") -> Dist:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on CUDA, gloo on CPU. One process: no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda (ranks pick cuda:LOCAL_RANK), got {device!r}")
    dev = torch.device("cuda", local) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, dev)


def shutdown_distributed(dist: Dist) -> None:
    if dist.world > 1 and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def step_generator(seed: int, stage: str, step: int, rank: int) -> torch.Generator:
    """A CPU generator for one step of one rank (stable across Python runs: no `hash()`)."""
    digest = hashlib.blake2b(f"{seed}/{stage}/{step}/{rank}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


# ------------------------------------------------------------------------------------------------ run folders
def resolve_run(runs_dir: Path, ref: str, what: str) -> Path:
    """A run named in a config: a name under the runs dir, a folder inside one ('tiny-dev-600/export', when no such
    path exists from the working directory), or a path (containing '/')."""
    path = Path(ref).expanduser() if "/" in ref else runs_dir / ref
    if "/" in ref and not path.is_dir() and not path.is_absolute() and (runs_dir / ref).is_dir():
        path = runs_dir / ref
    if not path.is_dir():
        raise ValueError(f"{what} run {ref!r} not found (looked for {path})")
    return path


class RunFolder:
    """runs/<name>/: config.json, log.jsonl, loss.png, samples/, checkpoints/step-N/ + checkpoints/latest, done.json."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"

    @classmethod
    def prepare(cls, cfg: TrainConfig, runs_dir: Path, resume: bool, dist: Dist) -> RunFolder:
        """Create the folder (rank 0) or check that `--resume` continues the same config."""
        run = cls(Path(runs_dir) / cfg.name)
        saved = run.root / "config.json"
        if saved.is_file():
            if not resume:
                raise ValueError(f"run folder {run.root} already exists; pass --resume to continue it, or choose "
                                 "another name (--set name=...)")
            diffs = [d for d in config_differences(json.loads(saved.read_text()), cfg.to_dict())
                     if d not in RESUMABLE_CHANGES]
            if diffs:
                raise ValueError(f"--resume: the config differs from {saved} in {diffs}; only "
                                 f"{sorted(RESUMABLE_CHANGES)} may change between sessions")
        dist.barrier()  # every rank has read the old config before rank 0 rewrites it
        if dist.is_main:
            run.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(saved, json.dumps(cfg.to_dict(), indent=2))
        dist.barrier()
        return run

    def log(self, record: dict) -> None:
        with (self.root / "log.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def latest(self) -> Path | None:
        pointer = self.checkpoints / "latest"
        return self.checkpoints / pointer.read_text().strip() if pointer.is_file() else None

    def save_checkpoint(self, step: int, model: nn.Module, ema: nn.Module | None, state: dict, keep: int) -> Path:
        """Write checkpoints/step-N/ through a temp folder + rename, then move the `latest` pointer (`ema=None`: a
        run without EMA weights, e.g. LoRA training).

        A kill at any moment leaves `latest` on a complete checkpoint: the old one until the pointer is replaced.
        """
        name = f"step-{step:08d}"
        final = self.checkpoints / name
        if not final.is_dir():  # the same step re-saved after a resume holds the same bytes: keep the first
            tmp = self.checkpoints / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(_fp32_state(model), tmp / "model.safetensors")
            if ema is not None:
                save_file(_fp32_state(ema), tmp / "ema.safetensors")
            torch.save(state, tmp / "state.pt")
            os.replace(tmp, final)
        atomic_write_text(self.checkpoints / "latest", name)
        old = sorted(p for p in self.checkpoints.glob("step-*") if p.is_dir() and p.name != name)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p)
        return final

    def load_checkpoint(self, model: nn.Module, ema: nn.Module | None) -> dict | None:
        """Load weights into model/ema and return the state dict (step, optimizer, history), or None if none."""
        ckpt = self.latest()
        if ckpt is None:
            return None
        model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=True)
        if ema is not None:
            ema.load_state_dict(load_file(ckpt / "ema.safetensors"), strict=True)
        return torch.load(ckpt / "state.pt", weights_only=True)  # plain tensors/containers only: no code runs

    def load_ema(self) -> dict[str, Tensor]:
        """The EMA weights of a finished run (a teacher)."""
        done = self.root / "done.json"
        if not done.is_file():
            raise ValueError(f"run {self.root} has not finished (no done.json); finish it with --resume first")
        return load_file(self.latest() / "ema.safetensors")

    def mark_done(self, summary: dict) -> None:
        atomic_write_text(self.root / "done.json", json.dumps(summary, indent=2))

    def unmark_done(self) -> None:
        (self.root / "done.json").unlink(missing_ok=True)


def _fp32_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------ optimisation
class EMA:
    """An exponential moving average copy of a module (fp32), with the usual warm-up of the decay."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # min(decay, (1 + s) / (10 + s)): early averages forget the random init quickly (as in TF's EMA num_updates).
        decay = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)


def lr_at(step: int, cfg: OptimConfig, total: int) -> float:
    """Linear warmup over warmup_steps, then constant or cosine decay to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps - 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: nn.Module, cfg: OptimConfig, lr_mult: Mapping[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only. `lr_mult` maps parameter names to a multiple of the schedule's lr
    (their own groups, after the two plain ones, so runs without multipliers keep their checkpoint layout)."""
    lr_mult = lr_mult or {}
    unknown = set(lr_mult) - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"lr multipliers name no parameter of the model: {sorted(unknown)[:5]}")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for mult in [None, *sorted(set(lr_mult.values()))]:
        mine = [(n, p) for n, p in params if lr_mult.get(n) == mult]
        for matrices in (True, False):
            ps = [p for _, p in mine if (p.ndim >= 2) == matrices]
            if ps or mult is None:
                groups.append({"params": ps, "weight_decay": cfg.weight_decay if matrices else 0.0,
                               "lr_mult": 1.0 if mult is None else mult})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


# ------------------------------------------------------------------------------------------------ the loop
class Task(Protocol):
    model: nn.Module  # the trained weights: checkpointed, EMA-averaged, exported
    net: nn.Module  # what DDP wraps and `losses` calls: `model`, or a wrapper sharing its parameters
    # optional `lr_multipliers: dict[str, float]`: parameter name -> multiple of the schedule's lr

    def losses(self, net: nn.Module, step: int, gen: torch.Generator) -> dict[str, Tensor]:
        """This rank's batch for `step` -> {"loss": optimised scalar, other metrics...}; draws only from `gen`."""
        ...

    def samples(self, ema: nn.Module, path: Path) -> None: ...

    def finish(self, ema: nn.Module, run: RunFolder) -> dict: ...


@dataclass
class LoopResult:
    step: int
    finished: bool
    model: nn.Module
    ema: nn.Module


class _StopSignal:
    """SIGTERM (a session ending) asks for a clean stop: checkpoint after the current step."""

    def __init__(self):
        self.raised, self.previous = False, None

    def __enter__(self):
        if _in_main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def train(task: Task, cfg: TrainConfig, run: RunFolder, dist: Dist, *, max_minutes: float | None = None,
          quiet: bool = False) -> LoopResult:
    """Run (or continue from the run's latest checkpoint) until cfg.train.steps or the time budget."""
    tc = cfg.train
    model = task.model.to(dist.device)
    ema = EMA(model, tc.ema_decay)
    opt = make_optimizer(model, cfg.optim, getattr(task, "lr_multipliers", None))
    state = run.load_checkpoint(model, ema.module)
    start, history, elapsed = 0, [], 0.0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        start, history, elapsed = state["step"], list(state["history"]), state["elapsed_s"]
    if start >= tc.steps:
        return _finish(task, cfg, run, dist, LoopResult(start, True, model, ema.module), history, elapsed)
    if dist.is_main:  # a finished run lengthened with --resume: its export and done.json are stale until it ends
        run.unmark_done()
    net = _wrap(task.net, dist, tc.compile)
    net.train()
    deadline = time.monotonic() + 60 * max_minutes if max_minutes is not None else math.inf
    bar = tqdm(total=tc.steps, initial=start, desc=cfg.name, disable=quiet or not dist.is_main, dynamic_ncols=True)
    if dist.is_main:
        run.log({"event": "start", "step": start, "world": dist.world})
    step, began = start, time.monotonic()
    with _StopSignal() as stop_signal:
        while step < tc.steps:
            lr = lr_at(step, cfg.optim, tc.steps)
            logged = _optimizer_step(task, net, model, ema, opt, cfg, dist, step, lr)
            step += 1
            history.append(logged["loss"])
            stop = dist.any(time.monotonic() > deadline or stop_signal.raised)
            if dist.is_main:
                bar.update(1)
                bar.set_postfix(loss=f"{logged['loss']:.4g}", lr=f"{lr:.2e}")
                run.log({"step": step, "lr": lr, **logged})
                if step % tc.plot_every == 0:
                    plot_losses(history, run.root / "loss.png", f"{cfg.name} ({cfg.stage})")
            if step % tc.checkpoint_every == 0 or step == tc.steps or stop:
                _checkpoint(run, dist, step, model, ema.module, opt, history,
                            elapsed + time.monotonic() - began, tc.keep_checkpoints)
            if dist.is_main and tc.sample_every and step % tc.sample_every == 0 and step < tc.steps:
                task.samples(ema.module, run.samples / f"step-{step:08d}.png")
            if stop:
                break
    bar.close()
    elapsed += time.monotonic() - began
    result = LoopResult(step, step >= tc.steps, model, ema.module)
    if dist.is_main:
        plot_losses(history, run.root / "loss.png", f"{cfg.name} ({cfg.stage})")
        run.log({"event": "stop", "step": step, "finished": result.finished, "elapsed_s": elapsed})
    return _finish(task, cfg, run, dist, result, history, elapsed) if result.finished else result


def _wrap(net: nn.Module, dist: Dist, compile: bool) -> nn.Module:
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dist.device] if dist.device.type == "cuda" else None)
    if compile:
        net = torch.compile(net)  # after DDP, so that DDP's optimizer splits the graph at its gradient buckets
    return net


def _optimizer_step(task: Task, net: nn.Module, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer,
                    cfg: TrainConfig, dist: Dist, step: int, lr: float) -> dict[str, float]:
    """One update; returns the step's metrics averaged over ranks."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16):
        metrics = task.losses(net, step, step_generator(cfg.seed, cfg.stage, step, dist.rank))
    opt.zero_grad(set_to_none=True)
    metrics["loss"].backward()
    if cfg.optim.grad_clip > 0:
        metrics["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    opt.step()
    ema.update(model, step)
    return {k: float(dist.mean(v.detach().float())) for k, v in metrics.items()}


def _checkpoint(run: RunFolder, dist: Dist, step: int, model, ema, opt, history, elapsed: float, keep: int) -> None:
    if dist.is_main:
        state = {"step": step, "optimizer": opt.state_dict(), "history": history, "elapsed_s": elapsed}
        run.save_checkpoint(step, model, ema, state, keep)
    dist.barrier()


def _finish(task: Task, cfg: TrainConfig, run: RunFolder, dist: Dist, result: LoopResult, history: list[float],
            elapsed: float) -> LoopResult:
    """Final samples and the stage's own ending (export, statistics), once; then done.json."""
    if dist.is_main and not (run.root / "done.json").is_file():
        task.samples(result.ema, run.samples / f"step-{result.step:08d}.png")
        summary = task.finish(result.ema, run)
        run.mark_done({"stage": cfg.stage, "steps": result.step, "final_loss": history[-1] if history else None,
                       "train_seconds": round(elapsed, 1), "processes": dist.world, **summary})
    dist.barrier()
    return result
