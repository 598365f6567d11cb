"""Stages `dev` (guidance distillation) and `schnell` (timestep distillation), both taught by a finished run's EMA.

dev: the student (guidance embedding on) starts as the base model with `guidance_in.out_layer` zeroed, so it first
predicts exactly the base's conditional velocity. For x_t drawn as in pretraining and g ~ U[lo, hi] it learns the
teacher's classifier-free-guided velocity v_u + g (v_c - v_u) in one forward pass (as FLUX.1-dev was distilled).

schnell: trajectory distillation. The dev teacher solves the probability-flow ODE noise -> image at a fixed
guidance for M caption/noise pairs, with fine Euler steps on a grid that contains t = 1, .75, .5, .25, 0; the states at
those five points are stored. The student (no guidance input, linear unshifted schedule) learns, for the 1-, 2- and
4-step linear schedules, the velocity whose single Euler step lands on the teacher's next state:
(x_next - x_t) / (t_next - t). Its few large steps then reproduce the teacher's many small ones (knowledge
distillation of the ODE map, Luhman & Luhman 2021, restricted to the points a 1/2/4-step sampler visits).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import sampling
from ..atomic import atomic_save_safetensors
from ..model import Flux
from ..sampling import ShiftConfig
from .cache import Bucket, draw_rows
from .config import DistillOptions, TrainConfig
from .flow import FlowTask, draw_batch, init_flux, noisy, position_ids, run_spec
from .loop import Dist, RunFolder, resolve_run, step_generator

KEY_TIMES = (1.0, 0.75, 0.5, 0.25, 0.0)  # every point of the linear 1-, 2- and 4-step schedules


def load_teacher(runs_dir: Path, ref: str, params, device: torch.device) -> tuple[Flux, dict[str, Tensor]]:
    """A finished run's EMA weights in a frozen Flux (and the state dict, to initialise a student from)."""
    root = resolve_run(Path(runs_dir), ref, "teacher")
    trained = run_spec(root).flux
    if trained.centered_ids != params.centered_ids:
        raise ValueError(f"teacher run {ref!r} was trained with centered_ids={trained.centered_ids}, this config sets "
                         f"{params.centered_ids}: set [model.flux] centered_ids = {str(trained.centered_ids).lower()}")
    sd = RunFolder(root).load_ema()
    teacher = Flux(params)
    try:
        teacher.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"teacher run {ref!r} does not fit {params}: {e}") from None
    return teacher.to(device).eval().requires_grad_(False), sd


def init_student(student: Flux, sd: dict[str, Tensor], differs_in: str) -> None:
    """Load `sd` into `student`; the two state dicts must differ exactly by the `differs_in` submodule."""
    own = set(student.state_dict())
    diff = own ^ set(sd)
    if not diff or any(not k.startswith(differs_in + ".") for k in diff):
        raise ValueError(f"teacher and student should differ exactly in {differs_in}.*, they differ in {sorted(diff)}")
    student.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def guidance_weights(runs_dir: Path, ref: str) -> dict[str, Tensor]:
    """The guidance_in.* weights of a guidance-distilled model folder (fluxkit.json + safetensors) or dev run (EMA)."""
    import json

    root = resolve_run(Path(runs_dir), ref, "guidance_init")
    if (root / "fluxkit.json").is_file():
        file = root / json.loads((root / "fluxkit.json").read_text())["transformer"]
        if file.suffix != ".safetensors":
            raise ValueError(f"guidance_init {ref!r}: {file.name} is not a safetensors file (export it unquantized)")
        sd = load_file(file)
    else:
        sd = RunFolder(root).load_ema()
    found = {k: v.float() for k, v in sd.items() if k.startswith("guidance_in.")}
    if not found:
        raise ValueError(f"guidance_init {ref!r} has no guidance input (guidance_in.*): name a dev model or run")
    return found


