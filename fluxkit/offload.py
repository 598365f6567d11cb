"""Offloading hooks. Placeholders until the memory work lands: they exist so diffusers code runs unchanged."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def enable_model_cpu_offload(pipe, device=None) -> None:
    log.warning("enable_model_cpu_offload() has no effect yet in this fluxkit version")


def enable_sequential_cpu_offload(pipe, device=None) -> None:
    log.warning("enable_sequential_cpu_offload() has no effect yet in this fluxkit version")
