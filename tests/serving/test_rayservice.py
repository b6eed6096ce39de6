"""The KubeRay RayService's Serve config (infra/kuberay/rayservice-serve.yaml `serveConfigV2`) runs as it is
written, with `serve run` on a local Ray cluster: `app_builder` builds the application from its arguments,
the deployment options of the manifest apply (their names match the application's), the service answers
MLflow's scoring protocol, and the model deployment autoscales from 1 replica to 2 under load. Changed for
this machine only: the HTTP proxy on 127.0.0.1 and a free port, this test's model and config, no GPU, at
most 2 replicas (slow: a Ray cluster and up to three model loads)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import yaml
from smoke_models import free_port, interruptible, isolated_store, smoke_setup, solid_png, stop_server, wait_for_ping
from test_serving import FAST, RED_CONCEPT, post

from components.serving.ray_serve import replica_processes


MANIFEST = "infra/kuberay/rayservice-serve.yaml"


@pytest.mark.slow
def test_the_rayservice_serve_config_serves_and_autoscales(tmp_path, root):
    from components.serving import registry

    config_file, cfg, encoder = smoke_setup(tmp_path)
    store = isolated_store(tmp_path)
    os.environ["MLFLOW_TRACKING_URI"] = store
    try:
        registry.register(cfg, str(encoder))
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")

    service = yaml.safe_load((root / MANIFEST).read_text())
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    port = free_port()
    serve_config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = serve_config["applications"][0]
    assert app["import_path"] == "components.serving.ray_serve:app_builder"
    # the manifest serves the sd15 champion on the cluster; here the smoke champion registered above, by the same rule
    app["args"].update(config=str(config_file),
                       model=f"models:/{registry.model_name(cfg.registry, cfg.preset)}@{registry.ALIAS}")
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"Model", "Ingress"}
    model = deployments["Model"]
    model["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 0}
    model["autoscaling_config"].update(max_replicas=2, upscale_delay_s=2)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve_config))

    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(root)}
    log_path = tmp_path / "serve-run.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "serve"), "run",
                                    str(tmp_path / "serve.yaml")], cwd=root, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=interruptible)
        try:
            wait_for_ping(process, port, log_path, "serve run")
            assert len(replica_processes(process.pid)) == 1  # min_replicas
            status, _, reply = post(port, [(RED_CONCEPT, "S* on grass")], FAST)
            assert status == 200 and len(reply["predictions"]) == 1
            status, _, reply = post(port, [(b"%PDF not an image", "S*")], FAST)
            assert status == 400 and reply["error_code"] == "INVALID_PARAMETER_VALUE"

            # more ongoing requests than one replica's target (1): Ray Serve adds the second replica
            stop = time.monotonic() + 240
            statuses: list[int] = []

            def client(k: int) -> None:
                n = 0
                while time.monotonic() < stop and len(replica_processes(process.pid)) < 2:
                    n += 1
                    statuses.append(post(port, [(solid_png((k, n % 250, 9)), "S*")],
                                         {"tuning_steps": 12, "num_inference_steps": 10})[0])

            clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
            for t in clients:
                t.start()
            for t in clients:
                t.join()
            assert len(replica_processes(process.pid)) == 2, "did not scale to 2 replicas"
            assert statuses and set(statuses) <= {200, 503}, set(statuses)  # 503: Ray's queue (max 8) was full
        finally:
            stop_server(process, signal.SIGINT)  # `serve run` shuts its cluster down on Ctrl-C
            shutil.rmtree(ray_tmp, ignore_errors=True)
