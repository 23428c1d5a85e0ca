"""`PolicyClient`: a robot loop's synchronous connection to a running policy server.

    client = PolicyClient("127.0.0.1:8765")  # or "wss://robot-server:8765", auth_token=...
    spec = client.metadata()                 # obs/action spec, To / H / Ta, control rate
    client.reset(seed=0)                     # a new episode: its noise, warm start, state
    actions, info = client.infer(obs)        # obs (To, ...) or {key: (To, ...)} -> (H, Da)

No torch here: numpy, msgpack and websockets only. `RemoteChunks` adapts a client to the
`chunk_fn` of picard_client.realtime.RealtimeController, so a robot runs against a server.

What the client guarantees (docs/design.md §11):
- *Never a stale chunk.* Every request carries an id the reply echoes; a reply that is not for
  the request being waited on (the late answer to a request that timed out) is dropped and
  counted (`stats.stale_replies`), never returned.
- *The server's protocol version is checked* on connecting (the handshake's PROTOCOL_HEADER):
  a server that speaks another version is refused (ProtocolMismatch) before any request.
- *A connection that drops mid-episode is reconnected* with exponential backoff (`backoff_s`
  doubling up to `backoff_max_s`, at most `retries` attempts per request); the episode is then
  resumed on
  the new connection (the server keeps a dropped connection's episodes for its
  `resume_window_s`) and the request re-sent with the same id, so a chunk the server already
  sampled is answered again rather than sampled twice. If the server no longer has the
  episode (it restarted, or the window passed), `EpisodeLost` is raised: the episode is
  reported lost, never silently restarted; the caller starts a new one with `reset`. If no
  connection can be made within the budget, `ConnectionLost`. Closes that retrying cannot
  help (unauthorized 4401, message too big 1009, protocol errors) are raised at once; a
  request the server turned away while shutting down is re-sent the same way.
- The token (`auth_token`, or the PICARD_AUTH_TOKEN environment variable) travels in the
  handshake's ``Authorization: Bearer`` header; ``wss://`` addresses (or `ssl_cafile` /
  `ssl_context`) use TLS.
"""

from __future__ import annotations

import itertools
import os
import random
import secrets
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection, connect

from picard_client.protocol import (
    AUTH_ENV,
    CLOSE_TOO_BIG,
    CLOSE_UNAUTHORIZED,
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    auth_header,
    pack,
    unpack,
)

# closes after which reconnecting cannot help: the same request would be refused again
NO_RETRY_CLOSES = {CLOSE_UNAUTHORIZED: "unauthorized", CLOSE_TOO_BIG: "message too big",
                   1002: "protocol error", 1003: "unsupported data", 1007: "invalid data",
                   1008: "policy violation"}


class ServerError(RuntimeError):
    """The server refused a request (the message says why) or could not be reached."""


class ProtocolMismatch(ServerError):
    """The server speaks another protocol version than this client."""


class ConnectionLost(ServerError):
    """The connection dropped and no new one could be made within the retry budget."""


class EpisodeLost(ServerError):
    """The server no longer has the episode (it restarted, or the episode stayed detached
    longer than its resume window): start a new one with `reset`."""

    def __init__(self, episode: str | None, reason: str):
        super().__init__(f"episode {episode} lost: {reason}")
        self.episode = episode


@dataclass
class ClientStats:
    """What a client saw: requests sent, replies dropped as stale, timeouts, reconnections,
    episodes resumed after one, episodes lost."""

    requests: int = 0
    stale_replies: int = 0
    timeouts: int = 0
    reconnects: int = 0
    resumed: int = 0
    episodes_lost: int = 0

    def to_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


def server_url(address: str, tls: bool = False) -> str:
    """``host:port`` or a ws:// / wss:// URL as a URL (``wss://`` for host:port with `tls`)."""
    if address.startswith(("ws://", "wss://")):
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"server address must be HOST:PORT or ws(s)://HOST:PORT; got "
                         f"{address!r}")
    return f"{'wss' if tls else 'ws'}://{address}"


class _Closed(Exception):
    """The connection closed while a request was out (internal: carries the close)."""

    def __init__(self, error: ConnectionClosed):
        super().__init__(str(error))
        self.error = error


