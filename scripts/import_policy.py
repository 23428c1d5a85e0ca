"""Import a Diffusion Policy workspace checkpoint or a LeRobot diffusion folder as a native
picard-policy checkpoint (EMA weights + resolved config, and `config.yaml` beside it).

    python scripts/import_policy.py path/to/dp_workspace.ckpt checkpoints/mine/policy.ckpt \
        --env pusht_lowdim
    python scripts/import_policy.py path/to/lerobot_pretrained_model checkpoints/lr/policy.ckpt

Importing is optional: eval_policy.py and `from policy import load_policy` read the foreign
formats directly. A native copy loads without the source's pickle and records where it came
from (`config.imported_from`); `--env` stores one of our env configs (conf/env/<name>.yaml), so
eval_policy.py needs no `env=`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from app.entry import script_errors
from policy.checkpoint import FORMAT, load_policy_checkpoint, write_config_yaml
from policy.file_io import atomic_torch_save
from policy.loading import import_foreign

CONF_ENV = Path(__file__).resolve().parents[1] / "conf" / "env"


def import_policy(src: Path, dst: Path, env: str | None = None) -> Path:
    """Write the native checkpoint of `src` to `dst` (and check it loads back); returns dst."""
    imported = import_foreign(src)
    env_config = None
    if env is not None:
        env_file = CONF_ENV / f"{env}.yaml"
        if not env_file.is_file():
            available = sorted(p.stem for p in CONF_ENV.glob("*.yaml"))
            raise ValueError(f"unknown env {env!r}; available envs: {', '.join(available)}")
        env_config = OmegaConf.to_container(OmegaConf.load(env_file), resolve=True)
    payload = {
        "format": FORMAT, "step": imported.source.get("step", 0), "epoch": 0, "model": None,
        "ema": {"model": imported.weights},
        "config": {"policy": imported.config, "env": env_config,
                   "imported_from": imported.source},
        "extra": {"imported_from": str(src)},
    }
    atomic_torch_save(payload, dst)
    load_policy_checkpoint(dst)  # the native copy must load as any checkpoint does
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="DP workspace .ckpt or LeRobot pretrained folder")
    parser.add_argument("dst", type=Path, help="native checkpoint to write")
    parser.add_argument("--env", default=None, help="store conf/env/<ENV>.yaml with the policy")
    parser.add_argument("--no-config", action="store_true", help="do not write config.yaml")
    args = parser.parse_args()
    with script_errors(args.dst):
        path = import_policy(args.src, args.dst, args.env)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        if not args.no_config:
            print(f"wrote {write_config_yaml(path, path.with_name('config.yaml'))}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
