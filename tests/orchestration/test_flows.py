"""Orchestration (issue 8): the real `datencoder pipeline` CLI, real Prefect (the server a run starts, and a
`prefect server` with a served deployment), real DVC, Ray and MLflow (sqlite; in team mode a
`mlflow server` with its artifacts on a moto S3 server).

One smoke pipeline run in a temporary workspace (random-weight smoke models, so nothing of the
repository's toy artefacts is touched) is shared by the fast tests; the later tests re-run it, which
the Prefect cache makes cheap. To fit the default suite's budget that run leaves out the evaluation
stages (minutes on 2 cores); the team-mode test, marked slow, runs all five stages, and the failure
test (two more runs) is marked slow too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from smoke_models import free_port, interruptible, write_smoke_models

from components.config import STAGES
from components.orchestration.processes import stop_session


ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STACK_ENV = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME", "RAY_ADDRESS")
FAST_STAGES = ("prepare_data", "pretrain", "register")


def pipeline(*args, env: dict | None = None, wait: bool = True, timeout: float = 900):
    """`datencoder pipeline ... --json` as a user runs it (our stack settings from `env` only)."""
    full = {k: v for k, v in os.environ.items() if k not in STACK_ENV}
    full.update(env or {})
    argv = [str(BIN / "datencoder"), "pipeline", *map(str, args), "--json"]
    if not wait:
        return subprocess.Popen(argv, cwd=ROOT, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=interruptible)
    return subprocess.run(argv, cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)


def report(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def error_line(done: subprocess.CompletedProcess) -> str:
    """The CLI's one error line (Prefect may log its shutdown after it)."""
    lines = [l for l in done.stderr.splitlines() if l.startswith("datencoder pipeline: error: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def tree_digest(*paths: Path) -> str:
    digest = hashlib.sha256()
    for root in paths:
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if p.is_file():
                digest.update(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
    return digest.hexdigest()


def prefect_db(workspace: Path) -> sqlite3.Connection:
    return sqlite3.connect(workspace / ".prefect" / "prefect.db")


def task_runs(workspace: Path, task: str) -> list[str]:
    """States of the runs of the task named `task` (its stage flow's own wrapper rows left out)."""
    db = prefect_db(workspace)
    rows = db.execute("select t.state_name from task_run t where t.name like ? and t.name != ? order by t.created",
                      (f"{task}-%", f"{task}-0")).fetchall()
    return [r[0] for r in rows]


def retrain_runs(workspace: Path) -> list[tuple[str, str]]:
    """(state type, state message) of every retrain flow run, oldest first."""
    db = prefect_db(workspace)
    return db.execute("select fr.state_type, coalesce(s.message, '') "
                      "from flow_run fr join flow f on f.id = fr.flow_id "
                      "left join flow_run_state s on s.id = fr.state_id where f.name = 'retrain' "
                      "order by fr.created").fetchall()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("pipeline")
    config = tmp / "smoke.yaml"
    config.write_text(yaml.safe_dump({"preset": "smoke", **write_smoke_models(tmp / "models"),
                                      "pipeline": {"stages": list(FAST_STAGES)}}))
    committed = (ROOT / "models", ROOT / "data", ROOT / "dvc.lock")  # (other tests may use the stores)
    before = tree_digest(*committed)
    started = time.perf_counter()
    done = pipeline("--config", config, "--workspace", tmp / "ws")
    seconds = time.perf_counter() - started
    return {"tmp": tmp, "ws": tmp / "ws", "run": done, "report": report(done), "seconds": seconds,
            "committed_untouched": before == tree_digest(*committed)}


# --- the main job -----------------------------------------------------------------------------------
def test_smoke_pipeline_runs_its_stages_and_reports(smoke):
    from mlflow import MlflowClient

    out, ws = smoke["report"], smoke["ws"]
    assert smoke["committed_untouched"], "the smoke pipeline changed the repository's models/, data/ or dvc.lock"
    assert list(out["stages"]) == list(FAST_STAGES)
    # ends by saying where the report is and how to serve the registered model
    assert out["report"] == str(ws / "outputs" / "pipeline" / "report.md")
    assert any("mlflow models serve -m models:/datencoder-smoke@champion --env-manager local" in c
               for c in out["serve"])
    assert any(c.endswith("datencoder serve --preset smoke") for c in out["serve"])
    markdown = Path(out["report"]).read_text()
    assert "## Registered model" in markdown and "datencoder serve" in markdown
    assert f"version {out['stages']['register']['version']}" in markdown
    assert out["stages"]["pretrain"]["mlflow_run_id"] in markdown

    # a healthy run is quiet: no error line (Ray's C++ `E` lines, Prefect's or ours) and no third-party info
    # chatter from Ray's training processes (open_clip's model loads, Ray Train's reports)
    stderr = smoke["run"].stderr.splitlines()
    noise = [line for line in stderr if re.search(r"\bERROR\b|\] E \d|\d E \d+ \d+\]", line)
             or "Loading full pretrained weights" in line or "Reporting training result" in line]
    assert not noise, noise[:5]
    events = [line for line in stderr if "datencoder.progress" not in line]  # progress lines come with time
    assert len(events) < 60, events[:60]

    # MLflow: stages nest under the pipeline's parent run; the model is registered as champion
    client = MlflowClient(out["tracking_uri"])
    assert out["tracking_uri"] == f"sqlite:///{ws / 'mlflow.db'}"
    parent = out["mlflow_parent_run_id"]
    assert client.get_run(parent).info.status == "FINISHED"
    pretrain_run = client.get_run(out["stages"]["pretrain"]["mlflow_run_id"])
    assert pretrain_run.data.tags["mlflow.parentRunId"] == parent
    assert int(client.get_model_version_by_alias("datencoder-smoke", "champion").version) == \
        out["stages"]["register"]["version"]

    # Prefect: the run, its stage flows and its artifacts are in the workspace's own database
    assert retrain_runs(ws)[-1][0] == "COMPLETED"
    artifacts = dict(prefect_db(ws).execute("select key, type from artifact where key is not null").fetchall())
    # the metrics table and the plots come with evaluate/ablate; pre-training shows its progress
    assert artifacts == {"retrain-report": "markdown", "pretrain-progress": "progress"}

    # DVC: the stages reproduced in the workspace, recorded in its dvc.lock and pushed to the local remote
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert {"toy_world", "prepare"} <= set(lock)
    assert any((ws / ".dvc-remote" / "files" / "md5").rglob("*"))


@pytest.mark.slow  # two more pipeline runs (about 2.5 min on a busy 2-core machine): over the default budget
def test_failed_stage_is_named_and_the_next_run_reuses_earlier_stages(smoke):
    """A teammate changes a serving default while the artifact store is broken: register fails, named;
    once the store is back the next run starts at register (pre-training comes from the cache)."""
    ws = smoke["ws"]
    params = ws / "params.yaml"
    values = yaml.safe_load(params.read_text())
    values["personalize"]["seed"] = 7  # changes what register logs, not what pre-training learns
    params.write_text(yaml.safe_dump(values, sort_keys=False))
    store = ws / "mlruns"
    store.rename(ws / "mlruns.away")
    store.write_text("not a directory")  # the local artifact store, unusable
    try:
        failed = pipeline("--workspace", ws)
    finally:
        store.unlink()
        (ws / "mlruns.away").rename(store)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert error_line(failed).startswith("datencoder pipeline: error: stage register failed: NotADirectoryError")
    state, message = retrain_runs(ws)[-1]
    assert state == "FAILED" and "stage register failed" in message

    again = report(pipeline("--workspace", ws))
    assert again["stages"]["register"]["version"] == smoke["report"]["stages"]["register"]["version"] + 1
    states = task_runs(ws, "pretrain")  # pre-training ran once; the failed run and this one took it from the cache
    assert states.count("Completed") == 1 and states[-2:] == ["Cached", "Cached"], states
    assert again["stages"]["pretrain"]["mlflow_run_id"] == smoke["report"]["stages"]["pretrain"]["mlflow_run_id"]
    assert retrain_runs(ws)[-1][0] == "COMPLETED"
    assert "database is locked" not in failed.stderr


def lock_is_held(path: Path) -> bool:
    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_a_second_run_in_the_same_workspace_is_refused_clearly(smoke):
    ws = smoke["ws"]
    first = pipeline("--workspace", ws, wait=False)
    try:
        deadline = time.monotonic() + 120
        while not lock_is_held(ws / ".datencoder" / "pipeline.lock"):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        second = pipeline("--workspace", ws)
        out, err = first.communicate(timeout=900)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2
    assert f"a pipeline run is already running in {ws} (pid {first.pid}" in error_line(second)
    assert first.returncode == 0, err[-3000:]
    assert "database is locked" not in err + second.stderr
    status = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=ws, capture_output=True, text=True)
    assert status.returncode == 0 and json.loads(status.stdout) == {}  # dvc.lock intact and up to date


def test_unreachable_mlflow_server_fails_in_one_line_before_any_training(smoke):
    ws = smoke["ws"]
    runs = len(retrain_runs(ws))
    started = time.perf_counter()
    done = pipeline("--workspace", ws, env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    assert done.returncode == 2
    line = error_line(done)
    assert line.startswith("datencoder pipeline: error: MLflow tracking server http://127.0.0.1:")
    assert "unreachable" in line
    assert "Traceback" not in done.stderr
    assert len(retrain_runs(ws)) == runs  # refused before Prefect started a run
    assert time.perf_counter() - started < 60
    serve = pipeline("--workspace", ws, "--serve")  # a per-run Prefect server would die with the process
    assert serve.returncode == 2 and "--serve needs a Prefect server" in error_line(serve)


# --- scheduling: a served deployment on a real Prefect server -------------------------------------------
@contextlib.contextmanager
def process(argv: list[str], env: dict, log: Path, cwd: Path = ROOT):
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop_session(proc)


def wait_for(check, what: str, timeout: float, proc=None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if result := check():
                return result
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited {proc.returncode}\n{log.read_text()[-3000:] if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.5)


def test_cron_deployment_served_and_triggered_through_a_prefect_server(smoke, tmp_path):
    import requests

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if k not in STACK_ENV}
    server_env = {**env, "PREFECT_HOME": str(tmp_path / "server"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                  "PREFECT_UI_ENABLED": "false"}
    with process([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], server_env,
                 tmp_path / "server.log") as server:
        wait_for(lambda: requests.get(f"{api}/health", timeout=2).ok, "prefect server", 180, server,
                 tmp_path / "server.log")
        client_env = {**env, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "client")}
        with process([str(BIN / "datencoder"), "pipeline", "--workspace", str(smoke["ws"]), "--serve",
                      "--cron", "0 3 * * 1"], client_env, tmp_path / "serve.log") as serve:
            deployment = wait_for(
                lambda: requests.get(f"{api}/deployments/name/retrain/retrain-smoke", timeout=5).json()["id"],
                "the served deployment", 180, serve, tmp_path / "serve.log")
            schedules = requests.get(f"{api}/deployments/{deployment}", timeout=5).json()["schedules"]
            assert [s["schedule"]["cron"] for s in schedules] == ["0 3 * * 1"]
            trigger = ("from prefect.deployments import run_deployment\n"
                       "run = run_deployment('retrain/retrain-smoke', timeout=600, poll_interval=2)\n"
                       "print(run.state.type.value, run.id)")
            done = subprocess.run([sys.executable, "-c", trigger], env=client_env, capture_output=True, text=True,
                                  timeout=700)
            assert done.returncode == 0, done.stderr[-3000:]
            state, run_id = done.stdout.split()[-2:]
            assert state == "COMPLETED", (tmp_path / "serve.log").read_text()[-4000:]
            run = requests.get(f"{api}/flow_runs/{run_id}", timeout=5).json()
            assert run["deployment_id"] == deployment and run["parameters"]["workspace"] == str(smoke["ws"])


def test_ui_keeps_the_run_server_up_with_its_report_plots_and_progress(smoke, tmp_path):
    """`pipeline --ui`: the run's own Prefect server serves its UI and stays up after the run (a cached re-run
    here) until Ctrl-C; the stage plots and progress published through it are artifacts there."""
    import signal
    import threading

    import requests
    from PIL import Image

    ws = smoke["ws"]
    run = pipeline("--workspace", ws, "--ui", wait=False)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(run.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 600
        while not any("Prefect UI at " in line for line in lines):
            assert run.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.5)
        ui = next(line for line in lines if "Prefect UI at " in line).split("Prefect UI at ")[1].split()[0]
        api = f"{ui}/api"
        page = requests.get(ui, timeout=30)
        assert page.ok and "<html" in page.text.lower()  # the UI itself, after the run
        keys = {a["key"]: a["type"] for a in requests.post(f"{api}/artifacts/filter", json={}, timeout=30).json()}
        assert keys.get("retrain-report") == "markdown"

        # what evaluate publishes, through the same functions, into this server
        out = tmp_path / "evaluate"
        (out / "grids").mkdir(parents=True)
        Image.new("RGB", (32, 32), (200, 30, 30)).save(out / "tradeoff.png")
        Image.new("RGB", (64, 32), (30, 30, 200)).save(out / "grids" / "ours.png")
        script = ("from prefect import flow\n"
                  "from components.progress import Progress\n"
                  "from flows.retrain import progress_artifact, publish_images\n"
                  "@flow\n"
                  "def show():\n"
                  "    with progress_artifact('evaluate'):\n"
                  "        p = Progress('ours concepts', 2)\n"
                  "        p.update(1)\n"
                  "        p.update(2)\n"
                  f"    publish_images('evaluate', {{'report': {{'plot': {str(out / 'tradeoff.png')!r}}}}})\n"
                  "show()\n")
        env = {k: v for k, v in os.environ.items() if k not in STACK_ENV}
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**env, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "client")})
        assert done.returncode == 0, done.stderr[-3000:]
        artifacts = {a["key"]: a for a in requests.post(f"{api}/artifacts/filter", json={}, timeout=30).json()}
        assert artifacts["evaluate-progress"]["type"] == "progress" and artifacts["evaluate-progress"]["data"] == 100
        plots = artifacts["evaluate-plots"]
        assert plots["type"] == "markdown" and plots["data"].count("data:image/png;base64,") == 2
        assert "### ours" in plots["data"]
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGINT)
        run.wait(timeout=300)  # drains its logs to the server, then stops it
    stdout = run.stdout.read()  # (stderr is the reader thread's)
    assert run.returncode == 0, "".join(lines)[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1])["prefect_ui"] == ui
    with pytest.raises(requests.RequestException):
        requests.get(f"{api}/health", timeout=5)  # Ctrl-C stopped the server too


