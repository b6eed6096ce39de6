"""Serving: a real `datencoder serve` process on 127.0.0.1, real HTTP requests: good requests, bad ones
(400 + JSON message, server keeps serving, no temp files left), and concurrent requests that must not leak
concepts into each other. Each runs against both backends: uvicorn (the default) and Ray Serve with two
replicas on a local Ray cluster the server starts (slow). The limits (budget, body size, queue, timeout) run
against the uvicorn app served in this process, so a test can see the model's own work counters, and against
a Ray Serve server with the same limits (slow); a Ray Serve replica killed under load is replaced while the
service keeps answering (slow). Trust: a champion whose logged code is not this project's is refused."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from PIL import Image
from smoke_models import free_port, isolated_store, smoke_setup, solid_png, stop_server, wait_for_ping

from components.errors import UserError


class Server:
    """`datencoder serve` for the champion of `store` (backend uvicorn or ray), in its own process group."""

    def __init__(self, tmp: Path, store: str, config: dict, backend: str = "uvicorn"):
        self.store, self.backend = store, backend
        self.tmpdir = Path(tempfile.mkdtemp(prefix="server-tmp-", dir=tmp))
        env = {**os.environ, "MLFLOW_TRACKING_URI": store, "TMPDIR": str(self.tmpdir)}
        args = []
        if backend == "ray":  # Ray keeps its session under RAY_TMPDIR: short paths (its sockets), not TMPDIR
            self.ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
            env.update(RAY_TMPDIR=self.ray_tmp)
            args = ["--backend", "ray", "--replicas", str(RAY_REPLICAS)]
        config_file = self.tmpdir.parent / f"{self.tmpdir.name}.yaml"
        config_file.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log_path = self.tmpdir.parent / f"{self.tmpdir.name}.log"
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "components.cli", "serve", "--config", str(config_file),
                                         "--port", str(self.port), *args], env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_ping(self.process, self.port, self.log_path, f"datencoder serve --backend {backend}")
        except RuntimeError:
            self.stop()
            raise

    def post(self, rows: list[tuple[bytes, str]] | dict, params: dict | None = None) -> tuple[int, dict]:
        status, _, body = post(self.port, rows, params)
        return status, body

    def work_done(self) -> None:
        """The model's work counters live in the replicas: not visible from here."""
        return None

    def listing(self) -> set[str]:
        return {str(p.relative_to(self.tmpdir)) for p in self.tmpdir.rglob("*")}

    def stop(self) -> None:
        try:
            stop_server(self.process)  # the server shuts its Ray cluster down itself
        finally:
            self.log.close()
            if self.backend == "ray":
                shutil.rmtree(self.ray_tmp, ignore_errors=True)


def post(port: int, rows: list[tuple[bytes, str]] | dict | bytes, params: dict | None = None,
         content_type: str = "application/json") -> tuple[int, dict, dict]:
    """POST /invocations: rows (image bytes, prompt) as MLflow's dataframe_split, a whole JSON body, or raw
    bytes -> (status, headers, JSON reply)."""
    if isinstance(rows, bytes):
        data = rows
    else:
        body = rows if isinstance(rows, dict) else {
            "dataframe_split": {"columns": ["image", "prompt"],
                                "data": [[base64.b64encode(img).decode(), prompt] for img, prompt in rows]}}
        if params is not None:
            body["params"] = params
        data = json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=600) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def decode(prediction: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["image"]))).convert("RGB"))


