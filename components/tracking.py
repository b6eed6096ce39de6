"""MLflow conventions for every stage that leaves a run record.

Runs are addressed by id through an `MlflowClient`, never through mlflow's thread-local active run:
the stage function, Ray workers and Prefect tasks each log to a run id they were handed. The
tracking URI is MLFLOW_TRACKING_URI, else the project's `sqlite:///mlflow.db`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from components.errors import UserError
from components.home import ROOT


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    """The tracking URI, a relative sqlite path made absolute (workers elsewhere must find the same file)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


# the commit of code that has no .git with it (the image: docker build --build-arg GIT_COMMIT)
COMMIT_ENV = "GIT_COMMIT"


def git_commit() -> str:
    """The code's commit: `git rev-parse HEAD` in the checkout, else GIT_COMMIT, else "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        out = None
    if out is not None and out.returncode == 0 and out.stdout.strip():
        return out.stdout.strip()
    return os.environ.get(COMMIT_ENV, "").strip() or "unknown"


def start_run(client, experiment: str, run_name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
    """A new run in `experiment` (or, nested, in its parent's experiment); returns its id."""
    # mlflow: on use only; every stage imports this module (start-up time)
    from mlflow.exceptions import MlflowException

    tags = {"git_commit": (commit := git_commit()), "mlflow.source.git.commit": commit, **tags}
    if parent_run_id:
        try:
            experiment_id = client.get_run(parent_run_id).info.experiment_id
        except MlflowException:
            raise UserError(f"MLflow parent run {parent_run_id!r} not found at {client.tracking_uri}") from None
        tags["mlflow.parentRunId"] = parent_run_id
    else:
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


@contextlib.contextmanager
def run(experiment: str, name: str, tags: dict[str, str], parent_run_id: str | None = None,
        params: dict[str, Any] | None = None) -> Iterator[tuple[Any, str]]:
    """The run context of every stage: yields (client, run id) of a new run (nested under `parent_run_id`
    when given) with `params` logged; the run ends FINISHED, or FAILED when the block raises."""
    from mlflow import MlflowClient  # mlflow: on use only (start-up time)

    client = MlflowClient(tracking_uri())
    run_id = start_run(client, experiment, name, tags, parent_run_id=parent_run_id)
    if params:
        log_params(client, run_id, params)
    try:
        yield client, run_id
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def check_server() -> str:
    """The tracking URI, after checking an MLflow server answers and takes this process's credentials
    (MLFLOW_TRACKING_USERNAME / _PASSWORD, or _TOKEN): one line, before any training."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        import requests  # requests: only for an http(s) tracking server (start-up time)

        base = uri.rstrip("/")
        try:
            requests.get(base + "/health", timeout=10).raise_for_status()
            user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
            token = os.environ.get("MLFLOW_TRACKING_TOKEN")
            reply = requests.get(base + "/api/2.0/mlflow/experiments/get-by-name",
                                 params={"experiment_name": "Default"}, timeout=10,
                                 auth=(user, password) if user and password else None,
                                 headers={"Authorization": f"Bearer {token}"} if token else None)
        except requests.RequestException as e:
            reason = type(e).__name__ if isinstance(e, requests.ConnectionError) else str(e).splitlines()[0]
            raise UserError(f"MLflow tracking server {uri} is unreachable ({reason}); start it or fix "
                            f"MLFLOW_TRACKING_URI") from None
        if reply.status_code in (401, 403):
            given = "no credentials" if not (user or token) else f"the credentials of {user or 'the token'}"
            raise UserError(f"MLflow tracking server {uri} refused {given} (HTTP {reply.status_code}): set "
                            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of that server") from None
    return uri


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param  # mlflow: on use only (start-up time)

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]  # MLflow's value limit
    for i in range(0, len(items), 100):  # and its batch limit
        client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(client, run_id: str, values: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric  # mlflow: on use only (start-up time)

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])


def log_dataset(client, run_id: str, frame, source: str, name: str, digest: str, context: str = "train") -> None:
    """A data set input (schema and row count from `frame`) identified by `digest` (the DVC hash).

    The run is addressed by id, so the input goes through `MlflowClient.log_inputs`; its entity is built
    from the data set's public `to_dict()` (name, digest, source, schema, profile)."""
    # mlflow: on use only (start-up time)
    import mlflow.data
    from mlflow.entities import Dataset, DatasetInput, InputTag

    with warnings.catch_warnings():
        # the hint is about enforcing a model's input schema (a data set has none; the schema is inferred lazily, in
        # to_dict); the source is recorded as given, whichever of MLflow's source kinds could also read it
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        entity = Dataset(**mlflow.data.from_pandas(frame, source=source, name=name, digest=digest).to_dict())
    client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])