# --- a clean stop ---------------------------------------------------------------------------------------
def descendants(pid: int) -> dict[tuple[int, int], str]:
    """(pid, start time) -> command line of every process below `pid` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            with contextlib.suppress(OSError, IndexError):
                started = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[19])
                found[(child, started)] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                todo.append(child)
    return found


def alive(process: tuple[int, int]) -> bool:
    """Whether the process (pid, start time) still runs (not a zombie, not a new process with its pid)."""
    with contextlib.suppress(OSError, IndexError):
        fields = Path(f"/proc/{process[0]}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z" and int(fields[19]) == process[1]
    return False


@pytest.mark.slow  # a pipeline run up to its training workers (minutes on 2 cores)
def test_sigterm_mid_run_stops_everything_the_run_started(smoke, tmp_path):
    """SIGTERM while pre-training runs on the run's Ray cluster: the run ends, and its Prefect server, Ray
    cluster and workers end with it (no orphan)."""
    import signal

    import requests

    ws = smoke["ws"]
    params = ws / "params.yaml"
    original = params.read_text()
    values = yaml.safe_load(original)
    # a longer run in storage of its own: pre-training is not taken from the cache and trains while we stop it
    values["pretrain"].update(max_steps=1000, storage=str(tmp_path / "checkpoints"))
    params.write_text(yaml.safe_dump(values, sort_keys=False))
    run = pipeline("--workspace", ws, wait=False)
    seen: dict[tuple[int, int], str] = {}
    try:
        deadline = time.monotonic() + 600
        while not any("RayTrainWorker" in c for c in seen.values()):  # the training workers run
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
            seen.update(descendants(run.pid))
            time.sleep(0.5)
        seen.update(descendants(run.pid))
        assert any("prefect server start" in c for c in seen.values()) and any("raylet" in c for c in seen.values())
        api = next(c.split("--port ")[1].split()[0] for c in seen.values() if "prefect server start" in c)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=300)
    finally:
        params.write_text(original)
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0 and "datencoder pipeline: interrupted" in err, err[-3000:]
    deadline = time.monotonic() + 60  # Ray's processes notice their driver is gone within seconds
    while (left := {p: c for p, c in seen.items() if alive(p)}) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, left
    with pytest.raises(requests.RequestException):
        requests.get(f"http://127.0.0.1:{api}/api/health", timeout=5)
    assert not lock_is_held(ws / ".datencoder" / "pipeline.lock")


# --- team mode: MLflow server with a database and S3 artifacts, S3 for DVC and Ray checkpoints -----------
SECRET = "team-secret-9c41e0d2"


@pytest.mark.slow
def test_team_mode_logs_and_registers_through_an_mlflow_server_on_s3(smoke, tmp_path):
    import boto3
    import requests
    from moto.server import ThreadedMotoServer

    from components.config import load_config
    from components.orchestration.dvc import run_dvc
    from components.orchestration.workspace import init_workspace

    moto_port, mlflow_port = free_port(), free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port)
    moto.start()
    s3_url = f"http://127.0.0.1:{moto_port}"
    aws = {"AWS_ACCESS_KEY_ID": "team-key-id", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        s3 = boto3.client("s3", endpoint_url=s3_url, aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=SECRET, region_name="us-east-1")
        for bucket in ("mlflow", "dvc", "ckpt"):
            s3.create_bucket(Bucket=bucket)
        env = {k: v for k, v in os.environ.items() if k not in STACK_ENV}
        server_env = {**env, **aws, "MLFLOW_S3_ENDPOINT_URL": s3_url}
        with process([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                      "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                      "--artifacts-destination", "s3://mlflow/artifacts", "--workers", "1"], server_env,
                     tmp_path / "mlflow.log") as server:
            uri = f"http://127.0.0.1:{mlflow_port}"
            wait_for(lambda: requests.get(f"{uri}/health", timeout=2).ok, "mlflow server", 180, server,
                     tmp_path / "mlflow.log")
            # a team workspace: the same smoke config with S3 checkpoints and an S3 DVC remote (config only)
            ws = tmp_path / "ws"
            values = yaml.safe_load((smoke["ws"] / "params.yaml").read_text())
            values["pretrain"]["storage"] = "s3://ckpt/runs"
            values["pipeline"]["stages"] = list(STAGES)  # every stage: the variants' checkpoints go to S3 too
            init_workspace(ws, load_config(overrides=values, preset="smoke"))
            run_dvc(ws, "remote", "add", "--local", "-d", "team", "s3://dvc/store")  # the team's default remote
            run_dvc(ws, "remote", "modify", "--local", "team", "endpointurl", s3_url)
            out = report(pipeline("--workspace", ws,
                                  env={**aws, "MLFLOW_TRACKING_URI": uri, "AWS_ENDPOINT_URL": s3_url}))

            from mlflow import MlflowClient

            client = MlflowClient(uri)
            version = client.get_model_version_by_alias("datencoder-smoke", "champion")
            assert int(version.version) == out["stages"]["register"]["version"]
            keys = {o["Key"] for o in s3.list_objects_v2(Bucket="mlflow")["Contents"]}
            assert any(k.endswith("encoder/model.safetensors") for k in keys)  # the logged model, on S3
            assert s3.list_objects_v2(Bucket="dvc").get("KeyCount", 0) > 0
            assert out["stages"]["pretrain"]["checkpoint"].startswith("s3://ckpt/runs/")
            variant_keys = {o["Key"] for o in s3.list_objects_v2(Bucket="ckpt", Prefix="runs/variants/")["Contents"]}
            variant_runs = {k.split("/")[2] for k in variant_keys} - {""}  # "": the folder's own marker
            assert len(variant_runs) == 6 and all(run.startswith("encoder-") for run in variant_runs)
            markdown = Path(out["report"]).read_text()
            assert uri in markdown and "## Metrics" in markdown  # links into the team's MLflow UI
            artifacts = dict(prefect_db(ws).execute("select key, type from artifact where key is not null").fetchall())
            assert artifacts == {"retrain-report": "markdown", "retrain-metrics": "table",
                                 **{f"{stage}-progress": "progress" for stage in STAGES
                                    if stage not in ("prepare_data", "register")},
                                 "evaluate-plots": "markdown", "ablate-plots": "markdown"}
            plots = prefect_db(ws).execute("select data from artifact where key = 'evaluate-plots'").fetchone()[0]
            assert plots.count("data:image/png;base64,") >= 2  # the trade-off plot and the sample grids, inline
            assert "| claim | paper | metric |" in markdown  # findings as a table
            assert not (ws / "mlflow.db").exists()
            # no secret in MLflow (params, tags), Prefect's database (logs, parameters, artifacts) or DVC config
            for run_id in (out["mlflow_parent_run_id"], out["stages"]["pretrain"]["mlflow_run_id"]):
                run = client.get_run(run_id)
                assert SECRET not in json.dumps([run.data.params, run.data.tags])
            for path in (ws / ".prefect" / "prefect.db", tmp_path / "server.db", ws / ".dvc" / "config"):
                assert SECRET.encode() not in path.read_bytes()
    finally:
        moto.stop()


# --- infra: the definitions are consistent (docker itself cannot run here; tests/infra checks the rest) ----
def test_compose_prefect_yaml_and_kuberay_use_one_image_and_documented_variables():
    from flows.retrain import retrain

    infra = ROOT / "infra"
    text = (infra / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker", "ray-head",
            "ray-worker"} <= set(services)
    project = {name for name, s in services.items() if s.get("build", {}).get("dockerfile") == "infra/Dockerfile"}
    assert {"mlflow", "prefect-server", "prefect-worker", "ray-head", "ray-worker", "preflight"} <= project
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert any(a.startswith("--artifacts-destination=s3://") for a in services["mlflow"]["command"])
    assert services["prefect-worker"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    dockerfile = (infra / "Dockerfile").read_text()
    assert "-c constraints.txt" in dockerfile and re.search(r"^FROM .* AS mlflow-server$", dockerfile, re.M)
    # every variable compose reads is documented, and no secret has a default
    documented = (infra / "README.md").read_text()
    for var in set(re.findall(r"\$\{(\w+)", text)):
        assert f"`{var}`" in documented, var
    for secret in ("POSTGRES_PASSWORD", "S3_ROOT_PASSWORD", "MLFLOW_S3_SECRET", "PIPELINE_S3_SECRET", "RAY_S3_SECRET",
                   "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY", "PREFECT_AUTH_STRING", "RAY_AUTH_TOKEN"):
        assert re.findall(rf"\$\{{{secret}(\W)", text) and f"${{{secret}:-" not in text

    deployments = {d["name"]: d for d in yaml.safe_load((infra / "prefect.yaml").read_text())["deployments"]}
    assert set(deployments) == {"retrain-toy", "retrain-smoke"}
    for deployment in deployments.values():
        module, name = deployment["entrypoint"].split(":")
        assert (ROOT / module).is_file() and name == "retrain" and retrain.name == "retrain"
        assert set(deployment["parameters"]) == {"workspace", "preset", "refresh", "stages"}
    from components.config import load_config

    assert deployments["retrain-toy"]["schedules"][0]["cron"] == load_config("toy").pipeline.cron
    assert "schedules" not in deployments["retrain-smoke"]  # on demand: the stack's own check
    for manifest in (infra / "kuberay").glob("*.yaml"):
        images = set(re.findall(r"image: (\S+)", manifest.read_text()))
        assert images <= {"ghcr.io/datencoder/datencoder:0.1.0-cu130"}, manifest
    assert "ghcr.io/datencoder/datencoder:0.1.0-cpu" in text


def test_only_transient_errors_are_retried():
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
    )
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (
        RESOURCE_DOES_NOT_EXIST,
        TEMPORARILY_UNAVAILABLE,
    )
    from prefect.task_engine import TaskRunTimeoutError

    from components.errors import UserError
    from components.orchestration.stages import TransientError, is_transient

    def s3_reply(status: int, code: str) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    def wrapped(cause: BaseException) -> RuntimeError:
        try:
            raise RuntimeError("stage failed") from cause
        except RuntimeError as e:
            return e

    transient = [EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), s3_reply(503, "ServiceUnavailable"),
                 s3_reply(400, "SlowDown"), MlflowException("unavailable", TEMPORARILY_UNAVAILABLE),
                 ConnectionRefusedError(), TimeoutError(), TransientError("dvc push failed"),
                 wrapped(ConnectionResetError())]
    permanent = [s3_reply(403, "AccessDenied"), s3_reply(404, "NoSuchBucket"), NoCredentialsError(),
                 MlflowException("no such run", RESOURCE_DOES_NOT_EXIST), UserError("bad config"), ValueError("bug"),
                 wrapped(KeyError("x")), None,
                 # the stage's own timeout (pipeline.timeout_s, 6 h): a retry would take as long again
                 TaskRunTimeoutError("Scope timed out after 21600 second(s)."),
                 wrapped(TaskRunTimeoutError("Scope timed out after 21600 second(s)."))]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)


def test_a_pipeline_in_the_checkout_reads_its_config_once(monkeypatch):
    """`datencoder pipeline` in the checkout parses params.yaml once; the main job hands that config to the flow."""
    from components.orchestration import workspace
    from components.orchestration.stages import dvc_view

    real, calls = workspace.load_config, []
    monkeypatch.setattr(workspace, "load_config", lambda *a, **k: calls.append(k) or real(*a, **k))
    path, cfg = workspace.resolve(None, None, None)
    assert path == ROOT and len(calls) == 1
    assert dvc_view(cfg) == dvc_view(real(path=ROOT / "params.yaml"))
    calls.clear()
    assert workspace.resolve("toy", None, None)[0] == ROOT and len(calls) == 1  # params.yaml's own preset


def test_a_workspace_elsewhere_trains_an_encoder_of_its_own():
    """Its params.yaml names the encoder relative to it: its pretrain stage never writes the committed one."""
    from components.config import load_config
    from components.orchestration.workspace import workspace_params

    toy = load_config("toy")
    assert Path(toy.personalize.encoder).is_absolute()  # the committed encoder, read from the home
    params = workspace_params(toy)
    assert params["personalize"]["encoder"] == "models/toy-encoder"
    assert Path(params["base"]["pretrained"]).is_absolute()  # the read-only inputs stay the home's
