"""picard_client against a live server (issue 27 item 3): request ids and stale replies, the
protocol version check, reconnect / resume / lost episodes, the auth token, TLS, /healthz and
/metrics, the serve config's security rules and the server's bounded histories.

Servers run in-process on loopback ports (the shipped PushT policy, sequential DDIM-4, the
harness of tests/test_server_hostile.py); waits are bounded and wait for outcomes.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from picard_client import ConnectionLost, EpisodeLost, PolicyClient, ProtocolMismatch, ServerError
from picard_client.protocol import AUTH_ENV, PROTOCOL_HEADER, pack, unpack
from websockets.sync.client import connect
from websockets.sync.server import serve as sync_serve

import app.serving
from app.checks import ConfigError
from app.command_line import compose_config
from app.serving import serve_security, server_ssl_context
from policy.checkpoint import load_policy_checkpoint
from tests.test_server_hostile import CHECKPOINT, OBS, WAIT_S, Gate, Running, make_server, wait_for

TOKEN = "a-robot-token-0123456789"
OTHER_OBS = OBS[::-1].copy()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy() -> Any:
    return load_policy_checkpoint(CHECKPOINT)


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
                     ) -> Iterator[None]:
    """No test here may log an error or a traceback; no token leaks in from the shell."""
    monkeypatch.delenv(AUTH_ENV, raising=False)
    caplog.set_level(logging.WARNING)
    yield
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


def address(running: Running) -> str:
    return f"127.0.0.1:{running.port}"


def http_get(url: str, headers: dict[str, str] | None = None,
             context: ssl.SSLContext | None = None) -> tuple[int, str]:
    """(status, body) of a GET, error statuses included."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# ------------------------------------------------------------------ ids and stale replies
def test_a_late_reply_is_dropped_never_returned(policy: Any) -> None:
    """The stale chunk: a request times out on the client, its reply arrives later; the next
    request must get its own chunk, and the late one is dropped and counted."""
    server = make_server(policy, idle_timeout_s=WAIT_S)
    with Running(server) as running:
        with PolicyClient(address(running), timeout_s=WAIT_S) as reference:
            reference.reset(5)
            want_first, _ = reference.infer(OBS)
            want_second, _ = reference.infer(OTHER_OBS)
        gate = Gate(server)
        with PolicyClient(address(running), timeout_s=WAIT_S) as client:
            client.reset(5)
            with pytest.raises(ServerError, match="no reply from .* within 0.2 s"):
                client.infer(OBS, timeout_s=0.2)  # held in the sampler call: answered late
            gate.open()
            actions, _ = client.infer(OTHER_OBS)
            assert (client.stats.stale_replies, client.stats.timeouts) == (1, 1)
    np.testing.assert_allclose(actions, want_second, atol=1e-5)
    assert not np.allclose(actions, want_first, atol=1e-2)


def test_replies_echo_the_request_id(policy: Any) -> None:
    with Running(make_server(policy, idle_timeout_s=WAIT_S)) as running, \
            connect(running.url, compression=None) as ws:
        for request_id in (7, "robot-3-41", None):
            ws.send(pack({"type": "metadata", "id": request_id}))
            assert unpack(ws.recv(timeout=WAIT_S), max_items=None)["id"] == request_id


