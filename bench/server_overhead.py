"""Policy server benchmark: round-trip overhead on loopback with 1 and N concurrent clients.

Starts serve_policy.py (the shipped PushT policy, sequential DDIM-16, onnxruntime, one CPU
thread) on a free loopback port, then for each client count runs that many client threads
(serving.PolicyClient), each resetting an episode and sending `--requests` PushT requests back
to back. Per request: the round trip on the client, the server's sampler time and its time from
accepting the request to the reply (`server_ms`). Reported per setting (p50 / p99 after
`--warmup` requests per client):
- overhead_ms = round trip - the server's inference call (`infer_ms`: checking the
  observations and the ChunkPolicy call that an in-process robot would make too, noise drawing
  and sampling included): what the server adds, transport, encoding, thread hand-offs and any
  wait for a batch already running,
- overhead_vs_sampler_ms = round trip - the sampler's own time (`sampler_ms`, inside
  predict_action), which also counts the per-call work around the sampler,
- transport_ms = round trip - server_ms (the websocket + msgpack path alone),
- queue_ms = server_ms - infer_ms, the mean batch size and chunks per second.
Each client count runs with batching (max_batch = clients) and without (max_batch=1).

    python bench/server_overhead.py --out bench/results/server_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from picard_sampler import percentile
from picard_sampler.runinfo import run_info
from serving import PolicyClient

ROOT = Path(__file__).resolve().parent.parent


def start_server(max_batch: int, sampler: str, runtime: str) -> tuple[subprocess.Popen, int]:
    """serve_policy.py on a free loopback port (waits until it listens)."""
    ready = Path(tempfile.mkdtemp(prefix="bench_serving_")) / "ready.json"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "serve_policy.py"), "port=0", f"ready_file={ready}",
         f"sampler={sampler}", f"runtime={runtime}", "threads=1", f"max_batch={max_batch}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    while not ready.exists():
        if process.poll() is not None:
            raise SystemExit(f"server failed: {process.stderr.read()}")
        time.sleep(0.1)
    return process, json.loads(ready.read_text())["port"]


def run_clients(port: int, n_clients: int, requests: int, warmup: int) -> dict[str, Any]:
    """`n_clients` threads sending `requests` requests each; the timing rows."""
    samples: list[dict[str, float]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n_clients)

    def client(index: int) -> None:
        obs = np.random.default_rng(index).uniform(50, 450, (2, 20)).astype(np.float32)
        with PolicyClient(f"127.0.0.1:{port}") as policy:
            policy.reset(index)
            barrier.wait()
            for k in range(requests):
                start = time.perf_counter()
                _, info = policy.infer(obs)
                rtt = (time.perf_counter() - start) * 1e3
                if k >= warmup:
                    with lock:
                        samples.append({"rtt": rtt, **info})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    rtt = np.array([s["rtt"] for s in samples])
    sampler = np.array([s["sampler_ms"] for s in samples])
    infer = np.array([s["infer_ms"] for s in samples])
    server = np.array([s["server_ms"] for s in samples])
    row: dict[str, Any] = {"clients": n_clients, "requests": len(samples),
                           "batch_mean": float(np.mean([s["batch"] for s in samples])),
                           "chunks_per_s": n_clients * requests / wall}
    for name, values in (("rtt_ms", rtt), ("sampler_ms", sampler), ("infer_ms", infer),
                         ("overhead_ms", rtt - infer), ("overhead_vs_sampler_ms", rtt - sampler),
                         ("transport_ms", rtt - server), ("queue_ms", server - infer)):
        row[f"{name}_p50"] = percentile(values, 50)
        row[f"{name}_p99"] = percentile(values, 99)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=200, help="per client")
    parser.add_argument("--warmup", type=int, default=5, help="per client, not measured")
    parser.add_argument("--sampler", default="sequential_ddim16")
    parser.add_argument("--runtime", default="onnxruntime")
    parser.add_argument("--quick", action="store_true", help="20 requests per client")
    args = parser.parse_args()
    requests = 20 if args.quick else args.requests
    rows = []
    for n_clients in args.clients:
        for max_batch in sorted({1, n_clients}):
            process, port = start_server(max_batch, args.sampler, args.runtime)
            try:
                row = {"max_batch": max_batch, **run_clients(port, n_clients, requests,
                                                              args.warmup)}
            finally:
                process.terminate()
                process.wait(timeout=60)
            rows.append(row)
            print(f"{n_clients} clients, max_batch {max_batch}: overhead p50/p99 "
                  f"{row['overhead_ms_p50']:.2f}/{row['overhead_ms_p99']:.2f} ms, transport "
                  f"{row['transport_ms_p50']:.2f}/{row['transport_ms_p99']:.2f} ms, "
                  f"{row['chunks_per_s']:.1f} chunks/s", flush=True)
    result = {
        "benchmark": "serving", "transport": "websockets + msgpack on loopback (127.0.0.1)",
        "server": f"serve_policy.py sampler={args.sampler} runtime={args.runtime} threads=1",
        "clients": "threads of one process (serving.PolicyClient), requests back to back",
        "command": "python bench/server_overhead.py " + " ".join(sys.argv[1:]),
        "run_info": run_info("cpu"), "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
