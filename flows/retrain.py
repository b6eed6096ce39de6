"""The `retrain` flow and its stage flows: orchestration only (docs/orchestration.md).

    prepare_data -> pretrain -> baselines -> variants -> evaluate -> ablate -> register -> report

Each stage flow runs one task that calls the same stage function as the CLI and DVC. Tasks are
cached on what decides their result (config, data version, code, upstream encoder; never a run id,
components.orchestration.stages.stage_key) with results persisted in the workspace, so an unchanged re-run
skips them and a run after a failure starts at the failed stage. Transient errors (network, S3,
MLflow HTTP 5xx) are retried with exponential backoff; every stage has a timeout.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE, TASK_SOURCE, Inputs
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from components import tracking
from components.config import STAGES, Config, PipelineConfig, resolved, variant_config
from components.data.prepare import data_version
from components.errors import UserError
from components.evaluation.ablate import ablate as ablate_stage
from components.evaluation.evaluate import baselines as baselines_stage
from components.evaluation.evaluate import evaluate as evaluate_stage
from components.evaluation.report import method_metrics
from components.evaluation.variants import train_variants as variants_stage
from components.orchestration.dvc import dvc_repro, pretrain_stage
from components.orchestration.locks import pipeline_run
from components.orchestration.pipeline_report import serve_commands, stage_images, write_report
from components.orchestration.stages import (
    StageFailed,
    encoder_version,
    is_transient,
    stage_key,
)
from components.orchestration.workspace import resolve
from components.progress import following
from components.serving.registry import model_name
from components.serving.registry import register as register_stage


CACHED = Inputs(exclude=["cfg", "parent_run_id"]) + TASK_SOURCE  # the key is the `key` argument + this code


def _retry_if_transient(task, task_run, state) -> bool:
    return is_transient(state.result(raise_on_failure=False))


def _configured(t, p: PipelineConfig, refresh: bool):
    return t.with_options(retries=p.retries, retry_delay_seconds=exponential_backoff(p.retry_delay_s),
                          retry_jitter_factor=0.2, retry_condition_fn=_retry_if_transient,
                          timeout_seconds=p.timeout_s, refresh_cache=refresh)


# --- tasks: one stage function each -----------------------------------------------------------------
@task(name="dvc-repro", cache_policy=NO_CACHE)  # DVC decides what is up to date
def dvc_repro_task(cfg: Config) -> dict:
    return dvc_repro(cfg)


@task(name="pretrain", cache_policy=CACHED, persist_result=True)
def pretrain_task(cfg: Config, key: dict, parent_run_id: str | None) -> dict:
    with progress_artifact("pretrain"):
        return pretrain_stage(cfg, parent_run_id)


@contextlib.contextmanager
def progress_artifact(stage: str, every_s: float = 2.0) -> Iterator[None]:
    """A Prefect progress artifact for a long stage, following its loops (components.progress): the
    percentage of the loop running now, named in the artifact's description (at most every `every_s`)."""
    artifact_id = create_progress_artifact(0.0, key=f"{stage}-progress", description=f"{stage}: starting")
    last = 0.0

    def update(name: str, done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= every_s or done >= total:
            last = now
            update_progress_artifact(artifact_id, 100.0 * done / max(total, 1), description=f"{stage}: {name}")

    with following(update):
        yield
    update_progress_artifact(artifact_id, 100.0, description=f"{stage}: done")


def publish_images(stage: str, result: dict) -> None:
    """The stage's trade-off plot and sample grids as a Prefect markdown artifact (images inline)."""
    markdown = stage_images(stage, result)
    if markdown:
        create_markdown_artifact(markdown=markdown, key=f"{stage}-plots",
                                 description=f"{stage}: trade-off plot and sample grids")


# the stored results know the settings they were computed under: the stage itself says whether it is up to date
@task(name="baselines", cache_policy=NO_CACHE)
def baselines_task(cfg: Config, parent_run_id: str | None, force: bool) -> dict:
    with progress_artifact("baselines"):
        return baselines_stage(cfg, parent_run_id=parent_run_id, force=force)


@task(name="variants", cache_policy=NO_CACHE)
def variants_task(cfg: Config, parent_run_id: str | None, force: bool) -> dict:
    with progress_artifact("variants"):
        return variants_stage(cfg, parent_run_id=parent_run_id, force=force)


@task(name="evaluate", cache_policy=CACHED, persist_result=True)
def evaluate_task(cfg: Config, key: dict, parent_run_id: str | None) -> dict:
    with progress_artifact("evaluate"):
        result = evaluate_stage(cfg, parent_run_id=parent_run_id)
    publish_images("evaluate", result)
    return result


@task(name="ablate", cache_policy=CACHED, persist_result=True)
def ablate_task(cfg: Config, key: dict, parent_run_id: str | None) -> dict:
    with progress_artifact("ablate"):
        result = ablate_stage(cfg, parent_run_id=parent_run_id)
    publish_images("ablate", result)
    return result


@task(name="register", cache_policy=CACHED, persist_result=True)
def register_task(cfg: Config, key: dict, parent_run_id: str | None) -> dict:
    return register_stage(cfg, encoder=cfg.personalize.encoder)


@task(name="report", cache_policy=NO_CACHE)
def report_task(cfg: Config, results: dict, parent_run_id: str, durations: dict[str, float]) -> dict:
    report = write_report(cfg.pipeline, cfg.preset, model_name(cfg.registry, cfg.preset), results, parent_run_id,
                          flow_run.get_name() or "retrain", durations)
    create_markdown_artifact(markdown=report["markdown"], key="retrain-report",
                             description=f"datencoder retrain ({cfg.preset})")
    if report["rows"]:
        create_table_artifact(table=report["rows"], key="retrain-metrics", description="evaluation and ablation")
    return report


# --- stage flows ------------------------------------------------------------------------------------
@flow(name="prepare_data")
def prepare_data(cfg: Config, refresh: bool = False) -> dict:
    return _configured(dvc_repro_task, cfg.pipeline, refresh)(cfg)


@flow(name="pretrain")
def pretrain(cfg: Config, data_version: str, parent_run_id: str | None = None, refresh: bool = False) -> dict:
    return _configured(pretrain_task, cfg.pipeline, refresh)(cfg, stage_key(cfg, "pretrain", data_version),
                                                    parent_run_id)


@flow(name="baselines")
def baselines(cfg: Config, parent_run_id: str | None = None, refresh: bool = False) -> dict:
    return _configured(baselines_task, cfg.pipeline, refresh)(cfg, parent_run_id, refresh)


@flow(name="variants")
def variants(cfg: Config, parent_run_id: str | None = None, refresh: bool = False) -> dict:
    return _configured(variants_task, cfg.pipeline, refresh)(cfg, parent_run_id, refresh)


def _after_pretrain(t, cfg: Config, stage: str, data_version: str, encoder: str, parent_run_id, refresh) -> dict:
    return _configured(t, cfg.pipeline, refresh)(cfg, stage_key(cfg, stage, data_version, encoder), parent_run_id)


@flow(name="evaluate")
def evaluate(cfg: Config, data_version: str, encoder: str, parent_run_id: str | None = None,
             refresh: bool = False) -> dict:
    return _after_pretrain(evaluate_task, cfg, "evaluate", data_version, encoder, parent_run_id, refresh)


@flow(name="ablate")
def ablate(cfg: Config, data_version: str, encoder: str, parent_run_id: str | None = None,
           refresh: bool = False) -> dict:
    return _after_pretrain(ablate_task, cfg, "ablate", data_version, encoder, parent_run_id, refresh)


@flow(name="register")
def register(cfg: Config, data_version: str, encoder: str, parent_run_id: str | None = None,
             refresh: bool = False) -> dict:
    return _after_pretrain(register_task, cfg, "register", data_version, encoder, parent_run_id, refresh)


# --- the parent flow --------------------------------------------------------------------------------
@flow(name="retrain", log_prints=True)
def retrain(workspace: str = ".", preset: str | None = None, refresh: bool = False,
            stages: list[str] | None = None, config: dict | None = None) -> dict[str, Any]:
    """The whole pipeline in `workspace` (its params.yaml; `preset` must agree with it; a new directory becomes a
    workspace of `preset`), or only `stages` of it (default pipeline.stages). `config`: the workspace's config
    (`Config.model_dump()`, a flow parameter Prefect can store) when the caller has read it (the main job), so that
    a run reads params.yaml once; a scheduled run reads it here."""
    if config is not None:
        path, cfg = Path(workspace).resolve(), Config.model_validate(config)
    else:
        path, cfg = resolve(preset, None, workspace)
    if stages is not None:
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise UserError(f"unknown stage {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
        cfg = variant_config(cfg, pipeline={"stages": list(stages)})
    with pipeline_run(path, cfg.pipeline):
        results: dict[str, dict] = {}
        durations: dict[str, float] = {}  # each stage flow's wall time in this run, for the report
        with tracking.run(cfg.pipeline.experiment, flow_run.get_name() or "retrain",
                          {"preset": cfg.preset, "stage": "retrain"}, params=resolved(cfg)) as (client, parent):
            for stage in cfg.pipeline.stages:
                started = time.perf_counter()
                results[stage] = _stage(stage, cfg, results, parent, refresh)
                durations[stage] = round(time.perf_counter() - started, 1)
            report = report_task(cfg, results, parent, durations)
            # the methods' metrics under the names the evaluate and ablate runs use (evaluate's where both ran)
            methods = {**(results.get("ablate") or {}).get("methods", {}),
                       **(results.get("evaluate") or {}).get("methods", {})}
            tracking.log_metrics(client, parent, method_metrics(methods), step=0)
            if version := str((results.get("register") or {}).get("version", "")):
                client.set_tag(parent, "registered_version", version)
    return {"workspace": os.getcwd(), "report": report["report"], "metrics_csv": report["csv"],
            "mlflow_parent_run_id": parent, "tracking_uri": tracking.tracking_uri(),
            "stages": {s: {k: v for k, v in r.items() if not isinstance(v, (dict, list))} for s, r in results.items()},
            "serve": serve_commands(cfg.preset, model_name(cfg.registry, cfg.preset))}


def _stage(stage: str, cfg: Config, results: dict, parent: str, refresh: bool) -> dict:
    """Run one stage flow; a failure ends the run with the stage named and its error."""
    data = (results.get("prepare_data") or {}).get("data_version") or data_version(cfg.prepare.out, missing="none")
    done = results.get("pretrain") or {}
    encoder = f"{done.get('run_name')}@{done.get('end_step')}" if done else encoder_version(cfg.personalize.encoder)
    # the encoder this run's pretrain stage returned is the one evaluate and ablate score and register registers;
    # without that stage in the run, personalize.encoder
    scored = variant_config(cfg, personalize={"encoder": done["out"]}) if done.get("out") else cfg
    calls = {"prepare_data": lambda: prepare_data(cfg, refresh),
             "pretrain": lambda: pretrain(cfg, data, parent, refresh),
             "baselines": lambda: baselines(cfg, parent, refresh),
             "variants": lambda: variants(cfg, parent, refresh),
             "evaluate": lambda: evaluate(scored, data, encoder, parent, refresh),
             "ablate": lambda: ablate(scored, data, encoder, parent, refresh),
             "register": lambda: register(scored, data, encoder, parent, refresh)}
    try:
        return calls[stage]()
    except Exception as e:  # noqa: BLE001 - re-raised with the stage named
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, UserError):
            reason = f"{type(e).__name__}: {reason}"
        raise StageFailed(f"stage {stage} failed: {reason}") from e
