"""The model guards itself: the registered pyfunc refuses a request over its budget before any work, refuses
what is beyond its compute slots and queue at once, and stops a request's work at its deadline, loaded in this
process and under a real `mlflow models serve` process (the stock scoring server, no datencoder server in
front): the oversized request is a 4xx in under 2 s. The rules themselves (components/serving/limits.py):
budget arithmetic, slots, nested deadlines, the limits from the environment."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from smoke_models import free_port, isolated_store, smoke_setup, solid_png, stop_server, wait_for_ping

from components.config import ServeConfig
from components.errors import UserError
from components.serving import limits


RED = solid_png((128, 128, 128), shape_rgb=(220, 40, 40))
FAST = {"tuning_steps": 1, "num_inference_steps": 2}
TINY = {"tuning_steps": 0, "num_inference_steps": 1}  # answered well within MLflow's timeout on a loaded machine
HEAVY = {"tuning_steps": 100, "num_images": 4, "num_inference_steps": 225}  # minutes of work on any CPU
SMALL = {"max_images": 4, "max_steps": 1000, "max_input_images": 2, "max_image_mb": 0.5, "max_concurrent": 1,
         "max_queue": 0}
# the stock server's: room for a request of 16 x 1000 sampling steps, minutes of work on any CPU
SERVER_LIMITS = {**SMALL, "max_images": 16, "max_steps": 20000}
SERVER_HEAVY = {"tuning_steps": 100, "num_images": 16, "num_inference_steps": 1000}


# --- the rules ---------------------------------------------------------------------------------------
def test_budget_counts_inputs_concepts_images_and_steps_and_names_the_limit():
    lim = ServeConfig(max_images=4, max_steps=100, max_input_images=2, max_image_mb=1)
    a, b = limits.row(b"a", "S*"), limits.row(b"b", "S* on grass")
    cost = limits.check_budget(lim, [a, a, b], num_images=1, tuning_steps=10, num_inference_steps=20)
    assert cost == limits.Cost(inputs=2, concepts=2, images=3, steps=2 * 10 + 3 * 20)
    # two photos of one labelled concept are tuned once; a row without a prompt generates nothing
    photos = [limits.row(b"a", "S*", "dog"), limits.row(b"b", "", "dog")]
    assert limits.check_budget(lim, photos, 2, 10, 20) == limits.Cost(2, 1, 2, 10 + 2 * 20)
    cases = [([a, a, b], {"num_images": 2}, "6 images (rows with a prompt x num_images); the limit is 4"),
             ([a], {"tuning_steps": 50, "num_inference_steps": 51}, "101 tuning + sampling steps; the limit is 100"),
             ([a, b, limits.row(b"c", "S*")], {}, "3 distinct input images; the limit is 2"),
             ([limits.row(b"x", "S*", size=3 * 2**20)], {}, "3,145,728 bytes; the limit is 1 MiB"),
             ([], {}, "no rows")]
    for rows, params, words in cases:
        with pytest.raises(limits.OverBudget, match=re.escape(words)):
            limits.check_budget(lim, rows, **{"num_images": 1, "tuning_steps": 0, "num_inference_steps": 1, **params})


def test_slots_refuse_beyond_the_queue_and_at_the_deadline():
    slots = limits.Slots(concurrent=1, queue=1)
    entered, release = threading.Event(), threading.Event()

    def holder():
        with slots.hold():
            entered.set()
            release.wait(10)

    first = threading.Thread(target=holder)
    first.start()
    assert entered.wait(10)
    waited: list = []
    second = threading.Thread(target=lambda: waited.append(_hold(slots, time.monotonic() + 10)))
    second.start()
    while slots.waiting == 0:
        time.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(limits.Busy, match="1 request.s. computing and 1 waiting"):
        _hold(slots, None)  # the queue is full: refused at once
    assert time.monotonic() - started < 5  # not after the 10 s the waiter may wait
    release.set()
    first.join()
    second.join()
    assert waited == ["held"] and (slots.active, slots.waiting) == (0, 0)
    with slots.hold():  # a waiter whose deadline passes is refused
        started = time.monotonic()
        with pytest.raises(limits.Busy, match="deadline"):
            _hold(slots, time.monotonic() + 0.3)
        assert 0.25 < time.monotonic() - started < 5  # at its deadline, not after the holder's 10 s
    assert (slots.active, slots.waiting) == (0, 0)


def _hold(slots: limits.Slots, until: float | None) -> str:
    with slots.hold(until):
        return "held"


def test_deadlines_nest_and_the_earlier_one_counts():
    assert limits.current_deadline() is None
    with limits.deadline(100.0):
        with limits.deadline(200.0) as inner:
            assert inner == 100.0
        with limits.deadline(50.0) as inner:
            assert inner == 50.0
        with limits.deadline(None) as inner:
            assert inner == 100.0
        assert limits.current_deadline() == 100.0
    assert limits.current_deadline() is None
    with limits.deadline(time.monotonic() - 1):
        with pytest.raises(limits.RequestCancelled):
            limits.stop_when_late(None, ())
    limits.stop_when_late(None, ())  # no deadline: nothing stops


def test_limits_come_from_the_registered_config_then_the_serving_environment(monkeypatch):
    registered = ServeConfig(max_images=32, request_timeout_s=900)
    monkeypatch.delenv(limits.LIMITS_ENV, raising=False)
    monkeypatch.delenv(limits.MLFLOW_TIMEOUT_ENV, raising=False)
    assert limits.serving_limits(registered) == registered and limits.timeout_s(registered) == 900
    monkeypatch.setenv(limits.LIMITS_ENV, '{"max_images": 8}')
    assert limits.serving_limits(registered).max_images == 8
    assert limits.serving_limits(registered).request_timeout_s == 900
    monkeypatch.setenv(limits.MLFLOW_TIMEOUT_ENV, "60")  # what `mlflow models serve` gives its server
    assert limits.timeout_s(registered) == 60
    for bad, words in (('{"max_images": 0}', "max_images"), ("[1]", "JSON object"), ("{", "JSON object"),
                       ('{"max_imagez": 3}', "max_imagez")):
        monkeypatch.setenv(limits.LIMITS_ENV, bad)
        with pytest.raises(UserError, match=words):
            limits.serving_limits(registered)


# --- the pyfunc in this process -------------------------------------------------------------------
@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """(tracking store, local model directory) of the smoke encoder registered as the champion."""
    from components.serving import registry

    tmp = tmp_path_factory.mktemp("limits")
    _, cfg, encoder = smoke_setup(tmp)
    store = isolated_store(tmp)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = store
    try:
        registry.register(cfg, str(encoder))
        uri = f"models:/{registry.model_name(cfg.registry, cfg.preset)}@champion"
        local = registry.trusted_model_dir(uri)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.__setitem__("MLFLOW_TRACKING_URI", old)
    return store, local, uri


def frame(rows: list[tuple[bytes, str]]) -> pd.DataFrame:
    return pd.DataFrame({"image": [r[0] for r in rows], "prompt": [r[1] for r in rows]})


def test_the_pyfunc_refuses_over_budget_busy_and_late_requests_itself(registered, monkeypatch):
    import mlflow

    monkeypatch.setenv(limits.LIMITS_ENV, json.dumps(SMALL))
    monkeypatch.setenv(limits.MLFLOW_TIMEOUT_ENV, "2")  # as `mlflow models serve --timeout 2` gives its server
    model = mlflow.pyfunc.load_model(registered[1])
    personalizer = model.unwrap_python_model().personalizer
    work = lambda: personalizer.cache.hits + personalizer.cache.misses  # noqa: E731

    cases = [([(RED, "S*")] * 3, {**FAST, "num_images": 2}, "6 images"),
             ([(RED, "S*")], {"tuning_steps": 100, "num_inference_steps": 901}, "1001 tuning + sampling steps"),
             ([(solid_png((i, 0, 0)), "S*") for i in range(3)], FAST, "3 distinct input images"),
             ([(b"\x89PNG" + b"0" * 2**19 + b"0", "S*")], FAST, "max_image_mb")]
    for rows, params, words in cases:
        with pytest.raises(MlflowException, match=re.escape(words)) as refused:
            model.predict(frame(rows), params=params)
        assert refused.value.get_http_status_code() == 400
    assert work() == 0  # nothing was decoded, encoded or tuned

    errors: list = []
    heavy = threading.Thread(target=lambda: errors.append(_predict_error(model, [(RED, "S*")], HEAVY)))
    heavy.start()
    while model.unwrap_python_model().slots.active == 0:
        time.sleep(0.05)
    busy = _predict_error(model, [(RED, "S* on grass")], FAST)
    assert busy.get_http_status_code() == 503 and "computing" in busy.message
    heavy.join()
    late = errors[0]
    # 504 comes only from the UNet's pre-hook: the work stopped part-way at a UNet call, it did not finish
    assert late.get_http_status_code() == 504 and "deadline" in late.message
    monkeypatch.setenv(limits.MLFLOW_TIMEOUT_ENV, "900")  # read per request: the next one has time on a busy CPU
    assert len(model.predict(frame([(RED, "S* on grass")]), params=TINY)) == 1  # the slot is free again


def _predict_error(model, rows, params) -> MlflowException | None:
    try:
        model.predict(frame(rows), params=params)
    except MlflowException as e:
        return e
    return None


# --- the stock scoring server -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_server(registered, tmp_path_factory):
    """`mlflow models serve` (MLflow's own scoring server, --env-manager local) of the champion, with SERVER_LIMITS
    given through the environment and MLflow's timeout at 10 s."""
    store, _, uri = registered
    port = free_port()
    log_path = tmp_path_factory.mktemp("mlflow-serve") / "server.log"
    log = open(log_path, "w")
    venv = os.path.dirname(sys.executable)  # mlflow runs `uvicorn` from PATH, as in an activated environment
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, limits.LIMITS_ENV: json.dumps(SERVER_LIMITS),
           "PATH": venv + os.pathsep + os.environ.get("PATH", "")}
    process = subprocess.Popen([os.path.join(venv, "mlflow"), "models", "serve", "-m",
                                uri, "--env-manager", "local", "--host", "127.0.0.1",
                                "--port", str(port), "--timeout", "10"], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        wait_for_ping(process, port, log_path, "mlflow models serve")
        yield port
    finally:
        stop_server(process)
        log.close()


def post(port: int, rows: list[tuple[bytes, str]], params: dict) -> tuple[int, dict | str]:
    """POST /invocations as MLflow's dataframe_split -> (status, JSON reply, or the text where it is not JSON)."""
    data = json.dumps({"dataframe_split": {"columns": ["image", "prompt"], "data": [
        [base64.b64encode(image).decode(), prompt] for image, prompt in rows]}, "params": params}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as r:
            status, text = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text.decode(errors="replace")


def test_under_mlflow_models_serve_the_model_refuses_an_oversized_request_before_any_work(mlflow_server):
    """Refused by the budget check that runs before predict's first model call (how fast: the benchmark
    benchmarks/scoring_server_replies.py measures it; a timed test on a shared machine would be noise)."""
    oversized = [(solid_png((9, 9, 9)), f"S* number {i}") for i in range(64)]  # 64 prompts x 16 images
    status, reply = post(mlflow_server, oversized, {"num_images": 16, "tuning_steps": 12})
    assert status == 400, (status, reply)
    assert reply["error_code"] == "INVALID_PARAMETER_VALUE" and "serve.max_images" in reply["message"]
    assert "Traceback" not in json.dumps(reply)
    status, reply = post(mlflow_server, [(RED, "S* on grass")], TINY)
    assert status == 200 and len(reply["predictions"]) == 1  # and it keeps serving


def test_under_mlflow_models_serve_a_busy_model_answers_503_and_stops_late_work(mlflow_server):
    replies: dict = {}
    heavy = threading.Thread(target=lambda: replies.update(heavy=post(mlflow_server, [(RED, "S*")], SERVER_HEAVY)))
    started = time.monotonic()
    heavy.start()
    time.sleep(3.0)  # the heavy request is in predict (MLflow has parsed it) and computes for minutes
    status, reply = post(mlflow_server, [(RED, "S* on grass")], FAST)
    assert status == 503 and reply["error_code"] == "TEMPORARILY_UNAVAILABLE", (status, reply)
    heavy.join()
    assert replies["heavy"][0] == 504  # MLflow's own answer at --timeout 10
    answered = time.monotonic()
    # the model stopped its work at MLflow's timeout too: its one slot is free within seconds, not the minutes
    # the heavy request asks for
    while (status := post(mlflow_server, [(RED, "S* on grass")], TINY)[0]) == 503:
        assert time.monotonic() - answered < 30, "the model kept computing after MLflow gave up"
        time.sleep(0.3)
    assert status == 200 and answered - started < 40
