"""`datencoder serve --backend ray`: the registered model as a Ray Serve application, N replicas (CPU or GPU
each), optionally autoscaled, behind the same request format and limits as the default (uvicorn) server.

    datencoder serve --backend ray --replicas 2 [--max-replicas 4] [--replica-cpus 1] [--replica-gpus 0]

Two deployments (docs/personalize.md "Serving"):

- `Ingress` (one replica, no CPU reserved) answers /ping, /health, /version and POST /invocations. It makes the
  checks of components/serving/scoring.py `Front` (body cap 413, application/json 415, JSON 400, the budget
  400) before anything waits, then calls the model deployment through its handle with the time the request
  has left. Ray's back-pressure (the model deployment's queue is full) is 503 SERVER_BUSY with Retry-After;
  past `serve.request_timeout_s` 504 TIMEOUT (the replica's work stops at its next UNet call); a replica that
  died under the request 503 REPLICA_LOST with Retry-After; an unexpected error 500 with an id.
- `Model` (`serve.replicas` replicas, or autoscaled between `serve.replicas` and `serve.max_replicas` on
  ongoing requests; `serve.replica_cpus` / `serve.replica_gpus` each) loads the pyfunc, which guards itself
  (components/serving/limits.py), and runs MLflow's own invocation of it. `max_ongoing_requests` is
  `serve.max_concurrent`; `max_queued_requests` (per caller, so at the one ingress) is `serve.max_queue`, at
  least 1 (Ray's smallest queue). Ray Serve's controller replaces a replica whose process dies or whose
  health check fails.

`serve` starts a Ray cluster of its own (RAY_ADDRESS unset; no dashboard) with the HTTP proxy on --host/--port
(127.0.0.1 by default), loads the checked model from its local copy, and serves until interrupted. With RAY_ADDRESS it
deploys onto that cluster and each replica loads the model by its pinned version URI. KubeRay:
infra/kuberay/rayservice-serve.yaml runs `app_builder` (import path
`components.serving.ray_serve:app_builder`) with the same settings as arguments.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
import traceback
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import psutil
import torch
from starlette.responses import Response

from components import tracking
from components.config import Config, RuntimeConfig, ServeConfig, load_config
from components.errors import UserError
from components.runtime import own_ray_cluster_environment, runtime_environment
from components.serving import limits, registry, scoring


log = logging.getLogger(__name__)

APP_NAME = "datencoder"
INGRESS_ONGOING = 256  # requests the ingress holds at once (each waits cheaply on the model's handle)


class Model:
    """A model replica: the pyfunc loaded from a local directory (checked by the driver) or a model URI."""

    def __init__(self, model: str, trust_model_code: bool, env: dict[str, str]):
        os.environ.update(env)  # the limits, device and dtype the pyfunc reads while it loads
        cpus = float(env.get("DATENCODER_REPLICA_CPUS", "1"))
        torch.set_num_threads(max(1, int(cpus)))
        local = model if Path(model).is_dir() else registry.trusted_model_dir(model, trust_model_code)
        self.model = registry.load_pyfunc(local)
        self.input_schema = self.model.metadata.get_input_schema()
        self.limits: ServeConfig = self.model.unwrap_python_model().limits

    def invoke(self, request: dict, content_type: str, seconds_left: float) -> scoring.Reply:
        """A sync method: Ray Serve runs it in the replica's thread pool, the replica's event loop stays free
        for health checks."""
        return scoring.invoke(self.model, self.input_schema, request, content_type,
                              time.monotonic() + seconds_left, self.limits.retry_after_s)

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("the model is not loaded")


class Ingress:
    """HTTP in front of the model deployment (module docstring)."""

    def __init__(self, model, limits_json: str, defaults: dict[str, Any]):
        self.model = model  # a DeploymentHandle to `Model`
        self.limits = ServeConfig.model_validate_json(limits_json)
        self.front = scoring.Front(self.limits, defaults)
        self.ready = False  # the application has been running (every replica up) at least once

    async def is_ready(self) -> bool:
        """/ping: 200 once the application has come up, as MLflow's answers once its model has loaded."""
        if not self.ready:
            # ray: in the Ray Serve replicas and driver only; serve.py imports this module for every backend
            from ray import serve

            status = (await asyncio.to_thread(serve.status)).applications.get(APP_NAME)
            self.ready = status is not None and status.status == "RUNNING"
        return self.ready

    async def __call__(self, request):
        path, method = request.url.path, request.method
        if path in ("/ping", "/health"):
            return Response("\n", status_code=200 if await self.is_ready() else 503, media_type="application/json")
        if path == "/version":
            return Response(package_version("mlflow"), media_type="application/json")
        if path != "/invocations":
            status, body, headers = 404, scoring.error("ENDPOINT_NOT_FOUND", "POST /invocations, GET /ping"), {}
        elif method != "POST":
            status, body, headers = 405, scoring.error("METHOD_NOT_ALLOWED", "POST a JSON body to /invocations"), {}
        else:
            try:
                status, body, headers = await self.handle(request)
            except Exception:  # noqa: BLE001 - whatever went wrong, the client gets no trace
                status, body, headers = scoring.internal_error(traceback.format_exc())
        headers = {"content-type": "application/json", **headers}
        return Response(body, status_code=status, headers=headers)

    async def handle(self, request) -> scoring.Reply:
        # ray: in the Ray Serve replicas only
        import ray.exceptions
        from ray.serve.exceptions import BackPressureError

        started = time.monotonic()
        admitted = await self.front.admit(request.scope, request.receive)
        if not isinstance(admitted, scoring.Admitted):
            return admitted
        deadline = started + self.limits.request_timeout_s
        response = self.model.invoke.remote(admitted.request, admitted.content_type, deadline - time.monotonic())
        try:
            return tuple(await asyncio.wait_for(response, max(deadline - time.monotonic(), 0.001)))
        except BackPressureError:
            return scoring.busy("every model replica is computing and the queue is full; retry later",
                                self.limits.retry_after_s)
        except TimeoutError:
            response.cancel()
            log.warning("request timed out after %ds; its work stops at the next step", self.limits.request_timeout_s)
            return scoring.timed_out(self.limits)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            log.warning("the replica computing a request died: %s", str(e).splitlines()[0])
            return 503, scoring.error("REPLICA_LOST", "the replica computing the request stopped; retry"), {
                "retry-after": "1"}