# ---------------------------------------------------------------------- version check
def test_a_server_of_another_protocol_version_is_refused_on_connect(
    policy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_server(policy, idle_timeout_s=WAIT_S)
    monkeypatch.setattr(server, "_stamp", lambda connection, request, response:
                        response.headers.__setitem__(PROTOCOL_HEADER, "1"))
    with Running(server) as running, pytest.raises(
            ProtocolMismatch, match="speaks protocol 1; this client speaks protocol 2"):
        PolicyClient(address(running), timeout_s=WAIT_S)


def test_a_websocket_server_that_names_no_protocol_is_refused() -> None:
    def echo(ws: Any) -> None:
        for message in ws:
            ws.send(message)

    with sync_serve(echo, "127.0.0.1", 0) as other:
        thread = threading.Thread(target=other.serve_forever, daemon=True)
        thread.start()
        port = other.socket.getsockname()[1]
        with pytest.raises(ProtocolMismatch, match="no protocol version .* not a picard-policy"):
            PolicyClient(f"127.0.0.1:{port}", timeout_s=WAIT_S)
        other.shutdown()
        thread.join(WAIT_S)


# ----------------------------------------------------------------- reconnect and resume
def test_a_connection_dropped_mid_request_resumes_and_samples_the_request_once(
    policy: Any,
) -> None:
    """The network drops while the request is in a sampler call: the client reconnects,
    resumes the episode and re-sends the request with its id; the server answers it with the
    call already running (one sampler call, not two) and the chunk is the uninterrupted one."""
    server = make_server(policy, idle_timeout_s=WAIT_S)
    with Running(server) as running:
        with PolicyClient(address(running), timeout_s=WAIT_S) as reference:
            reference.reset(8)
            want, _ = reference.infer(OBS)
        gate = Gate(server)
        client = PolicyClient(address(running), timeout_s=WAIT_S, backoff_s=0.01)
        client.reset(8)
        got: list[Any] = []
        thread = threading.Thread(target=lambda: got.append(client.infer(OBS)))
        thread.start()
        wait_for(lambda: gate.held, "the request to reach the sampler call")
        client._ws.socket.shutdown(socket.SHUT_RDWR)  # the network drops, no close handshake
        wait_for(lambda: client.stats.resumed == 1, "the client to resume its episode")
        gate.open()
        thread.join(WAIT_S)
        client.close()
    (actions, _), = got
    np.testing.assert_array_equal(actions, want)
    assert server.calls == 2  # the reference's and this request's, once
    assert client.stats.reconnects == 1 and client.stats.episodes_lost == 0


def test_an_episode_a_restarted_server_lacks_is_reported_lost(policy: Any) -> None:
    """Never silently restarted: after a server restart the client reconnects, learns the
    episode is gone (EpisodeLost) and a new episode starts only when asked for; with nothing
    listening, the retry budget ends in ConnectionLost."""
    first = Running(make_server(policy, idle_timeout_s=WAIT_S)).__enter__()
    port = first.port
    client = PolicyClient(f"127.0.0.1:{port}", timeout_s=WAIT_S, retries=3, backoff_s=0.01)
    try:
        episode = client.reset(3)
        client.infer(OBS)
        first.stop()
        with Running(make_server(policy, idle_timeout_s=WAIT_S), port=port):
            with pytest.raises(EpisodeLost, match=f"episode {episode} lost: the server no "
                                                  "longer has it") as lost:
                client.infer(OBS)
            assert lost.value.episode == episode and client.episode is None
            with pytest.raises(ServerError, match="no episode: call reset"):
                client.infer(OBS)
            client.reset(3)  # a new episode, because the robot asked for one
            actions, _ = client.infer(OBS)
            assert np.isfinite(actions).all()
        with pytest.raises(ConnectionLost, match="could not reconnect in 3 attempts"):
            client.infer(OBS)
        assert client.stats.episodes_lost == 1 and client.stats.reconnects == 1
    finally:
        first.stop()
        client.close()


def test_requests_caught_by_a_shutdown_are_retried_on_the_next_server(policy: Any) -> None:
    """SIGTERM with one request in a sampler call and one queued: neither robot sees a failure;
    both reconnect to the restarted server and hear that their episodes are lost."""
    first = Running(make_server(policy, idle_timeout_s=WAIT_S)).__enter__()
    port = first.port
    gate = Gate(first.server)
    clients = [PolicyClient(f"127.0.0.1:{port}", timeout_s=WAIT_S, retries=200,
                            backoff_s=0.02, backoff_max_s=0.1) for _ in range(2)]
    outcomes: list[Any] = [None, None]

    def ask(k: int) -> None:
        try:
            outcomes[k] = clients[k].infer(OBS)
        except Exception as e:  # what the robot saw
            outcomes[k] = e

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(2)]
    try:
        for k, (client, thread) in enumerate(zip(clients, threads, strict=True)):
            client.reset(k)
            thread.start()
            wait_for(lambda k=k: len(gate.held) + first.server._jobs.qsize() == k + 1,
                     f"request {k} to be in a call or queued")
        first._loop.call_soon_threadsafe(first._stop.set)  # SIGTERM
        gate.open()
        first.stop()
        with Running(make_server(policy, idle_timeout_s=WAIT_S), port=port):
            for thread in threads:
                thread.join(WAIT_S)
    finally:
        first.stop()
        for client in clients:
            client.close()
    assert all(isinstance(outcome, EpisodeLost) for outcome in outcomes), outcomes


