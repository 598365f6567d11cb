"""Crash safety: a real `fluxkit serve` process killed with SIGKILL mid-queue, then restarted on the same job store:
every accepted job completes (or fails with a reason); none is lost, and no half-written file is left."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from test_server_support import SCHNELL, image_array

httpx = pytest.importorskip("httpx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(folder, tmp_path, port: int):
    cmd = [sys.executable, "-m", "fluxkit.cli", "serve", "--model", f"{SCHNELL}={folder}", "--port", str(port),
           "--db", str(tmp_path / "jobs.sqlite"), "--outputs", str(tmp_path / "out"), "--dtype", "fp32",
           "--max-batch", "1", "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / f"server-{time.monotonic_ns()}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise AssertionError(f"server did not start:\n{open(log.name).read()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()


def test_every_accepted_job_survives_kill_9(tiny_schnell_folder, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    job = {"prompt": "a red circle", "width": 128, "height": 128, "num_inference_steps": 12, "output_format": "png"}
    with serve_process(tiny_schnell_folder, tmp_path, port) as proc, httpx.Client(base_url=url, timeout=30) as http:
        ids = [http.post("/v1/predictions", json={"input": {**job, "seed": i}}).json()["id"] for i in range(10)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill once some are done and one is running
            states = [http.get(f"/v1/predictions/{i}").json()["status"] for i in ids]
            if states.count("succeeded") >= 2 and "processing" in states:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert "starting" in states, "the kill came too late to test queued jobs"

    with serve_process(tiny_schnell_folder, tmp_path, port), httpx.Client(base_url=url, timeout=30) as http:
        deadline = time.monotonic() + 90
        final = {}
        while time.monotonic() < deadline and len(final) < len(ids):
            for i in ids:
                pred = http.get(f"/v1/predictions/{i}").json()
                if pred["status"] in ("succeeded", "failed", "canceled"):
                    final[i] = pred
            time.sleep(0.1)
        assert len(final) == len(ids), "jobs were lost or stuck after the restart"
        for pred in final.values():
            assert pred["status"] == "succeeded", pred["error"]
            assert image_array(http.get(pred["output"][0]).content).shape == (128, 128, 3)
    assert not list((tmp_path / "out").glob(".*.tmp"))
