"""Device and precision (components/runtime.py): resolution, the serving environment's override, and the
one-line errors for CUDA asked for where there is none and for a GPU out of memory; the environment of a Ray
cluster of our own."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from components.config import RuntimeConfig, load_config
from components.errors import UserError
from components.runtime import (
    DEVICE_ENV,
    DTYPE_ENV,
    RAY_MIN_FREE_BYTES,
    Runtime,
    out_of_memory,
    own_ray_cluster_environment,
    resolve,
    serving_runtime,
)


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour of a machine without CUDA")


def test_auto_is_cuda_when_present_else_cpu_float32():
    runtime = resolve(load_config("toy").runtime)
    if torch.cuda.is_available():
        assert runtime.device.type == "cuda" and runtime.dtype in (torch.bfloat16, torch.float16)
    else:
        assert runtime == Runtime(torch.device("cpu"), torch.float32)
    assert resolve(load_config("sd15").runtime) == runtime  # no preset pins a device


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                             ("float16", torch.float16)])
def test_explicit_dtype_on_the_cpu(dtype, expected):
    runtime = resolve(RuntimeConfig(device="cpu", dtype=dtype))
    assert runtime.device == torch.device("cpu") and runtime.dtype is expected
    assert runtime.describe() == {"device": "cpu", "dtype": dtype}


@pytest.mark.parametrize("runtime", [{"device": "gpu"}, {"device": "cuda:x"}, {"dtype": "fp8"}])
def test_bad_runtime_settings_fail_at_load_naming_the_key(runtime):
    with pytest.raises(UserError, match=f"runtime.{next(iter(runtime))}"):
        load_config("toy", overrides={"runtime": runtime})


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_a_user_error(device):
    with pytest.raises(UserError, match="no CUDA device; use --device cpu"):
        resolve(RuntimeConfig(device=device))


@no_cuda
@pytest.mark.parametrize("command", [
    ["check-base", "--preset", "smoke"],
    ["baseline", "lora", "--preset", "smoke", "--image", "missing.png", "--prompt", "S*"],
    ["serve", "--preset", "smoke", "--model", "models:/datencoder@champion"],
    ["evaluate", "--preset", "smoke"],
    ["register", "--preset", "smoke", "--encoder", "models/toy-encoder"],
])
def test_cli_device_cuda_without_a_gpu_is_one_line_exit_2(command, capsys, tmp_path, monkeypatch):
    from components.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/none.db")
    code = main([*command, "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"datencoder {command[0]}: error: runtime.device cuda: this machine has no CUDA device")


def test_serving_runtime_comes_from_the_environment_not_the_registered_config(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    assert serving_runtime() == RuntimeConfig()  # auto: the serving machine decides
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    monkeypatch.setenv(DTYPE_ENV, "bfloat16")
    assert serving_runtime() == RuntimeConfig(device="cpu", dtype="bfloat16")
    assert serving_runtime({"dtype": "float32"}) == RuntimeConfig(device="cpu", dtype="float32")
    # the logged model_config's own values (auto) leave the environment's in place
    assert serving_runtime({"device": "auto", "dtype": "auto"}).dtype == "bfloat16"
    monkeypatch.setenv(DEVICE_ENV, "tpu")
    with pytest.raises(UserError, match="DATENCODER_DEVICE"):
        serving_runtime()


def test_serve_passes_the_runtime_to_the_served_model_environment():
    from components.runtime import runtime_environment

    assert runtime_environment(RuntimeConfig(device="cpu")) == {DEVICE_ENV: "cpu"}  # auto keeps the environment's
    assert runtime_environment(RuntimeConfig(device="cuda:1", dtype="float16")) == {DEVICE_ENV: "cuda:1",
                                                                                    DTYPE_ENV: "float16"}


def test_gpu_out_of_memory_is_one_line_naming_what_to_lower(capsys, monkeypatch):
    from components import cli
    from components.evaluation import check_base

    error = out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert isinstance(error, UserError) and error.exit_code == 2
    assert all(word in str(error) for word in ("personalize.views", "gradient_checkpointing", "--dtype"))
    assert out_of_memory(RuntimeError("other")) is None

    def runs_out(*args, **kwargs):  # a real OOM needs a GPU; the CLI's handling of one does not
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(check_base, "check_base", runs_out)
    assert cli.main(["check-base", "--preset", "smoke"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"datencoder check-base: error: {error}"]


def test_own_ray_cluster_counts_its_disk_full_by_free_bytes_and_the_user_wins(monkeypatch, tmp_path):
    for name in ("RAY_local_fs_capacity_threshold", "RAY_worker_niceness"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "not" / "made" / "yet"))  # measured on the nearest parent
    own_ray_cluster_environment()
    threshold = float(os.environ["RAY_local_fs_capacity_threshold"])
    total = shutil.disk_usage(tmp_path).total
    assert 0.95 <= threshold <= 0.999
    if RAY_MIN_FREE_BYTES / total < 0.05 and total > 1000 * 2**30 / 999:  # neither clamp applies on this disk
        # a disk with 1 GiB more than the minimum free is not full (CI's: 6 GB free of 252 GB, 97.6% used) ...
        assert 1 - (RAY_MIN_FREE_BYTES + 2**30) / total < threshold
        # ... and one with less than the minimum free is
        assert 1 - (RAY_MIN_FREE_BYTES - 2**20) / total > threshold
    assert os.environ["RAY_worker_niceness"] == "0"
    monkeypatch.setenv("RAY_local_fs_capacity_threshold", "0.5")
    own_ray_cluster_environment()
    assert os.environ["RAY_local_fs_capacity_threshold"] == "0.5"
