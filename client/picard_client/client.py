"""`PolicyClient`: a robot loop's synchronous connection to a running policy server.

    client = PolicyClient("127.0.0.1:8765")
    spec = client.metadata()                 # obs/action spec, To / H / Ta, control rate
    client.reset(seed=0)                     # a new episode: its noise, warm start, state
    actions, info = client.infer(obs)        # obs (To, ...) or {key: (To, ...)} -> (H, Da)

No torch here: numpy, msgpack and websockets only. `RemoteChunks` adapts a client to the
`chunk_fn` of picard_client.realtime.RealtimeController, so a robot runs against a server.

The server closes a connection that stays silent for its `idle_timeout_s` (close code 4408) and
drops its episodes; `metadata` and `reset` then open a new connection by themselves, `end` of an
episode so dropped is a no-op, and `infer` on it raises a ServerError (reset first).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import connect

from picard_client.protocol import DEFAULT_MAX_MESSAGE_BYTES, pack, unpack

RECONNECTING = ("metadata", "reset")  # requests that need no state of the old connection


class ServerError(RuntimeError):
    """The server refused a request (the message says why) or could not be reached."""


def server_url(address: str) -> str:
    """``host:port`` or a ws:// URL as a ws:// URL."""
    if address.startswith(("ws://", "wss://")):
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"server address must be HOST:PORT or ws://HOST:PORT; got {address!r}")
    return f"ws://{address}"


class PolicyClient:
    """One connection to a policy server; requests are answered in order (see module doc)."""

    def __init__(self, address: str, timeout_s: float = 30.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.url = server_url(address)
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self._ids = itertools.count()
        self.episode: str | None = None
        self._ws = self._connect()

    def _connect(self) -> Any:
        try:
            return connect(self.url, open_timeout=self.timeout_s,
                           max_size=self.max_message_bytes, compression=None, proxy=None)
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as e:
            raise ServerError(f"cannot reach the policy server at {self.url}: {e}") from e

    def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = self._exchange(message)
        except ConnectionClosed as e:
            self.episode = None  # the server dropped this connection's episodes with it
            if message["type"] == "end":
                return {"type": "ended", "episode": message.get("episode")}
            if message["type"] not in RECONNECTING:
                raise self._closed(e) from e
            self._ws.close()
            self._ws = self._connect()  # once: a server that closes again is reported
            try:
                reply = self._exchange(message)
            except ConnectionClosed as again:
                raise self._closed(again) from again
        if reply.get("type") == "error":
            raise ServerError(str(reply.get("error")))
        return reply

    def _exchange(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request and read its reply (ConnectionClosed passes through)."""
        message = {**message, "id": next(self._ids)}
        try:
            self._ws.send(pack(message))
            return unpack(self._ws.recv(timeout=self.timeout_s), max_items=None)
        except TimeoutError as e:
            raise ServerError(f"no reply from {self.url} within {self.timeout_s:g} s") from e

    def _closed(self, error: ConnectionClosed) -> ServerError:
        """A ServerError naming the close code and reason the server gave."""
        rcvd = error.rcvd
        reason = rcvd.reason if rcvd is not None and rcvd.reason else "no reason given"
        code = rcvd.code if rcvd is not None else "none"
        return ServerError(f"the policy server at {self.url} closed the connection "
                           f"(code {code}: {reason})")

    def metadata(self) -> dict[str, Any]:
        """What the served policy takes and returns (obs spec, action dim, To/H/Ta, rate)."""
        return self._call({"type": "metadata"})["metadata"]

    def reset(self, seed: int | None = None) -> str:
        """Start an episode (its sampler noise is drawn from the server's noise seed and
        `seed`); later `infer` calls use it unless told another. Returns its id."""
        self.episode = self._call({"type": "reset", "seed": seed})["episode"]
        return self.episode

    def infer(self, obs: np.ndarray | Mapping[str, np.ndarray], *, episode: str | None = None,
              deadline_ms: float | None = None, prefix_actions: np.ndarray | None = None,
              prefix_weights: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """The chunk (H, Da) in raw action units for one observation history and the server's
        info (rounds, nfe, converged, sampler_ms, infer_ms, server_ms, batch). `deadline_ms`
        caps an anytime sampler; `prefix_*` constrain the chunk to committed actions."""
        episode = episode or self.episode
        if episode is None:
            raise ServerError("no episode: call reset() first")
        message: dict[str, Any] = {"type": "infer", "episode": episode, "obs": _arrays(obs),
                                   "deadline_ms": deadline_ms}
        if prefix_actions is not None:
            message["prefix"] = {"actions": np.asarray(prefix_actions, np.float32),
                                 "weights": np.asarray(prefix_weights, np.float32)}
        reply = self._call(message)
        return reply["actions"], reply["info"]

    def end(self, episode: str | None = None) -> None:
        """Drop an episode's state on the server."""
        episode = episode or self.episode
        if episode is not None:
            self._call({"type": "end", "episode": episode})
        if episode == self.episode:
            self.episode = None

    def close(self) -> None:
        """Close the connection (the server drops this connection's episodes)."""
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
