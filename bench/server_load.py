"""Policy server under load on loopback: paced robots, a burst, server RSS over time, faults.

Load run (the default): starts serve_policy.py on a free 127.0.0.1 port, then
- *steady*: `--clients` robots, each paced at `--hz` requests per second (one request out at a
  time; a reply later than the period sends the next at once and counts the missed slots),
  starting a new episode every `--episode-s` seconds (resets and ends exercise the slots);
- *burst*: `--burst` robots connect at once, each resets, asks `--burst-requests` chunks and
  ends its episode.
Robots are PolicyClient threads spread over `--procs` processes. Reported: requests served,
failed (any exception) and stale (late replies the clients dropped) and client timeouts,
round-trip latency p50 / p90 / p99 / max, the server's batch-size histogram and latency from
GET /metrics, and the server's RSS (VmRSS of its process, every `--rss-every` s) with the load
average beside each sample; RSS growth = last sample against the first sample after
`--warmup-s`, in percent.

Fault run (`--fault`): `--clients` robots, one process each, at `--hz`; at `--kill-at` s
`--kill` of them are SIGKILLed; at `--restart-at` s the server gets SIGTERM and a new one starts
on the same port. Each surviving robot reports what it saw (chunks, failures, reconnects,
resumed and lost episodes, its longest wait for a chunk); the server's /metrics before the
restart shows whether the killed robots' places and episodes were freed.

    python bench/server_load.py --clients 16 --hz 10 --seconds 300 --burst 64 \\
        --out bench/results/server_load.json
    python bench/server_load.py --fault --clients 6 --out bench/results/server_faults.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from picard_client import ConnectionLost, EpisodeLost, PolicyClient, ServerError

ROOT = Path(__file__).resolve().parent.parent
SPAWN = mp.get_context("spawn")  # robots import numpy and picard_client only, never torch


def percentile(values: Any, q: float) -> float | None:
    """numpy's default percentile (as picard_sampler.percentile; torch-free here); None for
    no values."""
    values = np.asarray(values, dtype=float)
    return float(np.percentile(values, q)) if values.size else None


# ------------------------------------------------------------------------------ the server
def start_server(args: argparse.Namespace, port: int = 0) -> tuple[subprocess.Popen, int]:
    """serve_policy.py on 127.0.0.1 (port 0: a free one); waits until it listens."""
    ready = Path(tempfile.mkdtemp(prefix="bench_load_")) / "ready.json"
    log = open(ready.with_name("server.log"), "w")  # noqa: SIM115 - the process keeps it
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "serve_policy.py"), "host=127.0.0.1", f"port={port}",
         f"ready_file={ready}", f"sampler={args.sampler}", f"runtime={args.runtime}",
         "threads=1", f"max_batch={args.max_batch}", f"max_clients={args.max_clients}",
         f"resume_window_s={args.resume_window_s}", *args.server_arg],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "WANDB_MODE": "offline"})
    deadline = time.monotonic() + 300
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"server failed: {ready.with_name('server.log').read_text()}")
        time.sleep(0.1)
    return process, json.loads(ready.read_text())["port"]


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process in MiB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def server_metrics(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            return json.loads(reply.read())
    except OSError:
        return None


class RssSampler(threading.Thread):
    """Samples (t, RSS MiB, load average 1 min) of the server every `every` seconds."""

    def __init__(self, pid: int, every: float, t0: float):
        super().__init__(daemon=True)
        self.pid, self.every, self.t0 = pid, every, t0
        self.samples: list[tuple[float, float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            mb = rss_mb(self.pid)
            if mb is not None:
                self.samples.append((round(time.monotonic() - self.t0, 2), round(mb, 2),
                                     os.getloadavg()[0]))
            self.stop.wait(self.every)


# ------------------------------------------------------------------------------ the robots
def robot(index: int, port: int, args: dict, t0: float, rows: list,
          lock: threading.Lock) -> dict:
    """One robot: connects at `t0`, then paced at args["hz"] for args["seconds"] (or
    args["requests"] back to back); appends (t_sent, latency_ms, ok, batch) rows; returns what
    it saw."""
    rng = np.random.default_rng(index)
    seen = {"index": index, "served": 0, "failed": 0, "missed_slots": 0, "episodes_lost": 0,
            "connection_lost": 0, "errors": [], "longest_wait_s": 0.0}
    time.sleep(max(0.0, t0 - time.monotonic()))
    client = PolicyClient(f"127.0.0.1:{port}", timeout_s=30, retries=args["retries"],
                          backoff_max_s=args["backoff_max_s"])
    episode_seed = index * 10_000
    client.reset(episode_seed)
    episode_started = last_chunk = time.monotonic()
    period, k, episode_s = 1.0 / args["hz"], 0, args["episode_s"]
    end, count = t0 + args["seconds"], args.get("requests")
    while True:
        slot = t0 + k * period
        now = time.monotonic()
        if (count is None and slot >= end) or (count is not None and k >= count):
            break
        if count is None and slot > now:
            time.sleep(slot - now)
        obs = rng.uniform(50, 450, (2, 20)).astype(np.float32)
        sent = time.monotonic()
        try:
            if client.episode is None or sent - episode_started > episode_s:
                if client.episode is not None:
                    client.end()
                episode_seed += 1
                client.reset(episode_seed)
                episode_started = time.monotonic()
            _, info = client.infer(obs)
            done = time.monotonic()
            seen["served"] += 1
            seen["longest_wait_s"] = max(seen["longest_wait_s"], done - last_chunk)
            last_chunk = done
            with lock:
                rows.append((sent - t0, (done - sent) * 1e3, True, info["batch"]))
        except EpisodeLost as e:  # reported; a new episode only when asked for (next slot)
            seen["episodes_lost"] += 1
            seen["errors"].append(f"{time.monotonic() - t0:.1f}s EpisodeLost: {e}")
        except (ConnectionLost, ServerError, OSError) as e:
            seen["failed"] += 1
            seen["connection_lost"] += isinstance(e, ConnectionLost)
            seen["errors"].append(f"{time.monotonic() - t0:.1f}s {type(e).__name__}: {e}")
            with lock:
                rows.append((sent - t0, (time.monotonic() - sent) * 1e3, False, 0))
        next_k = k + 1 if count is not None else int(np.ceil((time.monotonic() - t0) / period))
        seen["missed_slots"] += max(0, next_k - k - 1)
        k = max(k + 1, next_k)
    with contextlib.suppress(ServerError):
        client.end()
    client.close()
    seen["client"] = client.stats.to_dict()
    seen["errors"] = seen["errors"][:10]
    return seen


def robot_process(indices: list[int], port: int, args: dict, t0_wall: float,
                  out: Any) -> None:
    """A process running robots `indices` as threads; puts (seen list, rows) on `out`."""
    t0 = time.monotonic() + (t0_wall - time.time())  # the parent's start, on this clock
    rows: list = []
    lock = threading.Lock()
    seen: list[dict] = []

    def one(index: int) -> None:
        try:
            seen.append(robot(index, port, args, t0, rows, lock))
        except Exception as e:  # a robot that could not even start
            seen.append({"index": index, "served": 0, "failed": 1,
                         "errors": [f"start: {type(e).__name__}: {e}"]})

    threads = [threading.Thread(target=one, args=(i,)) for i in indices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put((seen, rows))


def run_robots(port: int, n: int, procs: int, robot_args: dict, start_in_s: float = 5.0
               ) -> tuple[list[Any], Any, float]:
    """Start `n` robots in `procs` processes, all starting their clock together."""
    out = SPAWN.Queue()
    t0_wall = time.time() + start_in_s
    groups = [list(range(n))[p::procs] for p in range(procs)]
    processes = [SPAWN.Process(target=robot_process, args=(g, port, robot_args, t0_wall, out))
                 for g in groups if g]
    for process in processes:
        process.start()
    return processes, out, t0_wall


def collect(processes: list[Any], out: Any, expected: int, timeout: float
            ) -> tuple[list[dict], list]:
    seen, rows = [], []
    for _ in range(expected):
        part_seen, part_rows = out.get(timeout=timeout)
        seen += part_seen
        rows += part_rows
    for process in processes:
        process.join(timeout=30)
    return sorted(seen, key=lambda s: s["index"]), rows


def summary(seen: list[dict], rows: list, seconds: float, n: int, hz: float) -> dict:
    latency = np.array([r[1] for r in rows if r[2]])
    batches = np.array([r[3] for r in rows if r[2]])
    served = sum(s["served"] for s in seen)
    return {
        "robots": n, "hz_asked": hz, "seconds": seconds,
        "requests": len(rows), "served": served, "failed": sum(s["failed"] for s in seen),
        "stale": sum(s.get("client", {}).get("stale_replies", 0) for s in seen),
        "timeouts": sum(s.get("client", {}).get("timeouts", 0) for s in seen),
        "reconnects": sum(s.get("client", {}).get("reconnects", 0) for s in seen),
        "episodes_lost": sum(s.get("episodes_lost", 0) for s in seen),
        "missed_slots": sum(s.get("missed_slots", 0) for s in seen),
        "achieved_hz_per_robot": served / seconds / n if n else None,
        "latency_ms": {q: percentile(latency, v) for q, v in
                       (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "batch_seen_by_clients_mean": float(batches.mean()) if batches.size else None,
        "errors": [e for s in seen for e in s.get("errors", [])][:20],
    }


# ------------------------------------------------------------------------------- the runs
def load_run(args: argparse.Namespace) -> dict:
    process, port = start_server(args)
    t0 = time.monotonic()
    sampler = RssSampler(process.pid, args.rss_every, t0)
    sampler.start()
    load_start = os.getloadavg()
    try:
        robot_args = {"hz": args.hz, "seconds": args.seconds, "episode_s": args.episode_s,
                      "retries": 5, "backoff_max_s": 2.0}
        procs, out, t0_wall = run_robots(port, args.clients, args.procs, robot_args)
        steady_t0 = t0 + (t0_wall - time.time())
        seen, rows = collect(procs, out, len(procs), args.seconds + 120)
        steady = summary(seen, rows, args.seconds, args.clients, args.hz)
        steady["metrics_after"] = server_metrics(port)
        print(f"steady: {json.dumps({k: v for k, v in steady.items() if k != 'errors'})}",
              flush=True)
        burst = None
        if args.burst:
            burst_args = {**robot_args, "hz": 1.0, "seconds": 1e9, "episode_s": 1e9,
                          "requests": args.burst_requests}
            procs, out, t0_wall = run_robots(port, args.burst, args.procs, burst_args)
            burst_t = time.monotonic() + (t0_wall - time.time())
            seen_b, rows_b = collect(procs, out, len(procs), 600)
            burst = summary(seen_b, rows_b, time.monotonic() - burst_t, args.burst, 0)
            burst["wall_s"] = round(time.monotonic() - burst_t, 2)
            burst["metrics_after"] = server_metrics(port)
            print(f"burst: {json.dumps({k: v for k, v in burst.items() if k != 'errors'})}",
                  flush=True)
        time.sleep(args.rss_every)
    finally:
        final_metrics = server_metrics(port)
        sampler.stop.set()
        sampler.join()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    samples = sampler.samples
    steady_end = steady_t0 - t0 + args.seconds
    in_steady = [s for s in samples if steady_t0 - t0 + args.warmup_s <= s[0] <= steady_end]
    rss = {"every_s": args.rss_every, "samples": samples,
           "steady_first_mb": in_steady[0][1] if in_steady else None,
           "steady_last_mb": in_steady[-1][1] if in_steady else None,
           "steady_max_mb": max(s[1] for s in in_steady) if in_steady else None,
           "run_last_mb": samples[-1][1] if samples else None}
    if in_steady:
        rss["steady_growth_pct"] = 100 * (in_steady[-1][1] / in_steady[0][1] - 1)
        rss["run_growth_pct"] = 100 * (samples[-1][1] / in_steady[0][1] - 1)
    return {"steady": steady, "burst": burst, "rss": rss, "final_metrics": final_metrics,
            "steady_window_s": [round(steady_t0 - t0, 2), round(steady_end, 2)],
            "rows_per_second": per_second(rows, args.seconds),
            "loadavg_start": load_start, "loadavg_end": os.getloadavg()}


def per_second(rows: list, seconds: float, width: float = 5.0) -> list[dict]:
    """Served requests and latency p50 / p99 per `width`-second window of the steady run."""
    windows = []
    for start in np.arange(0, seconds, width):
        latency = [r[1] for r in rows if r[2] and start <= r[0] < start + width]
        windows.append({"t": float(start), "served_per_s": len(latency) / width,
                        "p50_ms": percentile(latency, 50), "p99_ms": percentile(latency, 99)})
    return windows


def fault_run(args: argparse.Namespace) -> dict:
    process, port = start_server(args)
    events: list[str] = []
    t0 = time.monotonic()
    robot_args = {"hz": args.hz, "seconds": args.seconds, "episode_s": args.episode_s,
                  "retries": args.retries, "backoff_max_s": args.backoff_max_s}
    procs, out, t0_wall = run_robots(port, args.clients, args.clients, robot_args)
    robots_t0 = t0 + (t0_wall - time.time())
    second = None
    try:
        time.sleep(max(0.0, robots_t0 + args.kill_at - time.monotonic()))
        killed = procs[:args.kill]
        for victim in killed:
            os.kill(victim.pid, signal.SIGKILL)
        events.append(f"{time.monotonic() - robots_t0:.1f}s: SIGKILL robots "
                      f"{list(range(args.kill))}")
        time.sleep(max(0.0, robots_t0 + args.restart_at - time.monotonic() - 1))
        before = server_metrics(port) or {}
        events.append(f"{time.monotonic() - robots_t0:.1f}s: /metrics before the restart: "
                      f"{before.get('connections')} connections, {before.get('episodes')} "
                      f"episodes, {before.get('episodes_waiting_for_resume')} waiting for a "
                      "resume")
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        events.append(f"{time.monotonic() - robots_t0:.1f}s: server stopped (SIGTERM, exit "
                      f"{process.returncode})")
        second, _ = start_server(args, port)
        events.append(f"{time.monotonic() - robots_t0:.1f}s: a new server listens on {port}")
        seen, rows = collect(procs, out, len(procs) - len(killed), args.seconds + 180)
        after = server_metrics(port)
    finally:
        for p in procs:
            p.join(timeout=5)
        for server in (process, second):
            if server is not None and server.poll() is None:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=60)
    return {"events": events, "metrics_before_restart": before, "metrics_after": after,
            "killed_robots": list(range(args.kill)),
            "robots": [{k: v for k, v in s.items()} for s in seen],
            "summary": summary(seen, rows, args.seconds, len(seen), args.hz)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    samples = np.array(result["rss"]["samples"])
    t0 = result["steady_window_s"][0]
    axes[0].plot(samples[:, 0] - t0, samples[:, 1])
    axes[0].set_ylabel("server RSS (MiB)")
    axes[0].set_ylim(0, samples[:, 1].max() * 1.1)
    ax_load = axes[0].twinx()
    ax_load.plot(samples[:, 0] - t0, samples[:, 2], color="gray", alpha=0.5)
    ax_load.set_ylabel("load avg (1 min)", color="gray")
    windows = result["rows_per_second"]
    t = [w["t"] for w in windows]
    axes[1].plot(t, [w["p50_ms"] for w in windows], label="p50")
    axes[1].plot(t, [w["p99_ms"] for w in windows], label="p99")
    axes[1].set_ylabel("round trip (ms)")
    axes[1].legend()
    axes[2].plot(t, [w["served_per_s"] for w in windows])
    axes[2].set_ylabel("chunks / s")
    axes[2].set_xlabel("s since the steady load started (burst after)")
    steady = result["steady"]
    fig.suptitle(f"{steady['robots']} robots at {steady['hz_asked']:g} Hz on loopback: "
                 f"{steady['served']} served, {steady['failed']} failed, {steady['stale']} stale")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--hz", type=float, default=10.0, help="requests per robot per second")
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--episode-s", type=float, default=30.0, help="a new episode this often")
    parser.add_argument("--burst", type=int, default=64)
    parser.add_argument("--burst-requests", type=int, default=3)
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument("--sampler", default="sequential_ddim16")
    parser.add_argument("--runtime", default="onnxruntime")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-clients", type=int, default=96)
    parser.add_argument("--resume-window-s", type=float, default=30.0)
    parser.add_argument("--server-arg", action="append", default=[],
                        help="another serve_policy.py override (repeatable)")
    parser.add_argument("--rss-every", type=float, default=1.0)
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--fault", action="store_true", help="the fault run instead")
    parser.add_argument("--kill", type=int, default=2)
    parser.add_argument("--kill-at", type=float, default=10.0)
    parser.add_argument("--restart-at", type=float, default=25.0)
    parser.add_argument("--retries", type=int, default=12)
    parser.add_argument("--backoff-max-s", type=float, default=4.0)
    args = parser.parse_args()
    if args.fault:
        args.seconds = min(args.seconds, 60.0) if args.seconds == 300.0 else args.seconds
    result: dict[str, Any] = {
        "benchmark": "server_fault" if args.fault else "server_load",
        "command": "python bench/server_load.py " + " ".join(sys.argv[1:]),
        "server": f"serve_policy.py host=127.0.0.1 sampler={args.sampler} "
                  f"runtime={args.runtime} threads=1 max_batch={args.max_batch} "
                  f"max_clients={args.max_clients} resume_window_s={args.resume_window_s} "
                  + " ".join(args.server_arg),
        "robots": "picard_client.PolicyClient threads in client processes on 127.0.0.1, "
                  "obs (2, 20) float32, one request out per robot",
        "cpus": os.cpu_count(),
    }
    result.update(fault_run(args) if args.fault else load_run(args))
    from picard_sampler.runinfo import run_info  # torch: only once the robots are done

    result["run_info"] = run_info("cpu")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if not args.fault:
        plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
