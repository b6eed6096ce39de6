"""Load test of `datencoder serve`: N concurrent clients for M minutes against a real server on 127.0.0.1.

    .venv/bin/python benchmarks/serve_load.py [--preset toy] [--clients 2] [--minutes 2] [--out DIR]
    .venv/bin/python benchmarks/serve_load.py --backend ray [--clients 4] [--minutes 2]

With `--backend ray` it runs the same load three times, each against a fresh `datencoder serve --backend ray` on
a local Ray cluster: 1 replica, 2 replicas, and 2 replicas of which one is killed (SIGKILL) a third of the way
in. It reports each run and the scaling ratio (good + cached answers per second, 2 replicas / 1 replica); in
the killed run a 503 REPLICA_LOST is expected for a request that was computing on the killed replica (goal:
no more than max_concurrent of them), any other failure is unexpected, and no request may hang (none waits
more than --hang-s).

The encoder (`personalize.encoder` of the config, default the committed toy encoder) is logged and registered
as the champion of a fresh MLflow store in a temporary folder (no gate: this measures the server, not the
model), then `datencoder serve` runs it with the same config (--preset, --config, --set) and
serve.max_body_mb 1. Each client sends, in turn:

- good: a new concept image (a colour no other request uses), tuned and sampled: 200;
- cached: one fixed image, prompt and seed: 200 from the concept cache, byte-identical every time;
- bad: bytes that are no image, or a prompt without S*: 400;
- oversized: 3 rows x 16 images (over serve.max_images): 400; or a 1.5 MiB body (over max_body_mb): 413.

503 (queue full, with Retry-After) is expected under load and counted as `busy`. Anything else (5xx, a
dropped connection, a 200 for a bad request, no answer within --hang-s) is an unexpected error. A
cross-request leak is a 200 whose rows are not the request's (prompt and seed of every row), or a cached
reply that differs from the first.
The server's RSS (its process tree) is sampled every 2 s; growth is the last quarter's peak over the
median of the second quarter (after warm-up). Goals: 0 unexpected errors, 0 leaks, RSS growth <= 10%.
Bounded: at most 8 clients, 10 minutes and --max-requests requests, loopback only.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
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

import harness
import yaml

from components.home import ROOT
from components.orchestration.processes import stop_session


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
    version = mlflow.register_model(info.model_uri, registry.model_name(cfg.registry, cfg.preset)).version
    client.set_model_version_tag(registry.model_name(cfg.registry, cfg.preset), version, registry.CODE_TAG,
                                 registry.code_sha256(registry.PYFUNC_CODE))
    client.set_registered_model_alias(registry.model_name(cfg.registry, cfg.preset), registry.ALIAS, version)
    return f"models:/{registry.model_name(cfg.registry, cfg.preset)}@{registry.ALIAS}"


def body(rows: list[tuple[bytes, str]], params: dict) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image", "prompt"],
                                           "data": [[base64.b64encode(i).decode(), p] for i, p in rows]},
                       "params": params}).encode()


def post(port: int, data: bytes, timeout_s: float) -> tuple[int, dict | None]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
    except TimeoutError:
        return -2, None  # no answer in time: hung
    except (OSError, ValueError):
        return -1, None  # dropped connection or a reply that is not JSON


class Load:
    def __init__(self, port: int, deadline: float, max_requests: int, hang_s: float):
        self.port, self.deadline, self.max_requests, self.hang_s = port, deadline, max_requests, hang_s
        self.lost = 0  # 503 REPLICA_LOST: the request was computing on a replica that died
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
            expect = {"prompt": "S* on grass", "seed": seed}
            return kind, body([(png(rgb), "S* on grass")], {**GOOD, "seed": seed}), expect
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
            status, reply = post(self.port, data, self.hang_s)
            elapsed = time.monotonic() - started
            with self.lock:
                self.outcomes[f"{kind} {status}"] += 1
                if status == 503 and (reply or {}).get("error_code") == "REPLICA_LOST":
                    self.lost += 1
                    continue
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


def wait_for_ping(server: subprocess.Popen, port: int, log_path: Path) -> float:
    """Seconds until the server answers GET /ping with 200; its log's end in the error if it exits first."""
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() - started > 600:
            raise RuntimeError(log_path.read_text()[-2000:])
        time.sleep(1)


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server (a Ray backend shuts its own cluster down), then whatever is left of its session."""
    stop_session(server, 90, first=signal.SIGTERM)


def server_config(args, preset: str, path: Path, serve: dict | None = None) -> Path:
    """A config file for `datencoder serve`: this run's (--config, then --set) and `preset`, `serve` keys over it."""
    from components.config import deep_merge, read_yaml

    given = (read_yaml(Path(args.config).read_text()) or {}) if args.config else {}
    values = deep_merge(deep_merge(given, harness.overrides(args)), {"preset": preset, "serve": serve or {}})
    path.write_text(yaml.safe_dump(values))
    return path


