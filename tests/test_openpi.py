"""serve_policy.py protocol=openpi against openpi's own client (issue 27 item 2).

`openpi_client.websocket_client_policy.WebsocketClientPolicy` (the PyPI package openpi-client,
in the dev extra, so CI installs it with the rest) talks to the server unchanged: it reads the
metadata frame on connect, sends observations with its msgpack-numpy and gets
{"actions": (Ta or H, Da)}. Its actions must equal our own client's chunk for the same episode
seed (an openpi client sets it with obs["episode_seed"]); its Api-Key header is the token;
hostile openpi frames get one line back and the connection stays usable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from picard_client import PolicyClient
from picard_client.openpi import EPISODE_SEED_KEY
from picard_client.protocol import CLOSE_UNAUTHORIZED
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from policy.checkpoint import load_policy_checkpoint
from tests.test_client import TOKEN, http_get
from tests.test_server_hostile import (
    CHECKPOINT,
    OBS,
    WAIT_S,
    Running,
    make_server,
    wait_for,
)

OTHER_OBS = OBS[::-1].copy()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy() -> Any:
    return load_policy_checkpoint(CHECKPOINT)


@pytest.fixture(scope="module")
def ours(policy: Any) -> Iterator[Running]:
    """Our protocol's server with the same policy, sampler and noise seed: the reference."""
    with Running(make_server(policy, idle_timeout_s=WAIT_S)) as running:
        yield running


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.WARNING)
    yield
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


def our_chunks(ours: Running, seed: int, observations: list[np.ndarray]) -> list[np.ndarray]:
    with PolicyClient(f"127.0.0.1:{ours.port}", timeout_s=WAIT_S) as client:
        client.reset(seed)
        return [client.infer(obs)[0] for obs in observations]


@pytest.mark.parametrize("actions", ["executable", "chunk"])
def test_openpis_client_gets_our_clients_chunk_for_the_same_episode_seed(
    policy: Any, ours: Running, actions: str
) -> None:
    first, second = our_chunks(ours, 7, [OBS, OTHER_OBS])
    (other_seed,) = our_chunks(ours, 8, [OBS])
    rows = slice(1, 9) if actions == "executable" else slice(0, 16)  # To - 1 .. To - 1 + Ta
    server = make_server(policy, idle_timeout_s=WAIT_S, protocol="openpi",
                         openpi_actions=actions)
    with Running(server) as running:
        client = WebsocketClientPolicy(host="127.0.0.1", port=running.port)
        meta = client.get_server_metadata()
        assert meta["obs_spec"] == {"obs": [2, 20]} and meta["action_dim"] == 2
        assert (meta["n_obs_steps"], meta["horizon"], meta["n_action_steps"]) == (2, 16, 8)
        assert meta["openpi"]["actions"] == actions and "max_batch" in meta
        out = client.infer({"obs": OBS, EPISODE_SEED_KEY: 7})
        assert out["actions"].shape == ((8, 2) if actions == "executable" else (16, 2))
        np.testing.assert_allclose(out["actions"], first[rows], atol=1e-6)
        assert out["info"]["converged"] and out["server_timing"]["infer_ms"] > 0
        # the same seed again continues the episode; another seed starts a new one
        np.testing.assert_allclose(client.infer({"obs": OTHER_OBS, EPISODE_SEED_KEY: 7})[
            "actions"], second[rows], atol=1e-6)
        np.testing.assert_allclose(client.infer({"obs": OBS, EPISODE_SEED_KEY: 8})["actions"],
                                   other_seed[rows], atol=1e-6)
        assert np.isfinite(client.infer({"obs": OBS, "prompt": "push the T"})["actions"]).all()
        client._ws.close()
        wait_for(lambda: not server._connections, "the connection to close")
        assert server._episodes == {}  # openpi's client never resumes: nothing waits
    assert server.metrics()["requests"]["infer"] == 4


