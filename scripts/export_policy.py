"""Turn a training checkpoint into a small deployable one (EMA weights in float16 + config).

A policy export also writes its resolved training config as `config.yaml` beside it (the
recipe a reader of `checkpoints/<name>/` wants to see); `--no-config` skips that.

python scripts/export_policy.py SRC.ckpt checkpoints/pusht_lowdim/policy.ckpt [--float32]
python scripts/export_policy.py PCM_RUN/latest.ckpt checkpoints/pusht_lowdim/pcm.ckpt \
    --pcm-only checkpoints/pusht_lowdim/policy.ckpt   # the PCM alone, naming its base
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from app.entry import script_errors
from policy.checkpoint import export_pcm, export_policy, write_config_yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="training checkpoint (latest.ckpt, best.ckpt, ...)")
    parser.add_argument("dst", type=Path, help="where to write the exported checkpoint")
    parser.add_argument("--float32", action="store_true", help="keep float32 weights")
    parser.add_argument(
        "--pcm-only", type=Path, default=None, metavar="BASE",
        help="write only the PCM of a stage=pcm checkpoint, referring to the base checkpoint "
        "BASE (which must hold the base weights it was trained on) instead of copying it",
    )
    parser.add_argument(
        "--no-config", action="store_true",
        help="do not write config.yaml beside a policy export",
    )
    args = parser.parse_args()
    dtype = torch.float32 if args.float32 else torch.float16
    if args.dst.resolve() == args.src.resolve():
        sys.exit(f"error: {args.dst} is the source checkpoint: an export would replace it (and "
                 "its optimizer state); write it elsewhere")
    if args.dst.is_dir():
        sys.exit(f"error: {args.dst} is a folder; give the file to write, e.g. "
                 f"{args.dst / 'policy.ckpt'}")
    with script_errors(args.dst):
        if args.pcm_only is not None:
            path = export_pcm(args.src, args.dst, base=args.pcm_only, dtype=dtype)
        else:
            path = export_policy(args.src, args.dst, dtype=dtype)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {dtype})")
        if args.pcm_only is None and not args.no_config:
            print(f"wrote {write_config_yaml(path, path.with_name('config.yaml'))}")


if __name__ == "__main__":
    main()
