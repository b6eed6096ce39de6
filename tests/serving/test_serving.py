"""Serving (issue 6): a real `datencoder serve` process (mlflow models serve --env-manager local) on
127.0.0.1, real HTTP requests: good requests, bad ones (400 + JSON message, server keeps serving, no
temp files left), and concurrent requests that must not leak concepts into each other."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from smoke_models import isolated_store, smoke_setup, solid_png

from components.config import load_config

TOY_ENCODER = Path("models/toy-encoder")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`datencoder serve` for the champion of a fresh tracking store, in its own process group."""

    def __init__(self, tmp: Path, cfg, encoder: Path, config_file: Path | None = None):
        from components.serving import registry

        self.store = isolated_store(tmp)
        self.tmpdir = tmp / "server-tmp"
        self.tmpdir.mkdir()
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.store, "TMPDIR": str(self.tmpdir)}
        old = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = self.store
        try:
            registry.register(cfg, str(encoder))
        finally:
            os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.__setitem__("MLFLOW_TRACKING_URI", old)
        self.port = free_port()
        config = ["--config", str(config_file)] if config_file else []
        self.log = open(tmp / "server.log", "w")
        self.process = subprocess.Popen([sys.executable, "-m", "components.cli", "serve", *config, "--port",
                                         str(self.port)], env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {(tmp / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise RuntimeError("server did not start in 600 s")

    def post(self, rows: list[tuple[bytes, str]] | dict, params: dict | None = None) -> tuple[int, dict]:
        body = rows if isinstance(rows, dict) else {
            "dataframe_split": {"columns": ["image", "prompt"],
                                "data": [[base64.b64encode(img).decode(), prompt] for img, prompt in rows]}}
        if params is not None:
            body["params"] = params
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)  # the CLI, mlflow and uvicorn: our own process group
        self.process.wait(timeout=60)
        self.log.close()


def decode(prediction: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["image"]))).convert("RGB"))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    return (tmp, *smoke_setup(tmp))


@pytest.fixture(scope="module")
def server(smoke):
    tmp, config_file, cfg, encoder = smoke
    s = Server(tmp, cfg, encoder, config_file)
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
    def listing() -> set[str]:
        return {str(p.relative_to(server.tmpdir)) for p in server.tmpdir.rglob("*")}

    before = listing()
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
        ([good], {"tuning_stepz": 3}, "unknown parameter(s) tuning_stepz"),
    ]
    for rows, params, reason in cases:
        status, body = server.post(rows, params)
        assert status == 400 and reason in body["message"], (reason, status, body)
        assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    status, out = server.post([good], FAST)
    assert status == 200 and decode(out["predictions"][0]).shape == (64, 64, 3)
    assert listing() == before  # no temp files left behind


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
    alone = Personalizer(cfg, encoder)
    settings = alone.settings(**params)
    for image, (_, out) in zip(images, replies):
        expected = alone.run(image, ["a photo of S*"], settings).images[0].pixels
        got = decode(out["predictions"][0])
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    outputs = [decode(out["predictions"][0]) for _, out in replies]
    assert all(np.abs(a.astype(int) - b.astype(int)).mean() > 1.0 for i, a in enumerate(outputs) for b in outputs[i + 1:])


@pytest.mark.skipif(not (TOY_ENCODER / "config.json").is_file(),
                    reason="needs the trained toy encoder models/toy-encoder (issue 5's `datencoder pretrain`); "
                           "an untrained encoder does not carry colour")
def test_concurrent_requests_each_show_their_own_colour(tmp_path):
    from components.evaluation.check_base import read_colours
    from components.toy import world as tw

    cfg = load_config("toy")
    server = Server(tmp_path, cfg, TOY_ENCODER)
    try:
        colours = ["red", "blue", "green", "yellow"]
        images = [png(tw.render(tw.canonical(tw.Concept("circle", c)), 64, seed=i)) for i, c in enumerate(colours)]
        # the inputs' own caption, in the toy world's language: its base never learned "a photo of" (told "a photo
        # of a red circle" in words it mostly draws no object). Blend 1 (plain LoRA + embedding): the default
        # blend's hard path spells S* as its nearest real word, which is not the concept's colour
        prompt = "S* on a gray background"
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda img: server.post([(img, prompt)], {"seed": 0, "alpha_blend": 1.0}), images))
    finally:
        server.stop()
    assert all(status == 200 for status, _ in replies), replies
    seen = [read_colours(decode(out["predictions"][0]))[1] for _, out in replies]
    assert seen == colours