RAY_REPLICAS = 2
BACKENDS = ["uvicorn", pytest.param("ray", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    return (tmp, *smoke_setup(tmp))


@pytest.fixture(scope="module")
def store(smoke) -> str:
    """A tracking store whose champion is the smoke encoder."""
    from components.serving import registry

    tmp, _, cfg, encoder = smoke
    uri = isolated_store(tmp)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        registry.register(cfg, str(encoder))
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.__setitem__("MLFLOW_TRACKING_URI", old)
    return uri


def smoke_config(smoke, **serve) -> dict:
    return {**yaml.safe_load(smoke[1].read_text()), **({"serve": serve} if serve else {})}


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, smoke, store):
    s = Server(smoke[0], store, smoke_config(smoke), request.param)
    yield s
    s.stop()


RED_CONCEPT = solid_png((128, 128, 128), shape_rgb=(220, 40, 40))
FAST = {"tuning_steps": 1, "num_inference_steps": 2}


def test_good_request_returns_png_images_per_row(server):
    status, out = server.post([(RED_CONCEPT, "S* on a beach"), (RED_CONCEPT, "a sketch of S*")],
                              {**FAST, "num_images": 2, "seed": 7})
    assert status == 200, out
    rows = out["predictions"]
    assert [(r["prompt"], r["seed"]) for r in rows] == [("S* on a beach", 7), ("S* on a beach", 8),
                                                        ("a sketch of S*", 7), ("a sketch of S*", 8)]
    assert all(decode(r).shape == (64, 64, 3) for r in rows)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_bad_requests_get_400_with_a_message_and_the_server_keeps_serving(server):
    before = server.listing()
    good = (RED_CONCEPT, "S* on grass")
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(jpeg, format="JPEG")
    cases = [
        ([(b"%PDF-1.4 not an image", "S*")], FAST, "not an image"),
        ([(b"", "S*")], FAST, "empty"),
        ([(RED_CONCEPT[:-30], "S*")], FAST, "truncated or corrupt"),
        ([(jpeg.getvalue()[:150], "S*")], FAST, "truncated or corrupt"),
        ([(png(Image.new("1", (5000, 4500))), "S*")], FAST, "megapixels; the limit is 20"),
        ([(RED_CONCEPT, "a red circle")], FAST, "no placeholder S*"),
        ([(RED_CONCEPT, "S* " + "very " * 40)], FAST, "too long"),
        ([good], {"tuning_steps": -1}, "tuning_steps must be between 0 and 100"),
        ([good], {"tuning_steps": 101}, "tuning_steps must be between 0 and 100"),
        ([good], {"num_images": 0}, "num_images must be between 1 and 16"),
        ([good], {"num_images": 17}, "num_images must be between 1 and 16"),
        ([good], {"seed": 1.5}, "seed"),
        ([good], {"seed": "abc"}, "seed"),
    ]
    for rows, params, reason in cases:
        status, body = server.post(rows, params)
        assert status == 400 and reason in body["message"], (reason, status, body)
        assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    status, out = server.post([good], FAST)
    assert status == 200 and decode(out["predictions"][0]).shape == (64, 64, 3)
    # a param the signature does not declare: MLflow's ParamSchema drops it, the request runs as without it
    status, typo = server.post([good], {**FAST, "tuning_stepz": 3})
    assert status == 200 and typo["predictions"][0]["image"] == out["predictions"][0]["image"]
    assert server.listing() == before  # no temp files left behind


def test_concurrent_requests_do_not_leak_into_each_other(smoke, server):
    """Four different concepts at once: each response equals what that concept alone produces."""
    from components.inference.engine import Personalizer

    _, _, cfg, encoder = smoke
    colours = [(220, 40, 40), (40, 80, 220), (50, 170, 70), (240, 215, 40)]
    images = [solid_png((128, 128, 128), shape_rgb=c) for c in colours]
    # 12 tuning steps and guidance 4 make the four (random-weight) concepts visibly different: equality means something
    params = {"tuning_steps": 12, "num_inference_steps": 3, "seed": 1, "alpha_blend": 1.0, "guidance_scale": 4.0}
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda img: server.post([(img, "a photo of S*")], params), images))
    assert all(status == 200 for status, _ in replies), replies
    alone = Personalizer(cfg.engine, encoder)
    settings = alone.settings(**params)
    for image, (_, out) in zip(images, replies):
        expected = alone.run(image, ["a photo of S*"], settings).images[0].pixels
        got = decode(out["predictions"][0])
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    outputs = [decode(out["predictions"][0]) for _, out in replies]
    assert all(np.abs(a.astype(int) - b.astype(int)).mean() > 1.0
               for i, a in enumerate(outputs) for b in outputs[i + 1:])


