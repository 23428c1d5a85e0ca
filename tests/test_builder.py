"""app.builder and conf/policy_run/: eval and serve build a policy one way from one config block.

The keys eval_policy.py and serve_policy.py share (checkpoint, sampler, runtime, env, warm_start,
device, threads) come from ONE Hydra group composed into both roots and pass ONE check list;
`build_policy` turns them into the policy, sampler and runtime both entries run.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from app.builder import PolicySpec, build_policy
from app.checks import ConfigError
from app.command_line import compose_config
from app.evaluation import check_eval_config
from app.serving import ServerSettings, check_serve_config

SHARED_KEYS = ("checkpoint", "sampler", "runtime", "env", "warm_start", "device", "threads")
OVERRIDES = ["checkpoint=checkpoints/pusht_lowdim/policy.ckpt", "sampler=sequential_ddim16",
             "runtime=onnxruntime", "env=pusht_lowdim", "warm_start=shift", "device=cpu",
             "threads=1"]


def shared(cfg: object) -> dict:
    return {key: OmegaConf.to_container(cfg, resolve=True)[key] for key in SHARED_KEYS}


def test_eval_and_serve_compose_the_same_policy_run_block() -> None:
    """Defaults and the overrides users type (checkpoint=, sampler=, runtime=, env=, ...)."""
    assert shared(compose_config("eval")) == shared(compose_config("serve"))
    eval_cfg, serve_cfg = compose_config("eval", OVERRIDES), compose_config("serve", OVERRIDES)
    assert shared(eval_cfg) == shared(serve_cfg)
    assert eval_cfg.env.name == "pusht_lowdim" and eval_cfg.runtime.kind == "onnxruntime"
    assert eval_cfg.sampler.schedule.num_inference_steps == 16 and eval_cfg.threads == 1


@pytest.mark.parametrize(("override", "message"), [
    ("warm_start=sometimes", "warm_start must be one of ['none', 'reuse', 'shift'] (true: reuse, "
                             "false: none); got 'sometimes'"),
    ("threads=0", "threads must be null or an int >= 1; got 0"),
    ("device=tpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'tpu'"),
    ("checkpoint=''", "checkpoint must be a path (a checkpoint file or a LeRobot folder); got ''"),
    ("runtime.precision=bfloat16", "runtime.precision must be float32 with sampler=auto "
     "(another precision needs a fixed sampler, e.g. sampler=parareal_ddpm100); got 'bfloat16'"),
])
def test_eval_and_serve_refuse_a_shared_key_with_the_same_line(override: str,
                                                                message: str) -> None:
    for check, root in ((check_eval_config, "eval"), (check_serve_config, "serve")):
        with pytest.raises(ConfigError) as error:
            check(compose_config(root, [override]))
        assert str(error.value) == message, root


@pytest.mark.parametrize("warm_start", ["true", "false", "none", "reuse", "shift"])
def test_eval_and_serve_accept_the_same_warm_starts(warm_start: str) -> None:
    """warm_start=true / false (reuse / none) used to pass eval's check and fail serve's."""
    check_eval_config(compose_config("eval", [f"warm_start={warm_start}"]))
    check_serve_config(compose_config("serve", [f"warm_start={warm_start}"]))


def test_eval_and_serve_build_the_same_policy_from_the_same_keys() -> None:
    """Same spec from either root (their own extras aside), same sampler and runtime."""
    overrides = ["sampler=sequential_ddim16", "device=cpu"]
    from_eval = PolicySpec.from_config(compose_config("eval", overrides), env_required=True)
    from_serve = PolicySpec.from_config(compose_config("serve", overrides), env_required=True)
    assert from_eval == from_serve
    built = build_policy(from_eval, torch.device("cpu"))
    assert built.sampler.label == "sequential DDIM-16" and built.auto is None
    assert built.runtime == {"kind": "eager", "precision": "float32"}
    assert built.env["name"] == "pusht_lowdim" and built.checkpoint["step"] > 0
    assert built.policy.horizon == 16


def test_a_missing_checkpoint_is_one_line_naming_it(tmp_path) -> None:
    spec = PolicySpec(str(tmp_path / "none.ckpt"), {"method": "sequential"}, {"kind": "eager"})
    with pytest.raises(ConfigError, match="checkpoint not found: .*none.ckpt"):
        build_policy(spec, torch.device("cpu"))


def test_server_settings_are_checked_and_keep_the_token_out_of_their_repr() -> None:
    with pytest.raises(ValueError, match="protocol must be one of"):
        ServerSettings(protocol="grpc")
    settings = ServerSettings.from_config(compose_config("serve"), "a-token-of-20-chars!")
    assert settings.auth_token == "a-token-of-20-chars!" and "a-token" not in repr(settings)
    assert settings.max_message_bytes == 4 * 2**20 and settings.warm_start == "none"


def test_eval_refuses_a_bad_realtime_block_before_sampler_auto_calibrates(
        eval_cfg, tmp_path, monkeypatch) -> None:
    """realtime.lead_steps is checked against the loaded policy's chunk layout, before the
    calibration of sampler=auto (minutes on a loaded machine) rather than after it."""
    import app.builder
    from app import evaluation

    def no_calibration(*args: object, **kwargs: object) -> None:
        raise AssertionError("sampler=auto calibrated before the realtime block was checked")

    monkeypatch.setattr(app.builder, "choose_auto_sampler", no_calibration)
    cfg = eval_cfg("sampler=auto", "n_envs=1", "realtime.enabled=true", "realtime.lead_steps=99")
    with pytest.raises(ConfigError, match=r"realtime\.lead_steps must be null or in \[1, "):
        evaluation.run_eval(cfg, tmp_path / "run")


def test_serve_refuses_an_env_that_does_not_fit_its_policy() -> None:
    """A server need not name an env, but one named with env=<name> is checked against the
    policy as eval's is (it goes into the metadata, and sampler=auto calibrates on it)."""
    overrides = ["sampler=sequential_ddim16", "device=cpu", "env=pusht_image"]
    spec = PolicySpec.from_config(compose_config("serve", overrides), env_required=False)
    with pytest.raises(ConfigError, match="env pusht_image does not fit the policy in "):
        build_policy(spec, torch.device("cpu"))
