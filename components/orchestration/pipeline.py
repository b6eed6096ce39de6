"""The main job: what the Prefect `retrain` flow needs that is not a stage of its own (docs/orchestration.md).

    datencoder pipeline [--preset P] [--workspace DIR] -> report

A pipeline runs in a *workspace*: a directory with dvc.yaml, params.yaml (the config DVC sees) and
.dvc/, where data, checkpoints, the MLflow store (embedded default), Prefect's state and the report
live. The project checkout is the default workspace; a preset other than the one in its params.yaml
gets a workspace of its own (`outputs/workspaces/<preset>`), so a smoke run never touches the
committed toy artefacts. Here: workspace set-up and locks, the DVC calls of prepare_data, the
transient-error rule for retries, the stages' cache keys, the MLflow check and parent run, and the
report. The flows (flows/retrain.py) only call these and the stage functions.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from components import tracking
from components.config import Config, load_config
from components.errors import UserError

log = logging.getLogger(__name__)

ROOT = tracking.ROOT  # the project checkout (where the installed code lives)
BIN = Path(sys.executable).parent  # dvc and datencoder of this environment
LOCK_DIR = ".datencoder"  # lock files, inside the workspace


class StageFailed(UserError):
    """A pipeline stage failed (the message names it); the CLI prints it as one line and exits 1."""

    exit_code = 1


class TransientError(RuntimeError):
    """A failure worth retrying (network, S3, a 5xx), raised where the cause is only in a message."""


# --- workspace ---------------------------------------------------------------------------------------
def workspace_config(workspace: str | Path, preset: str | None = None, config: str | Path | None = None) -> Config:
    """The config a pipeline in `workspace` runs with: its params.yaml (DVC's view), or `config` when the
    workspace is being created. A preset or file that disagrees with params.yaml is refused, because the
    DVC stages would read params.yaml and the stages would see two different configs."""
    params = Path(workspace) / "params.yaml"
    if not (Path(workspace) / "dvc.yaml").is_file():
        raise UserError(f"{workspace} is not a pipeline workspace (no dvc.yaml); omit --workspace or name a new "
                        f"directory and it is created")
    cfg = load_config(preset=preset, path=config or params)
    current = load_config(path=params)
    if _dvc_view(cfg) != _dvc_view(current):
        raise UserError(f"workspace {workspace} has params.yaml for preset {current.preset!r}, which differs from "
                        f"the requested config ({cfg.preset!r}); edit params.yaml there, or use a new workspace: "
                        f"--workspace outputs/workspaces/{cfg.preset}")
    return cfg


def _dvc_view(cfg: Config) -> dict:
    values = cfg.model_dump()
    values.pop("pipeline")  # orchestration settings are not stage inputs
    return values


def default_workspace(preset: str | None, config: str | Path | None) -> Path:
    """The project checkout when the requested config is its params.yaml's, else outputs/workspaces/<preset>."""
    cfg = load_config(preset=preset, path=config or ROOT / "params.yaml")
    if _dvc_view(cfg) == _dvc_view(load_config(path=ROOT / "params.yaml")):
        return ROOT
    return ROOT / "outputs" / "workspaces" / cfg.preset


def init_workspace(workspace: Path, cfg: Config) -> None:
    """A new workspace: the project's DVC stages that the pipeline reproduces (code deps made absolute),
    .dvc/ with a local remote, and params.yaml = `cfg` with the project's read-only inputs (base model,
    CLIPs) made absolute."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    keep = _upstream(stages, cfg.pipeline.dvc_stages)
    workspace.mkdir(parents=True, exist_ok=True)
    for name in keep:  # code deps name the installed code (a components/ copy here would shadow the package)
        stages[name]["deps"] = [str(ROOT / d) if d.endswith(".py") else d for d in stages[name].get("deps", [])]
    (workspace / "dvc.yaml").write_text(yaml.safe_dump({"stages": {n: stages[n] for n in keep}}, sort_keys=False))
    values = cfg.model_dump()
    base = values["base"]
    for holder, key in [(base, "pretrained"), *((base[c], k) for c in ("backbone_clip", "metrics_clip")
                                                  for k in ("pretrained", "config_path"))]:
        if holder.get(key) and not Path(holder[key]).is_absolute() and (ROOT / holder[key]).exists():
            holder[key] = str(ROOT / holder[key])
    (workspace / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    if not (workspace / ".dvc").is_dir():
        run_dvc(workspace, "init", "--no-scm", "-q")
        run_dvc(workspace, "remote", "add", "-d", "local", ".dvc-remote")  # stored relative to .dvc/
    log.info("created workspace %s (preset %s, DVC stages %s)", workspace, cfg.preset, ", ".join(keep))


def _upstream(stages: dict, targets: list[str]) -> list[str]:
    """`targets` and the stages whose outputs they depend on, in dvc.yaml order."""
    unknown = [t for t in targets if t not in stages]
    if unknown:
        raise UserError(f"pipeline.dvc_stages: no stage {', '.join(unknown)} in dvc.yaml (have {', '.join(stages)})")
    producer = {str(next(iter(o)) if isinstance(o, dict) else o): n for n, s in stages.items() for o in s.get("outs", [])}
    needed, todo = set(), list(targets)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += [producer[d] for d in stages[name].get("deps", []) if d in producer]
    return [n for n in stages if n in needed]


def resolve(preset: str | None, config: str | None, workspace: str | None) -> tuple[Path, Config]:
    """(workspace, config) of `datencoder pipeline`; a workspace that does not exist yet is created."""
    path = Path(workspace).resolve() if workspace else default_workspace(preset, config)
    if not (path / "dvc.yaml").is_file():
        if path.exists() and any(path.iterdir()):
            raise UserError(f"{path} is neither a pipeline workspace (no dvc.yaml) nor empty")
        init_workspace(path, load_config(preset=preset, path=config))
        config = None
    return path, workspace_config(path, preset, config)


def prefect_environment(workspace: Path) -> dict[str, str]:
    """Prefect settings of a run in `workspace`: results persisted in the workspace, our loggers
    forwarded to the Prefect logs, Prefect's home (and a local server's database) in the workspace."""
    env = {"PREFECT_LOGGING_EXTRA_LOGGERS": "datencoder,components",
           "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # our loggers outside a flow run
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
           "PREFECT_LOCAL_STORAGE_PATH": str(workspace / ".prefect" / "storage")}
    if not os.environ.get("PREFECT_API_URL"):
        env["PREFECT_HOME"] = str(workspace / ".prefect")
    return env


@contextlib.contextmanager
def local_prefect_server(workspace: Path, startup_timeout_s: float) -> Iterator[str]:
    """The embedded default: a Prefect server for this run only, on a free loopback port, with the
    workspace's own database (two workspaces never share a sqlite file). Prefect's built-in ephemeral
    server shares the terminal's process group, so Ctrl-C killed it mid-run and left the run hanging;
    this one has its own session: Ctrl-C stops the run, which then stops the server. Yields the API URL."""
    import socket

    import requests

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    api = f"http://127.0.0.1:{port}/api"
    home = workspace / ".prefect"
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    with open(home / "server.log", "w") as out:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if server.poll() is not None:
                raise UserError(f"the local Prefect server exited with {server.returncode}; see {home / 'server.log'}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{api}/health", timeout=2).ok:
                    break
            if time.monotonic() > deadline:
                raise UserError(f"the local Prefect server did not start within {startup_timeout_s:g} s "
                                f"(pipeline.prefect_startup_timeout_s); see {home / 'server.log'}")
            time.sleep(0.5)
        log.info("local Prefect server for this run at %s (database in %s)", api, home)
        yield api
    finally:
        stop_session(server)


def stop_session(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """Stop a process started with start_new_session=True and everything in its session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()


