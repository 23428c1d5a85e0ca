"""The policy server: chunk requests from robot processes over websockets + msgpack.

`PolicyServer` owns one policy + sampler (a `ChunkPolicy` that returns whole H-step chunks)
and serves any number of connections (up to `max_clients`). Each connection may run a few
episodes at once (`reset` -> an episode id); an episode keeps its own state on the server: its
noise generator (seeded by the server's noise seed and the episode's seed, so a chunk equals
the in-process chunk of eval_policy.py for the same seeds), its warm-start trajectory, the
committed prefix it sends and its last reply (a request re-sent with the same id after a
reconnect is answered again, not sampled twice). When a connection drops, its episodes wait
`resume_window_s` for a `resume` from a new connection, then go. Requests are checked on
arrival (message, episode ownership, obs layout, prefix, deadline) and a bad one gets an
`error` reply while everyone else is served. One inference thread takes every request waiting
when it becomes free (up to `max_batch`), checks and normalises each observation with the
policy's own `check_obs` (so requests sending an array and requests sending {key: array} share
a call) and samples them in ONE sampler call; a request's `deadline_ms` becomes the anytime
samplers' budget (the smallest of the batch, less the time already spent queueing). A chunk
that is not finite is never sent: its request gets an error. Nothing a client sends stops the
inference thread, silent connections are closed after `idle_timeout_s`, and a stop (SIGTERM)
ends every state within bounded time.

Operations: a token (`auth_token`) is checked in constant time on every connection (refused:
close 4401 and one log line); TLS with `ssl_context`; ``GET /healthz`` and ``GET /metrics``
(JSON: requests, errors, queue depth, latency percentiles, batch sizes, RSS) on the same port;
every history the server keeps is bounded, so it runs for weeks in constant memory.
`protocol="openpi"` speaks openpi's websocket protocol instead (picard_client.openpi). The
protocol is picard_client/protocol.py; the design, its guarantees and their reasons are
docs/design.md §11.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import hmac
import http
import ipaddress
import json
import logging
import os
import queue
import secrets
import signal
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from picard_client import openpi
from picard_client.protocol import (
    AUTH_ENV,
    CLOSE_GOING_AWAY,
    CLOSE_IDLE,
    CLOSE_SERVER_FULL,
    CLOSE_UNAUTHORIZED,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_MESSAGE_ITEMS,
    MAX_ID_CHARS,
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    ProtocolError,
    pack,
    short_repr,
    token_of,
    type_name,
    unpack,
)
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from picard_sampler import GUIDANCE_CLIP
from picard_sampler.metrics import percentile
from policy.chunking import ChunkPolicy
from policy.diffusion_policy import DiffusionPolicy

CLOSE_TIMEOUT_S = 2.0  # a peer that does not answer our close frame is dropped after this
HANDSHAKE_TIMEOUT_S = 10.0  # a TCP connection must finish its websocket handshake in this time
INLINE_DECODE_BYTES = 64 * 2**10  # larger messages are decoded off the event loop
DECODE_THREADS = 2
STOP_GRACE_S = 30.0  # a stop waits this long for the sampler call in flight, then exits anyway
NON_FINITE_CHUNK = ("inference gave a chunk with NaN or inf, so none is sent (are the "
                    "checkpoint's weights and action statistics finite?)")
PROTOCOLS = ("picard", "openpi")
OPENPI_ACTIONS = ("executable", "chunk")  # (Ta, Da) from the request tick on, or the (H, Da)
HEALTH_PATH, METRICS_PATH = "/healthz", "/metrics"
BATCH_HISTORY = 1024  # sampler calls kept in `batches` (counters cover the whole run)
LATENCY_WINDOW = 4096  # the latest chunks whose latencies /metrics summarises

log = logging.getLogger(__name__)


class _OneLineLog(logging.Filter):
    """websockets logs a failed handshake (a port scanner, an HTTP client, garbage bytes) as an
    ERROR with a traceback: make every such record one WARNING line naming the exception."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(error).__name__}: {_one_line(error)}"
            record.args = None
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_ws_log = logging.getLogger(f"{__name__}.websockets")
_ws_log.addFilter(_OneLineLog())


class InferenceThreadDied(RuntimeError):
    """The inference thread stopped (never by a request: a BaseException in the sampler)."""


class UnknownEpisode(ValueError):
    """A request names an episode this connection does not run (error code unknown_episode)."""


class Unavailable(ValueError):
    """The server takes no more requests: it is shutting down (error code unavailable)."""


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_ssl_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2 or later) from a PEM certificate chain and its key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context


