"""The rules the pipeline's stages share: which failures are worth a retry, and the cache key of a
stage (its config, data and encoder versions, code, tracking store), so an unchanged re-run skips it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import yaml

from components import tracking
from components.config import Config
from components.errors import UserError
from components.home import ROOT


log = logging.getLogger(__name__)


class StageFailed(UserError):
    """A pipeline stage failed (the message names it); the CLI prints it as one line and exits 1."""

    exit_code = 1


class TransientError(RuntimeError):
    """A failure worth retrying (network, S3, a 5xx), raised where the cause is only in a message."""


THROTTLING = ("Throttling", "ThrottlingException", "SlowDown", "RequestTimeout", "RequestLimitExceeded")


def is_stage_timeout(error: BaseException) -> bool:
    """Prefect's TaskRunTimeoutError: the stage ran out its `pipeline.timeout_s`. A TimeoutError too, but a retry
    would run as long again (6 h), so it is final; a network timeout inside the stage stays transient."""
    return type(error).__name__ == "TaskRunTimeoutError" and type(error).__module__.startswith("prefect")


def is_transient(error: BaseException | None) -> bool:
    """Worth retrying: network and S3 errors, MLflow HTTP 5xx/429; never a UserError, a bug or the stage's own
    timeout."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UserError) or is_stage_timeout(error):
            return False
        if isinstance(error, (TransientError, ConnectionError, TimeoutError)):
            return True
        module, name = type(error).__module__, type(error).__name__
        response = getattr(error, "response", None)
        if module.startswith("botocore") and isinstance(response, dict):  # an S3 reply: 5xx and throttling only
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return status >= 500 or status == 429 or response.get("Error", {}).get("Code") in THROTTLING
        if module.startswith(("botocore", "urllib3", "requests", "s3transfer")):  # no reply: network trouble
            return not any(word in name for word in ("Param", "Credentials", "Validation", "HTTPError"))
        status = getattr(error, "get_http_status_code", lambda: None)()
        if module.startswith("mlflow") and (status in (429, 502, 503, 504) or
                                            "API request" in str(error) and "failed" in str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def code_version(stage: str) -> str:
    """Hash of a stage's code: for pretrain the modules its DVC stage depends on (dvc.yaml), for the
    others all of components/*.py. A change invalidates the stage's cached result."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    deps = [d for d in stages.get(stage, {}).get("deps", []) if d.endswith(".py")]
    paths = [ROOT / d for d in deps] if deps else sorted((ROOT / "components").glob("*.py"))
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def stage_key(cfg: Config, stage: str, data_version: str, encoder: str | None = None) -> dict:
    """What decides a stage's result (its Prefect cache key): config, data version, code, and for the
    stages after pre-training the encoder (its recipe hash and step). Never a run id."""
    values = dvc_view(cfg)
    if stage == "pretrain":
        values = {"base": {k: v for k, v in values["base"].items() if k != "metrics_clip"},
                  "encoder": values["encoder"], "pretrain": values["pretrain"]}
    return {"stage": stage, "config": values, "data_version": data_version, "encoder": encoder,
            "code": code_version(stage),
            "tracking": tracking.tracking_uri()}  # another MLflow store has no record of the cached result


def encoder_version(encoder: str | Path) -> str:
    """The identity of the encoder in directory `encoder` when pretrain is not among the stages run (the stages
    score personalize.encoder): the weights' hash."""
    weights = Path(encoder) / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.is_file() else "none"


def dvc_view(cfg: Config) -> dict:
    values = cfg.model_dump()
    values.pop("pipeline")  # orchestration settings are not stage inputs
    return values