# --- locks -------------------------------------------------------------------------------------------
_held: dict[str, tuple[Any, int]] = {}  # lock file -> (open file, depth): re-entrant within a process


@contextlib.contextmanager
def workspace_lock(workspace: str | Path, name: str, wait_s: float, what: str) -> Iterator[None]:
    """An exclusive lock on <workspace>/.datencoder/<name>.lock (fcntl.flock: released when the process
    dies, so a crashed run never leaves a stale lock). Waits up to `wait_s`, then refuses with a line
    that names the holder."""
    path = Path(workspace).resolve() / LOCK_DIR / f"{name}.lock"
    key = str(path)
    if key in _held:
        f, depth = _held[key]
        _held[key] = (f, depth + 1)
        try:
            yield
        finally:
            _held[key] = (f, _held[key][1] - 1)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                raise UserError(f"{what} is already running in {Path(workspace).resolve()} ({holder}); wait for it "
                                f"to finish (or set pipeline.lock_wait_s to wait)") from None
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}")
    f.flush()
    _held[key] = (f, 1)
    try:
        yield
    finally:
        del _held[key]
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


# --- DVC ---------------------------------------------------------------------------------------------
def run_dvc(workspace: str | Path, *args: str, timeout: float | None = None) -> str:
    """One `dvc` command in `workspace`, its output lines on our log (and so in the Prefect logs)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(BIN / "dvc"), *args], cwd=workspace, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if line.strip():
            log.info("dvc %s: %s", args[0], line.rstrip()[:300])
    code = proc.wait(timeout=timeout)
    if code:
        tail = " | ".join(l for l in lines[-5:] if l.strip())
        raise (TransientError if args[0] in ("push", "pull") else RuntimeError)(
            f"`dvc {' '.join(args)}` failed (exit {code}): {tail}")
    return "\n".join(lines)


def dvc_repro(cfg: Config, workspace: str | Path = ".") -> dict:
    """prepare_data: reproduce pipeline.dvc_stages (DVC skips what is up to date) and push their
    outputs (pipeline.dvc_push) to the workspace's default remote or pipeline.dvc_remote; DVC calls in one workspace are serialised by a lock. Returns the data version."""
    from components.data.prepare import data_version

    p = cfg.pipeline
    with workspace_lock(workspace, "dvc", wait_s=p.timeout_s, what="a DVC command"):
        output = run_dvc(workspace, "repro", *p.dvc_stages)
        if p.dvc_push:
            run_dvc(workspace, "push", *(["-r", p.dvc_remote] if p.dvc_remote else []), *p.dvc_stages)
    unchanged = [s for s in p.dvc_stages if f"Stage '{s}' didn't change, skipping" in output]
    return {"stages": p.dvc_stages, "unchanged": unchanged, "data_version": data_version(Path(workspace, cfg.prepare.out)),
            "pushed": p.dvc_push}


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
    from components.training.pretrain import pretrain, run_name
    from components.data.prepare import data_version

    stage = dvc_stage_writing(cfg.pretrain.out, workspace)
    if stage:
        with workspace_lock(workspace, "dvc", wait_s=cfg.pipeline.timeout_s, what="a DVC command"):
            status = json.loads(run_dvc(workspace, "status", stage, "--json").strip().splitlines()[-1] or "{}")
        if not status:
            version = data_version(cfg.pretrain.data)
            log.info("DVC stage %s is up to date: keeping the encoder in %s", stage, cfg.pretrain.out)
            return {"out": cfg.pretrain.out, "skipped": f"DVC stage {stage} up to date", "mlflow_run_id": None,
                    "run_name": run_name(cfg, version), "end_step": cfg.pretrain.max_steps, "data_version": version}
    report = pretrain(cfg, parent_run_id=parent_run_id)
    if stage:
        with workspace_lock(workspace, "dvc", wait_s=cfg.pipeline.timeout_s, what="a DVC command"):
            run_dvc(workspace, "commit", "-f", "-q", stage)
    return report


