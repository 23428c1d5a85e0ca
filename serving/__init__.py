"""The robot side of the policy server: message format and a client, without torch.

A robot process needs numpy, msgpack and websockets only: `PolicyClient` asks a running
`serve_policy.py` for action chunks (docs/design.md §11 has the protocol).
"""

from serving.client import PolicyClient, ServerError
from serving.protocol import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION", "PolicyClient", "ServerError"]
