"""What comes back from the registered model served by stock `mlflow models serve` and by `datencoder serve`
(uvicorn, and Ray Serve with --ray), for the same bad and oversized requests, measured on 127.0.0.1.

    .venv/bin/python benchmarks/scoring_server_replies.py [--preset toy] [--ray] [--out DIR]

The toy encoder (`personalize.encoder` of the config) is registered as the champion of a fresh MLflow store in a
temporary folder; each server runs it with its defaults (`mlflow models serve --env-manager local`, MLflow's own
timeout 60 s; `datencoder serve` with this run's --preset, --config and --set). Requests:

- malformed: a 2 MiB body that is not UTF-8 (Content-Type application/json);
- not JSON: 2 MiB of UTF-8 text that does not parse;
- bad image: one row whose image is not an image, carrying a marker string in its prompt;
- oversized: 64 prompts x 16 images (over serve.max_images, which the model applies itself).

For each: the status, seconds to the answer, the reply's size, whether it carries a stack trace, and whether
it echoes the request (the body's bytes or the marker).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import harness
from serve_load import body, png, register_champion, server_config, stop_server, wait_for_ping

from components.home import ROOT


MARKER = "ECHO-MARKER-7f3a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests() -> dict[str, bytes]:
    not_utf8 = b'{"dataframe_split": "' + bytes([0xFF, 0xFE]) * 2**20 + b'"}'
    not_json = b'{"dataframe_split": ' + b"x" * 2**21
    bad_image = json.dumps({"dataframe_split": {"columns": ["image", "prompt"], "data": [
        [base64.b64encode(b"%PDF-1.4 not an image").decode(), f"S* {MARKER}"]]}}).encode()
    oversized = body([(png((9, 9, 9)), f"S* number {i}") for i in range(64)], {"num_images": 16, "tuning_steps": 12})
    return {"malformed_not_utf8_2mib": not_utf8, "not_json_2mib": not_json, "bad_image": bad_image,
            "oversized_64x16": oversized}


def measure(port: int, data: bytes) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                     headers={"Content-Type": "application/json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            status, reply = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, reply = e.code, e.read()
    except TimeoutError:
        return {"status": None, "seconds": round(time.monotonic() - started, 2), "note": "no answer in 120 s"}
    text = reply.decode("utf-8", errors="replace")
    return {"status": status, "seconds": round(time.monotonic() - started, 3), "reply_bytes": len(reply),
            "reply_over_body": round(len(reply) / len(data), 2), "stack_trace": "Traceback" in text,
            # the marker, a prompt, the non-UTF-8 bytes (as Python writes them) or the unparsable text
            "echoes_request": (any(s in text for s in (MARKER, "S* number 1", "xxxxxxxxxxxxxxxx"))
                               or text.count("xff") > 100),
            "reply_start": text[:160]}


def main() -> int:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--ray", action="store_true", help="also `datencoder serve --backend ray --replicas 1`")
    args = parser.parse_args()
    cfg = harness.config(args)
    venv = str(Path(sys.executable).parent)
    report = {"preset": cfg.preset, "request_bytes": {k: len(v) for k, v in requests().items()}, "servers": {}}
    with tempfile.TemporaryDirectory(prefix="scoring-replies-") as scratch:
        store = f"sqlite:///{scratch}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = store
        from mlflow import MlflowClient

        from components.serving import registry

        MlflowClient(store).create_experiment(registry.EXPERIMENT,
                                              artifact_location=Path(scratch, "artifacts").as_uri())
        uri = register_champion(cfg, cfg.personalize.encoder)
        config = str(server_config(args, cfg.preset, Path(scratch, "config.yaml")))
        env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": venv + os.pathsep + os.environ.get("PATH", "")}
        serve = [sys.executable, "-m", "components.cli", "serve", "--config", config, "--host", "127.0.0.1"]
        servers = {
            "mlflow models serve": lambda port: [str(Path(venv, "mlflow")), "models", "serve", "-m", uri,
                                                 "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            "datencoder serve": lambda port: [*serve, "--port", str(port)],
        }
        if args.ray:
            servers["datencoder serve --backend ray"] = lambda port: [*serve, "--port", str(port), "--backend", "ray",
                                                                      "--replicas", "1"]
        for name, command in servers.items():
            port = free_port()
            server_env = {**env, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-", dir="/tmp")} if "ray" in name else env
            log = Path(scratch, f"{name.replace(' ', '_')}.log")
            with open(log, "w") as out:
                process = subprocess.Popen(command(port), cwd=ROOT, env=server_env, stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    wait_for_ping(process, port, log)
                    report["servers"][name] = {kind: measure(port, data) for kind, data in requests().items()}
                finally:
                    stop_server(process)
    harness.report(report, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
