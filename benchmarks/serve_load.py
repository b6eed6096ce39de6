"""Load test of `datencoder serve`: N concurrent clients for M minutes against a real server on 127.0.0.1.

    .venv/bin/python benchmarks/serve_load.py [--preset toy] [--clients 2] [--minutes 2] [--out outputs/serve_load.json]

The encoder (`personalize.encoder` of the preset, default the committed toy encoder) is logged and registered
as the champion of a fresh MLflow store in a temporary folder (no gate: this measures the server, not the
model), then `datencoder serve` runs it with serve.max_body_mb 1. Each client sends, in turn:

- good: a new concept image (a colour no other request uses), tuned and sampled: 200;
- cached: one fixed image, prompt and seed: 200 from the concept cache, byte-identical every time;
- bad: bytes that are no image, or a prompt without S*: 400;
- oversized: 3 rows x 16 images (over serve.max_images): 400; or a 1.5 MiB body (over max_body_mb): 413.

503 (queue full, with Retry-After) is expected under load and counted as `busy`. Anything else (5xx, a
dropped connection, a 200 for a bad request) is an unexpected error. A cross-request leak is a 200 whose
rows are not the request's (prompt and seed of every row), or a cached reply that differs from the first.
The server's RSS (its process tree) is sampled every 2 s; growth is the last quarter's peak over the
median of the second quarter (after warm-up). Goals: 0 unexpected errors, 0 leaks, RSS growth <= 10%.
Bounded: at most 8 clients, 10 minutes and --max-requests requests, loopback only.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"tuning_steps": 2, "num_inference_steps": 4, "num_images": 1}  # small, so a short run serves many
KINDS = ("good", "cached", "bad", "oversized")


def png(rgb: tuple[int, int, int], side: int = 64) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side), (128, 128, 128))
    ImageDraw.Draw(image).ellipse([side // 4, side // 4, 3 * side // 4, 3 * side // 4], fill=rgb)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def register_champion(cfg, encoder: str) -> str:
    """Log `encoder` as the pyfunc model, register it with its code hash and make it the champion."""
    import mlflow
    from mlflow import MlflowClient

    from components.serving import registry

    client = MlflowClient()
    experiment = client.get_experiment_by_name(registry.EXPERIMENT) or client.get_experiment(
        client.create_experiment(registry.EXPERIMENT))
    with mlflow.start_run(experiment_id=experiment.experiment_id):
        info = registry.log_model(cfg, encoder)
    version = mlflow.register_model(info.model_uri, registry.MODEL_NAME).version
    client.set_model_version_tag(registry.MODEL_NAME, version, registry.CODE_TAG, registry.code_sha256(registry.PYFUNC_CODE))
    client.set_registered_model_alias(registry.MODEL_NAME, registry.ALIAS, version)
    return f"models:/{registry.MODEL_NAME}@{registry.ALIAS}"


def body(rows: list[tuple[bytes, str]], params: dict) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image", "prompt"],
                                           "data": [[base64.b64encode(i).decode(), p] for i, p in rows]},
                       "params": params}).encode()


def post(port: int, data: bytes) -> tuple[int, dict | None]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=900) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
    except (OSError, ValueError):
        return -1, None  # dropped connection or a reply that is not JSON


class Load:
    def __init__(self, port: int, deadline: float, max_requests: int):
        self.port, self.deadline, self.max_requests = port, deadline, max_requests
        self.lock = threading.Lock()
        self.sent = 0
        self.latency: dict[str, list[float]] = {k: [] for k in KINDS}
        self.outcomes: Counter = Counter()  # (kind, status)
        self.unexpected: Counter = Counter()
        self.leaks = 0
        self.cached_reference: str | None = None
        self.colour = 0

    def next_request(self, n: int) -> tuple[str, bytes, dict | None]:
        kind = KINDS[n % len(KINDS)]
        if kind == "good":
            with self.lock:
                self.colour += 1
                c = self.colour
            seed = 1000 + c
            rgb = (40 + (c * 37) % 200, 40 + (c * 71) % 200, 40 + (c * 113) % 200)
            return kind, body([(png(rgb), "S* on grass")], {**GOOD, "seed": seed}), {"prompt": "S* on grass", "seed": seed}
        if kind == "cached":
            return kind, body([(png((220, 40, 40)), "S* on a beach")], {**GOOD, "seed": 7}), {
                "prompt": "S* on a beach", "seed": 7}
        if kind == "bad":
            rows = [(b"%PDF-1.4 not an image", "S*")] if n % 8 < 4 else [(png((1, 2, 3)), "no placeholder")]
            return kind, body(rows, GOOD), None
        if n % 8 < 4:
            return kind, body([(png((9, 9, 9)), "S*")] * 3, {**GOOD, "num_images": 16}), None
        return kind, body([(png((9, 9, 9)), "S* " + "x" * (3 * 2**19))], GOOD), None  # 1.5 MiB

    def client(self, index: int) -> None:
        n = index
        while time.monotonic() < self.deadline:
            with self.lock:
                if self.sent >= self.max_requests:
                    return
                self.sent += 1
            kind, data, expect = self.next_request(n)
            n += 1
            started = time.monotonic()
            status, reply = post(self.port, data)
            elapsed = time.monotonic() - started
            with self.lock:
                self.outcomes[f"{kind} {status}"] += 1
                if status == 503:
                    continue  # busy: expected under load
                self.latency[kind].append(elapsed)
                ok = {"good": (200,), "cached": (200,), "bad": (400,), "oversized": (400, 413)}[kind]
                if status not in ok:
                    self.unexpected[f"{kind} {status}"] += 1
                    continue
                if status == 200:
                    rows = reply["predictions"]
                    if [(r["prompt"], r["seed"]) for r in rows] != [(expect["prompt"], expect["seed"])]:
                        self.leaks += 1
                    if kind == "cached":
                        self.cached_reference = self.cached_reference or rows[0]["image"]
                        self.leaks += rows[0]["image"] != self.cached_reference


def tree_rss_mb(pid: int) -> float:
    import psutil

    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20
    except psutil.Error:
        return 0.0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="toy")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--out", default="outputs/serve_load.json")
    args = parser.parse_args()
    clients, minutes = min(max(args.clients, 1), 8), min(max(args.minutes, 0.1), 10.0)

    import socket

    import yaml

    from components.config import load_config

    cfg = load_config(args.preset)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as scratch:
        store = f"sqlite:///{scratch}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = store
        from mlflow import MlflowClient

        from components.serving import registry

        MlflowClient(store).create_experiment(registry.EXPERIMENT, artifact_location=Path(scratch, "artifacts").as_uri())
        register_champion(cfg, cfg.personalize.encoder)
        config = Path(scratch, "config.yaml")
        config.write_text(yaml.safe_dump({"preset": args.preset, "serve": {"max_body_mb": 1}}))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(Path(scratch, "server.log"), "w")
        server = subprocess.Popen([sys.executable, "-m", "components.cli", "serve", "--config", str(config),
                                   "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "MLFLOW_TRACKING_URI": store})
        try:
            started = time.monotonic()
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5)
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() - started > 600:
                        raise RuntimeError(Path(scratch, "server.log").read_text()[-2000:]) from None
                    time.sleep(1)
            startup_s = time.monotonic() - started
            run_s = minutes * 60
            load = Load(port, time.monotonic() + run_s, args.max_requests)
            rss: list[tuple[float, float]] = []
            threads = [threading.Thread(target=load.client, args=(i,)) for i in range(clients)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                rss.append((round(time.monotonic() - t0, 1), round(tree_rss_mb(server.pid), 1)))
                time.sleep(2)
            wall = time.monotonic() - t0
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
            log.close()

    quarter = max(len(rss) // 4, 1)
    warm = statistics.median(m for _, m in rss[quarter:2 * quarter] or rss)
    last = max(m for _, m in rss[-quarter:])
    served = {k: len(v) for k, v in load.latency.items()}
    report = {
        "preset": args.preset, "clients": clients, "minutes": minutes, "wall_s": round(wall, 1),
        "server_startup_s": round(startup_s, 1),
        "requests": sum(load.outcomes.values()), "answered_by_kind": served,
        "busy_503": sum(n for k, n in load.outcomes.items() if k.endswith(" 503")),
        "outcomes": dict(sorted(load.outcomes.items())),
        "latency_s": {k: {"p50": percentile(v, 0.5), "p95": percentile(v, 0.95)} for k, v in load.latency.items()},
        "unexpected_errors": dict(load.unexpected), "cross_request_leaks": load.leaks,
        "rss_mb": {"after_warmup": round(warm, 1), "last_quarter_peak": round(last, 1),
                   "growth": round(last / warm - 1, 4) if warm else None, "series": rss},
    }
    report["goals_met"] = (not load.unexpected and load.leaks == 0 and report["rss_mb"]["growth"] is not None
                           and report["rss_mb"]["growth"] <= 0.10)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rss_mb"} | {"rss_mb": {
        k: v for k, v in report["rss_mb"].items() if k != "series"}}, indent=1))
    return 0 if report["goals_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
