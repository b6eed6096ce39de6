"""The DVC calls of the pipeline: `dvc repro` of the data stages (prepare_data) and of `pretrain`, whose
result dvc.lock records, run in the workspace with this environment's dvc.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

from components.config import Config
from components.data.prepare import data_version
from components.orchestration.locks import workspace_lock
from components.orchestration.processes import stop_session
from components.orchestration.stages import TransientError
from components.training.pretrain import pretrain, run_name


log = logging.getLogger(__name__)

BIN = Path(sys.executable).parent  # dvc and datencoder of this environment


def run_dvc(workspace: str | Path, *args: str, timeout: float | None = None) -> str:
    """One `dvc` command in `workspace`, its output lines on our log (and so in the Prefect logs)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(BIN / "dvc"), *args], cwd=workspace, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.strip():
                log.info("dvc %s: %s", args[0], line.rstrip()[:300])
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C, SIGTERM) or timed out: dvc and its stage command stop too
            stop_session(proc)
    if code:
        tail = " | ".join(l for l in lines[-5:] if l.strip())
        raise (TransientError if args[0] in ("push", "pull") else RuntimeError)(
            f"`dvc {' '.join(args)}` failed (exit {code}): {tail}")
    return "\n".join(lines)


def dvc_repro(cfg: Config, workspace: str | Path = ".") -> dict:
    """prepare_data: reproduce pipeline.dvc_stages (DVC skips what is up to date) and push their
    outputs (pipeline.dvc_push) to the workspace's default remote or pipeline.dvc_remote; DVC calls in one
    workspace are serialised by a lock. Returns the data version."""
    p = cfg.pipeline
    with workspace_lock(workspace, "dvc", wait_s=p.timeout_s, what="a DVC command"):
        output = run_dvc(workspace, "repro", *p.dvc_stages)
        if p.dvc_push:
            run_dvc(workspace, "push", *(["-r", p.dvc_remote] if p.dvc_remote else []), *p.dvc_stages)
    unchanged = [s for s in p.dvc_stages if f"Stage '{s}' didn't change, skipping" in output]
    return {"stages": p.dvc_stages, "unchanged": unchanged,
            "data_version": data_version(Path(workspace, cfg.prepare.out)), "pushed": p.dvc_push}


def dvc_stage_writing(out: str, workspace: str | Path = ".") -> str | None:
    """The workspace's DVC stage that has `out` among its outputs, if any."""
    stages = yaml.safe_load(Path(workspace, "dvc.yaml").read_text()).get("stages", {})
    for name, stage in stages.items():
        if any(str(next(iter(o)) if isinstance(o, dict) else o) == out for o in stage.get("outs", [])):
            return name
    return None


def pretrain_stage(cfg: Config, parent_run_id: str | None, workspace: str | Path = ".") -> dict:
    """The pretrain stage of the pipeline: skipped when the workspace's DVC stage for the encoder is
    up to date in dvc.lock (a fresh clone does not retrain the committed encoder), else
    components.training.pretrain.pretrain, and the new encoder recorded in dvc.lock."""
    stage = dvc_stage_writing(cfg.personalize.encoder, workspace)
    if stage:
        with workspace_lock(workspace, "dvc", wait_s=cfg.pipeline.timeout_s, what="a DVC command"):
            status = json.loads(run_dvc(workspace, "status", stage, "--json").strip().splitlines()[-1] or "{}")
        if not status:
            version = data_version(cfg.prepare.out)
            log.info("DVC stage %s is up to date: keeping the encoder in %s", stage, cfg.personalize.encoder)
            return {"out": cfg.personalize.encoder, "skipped": f"DVC stage {stage} up to date", "mlflow_run_id": None,
                    "run_name": run_name(cfg.training, version), "end_step": cfg.pretrain.max_steps,
                    "data_version": version}
    # force: the workspace's encoder is the pipeline's own output (in the checkout DVC's, recorded in dvc.lock)
    report = pretrain(cfg, parent_run_id=parent_run_id, force=True)
    if stage:
        with workspace_lock(workspace, "dvc", wait_s=cfg.pipeline.timeout_s, what="a DVC command"):
            run_dvc(workspace, "commit", "-f", "-q", stage)
    return report
