"""`datencoder serve`: the registered model over MLflow's scoring protocol, behind limits that keep the
server up (docs/personalize.md, "Serving").

    datencoder serve [--model URI] [--host 127.0.0.1] [--port 5000] [--workers 1] [--trust-model-code]

The model is checked (components/serving/registry.py `trusted_model_dir`), loaded once per worker process
and served by uvicorn. POST /invocations takes MLflow's JSON body ({"dataframe_split": {"columns":
["image", "prompt"], "data": [[<base64>, "S* ..."]]}, "params": {...}}) and answers MLflow's
{"predictions": [...]}: the model stays servable by plain `mlflow models serve` too. In front of it:

- the body is capped (`serve.max_body_mb`: 413, refused from Content-Length before it is read);
- its cost is checked before any work (`serve.max_images` = rows x num_images, `serve.max_steps` =
  distinct images x tuning_steps + images x num_inference_steps: 400);
- `serve.max_concurrent` requests compute at once and `serve.max_queue` wait; the next gets 503 with
  Retry-After;
- a request still unanswered after `serve.request_timeout_s` gets 504, and its work stops at its next UNet
  call (a forward pre-hook checks the request's deadline), so the slot is free again within one step;
- errors are {"error_code", "message"}: the model's own one-line message, never a stack trace nor the
  request body (MLflow's scoring server returns both); unexpected errors are 500 with an id, the
  traceback only in the server's log.
/ping, /health and /version are MLflow's own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from components import tracking
from components.config import Config, RuntimeConfig, ServeConfig
from components.errors import UserError
from components.runtime import DEVICE_ENV, DTYPE_ENV, resolve
from components.serving import registry

log = logging.getLogger(__name__)

MODEL_ENV = "DATENCODER_SERVE_MODEL"  # the checked local model directory, for each uvicorn worker process
LIMITS_ENV = "DATENCODER_SERVE_LIMITS"  # the serve section as JSON
COST_PARAMS = ("num_images", "tuning_steps", "num_inference_steps")


def runtime_environment(runtime: RuntimeConfig) -> dict[str, str]:
    """DATENCODER_DEVICE / DATENCODER_DTYPE for the served model (components/runtime.py serving_config): `runtime`'s
    settings other than auto; auto keeps the environment's, else the serving machine decides."""
    return {name: value for name, value in ((DEVICE_ENV, runtime.device), (DTYPE_ENV, runtime.dtype)) if value != "auto"}


class RequestCancelled(Exception):
    """Raised inside a request's work once its deadline has passed."""


_request = threading.local()  # .deadline: time.monotonic() after which the current thread's work stops


