"""Policy server memory over a long loopback run: RSS every N requests (issue 32 item 3).

Starts serve_policy.py on a free 127.0.0.1 port (the shipped PushT policy unless
`--server-arg checkpoint=...`), then `--clients` robots (PolicyClient threads in this process)
send chunk requests back to back until `--requests` are served in all, each robot starting a new
episode every `--episode-requests` requests (resets and ends exercise the episode slots). After
every `--every` served requests the server's VmRSS (from /proc) is sampled with the load
average and the server's own counters (GET /metrics: sampler calls, queue depth). Reported:
RSS at the first sample after `--warmup` requests and at the end, the growth between them (MiB
and percent), and the slope of a least-squares line through the samples after warm-up
(KiB per 1000 requests): a server that keeps per-request history grows linearly.

    python bench/server_memory.py --requests 20000 --every 500 \\
        --out bench/results/server_memory_cpu.json
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
from picard_client import PolicyClient
from server_load import rss_mb, server_metrics  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, int, Path]:
    """serve_policy.py on 127.0.0.1, a free port; waits until it listens."""
    ready = Path(tempfile.mkdtemp(prefix="bench_memory_")) / "ready.json"
    log = open(ready.with_name("server.log"), "w")  # noqa: SIM115 - the process keeps it
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "serve_policy.py"), "host=127.0.0.1", "port=0",
         f"ready_file={ready}", f"sampler={args.sampler}", f"runtime={args.runtime}",
         f"threads={args.threads}", f"max_batch={args.clients}", *args.server_arg],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"server failed: {ready.with_name('server.log').read_text()}")
        time.sleep(0.1)
    return process, json.loads(ready.read_text())["port"], ready.with_name("server.log")


class Counter:
    """Requests served so far by all robots; samples the server every `every` of them."""

    def __init__(self, total: int, every: int, pid: int, port: int):
        self.total, self.every, self.pid, self.port = total, every, pid, port
        self.served = self.failed = 0
        self.lock = threading.Lock()
        self.samples: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def take(self) -> bool:
        """Claim one more request to send; False once `total` are claimed."""
        with self.lock:
            if self.served + self.failed >= self.total:
                return False
            self.served += 1
            due = self.served % self.every == 0
        if due:
            self.sample()
        return True

    def sample(self) -> None:
        metrics = server_metrics(self.port) or {}  # None: the server is gone
        self.samples.append({
            "requests": self.served, "t_s": round(time.monotonic() - self.t0, 2),
            "rss_mb": round(rss_mb(self.pid) or float("nan"), 2),
            "load_avg_1m": os.getloadavg()[0], "sampler_calls": metrics.get("sampler_calls"),
            "queue_depth": metrics.get("queue_depth")})


def robot(index: int, port: int, counter: Counter, episode_requests: int,
          errors: list[str]) -> None:
    """Requests back to back until the counter says stop; a new episode every
    `episode_requests` requests."""
    rng = np.random.default_rng(index)
    client = PolicyClient(f"127.0.0.1:{port}", timeout_s=60)
    seed, k = index * 1_000_000, 0
    try:
        while counter.take():
            if k % episode_requests == 0:
                if client.episode is not None:
                    client.end()
                seed += 1
                client.reset(seed)
            client.infer(rng.uniform(50, 450, (2, 20)).astype(np.float32))
            k += 1
        if client.episode is not None:
            client.end()
    except Exception as e:  # reported, not raised: the run's numbers say what it served
        errors.append(f"robot {index}: {type(e).__name__}: {e}")
        with counter.lock:
            counter.failed += 1
    finally:
        client.close()


def growth(samples: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """RSS from the first sample after `warmup` requests to the last: MiB, percent, and the
    least-squares slope in KiB per 1000 requests; the same over the run's second half (the
    server's bounded windows, 4096 chunks and 1024 sampler calls, are full by then)."""
    def span(after: list[dict[str, Any]]) -> dict[str, Any]:
        x = np.array([s["requests"] for s in after], dtype=float)
        y = np.array([s["rss_mb"] for s in after], dtype=float)
        slope = float(np.polyfit(x, y, 1)[0])  # MiB per request
        return {"from_requests": after[0]["requests"], "rss_first_mb": after[0]["rss_mb"],
                "rss_last_mb": after[-1]["rss_mb"], "rss_max_mb": float(y.max()),
                "growth_mb": round(after[-1]["rss_mb"] - after[0]["rss_mb"], 2),
                "growth_pct": round(100 * (after[-1]["rss_mb"] / after[0]["rss_mb"] - 1), 3),
                "slope_kib_per_1000_requests": round(slope * 1024 * 1000, 2)}

    after = [s for s in samples if s["requests"] >= warmup]
    if len(after) < 2:
        return {}
    half = [s for s in samples if s["requests"] >= samples[-1]["requests"] / 2]
    return {"warmup_requests": warmup, **span(after),
            "second_half": span(half) if len(half) >= 2 else None}