# --- retries, cache keys -------------------------------------------------------------------------------
THROTTLING = ("Throttling", "ThrottlingException", "SlowDown", "RequestTimeout", "RequestLimitExceeded")


def is_transient(error: BaseException | None) -> bool:
    """Worth retrying: network and S3 errors, MLflow HTTP 5xx/429; never a UserError or a bug."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UserError):
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
    values = _dvc_view(cfg)
    if stage == "pretrain":
        values = {"base": {k: v for k, v in values["base"].items() if k != "metrics_clip"},
                  "encoder": values["encoder"], "pretrain": values["pretrain"]}
    return {"stage": stage, "config": values, "data_version": data_version, "encoder": encoder, "code": code_version(stage),
            "tracking": tracking.tracking_uri()}  # another MLflow store has no record of the cached result


# --- MLflow -------------------------------------------------------------------------------------------
def check_tracking() -> str:
    """The tracking URI, after checking an MLflow server answers (one line, before any training)."""
    uri = tracking.tracking_uri()
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        except requests.RequestException as e:
            reason = type(e).__name__ if isinstance(e, requests.ConnectionError) else str(e).splitlines()[0]
            raise UserError(f"MLflow tracking server {uri} is unreachable ({reason}); start it or fix "
                            f"MLFLOW_TRACKING_URI") from None
    return uri


def start_parent_run(cfg: Config, name: str) -> str:
    from mlflow import MlflowClient

    from components.config import resolved

    client = MlflowClient(tracking.tracking_uri())
    run_id = tracking.start_run(client, cfg.pipeline.experiment, name, tags={"preset": cfg.preset, "stage": "retrain"})
    tracking.log_params(client, run_id, resolved(cfg))
    return run_id


def end_parent_run(run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking.tracking_uri())
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status)


def run_link(run_id: str | None) -> str:
    if not run_id:
        return "-"
    uri = tracking.tracking_uri()
    if uri.startswith("http"):
        from mlflow import MlflowClient

        experiment = MlflowClient(uri).get_run(run_id).info.experiment_id
        return f"[{run_id[:8]}]({uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id})"
    return f"`{run_id}`"


# --- the report ---------------------------------------------------------------------------------------
METRIC_COLUMNS = ("identity", "prompt", "seconds", "peak_mb")


def metrics_table(results: dict[str, dict]) -> list[dict]:
    """One row per method of the evaluate and ablate stages."""
    rows = []
    for stage in ("evaluate", "ablate"):
        for method, values in (results.get(stage) or {}).get("methods", {}).items():
            rows.append({"stage": stage, "method": method,
                         **{k: (round(values[k], 4) if isinstance(values.get(k), float) else values.get(k))
                            for k in METRIC_COLUMNS}})
    return rows


def serve_commands() -> list[str]:
    uri = tracking.tracking_uri()
    return [f"MLFLOW_TRACKING_URI={uri} datencoder serve",
            f"MLFLOW_TRACKING_URI={uri} mlflow models serve -m models:/datencoder@champion --env-manager local"]


def write_report(cfg: Config, results: dict[str, dict], parent_run_id: str, flow_run: str) -> dict:
    """report.md + metrics.csv (+ the trade-off plot) under pipeline.report; returns the markdown, the
    table rows and the paths."""
    import pandas as pd

    out = Path(cfg.pipeline.report).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = metrics_table(results)
    pd.DataFrame(rows, columns=["stage", "method", *METRIC_COLUMNS]).to_csv(out / "metrics.csv", index=False)
    lines = [f"# datencoder retrain: {flow_run}", "",
             f"Preset `{cfg.preset}`, data version `{(results.get('prepare_data') or {}).get('data_version', '-')}`, "
             f"MLflow `{tracking.tracking_uri()}`, parent run {run_link(parent_run_id)}.", "",
             "| stage | result | MLflow run |", "|---|---|---|"]
    for stage in cfg.pipeline.stages:
        r = results.get(stage) or {}
        summary = r.get("skipped") or {"prepare_data": lambda: f"data {r.get('data_version', '-')[:12]}",
                                       "pretrain": lambda: f"step {r.get('end_step')}, encoder `{r.get('out')}`",
                                       "register": lambda: f"version {r.get('version')}" + (
                                           " (now champion)" if r.get("promoted") else ""),
                                       }.get(stage, lambda: f"{len(r.get('methods', {}))} methods")()
        lines.append(f"| {stage} | {summary} | {run_link(r.get('mlflow_run_id') or r.get('run_id'))} |")
    if rows:
        lines += ["", "## Metrics", "", "| stage | method | " + " | ".join(METRIC_COLUMNS) + " |",
                  "|---|---|" + "---|" * len(METRIC_COLUMNS)]
        lines += [f"| {r['stage']} | {r['method']} | " + " | ".join(str(r[k]) for k in METRIC_COLUMNS) + " |"
                  for r in rows]
    plot = ((results.get("evaluate") or {}).get("report") or {}).get("plot")
    if plot and Path(plot).is_file():
        shutil.copy2(plot, out / Path(plot).name)
        lines += ["", "## Trade-off (identity vs prompt similarity)", "", f"![trade-off]({out / Path(plot).name})"]
    for stage in ("evaluate", "ablate"):
        findings = (results.get(stage) or {}).get("findings")
        if findings:
            lines += ["", f"## Findings ({stage})", "", *(f"- {f}" for f in (findings if isinstance(findings, list)
                                                                              else [json.dumps(findings)]))]
    reg = results.get("register") or {}
    if reg.get("version"):
        uri = tracking.tracking_uri()
        link = (f"{uri.rstrip('/')}/#/models/{reg['model']}/versions/{reg['version']}" if uri.startswith("http")
                else f"models:/{reg['model']}/{reg['version']}")
        lines += ["", "## Registered model", "", f"`{reg['model']}` version {reg['version']}: {link}; "
                  f"{'promoted to' if reg.get('promoted') else 'not promoted to'} `@{reg.get('alias', 'champion')}`."]
    lines += ["", "## Serve the champion", "", *(f"    {c}" for c in serve_commands())]
    markdown = "\n".join(lines) + "\n"
    (out / "report.md").write_text(markdown)
    return {"markdown": markdown, "rows": rows, "report": str(out / "report.md"), "csv": str(out / "metrics.csv")}


def current_data_version(cfg: Config) -> str:
    """The prepared data's version when prepare_data is not among the stages run."""
    from components.data.prepare import data_version

    try:
        return data_version(cfg.pretrain.data)
    except UserError:
        return "none"


