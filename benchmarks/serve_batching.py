"""Batching vs unbatched in `fluxkit serve`: throughput and latency at 1, 4, 8 and 16 concurrent clients.

    python -m benchmarks.serve_batching                         # the tests' tiny random model, 64x64, 4 steps
    python -m benchmarks.serve_batching --model fluxkit-tiny-schnell --size 128 --requests 96

For each mode a `fluxkit serve` process runs on 127.0.0.1 (unbatched: --max-batch 1; batched: --max-batch
--batch and a --wait-ms window), and for each concurrency the same load as benchmarks.serve_load is sent
(--requests requests per point, bounded by --time-limit). Every request has its own prompt and seed, so all are
compatible (same size, steps, model, no adapter) and may share a batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .serve_load import run_clients, serve_process, tiny_model_folder

CONCURRENCY = (1, 4, 8, 16)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model source (default: build the tests' tiny random model)")
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    p.add_argument("--batch", type=int, default=8, help="max images per batch in batched mode")
    p.add_argument("--wait-ms", type=float, default=10.0, help="batch wait window in batched mode")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--time-limit", type=float, default=120.0, help="per concurrency level")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    args = p.parse_args(argv)

    modes = {"unbatched": ["--max-batch", "1", "--batch-wait-ms", "0"],
             "batched": ["--max-batch", str(args.batch), "--batch-wait-ms", str(args.wait_ms)]}
    rows = []
    with tempfile.TemporaryDirectory(prefix="fluxkit-batching-") as tmp:
        model = args.model or str(tiny_model_folder(Path(tmp)))
        for mode, flags in modes.items():
            work = Path(tmp) / mode
            with serve_process(model, work, [*flags, "--max-queue", "64", "--dtype", "fp32"], args.threads) as url:
                run_clients(url, 8, 4, 60, args.size, args.steps)  # warm-up (first calls allocate)
                for clients in CONCURRENCY:
                    s = run_clients(url, args.requests, clients, args.time_limit, args.size, args.steps)
                    rows.append({"mode": mode, "clients": clients, "requests": s["requests"], "ok": s["ok"],
                                 "throughput_rps": s["throughput_rps"], "p50_s": s["p50_s"], "p99_s": s["p99_s"]})
    print(f"{'mode':<10} {'clients':>7} {'ok':>5} {'req/s':>8} {'p50 s':>8} {'p99 s':>8}")
    for r in rows:
        print(f"{r['mode']:<10} {r['clients']:>7} {r['ok']:>5} {r['throughput_rps']:>8} {r['p50_s']:>8} "
              f"{r['p99_s']:>8}")
    print(json.dumps(rows))
    return 0 if all(r["ok"] == r["requests"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
