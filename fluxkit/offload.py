"""Offloading: keep weights in CPU memory and put them on the accelerator only while they compute.

- `enable_model_cpu_offload`: whole components (text encoder, transformer, autoencoder) move to the device for their
  stage of the recipe and back afterwards: peak device memory = the largest component.
- `enable_sequential_cpu_offload`: the transformer streams block by block; while block i computes, block i+1's
  weights are already being copied on a side stream (pinned host memory, non-blocking copies), so the copy hides
  behind compute. Peak device memory = a few blocks.

With no accelerator (device "cpu") there is nothing to move: both log that and change nothing. On a CPU-only
machine the memory lever is instead lazy, memory-mapped loading (weights stay file-backed pages the OS can drop) plus
quantization (fluxkit.quant).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def _target(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def enable_model_cpu_offload(pipe, device=None) -> None:
    target = _target(device)
    if target.type == "cpu":
        log.info("enable_model_cpu_offload: no accelerator, weights already live in CPU memory")
        pipe._offload = None
        return
    pipe.to("cpu")
    pipe._offload = ModelOffload(target)


def enable_sequential_cpu_offload(pipe, device=None) -> None:
    target = _target(device)
    if target.type == "cpu":
        log.info("enable_sequential_cpu_offload: no accelerator, weights already live in CPU memory")
        pipe._offload = None
        return
    pipe.to("cpu")
    pipe._offload = ModelOffload(target, skip={"transformer"})  # the transformer streams instead
    stream_blocks(pipe.transformer, target)


class ModelOffload:
    """`with offload.placed(module):` moves a component to the device for the block and back afterwards."""

    def __init__(self, device: torch.device, skip: set[str] = frozenset()):
        self.device, self.skip = device, set(skip)

    @contextlib.contextmanager
    def placed(self, name: str, module):
        if name in self.skip or module is None:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


class _Streamer:
    """Forward hooks that upload a block's weights before it runs and free them after, prefetching the next."""

    def __init__(self, blocks: list[nn.Module], device: torch.device):
        self.blocks, self.device = blocks, device
        self.host = [{n: p.data.pin_memory() if device.type == "cuda" else p.data for n, p in b.named_parameters()}
                     for b in blocks]
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ready: dict[int, torch.cuda.Event | None] = {}
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda m, a, i=i: self._before(i))
            block.register_forward_hook(lambda m, a, o, i=i: self._after(i))

    def _upload(self, i: int) -> None:
        if i in self.ready or i >= len(self.blocks):
            return
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with ctx:
            for name, p in self.blocks[i].named_parameters():
                p.data = self.host[i][name].to(self.device, non_blocking=True)
        self.ready[i] = torch.cuda.Event() if self.stream is not None else None
        if self.ready[i] is not None:
            self.ready[i].record(self.stream)

    def _before(self, i: int) -> None:
        self._upload(i)
        event = self.ready[i]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        self._upload(i + 1)  # prefetch: overlaps with block i's compute

    def _after(self, i: int) -> None:
        for name, p in self.blocks[i].named_parameters():
            p.data = self.host[i][name]
        self.ready.pop(i, None)


def stream_blocks(model, device: torch.device) -> _Streamer:
    """Put the transformer's small modules on `device` permanently and stream its blocks."""
    blocks = [*model.double_blocks, *model.single_blocks]
    for name, child in model.named_children():
        if name not in ("double_blocks", "single_blocks"):
            child.to(device)
    model._streamer = _Streamer(blocks, device)
    return model._streamer