class PolicyClient:
    """One connection to a policy server; requests are answered in order (module doc)."""

    def __init__(self, address: str, timeout_s: float = 30.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, *,
                 auth_token: str | None = None, ssl_cafile: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, retries: int = 5,
                 backoff_s: float = 0.1, backoff_max_s: float = 2.0,
                 sleep: Callable[[float], None] = time.sleep):
        tls = ssl_cafile is not None or ssl_context is not None
        self.url = server_url(address, tls)
        if not timeout_s > 0 or retries < 0 or not 0 <= backoff_s <= backoff_max_s:
            raise ValueError(f"need timeout_s > 0, retries >= 0 and 0 <= backoff_s <= "
                             f"backoff_max_s; got {timeout_s}, {retries}, {backoff_s}, "
                             f"{backoff_max_s}")
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self.retries, self.backoff_s, self.backoff_max_s = retries, backoff_s, backoff_max_s
        self.sleep = sleep
        token = auth_token if auth_token is not None else os.environ.get(AUTH_ENV)
        self._headers = auth_header(token) if token else None
        self._ssl: ssl.SSLContext | None = None
        if self.url.startswith("wss://"):
            self._ssl = ssl_context or ssl.create_default_context(cafile=ssl_cafile)
        self._tag = secrets.token_hex(4)  # ids unique across clients resuming one episode
        self._ids = itertools.count()
        self._attempts = 0
        self.episode: str | None = None
        self.stats = ClientStats()
        self._ws = self._connect()  # one try: a server that is not there is reported at once

    # ------------------------------------------------------------------------- connection
    def _connect(self) -> ClientConnection:
        """A new connection whose server speaks our protocol version."""
        try:
            ws = connect(self.url, open_timeout=self.timeout_s, max_size=self.max_message_bytes,
                         compression=None, proxy=None, additional_headers=self._headers,
                         ssl=self._ssl)
        except InvalidStatus as e:
            raise ServerError(f"the policy server at {self.url} refused the connection "
                              f"(HTTP {e.response.status_code})") from e
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as e:
            raise ServerError(f"cannot reach the policy server at {self.url}: {e}") from e
        version = ws.response.headers.get(PROTOCOL_HEADER) if ws.response else None
        if version != str(PROTOCOL_VERSION):
            ws.close()
            said = (f"protocol {version}" if version is not None
                    else f"no protocol version (no {PROTOCOL_HEADER} header: not a "
                         "picard-policy server, or one older than protocol 2)")
            raise ProtocolMismatch(f"the server at {self.url} speaks {said}; this client speaks "
                                   f"protocol {PROTOCOL_VERSION}: install the "
                                   "picard-policy-client that matches the server")
        return ws

    def _reconnect(self, closed: ConnectionClosed | str, episode: str | None) -> None:
        """Reconnect after `closed` (a close, or why the server turned the request away) with
        exponential backoff, then resume `episode` (if any) on the new connection. Raises at
        once for a close retrying cannot help, ConnectionLost when the budget runs out,
        EpisodeLost when the server no longer has the episode."""
        if isinstance(closed, str):
            last = closed
        else:
            if closed.rcvd is not None and closed.rcvd.code in NO_RETRY_CLOSES:
                raise self._closed(closed)
            last = str(self._closed(closed))
        while self._attempts < self.retries:
            delay = min(self.backoff_s * 2 ** self._attempts, self.backoff_max_s)
            self._attempts += 1
            self.sleep(delay * random.uniform(0.8, 1.2))  # jitter: robots do not reconnect in step
            self._ws.close()
            try:
                self._ws = self._connect()
            except ProtocolMismatch:
                raise
            except ServerError as e:
                last = str(e)
                continue
            self.stats.reconnects += 1
            if episode is None:
                return
            try:
                reply = self._exchange({"type": "resume", "episode": episode}, self._next_id())
            except _Closed as again:
                if again.error.rcvd is not None and again.error.rcvd.code in NO_RETRY_CLOSES:
                    raise self._closed(again.error) from again
                last = str(self._closed(again.error))
                continue
            if reply.get("type") == "error":
                if reply.get("code") == "unknown_episode":
                    raise self._lost(episode, "the server no longer has it (it restarted, or "
                                              "the episode waited longer than its resume "
                                              "window)")
                raise ServerError(str(reply.get("error")))
            self.stats.resumed += 1
            return
        raise ConnectionLost(f"lost the connection to {self.url} and could not reconnect in "
                             f"{self.retries} attempts (the last: {last})")

    def _lost(self, episode: str | None, reason: str) -> EpisodeLost:
        self.stats.episodes_lost += 1
        if episode == self.episode:
            self.episode = None
        return EpisodeLost(episode, reason)

    def _next_id(self) -> str:
        return f"{self._tag}-{next(self._ids)}"

    # --------------------------------------------------------------------------- requests
    def _call(self, message: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        """Send a request and return its reply, reconnecting (and resuming the request's
        episode) when the connection drops or the server turns the request away because it is
        shutting down (code unavailable: nothing was sampled, so re-sending is safe); an error
        reply raises ServerError."""
        request_id = self._next_id()
        episode = message.get("episode") if message["type"] in ("infer", "end") else None
        self._attempts = 0  # reconnection attempts for this request (the retry budget)
        while True:
            try:
                reply = self._exchange(message, request_id, timeout_s)
                if reply.get("type") != "error" or reply.get("code") != "unavailable":
                    break
                lost: ConnectionClosed | str = str(reply.get("error"))
            except _Closed as closed:
                lost = closed.error
            try:
                self._reconnect(lost, episode)
            except EpisodeLost:
                if message["type"] == "end":  # already gone: nothing to end
                    return {"type": "ended", "episode": episode}
                raise
        if reply.get("type") == "error":
            if reply.get("code") == "unknown_episode" and message["type"] == "infer":
                raise self._lost(episode, str(reply.get("error")))
            raise ServerError(str(reply.get("error")))
        return reply

    def _exchange(self, message: dict[str, Any], request_id: str,
                  timeout_s: float | None = None) -> dict[str, Any]:
        """Send one request and read until its reply: replies to earlier requests are dropped
        (stale), and no reply within the timeout is a ServerError. A close raises _Closed."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        self.stats.requests += 1
        try:
            self._ws.send(pack({**message, "id": request_id}))
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                reply = unpack(self._ws.recv(timeout=left), max_items=None)
                rid = reply.get("id")
                if rid == request_id or (rid is None and reply.get("type") == "error"):
                    return reply
                self.stats.stale_replies += 1  # the late answer to an earlier request
        except TimeoutError as e:
            self.stats.timeouts += 1
            raise ServerError(f"no reply from {self.url} within {timeout_s:g} s") from e
        except ConnectionClosed as e:
            raise _Closed(e) from e

    def _closed(self, error: ConnectionClosed) -> ServerError:
        """A ServerError naming the close code and reason the server gave."""
        rcvd = error.rcvd
        reason = rcvd.reason if rcvd is not None and rcvd.reason else "no reason given"
        code = rcvd.code if rcvd is not None else "none"
        return ServerError(f"the policy server at {self.url} closed the connection "
                           f"(code {code}: {reason})")

    def metadata(self) -> dict[str, Any]:
        """What the served policy takes and returns (obs spec, action dim, To/H/Ta, rate)."""
        meta = self._call({"type": "metadata"})["metadata"]
        if meta.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolMismatch(f"the server's metadata says protocol {meta.get('protocol')}; "
                                   f"this client speaks {PROTOCOL_VERSION}")
        return meta

    def reset(self, seed: int | None = None) -> str:
        """Start an episode (its sampler noise is drawn from the server's noise seed and
        `seed`); later `infer` calls use it unless told another. Returns its id."""
        self.episode = self._call({"type": "reset", "seed": seed})["episode"]
        return self.episode

    def infer(self, obs: np.ndarray | Mapping[str, np.ndarray], *, episode: str | None = None,
              deadline_ms: float | None = None, prefix_actions: np.ndarray | None = None,
              prefix_weights: np.ndarray | None = None, timeout_s: float | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        """The chunk (H, Da) in raw action units for one observation history and the server's
        info (rounds, nfe, converged, sampler_ms, infer_ms, server_ms, batch). `deadline_ms`
        caps an anytime sampler; `prefix_*` constrain the chunk to committed actions;
        `timeout_s` (default: the client's) bounds the wait for the reply."""
        episode = episode or self.episode
        if episode is None:
            raise ServerError("no episode: call reset() first")
        message: dict[str, Any] = {"type": "infer", "episode": episode, "obs": _arrays(obs),
                                   "deadline_ms": deadline_ms}
        if prefix_actions is not None:
            message["prefix"] = {"actions": np.asarray(prefix_actions, np.float32),
                                 "weights": np.asarray(prefix_weights, np.float32)}
        reply = self._call(message, timeout_s)
        return reply["actions"], reply["info"]

    def end(self, episode: str | None = None) -> None:
        """Drop an episode's state on the server (one it no longer has: nothing to do)."""
        episode = episode or self.episode
        if episode is not None:
            self._call({"type": "end", "episode": episode})
        if episode == self.episode:
            self.episode = None

    def close(self) -> None:
        """Close the connection (the server keeps its episodes for its resume window)."""
        self._ws.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _arrays(obs: Any) -> Any:
    """An observation as numpy arrays (a dict's values too)."""
    if isinstance(obs, Mapping):
        return {str(k): np.asarray(v) for k, v in obs.items()}
    return np.asarray(obs)


class RemoteChunks:
    """A RealtimeController `chunk_fn` (and rollout `on_reset` hook) served by a PolicyClient:
    one robot (batch 1); the budget is sent as the request's deadline; latency is measured
    here, so network and queueing time are inside it."""

    def __init__(self, client: PolicyClient, clock: Any = time.perf_counter):
        self.client = client
        self.clock = clock

    def on_reset(self, env_index: int, seed: int | None) -> None:
        """rollout's hook: a new episode with `seed`, or the robot went idle (None)."""
        if seed is None:
            self.client.end()
        else:
            self.client.reset(seed)

    def __call__(self, obs: Any, budget_s: float | None, prefix: Any = None
                 ) -> tuple[np.ndarray, dict[str, Any]]:
        start = self.clock()
        one = ({k: np.asarray(v)[0] for k, v in obs.items()} if isinstance(obs, Mapping)
               else np.asarray(obs)[0])
        kwargs: dict[str, Any] = {"deadline_ms": None if budget_s is None else budget_s * 1e3}
        if prefix is not None:
            kwargs["prefix_actions"] = np.asarray(prefix.actions)[0]
            kwargs["prefix_weights"] = np.asarray(prefix.weights)
        actions, info = self.client.infer(one, **kwargs)
        latency_ms = (self.clock() - start) * 1e3
        return actions[None], {**info, "latency_ms": latency_ms}