def test_closes_retrying_cannot_help_are_raised_at_once(policy: Any) -> None:
    server = make_server(policy, idle_timeout_s=WAIT_S, max_message_bytes=2**16)
    with Running(server) as running, PolicyClient(address(running), timeout_s=WAIT_S) as client:
        client.reset(1)
        with pytest.raises(ServerError, match="code 1009"):
            client.infer(np.zeros((2, 20_000), np.float32))
        assert client.stats.reconnects == 0


# ------------------------------------------------------------------------------- auth
def test_only_clients_with_the_token_are_served(
    policy: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refusal is close 4401 and one log line, on loopback too once a token is set; the token
    goes as Bearer (our client, also from PICARD_AUTH_TOKEN) or Api-Key (openpi's client)."""
    server = make_server(policy, idle_timeout_s=WAIT_S, auth_token=TOKEN)
    with Running(server) as running:
        for token, given in (("", "no token"), ("x" * 24, "a wrong token")):
            with pytest.raises(ServerError, match=f"code 4401: unauthorized: {given}"):
                PolicyClient(address(running), timeout_s=WAIT_S, auth_token=token).metadata()
        with PolicyClient(address(running), timeout_s=WAIT_S, auth_token=TOKEN) as client:
            client.reset(1)
            assert np.isfinite(client.infer(OBS)[0]).all()
        with connect(running.url, compression=None,
                     additional_headers={"Authorization": f"Api-Key {TOKEN}"}) as ws:
            ws.send(pack({"type": "metadata"}))
            assert unpack(ws.recv(timeout=WAIT_S), max_items=None)["type"] == "metadata"
        monkeypatch.setenv(AUTH_ENV, TOKEN)
        with PolicyClient(address(running), timeout_s=WAIT_S) as client:
            assert client.metadata()["action_dim"] == 2
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert [r.getMessage() for r in refusals] == [
        "refused a connection from 127.0.0.1: no token (close 4401)",
        "refused a connection from 127.0.0.1: a wrong token (close 4401)"]
    assert all(r.levelno == logging.WARNING and not r.exc_info for r in refusals)
    assert TOKEN not in caplog.text
    assert server.metrics()["refused_connections"]["unauthorized"] == 2


# ---------------------------------------------------------------------- health, metrics
def test_healthz_and_metrics_answer_on_the_websocket_port(policy: Any) -> None:
    server = make_server(policy, idle_timeout_s=WAIT_S)
    with Running(server) as running:
        base = f"http://127.0.0.1:{running.port}"
        assert http_get(f"{base}/healthz") == (200, "OK\n")
        with PolicyClient(address(running), timeout_s=WAIT_S) as client:
            client.reset(1)
            for _ in range(3):
                client.infer(OBS)
            with pytest.raises(ServerError, match="deadline_ms"):
                client.infer(OBS, deadline_ms=-1)
            status, body = http_get(f"{base}/metrics")
        metrics = json.loads(body)
        assert status == 200
        assert metrics["requests"] == {"metadata": 0, "reset": 1, "infer": 4, "resume": 0,
                                       "end": 0}
        assert metrics["errors"] == 1 and metrics["sampler_calls"] == 3
        assert metrics["batch_sizes"] == {"1": 3} and metrics["queue_depth"] == 0
        assert metrics["connections"] == 1 and metrics["episodes"] == 1
        latency = metrics["latency_ms"]
        assert latency["window"] == 3 and 0 < latency["infer_p50"] <= latency["server_p99"]
        assert metrics["rss_mb"] > 50  # torch and the policy
        # and with a token: /metrics needs it, /healthz (a liveness probe) does not
    server = make_server(policy, idle_timeout_s=WAIT_S, auth_token=TOKEN)
    with Running(server) as running:
        base = f"http://127.0.0.1:{running.port}"
        assert http_get(f"{base}/healthz")[0] == 200
        assert http_get(f"{base}/metrics") == (401, "unauthorized\n")
        status, body = http_get(f"{base}/metrics", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and json.loads(body)["sampler_calls"] == 0


# -------------------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (openssl's command line)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def test_tls_serves_wss_clients_that_trust_the_certificate(
    policy: Any, certificate: tuple[str, str]
) -> None:
    cert, key = certificate
    server = make_server(policy, idle_timeout_s=WAIT_S)
    with Running(server, ssl_context=server_ssl_context(cert, key)) as running:
        with PolicyClient(f"wss://127.0.0.1:{running.port}", timeout_s=WAIT_S,
                          ssl_cafile=cert) as client:
            client.reset(2)
            assert np.isfinite(client.infer(OBS)[0]).all()
        with pytest.raises(ServerError, match="certificate verify failed"):
            PolicyClient(f"wss://127.0.0.1:{running.port}", timeout_s=WAIT_S)
        with pytest.raises(ServerError, match="cannot reach"):
            PolicyClient(address(running), timeout_s=WAIT_S)  # plain ws:// to a TLS port
        trusted = ssl.create_default_context(cafile=cert)
        assert http_get(f"https://127.0.0.1:{running.port}/healthz", context=trusted) == (
            200, "OK\n")


# ------------------------------------------------------------------------ config rules
def test_beyond_loopback_a_server_needs_a_token_and_tls(certificate: tuple[str, str]) -> None:
    cert, key = certificate
    assert serve_security(compose_config("serve"), {}) == (None, None)  # loopback: neither
    beyond = compose_config("serve", ["host=0.0.0.0"])
    with pytest.raises(ConfigError, match="auth_token: a server on host 0.0.0.0 .* needs a "
                                          "token: set PICARD_AUTH_TOKEN"):
        serve_security(beyond, {})
    with pytest.raises(ConfigError, match="ssl_certfile: .* needs TLS"):
        serve_security(beyond, {AUTH_ENV: TOKEN})
    insecure = compose_config("serve", ["host=0.0.0.0", "insecure=true"])
    assert serve_security(insecure, {AUTH_ENV: TOKEN}) == (TOKEN, None)
    tls = compose_config("serve", ["host=0.0.0.0", f"ssl_certfile={cert}",
                                   f"ssl_keyfile={key}", f"auth_token={TOKEN}"])
    token, context = serve_security(tls, {})
    assert token == TOKEN and isinstance(context, ssl.SSLContext)
    short = compose_config("serve", ["auth_token=hunter2"])
    with pytest.raises(ConfigError) as error:
        serve_security(short, {})
    assert "at least 16 characters" in str(error.value) and "hunter2" not in str(error.value)
    missing = compose_config("serve", ["ssl_certfile=/nonexistent.pem",
                                       "ssl_keyfile=/nonexistent.key"])
    with pytest.raises(ConfigError, match="cannot load /nonexistent.pem"):
        serve_security(missing, {})
    with pytest.raises(ConfigError, match="ssl_keyfile must be a path exactly when"):
        app.serving.check_serve_config(compose_config("serve", [f"ssl_certfile={cert}"]))


# ------------------------------------------------------------------------ bounded memory
def test_what_the_server_keeps_is_bounded(policy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 32 item 3: the call history, the latency window and the episodes waiting for a
    resume are capped, whatever the clients do; counters cover the whole run."""
    monkeypatch.setattr(app.serving, "BATCH_HISTORY", 3)
    monkeypatch.setattr(app.serving, "LATENCY_WINDOW", 4)
    server = make_server(policy, idle_timeout_s=WAIT_S, max_clients=1,
                         max_episodes_per_client=2)
    with Running(server) as running:
        for round_ in range(3):  # each client leaves two episodes waiting for a resume
            with PolicyClient(address(running), timeout_s=WAIT_S) as client:
                for seed in (2 * round_, 2 * round_ + 1):
                    client.reset(seed)
                    client.infer(OBS)
            wait_for(lambda: not server._connections, "the client to be let go")
        assert server.calls == 6 and len(server.batches) == 3 and len(server._latency) == 4
        assert len(server._episodes) == len(server._detached) == 2  # 1 client x 2 episodes
        assert len(server.chunks._generators) == 2  # the dropped episodes' slots were freed
