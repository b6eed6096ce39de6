"""`datencoder serve`: the registered model over MLflow's scoring protocol, behind limits that keep the
server up (docs/personalize.md, "Serving").

    datencoder serve [--model URI] [--host 127.0.0.1] [--port 5000] [--workers 1] [--trust-model-code]
                     [--backend uvicorn|ray] [--replicas N] [--max-replicas M] [--replica-cpus C] [--replica-gpus G]

The model is checked (components/serving/registry.py `trusted_model_dir`) and served with its own limits
(components/serving/limits.py: the budget, compute slots, the deadline; the model applies them in `predict`
wherever it runs). POST /invocations takes MLflow's JSON body ({"dataframe_split": {"columns": ["image",
"prompt"], "data": [[<base64>, "S* ..."]]}, "params": {...}}) and answers MLflow's {"predictions": [...]}:
the model stays servable by plain `mlflow models serve` too. The server adds what only a server can do
(components/serving/scoring.py): the body cap, the content type, the budget checked before a request waits,
a bounded queue answered 503 with Retry-After, a 504 at `serve.request_timeout_s` from arrival, and error
replies without a stack trace or the request body.

Backends (`serve.backend`): `uvicorn` (the default; this module) loads the model once per worker process;
`serve.max_concurrent` requests compute at once and `serve.max_queue` wait, per process. `ray`
(components/serving/ray_serve.py) runs Ray Serve replicas of it. /ping, /health and /version are MLflow's
own (uvicorn) or the same answers (ray).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import uvicorn

from components import tracking
from components.config import Config, ServeConfig
from components.errors import UserError
from components.runtime import resolve, runtime_environment
from components.serving import limits, ray_serve, registry, scoring


log = logging.getLogger(__name__)

MODEL_ENV = "DATENCODER_SERVE_MODEL"  # the checked local model directory, for each uvicorn worker process


class Guard:
    """ASGI app: /invocations behind the server's limits (components/serving/scoring.py `Front`, then a
    compute slot or the queue); every other path goes to `inner`."""

    def __init__(self, inner, model, serve_limits: ServeConfig):
        self.inner, self.model, self.limits = inner, model, serve_limits
        self.input_schema = model.metadata.get_input_schema()
        self.front = scoring.Front(serve_limits, scoring.param_defaults(model.metadata))
        self.pool = ThreadPoolExecutor(serve_limits.max_concurrent, thread_name_prefix="serve")
        self.slots: asyncio.Semaphore | None = None  # made in the server's event loop
        self.waiting = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/invocations":
            return await self.inner(scope, receive, send)
        if scope["method"] != "POST":
            return await reply(send, 405, "METHOD_NOT_ALLOWED", "POST a JSON body to /invocations")
        started = time.monotonic()
        try:
            status, body, headers = await self.handle(scope, receive, started)
        except Exception:  # noqa: BLE001 - whatever went wrong, the client gets no trace
            status, body, headers = scoring.internal_error(traceback.format_exc())
        await send_json(send, status, body, headers)

    async def handle(self, scope, receive, started: float) -> scoring.Reply:
        lim = self.limits
        admitted = await self.front.admit(scope, receive)
        if not isinstance(admitted, scoring.Admitted):
            return admitted
        if self.slots is None:
            self.slots = asyncio.Semaphore(lim.max_concurrent)
        if self.slots.locked() and self.waiting >= lim.max_queue:
            return scoring.busy(f"{lim.max_concurrent} request(s) computing and {self.waiting} waiting; retry later",
                                lim.retry_after_s)
        deadline = started + lim.request_timeout_s
        self.waiting += 1
        try:
            await asyncio.wait_for(self.slots.acquire(), max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            return scoring.busy("no free slot before serve.request_timeout_s", lim.retry_after_s)
        finally:
            self.waiting -= 1
        work = asyncio.get_running_loop().run_in_executor(
            self.pool, scoring.invoke, self.model, self.input_schema, admitted.request, admitted.content_type,
            deadline, lim.retry_after_s)
        work.add_done_callback(lambda _: self.slots.release())  # when the work has stopped, not when we answer
        try:
            return await asyncio.wait_for(asyncio.shield(work), max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            log.warning("request timed out after %ds; its work stops at the next step", lim.request_timeout_s)
            return scoring.timed_out(lim)


async def send_json(send, status: int, body: bytes, headers: dict) -> None:
    headers = {"content-type": "application/json", **headers, "content-length": str(len(body))}
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})
    await send({"type": "http.response.body", "body": body})


async def reply(send, status: int, code: str, message: str) -> None:
    await send_json(send, status, scoring.error(code, message), {})


def build_app(model, serve_limits: ServeConfig):
    """The ASGI app for a loaded pyfunc model: MLflow's scoring app behind Guard."""
    from mlflow.pyfunc import scoring_server  # mlflow: only when the app is built (start-up time)

    # MLflow's own timeout answers 504 and lets the work go on; ours comes first and stops it
    os.environ[limits.MLFLOW_TIMEOUT_ENV] = str(serve_limits.request_timeout_s + 60)
    return Guard(scoring_server.init(model), model, serve_limits)


def app_from_env():
    """uvicorn's app factory in each worker process: the model and limits that `serve` put in the environment."""
    serve_limits = ServeConfig.model_validate_json(os.environ[limits.LIMITS_ENV])
    return build_app(registry.load_pyfunc(os.environ[MODEL_ENV]), serve_limits)


def serve(cfg: Config, model: str | None = None, host: str = "127.0.0.1", port: int = 5000, workers: int = 1,
          trust_model_code: bool = False) -> dict:
    """Serve until interrupted, on `cfg.serve.backend`."""
    model = model or registry.champion_uri(cfg.registry, cfg.preset)
    if model is None:
        name = registry.model_name(cfg.registry, cfg.preset)
        raise UserError(f"no {name}@{registry.ALIAS} in {tracking.tracking_uri()}: run `datencoder register` first, "
                        f"or pass --model")
    resolve(cfg.runtime)  # CUDA asked for on a machine without it: one line now, not a dead server later
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: every host that reaches it can use it; put it behind a proxy that authenticates",
                    host)
    if cfg.serve.backend == "ray":
        ray_serve.serve(cfg, model, host, port, trust_model_code)
        return {"model": model, "host": host, "port": port, "backend": "ray"}
    local = registry.trusted_model_dir(model, trust_model_code)
    # the model reads its limits from the environment when it loads (limits.serving_limits): the server's
    os.environ[MODEL_ENV], os.environ[limits.LIMITS_ENV] = local, cfg.serve.model_dump_json()
    os.environ.update(runtime_environment(cfg.runtime))
    print(f"serving {model} on http://{host}:{port}/invocations", file=sys.stderr)
    uvicorn.run("components.serving.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="warning", timeout_graceful_shutdown=5)
    return {"model": model, "host": host, "port": port, "backend": "uvicorn"}
