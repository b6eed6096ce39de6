"""The registry as a team runs it (components/serving/registry.py): one registered model per preset, `@champion`
moved only by `datencoder promote` and never across presets, the alias lock that makes concurrent registrations
take turns, the old single model name still served with a deprecation line. Real MLflow stores: sqlite files, and
for the concurrent registrations a real `mlflow server` on loopback with two real `datencoder register` processes.
(The gate and `@challenger` on real scores: tests/inference/test_personalize.py.)"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from smoke_models import free_port, isolated_store, smoke_setup

from components.config import load_config, variant_config
from components.errors import UserError


BIN = Path(sys.executable).parent


def legacy_store(tmp: Path):
    """What the single-name registry left behind: model `datencoder` holding a toy and a smoke version (no preset
    tag on the model), the toy one @champion. Made through MLflow's own client."""
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    client.create_registered_model("datencoder")
    source = tmp / "model"
    source.mkdir()
    (source / "MLmodel").write_text("flavors: {}\n")
    versions = {}
    for preset in ("toy", "smoke"):
        version = client.create_model_version("datencoder", str(source), tags={"preset": preset}).version
        versions[preset] = int(version)
    client.set_registered_model_alias("datencoder", "champion", versions["toy"])
    return client, versions


def test_one_preset_per_model_promote_never_crosses_presets_and_the_old_name_still_serves(tmp_path, monkeypatch,
                                                                                           caplog):
    from components.serving import registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", isolated_store(tmp_path))
    client, versions = legacy_store(tmp_path)
    toy, smoke = load_config("toy"), load_config("smoke")
    names = (registry.model_name(toy.registry, "toy"), registry.model_name(smoke.registry, "smoke"))
    assert names == ("datencoder-toy", "datencoder-smoke")
    assert registry.model_name(variant_config(smoke, registry={"model_name": "team-a"}).registry, "smoke") == "team-a"
    # a smoke encoder is never registered into the toy model (refused before it is even loaded)
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"holds preset 'toy' versions"):
        registry.register(variant_config(smoke, registry={"model_name": "datencoder"}), str(tmp_path / "encoder"))
    assert client.get_registered_model("datencoder").tags["preset"] == "toy"
    # nor promoted onto it
    with pytest.raises(UserError, match=r"version 2: it is preset 'smoke', the model is 'toy'"):
        registry.promote(variant_config(toy, registry={"model_name": "datencoder"}), version=versions["smoke"])
    assert int(client.get_model_version_by_alias("datencoder", "champion").version) == versions["toy"]
    with pytest.raises(UserError, match="no @challenger to promote"):
        registry.promote(variant_config(toy, registry={"model_name": "datencoder"}))
    # the old name's champion still serves its own preset, with a deprecation line; never another preset
    with caplog.at_level(logging.WARNING, logger="components.serving.registry"):
        assert registry.champion_uri(toy.registry, toy.preset) == "models:/datencoder@champion"
    assert "old single model name" in caplog.text and "datencoder-toy" in caplog.text
    assert registry.champion_uri(smoke.registry, smoke.preset) is None
    from components.cli import main

    assert main(["promote", "--preset", "smoke", "--version", "7"]) == 2  # nothing there: one line, exit 2


def test_the_alias_lock_waits_for_its_holder_and_breaks_a_dead_ones_lock(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from components.serving.registry import LOCK_SUFFIX, alias_lock

    monkeypatch.setenv("MLFLOW_TRACKING_URI", isolated_store(tmp_path))
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    lock = "datencoder-smoke" + LOCK_SUFFIX
    with alias_lock(client, "datencoder-smoke", timeout_s=5):
        assert client.get_registered_model(lock).tags["holder"]
        started = time.monotonic()
        with pytest.raises(UserError, match="locked by .* try again"):
            with alias_lock(client, "datencoder-smoke", timeout_s=1.5):
                pass
        assert time.monotonic() - started >= 1.5
    assert not client.search_registered_models(f"name = '{lock}'")  # released
    client.create_registered_model(lock, tags={"holder": "dead-host:1", "expires": f"{time.time() - 1:.0f}"})
    with alias_lock(client, "datencoder-smoke", timeout_s=5):  # a dead holder's lock: broken, not waited on
        assert client.get_registered_model(lock).tags["holder"] != "dead-host:1"


@pytest.fixture
def mlflow_server(tmp_path):
    import requests

    port = free_port()
    log = open(tmp_path / "mlflow.log", "w")
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers",
                               "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts")],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "mlflow.log").read_text()[-3000:]
            try:
                if requests.get(f"{uri}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
        log.close()


@pytest.mark.slow  # an MLflow server and two registering processes: about 2 minutes on 2 busy cores
def test_two_concurrent_registrations_cannot_both_win(tmp_path, mlflow_server):
    """Two `datencoder register --json` at once against an MLflow server, into a model without a champion: both
    would see "no champion" and both take it. They take turns on the alias lock: this test holds the lock until
    both wait on it, then lets go, so they decide at the same moment. Exactly one becomes the champion; stdout of
    each is its one JSON object (MLflow's "View run" lines went to stderr)."""
    from mlflow import MlflowClient

    from components.serving.registry import LOCK_SUFFIX, alias_lock

    config_file, cfg, encoder = smoke_setup(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    client = MlflowClient(mlflow_server)
    procs, errs = [], []
    with alias_lock(client, "datencoder-smoke", timeout_s=10):
        for i in range(2):
            errs.append(open(tmp_path / f"register-{i}.err", "w+"))
            procs.append(subprocess.Popen([str(BIN / "datencoder"), "register", "--config", str(config_file),
                                           "--encoder", str(encoder), "--json"], env=env, stdout=subprocess.PIPE,
                                          stderr=errs[-1], text=True))
        deadline = time.monotonic() + 600
        while sum("waiting for the alias lock" in Path(e.name).read_text() for e in errs) < 2:
            assert all(p.poll() is None for p in procs), [Path(e.name).read_text()[-2000:] for e in errs]
            assert time.monotonic() < deadline, "the registrations never reached the alias lock"
            time.sleep(0.5)
    outputs = []
    for p, e in zip(procs, errs):
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, Path(e.name).read_text()[-3000:]
        outputs.append(json.loads(out))  # the whole of stdout is the one object
    assert any("View run" in Path(e.name).read_text() for e in errs)  # MLflow said it, on stderr
    assert sorted(str(o["alias"]) for o in outputs) == ["None", "champion"], outputs
    winner = next(o for o in outputs if o["alias"] == "champion")
    loser = next(o for o in outputs if o["alias"] is None)
    assert int(client.get_model_version_by_alias("datencoder-smoke", "champion").version) == winner["version"]
    assert loser["gate"]["champion_version"] == winner["version"] and loser["version"] != winner["version"]
    assert not client.search_registered_models(f"name = 'datencoder-smoke{LOCK_SUFFIX}'")
