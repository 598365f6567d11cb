"""`fluxkit train` under torchrun: two CPU processes (gloo) train the test-sized base stage for a few steps, each on
its own data shard, and end with bit-identical weights; rank 0 alone writes the run folder.

Run as a script (`torchrun ... tests/test_ddp.py RUNS_DIR OUT_DIR`) this file is the per-rank worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STEPS = 3


def worker(runs_dir: Path, out: Path) -> None:
    """One rank: the same entry point the CLI uses, then this rank's final weights to out/rank{r}.safetensors."""
    from fluxkit.train import load_config, run_stage
    from fluxkit.train.loop import init_distributed, shutdown_distributed

    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    cfg = load_config(CONFIGS / "test-base.toml", ["name=ddp-base", f"train.steps={STEPS}", "train.sample_every=0"])
    try:
        result = run_stage(cfg, runs_dir, quiet=True, dist=dist)
        first = result.model.img_in.weight.grad  # this rank's last gradient, after DDP's all-reduce
        save_file({**{k: v.contiguous() for k, v in result.model.state_dict().items()}, "grad.img_in": first},
                  out / f"rank{dist.rank}.safetensors")
    finally:
        shutdown_distributed(dist)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from fluxkit.train import load_config, run_stage

    runs_dir = tmp_path_factory.mktemp("runs")
    for stage in ("ae", "cache"):
        assert run_stage(load_config(CONFIGS / f"test-{stage}.toml"), runs_dir, quiet=True).finished
    return runs_dir


def test_two_processes_end_with_identical_weights(runs, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(runs), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key

    run = runs / "ddp-base"
    assert json.loads((run / "done.json").read_text())["processes"] == 2
    saved = load_file(run / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")
    assert all(torch.equal(saved[k], rank0[k]) for k in saved)
    start = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()][0]
    assert start == {"event": "start", "step": 0, "world": 2}  # one log, written by rank 0 only


def test_ranks_draw_different_batches(runs):
    from fluxkit.train.cache import LatentCache
    from fluxkit.train.loop import step_generator

    cache = LatentCache.load(runs / "test-cache")
    draws = [cache.draw(4, step_generator(0, "base", 0, rank), rank, 2) for rank in (0, 1)]
    rows = [set((bucket.size, int(r)) for r in picked) for bucket, picked in draws]
    assert not rows[0] & rows[1]  # disjoint shards: rows rank, rank + 2, ...
    assert all(int(r) % 2 == rank for rank, (_, picked) in enumerate(draws) for r in picked)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
