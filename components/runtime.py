"""Where the base model runs and in what precision: the one resolver every stage that loads it uses.

    runtime = resolve(cfg.runtime)          # Runtime(device=device('cpu'), dtype=torch.float32) on a CPU machine
    pipe = load_pipeline(cfg.base, runtime)

`runtime.device`: auto (CUDA when present, else the CPU), cpu, cuda or cuda:N. `runtime.dtype`: auto (float32
on the CPU, bfloat16 on a GPU that has it, else float16), float32, bfloat16 or float16. The dtype is the frozen
base's (UNet, VAE, text encoder), so sampling runs in it; what is trained or tuned (the encoder, v* and the
LoRA factors, their optimiser) stays float32, and the CLIP towers stay float32 (they see float32 pixels).

A served model runs where it is served, not where it was registered: `serving_runtime` gives it the
runtime of the environment (DATENCODER_DEVICE, DATENCODER_DTYPE), else auto.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from components.config import RuntimeConfig
from components.errors import UserError


DEVICE_ENV = "DATENCODER_DEVICE"
DTYPE_ENV = "DATENCODER_DTYPE"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RAY_MIN_FREE_BYTES = 2 * 1024**3  # a Ray cluster of our own counts its disk full when less than this is left


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype

    def describe(self) -> dict[str, str]:
        """For reports: {"device": "cuda:0", "dtype": "bfloat16"}."""
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}


CPU = Runtime(torch.device("cpu"), torch.float32)  # what `auto` is on a machine without CUDA


def resolve(settings: RuntimeConfig) -> Runtime:
    """The device and dtype `settings` ask for on this machine; CUDA asked for where there is none is a UserError."""
    if settings.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(settings.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"runtime.device {settings.device}: this machine has no CUDA device; "
                            f"use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"runtime.device {settings.device}: this machine has {count} CUDA device(s), "
                            f"cuda:0 to cuda:{count - 1}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    if settings.dtype != "auto":
        return Runtime(device, DTYPES[settings.dtype])
    if device.type == "cpu":
        return Runtime(device, torch.float32)
    return Runtime(device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def runtime_environment(runtime: RuntimeConfig) -> dict[str, str]:
    """DATENCODER_DEVICE / DATENCODER_DTYPE for a served model (`serving_runtime` reads them): `runtime`'s settings
    other than auto; auto keeps the environment's, else the serving machine decides."""
    return {name: value for name, value in ((DEVICE_ENV, runtime.device), (DTYPE_ENV, runtime.dtype))
            if value != "auto"}


def serving_runtime(given: dict | None = None) -> RuntimeConfig:
    """The runtime of the machine that serves a model: DATENCODER_DEVICE / DATENCODER_DTYPE, else auto; `given`
    ({"device": ..., "dtype": ...}, e.g. a pyfunc's model_config) wins over the environment where it is not auto."""
    values = {"device": os.environ.get(DEVICE_ENV) or "auto", "dtype": os.environ.get(DTYPE_ENV) or "auto"}
    values.update({k: v for k, v in (given or {}).items() if k in values and v not in (None, "auto")})
    try:
        runtime = RuntimeConfig.model_validate(values)
    except ValidationError as e:
        problem = e.errors()[0]
        raise UserError(f"runtime {problem['loc'][0]} {problem['input']!r} ({DEVICE_ENV}/{DTYPE_ENV} or the "
                        f"model config): {problem['msg']}") from None
    return runtime


def own_ray_cluster_environment() -> None:
    """Environment for a Ray cluster this process starts for itself (never one it joins); its processes inherit
    it, and a value the user set wins:
    - its workers are the work, so they do not get Ray's default niceness (15), which starves them behind any
      other process on a shared machine;
    - its disk is full when less than RAY_MIN_FREE_BYTES is left, not at Ray's 95% of the capacity: on a large
      disk that is still gigabytes free, and Ray logs an error line every 10 s for it."""
    os.environ.setdefault("RAY_worker_niceness", "0")
    temp = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir())
    while not temp.exists():
        temp = temp.parent
    capacity = shutil.disk_usage(temp).total
    threshold = min(0.999, max(0.95, 1 - RAY_MIN_FREE_BYTES / capacity)) if capacity else 0.95
    os.environ.setdefault("RAY_local_fs_capacity_threshold", str(threshold))


def out_of_memory(error: BaseException) -> UserError | None:
    """A GPU out-of-memory error as one line naming what to lower; None for any other error."""
    if not isinstance(error, torch.OutOfMemoryError):
        return None
    return UserError("the GPU ran out of memory; lower personalize.views, turn on base.gradient_checkpointing, "
                     "use a smaller --dtype (bfloat16 or float16), or fewer --num-images / pretrain batch")

