"""The `pretrain` stage: distributed encoder pre-training on Ray Train (docs/pretrain.md).

    pretrain(cfg, workers=2, max_steps=1000) -> report

The driver checks everything a user can get wrong (one clear line each, before any worker starts),
connects to Ray (a local cluster, or --address / RAY_ADDRESS), opens the MLflow run (config, data
set, tags), runs `components.training.loop.worker_loop` on N workers with DDP, then copies the final
encoder out of the last checkpoint to `personalize.encoder` and logs it as an artifact.

Replacing: `personalize.encoder` gets a `recipe.json` (the run name below). An encoder there from another recipe
(or, without that file, another encoder config) is never replaced unless `force` (`--force`) says so,
so a quick smoke run cannot overwrite the toy encoder; each preset also writes to its own place.

Resuming: checkpoints live under <storage>/<run name>, and the run name is a hash of what decides
what is learned (base, encoder, data version, optimiser recipe) but not of how long or where it
runs. The same command with a larger --max-steps therefore continues from the last checkpoint, as
does Ray after a worker dies (FailureConfig.max_failures); a changed recipe starts a new run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow
import pyarrow.fs

from components import home, tracking
from components.config import BaseConfig, Config, EncoderConfig, PretrainConfig, S3Config, TrainingConfig, resolved
from components.data.prepare import data_version
from components.errors import UserError
from components.model.base import _is_local, base_fingerprint
from components.model.placeholder import PLACEHOLDER
from components.runtime import own_ray_cluster_environment
from components.training.loop import train_rows, worker_loop


os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # before ray.train is imported anywhere in this process

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.json"  # in personalize.encoder: the run name of the recipe that trained the encoder there

# pretrain fields that change what is learned; the others (duration, placement, logging) may change on resume
RECIPE = ("batch_size", "lr", "warmup_steps", "weight_decay", "grad_clip", "seed", "templates", "describe_scene",
          "prompts", "label_prompts", "timestep_sampling", "encoder_noise")


def pretrain(cfg: Config, workers: int | None = None, max_steps: int | None = None,
             checkpoint_every: int | None = None, storage: str | None = None, address: str | None = None,
             parent_run_id: str | None = None, restart: bool = False, force: bool = False) -> dict[str, Any]:
    """Pre-train the encoder; returns the report (also what `datencoder pretrain --json` prints).
    Arguments given here override cfg.pretrain; `restart` discards this run's checkpoints first;
    `force` replaces an encoder in personalize.encoder that was trained under another recipe."""
    given = {"workers": workers, "max_steps": max_steps, "checkpoint_every": checkpoint_every, "storage": storage}
    cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(
        update={k: v for k, v in given.items() if v is not None})})
    training, p = cfg.training, cfg.pretrain
    check_recipe(p, cfg.base)
    manifest = read_manifest(training.data, p.workers)

    version = data_version(training.data)
    name = run_name(training, version)
    out = Path(training.out)
    if home.holds(out) and not Path.cwd().resolve().is_relative_to(home.home()):
        # the default names the committed encoder, read from the home anywhere; it is rewritten only from there
        raise UserError(f"personalize.encoder is the committed encoder in the project home ({out}); outside the "
                        f"checkout, pretrain writes where it is told: set personalize.encoder (--config, or "
                        f"DATENCODER_PERSONALIZE__ENCODER)")
    if not force:
        check_replaceable(out, cfg.encoder, cfg.preset, name)
    filesystem, root = storage_filesystem(p.storage, p.s3)
    check_writable(filesystem, f"{root}/{name}", p.storage, discard=restart)

    with contextlib.redirect_stdout(sys.stderr):  # Ray echoes worker output: keep stdout for the report
        started_ray = connect(address)
        try:
            return train_on_ray(training, resolved(cfg), manifest, version, name, (filesystem, root), parent_run_id)
        finally:
            if started_ray:
                import ray  # ray: only when training runs, after RAY_TRAIN_V2_ENABLED is set above

                ray.shutdown()


def train_on_ray(training: TrainingConfig, params: dict, manifest: pd.DataFrame, version: str, name: str,
                 storage: tuple[Any, str], parent_run_id: str | None) -> dict[str, Any]:
    """Train on the Ray cluster this process is connected to, logged to an MLflow run with `params` (the resolved
    config) under run name `name`, checkpoints in `storage` (`storage_filesystem`'s pair); the encoder is copied
    to `training.out`. Returns pretrain's report."""
    # ray: only when training runs, after RAY_TRAIN_V2_ENABLED is set above
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer


    p, (filesystem, root) = training.pretrain, storage
    log_level = chatter_level()  # third-party lines in Ray's processes, as on the CLI
    use_gpu = p.use_gpu if p.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= p.workers
    tags = {"data_version": version, "preset": training.preset, "stage": "pretrain"}
    with tracking.run(p.experiment, name, tags, parent_run_id, params=params) as (client, run_id):
        tracking.log_dataset(client, run_id, train_rows(manifest),
                             source=str(Path(training.data, "manifest.parquet").resolve()),
                             name=Path(training.data).name, digest=version)

        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={"config": training.model_dump(), "project_dir": os.getcwd(),
                               "tracking_uri": client.tracking_uri, "run_id": run_id,
                               "log_level": log_level},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=p.workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": p.cpus_per_worker,
                                                               **({"GPU": 1} if use_gpu else {})}),
            run_config=RunConfig(name=name, storage_path=root, storage_filesystem=filesystem,
                                 failure_config=FailureConfig(max_failures=p.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=p.keep_checkpoints),
                                 # Ray Train's own lines (worker group started, each checkpoint reported)
                                 logging_config=LoggingConfig(log_level=log_level)))
        t0 = time.perf_counter()
        try:
            result = interruptible(trainer.fit)
        except Exception as e:
            error = user_error_in(e)
            if error is None or error is e:
                raise
            raise error from e  # a worker's UserError, so the CLI prints it as one line
        wall = time.perf_counter() - t0

        # the final checkpoint's metrics are the run's summary (an earlier invocation's when nothing was left to do)
        summary = result.metrics
        out = Path(training.out)
        with result.checkpoint.as_directory() as directory:
            staging = out.with_name(out.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(Path(directory) / "encoder", staging)
        (staging / RECIPE_FILE).write_text(json.dumps({"run_name": name, "preset": training.preset}, indent=1) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        client.log_artifacts(run_id, str(out), "encoder")
    # rank 0 logs the step each attempt started from: the first is this run's start, the rest are recoveries
    starts = [int(m.value) for m in sorted(client.get_metric_history(run_id, "start_step"), key=lambda m: m.timestamp)]
    trained = summary["step"] - starts[0]
    return {
        "start_step": starts[0],
        "end_step": summary["step"],
        "restarts": len(starts) - 1,
        "workers": p.workers,
        "nodes": len(set(summary["nodes"])),
        "use_gpu": use_gpu,
        "checkpoint": ("s3://" if p.storage.startswith("s3://") else "") + result.checkpoint.path,
        "out": str(out),
        "run_name": name,
        "mlflow_run_id": run_id,
        "data_version": version,
        "samples_per_s": summary["samples_per_s"] if trained > 0 else None,  # steady state: steps after the first
        "end_to_end_samples_per_s": p.batch_size * trained / wall,  # including start-up, evaluation, checkpoints
        "wall_s": round(wall, 1),
        "peak_memory_mb": summary["peak_memory_mb"],
        "heldout_loss": summary["heldout"],
        "identity_loss": summary.get("identity", {}),
    }


# --- what the driver checks before any worker starts ---------------------------------------------
def check_recipe(p: PretrainConfig, base: BaseConfig) -> None:
    """What a user can get wrong in the recipe and the base, one clear line each, before any worker starts."""
    if p.batch_size % (p.workers * p.grad_accum):
        raise UserError(f"pretrain.batch_size {p.batch_size} is not divisible by workers x grad_accum "
                        f"({p.workers} x {p.grad_accum})")
    for key in ("prompts", "sample_prompts"):
        prompts = getattr(p, key)
        if not prompts or any(PLACEHOLDER not in prompt for prompt in prompts):
            raise UserError(f"pretrain.{key} must be non-empty and each contain {PLACEHOLDER}; got {prompts!r}")
    if _is_local(base) and not (Path(base.pretrained) / "model_index.json").is_file():
        raise UserError(f"base model not found at {base.pretrained} (no model_index.json); run "
                        f"`datencoder bootstrap` (toy) or set base.pretrained")


def check_replaceable(out: Path, encoder_config: EncoderConfig, preset: str, name: str) -> None:
    """A UserError when `out` holds an encoder trained under another recipe than this run's (`name`):
    told by its recipe.json, or for an encoder without one by its config.json's encoder section."""
    if not (out / "config.json").is_file():
        return
    try:
        recipe = json.loads((out / RECIPE_FILE).read_text())["run_name"] if (out / RECIPE_FILE).is_file() else None
        encoder = json.loads((out / "config.json").read_text()).get("encoder")
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise UserError(f"{out} holds an encoder whose recipe cannot be read ({e}); "
                        "pass --force to replace it") from None
    same = recipe == name if recipe is not None else encoder == encoder_config.model_dump()
    if not same:
        what = f"run {recipe}" if recipe else "another encoder config"
        raise UserError(f"{out} holds an encoder trained under {what}, not this {preset} recipe ({name}); "
                        f"set personalize.encoder to another place, or pass --force to replace it")


def read_manifest(data: str, workers: int) -> pd.DataFrame:
    path = Path(data) / "manifest.parquet"
    try:
        manifest = pd.read_parquet(path)
    except FileNotFoundError:
        raise UserError(f"no prepared data at {path}: run `datencoder prepare` (or `dvc repro prepare`)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read manifest {path}: {str(e).splitlines()[0]}") from None
    train = int((manifest["split"] == "train").sum()) if "split" in manifest else 0
    if train < workers:
        raise UserError(f"manifest {path} has {train} training rows, fewer than the {workers} workers; "
                        f"prepare more data (`datencoder prepare`)")
    return manifest


def run_name(training: TrainingConfig, data_version: str) -> str:
    """`encoder-<hash>` of what decides what is learned: base, encoder, data version and the RECIPE fields."""
    # the weights' fingerprint, not only their path: a base re-bootstrapped in place must not resume
    # (or, in evaluate/ablate, reuse) an encoder trained on the old one
    recipe = {"base": training.base.model_dump(), "base_weights": base_fingerprint(training.base),
              "encoder": training.encoder.model_dump(), "data": data_version,
              "pretrain": {k: getattr(training.pretrain, k) for k in RECIPE}}
    return "encoder-" + hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def storage_filesystem(storage: str, s3: S3Config):
    """(pyarrow filesystem, path inside it) for a local path or s3://bucket/prefix. S3 credentials come
    from the environment in every process and are never passed around or logged."""
    if storage.startswith("s3://"):
        endpoint = s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint, anonymous=s3.unsigned,
                                     region=s3.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                                     connect_timeout=s3.timeout_s, request_timeout=s3.timeout_s)
        return fs, storage[len("s3://"):].rstrip("/")
    return pyarrow.fs.LocalFileSystem(), str(Path(storage).resolve())


def check_writable(fs, path: str, storage: str, discard: bool) -> None:
    probe = f"{path}/.write-probe"
    try:
        if discard:
            fs.delete_dir_contents(path, missing_dir_ok=True)
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except (OSError, pyarrow.ArrowException) as e:
        raise UserError(f"checkpoint storage {storage} is not writable: {str(e).splitlines()[0]}") from None


def connect(address: str | None) -> bool:
    """Connect to the Ray cluster at `address` (or RAY_ADDRESS), else start a local one. Returns
    whether this call started Ray (then the caller shuts it down)."""
    import ray  # ray: only when training runs, after RAY_TRAIN_V2_ENABLED is set above

    if ray.is_initialized():  # e.g. a Prefect task or a test that connected already
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "auto":
        host_port = address.split("://", 1)[-1].rstrip("/")
        host, _, port = host_port.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise UserError(f"Ray cluster at {address} is unreachable ({getattr(e, 'strerror', None) or e}); "
                            f"start one with `ray start --head` or fix --address / RAY_ADDRESS") from None
    if not address:
        own_ray_cluster_environment()
        # one node that no autoscaler drains: Ray Train's preemption watcher has nothing to watch, and its actor
        # logs an error line at every start (ray-project/ray#53727)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ctrl-C and SIGTERM keep the meaning the caller gave them (the CLI's clean stop, Prefect's crash report):
    # ray.init replaces the SIGTERM handler with sys.exit, and Ray's C++ failure handler aborts the process
    # on a SIGTERM that arrives while the driver waits in Ray
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    on_sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    for attempt in (1, 2):
        try:
            if address:
                ray.init(address=address, logging_level=logging.WARNING)
            else:
                start_own_cluster()
            if on_sigterm is not None:
                signal.signal(signal.SIGTERM, on_sigterm)
            return True
        except Exception as e:  # noqa: BLE001 - Ray raises bare Exceptions for start-up timeouts
            if address:
                raise UserError(f"cannot connect to the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
            if attempt == 2:  # a local start can time out on an overloaded machine; once more, then give up
                raise UserError(f"cannot start a local Ray cluster: {str(e).splitlines()[0]}") from None
            log.warning("starting a local Ray cluster failed (%s); retrying", str(e).splitlines()[0])
    return True


def chatter_level() -> str:
    """The level for third-party logs in Ray's processes: the CLI's (WARNING, INFO with --verbose)."""
    return "INFO" if logging.getLogger().isEnabledFor(logging.INFO) else "WARNING"


def start_own_cluster() -> None:
    """A new local Ray cluster for this command (`address="local"`: never one that `ray start` left on the
    machine) whose processes know its dashboard. Ray Train's placement-group cleaner asks the state API for
    "the" cluster: RAY_API_SERVER_ADDRESS, else the latest `ray start` cluster, else any on the machine, which
    on a shared machine with several is an error."""
    import ray  # ray: only when training runs, after RAY_TRAIN_V2_ENABLED is set above

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # inherited as the cluster's processes start
    try:
        ray.init(address="local", dashboard_port=port, logging_level=logging.WARNING)
    finally:
        if before is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS")
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = before


def interruptible(fn):
    """fn() in a thread while the main thread waits: Python runs signal handlers only in the main thread, between
    bytecodes, and a driver blocked in a Ray call would never see Ctrl-C or SIGTERM. The interrupt is raised here;
    the caller's clean-up (ray.shutdown) ends the work fn was waiting on."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread as is
            outcome["error"] = e

    thread = threading.Thread(target=target, name=getattr(fn, "__qualname__", "ray-call"), daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def user_error_in(error: BaseException) -> UserError | None:
    """A UserError that a worker raised (e.g. missing CLIP weights), so the CLI prints it as one line."""
    for e in [error, *getattr(error, "worker_failures", {}).values()]:
        for candidate in (e, getattr(e, "cause", None)):  # Ray wraps a worker's exception as .cause
            if isinstance(candidate, UserError):
                return candidate
    return None