# --- limits: the same app, served by uvicorn in this process -----------------------------------------
class InProcess:
    """build_app for the champion of `store` with `limits`, served by uvicorn on 127.0.0.1 in a thread."""

    def __init__(self, store: str, limits: dict):
        import uvicorn

        from components.config import ServeConfig
        from components.serving import registry, serve

        os.environ["MLFLOW_TRACKING_URI"] = store
        try:
            model = registry.load_pyfunc(registry.trusted_model_dir("models:/datencoder-smoke@champion"))
        finally:
            os.environ.pop("MLFLOW_TRACKING_URI")
        self.personalizer = model.unwrap_python_model().personalizer
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(serve.build_app(model, ServeConfig(**limits)), host="127.0.0.1",
                                                    port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "in-process server did not start"
            time.sleep(0.05)

    fill = 1  # requests that take every compute slot and queue place (max_concurrent 1, max_queue 0)

    def work_done(self) -> int:
        """Concepts the model has looked up (tuned or from its cache): any request that did work counts."""
        return self.personalizer.cache.hits + self.personalizer.cache.misses

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


LIMITS = {"max_images": 4, "max_steps": 1000, "max_body_mb": 0.25, "max_concurrent": 1, "max_queue": 0,
          "request_timeout_s": 2, "retry_after_s": 7}


@pytest.fixture(scope="module", params=BACKENDS)
def guarded(request, smoke, store):
    """The uvicorn app in this process, or a Ray Serve server (two replicas), with LIMITS."""
    if request.param == "uvicorn":
        s = InProcess(store, LIMITS)
    else:
        s = Server(smoke[0], store, smoke_config(smoke, **LIMITS), "ray")
        # every replica computing one request and Ray's smallest queue (1) full
        s.fill = RAY_REPLICAS * LIMITS["max_concurrent"] + max(LIMITS["max_queue"], 1)
    yield s
    s.stop()


def assert_no_trace_nor_echo(reply: dict, marker: str | None = None) -> None:
    text = json.dumps(reply)
    assert set(reply) == {"error_code", "message"} and "Traceback" not in text and "stack_trace" not in text
    assert marker is None or marker not in text


def test_requests_over_a_limit_are_refused_before_any_work(guarded):
    before = guarded.work_done()
    marker = "MARKER-" + "x" * 20
    cases = [  # (body or rows, params, content type, status, words of the message)
        ([(RED_CONCEPT, "S*")] * 3, {"num_images": 2, **FAST}, "application/json", 400, "6 images"),
        ([(RED_CONCEPT, "S*")], {"tuning_steps": 100, "num_inference_steps": 901}, "application/json", 400,
         "1001 tuning + sampling steps; the limit is 1000"),
        ([(RED_CONCEPT, "S* " + "x" * 300_000)], FAST, "application/json", 413, "serve.max_body_mb"),
        (b"image,prompt\n" + marker.encode(), None, "text/csv", 415, "application/json"),
        (b'{"dataframe_split": ' + marker.encode(), None, "application/json", 400, "not valid JSON"),
        ({"columns": ["image"], "marker": marker}, None, "application/json", 400, "dataframe_split"),
    ]
    for body, params, content_type, status, words in cases:
        started = time.monotonic()
        got, _, reply = post(guarded.port, body, params, content_type)
        assert (got, words in reply["message"]) == (status, True), (words, got, reply)
        assert time.monotonic() - started < 5
        assert_no_trace_nor_echo(reply, marker)
    assert guarded.work_done() == before  # nothing was tuned nor looked up (uvicorn: counted; ray: None both times)

    # a bad image reaches the model: its own one-line message, not MLflow's echo of the whole input
    bad = {"dataframe_split": {"columns": ["image", "prompt"], "data": [["!!not base64 " + marker, "S*"]]}}
    got, _, reply = post(guarded.port, bad)
    assert got == 400
    assert_no_trace_nor_echo(reply, marker)
    got, _, reply = post(guarded.port, [(b"%PDF " + marker.encode(), "S*")], FAST)
    assert got == 400 and "not an image" in reply["message"]
    assert_no_trace_nor_echo(reply, marker)


def test_a_busy_server_answers_503_and_a_timed_out_request_stops_its_work(guarded):
    # 100 tuning + 4 x 225 sampling steps: far more than the 2 s timeout on any machine
    heavy = {"tuning_steps": 100, "num_images": 4, "num_inference_steps": 225}
    replies: list = []
    fillers = [threading.Thread(
                   target=lambda i=i: replies.append(post(guarded.port, [(solid_png((i, 9, 9)), "S*")], heavy)))
               for i in range(guarded.fill)]  # every slot and queue place taken
    started = time.monotonic()
    for t in fillers:  # one after another: Ray's router counts a request queued until it has placed it, so
        t.start()      # a simultaneous burst fills its queue even while a replica is idle (docs/personalize.md)
        time.sleep(0.3)
    time.sleep(0.5)
    status, headers, reply = post(guarded.port, [(RED_CONCEPT, "S* on grass")], FAST)
    assert status == 503 and headers["retry-after"] == "7" and reply["error_code"] == "SERVER_BUSY", reply
    for t in fillers:
        t.join()
    answered = time.monotonic()
    assert len(replies) == guarded.fill
    for status, _, reply in replies:
        assert status == 504 and reply["error_code"] == "TIMEOUT", (status, reply)
    assert answered - started < 6 + guarded.fill
    # the heavy work stopped at its next UNet call: a slot is free again within seconds
    while (status := post(guarded.port, [(RED_CONCEPT, "S* on grass")], FAST)[0]) == 503:
        assert time.monotonic() - answered < 8, "the timed-out request kept computing"
        time.sleep(0.2)
    assert status == 200


def model_replicas(server: Server) -> list[psutil.Process]:
    from components.serving.ray_serve import replica_processes

    return replica_processes(server.process.pid)


@pytest.mark.slow
@pytest.mark.parametrize("server", ["ray"], indirect=True)
def test_a_killed_ray_replica_is_replaced_and_the_service_keeps_answering(server):
    replicas = model_replicas(server)
    assert len(replicas) == RAY_REPLICAS
    outcomes: list = []
    stop = time.monotonic() + 20

    def client(k: int) -> None:
        n = 0
        while time.monotonic() < stop:
            n += 1
            started = time.monotonic()
            status, _, reply = post(server.port, [(solid_png((k * 50 + n % 50, 40, 40)), "S* on grass")],
                                    {**FAST, "seed": n})
            outcomes.append((status, reply.get("error_code"), time.monotonic() - started))

    clients = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in clients:
        t.start()
    time.sleep(4)
    replicas[0].kill()
    for t in clients:
        t.join()
    assert outcomes and all(seconds < 60 for _, _, seconds in outcomes)  # nothing hung
    lost = [(status, code) for status, code, _ in outcomes if status != 200]
    # at most the one request computing on the killed replica (max_concurrent 1) is lost, answered 503
    assert len(lost) <= 1 and all(o == (503, "REPLICA_LOST") for o in lost), lost
    assert sum(status == 200 for status, _, _ in outcomes) >= 5
    deadline = time.monotonic() + 180
    while len(alive := model_replicas(server)) < RAY_REPLICAS or replicas[0].pid in {p.pid for p in alive}:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(2)
    assert server.post([(RED_CONCEPT, "S* on grass")], FAST)[0] == 200


# --- trust: only this project's model code is loaded -------------------------------------------------
def log_version(code: Path, tag: str | None) -> str:
    """Register a model whose logged code is `code`, with code_sha256 = `tag` (None: none, as before the
    tag existed), and make it the champion. Nothing is loaded here: the check refuses before loading."""
    import mlflow
    from mlflow import MlflowClient

    from components import tracking
    from components.serving import registry

    mlflow.set_tracking_uri(tracking.tracking_uri())  # this test's store, whatever an earlier test set
    with mlflow.start_run(experiment_id=MlflowClient().get_experiment_by_name(registry.EXPERIMENT).experiment_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code))
    version = mlflow.register_model(info.model_uri, registry.MODEL_NAME).version
    client = MlflowClient()
    if tag is not None:
        client.set_model_version_tag(registry.MODEL_NAME, version, registry.CODE_TAG, tag)
    client.set_registered_model_alias(registry.MODEL_NAME, registry.ALIAS, version)
    return version


