"""The team stack (infra/) on its configuration: the compose file read as compose reads it (infra/stack.py, with the
values of infra/.env.example), the Dockerfile, the KubeRay manifests and the cluster's params file. What can run
here runs for real: the preflight check, DVC and the commit in a workspace laid out as the image lays it out.
`make team-check` (tests/infra/test_team_check.py, slow) runs the services themselves."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml


ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(INFRA))
import stack as compose_file  # noqa: E402  (infra/stack.py)


LONG_RUNNING = {"postgres", "minio", "mlflow", "prefect-server", "ray-head", "ray-worker", "prefect-worker"}
ONE_SHOT = {"preflight", "buckets", "deploy"}
SECRETS = ("POSTGRES_PASSWORD", "S3_ROOT_PASSWORD", "MLFLOW_S3_SECRET", "PIPELINE_S3_SECRET", "RAY_S3_SECRET",
           "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY", "PREFECT_AUTH_STRING", "RAY_AUTH_TOKEN")


def example_env() -> dict[str, str]:
    return compose_file.env_file()


def stack(**env: str) -> dict:
    return compose_file.compose({**example_env(), **env})


def kuberay() -> dict[str, dict]:
    """kind/name -> manifest, every document of infra/kuberay/*.yaml."""
    return {f"{d['kind']}/{d['metadata']['name']}": d for p in sorted((INFRA / "kuberay").glob("*.yaml"))
            for d in yaml.safe_load_all(p.read_text()) if d}


def ray_pod_specs() -> dict[str, dict]:
    """Every Ray pod template of the KubeRay manifests: '<manifest> head|<group>' -> pod spec."""
    specs = {}
    for name, doc in kuberay().items():
        spec = doc.get("spec") or {}
        cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
                   "RayCronJob": spec.get("jobTemplate", {}).get("rayClusterSpec"),
                   "RayService": spec.get("rayClusterConfig")}.get(doc["kind"])
        if cluster:
            specs[f"{name} head"] = cluster["headGroupSpec"]["template"]["spec"]
            specs.update({f"{name} {g['groupName']}": g["template"]["spec"] for g in cluster["workerGroupSpecs"]})
    return specs


def published(services: dict) -> dict[str, list[str]]:
    return {name: [str(p) for p in s.get("ports", [])] for name, s in services.items() if s.get("ports")}


# --- locked down --------------------------------------------------------------------------------------
def test_ports_bind_to_loopback_unless_switched_and_the_ray_dashboard_is_not_published():
    services = stack()["services"]
    ports = published(services)
    assert set(ports) == {"minio", "mlflow", "prefect-server"}
    assert all(p.startswith("127.0.0.1:") for ps in ports.values() for p in ps), ports
    exposed = published(stack(BIND_ADDRESS="10.0.0.5")["services"])  # the documented switch, behind a proxy
    assert all(p.startswith("10.0.0.5:") for ps in exposed.values() for p in ps)
    head = services["ray-head"]
    assert "ports" not in head and "--dashboard-host=127.0.0.1" in head["command"]
    assert "BIND_ADDRESS" in (INFRA / "README.md").read_text()


def test_mlflow_needs_a_login_and_a_secret_key_and_prefect_an_auth_string():
    services = stack()["services"]
    env = example_env()
    mlflow = services["mlflow"]
    assert "--app-name=basic-auth" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == env["MLFLOW_ADMIN_PASSWORD"]
    # the basic-auth app refuses to start without a static key for its forms (CSRF), the same in every worker
    assert mlflow["environment"]["MLFLOW_FLASK_SERVER_SECRET_KEY"] == env["MLFLOW_FLASK_SECRET_KEY"]
    ini = (ROOT / mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"].removeprefix("/app/")).read_text()
    assert "default_permission = NO_PERMISSIONS" in ini and "admin_password" not in ini  # the secret is env only
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == env["PREFECT_AUTH_STRING"]
    clients = [name for name, s in services.items() if "PREFECT_API_URL" in (s.get("environment") or {})]
    assert {"prefect-worker", "deploy", "ray-head", "ray-worker"} <= set(clients)
    for name in clients:
        client_env = services[name]["environment"]
        assert client_env["PREFECT_API_AUTH_STRING"] and client_env["MLFLOW_TRACKING_PASSWORD"], name
    with pytest.raises(KeyError, match="MLFLOW_ADMIN_PASSWORD"):  # no secret, no stack
        compose_file.compose({k: v for k, v in env.items() if k != "MLFLOW_ADMIN_PASSWORD"})


def test_the_mlflow_auth_app_and_its_forms_package_are_in_the_lock_and_the_image():
    """The basic-auth app imports Flask-WTF: the `auth` extra of mlflow, pinned in the lock the image installs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(re.match(r"mlflow\[auth\]", d) for d in project["dependencies"])
    lock = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^flask-wtf==[\d.]+$", lock, re.M) and re.search(r"^wtforms==[\d.]+$", lock, re.M)
    assert "-c constraints.txt" in (INFRA / "Dockerfile").read_text()
    import flask_wtf  # noqa: F401  (installed here by `make setup` from the same lock)


def test_every_image_is_pinned_and_the_project_image_matches_the_lock():
    services = stack()["services"]
    images = [s["image"] for s in services.values()]
    images += [i for p in (INFRA / "kuberay").glob("*.yaml") for i in re.findall(r"image:\s*(\S+)", p.read_text())]
    images += re.findall(r"^FROM\s+(\S+)", (INFRA / "Dockerfile").read_text(), re.M)
    for image in images:
        if image in ("base",):  # a stage of the same Dockerfile
            continue
        name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        assert tag and tag != "latest" and not image.endswith(":latest"), image
        assert re.search(r"\d", tag), image  # a version, not a moving name
    # CPU and CUDA tags: the version is the project's, the CUDA build is the lock's (nvidia-*-cu13: CUDA 13.0)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    cuda = re.search(r"^nvidia-cuda-runtime==(\d+)\.(\d+)", (ROOT / "constraints.txt").read_text(), re.M).groups()
    variant = f"cu{cuda[0]}{cuda[1]}"
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(rf"^\s+{variant}\) index=https://pypi.org/simple", dockerfile, re.M)
    assert f"TORCH_VARIANT={variant}" in dockerfile and f":{version}-{variant}" in dockerfile
    assert "cu128" not in dockerfile + (INFRA / "README.md").read_text()
    project = f"ghcr.io/datencoder/datencoder:{version}"
    assert {s["image"] for n, s in services.items() if n in LONG_RUNNING - {"postgres", "minio"}} == \
        {f"{project}-cpu", f"{project}-cpu-mlflow"}
    assert all(s["build"]["args"]["TORCH_VARIANT"] == "cpu" for s in services.values() if "build" in s)
    for where, spec in ray_pod_specs().items():  # GPU pods run the CUDA build
        for container in spec["containers"] + spec.get("initContainers", []):
            assert container["image"] == f"{project}-{variant}", where


def test_one_least_privilege_s3_key_per_service_and_the_root_keys_stay_in_minio():
    env = example_env()
    services = stack()["services"]
    root = (env["S3_ROOT_USER"], env["S3_ROOT_PASSWORD"])
    holders = {name for name, s in services.items()
               if any(secret in str(v) for v in (s.get("environment") or {}).values() for secret in root)}
    assert holders == {"minio", "buckets", "preflight"}  # preflight only checks the password is no placeholder
    assert services["preflight"]["command"] == ["python", "infra/preflight.py"]
    keys = {name: s["environment"]["AWS_ACCESS_KEY_ID"] for name, s in services.items()
            if "AWS_ACCESS_KEY_ID" in (s.get("environment") or {})}
    assert keys == {"mlflow": env["MLFLOW_S3_KEY"], "prefect-worker": env["PIPELINE_S3_KEY"],
                    "ray-head": env["RAY_S3_KEY"], "ray-worker": env["RAY_S3_KEY"]}
    assert "AWS_ACCESS_KEY_ID" not in services["deploy"]["environment"]  # Prefect only: no S3 at all
    init = " ".join(services["buckets"]["command"])
    buckets = {"mlflow": {"MLFLOW_BUCKET"}, "pipeline": {"DVC_BUCKET", "CHECKPOINT_BUCKET"},
               "ray": {"CHECKPOINT_BUCKET"}}
    for who, allowed in buckets.items():
        assert f"datencoder-{who}" in init
        policy = json.loads((INFRA / "minio-policies" / f"{who}.json").read_text())
        resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
        actions = {a for statement in policy["Statement"] for a in statement["Action"]}
        assert {r.removeprefix("arn:aws:s3:::").split("/")[0] for r in resources} == allowed, who
        assert not any("*" in a for a in actions) and all(s["Effect"] == "Allow" for s in policy["Statement"])


def test_no_secret_on_a_command_line():
    """Secrets reach processes through their environment: a command line is visible to every `ps` on the host."""
    env = example_env()
    values = [env[name] for name in SECRETS] + [env["PREFECT_AUTH_STRING"].partition(":")[2]]
    for name, service in stack()["services"].items():
        argv = " ".join(map(str, service.get("command") or [])) + " " + " ".join(
            map(str, (service.get("healthcheck") or {}).get("test", [])))
        argv = argv.replace('"$$MLFLOW_S3_SECRET"', "").replace('"$MLFLOW_S3_SECRET"', "")
        leaked = [v for v in values if v in argv]
        if name == "buckets":  # mc takes a new user's key as an argument: inside that one-shot job only
            assert not {env["S3_ROOT_PASSWORD"], env["POSTGRES_PASSWORD"]} & set(leaked)
            continue
        assert not leaked, name
    assert "PGPASSWORD" in stack()["services"]["mlflow"]["environment"]  # libpq's own variable
    assert "@postgres" in stack()["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert ":" not in stack()["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].split("@")[0][13:]


def test_restart_policies_limits_and_start_order():
    services = stack()["services"]
    assert set(services) == LONG_RUNNING | ONE_SHOT
    for name in LONG_RUNNING:
        assert services[name]["restart"] == "unless-stopped", name
        limits = services[name]["deploy"]["resources"]["limits"]
        assert limits["cpus"] and limits["memory"], name
    for name in ONE_SHOT:
        assert services[name]["restart"] == "no", name
    for name, service in services.items():  # nothing starts before the secrets are checked
        if name not in ("preflight", "buckets"):
            assert service["depends_on"]["preflight"] == {"condition": "service_completed_successfully"}, name
    assert services["buckets"]["depends_on"]["minio"]["condition"] == "service_healthy"
    for name in ("ray-head", "ray-worker", "prefect-worker"):
        assert services[name]["shm_size"] == "2gb", name
    assert services["prefect-worker"]["init"] is True  # reaps the Ray node's processes


def test_placeholder_secrets_are_refused_at_start_up(tmp_path):
    """infra/preflight.py as the compose `preflight` service runs it: the example's placeholders stop the stack
    with one line per secret, naming it and never its value; real secrets pass."""
    env = example_env()
    preflight = stack()["services"]["preflight"]["environment"]
    assert set(preflight) == set(SECRETS)
    base = {k: v for k, v in os.environ.items() if not re.search(r"PASSWORD|SECRET|AUTH_STRING|TOKEN", k)}
    done = subprocess.run([sys.executable, str(INFRA / "preflight.py")], env={**base, **preflight},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert sorted(line.split()[4] for line in lines) == sorted(SECRETS), lines
    assert all(line.startswith("preflight: refusing to start: ") for line in lines)
    assert not any(env[name] in done.stderr for name in SECRETS if name != "PREFECT_AUTH_STRING")
    good = {name: ("admin:" if name == "PREFECT_AUTH_STRING" else "") + os.urandom(24).hex() for name in SECRETS}
    assert subprocess.run([sys.executable, str(INFRA / "preflight.py")], env={**base, **good},
                          capture_output=True, timeout=30).returncode == 0
    short = {**good, "RAY_AUTH_TOKEN": "abc123", "S3_ROOT_PASSWORD": os.urandom(12).hex() + "/@"}
    done = subprocess.run([sys.executable, str(INFRA / "preflight.py")], env={**base, **short},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "RAY_AUTH_TOKEN is shorter than 16" in done.stderr
    assert "S3_ROOT_PASSWORD must be URL-safe" in done.stderr


# --- the Ray cluster and the Prefect worker -------------------------------------------------------------
def test_the_prefect_worker_is_a_ray_node_and_every_ray_process_has_the_token():
    """A Ray driver must run on a node of its cluster: the worker's container joins it without CPUs (no training
    there) before the Prefect worker starts, and every Ray process carries the cluster's token."""
    services = stack()["services"]
    env = example_env()
    worker = services["prefect-worker"]
    script = worker["command"][-1]
    assert worker["command"][:2] == ["sh", "-c"]
    join = re.search(r"ray start (--address=\S+) (.*?) &&", script)
    assert join and join.group(1) == "--address=ray-head:6379" and "--num-cpus=0" in join.group(2)
    assert script.index("ray start") < script.index("exec prefect worker start --pool datencoder --type process")
    assert worker["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    assert "--num-cpus=0" in services["ray-head"]["command"]
    for name in ("ray-head", "ray-worker", "prefect-worker"):
        assert services[name]["environment"]["RAY_AUTH_MODE"] == "token", name
        assert services[name]["environment"]["RAY_AUTH_TOKEN"] == env["RAY_AUTH_TOKEN"], name
    for name in ("ray-worker", "prefect-worker"):  # they wait for a head that answers
        assert services[name]["depends_on"]["ray-head"] == {"condition": "service_healthy"}


def test_the_kuberay_clusters_use_the_sd15_params_and_their_one_secret(tmp_path):
    """The cluster's config file is the sd15 preset (not the toy params.yaml); its pods get S3 and MLflow
    credentials from one Secret, refuse placeholders, and find the HF cache, models and data on the volumes."""
    from components.config import load_config

    manifests = kuberay()
    entrypoints = [d["spec"]["entrypoint"] for d in manifests.values() if d["kind"] == "RayJob"]
    entrypoints += [d["spec"]["jobTemplate"]["entrypoint"] for d in manifests.values() if d["kind"] == "RayCronJob"]
    assert len(entrypoints) == 2
    for entrypoint in entrypoints:
        config = re.search(r"datencoder pretrain --config (\S+)", entrypoint).group(1)
        assert "--preset" not in entrypoint and config == "infra/params/sd15.yaml"
        cfg = load_config(path=ROOT / config)
        sd15 = load_config("sd15")
        assert cfg.preset == "sd15" and cfg.base == sd15.base and cfg.encoder == sd15.encoder
        assert cfg.pretrain.max_steps == sd15.pretrain.max_steps and cfg.personalize.encoder.startswith("/models/")
        assert cfg.pretrain.storage.startswith("s3://checkpoints/")
    claims = {d["metadata"]["name"] for d in manifests.values() if d["kind"] == "PersistentVolumeClaim"}
    assert {d["metadata"]["name"] for d in manifests.values() if d["kind"] == "Namespace"} == {"datencoder"}
    assert all(d["metadata"]["namespace"] == "datencoder" for d in manifests.values() if d["kind"] != "Namespace")
    credentials = dict(line.split("=", 1) for line in (INFRA / "kuberay" / "credentials.env.example").read_text()
                       .splitlines() if line and not line.startswith("#"))
    assert set(credentials) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME",
                                "MLFLOW_TRACKING_PASSWORD"}
    hf_home = compose_file.dockerfile_env()["HF_HOME"]
    for where, spec in ray_pod_specs().items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            sources = [s.get("secretRef", s.get("configMapRef"))["name"] for s in container["envFrom"]]
            assert sources == ["datencoder-endpoints", "datencoder-credentials"], where
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts[hf_home] == "hf-cache" and mounts["/dev/shm"] == "shm", where
            assert "/app/models" not in mounts and mounts["/models"] == "models", where  # baked toy models visible
            assert container["resources"]["limits"] and container["resources"]["requests"], where
        for mount in set(mounts.values()) - {"shm"}:
            assert volumes[mount]["persistentVolumeClaim"]["claimName"] in claims, (where, mount)
        assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
        preflight = [c for c in spec["initContainers"] if c["name"] == "preflight"]
        assert preflight and preflight[0]["command"] == ["python", "infra/preflight.py"], where
        assert preflight[0]["envFrom"] == [{"secretRef": {"name": "datencoder-credentials"}}]
    base = {k: v for k, v in os.environ.items() if not re.search(r"PASSWORD|SECRET|AUTH_STRING|TOKEN", k)}
    done = subprocess.run([sys.executable, str(INFRA / "preflight.py")], env={**base, **credentials},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "AWS_SECRET_ACCESS_KEY" in done.stderr and "MLFLOW_TRACKING_PASSWORD" in done.stderr


def test_the_ray_dashboard_needs_the_token_and_the_network_policy_lets_only_clients_reach_it():
    manifests = kuberay()
    for name, doc in manifests.items():
        if doc["kind"] not in ("RayCluster", "RayJob", "RayCronJob"):
            continue
        cluster = {"RayCluster": doc["spec"], "RayJob": doc["spec"].get("rayClusterSpec"),
                   "RayCronJob": doc["spec"].get("jobTemplate", {}).get("rayClusterSpec")}[doc["kind"]]
        assert cluster["authOptions"] == {"mode": "token"}, name
        for group in cluster["workerGroupSpecs"]:  # min/max replicas mean something only to the autoscaler
            if group["minReplicas"] != group["maxReplicas"]:
                assert cluster.get("enableInTreeAutoscaling") is True, name
            else:
                assert group["replicas"] == group["minReplicas"], name
        job = doc["spec"] if doc["kind"] == "RayJob" else doc["spec"].get("jobTemplate")
        if job:
            assert 0 < job["activeDeadlineSeconds"] <= 6 * 24 * 3600, name  # ends before next week's run
            assert job["submitterPodTemplate"]["metadata"]["labels"] == {"datencoder.io/ray-client": "true"}
    policy = manifests["NetworkPolicy/datencoder-ray"]["spec"]
    assert policy["podSelector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}}
    assert policy["policyTypes"] == ["Ingress"]
    open_rule, dashboard_rule = policy["ingress"]
    assert open_rule == {"from": [{"podSelector": {"matchLabels": {"ray.io/is-ray-node": "yes"}}}]}
    assert dashboard_rule["ports"] == [{"port": 8265, "protocol": "TCP"}]
    assert {"podSelector": {"matchLabels": {"datencoder.io/ray-client": "true"}}} in dashboard_rule["from"]


# --- configuration, not image edits ---------------------------------------------------------------------
def test_checkpoints_are_configured_by_environment_and_bucket_names_agree(monkeypatch):
    from components.config import load_config

    env = example_env()
    services = stack()["services"]
    worker = services["prefect-worker"]["environment"]
    assert worker["DATENCODER_PRETRAIN__STORAGE"] == f"s3://{env['CHECKPOINT_BUCKET']}/runs"
    assert worker["DATENCODER_PIPELINE__DVC_REMOTE"] == "team"
    monkeypatch.setenv("DATENCODER_PRETRAIN__STORAGE", worker["DATENCODER_PRETRAIN__STORAGE"])
    monkeypatch.setenv("DATENCODER_PIPELINE__DVC_REMOTE", "team")
    cfg = load_config(path=ROOT / "params.yaml")  # the image's own params.yaml, unedited
    assert cfg.pretrain.storage == "s3://checkpoints/runs" and cfg.pipeline.dvc_remote == "team"
    # every bucket any infra file names is one of the stack's three, used for its own purpose
    buckets = {env["MLFLOW_BUCKET"]: "mlflow", env["DVC_BUCKET"]: "dvc", env["CHECKPOINT_BUCKET"]: "checkpoints"}
    texts = {p: p.read_text() for p in [*INFRA.rglob("*.yaml"), INFRA / "README.md", ROOT / ".dvc" / "config"]}
    texts[INFRA / "compose.yaml"] = json.dumps(stack())
    for path, text in texts.items():
        for bucket, rest in re.findall(r"s3://([a-z0-9][a-z0-9.-]*)(/\S*)?", text):
            assert bucket in buckets, (path, bucket)
            if "checkpoint" in rest or "runs" in rest or "sd15" in rest:
                assert buckets[bucket] == "checkpoints", (path, bucket, rest)


# --- the image ------------------------------------------------------------------------------------------
def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule for our patterns: last match wins, `!` re-includes, a folder covers its files."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, "*/" + pattern.removeprefix("**/")) and
               pattern.startswith("**/") for p in prefixes):
            result = not negate
    return result


