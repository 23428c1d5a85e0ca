"""picard_client: the robot side of picard-policy's policy server, without torch.

A robot computer installs this distribution alone (`pip install ./client`: numpy, msgpack and
websockets): the wire protocol (`protocol`, and openpi's format in `openpi`), `PolicyClient`
(request ids, stale-reply drop, version check, reconnect and resume, auth token, TLS) and the
real-time control loop with its chunk hand-offs and metrics (`realtime`). The server is
`serve_policy.py` of the main package (docs/design.md §11).
"""

from picard_client.client import (
    ClientStats,
    ConnectionLost,
    EpisodeLost,
    PolicyClient,
    ProtocolMismatch,
    RemoteChunks,
    ServerError,
)
from picard_client.protocol import PROTOCOL_VERSION
from picard_client.realtime import (
    HANDOFFS,
    ChunkDims,
    RealtimeController,
    RealtimeSettings,
    summarize_realtime,
)

__version__ = "0.3.0"  # 0.3: RealtimeController takes a RealtimeSettings record

__all__ = ["HANDOFFS", "PROTOCOL_VERSION", "ChunkDims", "ClientStats", "ConnectionLost",
           "EpisodeLost", "PolicyClient", "ProtocolMismatch", "RealtimeController",
           "RealtimeSettings", "RemoteChunks",
           "ServerError", "summarize_realtime"]