def rss_mb() -> float | None:
    """This process's resident memory (MiB) from /proc; None where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class _Prefix:
    """A request's committed actions on the chunk's timeline (ChunkPolicy's `prefix`)."""

    actions: np.ndarray  # (B, H, Da)
    weights: np.ndarray  # (B, H)


@dataclass(eq=False)
class _Episode:
    """An episode: its ChunkPolicy slot and seed, the connection that runs it (None while it
    waits for a resume), its request in a sampler call and its last answered request."""

    id: str
    slot: int
    seed: int
    owner: _Connection | None
    job: _Job | None = None
    last_id: Any = None
    last_reply: dict[str, Any] | None = None
    expiry: asyncio.TimerHandle | None = None


@dataclass
class _Job:
    """An accepted infer request waiting for (or in) a sampler call."""

    slot: int
    obs: Any  # (1, To, ...) or {key: (1, To, ...)}, as sent
    deadline_s: float | None
    prefix: tuple[np.ndarray, np.ndarray] | None
    received: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    request_id: Any = None
    checked: dict[str, torch.Tensor] | None = None  # the policy's layout, set by the worker
    answered: bool = False  # set by the worker when it hands over a result or an error


@dataclass
class BatchRecord:
    """One sampler call of the server: how many requests it served and what it took."""

    batch: int
    sampler_ms: float
    queue_ms_max: float
    rounds: int


@dataclass(eq=False)
class _Connection:
    """A client's episodes (id -> _Episode); `closed` completes when it goes."""

    closed: asyncio.Future | None = None
    episodes: dict[str, _Episode] = field(default_factory=dict)
    openpi_episode: _Episode | None = None  # protocol=openpi: the connection's one episode

    @property
    def gone(self) -> bool:
        return self.closed is not None and self.closed.done()


@dataclass(frozen=True)
class ServerSettings:
    """How a PolicyServer serves (conf/serve.yaml, docs/design.md §11): the episodes' noise seed
    and warm start, batching, connection and message limits, the idle and ping clocks, how a
    request's prefix constrains its chunk, the wire protocol, the token and the resume window.
    The token is kept out of the record's repr."""

    noise_seed: int = 0
    warm_start: str | bool = "none"
    max_batch: int = 8
    max_clients: int = 16
    max_episodes_per_client: int = 8
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_message_items: int = DEFAULT_MAX_MESSAGE_ITEMS
    idle_timeout_s: float = 60.0
    ping_interval_s: float | None = 20.0
    ping_timeout_s: float | None = 20.0
    inpaint_method: str = "replace"
    guidance_clip: float = GUIDANCE_CLIP
    protocol: str = "picard"
    openpi_actions: str = "executable"
    auth_token: str | None = field(default=None, repr=False)
    resume_window_s: float = 30.0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS or self.openpi_actions not in OPENPI_ACTIONS:
            raise ValueError(f"protocol must be one of {list(PROTOCOLS)} and openpi_actions one "
                             f"of {list(OPENPI_ACTIONS)}; got {self.protocol!r}, "
                             f"{self.openpi_actions!r}")

    @classmethod
    def from_config(cls, cfg: Any, auth_token: str | None) -> ServerSettings:
        """The settings of a checked conf/serve.yaml config (`auth_token`: serve_security's)."""
        return cls(
            noise_seed=cfg.noise_seed, warm_start=cfg.warm_start, max_batch=cfg.max_batch,
            max_clients=cfg.max_clients, max_episodes_per_client=cfg.max_episodes_per_client,
            max_message_bytes=int(cfg.max_message_mb * 2**20),
            max_message_items=cfg.max_message_items, idle_timeout_s=float(cfg.idle_timeout_s),
            ping_interval_s=cfg.ping_interval_s, ping_timeout_s=cfg.ping_timeout_s,
            inpaint_method=cfg.inpaint_method, guidance_clip=float(cfg.guidance_clip),
            protocol=cfg.protocol, openpi_actions=cfg.openpi_actions, auth_token=auth_token,
            resume_window_s=float(cfg.resume_window_s))


class PolicyServer:
    """Serves chunks of `policy` sampled by `sampler` (see the module docstring)."""

    def __init__(self, policy: DiffusionPolicy, sampler: Any, metadata: Mapping[str, Any],
                 settings: ServerSettings | None = None):
        settings = ServerSettings() if settings is None else settings
        protocol, openpi_actions = settings.protocol, settings.openpi_actions
        max_batch = settings.max_batch
        self.settings = settings
        self.policy = policy
        self.chunks = ChunkPolicy(policy, sampler, settings.noise_seed, settings.warm_start,
                                  full_horizon=True, inpaint_method=settings.inpaint_method,
                                  guidance_clip=settings.guidance_clip)
        self.protocol = protocol
        self.openpi_actions = openpi_actions
        self._token_digest = (None if settings.auth_token is None
                              else hashlib.sha256(settings.auth_token.encode()).digest())
        self.resume_window_s = float(settings.resume_window_s)
        self.max_batch = max_batch
        self.max_clients = settings.max_clients
        self.max_episodes_per_client = settings.max_episodes_per_client
        self.max_message_bytes = settings.max_message_bytes
        self.max_message_items = settings.max_message_items
        self.idle_timeout_s = float(settings.idle_timeout_s)
        self.ping_interval_s = settings.ping_interval_s
        self.ping_timeout_s = settings.ping_timeout_s
        self.metadata = {
            **metadata, "protocol": PROTOCOL_VERSION, "wire": protocol, "max_batch": max_batch,
            "max_message_bytes": self.max_message_bytes,
            "max_message_items": self.max_message_items,
            "max_episodes_per_client": self.max_episodes_per_client,
            "idle_timeout_s": self.idle_timeout_s, "resume_window_s": self.resume_window_s,
            "obs_spec": {key: [policy.n_obs_steps, *shape]
                         for key, shape in policy.obs_encoder.obs_shapes.items()},
            "obs_aliases": dict(getattr(policy.obs_encoder, "aliases", {})),
            "action_dim": policy.action_dim, "horizon": policy.horizon,
            "n_obs_steps": policy.n_obs_steps, "n_action_steps": policy.n_action_steps,
        }
        if protocol == "openpi":
            steps = policy.n_action_steps if openpi_actions == "executable" else policy.horizon
            self.metadata["openpi"] = {
                "actions": openpi_actions, "action_steps": steps,
                "first_action_index": policy.n_obs_steps - 1 if steps != policy.horizon else 0,
                "episode_seed_key": openpi.EPISODE_SEED_KEY}
        # Bounded histories: a server runs for weeks. `batches` keeps the latest calls,
        # counters the whole run, `_latency` the latest chunks (what /metrics summarises).
        self.batches: collections.deque[BatchRecord] = collections.deque(maxlen=BATCH_HISTORY)
        self.calls = 0
        self._batch_sizes = [0] * (max_batch + 1)
        self._latency: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=LATENCY_WINDOW)  # (server_ms, infer_ms) per chunk
        self._requests = dict.fromkeys(REQUEST_TYPES, 0)
        self._errors = 0
        self._refused = {"unauthorized": 0, "full": 0}
        self._started = time.monotonic()
        self._connections: set[_Connection] = set()
        self._episodes: dict[str, _Episode] = {}  # every episode, attached or waiting
        self._detached: collections.OrderedDict[str, _Episode] = collections.OrderedDict()
        self._free_slots: list[int] = []
        self._next_slot = 0
        # Slots in a sampler call are "busy"; an episode that ends meanwhile is released by the
        # worker after the call. The lock guards only this bookkeeping and the queue's door,
        # never a sampler call, so the event loop never waits for inference (ChunkPolicy
        # touches a slot's own state only, and a busy slot is never reset).
        self._lock = threading.Lock()
        self._busy: set[int] = set()
        self._release_after: set[int] = set()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._closed_reason: str | None = None  # set: no job is queued any more (and why)
        self.worker_error: str | None = None  # why the inference thread died, if it did
        self._worker_died: Callable[[], None] = lambda: None
        self._worker = threading.Thread(target=self._work, name="policy-server-infer",
                                        daemon=True)

    # ----------------------------------------------------------------------------- serving
    async def serve(self, host: str, port: int, stop: asyncio.Event,
                    on_ready: Callable[[int], None] | None = None,
                    ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen on host:port (0: a free port; TLS with `ssl_context`) until `stop` is set,
        then close every connection, finish the sampler call in flight (up to STOP_GRACE_S)
        and return. Raises InferenceThreadDied (after the same clean-up) if the inference
        thread stopped."""
        loop = asyncio.get_running_loop()
        died = asyncio.Event()

        def worker_died() -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is already gone
                loop.call_soon_threadsafe(died.set)

        self._worker_died = worker_died
        decoder = concurrent.futures.ThreadPoolExecutor(DECODE_THREADS, "policy-server-decode")
        self._worker.start()
        server: Server | None = None
        try:
            server = await serve(
                lambda ws: self._handle_connection(ws, decoder), host, port, ssl=ssl_context,
                max_size=self.max_message_bytes, compression=None, max_queue=2,
                open_timeout=min(HANDSHAKE_TIMEOUT_S, self.idle_timeout_s),
                close_timeout=CLOSE_TIMEOUT_S, ping_interval=self.ping_interval_s,
                ping_timeout=self.ping_timeout_s, logger=_ws_log,
                process_request=self._http, process_response=self._stamp)
            bound = server.sockets[0].getsockname()[1] if server.sockets else port
            if on_ready is not None:
                on_ready(bound)
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(died.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
        finally:
            self._close_queue("the server is shutting down")
            if server is not None:
                server.close()  # 1001 to every connection; handlers return at once
                for connection, task in list(server.handlers.items()):
                    if connection.state is State.CONNECTING:  # no handshake yet: not a client
                        task.cancel()
                try:
                    await asyncio.wait_for(server.wait_closed(), 2 * CLOSE_TIMEOUT_S + 1)
                except TimeoutError:  # a peer that reads nothing blocks even the close frame
                    log.warning("connections still closing after %.0f s; dropping them",
                                2 * CLOSE_TIMEOUT_S + 1)
                    for connection in list(server.handlers):
                        connection.transport.abort()
            for episode in list(self._episodes.values()):
                self._drop(episode)
            await asyncio.to_thread(self._worker.join, STOP_GRACE_S)
            if self._worker.is_alive():
                log.warning("the sampler call in flight did not finish within %.0f s; "
                            "stopping anyway", STOP_GRACE_S)
            decoder.shutdown(wait=False, cancel_futures=True)
        if self.worker_error is not None:
            raise InferenceThreadDied(f"the inference thread stopped: {self.worker_error}")

    # -------------------------------------------------------------------------------- HTTP
    def _authorized(self, headers: Headers) -> bool:
        """Whether a handshake carries the server's token (constant-time; no token: yes)."""
        if self._token_digest is None:
            return True
        token = token_of(headers.get("Authorization"))
        given = hashlib.sha256((token or "").encode()).digest()
        return hmac.compare_digest(given, self._token_digest) and token is not None

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        """``GET /healthz`` (200 while serving, 503 once stopping) and ``GET /metrics`` (JSON;
        the token when the server has one) on the websocket port; anything else goes on to
        the websocket handshake."""
        path = request.path.partition("?")[0]
        if path == HEALTH_PATH:
            if self._closed_reason is not None:
                return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                          f"{self._closed_reason}\n")
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if path == METRICS_PATH:
            if not self._authorized(request.headers):
                self._refused["unauthorized"] += 1
                log.warning("refused /metrics to %s: no valid token", _peer(connection))
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "unauthorized\n")
            response = connection.respond(http.HTTPStatus.OK, json.dumps(self.metrics()) + "\n")
            response.headers["Content-Type"] = "application/json"
            return response
        return None

    def _stamp(self, connection: ServerConnection, request: Request, response: Response
               ) -> None:
        """Name the protocol version in the handshake, so a client checks it at once."""
        if self.protocol == "picard":
            response.headers[PROTOCOL_HEADER] = str(PROTOCOL_VERSION)

    def metrics(self) -> dict[str, Any]:
        """What /metrics reports: counters since the start, the queue, latency percentiles
        over the latest LATENCY_WINDOW chunks, the batch-size histogram and the RSS."""
        latency = np.array(self._latency or [(np.nan, np.nan)], dtype=float)
        server_ms, infer_ms = latency[:, 0], latency[:, 1]
        served = server_ms[np.isfinite(server_ms)]
        inferred = infer_ms[np.isfinite(infer_ms)]
        return {
            "protocol": self.protocol, "protocol_version": PROTOCOL_VERSION,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "connections": len(self._connections),
            "episodes": len(self._episodes) - len(self._detached),
            "episodes_waiting_for_resume": len(self._detached),
            "requests": dict(self._requests), "errors": self._errors,
            "refused_connections": dict(self._refused),
            "queue_depth": self._jobs.qsize(), "sampler_calls": self.calls,
            "batch_sizes": {str(size): n for size, n in enumerate(self._batch_sizes) if n},
            "latency_ms": {
                "window": int(served.size),
                "server_p50": percentile(served, 50), "server_p99": percentile(served, 99),
                "infer_p50": percentile(inferred, 50), "infer_p99": percentile(inferred, 99)},
            "rss_mb": rss_mb(),
        }

    # ------------------------------------------------------------------------- connections
    async def _handle_connection(self, ws: ServerConnection,
                                 decoder: concurrent.futures.Executor) -> None:
        if self._closed_reason is not None:
            await ws.close(CLOSE_GOING_AWAY, "server shutting down")
            return
        if not self._authorized(ws.request.headers):
            self._refused["unauthorized"] += 1
            given = "a wrong token" if token_of(ws.request.headers.get("Authorization")) else \
                "no token"
            log.warning("refused a connection from %s: %s (close %d)", _peer(ws), given,
                        CLOSE_UNAUTHORIZED)
            await ws.close(CLOSE_UNAUTHORIZED, f"unauthorized: {given} (Authorization: Bearer "
                                               "<token> or Api-Key <token>)")
            return
        if len(self._connections) >= self.max_clients:
            self._refused["full"] += 1
            await ws.close(CLOSE_SERVER_FULL, f"server full ({self.max_clients} clients)")
            return
        connection = _Connection(closed=asyncio.ensure_future(ws.wait_closed()))
        self._connections.add(connection)
        try:
            if self.protocol == "openpi":
                metadata = {**self.metadata, "protocol": "openpi"}
                if not await self._send(ws, openpi.packb(metadata)):
                    return
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout_s):
                        data = await ws.recv()
                except TimeoutError:
                    self._connections.discard(connection)  # its place is free at once
                    await ws.close(CLOSE_IDLE, f"idle for {self.idle_timeout_s:g} s "
                                               "(idle_timeout_s)")
                    return
                if self.protocol == "openpi":
                    reply: bytes | str | None = await self._answer_openpi(data, connection,
                                                                          decoder)
                else:
                    answer = await self._answer(data, connection, decoder)
                    reply = None if answer is None else pack(answer)
                if reply is None:  # the client left while its request was in a sampler call
                    return
                if not await self._send(ws, reply):
                    return
        except ConnectionClosed:
            pass
        finally:
            connection.closed.cancel()
            self._connections.discard(connection)
            for episode in list(connection.episodes.values()):
                self._detach(episode)

    async def _send(self, ws: ServerConnection, data: bytes | str) -> bool:
        """Send a reply; a client that takes none for idle_timeout_s is dropped (False)."""
        try:
            async with asyncio.timeout(self.idle_timeout_s):
                await ws.send(data)
        except TimeoutError:  # it reads nothing: its replies (and our pings) pile up
            log.warning("dropped a client that read no reply for %g s (idle_timeout_s)",
                        self.idle_timeout_s)
            ws.transport.abort()
            return False
        return True

    async def _decode(self, data: bytes | str, decoder: concurrent.futures.Executor,
                      unpacker: Callable[[Any, int], Any]) -> Any:
        """A received frame decoded by `unpacker` (large ones off the event loop)."""
        if isinstance(data, bytes) and len(data) > INLINE_DECODE_BYTES:
            return await asyncio.get_running_loop().run_in_executor(
                decoder, unpacker, data, self.max_message_items)
        return unpacker(data, self.max_message_items)

    async def _answer(self, data: bytes | str, connection: _Connection,
                      decoder: concurrent.futures.Executor) -> dict[str, Any] | None:
        """The reply to one received frame: every failure is an error reply to it."""
        request_id = None
        try:
            message = await self._decode(data, decoder, unpack)
            request_id = _request_id(message)
            reply = await self._reply(message, request_id, connection)
            if reply is None:
                return None
        except Exception as e:
            reply = self._error(e)
        return {**reply, "id": request_id}

    def _error(self, error: Exception) -> dict[str, Any]:
        """An error reply naming what is wrong in one line, with its code."""
        self._errors += 1
        if isinstance(error, UnknownEpisode):
            code = "unknown_episode"
        elif isinstance(error, Unavailable):
            code = "unavailable"
        elif isinstance(error, ProtocolError | ValueError):
            code = "bad_request"
        else:  # a bug of ours: logged, and still answered in one line
            log.exception("internal error answering a request")
            return {"type": "error", "code": "internal",
                    "error": f"internal error: {type(error).__name__}: {_one_line(error)}"}
        return {"type": "error", "code": code, "error": _one_line(error)}

    async def _answer_openpi(self, data: bytes | str, connection: _Connection,
                             decoder: concurrent.futures.Executor) -> bytes | str | None:
        """openpi's reply to one observation: {"actions", "info", "server_timing"} as
        msgpack-numpy, or a text frame of one line naming what is wrong (openpi's client
        raises it); the connection stays usable."""
        try:
            obs, seed = openpi.observation(await self._decode(data, decoder, openpi.unpackb))
            episode = self._openpi_episode(connection, seed)
            self._requests["infer"] += 1
            result = await self._infer(self._job({"obs": obs}, episode.slot, None), episode,
                                       connection)
            if result is None:
                return None
            actions, info = result
            if self.openpi_actions == "executable":
                first = self.policy.n_obs_steps - 1
                actions = actions[first:first + self.policy.n_action_steps]
            return openpi.packb({"actions": actions, "info": info, "server_timing": {
                "infer_ms": info["infer_ms"], "server_ms": info["server_ms"]}})
        except Exception as e:
            return f"error: {self._error(e)['error']}"

    def _openpi_episode(self, connection: _Connection, seed: int | None) -> _Episode:
        """An openpi connection's episode: a new one for a new `seed` (or the first request),
        the running one otherwise."""
        current = connection.openpi_episode
        if current is not None and (seed is None or seed == current.seed):
            return current
        if current is not None:
            del connection.episodes[current.id]
            self._drop(current)
        self._requests["reset"] += 1
        connection.openpi_episode = self._reset(seed, connection)
        return connection.openpi_episode

    # ---------------------------------------------------------------------------- requests
    async def _reply(self, message: dict[str, Any], request_id: Any, connection: _Connection
                     ) -> dict[str, Any] | None:
        kind = message["type"]
        if not isinstance(kind, str) or kind not in REQUEST_TYPES:
            raise ProtocolError(f"unknown request type {short_repr(kind)}; one of "
                                f"{list(REQUEST_TYPES)}")
        self._requests[kind] += 1
        if kind == "metadata":
            return {"type": "metadata", "metadata": self.metadata}
        if kind == "reset":
            episode = self._reset(message.get("seed"), connection)
            return {"type": "episode", "episode": episode.id}
        if kind == "resume":
            return {"type": "episode", "episode": self._resume(message.get("episode"),
                                                               connection).id, "resumed": True}
        episode = _episode_of(message, connection)
        if kind == "end":
            del connection.episodes[episode.id]
            self._drop(episode)
            return {"type": "ended", "episode": episode.id}
        if request_id is not None:  # a request re-sent after a reconnect: answered once
            if episode.job is not None and episode.job.request_id == request_id:
                return await self._infer(episode.job, episode, connection, queued=True)
            if episode.last_id == request_id and episode.last_reply is not None:
                return episode.last_reply
        if episode.job is not None:  # a dropped connection's request is still in a call
            await asyncio.wait([episode.job.future, connection.closed],
                               return_when=asyncio.FIRST_COMPLETED)
            if connection.gone:
                return None
        return await self._infer(self._job(message, episode.slot, request_id), episode,
                                 connection)

    async def _infer(self, job: _Job, episode: _Episode, connection: _Connection,
                     queued: bool = False) -> Any:
        """Queue `job` (unless `queued`) for `episode` and wait for its answer: the chunk
        reply (the job's error raises), or None if the client leaves first. The answer is kept
        on the episode whoever waits for it, so a re-sent request gets it again."""
        if not queued:
            if connection.gone:
                return None  # the client already left: sample nothing for it
            self._enqueue(job)
            episode.job = job
            job.future.add_done_callback(lambda future: _remember(episode, job, future))
        await asyncio.wait([job.future, connection.closed], return_when=asyncio.FIRST_COMPLETED)
        if not job.future.done():
            return None  # nobody to answer (the worker frees the slot after the call)
        if self.protocol == "openpi":
            return job.future.result()
        actions, info = job.future.result()
        return {"type": "chunk", "actions": actions, "info": info}

    # ---------------------------------------------------------------------------- episodes
    def _reset(self, seed: Any, connection: _Connection) -> _Episode:
        if seed is None:
            seed = secrets.randbits(32)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
            raise ValueError(f"reset: seed must be null or an int in [0, 2**32); got "
                             f"{short_repr(seed)}")
        if len(connection.episodes) >= self.max_episodes_per_client:
            raise ValueError(f"reset: this connection already runs {len(connection.episodes)} "
                             f"episodes (max_episodes_per_client); end one first")
        with self._lock:
            if self._free_slots:
                slot = self._free_slots.pop()
            else:  # slots of gone clients may still be in a sampler call: take a new one
                slot, self._next_slot = self._next_slot, self._next_slot + 1
            self.chunks.on_reset(slot, seed)
        episode = _Episode(secrets.token_hex(16), slot, seed, connection)  # 128 bits: a key
        connection.episodes[episode.id] = episode
        self._episodes[episode.id] = episode
        return episode

    def _resume(self, episode_id: Any, connection: _Connection) -> _Episode:
        """Hand `episode_id` to `connection`: one waiting after its connection dropped, or one
        whose old connection the server does not know is dead yet (a half-open TCP)."""
        episode = self._episodes.get(episode_id) if isinstance(episode_id, str) else None
        if episode is None:
            raise UnknownEpisode(f"resume: unknown episode {short_repr(episode_id)} (the server "
                                 f"restarted, or it waited longer than resume_window_s = "
                                 f"{self.resume_window_s:g} s)")
        if episode.owner is connection:
            return episode
        if len(connection.episodes) >= self.max_episodes_per_client:
            raise ValueError(f"resume: this connection already runs {len(connection.episodes)} "
                             f"episodes (max_episodes_per_client); end one first")
        if episode.owner is not None:
            episode.owner.episodes.pop(episode.id, None)
        if episode.expiry is not None:
            episode.expiry.cancel()
            episode.expiry = None
        self._detached.pop(episode.id, None)
        episode.owner = connection
        connection.episodes[episode.id] = episode
        return episode

    def _detach(self, episode: _Episode) -> None:
        """The episode's connection closed: it waits resume_window_s for a resume (the
        oldest waiting ones go first beyond max_clients * max_episodes_per_client); openpi's
        client never resumes, so its episodes go at once."""
        if episode.owner is not None:
            episode.owner.episodes.pop(episode.id, None)
        episode.owner = None
        if (self.resume_window_s <= 0 or self._closed_reason is not None
                or self.protocol == "openpi"):
            self._drop(episode)
            return
        episode.expiry = asyncio.get_running_loop().call_later(
            self.resume_window_s, self._expire, episode)
        self._detached[episode.id] = episode
        while len(self._detached) > self.max_clients * self.max_episodes_per_client:
            self._drop(next(iter(self._detached.values())))

    def _expire(self, episode: _Episode) -> None:
        if episode.owner is None:
            self._drop(episode)

    def _drop(self, episode: _Episode) -> None:
        """Forget an episode and free its slot (after the sampler call it is in, if any)."""
        if self._episodes.pop(episode.id, None) is None:
            return
        self._detached.pop(episode.id, None)
        if episode.expiry is not None:
            episode.expiry.cancel()
        episode.last_reply = None
        self._release(episode.slot)

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

    def _enqueue(self, job: _Job) -> None:
        """Queue a job for the inference thread, or refuse it if the queue is closed."""
        with self._lock:
            if self._closed_reason is not None:
                raise Unavailable(f"infer: {self._closed_reason}")
            self._busy.add(job.slot)
            self._jobs.put(job)

    def _close_queue(self, reason: str) -> None:
        """Accept no more jobs; answer the queued ones with `reason`; stop the worker after
        the call in flight."""
        with self._lock:
            if self._closed_reason is None:
                self._closed_reason = reason
            dropped: list[_Job] = []
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    dropped.append(job)
            self._jobs.put(None)
        for job in dropped:
            _resolve(job, error=Unavailable(f"infer: {reason}"))
        self._done_with([job.slot for job in dropped])

    def _job(self, message: dict[str, Any], slot: int, request_id: Any) -> _Job:
        """An infer request checked on arrival: obs layout, deadline and prefix (ValueError
        naming what is wrong). Shapes, dtypes and NaN are the inference thread's check."""
        obs = message.get("obs")
        if isinstance(obs, np.ndarray):
            batched: Any = obs[None]
        elif isinstance(obs, dict) and obs:
            for key, value in obs.items():
                if not isinstance(value, np.ndarray):
                    raise ValueError(f"infer: obs[{key!r}] must be an array (To, ...); got "
                                     f"{type_name(value)}")
            batched = {key: value[None] for key, value in obs.items()}
        else:
            raise ValueError(f"infer: obs must be an array (To, ...) or a map of arrays; got "
                             f"{type_name(obs) if obs != {} else 'an empty map'}")
        deadline = message.get("deadline_ms")
        if deadline is not None and (not isinstance(deadline, int | float)
                                     or isinstance(deadline, bool)
                                     or not 0 < deadline < float("inf")):
            raise ValueError(f"infer: deadline_ms must be null or a finite number > 0; got "
                             f"{short_repr(deadline)}")
        prefix = message.get("prefix")
        if prefix is not None:
            prefix = self._check_prefix(prefix)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        future.add_done_callback(_retrieve)
        return _Job(slot, batched, None if deadline is None else deadline / 1e3, prefix,
                    time.perf_counter(), loop, future, request_id)

    def _check_prefix(self, prefix: Any) -> tuple[np.ndarray, np.ndarray]:
        h, da = self.policy.horizon, self.policy.action_dim
        if not isinstance(prefix, dict):
            raise ValueError("infer: prefix must be a map with actions (H, Da) and weights (H,)")
        actions, weights = prefix.get("actions"), prefix.get("weights")
        if not isinstance(actions, np.ndarray) or actions.shape != (h, da):
            raise ValueError(f"infer: prefix actions must be an array of shape ({h}, {da}); "
                             f"got {type_name(actions)}")
        if not isinstance(weights, np.ndarray) or weights.shape != (h,):
            raise ValueError(f"infer: prefix weights must be an array of shape ({h},); got "
                             f"{type_name(weights)}")
        with np.errstate(over="ignore"):  # overflow to inf is refused just below
            actions, weights = actions.astype(np.float32), weights.astype(np.float32)
        if not (np.isfinite(actions).all() and np.isfinite(weights).all()):
            raise ValueError("infer: prefix contains NaN or inf (in float32)")
        if not ((weights >= 0) & (weights <= 1)).all():
            raise ValueError("infer: prefix weights must lie in [0, 1]")
        return actions, weights

