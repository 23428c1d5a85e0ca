"""Roll a Can or Square low-dim policy out with the sim's privileged state logged every step and
sort its episodes by how they fail (the issue 29 diagnosis in checkpoints/square_lowdim/README.md).

    python scripts/diagnose_robomimic_policy.py checkpoints/square_lowdim/policy.ckpt \
        --episodes 20 --out runs/square_diag/shipped

Episode i runs from env seed ``--seed-start + i`` with DP's 400-step cap; all episodes step
together, one sampler call for the chunks of all of them (noise from one generator, seed 0).
Per episode it prints and writes to ``OUT.json``: success and steps, the first step the object
was 3 cm above its start (``lifted_first``, -1: never), the object's closest approach to its
target (Square: the peg's axis; Can: its compartment's centre in bin 2), where it ended (height
above the table, yaw from square to the peg in degrees, tilt), the gripper's opening and the
grip site's distance from the object at the end, and the object's initial yaw.
``OUT_epI.npz`` holds the per-step arrays and MuJoCo states (``mj``):
`RobomimicEnv.reset_to_state` + `render` draws any step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from envs.robomimic import RobomimicEnv
from policy.loading import load_with_metadata

CONF = Path(__file__).resolve().parents[1] / "conf" / "sampler"
TASKS = {"square_lowdim": "NutAssemblySquare", "can_lowdim": "PickPlaceCan"}


def scene(env: RobomimicEnv) -> dict[str, np.ndarray | float]:
    """The object's pose, the target (Square's peg; Can: zeros), grip site and gripper."""
    sim_env = env.robosuite_env
    data = sim_env.sim.data
    if env.env_name == "NutAssemblySquare":
        body = sim_env.obj_body_id[sim_env.nuts[sim_env.nut_id].name]
        pegs = (sim_env.peg1_body_id, sim_env.peg2_body_id)
        target = np.array(data.body_xpos[pegs[sim_env.nut_id]])
        table = float(sim_env.table_offset[2])
    else:
        body = sim_env.obj_body_id[sim_env.objects[sim_env.object_id].name]
        # its target: the centre of its compartment in bin 2; heights from bin 1's floor
        target = np.array(sim_env.target_bin_placements[sim_env.object_id])
        table = float(sim_env.bin1_pos[2])
    mat = np.array(data.body_xmat[body]).reshape(3, 3)
    gripper = env.observation_dict()["robot0_gripper_qpos"]
    return {
        "obj": np.array(data.body_xpos[body]),
        "yaw": float(np.arctan2(mat[1, 0], mat[0, 0])),
        "tilt": float(np.degrees(np.arccos(np.clip(mat[2, 2], -1.0, 1.0)))),
        "target": target,
        "table": table,
        "eef": np.array(data.site_xpos[sim_env.robots[0].eef_site_id["right"]]),
        "grip": float(gripper[0] - gripper[1]),
        "mj": env.get_state(),
    }


def summary(seed: int, success_step: int, log: list[dict]) -> dict[str, float | int | bool]:
    """One episode's failure features (see the module docstring)."""
    obj = np.array([s["obj"] for s in log])
    yaw = np.array([s["yaw"] for s in log])
    eef = np.array([s["eef"] for s in log])
    lifted = obj[:, 2] > obj[0, 2] + 0.03
    off_axis = np.linalg.norm(obj[:, :2] - log[0]["target"][:2], axis=1)
    from_square = np.degrees(np.abs((yaw + np.pi / 4) % (np.pi / 2) - np.pi / 4))
    return {
        "seed": seed,
        "success": success_step > 0,
        "steps": len(log),
        "initial_yaw_deg": float(np.degrees(yaw[0])),
        "lifted_first": int(np.argmax(lifted)) if lifted.any() else -1,
        "max_lift": float(obj[:, 2].max() - obj[0, 2]),
        "min_off_axis": float(off_axis.min()),
        "final_off_axis": float(off_axis[-1]),
        "final_height": float(obj[-1, 2] - log[0]["table"]),
        "final_yaw_from_square_deg": float(from_square[-1]),
        "final_tilt_deg": float(log[-1]["tilt"]),
        "final_grip_gap": float(log[-1]["grip"]),
        "final_eef_to_object": float(np.linalg.norm(eef[-1] - obj[-1])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed-start", type=int, default=100000)
    parser.add_argument("--sampler", default="sequential_ddim16", help="a conf/sampler name")
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True, help="prefix of the output files")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    policy, record = load_with_metadata(args.checkpoint)
    sampler_cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{args.sampler}.yaml"))
    sampler = policy.sampler_from_config(sampler_cfg)
    envs = [RobomimicEnv(TASKS[record["config"]["env"]["name"]]) for _ in range(args.episodes)]
    history = [[env.reset(seed=args.seed_start + i)[0]] * 2 for i, env in enumerate(envs)]
    generator = torch.Generator().manual_seed(0)
    success_step = np.full(args.episodes, -1)
    logs: list[list[dict]] = [[] for _ in envs]
    step = 0
    while step < args.max_steps and (success_step < 0).any():
        live = np.flatnonzero(success_step < 0)
        obs = np.stack([np.stack(history[i][-policy.n_obs_steps :]) for i in live])
        actions, _ = policy.predict_action(obs.astype(np.float32), sampler, generator=generator)
        for k in range(min(actions.shape[1], args.max_steps - step)):
            for j, i in enumerate(live):
                if success_step[i] > 0:
                    continue
                logs[i].append({**scene(envs[i]), "action": actions[j, k].numpy()})
                observation, _, _, _, info = envs[i].step(actions[j, k].numpy())
                history[i].append(observation)
                if info["is_success"]:
                    success_step[i] = step + k + 1
        step += actions.shape[1]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, log in enumerate(logs):
        rows.append(summary(args.seed_start + i, int(success_step[i]), log))
        arrays = {
            key: np.array([s[key] for s in log])
            for key in ("obj", "yaw", "eef", "grip", "mj", "action")
        }
        np.savez_compressed(f"{args.out}_ep{i}.npz", target=log[0]["target"], **arrays)
    Path(f"{args.out}.json").write_text(json.dumps(rows, indent=1))
    for row in rows:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    print(f"success {np.mean(success_step > 0):.2f} over {args.episodes} episodes")


if __name__ == "__main__":
    main()
