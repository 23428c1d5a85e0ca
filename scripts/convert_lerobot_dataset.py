"""Convert a LeRobot dataset folder (v3.0 or v2.1) to a zarr replay buffer for training.

    python scripts/convert_lerobot_dataset.py ~/.cache/huggingface/lerobot/lerobot/pusht \
        data/lerobot_pusht.zarr.zip
    python scripts/convert_lerobot_dataset.py SRC OUT.zarr.zip \
        --key observation.state=state --key action=action

Low-dim features as float32 `data/<key>` arrays, cameras (image features: PNG/JPEG frames in
the parquet files; video features: mp4 files, decoded with PyAV) as uint8 (N, H, W, 3) arrays,
one episode per LeRobot episode (in episode_index order). Default keys drop `observation.` and
turn dots into underscores (observation.environment_state -> environment_state,
observation.image -> image, observation.images.top -> images_top). A config then trains on it
with `data.path=OUT.zarr.zip data.obs_keys=[environment_state,state]`, or for an image policy
`data.obs_keys={image: image, agent_pos: state}`. Without PyAV a video feature is refused with
one line naming it (convert the rest with --key). See policy/data/lerobot_dataset.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from app.entry import script_errors
from policy.data.lerobot_dataset import default_key, lerobot_to_replay_buffer


def parse_key(text: str) -> tuple[str, str]:
    """`FEATURE=KEY` -> (FEATURE, KEY); a bare `FEATURE` keeps its default buffer key."""
    feature, sep, key = text.partition("=")
    if not feature or (sep and not key):
        raise argparse.ArgumentTypeError(f"expected FEATURE or FEATURE=KEY; got {text!r}")
    return feature, key if sep else default_key(feature)


def convert(src: Path, out: Path, keys: dict[str, str] | None = None,
            zarr_format: int | None = None, overwrite: bool = False) -> str:
    """Convert `src` and save it to `out`; returns a one-line summary of what was written."""
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    if not (out.name.endswith(".zip") or out.suffix == ".zarr"):
        raise ValueError(f"output {out} must end in .zarr.zip (zip file) or .zarr (directory)")
    buffer = lerobot_to_replay_buffer(src, keys)
    source = buffer.attrs["source"]
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer.save(out, zarr_format=zarr_format)
    arrays = ", ".join(f"{key} {tuple(buffer[key].shape[1:])} {buffer[key].dtype}"
                       for key in buffer)
    skipped = source["skipped_features"]
    return (f"wrote {out}: {buffer.n_episodes} episodes, {buffer.n_steps} steps, "
            f"{arrays} from LeRobot {source['codebase_version']} dataset {src} "
            f"({', '.join(f'{f} -> {k}' for f, k in source['keys'].items())}"
            + (f"; skipped {', '.join(skipped)}" if skipped else "") + ")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="LeRobot dataset folder (with meta/info.json)")
    parser.add_argument("out", type=Path, help="replay buffer to write: OUT.zarr.zip or OUT.zarr")
    parser.add_argument("--key", action="append", type=parse_key, metavar="FEATURE[=KEY]",
                        help="convert only these features (repeatable); default: every low-dim "
                             "and camera feature under its default key")
    parser.add_argument("--zarr-format", type=int, choices=(2, 3), default=None,
                        help="2 writes a store Diffusion Policy's zarr 2 reads (default 3)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = parser.parse_args()
    keys = dict(args.key) if args.key else None
    with script_errors(args.out):
        print(convert(args.src, args.out, keys, args.zarr_format, args.overwrite))


if __name__ == "__main__":
    main()