class DevTask(FlowTask):
    def __init__(self, cfg: TrainConfig, dist: Dist, runs_dir: Path):
        super().__init__(cfg, dist, runs_dir)
        self.opts: DistillOptions = cfg.options
        if not self.spec.flux.guidance_embed:
            raise ValueError(f"the dev stage trains a guidance-embedded student; preset {cfg.model!r} has none")
        self.teacher, sd = load_teacher(runs_dir, self.opts.teacher, replace(self.spec.flux, guidance_embed=False),
                                        dist.device)
        self.model = self.net = init_flux(self.spec.flux, cfg.seed, cfg.train.gradient_checkpointing)
        init_student(self.model, sd, "guidance_in")
        if self.opts.guidance_init:  # an earlier dev's guidance input, on a teacher trained on from its base
            own = {k: v.shape for k, v in self.model.state_dict().items() if k.startswith("guidance_in.")}
            given = guidance_weights(runs_dir, self.opts.guidance_init)
            if {k: v.shape for k, v in given.items()} != own:
                raise ValueError(f"guidance_init {self.opts.guidance_init!r}: its guidance input does not fit this "
                                 f"model ({sorted(given)} vs {sorted(own)})")
            self.model.load_state_dict(given, strict=False)
        else:
            with torch.no_grad():  # the new embedding starts silent: the student equals the base model at first
                self.model.guidance_in.out_layer.weight.zero_()
                self.model.guidance_in.out_layer.bias.zero_()

    def sample_kwargs(self) -> dict:
        return {"guidance": self.cfg.sample.guidance}

    def losses(self, net: nn.Module, step: int, gen: torch.Generator) -> dict[str, Tensor]:
        b = draw_batch(self.cache, self.cfg.train.batch_size, gen, self.dist)
        x_t, t, _ = noisy(b, gen)
        batch = x_t.shape[0]
        lo, hi = self.opts.guidance_range
        g = (lo + (hi - lo) * torch.rand(batch, generator=gen)).to(x_t.device)  # [B]
        with torch.no_grad():  # cond and uncond teacher passes as one batch of 2B
            e_txt = self.cache.empty_txt.float().to(x_t.device).expand_as(b.txt)
            e_vec = self.cache.empty_vec.float().to(x_t.device).expand_as(b.vec)
            v = self.teacher(x_t.repeat(2, 1, 1), b.img_ids.repeat(2, 1, 1), torch.cat([b.txt, e_txt]),
                             b.txt_ids.repeat(2, 1, 1), t.repeat(2), torch.cat([b.vec, e_vec])).float()
            v_cond, v_uncond = v.chunk(2)  # [B, L, 64] each
            target = v_uncond + g[:, None, None] * (v_cond - v_uncond)
        pred = net(x_t, b.img_ids, b.txt, b.txt_ids, t, b.vec, g)  # [B, L, 64]
        return {"loss": F.mse_loss(pred.float(), target)}


# ------------------------------------------------------------------------------------------------ schnell
def teacher_grid(steps: int, seq_len: int) -> tuple[Tensor, list[int]]:
    """The teacher's shifted `steps`-step schedule with KEY_TIMES merged in -> (times [K], index of each key time)."""
    shifted = sampling.get_schedule(steps, seq_len, shift=ShiftConfig()).tolist()
    times = sorted({*KEY_TIMES, *(s for s in shifted if min(abs(s - k) for k in KEY_TIMES) > 1e-3)}, reverse=True)
    return torch.tensor(times), [times.index(k) for k in KEY_TIMES]


@torch.no_grad()
def solve_trajectories(teacher: Flux, bucket: Bucket, rows: range, guidance: float, steps: int, seed: int,
                       device: torch.device, bf16: bool) -> Tensor:
    """Teacher ODE solutions for cache rows `rows` -> states at KEY_TIMES [n, 5, L, 64] (fp32).

    Row r's noise comes from a generator seeded by (seed, bucket size, r): chunking and ranks do not change it.
    """
    c, h, w = bucket.latents.shape[1:]
    tag = f"schnell-trajectory-{bucket.size[0]}x{bucket.size[1]}"
    noise = torch.stack([torch.randn((c, h, w), generator=step_generator(seed, tag, r, 0)) for r in rows])
    x = sampling.pack(noise).to(device)  # [n, L, 64]
    n = x.shape[0]
    txt, vec = bucket.txt[list(rows)].float().to(device), bucket.vec[list(rows)].float().to(device)
    img_ids, txt_ids = position_ids(n, h, w, txt.shape[1], device)
    pe = teacher.position_embedding(txt_ids, img_ids)
    g = torch.full((n,), guidance, device=device)
    times, keys = teacher_grid(steps, x.shape[1])
    states = [x.float()]

    def velocity(x: Tensor, t: Tensor, i: int) -> Tensor:
        return teacher(x, img_ids, txt, txt_ids, t, vec, g, pe=pe).float()

    def keep(i: int, sigma: float, x: Tensor) -> None:
        if i + 1 in keys:
            states.append(x.float())

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        sampling.denoise(velocity, x.float(), times.to(device), callback=keep)
    return torch.stack(states, dim=1).cpu()  # [n, 5, L, 64]


