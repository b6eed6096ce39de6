"""`make team-check`: a rehearsal of the team stack (infra/compose.yaml) as local processes on loopback.

    .venv/bin/python infra/team_check.py [--keep] [--timeout 900]      # prints one JSON object; exit 0 = all checks

Each service runs the command, settings and credentials of its compose service (read from infra/compose.yaml as
compose reads it, infra/stack.py, plus the image's ENV of infra/Dockerfile), with fresh random secrets that pass
the stack's preflight check. Only locations change, as a container would see them: service names become
127.0.0.1 and free ports, image paths (/app, /workspaces, the MLflow auth store, the user's home) folders of a
scratch directory, and each Ray node gets its own temp dir and agent ports (several nodes share this host).
Two services have stand-ins: Postgres is sqlite files (MLflow's backend store, Prefect's database) and MinIO is
moto's S3 server (the `buckets` job: the three buckets made with boto3; moto does not enforce the per-service
key policies).

Started, in compose's order: the `preflight` job, S3, `mlflow` (the basic-auth app), `prefect-server` (auth string),
`ray-head` and one `ray-worker` (token auth), `prefect-worker` (its container's script: the DVC remote, a Ray node
without CPUs, the process worker); then the `deploy` job (the work pool and infra/prefect.yaml's deployments).
Each long-running service is waited for with its compose healthcheck. Then it triggers `retrain/retrain-smoke`
through the Prefect API (the worker runs it: data and DVC remote, checkpoints and MLflow artifacts on S3) and
checks: the flow run Completed; the version it registered on the authenticated MLflow server, with the alias
expected of a model's first version (`champion`), its preset and commit; MLflow and Prefect answer 401 without
credentials; the Ray cluster has its three nodes; each bucket holds what it should; no secret in the run's
Prefect logs or MLflow params. Everything it started is stopped at the end, also on failure, Ctrl-C or SIGTERM,
and it checks that no process is left (every process carries a marker in its environment).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import stack


ROOT = stack.INFRA.parent
BIN = Path(sys.executable).parent
MARKER = "DATENCODER_TEAM_CHECK"
SERVICES = ("mlflow", "prefect-server", "ray-head", "ray-worker", "prefect-worker")  # long-running, in start order
PORTS = {"mlflow": 5000, "prefect-server": 4200, "ray-head": 6379, "minio": 9000}  # inside the containers
EXPECTED_ALIAS = "champion"  # what a model's first version gets (components/serving/registry.py)
SMOKE = "retrain/retrain-smoke"
CHECKS = ("preflight", "deploy", "scheduled_deployment", "flow_run_completed", "registered_with_alias",
          "commit_recorded", "unauthenticated_401", "ray_three_nodes", "s3", "no_secret_logged", "no_orphans")


def log(message: str) -> None:
    print(f"team-check: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_secrets() -> dict[str, str]:
    """A value for every secret of infra/.env.example: random hex, as the docs tell a platform engineer to make."""
    example = stack.env_file()
    values = {name: secrets.token_hex(24) for name in example
              if re.search(r"PASSWORD|SECRET|TOKEN", name) and name != "PREFECT_AUTH_STRING"}
    values["PREFECT_AUTH_STRING"] = f"admin:{secrets.token_hex(24)}"
    return {**example, **values, "GIT_COMMIT": "unknown", "RAY_WORKERS": "1"}


class Stack:
    """The processes of one rehearsal, their scratch directory and the locations they see."""

    def __init__(self, scratch: Path, env: dict[str, str]):
        self.scratch, self.env, self.run_id = scratch, env, uuid.uuid4().hex
        self.ports = {name: free_port() for name in PORTS}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = scratch / "logs"
        self.logs.mkdir()
        (scratch / "home").mkdir()
        self.services = stack.compose(env)["services"]
        self.s3 = f"http://127.0.0.1:{self.ports['minio']}"

    # --- locations ----------------------------------------------------------------------------------
    def localize(self, text: str, service: str | None = None) -> str:
        """A value of the compose file as this host sees it (module docstring: only locations change)."""
        p, s = self.ports, self.scratch
        replacements = {"http://mlflow:5000": f"http://127.0.0.1:{p['mlflow']}",
                        "http://prefect-server:4200": f"http://127.0.0.1:{p['prefect-server']}",
                        "ray-head:6379": f"127.0.0.1:{p['ray-head']}", "http://minio:9000": self.s3,
                        "/app/infra/mlflow-auth.ini": str(s / "mlflow-auth.ini"),
                        "/app/.prefect": str(s / "prefect-worker"), "/workspaces": str(s / "workspaces"),
                        "/cache/huggingface": str(s / "hf-cache")}
        if service in PORTS:  # the service's own port, as its healthcheck and command name it inside its container
            replacements[f"127.0.0.1:{PORTS[service]}"] = f"127.0.0.1:{p[service]}"
        for old, new in replacements.items():
            text = text.replace(old, new)
        return str(ROOT) if text == "/app" else text

    def environment(self, service: str) -> dict[str, str]:
        """The process environment of a compose service: the image's ENV, the service's environment, localized."""
        env = {**stack.dockerfile_env("mlflow-server" if service == "mlflow" else "base"),
               **{k: str(v) for k, v in (self.services[service].get("environment") or {}).items()}}
        env = {k: self.localize(v, service) for k, v in env.items()}
        if service == "mlflow":  # stand-in: sqlite for Postgres; the auth store in the scratch folder
            env["MLFLOW_BACKEND_STORE_URI"] = f"sqlite:///{self.scratch / 'mlflow.db'}"
        if service == "prefect-server":
            env = {k: v for k, v in env.items() if not k.startswith("PREFECT_SERVER_DATABASE_")}
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{self.scratch / 'prefect.db'}"
        home = self.scratch / "home"
        return {**env, MARKER: self.run_id, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
                "HOME": str(home), "PREFECT_HOME": str(home / ".prefect"), "DVC_GLOBAL_CONFIG_DIR": str(home / "dvc"),
                "LANG": os.environ.get("LANG", "C.UTF-8"), "TMPDIR": str(self.scratch / "tmp")}

    def ray_node_flags(self, node: str) -> list[str]:
        """Where a Ray node keeps its files and listens, beside other nodes on this host."""
        flags = [f"--temp-dir={self.scratch / 'ray' / node}", f"--dashboard-agent-listen-port={free_port()}"]
        if node == "head":
            flags += [f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"]
        return flags

    def command(self, service: str) -> list[str]:
        """The compose command of `service`, localized."""
        argv = [self.localize(str(a), service) for a in self.services[service]["command"]]
        port = str(self.ports.get(service, ""))
        out = []
        for a in argv:
            a = {"0.0.0.0": "127.0.0.1", "--host=0.0.0.0": "--host=127.0.0.1"}.get(a, a)
            if service == "mlflow" and a.startswith("--allowed-hosts="):
                a = f"--allowed-hosts=127.0.0.1:{port},localhost:{port}"
            if a in (f"--port={PORTS.get(service)}", str(PORTS.get(service))) and service in PORTS:
                a = a.replace(str(PORTS[service]), port)
            out.append(a)
        if service == "ray-head":
            out += self.ray_node_flags("head")
        elif service == "ray-worker":
            out += self.ray_node_flags("worker")
        elif service == "prefect-worker":  # its script's `ray start` joins as a third node of this host
            out[-1] = out[-1].replace("ray start ", "ray start " + " ".join(self.ray_node_flags("driver")) + " ", 1)
        return out

    # --- processes ----------------------------------------------------------------------------------
    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        (self.scratch / "tmp").mkdir(exist_ok=True)
        out = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def one_shot(self, name: str, argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        (self.scratch / "tmp").mkdir(exist_ok=True)
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
        (self.logs / f"{name}.log").write_text(done.stdout + done.stderr)
        return done

    def alive(self) -> None:
        """Every long-running service started so far is still running (one that died fails the rehearsal now, not
        at the deadline)."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: {self.tail(name)}")

    def healthy(self, service: str, deadline: float) -> float:
        """Wait for the compose healthcheck of `service` to pass; returns the seconds it took."""
        test = self.services[service]["healthcheck"]["test"]
        argv = [self.localize(a, service) for a in test[1:]]
        started = time.monotonic()
        while True:
            self.alive()
            if subprocess.run(argv, cwd=ROOT, env=self.environment(service), capture_output=True,
                              timeout=60).returncode == 0:
                return round(time.monotonic() - started, 1)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{service} not healthy in time: {self.tail(service)}")
            time.sleep(1)

    def polling(self, pool: str, deadline: float) -> float:
        """Wait until a worker of `pool` has reported to the Prefect server; returns the seconds it took."""
        env = self.environment("prefect-worker")
        user, _, password = env["PREFECT_API_AUTH_STRING"].partition(":")
        prefect = api(env["PREFECT_API_URL"], (user, password))
        started = time.monotonic()
        while True:
            self.alive()
            reply = prefect("POST", f"/work_pools/{pool}/workers/filter", json={})
            if reply.ok and reply.json():
                return round(time.monotonic() - started, 1)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no worker polls {pool}: {self.tail('prefect-worker')}")
            time.sleep(1)

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def marked(self) -> list[int]:
        """Every live process that carries this rehearsal's marker (and so was started by it, or by its children)."""
        found = []
        needle = f"{MARKER}={self.run_id}".encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if needle in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
        return found

    def stop(self, grace_s: float = 30) -> int:
        """Stop everything, newest first (SIGTERM to each service's session, then every marked process; SIGKILL
        what is left after `grace_s`). Returns how many processes were still alive afterwards."""
        for proc in reversed(list(self.procs.values())):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for pid in self.marked():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        while self.marked() and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in self.marked():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        time.sleep(1)
        return len(self.marked())