# ------------------------------------------------------------------------------ worker
    def _work(self) -> None:
        """The inference thread: every waiting request (up to max_batch) in one call. A
        request's failure is answered to it (`_run`); should the thread itself die (a
        BaseException), the queue is closed and the server stops instead of hanging."""
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                batch = [job]
                while len(batch) < self.max_batch:
                    try:
                        more = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        self._jobs.put(None)  # stop after this call
                        break
                    batch.append(more)
                self._run(batch)
        except BaseException as e:  # noqa: BLE001 - the thread ends; the server stops
            self.worker_error = f"{type(e).__name__}: {_one_line(e)}"
            log.error("the inference thread stopped: %s", self.worker_error)
            self._close_queue(f"the inference thread stopped ({self.worker_error})")
            self._worker_died()

    def _run(self, batch: list[_Job]) -> None:
        """Sample `batch`; whatever happens, every job of it is answered and its slots freed."""
        try:
            self._sample(batch)
        except Exception as e:  # a bug of ours: logged, the batch still answered
            log.exception("internal error in the inference thread")
            for job in batch:
                _resolve(job, error=ValueError(f"internal error: {type(e).__name__}: "
                                               f"{_one_line(e)}"))
        finally:
            for job in batch:  # only a BaseException leaves a job unanswered here
                if not job.answered:
                    _resolve(job, error=ValueError("the inference thread stopped while "
                                                   "sampling this request"))
            self._done_with([job.slot for job in batch])

    def _sample(self, batch: list[_Job]) -> None:
        """Check each request's observation, then one sampler call for those that pass; if a
        call of several fails, each is sampled alone, so a failure reaches only the request(s)
        it belongs to (their episodes' noise then moves on by the failed call's draw)."""
        start = time.perf_counter()
        ready = [job for job in batch if self._obs_ok(job)]
        if not ready:
            return
        try:
            self._call(ready, start)
        except Exception as e:
            if len(ready) == 1:
                _resolve(ready[0], error=ValueError(f"inference failed: {_one_line(e)}"))
                return
            for job in ready:
                try:
                    self._call([job], time.perf_counter())
                except Exception as alone:
                    _resolve(job, error=ValueError(f"inference failed: {_one_line(alone)}"))

    def _call(self, jobs: list[_Job], start: float) -> None:
        """ONE sampler call for `jobs` (checked observations, taken up at `start`); each gets
        its chunk, or an error if its chunk is not finite (never a NaN chunk, never
        'converged')."""
        first = jobs[0].checked
        assert first is not None
        obs = {key: torch.cat([job.checked[key] for job in jobs])  # type: ignore[index]
               for key in first}
        deadlines = [job.deadline_s - (start - job.received) for job in jobs
                     if job.deadline_s is not None]
        budget = max(min(deadlines), 1e-4) if deadlines else None
        prefix = None
        if any(job.prefix is not None for job in jobs):
            h, da = self.policy.horizon, self.policy.action_dim
            actions = np.zeros((len(jobs), h, da), np.float32)
            weights = np.zeros((len(jobs), h), np.float32)
            for k, job in enumerate(jobs):
                if job.prefix is not None:
                    actions[k], weights[k] = job.prefix
            prefix = _Prefix(actions, weights)
        chunks, record = self.chunks(obs, budget, prefix=prefix, rows=[job.slot for job in jobs])
        done = time.perf_counter()
        self.batches.append(BatchRecord(len(jobs), record.latency_ms,
                                        max((start - j.received) * 1e3 for j in jobs),
                                        record.rounds))
        self.calls += 1
        self._batch_sizes[len(jobs)] += 1
        converged = record.converged_rows or [record.converged] * len(jobs)
        for k, job in enumerate(jobs):
            chunk = np.asarray(chunks[k], np.float32)
            if not np.isfinite(chunk).all():
                _resolve(job, error=ValueError(NON_FINITE_CHUNK))
                continue
            info = {"rounds": record.rounds, "nfe": record.nfe, "converged": bool(converged[k]),
                    "sampler_ms": record.latency_ms, "infer_ms": (done - start) * 1e3,
                    "batch": len(jobs), "server_ms": (done - job.received) * 1e3}
            self._latency.append((info["server_ms"], info["infer_ms"]))
            _resolve(job, (chunk, info))

    def _obs_ok(self, job: _Job) -> bool:
        """Check one request's observation with the policy's own check_obs (keys, aliases,
        shape, dtype, NaN) into the policy's layout {key: (1, To, ...)}; a bad one is
        answered with what is wrong and left out of the batch."""
        try:
            job.checked = self.policy.check_obs(job.obs)
        except Exception as e:  # ValueError, or torch refusing a dtype: the request's fault
            _resolve(job, error=ValueError(f"infer: {_one_line(e)}"))
            return False
        return True