def run(args, preset: str, scratch: str, store: str, backend: str, replicas: int, kill: bool) -> dict:
    """One server, one load: the report of one run."""
    import socket

    from components.serving.ray_serve import replica_processes

    config = server_config(args, preset, Path(scratch, f"config-{backend}-{replicas}{'-kill' if kill else ''}.yaml"),
                           {"max_body_mb": 1})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = Path(scratch, f"{config.stem}.log")
    log = open(log_path, "w")
    extra = ["--backend", "ray", "--replicas", str(replicas)] if backend == "ray" else []
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    if backend == "ray":
        env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short paths for Ray's sockets
    server = subprocess.Popen([sys.executable, "-m", "components.cli", "serve", "--config", str(config),
                               "--host", "127.0.0.1", "--port", str(port), *extra], cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True, env=env)
    killed = None
    try:
        startup_s = wait_for_ping(server, port, log_path)
        run_s = args.minutes * 60
        load = Load(port, time.monotonic() + run_s, args.max_requests, args.hang_s)
        rss: list[tuple[float, float]] = []
        threads = [threading.Thread(target=load.client, args=(i,)) for i in range(args.clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss.append((round(time.monotonic() - t0, 1), round(tree_rss_mb(server.pid), 1)))
            if kill and killed is None and time.monotonic() - t0 > run_s / 3:
                victim = replica_processes(server.pid)[0]
                victim.kill()
                killed = {"at_s": round(time.monotonic() - t0, 1), "pid": victim.pid}
            time.sleep(2)
        wall = time.monotonic() - t0
        if killed:  # replaced: a new replica process, as many as before
            waited = time.monotonic()
            while len(now := replica_processes(server.pid)) < replicas or killed["pid"] in {p.pid for p in now}:
                if time.monotonic() - waited > 300:
                    break
                time.sleep(2)
            killed["replaced"] = len(now) == replicas and killed["pid"] not in {p.pid for p in now}
    finally:
        stop_server(server)
        log.close()
        if backend == "ray":
            shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)

    quarter = max(len(rss) // 4, 1)
    warm = statistics.median(m for _, m in rss[quarter:2 * quarter] or rss)
    last = max(m for _, m in rss[-quarter:])
    served = {k: len(v) for k, v in load.latency.items()}
    ok = served["good"] + served["cached"]
    report = {
        "backend": backend, "replicas": replicas if backend == "ray" else None, "clients": args.clients,
        "minutes": args.minutes, "wall_s": round(wall, 1), "server_startup_s": round(startup_s, 1),
        "requests": sum(load.outcomes.values()), "answered_by_kind": served,
        "throughput_per_s": {"all": round(sum(load.outcomes.values()) / wall, 3),
                             "good_and_cached": round(ok / wall, 3)},
        "busy_503": sum(n for k, n in load.outcomes.items() if k.endswith(" 503")) - load.lost,
        "outcomes": dict(sorted(load.outcomes.items())),
        "latency_s": {k: {"p50": percentile(v, 0.5), "p95": percentile(v, 0.95)} for k, v in load.latency.items()},
        "unexpected_errors": dict(load.unexpected), "cross_request_leaks": load.leaks,
        "rss_mb": {"after_warmup": round(warm, 1), "last_quarter_peak": round(last, 1),
                   "growth": round(last / warm - 1, 4) if warm else None, "series": rss},
    }
    if kill:
        report["killed_replica"] = {**killed, "requests_lost_503": load.lost}
    report["goals_met"] = (not load.unexpected and load.leaks == 0 and
                           (load.lost <= 1 and killed["replaced"] if kill else load.lost == 0) and
                           (kill or (report["rss_mb"]["growth"] is not None and report["rss_mb"]["growth"] <= 0.10)))
    return report


def main() -> int:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--backend", choices=("uvicorn", "ray"), default="uvicorn")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--hang-s", type=float, default=300.0, help="a request unanswered this long counts as hung")
    args = parser.parse_args()
    args.clients, args.minutes = min(max(args.clients, 1), 8), min(max(args.minutes, 0.1), 10.0)
    cfg = harness.config(args)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as scratch:
        store = f"sqlite:///{scratch}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = store
        from mlflow import MlflowClient

        from components.serving import registry

        MlflowClient(store).create_experiment(registry.EXPERIMENT,
                                              artifact_location=Path(scratch, "artifacts").as_uri())
        register_champion(cfg, cfg.personalize.encoder)
        if args.backend == "uvicorn":
            report = run(args, cfg.preset, scratch, store, "uvicorn", 1, kill=False)
            report["preset"] = cfg.preset
        else:
            runs = {f"ray_{n}": run(args, cfg.preset, scratch, store, "ray", n, kill=False) for n in (1, 2)}
            runs["ray_2_killed"] = run(args, cfg.preset, scratch, store, "ray", 2, kill=True)
            one, two = (runs[f"ray_{n}"]["throughput_per_s"]["good_and_cached"] for n in (1, 2))
            report = {"preset": cfg.preset, "backend": "ray", "clients": args.clients, "minutes": args.minutes,
                      "cpu_cores": os.cpu_count(), "scaling_2_over_1": round(two / one, 3) if one else None,
                      "runs": runs, "goals_met": all(r["goals_met"] for r in runs.values())}

    def brief(r: dict) -> dict:
        return {k: v for k, v in r.items() if k != "rss_mb"} | {"rss_mb": {
            k: v for k, v in r["rss_mb"].items() if k != "series"}}

    harness.report(report, args, shown=brief(report) if "runs" not in report else
                   {**report, "runs": {k: brief(v) for k, v in report["runs"].items()}})
    return 0 if report["goals_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