def test_a_champion_with_foreign_or_unrecorded_code_is_refused_unless_trusted(tmp_path, monkeypatch, capsys):
    from components.cli import main
    from components.serving import registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", isolated_store(tmp_path))
    monkeypatch.delenv(registry.TRUST_ENV, raising=False)
    foreign = tmp_path / "pyfunc_model.py"  # this project's file plus one line: someone else's code
    foreign.write_text(registry.PYFUNC_CODE.read_text() + "\nprint('someone else ran here')\n")
    (tmp_path / "concept.png").write_bytes(RED_CONCEPT)
    champion = "models:/datencoder@champion"
    cases = [(foreign, registry.code_sha256(foreign), "not this project's"),  # the tag matches its own code
             (registry.PYFUNC_CODE, "0" * 64, "tag does not match"),
             (registry.PYFUNC_CODE, None, "registered before model code hashes were recorded")]
    for code, tag, words in cases:
        log_version(code, tag)
        with pytest.raises(UserError, match=words):
            registry.trusted_model_dir(champion)
        for command in (["personalize", "--image", str(tmp_path / "concept.png"), "--prompt", "S*"], ["serve"]):
            assert main([*command, "--port", str(free_port())] if command == ["serve"] else command) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert words in err[-1] and "--trust-model-code" in err[-1] and "Traceback" not in "\n".join(err), err
        assert Path(registry.trusted_model_dir(champion, trust=True), "MLmodel").is_file()  # told to trust it
    monkeypatch.setenv(registry.TRUST_ENV, "1")
    assert Path(registry.trusted_model_dir(champion), "MLmodel").is_file()
    log_version(registry.PYFUNC_CODE, registry.code_sha256(registry.PYFUNC_CODE))  # this project's: loads
    monkeypatch.delenv(registry.TRUST_ENV)
    assert Path(registry.trusted_model_dir(champion), "MLmodel").is_file()