def _request_id(message: dict[str, Any]) -> Any:
    """The request's `id` (echoed by the reply): null, an int or a short string."""
    value = message.get("id")
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and len(value) <= MAX_ID_CHARS:
        return value
    raise ProtocolError(f"id must be null, an int or a string of at most {MAX_ID_CHARS} "
                        f"characters; got {type_name(value)}")


def _episode_of(message: dict[str, Any], connection: _Connection) -> _Episode:
    episode = message.get("episode")
    if not isinstance(episode, str) or episode not in connection.episodes:
        raise UnknownEpisode(f"unknown episode {short_repr(episode)} on this connection (send "
                             "reset first, or resume it after a reconnect)")
    return connection.episodes[episode]


def _remember(episode: _Episode, job: _Job, future: asyncio.Future) -> None:
    """A job of `episode` is answered: keep its chunk reply for a re-sent request (in the
    event loop, whoever waits for it: its connection may have dropped meanwhile)."""
    if episode.job is job:
        episode.job = None
    if not future.cancelled() and future.exception() is None:
        actions, info = future.result()
        episode.last_id = job.request_id
        episode.last_reply = {"type": "chunk", "actions": actions, "info": info}


def _resolve(job: _Job, result: Any = None, error: Exception | None = None) -> None:
    """Hand a result (or an error) to the request's coroutine, from the worker thread; a job
    already answered keeps its first answer."""
    if job.answered:
        return
    job.answered = True

    def deliver() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the event loop is gone: shutting down
        job.loop.call_soon_threadsafe(deliver)


