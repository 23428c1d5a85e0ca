"""Denoiser runtimes: exact against eager PyTorch, cached exports, padded CUDA-graph calls."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from picard_sampler import DDIMSchedule, DDPMSchedule, Sampler, exact_errors
from picard_sampler.samplers import _FiniteGuard
from policy.runtime import (
    CudaGraphRuntime,
    OnnxRuntime,
    RuntimeUnavailable,
    make_runtime,
    pad_rows,
    row_bucket,
)
from policy.unet import ConditionalUnet1D

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
H, DA, DC = 16, 2, 8


def tiny_unet(seed: int = 0) -> ConditionalUnet1D:
    torch.manual_seed(seed)
    return ConditionalUnet1D(DA, DC, down_dims=(16, 32), n_groups=4,
                             diffusion_step_embed_dim=16).eval()


def inputs(rows: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, H, DA, generator=g), torch.randint(0, 100, (rows,), generator=g),
            torch.randn(rows, DC, generator=g))


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime not installed")
@pytest.mark.parametrize("rows", [1, 7, 48])
@pytest.mark.parametrize("spinning", [False, True])
def test_onnxruntime_matches_eager(tmp_path, rows: int, spinning: bool) -> None:
    model = tiny_unet()
    runtime = make_runtime(model, "onnxruntime", horizon=H, cache_dir=tmp_path,
                           spinning=spinning)
    x, t, c = inputs(rows)
    with torch.no_grad():
        torch.testing.assert_close(runtime(x, t, c), model(x, t, c), rtol=0, atol=1e-5)


def test_spinning_is_an_onnxruntime_option_only() -> None:
    with pytest.raises(ValueError, match="true only with onnxruntime"):
        make_runtime(tiny_unet(), "eager", horizon=H, spinning=True)


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime not installed")
def test_onnx_exports_are_reused_and_invalidated_by_new_weights(tmp_path) -> None:
    model = tiny_unet()
    first = OnnxRuntime(model, H, tmp_path)
    again = OnnxRuntime(model, H, tmp_path)
    assert first.exported and not again.exported and again.path == first.path
    with torch.no_grad():
        model.final[1].bias.add_(0.5)  # new weights: a new export, never the stale one
    changed = OnnxRuntime(model, H, tmp_path)
    assert changed.exported and changed.path != first.path
    x, t, c = inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(changed(x, t, c), model(x, t, c), rtol=0, atol=1e-5)
    assert not list((tmp_path / "onnx").glob(".*"))  # no temporary export left behind


def test_a_missing_runtime_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(RuntimeUnavailable, match=r"pip install 'picard-policy\[runtime\]'"):
        make_runtime(tiny_unet(), "onnxruntime", horizon=H)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeUnavailable, match="needs a CUDA device"):
            make_runtime(tiny_unet(), "cuda_graph", horizon=H)
    with pytest.raises(ValueError, match="runtime must be one of"):
        make_runtime(tiny_unet(), "tensorrt", horizon=H)
    with pytest.raises(ValueError, match="precision=bfloat16 is supported with runtime=eager"):
        make_runtime(tiny_unet(), "onnxruntime", horizon=H, precision="bfloat16")


def test_row_buckets_and_padding_keep_the_real_rows() -> None:
    """The padding a CUDA graph call uses, on the CPU: rows are independent in the UNet, so the
    real rows of a padded call equal the unpadded call."""
    assert [row_bucket(n, 64) for n in (1, 2, 3, 16, 17, 64)] == [1, 2, 4, 16, 32, 64]
    assert row_bucket(100, 64) == 100  # above the largest bucket: not padded (runs eagerly)
    model = tiny_unet()
    x, t, c = inputs(5)
    padded = pad_rows((x, t, c), row_bucket(5, 64))
    assert padded[0].shape[0] == 8 and torch.equal(padded[1][5:], t[:1].expand(3))
    with torch.no_grad():
        torch.testing.assert_close(model(*padded)[:5], model(x, t, c), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="cannot pad 5 rows down to 4"):
        pad_rows((x,), 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_calls_equal_eager_ones_at_every_row_count() -> None:
    model = tiny_unet().cuda()
    runtime = CudaGraphRuntime(model, H, max_rows=64)
    for rows in (1, 3, 16, 37, 100):
        x, t, c = (v.cuda() for v in inputs(rows, seed=rows))
        with torch.no_grad():
            torch.testing.assert_close(runtime(x, t, c), model(x, t, c), rtol=0, atol=1e-5)
    assert sorted(runtime.graphs) == [1, 4, 16, 64]


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime not installed")
@pytest.mark.parametrize("method", ["sequential", "picard"])
@pytest.mark.parametrize("schedule", [DDPMSchedule(num_inference_steps=20),
                                      DDIMSchedule(num_inference_steps=8)], ids=["ddpm", "ddim"])
def test_a_policy_on_onnxruntime_samples_the_eager_chunk(tiny_checkpoint, tmp_path, method,
                                                         schedule) -> None:
    from policy import load_policy

    policy = load_policy(tiny_checkpoint)
    sampler = Sampler(schedule, method=method, tol=1e-3)
    obs = torch.from_numpy(np.random.default_rng(0).uniform(0, 512, (3, 2, 20))).float()
    noise = torch.randn(sampler.noise_shape(3, policy.horizon, policy.action_dim))
    _, eager = policy.predict_action(obs, sampler, noise=noise)
    policy.use_runtime("onnxruntime", cache_dir=tmp_path)
    assert policy.runtime == "onnxruntime"
    _, onnx = policy.predict_action(obs, sampler, noise=noise)
    assert exact_errors(onnx.sample, eager.sample).max() <= 1e-4
    policy.use_runtime("eager")
    assert policy.runtime == "eager"


def test_deferred_finiteness_check_names_the_timesteps() -> None:
    """On an accelerator the sampler checks its denoiser outputs once per call; the error still
    names the timesteps (the deferral itself is exercised here with CPU tensors)."""
    guard = _FiniteGuard()
    guard.pending.append((torch.tensor([True, False]), torch.tensor([90, 80])))
    guard.pending.append((torch.tensor([True]), torch.tensor([70])))
    with pytest.raises(ValueError, match=r"NaN or inf at training timesteps \[80\]"):
        guard.check()


@pytest.mark.slow
def test_torch_compile_matches_eager_across_row_counts() -> None:
    """runtime=compile (dynamic shapes): one compilation (~45 s on 2 CPU cores), then any row
    count, exact against eager."""
    model = tiny_unet()
    runtime = make_runtime(model, "compile", horizon=H)
    for rows in (5, 9):
        x, t, c = inputs(rows, seed=rows)
        with torch.no_grad():
            torch.testing.assert_close(runtime(x, t, c), model(x, t, c), rtol=0, atol=1e-5)
