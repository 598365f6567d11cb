"""The queue and the one thread that runs the models: batching, progress, cancel, results.

Jobs wait in arrival order. The worker takes the oldest, then gathers queued jobs with the same `batch_key` (same
model, size, steps, guidance and adapters) until the batch holds `max_batch` images or `wait_s` has passed since it
took the first, and runs them as one pipeline call. Every image has its own seeded generator, so a job's images do
not depend on the batch it ran in. Cancelling a queued job removes it; cancelling a running one marks it, and the
batch stops at the next step once all of its jobs are cancelled (otherwise the others finish and its images are
dropped).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .engine import Engine
from .job_request import JobRequest
from .jobs import TERMINAL, JobRecord, JobStore, remove_partial_files

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` jobs; the client should retry later (HTTP 429)."""


class _Canceled(Exception):
    """Raised from the step callback to stop a batch whose jobs were all cancelled."""


@dataclass(eq=False)
class Job:
    """A job not yet finished, as the worker sees it; finished jobs live only in the store."""

    id: str
    kind: str
    request: JobRequest
    input: dict
    created_at: float
    status: str = "starting"
    step: int = 0
    attempts: int = 0
    started_at: float | None = None
    cancel_requested: bool = False
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def record(self) -> JobRecord:
        return JobRecord(self.id, self.kind, self.request.model, self.input, self.request.to_dict(), self.status,
                         None, None, self.attempts, self.created_at, self.started_at, None, self.step)


class Worker:
    """`threads` batches run at once: 1 for models in this process (they share one accelerator); more for remote
    engines (Ray Serve replicas), so that every replica has work."""

    def __init__(self, engines: dict[str, Engine], store: JobStore, outputs: Path, max_batch: int = 4,
                 wait_s: float = 0.01, max_queue: int = 64, max_attempts: int = 2, threads: int = 1):
        self.engines, self.store, self.outputs = engines, store, Path(outputs)
        self.max_batch, self.wait_s, self.max_queue, self.max_attempts = max_batch, wait_s, max_queue, max_attempts
        self.threads = threads
        self._queue: list[Job] = []
        self._live: dict[str, Job] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self.batches: deque[int] = deque(maxlen=10_000)  # images per batch run, latest last

    # -- life cycle -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        removed = remove_partial_files(self.outputs)
        if removed:
            log.warning("removed %d partial output files left by a crash", removed)
        for rec in self.store.recover(self.max_attempts):
            if rec.model not in self.engines:
                self.store.fail(rec.id, f"model {rec.model!r} is no longer served")
                continue
            job = Job(rec.id, rec.kind, JobRequest.from_dict(rec.request), rec.input, rec.created_at,
                      attempts=rec.attempts)
            self._queue.append(job)
            self._live[job.id] = job
        if self._queue:
            log.warning("resuming %d jobs accepted before a restart", len(self._queue))
        for k in range(self.threads):
            thread = threading.Thread(target=self._loop, name=f"fluxkit-worker-{k}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running batch, then stop; queued jobs stay in the store for the next start."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- what the API calls ---------------------------------------------------------------------------------------
    def submit(self, job_id: str, kind: str, request: JobRequest, raw_input: dict) -> Job:
        if request.model not in self.engines:
            raise ValueError(f"model {request.model!r} is not loaded")
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting); retry later")
            job = Job(job_id, kind, request, raw_input, time.time())
            self.store.add(job_id, kind, request.model, raw_input, request.to_dict())  # committed before we answer
            self._queue.append(job)
            self._live[job_id] = job
            self._cond.notify_all()
        return job

    def view(self, job_id: str) -> JobRecord | None:
        """The job's current state: live progress while it is unfinished, else the stored record."""
        job = self._live.get(job_id)
        if job is not None:
            return job.record()
        return self.store.get(job_id)

    def cancel(self, job_id: str) -> None:
        with self._cond:
            job = self._live.get(job_id)
            if job is None:
                return  # finished already (or unknown): nothing to cancel
            if job in self._queue:
                self._queue.remove(job)
                self._end(job, "canceled")
            else:
                job.cancel_requested = True

    async def wait(self, job_id: str, timeout: float) -> None:
        """Wait (without blocking the event loop) until the job ends or `timeout` seconds pass."""
        job = self._live.get(job_id)
        if job is not None:
            await asyncio.wait({asyncio.wrap_future(job.done)}, timeout=timeout)

    def queue_length(self) -> int:
        return len(self._queue)

    # -- the worker thread ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait(0.5)
            if self._stopping:
                return None
            first = self._queue.pop(0)
            batch, images, key = [first], first.request.n, first.request.batch_key()
            deadline = time.monotonic() + self.wait_s
            while images < self.max_batch:
                for job in [j for j in self._queue if j.request.batch_key() == key]:
                    if images + job.request.n <= self.max_batch:
                        self._queue.remove(job)
                        batch.append(job)
                        images += job.request.n
                remaining = deadline - time.monotonic()
                if images >= self.max_batch or remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            for job in batch:
                job.status, job.started_at = "processing", time.time()
                job.attempts += 1
            self.store.start([j.id for j in batch])
            return batch

    def _run(self, batch: list[Job]) -> None:
        self.batches.append(sum(j.request.n for j in batch))

        def on_step(done: int) -> None:
            for job in batch:
                job.step = done
            if all(job.cancel_requested for job in batch):
                raise _Canceled

        try:
            images = self.engines[batch[0].request.model].run([j.request for j in batch], on_step)
        except _Canceled:
            for job in batch:
                self._end(job, "canceled")
            return
        except Exception as e:  # noqa: BLE001  a failed batch fails its jobs with the reason; the service goes on
            log.exception("batch of %d jobs failed", len(batch))
            for job in batch:
                self._end(job, "failed", error=f"{type(e).__name__}: {e}")
            return
        for job, job_images in zip(batch, images):
            if job.cancel_requested:
                self._end(job, "canceled")
                continue
            try:
                names = self._save(job, job_images)
            except OSError as e:
                self._end(job, "failed", error=f"could not write the output: {e}")
                continue
            self._end(job, "succeeded", outputs=names)

    def _save(self, job: Job, images: list) -> list[str]:
        from .. import __version__
        from ..imageio import save_image

        r = job.request
        names = []
        for k, (image, seed) in enumerate(zip(images, r.seeds)):
            params = {
                "prompt": r.prompt, "seed": seed, "model": r.model, "width": r.width, "height": r.height,
                "steps": r.steps, "guidance": r.guidance, "negative_prompt": r.negative_prompt,
                "true_cfg": r.true_cfg, "lora": r.lora, "lora_scale": r.lora_scale if r.lora else None,
                "go_fast": r.go_fast, "image": r.image is not None, "strength": r.strength if r.image else None,
                "job": job.id, "fluxkit": __version__,
            }
            name = f"{job.id}-{k}.{r.output_format}"
            save_image(image, self.outputs / name, params, r.output_format, quality=r.output_quality)
            names.append(name)
        return names

    def _end(self, job: Job, status: str, outputs: list[str] | None = None, error: str | None = None) -> None:
        assert status in TERMINAL
        # The store first: a reader that no longer finds the job live must find its final state stored.
        if status == "succeeded":
            self.store.finish(job.id, outputs or [])
        elif status == "failed":
            self.store.fail(job.id, error or "unknown error")
        else:
            self.store.cancel(job.id)
        job.status = status
        self._live.pop(job.id, None)
        if not job.done.done():
            job.done.set_result(status)
