"""Serve a trained Diffusion Policy to robot processes: action chunks over websockets + msgpack.

    python serve_policy.py                                  # shipped PushT policy, 127.0.0.1:8765
    python serve_policy.py checkpoint=PATH sampler=sequential_ddim16 runtime=onnxruntime port=9000
    PICARD_AUTH_TOKEN=... python serve_policy.py host=0.0.0.0 ssl_certfile=C ssl_keyfile=K
    python serve_policy.py protocol=openpi                  # openpi's WebsocketClientPolicy
    python eval_policy.py realtime.enabled=true realtime.clock=wall server=127.0.0.1:8765

A thin Hydra entry over `app.serving.run_serve` (the protocol: client/picard_client/protocol.py;
the robot side: picard_client.PolicyClient, `pip install ./client`, no torch needed). GET
/healthz and /metrics answer on the same port. Config errors print one line and exit with status
1; SIGTERM or Ctrl-C closes every connection, finishes the sampler call in flight and exits 0
(in bounded time, whatever the clients do); should the inference thread ever die, the server
stops with one `error:` line and status 1 rather than leave robots waiting (docs/design.md §11,
"What serving guarantees").
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from app.builder import POLICY_RUN_GROUPS
from app.command_line import precheck_or_exit
from app.entry import run_entry
from app.serving import run_serve

CHECKED_GROUPS = POLICY_RUN_GROUPS  # conf/policy_run/: sampler, runtime, env


@hydra.main(config_path="conf", config_name="serve", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry: serve until stopped."""
    run_entry(lambda: run_serve(cfg))


def main() -> None:
    """Check the command line in one line before Hydra starts, then hand it to Hydra."""
    precheck_or_exit(sys.argv[1:], "serve", CHECKED_GROUPS)
    hydra_main()


if __name__ == "__main__":
    main()