# --- the rehearsal ---------------------------------------------------------------------------------------
def api(base: str, auth: tuple[str, str] | None = None):
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    session.auth = auth
    # as Prefect's own client does: a 503 (the server's database busy, as sqlite is while the worker and the
    # deploy job write) or 429/502 is retried with backoff; the server made nothing, so a POST is safe to repeat
    retry = Retry(total=6, backoff_factor=1, status_forcelist=(429, 502, 503), allowed_methods=None,
                  raise_on_status=False)
    session.mount("http://", HTTPAdapter(max_retries=retry))
    return lambda method, path, **kw: session.request(method, base + path, timeout=30, **kw)


def rehearse(s: Stack, summary: dict, deadline: float) -> None:
    import boto3
    import requests

    env = s.env
    checks = summary["checks"]
    # preflight: the example's placeholders are refused, the fresh secrets pass (the compose job's command)
    preflight_env = {**s.environment("preflight")}
    example = stack.compose(stack.env_file())["services"]["preflight"]["environment"]
    refused = s.one_shot("preflight-example", s.command("preflight"), {**preflight_env, **example}, 60)
    done = s.one_shot("preflight", s.command("preflight"), preflight_env, 60)
    summary["preflight"] = {"example_refused": refused.stderr.count("refusing to start"),
                            "secrets_checked": len(example), "fresh_secrets_pass": done.returncode == 0}
    checks["preflight"] = refused.returncode == 2 and summary["preflight"]["example_refused"] == len(example) \
        and done.returncode == 0
    if done.returncode:
        raise RuntimeError(f"preflight refused the generated secrets: {done.stderr}")

    # S3 (moto's server for MinIO) and the buckets job's buckets
    s.start("minio", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s.ports["minio"])],
            {MARKER: s.run_id, "PATH": os.environ.get("PATH", "")})
    while True:
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(s.s3, timeout=2).status_code < 500:
                break
        if time.monotonic() > deadline:
            raise RuntimeError(f"moto server did not start: {s.tail('minio')}")
        time.sleep(0.5)
    root = boto3.client("s3", endpoint_url=s.s3, aws_access_key_id=env["S3_ROOT_USER"],
                        aws_secret_access_key=env["S3_ROOT_PASSWORD"], region_name=env["AWS_DEFAULT_REGION"])
    buckets = {"mlflow": env["MLFLOW_BUCKET"], "dvc": env["DVC_BUCKET"], "checkpoints": env["CHECKPOINT_BUCKET"]}
    for bucket in buckets.values():
        root.create_bucket(Bucket=bucket)
    ini = (stack.INFRA / "mlflow-auth.ini").read_text()
    (s.scratch / "mlflow-auth.ini").write_text(re.sub(r"^database_uri = .*$",
                                                      f"database_uri = sqlite:///{s.scratch / 'auth.db'}", ini,
                                                      flags=re.M))

    summary["services"] = {}
    for service in SERVICES:
        started = time.monotonic()
        s.start(service, s.command(service), s.environment(service))
        ready = s.healthy(service, deadline) if "healthcheck" in s.services[service] else None
        summary["services"][service] = {"command": " ".join(s.command(service))[:300],
                                        "port": s.ports.get(service), "ready_s": ready}
        if service == "prefect-worker":  # polling its pool (which it creates if the deploy job has not yet)
            summary["services"][service]["ready_s"] = s.polling("datencoder", deadline)
        log(f"{service} up ({time.monotonic() - started:.0f} s)")
    deploy = s.one_shot("deploy", s.command("deploy"), s.environment("deploy"), 600)
    checks["deploy"] = deploy.returncode == 0
    if deploy.returncode:
        raise RuntimeError(f"deploy failed: {s.tail('deploy', 30)}")

    client = s.environment("prefect-worker")
    user, _, password = client["PREFECT_API_AUTH_STRING"].partition(":")
    prefect = api(client["PREFECT_API_URL"], (user, password))
    mlflow_auth = (client["MLFLOW_TRACKING_USERNAME"], client["MLFLOW_TRACKING_PASSWORD"])
    deployments = {}
    for name in ("retrain/retrain-toy", SMOKE):
        found = prefect("GET", f"/deployments/name/{name}")
        found.raise_for_status()
        d = found.json()
        deployments[name] = {"id": d["id"], "pool": d["work_pool_name"],
                             "cron": [x["schedule"].get("cron") for x in d.get("schedules", [])]}
    summary["deployments"] = {k: {"pool": v["pool"], "cron": v["cron"]} for k, v in deployments.items()}
    checks["scheduled_deployment"] = deployments["retrain/retrain-toy"]["cron"] == ["0 3 * * 1"]

    # one run through the worker
    started = time.monotonic()
    run = prefect("POST", f"/deployments/{deployments[SMOKE]['id']}/create_flow_run", json={})
    run.raise_for_status()
    run_id = run.json()["id"]
    log(f"triggered {SMOKE} (flow run {run_id}); the worker runs it")
    while True:
        s.alive()
        state = prefect("GET", f"/flow_runs/{run_id}").json()["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"flow run {run_id} still {state['type']} at the deadline: {s.tail('prefect-worker')}")
        time.sleep(3)
    summary["flow_run"] = {"id": run_id, "state": state["type"], "message": (state.get("message") or "")[:300],
                           "seconds": round(time.monotonic() - started, 1)}
    checks["flow_run_completed"] = state["type"] == "COMPLETED"

    # the registered version, on the authenticated MLflow server
    mlflow = api(client["MLFLOW_TRACKING_URI"], mlflow_auth)
    name = "datencoder-smoke"
    reply = mlflow("GET", "/api/2.0/mlflow/registered-models/alias", params={"name": name, "alias": EXPECTED_ALIAS})
    version = reply.json().get("model_version", {}) if reply.ok else {}
    tags = {t["key"]: t["value"] for t in version.get("tags", [])}
    summary["registered"] = {"model": name, "version": version.get("version"),
                             "alias": EXPECTED_ALIAS if version else None, "preset": tags.get("preset"),
                             "git_commit": tags.get("git_commit"), "data_version": tags.get("data_version")}
    checks["registered_with_alias"] = bool(version) and tags.get("preset") == "smoke"
    checks["commit_recorded"] = tags.get("git_commit", "unknown") != "unknown"
    anonymous = {"mlflow": api(client["MLFLOW_TRACKING_URI"])("GET", "/api/2.0/mlflow/registered-models/get",
                                                               params={"name": name}).status_code,
                 "prefect": api(client["PREFECT_API_URL"])("GET", f"/flow_runs/{run_id}").status_code}
    summary["unauthenticated"] = anonymous
    checks["unauthenticated_401"] = anonymous == {"mlflow": 401, "prefect": 401}

    # the Ray cluster: head, worker, and the Prefect worker's node
    nodes = subprocess.run([str(BIN / "python"), "-c", "import json, ray; ray.init(address='auto', "
                            "logging_level='ERROR'); print(json.dumps([n['Resources'].get('CPU', 0) for n in "
                            "ray.nodes() if n['Alive']]))"], cwd=ROOT,
                           env={**s.environment("prefect-worker"), "RAY_ADDRESS": f"127.0.0.1:{s.ports['ray-head']}"},
                           capture_output=True, text=True, timeout=120)
    cpus = json.loads(nodes.stdout.strip().splitlines()[-1]) if nodes.returncode == 0 else []
    summary["ray"] = {"nodes": len(cpus), "cpus_per_node": sorted(cpus)}
    checks["ray_three_nodes"] = len(cpus) == 3 and sorted(cpus)[:2] == [0, 0]

    # S3: artifacts, the DVC remote, checkpoints
    counts = {}
    for what, bucket in buckets.items():
        pages = root.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        counts[what] = {"bucket": bucket, "objects": len(keys)}
        if what == "mlflow":
            counts[what]["encoder_logged"] = any(k.endswith("encoder/model.safetensors") for k in keys)
        if what == "checkpoints":
            counts[what]["runs"] = sorted({k.split("/")[1] for k in keys if k.startswith("runs/")})
    summary["s3"] = counts
    checks["s3"] = counts["mlflow"].get("encoder_logged", False) and counts["dvc"]["objects"] > 0 \
        and bool(counts["checkpoints"].get("runs"))

    # no secret in the run's Prefect logs or the MLflow records
    logs = prefect("POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}).json()
    secret_values = [v for k, v in env.items() if re.search(r"PASSWORD|SECRET|TOKEN", k)]
    secret_values.append(env["PREFECT_AUTH_STRING"].partition(":")[2])
    text = json.dumps(logs)
    experiments = mlflow("GET", "/api/2.0/mlflow/experiments/search", params={"max_results": 100}).json()
    ids = [e["experiment_id"] for e in experiments.get("experiments", [])]
    runs = mlflow("POST", "/api/2.0/mlflow/runs/search", json={"experiment_ids": ids, "max_results": 100}).json()
    text += json.dumps(runs)
    summary["secrets_in_logs"] = sum(v in text for v in secret_values)
    summary["prefect_log_lines"] = len(logs)
    checks["no_secret_logged"] = summary["secrets_in_logs"] == 0 and len(logs) > 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the whole rehearsal (default 900)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, stores) afterwards")
    args = parser.parse_args()
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="dtc-"))  # short: Ray's socket paths live under it
    summary: dict = {"ok": False, "stand_ins": {"postgres": "sqlite files", "minio": "moto server (S3 API)"},
                     "checks": {}, "scratch": str(scratch)}

    def interrupted(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    s = Stack(scratch, fresh_secrets())
    try:
        rehearse(s, summary, started + args.timeout)
    except KeyboardInterrupt as e:
        summary["error"] = f"interrupted ({e or 'SIGINT'})"
    except Exception as e:  # noqa: BLE001 - reported in the summary, after the teardown
        summary["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
        summary["orphans"] = s.stop()
        summary["logs"] = str(s.logs) if args.keep else None
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    summary["checks"]["no_orphans"] = summary["orphans"] == 0
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["ok"] = "error" not in summary and all(summary["checks"].get(c) for c in CHECKS)
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
