"""How the denoiser runs: eager PyTorch, onnxruntime, torch.compile or CUDA graphs.

A runtime is a callable `(x (N, H, Da), t (N,) long, cond (N, Dc)) -> eps (N, H, Da)` over a
policy's ConditionalUnet1D, exact against eager PyTorch in float32 (tested on a tiny model);
`DiffusionPolicy.use_runtime(kind)` puts one under every sampler (sequential, Picard and the
base model's calls in PCM sampling), so the chunk is the same and only the time changes. Which
one is fastest depends on the shape of the call (rows per call, device), so it is measured, not
assumed: `bench/latency.py`.

- `eager`: the module under `torch.inference_mode`; `precision="bfloat16"/"float16"` runs it
  under autocast (never on by default; its exact_err against float32 is what to report).
- `onnxruntime`: the UNet exported once with `torch.onnx.export` (a dynamic row axis) and cached
  on disk under a key of the weights' fingerprint, the shapes, opset and versions, so new
  weights never reuse an old export; run by onnxruntime's CPU provider with torch's thread count.
- `compile`: `torch.compile(dynamic=True)`; the first calls pay the compilation.
- `cuda_graph`: one CUDA graph per row bucket (powers of two up to `max_rows`), captured on first
  use; a call is padded to its bucket (rows are independent in the UNet: GroupNorm and convs
  act per row), replayed, and the real rows returned. Needs CUDA.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

RUNTIMES = ("eager", "onnxruntime", "compile", "cuda_graph")
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
ONNX_OPSET = 17
DEFAULT_CACHE = Path(os.environ.get("PICARD_CACHE", "~/.cache/picard-policy")).expanduser()

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RuntimeUnavailable(RuntimeError):
    """A runtime that this machine cannot run (a missing package, no CUDA)."""


class EagerRuntime:
    """The module itself, under inference_mode (and autocast for a reduced `precision`); the
    only runtime that can differentiate the denoiser (when the caller enables gradients)."""

    name = "eager"

    def __init__(self, model: nn.Module, precision: str = "float32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}; got {precision!r}")
        self.model = model
        self.precision = precision

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # inference mode unless the caller records gradients (inpainting guidance takes a
        # vector-Jacobian product through the denoiser: picard_sampler.inpaint)
        with torch.inference_mode(not torch.is_grad_enabled()):
            dtype = PRECISIONS[self.precision]
            if dtype is None:
                return self.model(x, t, cond)
            with torch.autocast(device_type=x.device.type, dtype=dtype):
                return self.model(x, t, cond).float()


def export_key(model: nn.Module, horizon: int) -> str:
    """What an ONNX export depends on: the weights (names, dtypes, bytes), the input shapes,
    the opset and the torch / onnxruntime versions."""
    from policy.file_io import weights_fingerprint

    digest = hashlib.sha256(weights_fingerprint(model.state_dict()).encode())
    dims = (model.input_dim, model.global_cond_dim, horizon, ONNX_OPSET, torch.__version__,
            _onnxruntime().__version__)
    digest.update(repr(dims).encode())
    return digest.hexdigest()[:24]


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise RuntimeUnavailable(
            "runtime=onnxruntime needs onnxruntime and onnx: pip install 'picard-policy[runtime]'"
        ) from e
    return onnxruntime


def export_onnx(model: nn.Module, horizon: int, path: Path, rows: int | None = None) -> Path:
    """Export the UNet to `path` (atomically) with a dynamic row axis, or for exactly `rows`
    rows per call (bench/denoiser_call.py compares the two)."""
    from policy.file_io import atomic_write

    model = model.eval()
    n = 2 if rows is None else rows
    example = (torch.zeros(n, horizon, model.input_dim), torch.zeros(n, dtype=torch.long),
               torch.zeros(n, model.global_cond_dim))
    row_axis = {0: "rows"}
    dynamic_axes = None if rows is not None else {
        "sample": row_axis, "timestep": row_axis, "global_cond": row_axis, "eps": row_axis}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.export")
    try:
        with warnings.catch_warnings():
            # the tracer warns about a GroupNorm size check that is constant for this model
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                model, example, str(tmp), input_names=["sample", "timestep", "global_cond"],
                output_names=["eps"], dynamic_axes=dynamic_axes, opset_version=ONNX_OPSET,
                dynamo=False,
            )
        data = tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    return atomic_write(path, lambda f: f.write(data))


def onnx_session(path: Path, spinning: bool = False) -> Any:
    """An onnxruntime CPU session on the model at `path`, with torch's thread count."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # By default no busy-waiting between calls: spinning threads steal the cores from the envs
    # and from any PyTorch work beside it (a run that alternated the two was 10x slower).
    # `spinning=True` lets them spin: faster calls when ORT has the cores alone.
    options.add_session_config_entry("session.intra_op.allow_spinning",
                                     "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxRuntime:
    """The UNet exported once (cached on disk by `export_key`) and run by onnxruntime."""

    name = "onnxruntime"

    def __init__(self, model: nn.Module, horizon: int, cache_dir: Path | None = None,
                 spinning: bool = False):
        cache_dir = Path(cache_dir or DEFAULT_CACHE).expanduser()
        # export_key needs onnxruntime's version: no onnxruntime, RuntimeUnavailable here
        self.path = cache_dir / "onnx" / f"unet_{export_key(model, horizon)}.onnx"
        self.exported = not self.path.is_file()
        if self.exported:
            export_onnx(model, horizon, self.path)
        self.session = onnx_session(self.path, spinning)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {
            "sample": x.detach().cpu().float().contiguous().numpy(),
            "timestep": t.detach().cpu().long().contiguous().numpy(),
            "global_cond": cond.detach().cpu().float().contiguous().numpy(),
        })[0]
        return torch.from_numpy(out).to(x.device)


