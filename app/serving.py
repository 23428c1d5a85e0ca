"""The policy server: chunk requests from robot processes over websockets + msgpack.

`PolicyServer` owns one policy + sampler (a `ChunkPolicy` that returns whole H-step chunks)
and serves any number of connections (up to `max_clients`). Each connection may run a few
episodes at once (`reset` -> an episode id); an episode keeps its own state on the server: its
noise generator (seeded by the server's noise seed and the episode's seed, so a chunk equals
the in-process chunk of eval_policy.py for the same seeds), its warm-start trajectory and the
committed prefix it sends. Requests are checked on arrival (obs shape, dtype and finiteness,
prefix, deadline, episode ownership) and a bad one gets an `error` reply while everyone else is
served. One inference thread takes every request waiting when it becomes free (up to
`max_batch`) and samples them in ONE sampler call; a request's `deadline_ms` becomes the
anytime samplers' budget (the smallest of the batch, less the time already spent queueing).
The protocol is serving/protocol.py; the design and its reasons are docs/design.md §11.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import secrets
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from picard_sampler import GUIDANCE_CLIP
from policy.chunking import ChunkPolicy
from policy.diffusion_policy import DiffusionPolicy
from serving.protocol import (
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    ProtocolError,
    pack,
    unpack,
)

CLOSE_SERVER_FULL = 1013  # websocket close code "try again later"


@dataclass
class _Prefix:
    """A request's committed actions on the chunk's timeline (ChunkPolicy's `prefix`)."""

    actions: np.ndarray  # (B, H, Da)
    weights: np.ndarray  # (B, H)


@dataclass
class _Job:
    """An accepted infer request waiting for (or in) a sampler call."""

    slot: int
    obs: Any  # (To, ...) or {key: (To, ...)}
    deadline_s: float | None
    prefix: tuple[np.ndarray, np.ndarray] | None
    received: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


@dataclass
class BatchRecord:
    """One sampler call of the server: how many requests it served and what it took."""

    batch: int
    sampler_ms: float
    queue_ms_max: float
    rounds: int


@dataclass(eq=False)
class _Connection:
    """A client's episodes (id -> ChunkPolicy slot)."""

    episodes: dict[str, int] = field(default_factory=dict)


class PolicyServer:
    """Serves chunks of `policy` sampled by `sampler` (see the module docstring)."""

    def __init__(
        self, policy: DiffusionPolicy, sampler: Any, metadata: Mapping[str, Any], *,
        noise_seed: int = 0, warm_start: str = "none", max_batch: int = 8,
        max_clients: int = 16, max_episodes_per_client: int = 8,
        max_message_bytes: int = 4 * 2**20, inpaint_method: str = "replace",
        guidance_clip: float = GUIDANCE_CLIP,
    ):
        self.policy = policy
        self.chunks = ChunkPolicy(policy, sampler, noise_seed, warm_start, full_horizon=True,
                                  inpaint_method=inpaint_method, guidance_clip=guidance_clip)
        self.max_batch = max_batch
        self.max_clients = max_clients
        self.max_episodes_per_client = max_episodes_per_client
        self.max_message_bytes = max_message_bytes
        self.metadata = {
            **metadata, "protocol": PROTOCOL_VERSION, "max_batch": max_batch,
            "max_message_bytes": max_message_bytes,
            "max_episodes_per_client": max_episodes_per_client,
            "obs_spec": {key: [policy.n_obs_steps, *shape]
                         for key, shape in policy.obs_encoder.obs_shapes.items()},
            "obs_aliases": dict(getattr(policy.obs_encoder, "aliases", {})),
            "action_dim": policy.action_dim, "horizon": policy.horizon,
            "n_obs_steps": policy.n_obs_steps, "n_action_steps": policy.n_action_steps,
        }
        self.batches: list[BatchRecord] = []
        self._connections: set[_Connection] = set()
        self._free_slots = list(range(max_clients * max_episodes_per_client))[::-1]
        # Slots in a sampler call are "busy"; an episode that ends meanwhile is released by the
        # worker after the call. The lock guards only this bookkeeping, never a sampler call,
        # so the event loop never waits for inference (ChunkPolicy touches a slot's own state
        # only, and a busy slot is never reset).
        self._lock = threading.Lock()
        self._busy: set[int] = set()
        self._release_after: set[int] = set()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="policy-server-infer",
                                        daemon=True)

    # ----------------------------------------------------------------------------- serving
    async def serve(self, host: str, port: int, stop: asyncio.Event,
                    on_ready: Callable[[int], None] | None = None) -> None:
        """Listen on host:port (0: a free port) until `stop` is set, then close every
        connection, finish the sampler call in flight and return."""
        self._worker.start()
        try:
            async with serve(self._handle_connection, host, port,
                             max_size=self.max_message_bytes, compression=None,
                             max_queue=4) as server:
                bound = server.sockets[0].getsockname()[1] if server.sockets else port
                if on_ready is not None:
                    on_ready(bound)
                await stop.wait()
                server.close()
                await server.wait_closed()
        finally:
            self._jobs.put(None)
            self._worker.join()

    async def _handle_connection(self, ws: ServerConnection) -> None:
        if len(self._connections) >= self.max_clients:
            await ws.close(CLOSE_SERVER_FULL, f"server full ({self.max_clients} clients)")
            return
        connection = _Connection()
        self._connections.add(connection)
        try:
            async for data in ws:
                request_id = None
                try:
                    message = unpack(data)
                    request_id = message.get("id")
                    reply = await self._reply(message, connection)
                except (ProtocolError, ValueError, TypeError, KeyError) as e:
                    reply = {"type": "error", "error": _one_line(e)}
                await ws.send(pack({**reply, "id": request_id}))
        except ConnectionClosed:
            pass
        finally:
            self._connections.discard(connection)
            for slot in connection.episodes.values():
                self._release(slot)

    # ---------------------------------------------------------------------------- requests
    async def _reply(self, message: dict[str, Any], connection: _Connection) -> dict[str, Any]:
        kind = message["type"]
        if kind not in REQUEST_TYPES:
            raise ProtocolError(f"unknown request type {kind!r}; one of {list(REQUEST_TYPES)}")
        if kind == "metadata":
            return {"type": "metadata", "metadata": self.metadata}
        if kind == "reset":
            return {"type": "episode", "episode": self._reset(message.get("seed"), connection)}
        slot = _episode_slot(message, connection)
        if kind == "end":
            del connection.episodes[message["episode"]]
            self._release(slot)
            return {"type": "ended", "episode": message["episode"]}
        job = self._job(message, slot)
        with self._lock:
            self._busy.add(slot)
        self._jobs.put(job)
        actions, info = await job.future
        return {"type": "chunk", "actions": actions, "info": info}

    def _reset(self, seed: Any, connection: _Connection) -> str:
        if seed is None:
            seed = secrets.randbits(32)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
            raise ValueError(f"reset: seed must be null or an int in [0, 2**32); got {seed!r}")
        if len(connection.episodes) >= self.max_episodes_per_client:
            raise ValueError(f"reset: this connection already runs {len(connection.episodes)} "
                             f"episodes (max_episodes_per_client); end one first")
        with self._lock:
            slot = self._free_slots.pop()
            self.chunks.on_reset(slot, seed)
        episode = secrets.token_hex(8)
        connection.episodes[episode] = slot
        return episode

    def _release(self, slot: int) -> None:
        """Free an episode's slot now, or after the sampler call it is in."""
        with self._lock:
            if slot in self._busy:
                self._release_after.add(slot)
                return
            self.chunks.on_reset(slot, None)
            self._free_slots.append(slot)

    def _done_with(self, slots: list[int]) -> None:
        """The worker finished a call over `slots`: free those whose episode ended meanwhile."""
        with self._lock:
            self._busy.difference_update(slots)
            for slot in self._release_after.intersection(slots):
                self._release_after.discard(slot)
                self.chunks.on_reset(slot, None)
                self._free_slots.append(slot)

    def _job(self, message: dict[str, Any], slot: int) -> _Job:
        """An infer request checked on arrival: obs, deadline and prefix (ValueError if bad)."""
        obs = message.get("obs")
        if isinstance(obs, dict):
            batched: Any = {k: np.asarray(v)[None] for k, v in obs.items()}
        elif isinstance(obs, np.ndarray):
            batched = obs[None]
        else:
            raise ValueError("infer: obs must be an array (To, ...) or a map of arrays")
        # shape, dtype and NaN are checked by the inference thread (policy.check_obs per
        # request, before batching): torch work stays off the event loop
        deadline = message.get("deadline_ms")
        if deadline is not None and (not isinstance(deadline, int | float)
                                     or isinstance(deadline, bool) or not deadline > 0):
            raise ValueError(f"infer: deadline_ms must be null or a number > 0; got {deadline!r}")
        prefix = message.get("prefix")
        if prefix is not None:
            prefix = self._check_prefix(prefix)
        loop = asyncio.get_running_loop()
        return _Job(slot, batched, None if deadline is None else deadline / 1e3, prefix,
                    time.perf_counter(), loop, loop.create_future())

    def _check_prefix(self, prefix: Any) -> tuple[np.ndarray, np.ndarray]:
        h, da = self.policy.horizon, self.policy.action_dim
        if not isinstance(prefix, dict):
            raise ValueError("infer: prefix must be a map with actions (H, Da) and weights (H,)")
        actions, weights = prefix.get("actions"), prefix.get("weights")
        if not isinstance(actions, np.ndarray) or actions.shape != (h, da):
            raise ValueError(f"infer: prefix actions must be an array of shape ({h}, {da})")
        if not isinstance(weights, np.ndarray) or weights.shape != (h,):
            raise ValueError(f"infer: prefix weights must be an array of shape ({h},)")
        if not (np.isfinite(actions).all() and np.isfinite(weights).all()):
            raise ValueError("infer: prefix contains NaN or inf")
        if not ((weights >= 0) & (weights <= 1)).all():
            raise ValueError("infer: prefix weights must lie in [0, 1]")
        return actions.astype(np.float32), weights.astype(np.float32)

    # ------------------------------------------------------------------------------ worker
    def _work(self) -> None:
        """The inference thread: every waiting request (up to max_batch) in one call."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[_Job]) -> None:
        try:
            self._sample(batch)
        finally:
            self._done_with([job.slot for job in batch])

    def _sample(self, batch: list[_Job]) -> None:
        """One sampler call for the requests of `batch` whose observations pass the check."""
        start = time.perf_counter()
        batch = [job for job in batch if self._obs_ok(job)]
        if not batch:
            return
        try:
            obs = _stack([job.obs for job in batch])
            deadlines = [job.deadline_s - (start - job.received) for job in batch
                         if job.deadline_s is not None]
            budget = max(min(deadlines), 1e-4) if deadlines else None
            prefix = None
            if any(job.prefix is not None for job in batch):
                h, da = self.policy.horizon, self.policy.action_dim
                actions = np.zeros((len(batch), h, da), np.float32)
                weights = np.zeros((len(batch), h), np.float32)
                for k, job in enumerate(batch):
                    if job.prefix is not None:
                        actions[k], weights[k] = job.prefix
                prefix = _Prefix(actions, weights)
            chunks, record = self.chunks(obs, budget, prefix=prefix,
                                         rows=[job.slot for job in batch])
        except Exception as e:  # one bad batch must not stop the server: its clients hear why
            for job in batch:
                _resolve(job, error=ValueError(f"inference failed: {_one_line(e)}"))
            return
        done = time.perf_counter()
        self.batches.append(BatchRecord(len(batch), record.latency_ms,
                                        max((start - j.received) * 1e3 for j in batch),
                                        record.rounds))
        for k, job in enumerate(batch):
            info = {"rounds": record.rounds, "nfe": record.nfe,
                    "converged": record.converged_rows[k],
                    "sampler_ms": record.latency_ms, "infer_ms": (done - start) * 1e3,
                    "batch": len(batch), "server_ms": (done - job.received) * 1e3}
            _resolve(job, (np.asarray(chunks[k], np.float32), info))

    def _obs_ok(self, job: _Job) -> bool:
        """Check one request's observation (policy.check_obs); a bad one is answered with
        the check's message and left out of the batch."""
        try:
            self.policy.check_obs(job.obs)
        except ValueError as e:
            _resolve(job, error=e)
            return False
        return True