def test_openpis_api_key_is_the_token(policy: Any) -> None:
    server = make_server(policy, idle_timeout_s=WAIT_S, protocol="openpi", auth_token=TOKEN)
    with Running(server) as running:
        with pytest.raises(ConnectionClosed) as refused:
            WebsocketClientPolicy(host="127.0.0.1", port=running.port)
        assert refused.value.rcvd.code == CLOSE_UNAUTHORIZED
        client = WebsocketClientPolicy(host="127.0.0.1", port=running.port, api_key=TOKEN)
        assert client.infer({"obs": OBS})["actions"].shape == (8, 2)
        client._ws.close()
        assert http_get(f"http://127.0.0.1:{running.port}/healthz") == (200, "OK\n")


OPENPI_REFUSED = [
    ("bad-shape", msgpack_numpy.packb({"obs": np.zeros((3, 20), np.float32)}),
     "expected shape (B, 2, 20), got (1, 3, 20)"),
    ("big-endian", msgpack_numpy.packb({"obs": OBS.astype(">f4")}),
     "array dtype '>f4' is not in this machine's byte order"),
    ("object-dtype", msgpack.packb({"obs": {b"__ndarray__": True, b"data": b"", b"dtype": "|O",
                                            b"shape": [0]}}), "(object) is not one of"),
    ("bytes-vs-shape", msgpack.packb({"obs": {b"__ndarray__": True, b"data": b"1234",
                                              b"dtype": "<f4", b"shape": [1000, 1000]}}),
     "needs 4000000 bytes; got 4"),
    ("huge-dtype", msgpack.packb({"obs": {b"__ndarray__": True, b"data": b"",
                                          b"dtype": "(1000000000,)f4", b"shape": [0]}}),
     "array dtype '(1000000000,)f4' is not a numpy dtype"),
    ("long-dtype", msgpack.packb({"obs": {b"__ndarray__": True, b"data": b"",
                                          b"dtype": "f" * 40, b"shape": [0]}}),
     "must be a short numpy dtype string"),
    ("bytes-key", msgpack.packb({b"obs": 1}), "map keys must be strings; got a bytes key"),
    ("seed-float", msgpack_numpy.packb({"obs": OBS, EPISODE_SEED_KEY: 1.5}),
     "episode_seed must be an int in [0, 2**32); got 1.5"),
    ("not-a-map", msgpack.packb([1, 2]), "must be a map of observation arrays; got a list"),
    ("no-arrays", msgpack.packb({"prompt": "hi"}), "holds no observation arrays"),
    ("list-value", msgpack.packb({"obs": [1, 2]}), "observation 'obs' must be an array"),
    ("ext-type", msgpack.packb({"obs": msgpack.ExtType(3, b"")}), "ext type 3"),
    ("too-many-items", msgpack.packb({"obs": [[0] * 50] * 100}), "more than 4096 msgpack items"),
]


@pytest.mark.parametrize(("frame", "expected"), [case[1:] for case in OPENPI_REFUSED],
                         ids=[case[0] for case in OPENPI_REFUSED])
def test_a_bad_openpi_frame_is_one_text_line_and_the_connection_goes_on(
    policy: Any, openpi_live: Running, frame: bytes, expected: str
) -> None:
    with connect(openpi_live.url, compression=None, max_size=None) as ws:
        ws.recv(timeout=WAIT_S)  # the metadata frame
        ws.send(frame)
        reply = ws.recv(timeout=WAIT_S)
        assert isinstance(reply, str) and reply.startswith("error: ") and "\n" not in reply
        assert expected in reply, reply
        ws.send(msgpack_numpy.packb({"obs": OBS}))
        assert msgpack_numpy.unpackb(ws.recv(timeout=WAIT_S))["actions"].shape == (8, 2)


@pytest.fixture(scope="module")
def openpi_live(policy: Any) -> Iterator[Running]:
    with Running(make_server(policy, idle_timeout_s=WAIT_S, protocol="openpi")) as running:
        yield running