def replica_processes(pid: int) -> list:
    """The model replicas' processes (psutil.Process) under a local `datencoder serve --backend ray` process
    `pid`: Ray titles a replica's process after its application and deployment."""
    title = f"ServeReplica:{APP_NAME}:Model"
    found = []
    for process in psutil.Process(pid).children(recursive=True):
        try:
            if title in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:  # gone meanwhile
            pass
    return found


def replica_env(lim: ServeConfig, runtime: RuntimeConfig) -> dict[str, str]:
    """What a replica's pyfunc reads while it loads: the server's limits, device and dtype."""
    return {limits.LIMITS_ENV: lim.model_dump_json(), "DATENCODER_REPLICA_CPUS": str(lim.replica_cpus),
            **runtime_environment(runtime)}


def application(lim: ServeConfig, runtime: RuntimeConfig, model: str, trust_model_code: bool,
                defaults: dict[str, Any]):
    """The Ray Serve application: `Ingress` over `Model` with the options of the module docstring."""
    from ray import serve  # ray: with --backend ray only

    model_options: dict[str, Any] = {
        "name": "Model", "max_ongoing_requests": lim.max_concurrent, "max_queued_requests": max(lim.max_queue, 1),
        "ray_actor_options": {"num_cpus": lim.replica_cpus, "num_gpus": lim.replica_gpus},
        "health_check_period_s": 5, "health_check_timeout_s": 30, "graceful_shutdown_timeout_s": 5}
    if lim.max_replicas and lim.max_replicas > lim.replicas:
        model_options["autoscaling_config"] = {
            "min_replicas": lim.replicas, "max_replicas": lim.max_replicas,
            "target_ongoing_requests": lim.max_concurrent, "upscale_delay_s": 5, "downscale_delay_s": 120}
    else:
        model_options["num_replicas"] = lim.replicas
    replica = serve.deployment(Model).options(**model_options).bind(model, trust_model_code, replica_env(lim, runtime))
    ingress = serve.deployment(Ingress).options(
        name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=INGRESS_ONGOING,
        max_queued_requests=INGRESS_ONGOING)
    return ingress.bind(replica, lim.model_dump_json(), defaults)


