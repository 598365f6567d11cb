"""The same service on Ray Serve: one gateway replica runs the FastAPI app (APIs, job store, UI) and sends each job
to a `FluxModel` deployment whose replicas hold the model and batch concurrent calls with `@serve.batch`.

    from fluxkit.server.config import load_config
    from fluxkit.server.ray_app import build_app
    serve.run(build_app(load_config("serve.toml"), replicas=2), route_prefix="/")

On a multi-node cluster (`ray start --head` on one machine, `ray start --address=HEAD:6379` on the others) the
model replicas spread over the nodes' GPUs (`ray_actor_options={"num_gpus": 1}` via `gpus_per_replica`); the
gateway keeps the SQLite job store on its node, so pin it (or give `database` a path on shared storage).
Differences from `fluxkit serve`: progress is reported at the end of a job rather than per step, and a running job is
cancelled only when it finishes (a replica runs it to the end); queued jobs cancel at once.
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import replace

from ray import serve

from .config import ModelConfig, ServeConfig
from .engine import Engine
from .job_request import JobRequest, ModelInfo

log = logging.getLogger(__name__)


@serve.deployment
class FluxModel:
    """One model, resident in each replica; concurrent `generate` calls are batched by `@serve.batch`."""

    def __init__(self, model: ModelConfig, device: str, dtype: str, lora_dir, max_batch: int, wait_s: float):
        self.engine = Engine.load(model, device, dtype, lora_dir)
        self.generate.set_max_batch_size(max_batch)
        self.generate.set_batch_wait_timeout_s(wait_s)
        self.batch_sizes: list[int] = []

    def info(self) -> ModelInfo:
        return self.engine.info

    def stats(self) -> dict:
        import os

        return {"pid": os.getpid(), "batches": list(self.batch_sizes)}

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def generate(self, jobs: list[dict]) -> list[list[bytes]]:
        """Each call: one JobRequest (as a dict) -> its images as PNG bytes. A serve batch may mix incompatible jobs;
        they run as sub-batches of equal `batch_key`."""
        requests = [JobRequest.from_dict(j) for j in jobs]
        groups: dict[tuple, list[int]] = {}
        for index, req in enumerate(requests):
            groups.setdefault(req.batch_key(), []).append(index)
        results: list[list[bytes]] = [[] for _ in requests]
        for indices in groups.values():
            self.batch_sizes.append(sum(requests[i].n for i in indices))
            # The forward pass blocks; run it off the replica's event loop.
            images = await asyncio.to_thread(self.engine.run, [requests[i] for i in indices])
            for i, job_images in zip(indices, images):
                results[i] = [_png(image) for image in job_images]
        return results


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class RemoteEngine:
    """Stands in for an Engine in the gateway's worker: each job goes to the FluxModel deployment."""

    def __init__(self, handle, info: ModelInfo):
        self.handle, self.info = handle, info

    def run(self, jobs: list[JobRequest], on_step=None) -> list[list]:
        from PIL import Image

        calls = [self.handle.generate.remote(job.to_dict()) for job in jobs]  # worker threads may block here
        results = [call.result() for call in calls]
        if on_step is not None:
            on_step(jobs[0].steps)
        return [[Image.open(io.BytesIO(data)) for data in images] for images in results]


@serve.deployment
@serve.ingress()
class Gateway:
    """The FastAPI app of `fluxkit serve`, with remote engines; one worker thread per model replica and batch slot."""

    def __init__(self, config: ServeConfig, handles: dict, threads: int):
        self.config, self.handles, self.threads = config, handles, threads

    async def __serve_build_asgi_app__(self):
        from .app import create_app

        infos = {name: await handle.info.remote() for name, handle in self.handles.items()}
        engines = {name: RemoteEngine(handle, infos[name]) for name, handle in self.handles.items()}
        # Batching happens in the replicas (@serve.batch); the gateway sends jobs one by one, many at once.
        gateway_config = replace(self.config, max_batch=1, batch_wait_ms=0.0)
        return create_app(gateway_config, engines, worker_threads=self.threads)


def build_app(config: ServeConfig, replicas: int = 2, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0):
    """A Ray Serve application: `replicas` FluxModel replicas per configured model behind one Gateway."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    options = {"num_cpus": cpus_per_replica, **({"num_gpus": gpus_per_replica} if gpus_per_replica else {})}
    handles = {}
    for model in config.models:
        deployment = FluxModel.options(
            name=f"FluxModel-{model.name.replace('/', '--')}", num_replicas=replicas, ray_actor_options=options,
            max_ongoing_requests=max(8, 2 * config.max_batch),
        )
        handles[model.name] = deployment.bind(model, config.device, config.dtype, config.lora_dir,
                                              config.max_batch, config.batch_wait_ms / 1000)
    threads = replicas * config.max_batch  # enough jobs in flight for every replica to fill its batches
    return Gateway.options(ray_actor_options={"num_cpus": 0}).bind(config, handles, threads)
