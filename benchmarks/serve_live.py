"""The web UI's live mode, measured: how long after a pause in typing the image is up to date.

    python -m benchmarks.serve_live                          # tiny-schnell, 128x128, 4 steps
    python -m benchmarks.serve_live --model fluxkit-tiny-dev --steps 20

The live mode (fluxkit/server/web/app.js) sends a prediction 350 ms after the last keystroke and cancels the one
still running. This replays that traffic against a `fluxkit serve` child process on loopback: the prompt is typed
word by word, each pause fires one request (`Prefer: wait`), and the request before it is cancelled if unfinished.
Reported: per-update latency (request sent -> image received) p50/p99, and what the user waits after the last
keystroke (debounce + latency). Without the shipped tiny-schnell weights it uses the tiny-schnell architecture with
random weights (the same cost per image: the weights' values do not change the work).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .common import describe_machine, random_weight_folder
from .serve_load import percentile, serve_process

PROMPT = "a small red circle above a large blue square on a white background"
DEBOUNCE_S = 0.35  # app.js: LIVE_DEBOUNCE_MS


def tiny_schnell_shaped(root: Path) -> str:
    """fluxkit-tiny-schnell if shipped, else its architecture with random weights and the shipped AE."""
    from fluxkit.hub import available_builtins

    if "fluxkit-tiny-schnell" in available_builtins():
        return "fluxkit-tiny-schnell"
    return str(random_weight_folder("tiny-schnell", root))


def live_session(url: str, size: int, steps: int) -> dict:
    import httpx

    words = PROMPT.split()
    latencies, canceled = [], 0
    with httpx.Client(base_url=url, timeout=120) as http:
        body = {"input": {"prompt": "warm up", "seed": 0, "width": size, "height": size,
                          "num_inference_steps": steps, "output_format": "png"}}
        http.post("/v1/predictions", headers={"Prefer": "wait"}, json=body)
        previous = None
        for k in range(1, len(words) + 1):
            if previous is not None:  # the UI cancels the request it no longer needs
                state = http.get(f"/v1/predictions/{previous}").json()["status"]
                if state not in ("succeeded", "failed", "canceled"):
                    http.post(f"/v1/predictions/{previous}/cancel")
                    canceled += 1
            body["input"]["prompt"] = " ".join(words[:k])
            t = time.perf_counter()
            r = http.post("/v1/predictions", headers={"Prefer": "wait"}, json=body)
            if r.status_code != 201 or r.json()["status"] != "succeeded":
                raise RuntimeError(f"live request {k} failed: {r.status_code} {r.text[:200]}")
            latencies.append(time.perf_counter() - t)
            previous = r.json()["id"]
    return {"updates": len(latencies), "canceled": canceled, "p50_s": round(percentile(latencies, 50), 3),
            "p99_s": round(percentile(latencies, 99), 3), "mean_s": round(statistics.fmean(latencies), 3),
            "after_last_keystroke_s": round(DEBOUNCE_S + latencies[-1], 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model source (default: fluxkit-tiny-schnell, or its architecture)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch threads in the server")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fluxkit-live-") as tmp:
        work = Path(tmp)
        model = args.model or tiny_schnell_shaped(work)
        with serve_process(model, work, ["--max-batch", "1"], args.threads) as url:
            result = live_session(url, args.size, args.steps)
    print(describe_machine())
    print(json.dumps({"model": model if args.model else "tiny-schnell architecture", "size": args.size,
                      "steps": args.steps, **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