def pinned(model: str) -> str:
    """models:/name@alias as models:/name/<its version now>, so that every replica (a replacement too) loads
    the same version even if the alias moves; other URIs unchanged."""
    if not model.startswith("models:/") or "@" not in model:
        return model
    # mlflow: only to pin a model URI (start-up time)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, _, alias = model.removeprefix("models:/").partition("@")
    try:
        version = MlflowClient(tracking.tracking_uri()).get_model_version_by_alias(name, alias).version
    except MlflowException as e:
        raise UserError(f"cannot find {model} in {tracking.tracking_uri()}: {str(e).splitlines()[0]}") from None
    return f"models:/{name}/{version}"


def model_defaults(local_dir: str) -> dict[str, Any]:
    from mlflow.models import Model as MlflowModel  # mlflow: on use only (start-up time)

    return scoring.param_defaults(MlflowModel.load(local_dir))


def app_builder(args: dict[str, Any]):
    """Ray Serve's application builder for a cluster (KubeRay RayService, `serve run`): args `model` (default
    the champion), `config` (a params.yaml; default the toy preset's), `trust_model_code`. The model is pinned
    to its version and checked here; each replica downloads it."""
    cfg = load_config(path=args["config"]) if args.get("config") else load_config()
    model = pinned(args.get("model") or f"models:/{registry.model_name(cfg.registry, cfg.preset)}@{registry.ALIAS}")
    trust = str(args.get("trust_model_code", "")).lower() in ("1", "true", "yes")
    local = registry.trusted_model_dir(model, trust)
    return application(cfg.serve, cfg.runtime, model, trust, model_defaults(local))


def serve(cfg: Config, model: str, host: str, port: int, trust_model_code: bool) -> dict:
    """Serve `model` (a URI) on Ray Serve until interrupted (module docstring)."""
    # ray: with --backend ray only
    import ray
    from ray import serve as ray_serve

    address = os.environ.get("RAY_ADDRESS")
    model = pinned(model)
    local = registry.trusted_model_dir(model, trust_model_code)  # refused here, in one line, before Ray starts
    if not address:
        own_ray_cluster_environment()
    try:
        ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING)
    except Exception as e:  # noqa: BLE001 - Ray raises bare Exceptions for start-up failures
        raise UserError(f"cannot start or reach the Ray cluster ({address or 'local'}): "
                        f"{str(e).splitlines()[0]}") from None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that the finally below shuts Ray Serve down
    try:
        ray_serve.start(http_options={"host": host, "port": port})
        app = application(cfg.serve, cfg.runtime, local if not address else model, trust_model_code,
                          model_defaults(local))
        ray_serve.run(app, name=APP_NAME, route_prefix="/")
        lim = cfg.serve
        replicas = f"{lim.replicas}-{lim.max_replicas}" if lim.max_replicas else str(lim.replicas)
        print(f"serving {model} on http://{host}:{port}/invocations (Ray Serve, {replicas} replica(s))",
              file=sys.stderr)
        while True:
            time.sleep(3600)
    finally:  # a cluster of our own goes with its processes; on another cluster our application is deleted
        try:
            if address:
                ray_serve.delete(APP_NAME)
        finally:
            ray.shutdown()
