"""MLflow's scoring protocol behind a server's limits: what both backends of `datencoder serve` (uvicorn,
components/serving/serve.py; Ray Serve, components/serving/ray_serve.py) do with a request around the model.

Before a request may wait for the model (`Front.admit`):

- the body is capped (`serve.max_body_mb`: 413, refused from Content-Length before it is read);
- only application/json is taken (415), and it must parse (400);
- the model's budget (components/serving/limits.py `check_budget`) is checked on the JSON rows (400), so a
  request over it never waits for a compute slot.

Then the model runs through MLflow's own scoring code (`invoke`: parsing, schema, predict, JSON), with the
request's deadline in force. Errors are {"error_code", "message"}: the model's own one-line message, never a
stack trace nor the request body (MLflow's scoring server returns both); an unexpected error is 500 with an
id, its traceback only in the server's log. The model's refusals keep the server's vocabulary: busy is 503
SERVER_BUSY with Retry-After, past the deadline 504 TIMEOUT.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from components.config import ServeConfig
from components.serving import limits


log = logging.getLogger(__name__)

Reply = tuple[int, bytes, dict]  # status, JSON body, extra headers
COST_PARAMS = ("num_images", "tuning_steps", "num_inference_steps")
DRAIN_BYTES = 256 * 2**20  # of a body over the limit, at most this much is read (and dropped) before answering


@dataclass
class Admitted:
    request: dict
    content_type: str


class Front:
    """The checks of the module docstring, for a model whose params default to `defaults`."""

    def __init__(self, limits_: ServeConfig, defaults: dict[str, Any]):
        self.limits, self.defaults = limits_, defaults

    async def admit(self, scope: dict, receive) -> Admitted | Reply:
        lim = self.limits
        max_bytes = int(lim.max_body_mb * 2**20)
        headers = dict(scope["headers"])
        too_large = (413, error("REQUEST_TOO_LARGE", f"the body is over serve.max_body_mb ({lim.max_body_mb:g} MiB)"),
                     {})
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
        rows = json_rows(request)
        if rows is None:
            return 400, error("INVALID_PARAMETER_VALUE", "the body must be a JSON object with dataframe_split, "
                              "dataframe_records, inputs or instances holding the columns image and prompt"), {}
        params = request.get("params") if isinstance(request.get("params"), dict) else {}
        value = {}
        for name in COST_PARAMS:  # unparsable values are the model's to reject; here they count as the default
            try:
                value[name] = max(int(params.get(name, self.defaults.get(name, 1))), 0)
            except (TypeError, ValueError):
                value[name] = max(int(self.defaults.get(name, 1)), 0)
        try:
            limits.check_budget(lim, rows, value["num_images"], value["tuning_steps"], value["num_inference_steps"])
        except limits.OverBudget as e:
            return 400, error("INVALID_PARAMETER_VALUE", str(e)), {}
        return Admitted(request, content_type)


def json_rows(request: Any) -> list[limits.Row] | None:
    """The budget's view of the rows in MLflow's JSON input formats; None if there are no rows."""
    if not isinstance(request, dict):
        return None
    if isinstance(split := request.get("dataframe_split"), dict):
        columns, data = split.get("columns"), split.get("data")
        if not isinstance(data, list) or not data:
            return None
        columns = columns if isinstance(columns, list) else []
        records = [dict(zip(columns, row)) if isinstance(row, list) else {} for row in data]
    else:
        records = request.get("dataframe_records", request.get("inputs", request.get("instances")))
        if isinstance(records, dict):  # columns of equal length
            length = max((len(v) for v in records.values() if isinstance(v, list)), default=1)
            records = [{k: (v[i] if isinstance(v, list) and i < len(v) else v) for k, v in records.items()}
                       for i in range(length)]
        elif not isinstance(records, list) or not records:
            return None
        records = [r if isinstance(r, dict) else {} for r in records]
    return [limits.row(json.dumps(r.get("image")), r.get("prompt"), r.get("concept"),
                       size=encoded_size(r.get("image")))
            for r in records]


def encoded_size(value: Any) -> int:
    """The decoded size of a base64 image value (of its JSON text where it is not a string)."""
    if isinstance(value, str):
        return len(value) * 3 // 4 - value[-2:].count("=")
    return len(json.dumps(value))


def invoke(model, input_schema, request: dict, content_type: str, until: float | None, retry_after_s: int) -> Reply:
    """MLflow's own invocation of `model` with the deadline `until` (time.monotonic()) in force."""
    # mlflow: only when a request is computed; the server's checks import this module without it
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    try:
        with limits.deadline(until):
            out = scoring_server.invocations(request, content_type, model, input_schema)
    except MlflowException as e:
        if "stack_trace" in getattr(e, "json_kwargs", {}):  # MLflow's wrapper of an unexpected error
            return internal_error(e.json_kwargs["stack_trace"])
        status, message = e.get_http_status_code(), model_message(e.message)
        if status == 503:
            return busy(message, retry_after_s)
        if status == 504:
            log.info("the work of a request past its deadline stopped")
            return 504, error("TIMEOUT", message), {}
        return status, error(e.error_code, message), {}
    return out.status, out.response.encode() if isinstance(out.response, str) else out.response, {
        "content-type": out.mimetype}


def internal_error(details: str) -> Reply:
    """500 with an id; `details` (a traceback) goes to the server's log only."""
    incident = uuid.uuid4().hex[:12]
    log.error("request %s failed: %s", incident, details)
    return 500, error("INTERNAL_ERROR", f"internal error {incident}; see the server log"), {}


def model_message(message: str) -> str:
    """The model's own message out of MLflow's wrapping ("Failed to predict data '<the whole input>'.
    Error: ..."), first line, at most 500 characters: the request body is never echoed."""
    for marker in ("\nError: ", ". Error: "):
        if marker in message:
            message = message.rsplit(marker, 1)[1]
    if message.startswith("Failed to enforce schema"):
        message = "the input does not match the model's signature (columns image: base64 bytes, prompt: text)"
    return message.strip().splitlines()[0][:500] if message.strip() else "invalid request"


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


def busy(message: str, retry_after_s: int) -> Reply:
    return 503, error("SERVER_BUSY", message), {"retry-after": str(retry_after_s)}


def timed_out(limits_: ServeConfig) -> Reply:
    return 504, error("TIMEOUT", f"the request took over serve.request_timeout_s ({limits_.request_timeout_s} s); "
                                 f"ask for fewer images or steps"), {}


def param_defaults(model_meta) -> dict[str, Any]:
    """The params' defaults from a model's signature (an mlflow.models.Model)."""
    params = model_meta.get_params_schema()
    return {p.name: p.default for p in params.params} if params else {}