def plot(result: dict[str, Any], path: Path) -> None:
    """RSS against requests served, load average beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    x = [s["requests"] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(x, [s["rss_mb"] for s in samples], marker=".")
    ax.set_xlabel("requests served")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_ylim(0, max(s["rss_mb"] for s in samples) * 1.1)
    load = ax.twinx()
    load.plot(x, [s["load_avg_1m"] for s in samples], color="gray", alpha=0.5)
    load.set_ylabel("load avg (1 min)", color="gray")
    g = result["growth"]
    fig.suptitle(f"{result['served']} requests, {result['clients']} robots on loopback: RSS "
                 f"{g.get('rss_first_mb')} -> {g.get('rss_last_mb')} MiB after warm-up "
                 f"({g.get('growth_pct')} %)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=500, help="sample RSS every N requests")
    parser.add_argument("--warmup", type=int, default=2000, help="requests before growth counts")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--episode-requests", type=int, default=50)
    parser.add_argument("--sampler", default="sequential_ddim16")
    parser.add_argument("--runtime", default="eager")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--server-arg", action="append", default=[],
                        help="another serve_policy.py override (repeatable)")
    parser.add_argument("--resummarize", action="store_true",
                        help="recompute growth and redraw the plot from --out's samples")
    args = parser.parse_args()
    if args.resummarize:
        result = json.loads(args.out.read_text())
        result["growth"] = growth(result["samples"], args.warmup)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        plot(result, args.out.with_suffix(".png"))
        print(json.dumps(result["growth"]))
        return
    process, port, log = start_server(args)
    errors: list[str] = []
    try:
        counter = Counter(args.requests, args.every, process.pid, port)
        counter.sample()  # before the first request (requests = 0)
        robots = [threading.Thread(target=robot, args=(i, port, counter, args.episode_requests,
                                                       errors)) for i in range(args.clients)]
        for thread in robots:
            thread.start()
        for thread in robots:
            thread.join()
        seconds = time.monotonic() - counter.t0
        final = server_metrics(port)
    finally:
        process.terminate()
        process.wait(60)
    result: dict[str, Any] = {
        "benchmark": "server_memory",
        "command": "python bench/server_memory.py " + " ".join(sys.argv[1:]),
        "server": f"serve_policy.py host=127.0.0.1 port=0 sampler={args.sampler} "
                  f"runtime={args.runtime} threads={args.threads} max_batch={args.clients} "
                  + " ".join(args.server_arg),
        "robots": f"{args.clients} PolicyClient threads in one process on 127.0.0.1, back to "
                  f"back, obs (2, 20) float32, a new episode every {args.episode_requests} "
                  "requests",
        "clients": args.clients, "served": counter.served - counter.failed,
        "failed": counter.failed, "errors": errors[:10], "seconds": round(seconds, 1),
        "requests_per_s": round((counter.served - counter.failed) / seconds, 1),
        "cpus": os.cpu_count(), "growth": growth(counter.samples, args.warmup),
        "samples": counter.samples, "final_metrics": final,
        "server_log_tail": log.read_text().splitlines()[-5:],
    }
    from picard_sampler.runinfo import run_info  # torch: only once the robots are done

    result["run_info"] = run_info("cpu")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result["growth"]))
    print(f"{result['served']} served in {result['seconds']} s; wrote {args.out}")


if __name__ == "__main__":
    main()
