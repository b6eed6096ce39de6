"""The team stack (infra/) is locked down, checked on its configuration: `docker compose config` renders
it where the compose plugin exists; everywhere the files are parsed and interpolated as compose does
(${VAR:-default}, ${VAR:?error}) with the values of infra/.env.example."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
VARIABLE = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def example_env() -> dict[str, str]:
    lines = (INFRA / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def interpolate(value, env: dict[str, str]):
    """compose's variable syntax over a parsed YAML tree ($$ is a literal $)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, kind, rest = match.groups()
        if env.get(name):
            return env[name]
        if kind == "?":
            raise KeyError(f"{name}: {rest}")
        return rest if kind == "-" else ""

    return VARIABLE.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def stack(**env: str) -> dict:
    return interpolate(yaml.safe_load((INFRA / "compose.yaml").read_text()), {**example_env(), **env})


def published(services: dict) -> dict[str, list[str]]:
    return {name: [str(p) for p in s.get("ports", [])] for name, s in services.items() if s.get("ports")}


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


def test_mlflow_needs_a_login_and_prefect_an_auth_string():
    services = stack()["services"]
    mlflow = services["mlflow"]
    assert "--app-name=basic-auth" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == example_env()["MLFLOW_ADMIN_PASSWORD"]
    ini = (ROOT / mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"].removeprefix("/app/")).read_text()
    assert "default_permission = NO_PERMISSIONS" in ini and "admin_password" not in ini  # the secret is env only
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == example_env()["PREFECT_AUTH_STRING"]
    clients = [name for name, s in services.items() if "PREFECT_API_URL" in (s.get("environment") or {})]
    assert {"prefect-worker", "deploy", "ray-head", "ray-worker"} <= set(clients)
    for name in clients:
        env = services[name]["environment"]
        assert env["PREFECT_API_AUTH_STRING"] and env["MLFLOW_TRACKING_PASSWORD"], name
    with pytest.raises(KeyError, match="MLFLOW_ADMIN_PASSWORD"):  # no secret, no stack
        interpolate(yaml.safe_load((INFRA / "compose.yaml").read_text()),
                    {k: v for k, v in example_env().items() if k != "MLFLOW_ADMIN_PASSWORD"})


def test_every_image_is_pinned():
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


def test_one_least_privilege_s3_key_per_service_and_the_root_keys_stay_in_minio():
    env = example_env()
    services = stack()["services"]
    root = {env["S3_ROOT_USER"], env["S3_ROOT_PASSWORD"]}
    holders = {name for name, s in services.items() if root & set(map(str, (s.get("environment") or {}).values()))}
    assert holders == {"minio", "buckets"}
    keys = {name: s["environment"]["AWS_ACCESS_KEY_ID"] for name, s in services.items()
            if "AWS_ACCESS_KEY_ID" in (s.get("environment") or {})}
    assert keys == {"mlflow": env["MLFLOW_S3_KEY"], "prefect-worker": env["PIPELINE_S3_KEY"],
                    "ray-head": env["RAY_S3_KEY"], "ray-worker": env["RAY_S3_KEY"]}
    assert "AWS_ACCESS_KEY_ID" not in services["deploy"]["environment"]  # Prefect only: no S3 at all
    init = " ".join(services["buckets"]["command"])
    buckets = {"mlflow": {"MLFLOW_BUCKET"}, "pipeline": {"DVC_BUCKET", "CHECKPOINT_BUCKET"}, "ray": {"CHECKPOINT_BUCKET"}}
    for who, allowed in buckets.items():
        assert f"datencoder-{who}" in init
        policy = json.loads((INFRA / "minio-policies" / f"{who}.json").read_text())
        resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
        actions = {a for statement in policy["Statement"] for a in statement["Action"]}
        assert {r.removeprefix("arn:aws:s3:::").split("/")[0] for r in resources} == allowed, who
        assert not any("*" in a for a in actions) and all(s["Effect"] == "Allow" for s in policy["Statement"])


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


def test_the_image_runs_as_a_user_and_gets_no_secrets_data_or_venv():
    dockerfile = (INFRA / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    for stage in stages:
        users = re.findall(r"^USER\s+(\S+)", stage, re.M)
        assert users and users[-1] not in ("root", "0"), stage.splitlines()[0]
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in ("infra/.env", ".env", "data/prepared/manifest.parquet", "data/raw/toy-world/x.png",
                 ".venv/bin/python", "outputs/personalize/a.png", "checkpoints/run/step-1/trainer.pt", "mlflow.db",
                 ".git/config", "components/__pycache__/cli.cpython-311.pyc"):
        assert ignored(path, patterns), path
    for path in ("components/cli.py", "models/toy-encoder/model.safetensors", "infra/compose.yaml", "dvc.yaml",
                 "infra/mlflow-auth.ini"):
        assert not ignored(path, patterns), path


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
