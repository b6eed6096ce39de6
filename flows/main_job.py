"""The main job, `datencoder pipeline`: the `retrain` flow (flows/retrain.py) in a workspace, one run at a
time, with a Prefect server of its own unless PREFECT_API_URL names one; or, with `--serve`, a cron
deployment of it (docs/orchestration.md).
"""

from __future__ import annotations

import contextlib
import logging
import os

from components.errors import UserError
from components.orchestration.locks import pipeline_run
from components.orchestration.prefect_server import (
    local_prefect_server,
    prefect_environment,
    wait_for_interrupt,
)
from components.orchestration.workspace import resolve


log = logging.getLogger(__name__)


def main_job(preset: str | None = None, config: str | None = None, workspace: str | None = None,
             refresh: bool = False, serve: bool = False, cron: str | None = None, ui: bool = False) -> dict:
    """`datencoder pipeline`: the retrain flow in a workspace (created when new), one run at a time;
    with `serve`, a Prefect deployment of it on pipeline.cron instead (runs until interrupted). With `ui`
    the run's own Prefect server serves its UI and stays up after the run until Ctrl-C."""
    if ui and os.environ.get("PREFECT_API_URL"):
        raise UserError(f"--ui shows the run's own Prefect server; PREFECT_API_URL names one already: open its UI "
                        f"({os.environ['PREFECT_API_URL'].removesuffix('/api')}) instead")
    if serve and not os.environ.get("PREFECT_API_URL"):
        raise UserError("--serve needs a Prefect server that outlives this process: start one with "
                        "`prefect server start` and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    path, cfg = resolve(preset, config, workspace)
    os.environ.update(prefect_environment(path))  # before prefect is imported
    with pipeline_run(path, cfg.pipeline):
        if not serve:
            own = not os.environ.get("PREFECT_API_URL")
            with local_prefect_server(path, cfg.pipeline.prefect_startup_timeout_s, ui=ui) if own else \
                    contextlib.nullcontext(os.environ["PREFECT_API_URL"]) as api:
                os.environ["PREFECT_API_URL"] = api
                # imported only now: prefect reads PREFECT_* (the run's own server) when it is imported
                from flows.retrain import retrain

                result = retrain(workspace=str(path), preset=preset, refresh=refresh, config=cfg.model_dump())
                log.info("report: %s; serve the champion with: %s", result["report"], result["serve"][0])
                if ui:
                    result["prefect_ui"] = api.removesuffix("/api")
                    wait_for_interrupt(result["prefect_ui"])
            return result
    # imported only now: prefect reads PREFECT_* (set above) when it is imported
    from prefect.schedules import Cron

    from flows.retrain import retrain  # served runs take the pipeline lock themselves, one at a time

    retrain.serve(name=f"retrain-{cfg.preset}",
                  schedules=[Cron(cron or cfg.pipeline.cron, timezone=cfg.pipeline.timezone)],
                  parameters={"workspace": str(path), "preset": preset, "refresh": refresh},
                  description=f"scheduled retraining ({cfg.preset}) in {path}", limit=1)
    return {"served": f"retrain/retrain-{cfg.preset}", "workspace": str(path)}