def _episode_slot(message: dict[str, Any], connection: _Connection) -> int:
    episode = message.get("episode")
    if episode not in connection.episodes:
        raise ValueError(f"unknown episode {episode!r} on this connection (send reset first)")
    return connection.episodes[episode]


def _stack(observations: list[Any]) -> Any:
    """Batch-1 observations (arrays or dicts of arrays) stacked into one batch."""
    if isinstance(observations[0], dict):
        keys = observations[0].keys()
        if any(o.keys() != keys for o in observations):
            raise ValueError("requests in one batch name different observation keys")
        return {k: np.concatenate([np.asarray(o[k], np.float32) for o in observations])
                for k in keys}
    return np.concatenate([np.asarray(o, np.float32) for o in observations])


def _resolve(job: _Job, result: Any = None, error: Exception | None = None) -> None:
    """Hand a result (or an error) to the request's coroutine, from the worker thread."""

    def deliver() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the event loop is gone: shutting down
        job.loop.call_soon_threadsafe(deliver)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:500]


def run_server(server: PolicyServer, host: str, port: int,
               on_ready: Callable[[int], None] | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C, then shut down cleanly (in-flight call finished)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.serve(host, port, stop, on_ready)

    asyncio.run(main())


# ------------------------------------------------------------------------------- the entry
def check_serve_config(cfg: Any) -> None:
    """Reject values serve_policy.py cannot use, naming the key and what is allowed."""
    from app.config import DEVICE_ALLOWED, device_ok, is_int, is_number, raise_first_failure
    from picard_sampler import INPAINT_METHODS
    from policy.chunking import WARM_STARTS

    raise_first_failure(cfg, [
        ("checkpoint", isinstance(cfg.checkpoint, str) and bool(cfg.checkpoint), "a path"),
        ("host", isinstance(cfg.host, str) and bool(cfg.host), "a host name or address"),
        ("port", is_int(cfg.port, 0) and cfg.port <= 65535, "an int in [0, 65535]"),
        ("noise_seed", is_int(cfg.noise_seed, 0), "an int >= 0"),
        ("warm_start", cfg.warm_start in WARM_STARTS, f"one of {list(WARM_STARTS)}"),
        ("inpaint_method", cfg.inpaint_method in INPAINT_METHODS,
         f"one of {list(INPAINT_METHODS)}"),
        ("guidance_clip", is_number(cfg.guidance_clip, 0, strict=True), "a number > 0"),
        ("control_hz", is_number(cfg.control_hz, 0, strict=True), "a number > 0"),
        ("max_batch", is_int(cfg.max_batch, 1), "an int >= 1"),
        ("max_clients", is_int(cfg.max_clients, 1), "an int >= 1"),
        ("max_episodes_per_client", is_int(cfg.max_episodes_per_client, 1), "an int >= 1"),
        ("max_message_mb", is_number(cfg.max_message_mb, 0, strict=True), "a number > 0"),
        ("ready_file", cfg.ready_file is None or isinstance(cfg.ready_file, str),
         "null or a path"),
        ("device", device_ok(cfg.device), DEVICE_ALLOWED),
        ("threads", cfg.threads is None or is_int(cfg.threads, 1), "null or an int >= 1"),
    ])


def run_serve(cfg: Any) -> None:
    """serve_policy.py's job: load the policy, sampler and runtime as eval_policy.py does, then
    serve until SIGTERM / Ctrl-C."""
    import json
    import os
    from pathlib import Path

    from app.config import ConfigError, configure_torch, plain
    from app.evaluation import (
        build_sampler,
        check_pcm_weights,
        choose_runtime,
        load_checkpoint_and_policy,
        resolve_env,
    )
    from app.report import write_text

    check_serve_config(cfg)
    device = configure_torch(cfg.device, cfg.threads)
    checkpoint, policy = load_checkpoint_and_policy(cfg.checkpoint, device)
    sampler = build_sampler(cfg.sampler, policy)
    check_pcm_weights(sampler, checkpoint, cfg.checkpoint)
    choose_runtime(policy, cfg.runtime)
    try:
        env = resolve_env(cfg.env, checkpoint["config"])
    except ValueError:
        env = None  # an imported policy names no env: clients bring their own
    metadata = {
        "checkpoint": {"path": str(cfg.checkpoint), "step": checkpoint["step"]},
        "sampler": {"label": sampler.label, **sampler.config}, "runtime": plain(cfg.runtime),
        "env": env, "control_hz": float(cfg.control_hz), "noise_seed": cfg.noise_seed,
        "warm_start": cfg.warm_start, "device": str(device),
        "inpaint": {"method": cfg.inpaint_method, "guidance_clip": float(cfg.guidance_clip)},
    }
    try:
        server = PolicyServer(
            policy, sampler, metadata, noise_seed=cfg.noise_seed, warm_start=cfg.warm_start,
            max_batch=cfg.max_batch, max_clients=cfg.max_clients,
            max_episodes_per_client=cfg.max_episodes_per_client,
            max_message_bytes=int(cfg.max_message_mb * 2**20),
            inpaint_method=cfg.inpaint_method, guidance_clip=float(cfg.guidance_clip),
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e

    def on_ready(port: int) -> None:
        print(f"serving {cfg.checkpoint} with {sampler.label} on ws://{cfg.host}:{port} "
              f"({device}); SIGTERM or Ctrl-C stops", flush=True)
        if cfg.ready_file:
            record = {"host": cfg.host, "port": port, "pid": os.getpid()}
            write_text(Path(cfg.ready_file), json.dumps(record) + "\n")

    run_server(server, cfg.host, cfg.port, on_ready)
    print(f"server stopped after {len(server.batches)} sampler calls", flush=True)
