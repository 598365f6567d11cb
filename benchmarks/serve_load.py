"""Load test of `fluxkit serve` on loopback: N requests from C concurrent clients; p50/p99 latency, throughput, and
a check that every accepted job ended as succeeded (nothing lost).

    python -m benchmarks.serve_load                          # 240 requests, 16 clients, the tiny random model
    python -m benchmarks.serve_load --model fluxkit-tiny-schnell --requests 400 --time-limit 300

The server runs as a separate `fluxkit serve` process (so clients and server do not share an interpreter), bound
to 127.0.0.1 on a free port, and is stopped at the end. Requests alternate between the OpenAI endpoint and
Replicate-style predictions with `Prefer: wait`. The run is bounded: clients stop sending once --time-limit passes.
Without --model it builds the tests' tiny random diffusers-layout model (a few MB) in a temporary folder.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODEL_NAME = "black-forest-labs/flux-schnell"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def tiny_model_folder(root: Path) -> Path:
    """The tests' tiny random FLUX.1-schnell-layout model, saved as diffusers does (built offline, seconds)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import tiny_diffusers_pipeline

    folder = root / "tiny-schnell"
    tiny_diffusers_pipeline(guidance_embeds=False).save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(model: str, workdir: Path, extra: list[str], threads: int = 1):
    """`fluxkit serve` on 127.0.0.1:PORT in a child process; -> base URL. Terminated on exit."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "fluxkit.cli", "serve", "--model", f"{MODEL_NAME}={model}", "--port", str(port),
           "--db", str(workdir / "jobs.sqlite"), "--outputs", str(workdir / "outputs"), "--log-level", "warning",
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def one_request(http, k: int, size: int, steps: int) -> tuple[float, int, str | None]:
    """-> (seconds, HTTP status, prediction id or None)."""
    t = time.perf_counter()
    if k % 2:
        r = http.post("/v1/images/generations", json={"model": MODEL_NAME, "prompt": f"a red circle {k}", "seed": k,
                                                      "size": f"{size}x{size}", "steps": steps})
        return time.perf_counter() - t, r.status_code, None
    r = http.post("/v1/predictions", headers={"Prefer": "wait"},
                  json={"input": {"prompt": f"a blue square {k}", "seed": k, "width": size, "height": size,
                                  "num_inference_steps": steps, "output_format": "png"}})
    pid = r.json().get("id") if r.status_code == 201 else None
    if pid and r.json()["status"] != "succeeded":  # Prefer: wait gave up (60 s): poll to the end
        while http.get(f"/v1/predictions/{pid}").json()["status"] not in ("succeeded", "failed", "canceled"):
            time.sleep(0.05)
    return time.perf_counter() - t, r.status_code, pid


def run_clients(url: str, requests: int, clients: int, time_limit: float, size: int, steps: int) -> dict:
    """Send `requests` requests from `clients` threads (bounded by `time_limit`); -> latency/throughput summary."""
    import httpx

    counter = iter(range(requests))
    lock = threading.Lock()
    results: list[tuple[float, int, str | None]] = []
    stop_at = time.monotonic() + time_limit

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < stop_at:
                with lock:
                    k = next(counter, None)
                if k is None:
                    return
                result = one_request(http, k, size, steps)
                with lock:
                    results.append(result)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    ok = [s for s, code, _ in results if code in (200, 201)]
    codes: dict[int, int] = {}
    for _, code, _ in results:
        codes[code] = codes.get(code, 0) + 1
    return {
        "requests": len(results), "clients": clients, "ok": len(ok), "status_codes": codes, "wall_s": round(wall, 2),
        "throughput_rps": round(len(ok) / wall, 2),
        "p50_s": round(percentile(ok, 50), 4) if ok else None, "p99_s": round(percentile(ok, 99), 4) if ok else None,
        "mean_s": round(statistics.fmean(ok), 4) if ok else None,
        "ids": [pid for _, _, pid in results if pid],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model source (default: build the tests' tiny random model)")
    p.add_argument("--requests", type=int, default=240)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--time-limit", type=float, default=240.0, help="stop sending after this many seconds")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    args = p.parse_args(argv)
    import httpx

    with tempfile.TemporaryDirectory(prefix="fluxkit-load-") as tmp:
        work = Path(tmp)
        model = args.model or str(tiny_model_folder(work))
        extra = ["--max-batch", str(args.max_batch), "--max-queue", str(4 * args.clients), "--dtype", "fp32"]
        with serve_process(model, work, extra, args.threads) as url:
            summary = run_clients(url, args.requests, args.clients, args.time_limit, args.size, args.steps)
            with httpx.Client(base_url=url, timeout=30) as http:
                states = [http.get(f"/v1/predictions/{i}").json()["status"] for i in summary.pop("ids")]
                summary["jobs_in_store"] = http.get("/healthz").json()["jobs"]
        # Lost: a request that was answered OK but whose job is not stored as succeeded.
        stored = summary["jobs_in_store"]
        summary["lost"] = summary["ok"] - stored.get("succeeded", 0) + sum(s != "succeeded" for s in states)
    print(json.dumps(summary, indent=1))
    return 0 if summary["lost"] == 0 and summary["ok"] == summary["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