def dockerignore() -> list[str]:
    return [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_the_image_runs_as_a_user_and_gets_no_secrets_data_or_venv():
    dockerfile = (INFRA / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    for stage in stages:
        users = re.findall(r"^USER\s+(\S+)", stage, re.M)
        assert users and users[-1] not in ("root", "0"), stage.splitlines()[0]
    patterns = dockerignore()
    for path in ("infra/.env", ".env", "data/prepared/manifest.parquet", "data/raw/toy-world/x.png",
                 ".venv/bin/python", "outputs/personalize/a.png", "checkpoints/run/step-1/trainer.pt", "mlflow.db",
                 ".git/config", "components/__pycache__/cli.cpython-311.pyc", "infra/kuberay/credentials.env"):
        assert ignored(path, patterns), path
    for path in ("components/cli.py", "models/toy-encoder/model.safetensors", "infra/compose.yaml", "dvc.yaml",
                 "infra/mlflow-auth.ini", "infra/preflight.py", "infra/params/sd15.yaml"):
        assert not ignored(path, patterns), path
    # dependencies are installed before the code is copied: a code change rebuilds the last layers only
    base = stages[0]
    assert base.index("pip install -c constraints.txt .") < base.index("COPY components/ components/")


def image_workspace(tmp: Path) -> Path:
    """/app as infra/Dockerfile builds it: its COPY lines over the build context that .dockerignore leaves
    (no .git)."""
    app = tmp / "app"
    patterns = dockerignore()
    for sources, target in re.findall(r"^COPY (.+) (\S+)$", (INFRA / "Dockerfile").read_text(), re.M):
        for source in sources.split():
            src = ROOT / source.rstrip("/")
            if src.is_dir():  # a folder's contents into the target folder
                shutil.copytree(src, app / target, dirs_exist_ok=True, ignore=lambda d, names: [
                    n for n in names if ignored(str((Path(d) / n).relative_to(ROOT)), patterns)])
                continue
            dest = app / target / src.name if target.endswith("/") else app / target
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
    return app


def test_dvc_runs_and_the_commit_is_known_in_the_image_workspace_without_git(tmp_path):
    """The image has no .git (.dockerignore): with the Dockerfile's own `dvc config --local core.no_scm true` DVC
    works there (it refuses without it), and the MLflow runs get the commit from the GIT_COMMIT build argument."""
    app = image_workspace(tmp_path)
    assert not (app / ".git").exists() and (app / "dvc.yaml").is_file() and (app / "models" / "toy-encoder").is_dir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    before = subprocess.run([str(BIN / "dvc"), "status", "prepare"], cwd=app, env=env, capture_output=True, text=True,
                            timeout=120)
    assert before.returncode != 0 and "not a git repository" in before.stderr
    configure = re.search(r"^RUN (dvc config --local core.no_scm true)$", (INFRA / "Dockerfile").read_text(), re.M)
    subprocess.run(configure.group(1).split(), cwd=app, env=env, check=True, capture_output=True, timeout=120)
    after = subprocess.run([str(BIN / "dvc"), "status", "prepare", "--json"], cwd=app, env=env, capture_output=True,
                           text=True, timeout=120)
    assert after.returncode == 0, after.stderr
    assert "prepare" in json.loads(after.stdout)  # data/ is a volume: not there yet, so the stage would run
    commit = subprocess.run([sys.executable, "-c", "from components import tracking; print(tracking.git_commit())"],
                            cwd=app, env={**env, "PYTHONPATH": str(app), "GIT_COMMIT": "0123abcd"},
                            capture_output=True, text=True, timeout=60)
    assert commit.stdout.strip() == "0123abcd", commit.stderr
    assert re.search(r"^ARG GIT_COMMIT=unknown$", (INFRA / "Dockerfile").read_text(), re.M)
    assert "GIT_COMMIT=$GIT_COMMIT" in (INFRA / "Dockerfile").read_text()


@pytest.mark.skipif(shutil.which("docker") is None or subprocess.run(
    ["docker", "compose", "version"], capture_output=True).returncode != 0, reason="no docker compose plugin here")
def test_docker_compose_renders_the_stack_on_loopback(tmp_path):
    env = tmp_path / ".env"
    env.write_text((INFRA / ".env.example").read_text())
    done = subprocess.run(["docker", "compose", "-f", str(INFRA / "compose.yaml"), "--env-file", str(env), "config",
                           "--format", "json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    hosts = {p.get("host_ip") for s in services.values() for p in s.get("ports", [])}
    assert hosts == {"127.0.0.1"} and "ports" not in services["ray-head"]
