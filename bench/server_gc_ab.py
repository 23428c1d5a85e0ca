"""A/B of the policy server as it is and with `gc.collect(); gc.freeze()` when it starts serving
(the policy loaded: a collection then no longer walks torch's objects), an idea for the round
trip's tail that is *not* in the server: this A/B did not show a gain (docs/results/serving.md).

Alternating pairs of servers (sequential DDIM-16, onnxruntime, 1 thread, max_batch 1), each
asked `--requests` times for its metadata and a PushT chunk in turn by one client; per server:
p50 / p99 of the metadata round trip and of the chunk's round trip minus the server's
inference call (`infer_ms`), after 20 warm-up pairs.

    python bench/server_gc_ab.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from serving import PolicyClient

ROOT = Path(__file__).resolve().parent.parent
ENTRY = ("import gc, sys, runpy\n"
         "import app.serving as serving\n"
         "if sys.argv[1] == 'on':\n"
         "    plain = serving.run_server\n"
         "    def frozen(*args, **kwargs):\n"
         "        gc.collect()\n"
         "        gc.freeze()\n"
         "        return plain(*args, **kwargs)\n"
         "    serving.run_server = frozen\n"
         "sys.argv = ['serve_policy.py'] + sys.argv[2:]\n"
         "runpy.run_path('serve_policy.py', run_name='__main__')\n")


def measure(mode: str, requests: int) -> tuple[float, float, float, float]:
    """(metadata p50, p99, chunk overhead p50, p99) in ms against one fresh server."""
    ready = Path(tempfile.mkdtemp(prefix="bench_gc_")) / "ready.json"
    server = subprocess.Popen(
        [sys.executable, "-c", ENTRY, mode, "port=0", f"ready_file={ready}",
         "sampler=sequential_ddim16", "runtime=onnxruntime", "threads=1", "max_batch=1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "WANDB_MODE": "offline"})
    try:
        while not ready.exists():
            if server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.1)
        port = json.loads(ready.read_text())["port"]
        obs = np.random.default_rng(0).uniform(0, 512, (2, 20)).astype(np.float32)
        metadata, overhead = [], []
        with PolicyClient(f"127.0.0.1:{port}") as client:
            client.reset(1)
            for _ in range(requests + 20):
                start = time.perf_counter()
                client.metadata()
                metadata.append((time.perf_counter() - start) * 1e3)
                start = time.perf_counter()
                _, info = client.infer(obs)
                overhead.append((time.perf_counter() - start) * 1e3 - info["infer_ms"])
    finally:
        server.terminate()
        server.wait()
    metadata, overhead = metadata[20:], overhead[20:]
    return (float(np.median(metadata)), float(np.percentile(metadata, 99)),
            float(np.median(overhead)), float(np.percentile(overhead, 99)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=230)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    gc.freeze()  # the client process too
    for pair in range(args.pairs):
        for mode in ("off", "on"):
            values = measure(mode, args.requests)
            print(f"{pair} gc.freeze {mode:3s} metadata p50/p99 {values[0]:.3f}/{values[1]:.3f} "
                  f"ms, chunk overhead p50/p99 {values[2]:.3f}/{values[3]:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