class CompiledRuntime:
    """torch.compile of the UNet (dynamic shapes: windows change their row count)."""

    name = "compile"

    def __init__(self, model: nn.Module):
        self.compiled = torch.compile(model, dynamic=True)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.compiled(x, t, cond)


def row_bucket(rows: int, max_rows: int) -> int:
    """The smallest power of two >= rows (at most max_rows): the padded shape of a call."""
    if rows < 1:
        raise ValueError(f"a denoiser call needs at least one row; got {rows}")
    bucket = 1
    while bucket < rows:
        bucket *= 2
    return min(bucket, max_rows) if rows <= max_rows else rows


def pad_rows(tensors: tuple[torch.Tensor, ...], rows: int) -> tuple[torch.Tensor, ...]:
    """Each tensor padded along dim 0 to `rows` by repeating its first row (a valid input, so
    the padding cannot produce NaN); the real rows are unchanged."""
    padded = []
    for tensor in tensors:
        extra = rows - tensor.shape[0]
        if extra < 0:
            raise ValueError(f"cannot pad {tensor.shape[0]} rows down to {rows}")
        filler = tensor[:1].expand(extra, *tensor.shape[1:])
        padded.append(torch.cat([tensor, filler]) if extra else tensor)
    return tuple(padded)


class CudaGraphRuntime:
    """One captured CUDA graph per row bucket; calls are padded to their bucket and replayed.
    Calls with more than `max_rows` rows run eagerly."""

    name = "cuda_graph"

    def __init__(self, model: nn.Module, horizon: int, max_rows: int = 1024):
        if not torch.cuda.is_available():
            raise RuntimeUnavailable("runtime=cuda_graph needs a CUDA device; use device=cuda "
                                     "on a GPU machine, or another runtime")
        self.model = model
        self.horizon = horizon
        self.max_rows = max_rows
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...],
                                     torch.Tensor]] = {}

    def _capture(self, rows: int, device: torch.device) -> tuple[Any, tuple, torch.Tensor]:
        inputs = (torch.zeros(rows, self.horizon, self.model.input_dim, device=device),
                  torch.zeros(rows, dtype=torch.long, device=device),
                  torch.zeros(rows, self.model.global_cond_dim, device=device))
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up: allocator and kernels settle before capture
                self.model(*inputs)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            output = self.model(*inputs)
        return graph, inputs, output

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows > self.max_rows:
            with torch.inference_mode():
                return self.model(x, t, cond)
        bucket = row_bucket(rows, self.max_rows)
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket, x.device)
        graph, inputs, output = self.graphs[bucket]
        for static, value in zip(inputs, pad_rows((x, t, cond), bucket), strict=True):
            static.copy_(value)
        graph.replay()
        return output[:rows].clone()


def make_runtime(
    model: nn.Module, kind: str = "eager", horizon: int = 16, precision: str = "float32",
    cache_dir: Path | None = None, max_rows: int = 1024, spinning: bool = False,
) -> Denoiser:
    """The runtime `kind` (RUNTIMES) over `model`; RuntimeUnavailable if this machine lacks
    what it needs, ValueError for an unknown kind or precision."""
    if kind not in RUNTIMES:
        raise ValueError(f"runtime must be one of {list(RUNTIMES)}; got {kind!r}")
    if precision != "float32" and kind != "eager":
        raise ValueError(f"precision={precision} is supported with runtime=eager only")
    if not isinstance(spinning, bool) or (spinning and kind != "onnxruntime"):
        raise ValueError(f"spinning must be true or false, and true only with onnxruntime; "
                         f"got {spinning!r} for {kind}")
    if kind == "eager":
        return EagerRuntime(model, precision)
    if kind == "onnxruntime":
        return OnnxRuntime(model, horizon, cache_dir, spinning)
    if kind == "compile":
        return CompiledRuntime(model)
    return CudaGraphRuntime(model, horizon, max_rows)
