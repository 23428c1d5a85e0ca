"""The robot side of the policy server moved to the picard_client distribution (client/,
`pip install ./client`: no torch); this name re-exports it for existing imports."""

from picard_client import PROTOCOL_VERSION, PolicyClient, ServerError

__all__ = ["PROTOCOL_VERSION", "PolicyClient", "ServerError"]