def encoder_version(cfg: Config) -> str:
    """The encoder's identity when pretrain is not among the stages run: the weights' hash."""
    weights = Path(cfg.pretrain.out) / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.is_file() else "none"


# --- the main job -------------------------------------------------------------------------------------
def main_job(preset: str | None = None, config: str | None = None, workspace: str | None = None,
             refresh: bool = False, serve: bool = False, cron: str | None = None) -> dict:
    """`datencoder pipeline`: the retrain flow in a workspace (created when new), one run at a time;
    with `serve`, a Prefect deployment of it on pipeline.cron instead (runs until interrupted)."""
    if serve and not os.environ.get("PREFECT_API_URL"):
        raise UserError("--serve needs a Prefect server that outlives this process: start one with "
                        "`prefect server start` and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    path, cfg = resolve(preset, config, workspace)
    os.environ.update(prefect_environment(path))  # before prefect is imported
    os.chdir(path)
    with workspace_lock(path, "pipeline", wait_s=cfg.pipeline.lock_wait_s, what="a pipeline run"):
        check_tracking()  # before Prefect and any training start
        if not serve:
            own = not os.environ.get("PREFECT_API_URL")
            with local_prefect_server(path, cfg.pipeline.prefect_startup_timeout_s) if own else \
                    contextlib.nullcontext(os.environ["PREFECT_API_URL"]) as api:
                os.environ["PREFECT_API_URL"] = api
                from flows.retrain import retrain

                result = retrain(workspace=str(path), preset=preset, refresh=refresh)
            log.info("report: %s; serve the champion with: %s", result["report"], result["serve"][0])
            return result
    from prefect.schedules import Cron

    from flows.retrain import retrain  # served runs take the pipeline lock themselves, one at a time

    retrain.serve(name=f"retrain-{cfg.preset}", schedules=[Cron(cron or cfg.pipeline.cron, timezone=cfg.pipeline.timezone)],
                  parameters={"workspace": str(path), "preset": preset, "refresh": refresh},
                  description=f"scheduled retraining ({cfg.preset}) in {path}", limit=1)
    return {"served": f"retrain/retrain-{cfg.preset}", "workspace": str(path)}