def stop_when_late(module, args) -> None:
    """Forward pre-hook on the UNet: every tuning step and every sampling step calls it."""
    deadline = getattr(_request, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise RequestCancelled("request timed out")


class Guard:
    """ASGI app: /invocations with the limits of the module docstring; every other path goes to `inner`."""

    def __init__(self, inner, model, limits: ServeConfig):
        from mlflow.pyfunc import scoring_server

        self.inner, self.model, self.limits = inner, model, limits
        self.invocations = scoring_server.invocations
        self.input_schema = model.metadata.get_input_schema()
        params = model.metadata.get_params_schema()
        self.defaults = {p.name: p.default for p in params.params} if params else {}
        self.pool = ThreadPoolExecutor(limits.max_concurrent, thread_name_prefix="serve")
        self.slots: asyncio.Semaphore | None = None  # made in the server's event loop
        self.waiting = 0
        personalizer = model.unwrap_python_model().personalizer
        personalizer.pipe.unet.register_forward_pre_hook(stop_when_late)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/invocations":
            return await self.inner(scope, receive, send)
        if scope["method"] != "POST":
            return await reply(send, 405, "METHOD_NOT_ALLOWED", "POST a JSON body to /invocations")
        started = time.monotonic()
        try:
            status, body, headers = await self.handle(scope, receive, started)
        except Exception:  # noqa: BLE001 - whatever went wrong, the client gets no trace
            incident = uuid.uuid4().hex[:12]
            log.exception("request %s failed", incident)
            status, body, headers = 500, error("INTERNAL_ERROR", f"internal error {incident}; see the server log"), {}
        await send_json(send, status, body, headers)

    async def handle(self, scope, receive, started: float) -> tuple[int, bytes, dict]:
        lim = self.limits
        max_bytes = int(lim.max_body_mb * 2**20)
        headers = dict(scope["headers"])
        too_large = (413, error("REQUEST_TOO_LARGE", f"the body is over serve.max_body_mb ({lim.max_body_mb:g} MiB)"), {})
        try:
            if int(headers.get(b"content-length", b"0")) > max_bytes:
                await read_body(receive, 0)  # drained, not kept: a client still sending would see a reset
                return too_large
        except ValueError:
            return 400, error("BAD_REQUEST", "Content-Length is not a number"), {}
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if content_type.split(";")[0].strip().lower() != "application/json":
            return 415, error("UNSUPPORTED_MEDIA_TYPE", "send the request as application/json"), {}
        raw = await read_body(receive, max_bytes)
        if raw is None:
            return too_large
        try:
            request = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return 400, error("BAD_REQUEST", "the body is not valid JSON"), {}
        cost = self.cost(request)
        if isinstance(cost, str):
            return 400, error("INVALID_PARAMETER_VALUE", cost), {}

        if self.slots is None:
            self.slots = asyncio.Semaphore(lim.max_concurrent)
        if self.slots.locked() and self.waiting >= lim.max_queue:
            return 503, error("SERVER_BUSY", f"{lim.max_concurrent} request(s) computing and {self.waiting} waiting; "
                                             f"retry later"), {"retry-after": str(lim.retry_after_s)}
        deadline = started + lim.request_timeout_s
        self.waiting += 1
        try:
            await asyncio.wait_for(self.slots.acquire(), max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            return 503, error("SERVER_BUSY", "no free slot before serve.request_timeout_s"), {
                "retry-after": str(lim.retry_after_s)}
        finally:
            self.waiting -= 1
        work = asyncio.get_running_loop().run_in_executor(self.pool, self.work, request, content_type, deadline)
        work.add_done_callback(lambda _: self.slots.release())  # when the work has stopped, not when we answer
        try:
            result = await asyncio.wait_for(asyncio.shield(work), max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            log.warning("request timed out after %ds; its work stops at the next step", lim.request_timeout_s)
            return 504, error("TIMEOUT", f"the request took over serve.request_timeout_s ({lim.request_timeout_s} s); "
                                         f"ask for fewer images or steps"), {}
        return result

    def cost(self, request: Any) -> tuple[int, int] | str:
        """(images, steps) the request asks for, or why it is refused (over a limit, or no rows)."""
        images = rows_images(request)
        if images is None:
            return ("the body must be a JSON object with dataframe_split, dataframe_records, inputs or instances "
                    "holding the columns image and prompt")
        params = request.get("params") if isinstance(request.get("params"), dict) else {}
        value = {}
        for name in COST_PARAMS:  # unparsable values are the model's to reject; here they count as the default
            try:
                value[name] = max(int(params.get(name, self.defaults.get(name, 1))), 0)
            except (TypeError, ValueError):
                value[name] = max(int(self.defaults.get(name, 1)), 0)
        generated = len(images) * value["num_images"]
        steps = len(set(images)) * value["tuning_steps"] + generated * value["num_inference_steps"]
        if generated > self.limits.max_images:
            return (f"the request asks for {generated} images (rows x num_images); the limit is "
                    f"{self.limits.max_images} per request (serve.max_images)")
        if steps > self.limits.max_steps:
            return (f"the request asks for {steps} tuning + sampling steps; the limit is {self.limits.max_steps} "
                    f"per request (serve.max_steps)")
        return generated, steps

    def work(self, request: dict, content_type: str, deadline: float) -> tuple[int, bytes, dict]:
        """MLflow's own invocation (parsing, schema, predict, JSON), in a worker thread, with the deadline set."""
        from mlflow.exceptions import MlflowException

        _request.deadline = deadline
        try:
            out = self.invocations(request, content_type, self.model, self.input_schema)
        except MlflowException as e:
            if "stack_trace" in getattr(e, "json_kwargs", {}):  # MLflow's wrapper of an unexpected error
                if isinstance(e.__context__, RequestCancelled):
                    log.info("the work of a timed-out request stopped")
                    return 504, error("TIMEOUT", "request timed out"), {}
                incident = uuid.uuid4().hex[:12]
                log.error("request %s failed: %s", incident, e.json_kwargs["stack_trace"])
                return 500, error("INTERNAL_ERROR", f"internal error {incident}; see the server log"), {}
            return e.get_http_status_code(), error(e.error_code, model_message(e.message)), {}
        finally:
            _request.deadline = None
        return out.status, out.response.encode() if isinstance(out.response, str) else out.response, {
            "content-type": out.mimetype}


def model_message(message: str) -> str:
    """The model's own message out of MLflow's wrapping ("Failed to predict data '<the whole input>'.
    Error: ..."), first line, at most 500 characters: the request body is never echoed."""
    for marker in ("\nError: ", ". Error: "):
        if marker in message:
            message = message.rsplit(marker, 1)[1]
    if message.startswith("Failed to enforce schema"):
        message = "the input does not match the model's signature (columns image: base64 bytes, prompt: text)"
    return message.strip().splitlines()[0][:500] if message.strip() else "invalid request"


def rows_images(request: Any) -> list[str] | None:
    """Digests of the `image` value of every row in MLflow's JSON input formats; None if there are no rows."""
    if not isinstance(request, dict):
        return None
    if isinstance(split := request.get("dataframe_split"), dict):
        columns, data = split.get("columns"), split.get("data")
        if not isinstance(data, list) or not data:
            return None
        index = columns.index("image") if isinstance(columns, list) and "image" in columns else None
        values = [row[index] if index is not None and isinstance(row, list) and len(row) > index else None
                  for row in data]
    else:
        records = request.get("dataframe_records", request.get("inputs", request.get("instances")))
        if isinstance(records, dict):  # columns of equal length
            column = records.get("image")
            values = column if isinstance(column, list) else [column]
        elif isinstance(records, list) and records:
            values = [r.get("image") if isinstance(r, dict) else None for r in records]
        else:
            return None
    return [hashlib.sha256(json.dumps(v).encode()).hexdigest() for v in values]


DRAIN_BYTES = 256 * 2**20  # of a body over the limit, at most this much is read (and dropped) before answering


async def read_body(receive, max_bytes: int) -> bytes | None:
    """The whole body, or None when it is over `max_bytes` (a lying Content-Length included). The rest of a
    body over the limit is read and dropped, up to DRAIN_BYTES, so the client gets the 413 instead of a
    connection reset while it is still sending; beyond that the connection is closed."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= max_bytes:
            chunks.append(chunk)
        if not message.get("more_body") or size > DRAIN_BYTES:
            return b"".join(chunks) if size <= max_bytes else None


def error(code: str, message: str) -> bytes:
    return json.dumps({"error_code": code, "message": message}).encode()


async def send_json(send, status: int, body: bytes, headers: dict) -> None:
    headers = {"content-type": "application/json", **headers, "content-length": str(len(body))}
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})
    await send({"type": "http.response.body", "body": body})


async def reply(send, status: int, code: str, message: str) -> None:
    await send_json(send, status, error(code, message), {})


def build_app(model, limits: ServeConfig):
    """The ASGI app for a loaded pyfunc model: MLflow's scoring app behind Guard."""
    from mlflow.pyfunc import scoring_server

    # MLflow's own timeout answers 504 and lets the work go on; ours comes first and stops it
    os.environ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(limits.request_timeout_s + 60)
    return Guard(scoring_server.init(model), model, limits)


def app_from_env():
    """uvicorn's app factory in each worker process: the model and limits that `serve` put in the environment."""
    return build_app(registry.load_pyfunc(os.environ[MODEL_ENV]), ServeConfig.model_validate_json(os.environ[LIMITS_ENV]))


def serve(cfg: Config, model: str | None = None, host: str = "127.0.0.1", port: int = 5000, workers: int = 1,
          trust_model_code: bool = False) -> dict:
    """Serve until interrupted."""
    import uvicorn

    model = model or registry.champion_uri(cfg)
    if model is None:
        raise UserError(f"no {registry.model_name(cfg)}@{registry.ALIAS} in {tracking.tracking_uri()}: run "
                        f"`datencoder register` first, or pass --model")
    resolve(cfg.runtime)  # CUDA asked for on a machine without it: one line now, not a dead server later
    local = registry.trusted_model_dir(model, trust_model_code)
    os.environ[MODEL_ENV], os.environ[LIMITS_ENV] = local, cfg.serve.model_dump_json()
    os.environ.update(runtime_environment(cfg.runtime))
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: every host that reaches it can use it; put it behind a proxy that authenticates",
                    host)
    print(f"serving {model} on http://{host}:{port}/invocations", file=sys.stderr)
    uvicorn.run("components.serving.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="warning", timeout_graceful_shutdown=5)
    return {"model": model, "host": host, "port": port}