class SchnellTask(FlowTask):
    shifted = False

    def __init__(self, cfg: TrainConfig, dist: Dist, runs_dir: Path, run: RunFolder, deadline: float = math.inf,
                 quiet: bool = False):
        super().__init__(cfg, dist, runs_dir)
        self.opts: DistillOptions = cfg.options
        if self.spec.flux.guidance_embed or self.spec.shift_schedule:
            raise ValueError(f"the schnell stage trains a model without guidance input and shifted schedule; preset "
                             f"{cfg.model!r} does not fit")
        teacher, sd = load_teacher(runs_dir, self.opts.teacher, replace(self.spec.flux, guidance_embed=True),
                                   dist.device)
        self.model = self.net = init_flux(self.spec.flux, cfg.seed, cfg.train.gradient_checkpointing)
        init_student(self.model, sd, "guidance_in")
        self.ready = self._trajectories(teacher, run.root / "trajectories", deadline, quiet)

    def _jobs(self) -> list[tuple[int, range]]:
        """(bucket index, cache rows) per trajectory file; each bucket gets M in proportion to its size."""
        total, per = len(self.cache), self.opts.trajectory_batch
        jobs = []
        for i, b in enumerate(self.cache.buckets):
            m = min(len(b), max(1, round(self.opts.trajectories * len(b) / total)))
            jobs += [(i, range(s, min(s + per, m))) for s in range(0, m, per)]
        return jobs

    def _trajectories(self, teacher: Flux, folder: Path, deadline: float, quiet: bool) -> bool:
        """Compute the missing trajectory files (rank r: jobs r, r + world, ...), then load them all."""
        folder.mkdir(exist_ok=True)
        jobs = self._jobs()
        names = [folder / f"{self.cache.buckets[i].size[0]}x{self.cache.buckets[i].size[1]}-{rows.start:06d}"
                 f".safetensors" for i, rows in jobs]
        bar = tqdm(total=len(jobs), desc="teacher trajectories", disable=quiet or not self.dist.is_main)
        worked = False  # the budget is checked only after real work, so every call makes progress
        for j in range(0, len(jobs), self.dist.world):
            k = j + self.dist.rank
            if k < len(jobs) and not names[k].is_file():
                worked = True
                i, rows = jobs[k]
                states = solve_trajectories(teacher, self.cache.buckets[i], rows, self.opts.guidance,
                                            self.opts.teacher_steps, self.cfg.seed, self.dist.device,
                                            self.cfg.train.bf16)
                atomic_save_safetensors(names[k], {"states": states.contiguous()})
            bar.update(min(self.dist.world, len(jobs) - j))
            if self.dist.any(worked and time.monotonic() > deadline):
                break
        bar.close()
        self.dist.barrier()
        if not all(p.is_file() for p in names):
            return False
        self.sets = []  # per bucket: (bucket, cache rows [M_b], states [M_b, 5, L, 64])
        for i, bucket in enumerate(self.cache.buckets):
            mine = [(rows, p) for (b, rows), p in zip(jobs, names) if b == i]
            rows = torch.tensor([r for rs, _ in mine for r in rs], dtype=torch.int64)
            self.sets.append((bucket, rows, torch.cat([load_file(p)["states"] for _, p in mine])))
        return True

    def sample_kwargs(self) -> dict:
        return {}

    def losses(self, net: nn.Module, step: int, gen: torch.Generator) -> dict[str, Tensor]:
        batch, dev = self.cfg.train.batch_size, self.dist.device
        which, picks = draw_rows([len(r) for _, r, _ in self.sets], batch, gen, self.dist.rank, self.dist.world)
        bucket, rows, states = self.sets[which]
        choices = torch.tensor(self.opts.student_steps)
        k = choices[torch.randint(len(choices), (batch,), generator=gen)]  # [B] schedule length: 1, 2 or 4
        j = (torch.rand(batch, generator=gen) * k).long()  # [B] which of its steps
        a, b = j * 4 // k, (j + 1) * 4 // k  # [B] indices into KEY_TIMES (quarters)
        t_a, t_b = 1 - a.float() / 4, 1 - b.float() / 4
        x, x_next = states[picks, a].to(dev), states[picks, b].to(dev)  # [B, L, 64] each
        target = (x_next - x) / (t_b - t_a).to(dev)[:, None, None]  # one Euler step lands on the teacher's state
        h, w = bucket.latents.shape[-2:]
        txt, vec = bucket.txt[rows[picks]].float().to(dev), bucket.vec[rows[picks]].float().to(dev)
        img_ids, txt_ids = position_ids(batch, h, w, txt.shape[1], dev)
        pred = net(x, img_ids, txt, txt_ids, t_a.to(dev), vec)  # [B, L, 64]
        return {"loss": F.mse_loss(pred.float(), target)}
