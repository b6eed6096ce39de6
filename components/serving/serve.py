"""`datencoder serve`: the MLflow scoring server for the registered model, with CPU-sized timeouts.

It runs exactly `mlflow models serve -m models:/datencoder@champion --env-manager local` (so what is
tested is what is deployed) with the request timeout raised: a CPU request that tunes and samples
16 images takes minutes, and MLflow's default (60 s) would answer 504 while the work goes on.
POST /invocations takes {"dataframe_split": {"columns": ["image", "prompt"], "data": [[<base64>, "S* ..."]]},
"params": {...}}; bad input is answered 400 with a JSON message and the server keeps serving.
"""

from __future__ import annotations

import os
import subprocess
import sys

from components import tracking
from components.config import Config
from components.errors import UserError
from components.serving import registry


def serve_command(model_uri: str, host: str, port: int, workers: int, timeout_s: int) -> tuple[list[str], dict]:
    """argv and environment of the scoring server."""
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", host, "-p", str(port), "-w", str(workers), "-t", str(timeout_s)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
           "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(timeout_s),
           # mlflow starts `uvicorn` by name: find this environment's, also when not activated
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    return argv, env


def serve(cfg: Config, model: str | None = None, host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> dict:
    """Serve until interrupted; returns the server's exit status."""
    model = model or registry.champion_uri()
    if model is None:
        raise UserError(f"no {registry.MODEL_NAME}@{registry.ALIAS} in {tracking.tracking_uri()}: run "
                        f"`datencoder register` first, or pass --model")
    argv, env = serve_command(model, host, port, workers, cfg.personalize.request_timeout_s)
    print(f"serving {model} on http://{host}:{port}/invocations", file=sys.stderr)
    return {"model": model, "exit_code": subprocess.call(argv, env=env)}