def _retrieve(future: asyncio.Future) -> None:
    """Mark a job's error as seen: a client that left never awaits its answer, and asyncio
    would log an unretrieved exception."""
    if not future.cancelled():
        future.exception()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:500]


def _peer(connection: ServerConnection) -> str:
    """The client's address for a log line."""
    address = connection.remote_address
    return str(address[0]) if isinstance(address, tuple) and address else "an unknown peer"


def run_server(server: PolicyServer, host: str, port: int,
               on_ready: Callable[[int], None] | None = None,
               ssl_context: ssl.SSLContext | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C, then shut down cleanly (in-flight call finished)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.serve(host, port, stop, on_ready, ssl_context)

    asyncio.run(main())


# ------------------------------------------------------------------------------- the entry
def check_serve_config(cfg: Any) -> None:
    """Reject values serve_policy.py cannot use, naming the key and what is allowed."""
    import math

    from app.builder import policy_run_checks
    from app.checks import is_int, is_number, raise_first_failure
    from picard_sampler import INPAINT_METHODS

    def seconds(value: Any) -> bool:
        return is_number(value, 0, strict=True) and math.isfinite(value)

    raise_first_failure(cfg, [
        *policy_run_checks(cfg),
        ("host", isinstance(cfg.host, str) and bool(cfg.host), "a host name or address"),
        ("port", is_int(cfg.port, 0) and cfg.port <= 65535, "an int in [0, 65535]"),
        ("noise_seed", is_int(cfg.noise_seed, 0), "an int >= 0"),
        ("inpaint_method", cfg.inpaint_method in INPAINT_METHODS,
         f"one of {list(INPAINT_METHODS)}"),
        ("guidance_clip", is_number(cfg.guidance_clip, 0, strict=True), "a number > 0"),
        ("control_hz", is_number(cfg.control_hz, 0, strict=True), "a number > 0"),
        ("max_batch", is_int(cfg.max_batch, 1), "an int >= 1"),
        ("max_clients", is_int(cfg.max_clients, 1), "an int >= 1"),
        ("max_episodes_per_client", is_int(cfg.max_episodes_per_client, 1), "an int >= 1"),
        ("max_message_mb", is_number(cfg.max_message_mb, 0, strict=True), "a number > 0"),
        ("max_message_items", is_int(cfg.max_message_items, 64), "an int >= 64"),
        ("idle_timeout_s", seconds(cfg.idle_timeout_s), "a finite number > 0"),
        ("ping_interval_s", cfg.ping_interval_s is None or seconds(cfg.ping_interval_s),
         "null or a finite number > 0"),
        ("ping_timeout_s", cfg.ping_timeout_s is None or seconds(cfg.ping_timeout_s),
         "null or a finite number > 0"),
        ("ready_file", cfg.ready_file is None or isinstance(cfg.ready_file, str),
         "null or a path"),
        ("protocol", cfg.protocol in PROTOCOLS, f"one of {list(PROTOCOLS)}"),
        ("openpi_actions", cfg.openpi_actions in OPENPI_ACTIONS,
         f"one of {list(OPENPI_ACTIONS)}"),
        ("resume_window_s", is_number(cfg.resume_window_s, 0) and math.isfinite(
            cfg.resume_window_s), "a finite number >= 0"),
        ("ssl_certfile", cfg.ssl_certfile is None or isinstance(cfg.ssl_certfile, str),
         "null or a path"),
        ("ssl_keyfile", (cfg.ssl_keyfile is None) == (cfg.ssl_certfile is None)
         and (cfg.ssl_keyfile is None or isinstance(cfg.ssl_keyfile, str)),
         "a path exactly when ssl_certfile is one"),
        ("insecure", isinstance(cfg.insecure, bool), "true or false"),
    ])


def serve_security(cfg: Any, environ: Mapping[str, str] = os.environ
                   ) -> tuple[str | None, ssl.SSLContext | None]:
    """The token (auth_token, else the PICARD_AUTH_TOKEN environment variable) and the TLS
    context of a serve config. Beyond loopback a server needs a token and TLS (insecure=true
    waives TLS on a network one trusts); ConfigError names what is missing. The token is never
    echoed."""
    from app.checks import ConfigError

    token = cfg.auth_token if cfg.auth_token is not None else environ.get(AUTH_ENV) or None
    if token is not None and (not isinstance(token, str) or len(token) < 16
                              or token != token.strip()):
        got = f"a {type(token).__name__}" if not isinstance(token, str) else \
            f"{len(token)} characters" + (" with surrounding spaces" if token.strip() != token
                                          else "")
        raise ConfigError(f"auth_token (or {AUTH_ENV}) must be a string of at least 16 "
                          f"characters without surrounding spaces; got {got}")
    beyond = not is_loopback(cfg.host)
    if beyond and token is None:
        raise ConfigError(f"auth_token: a server on host {cfg.host} (beyond loopback) needs a "
                          f"token: set {AUTH_ENV} (or auth_token=...)")
    if beyond and cfg.ssl_certfile is None and not cfg.insecure:
        raise ConfigError(f"ssl_certfile: a server on host {cfg.host} (beyond loopback) needs "
                          "TLS: ssl_certfile=PEM ssl_keyfile=PEM, or insecure=true on a network "
                          "you trust")
    context = None
    if cfg.ssl_certfile is not None:
        try:
            context = server_ssl_context(cfg.ssl_certfile, cfg.ssl_keyfile)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"ssl_certfile / ssl_keyfile: cannot load {cfg.ssl_certfile} and "
                              f"{cfg.ssl_keyfile}: {_one_line(e)}") from e
    return token, context


def run_serve(cfg: Any) -> None:
    """serve_policy.py's job: load the policy, sampler and runtime as eval_policy.py does, then
    serve until SIGTERM / Ctrl-C."""
    import sys
    from pathlib import Path

    from app.builder import PolicySpec, build_policy
    from app.checks import ConfigError
    from app.device import configure_torch
    from app.report import write_text
    from policy.chunking import resolve_warm_start

    check_serve_config(cfg)
    token, ssl_context = serve_security(cfg)
    device = configure_torch(cfg.device, cfg.threads)
    # sampler=auto is calibrated for one robot (a batch forms only under load)
    built = build_policy(PolicySpec.from_config(
        cfg, env_required=False, calibration_seed=int(cfg.noise_seed)), device)
    sampler, auto = built.sampler, built.auto
    metadata = {
        "checkpoint": {"path": str(cfg.checkpoint), "step": built.checkpoint["step"]},
        "sampler": {"label": sampler.label, **sampler.config, "auto": None if auto is None else
                    {"candidate": auto.candidate.short, "calibration": auto.calibration}},
        "runtime": built.runtime,
        "env": built.env, "control_hz": float(cfg.control_hz), "noise_seed": cfg.noise_seed,
        "warm_start": resolve_warm_start(cfg.warm_start), "device": str(device),
        "inpaint": {"method": cfg.inpaint_method, "guidance_clip": float(cfg.guidance_clip)},
    }
    try:
        server = PolicyServer(built.policy, sampler, metadata,
                              ServerSettings.from_config(cfg, token))
    except ValueError as e:
        raise ConfigError(str(e)) from e

    scheme = "wss" if ssl_context is not None else "ws"

    def on_ready(port: int) -> None:
        print(f"serving {cfg.checkpoint} with {sampler.label} on {scheme}://{cfg.host}:{port} "
              f"({device}; protocol {cfg.protocol}{'; token required' if token else ''}); "
              "SIGTERM or Ctrl-C stops", flush=True)
        if cfg.ready_file:
            record = {"host": cfg.host, "port": port, "pid": os.getpid(), "scheme": scheme,
                      "protocol": cfg.protocol}
            write_text(Path(cfg.ready_file), json.dumps(record) + "\n")

    try:
        run_server(server, cfg.host, cfg.port, on_ready, ssl_context)
    except InferenceThreadDied as e:  # a wedged server is worse than one a supervisor restarts
        sys.exit(f"error: {e}; the server stopped after {server.calls} sampler calls")
    print(f"server stopped after {server.calls} sampler calls", flush=True)
