"""Data preparation: bad input is quarantined with a reason and never loses a good image; S3 reads
go through real sockets (moto's server, and a tiny HTTP server for 5xx and timeouts); DVC
reproduces, pushes and pulls the output through a local and an S3 remote."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from components.cli import main as cli_main
from components.config import PrepareConfig, S3Config, load_config
from components.data import prepare as prep
from components.data.prepare import data_version, prepare
from components.errors import UserError
from components.toy.world import write_toy_world


REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # datencoder, dvc and moto_server of this environment
SECRET = "not-a-real-secret-7f3a9c"
BOX_HEADER = ("ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,"
              "IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside\n")


# --- helpers ----------------------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def solid(colour, size=(48, 32), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def noisy(size=(96, 96), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def config(tmp_path: Path, **values) -> PrepareConfig:
    """A config with no sources (tests name theirs), writing to tmp_path/out."""
    # min_read_fraction 0.5: these tests quarantine a missing file or a failing read among a handful on purpose
    base = {"out": str(tmp_path / "out"), "imagenet": None, "openimages_boxes": None, "openimages_classes": None,
            "openimages_images": None, "captions": None, "resolution": 16, "threads": 2, "exclude_labels": [],
            "min_read_fraction": 0.5}
    return PrepareConfig(**{**base, **values})


def outputs(summary: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    out = Path(summary["out"])
    return pd.read_parquet(out / "manifest.parquet"), pd.read_parquet(out / "rejected.parquet")


def reasons(rejected: pd.DataFrame) -> dict[str, str]:
    return dict(zip(rejected["source_id"], rejected["reason"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Test credentials in the environment only; nothing from the machine's AWS config."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@contextlib.contextmanager
def moto_server(**env: str):
    """moto's standalone S3 server on 127.0.0.1 (with extra environment `env`), stopped at the end."""
    port = free_port()
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def moto_endpoint():
    with moto_server() as endpoint:
        yield endpoint


def s3_bucket(endpoint: str, name: str, objects: dict[str, bytes]) -> None:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=name)
    for key, body in objects.items():
        s3.put_object(Bucket=name, Key=key, Body=body)


# --- ImageNet folders with every kind of bad file ------------------------------------------------
def test_bad_image_files_are_rejected_with_reasons_and_good_ones_kept(tmp_path, monkeypatch):
    root = tmp_path / "imagenet"
    good, other = root / "train" / "n01", root / "train" / "n02"
    good.mkdir(parents=True)
    other.mkdir()
    (root / "LOC_synset_mapping.txt").write_text("n01 goldfish, Carassius auratus\nn02 tabby, tabby cat\n")
    displayed = Image.new("RGB", (20, 40), (255, 0, 0))  # tall: red top half, blue bottom half
    displayed.paste((0, 0, 255), (0, 20, 20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; the viewer rotates it back
    palette = solid(1, (30, 30), "P")  # index 0 (transparent) on the left, 1 (green) on the right
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette.paste(0, (0, 0, 15, 30))
    sixteen = Image.fromarray(np.linspace(0, 65535, 32 * 32).astype(np.uint16).reshape(32, 32))
    files = {
        "n01/rgb.JPEG": encode(noisy(seed=1), quality=90),
        "n01/grey.JPEG": encode(solid(90, mode="L")),
        "n01/cmyk.JPEG": encode(solid((0, 200, 200, 0), mode="CMYK")),
        "n01/rgba.png": encode(solid((0, 0, 0, 0), mode="RGBA"), "PNG"),  # fully transparent -> white
        "n01/palette.png": encode(palette, "PNG", transparency=0),
        "n01/sixteen.png": encode(sixteen, "PNG"),
        "n01/rotated.JPEG": encode(displayed.transpose(Image.Transpose.ROTATE_90), quality=95, exif=exif),
        "n01/zero.JPEG": b"",
        "n01/text.JPEG": b"this is a text file, not a JPEG\n",
        "n01/truncated.JPEG": encode(noisy(seed=2), quality=90)[:3000],
        "n01/header.JPEG": b"\x00\x00\x00\x00" + encode(noisy(seed=3))[4:],
        "n01/bomb.png": encode(solid(0, (3000, 3000), "1"), "PNG"),  # 9 Mpx in a few kB
        "n02/copy-of-rgb.JPEG": encode(noisy(seed=1), quality=90),
    }
    for name, data in files.items():
        (root / "train" / name).write_bytes(data)

    summary = prepare(config(tmp_path, imagenet=str(root), max_pixels=1_000_000))
    manifest, rejected = outputs(summary)
    assert reasons(rejected) == {
        "n01/zero.JPEG": "empty file",
        "n01/text.JPEG": "not a decodable image",
        "n01/header.JPEG": "not a decodable image",
        "n01/truncated.JPEG": "corrupt or truncated image",
        "n01/bomb.png": "too many pixels (decompression bomb)",
        "n02/copy-of-rgb.JPEG": "duplicate image",
    }
    assert "same content as imagenet:n01/rgb.JPEG" in rejected["detail"].tolist()
    assert set(manifest["source_id"]) == {f"n01/{n}" for n in (
        "rgb.JPEG", "grey.JPEG", "cmyk.JPEG", "rgba.png", "palette.png", "sixteen.png", "rotated.JPEG")}
    assert summary["accepted"] == 7 and summary["rejected"] == 6
    assert summary["rejected_by_reason"]["not a decodable image"] == 2
    assert set(manifest["label"]) == {"goldfish"} and set(manifest["split"]) <= {"train", "val"}

    out = Path(summary["out"])
    pixels = {}
    for row in manifest.itertuples():
        data = (out / row.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256
        image = Image.open(io.BytesIO(data))
        assert image.size == (16, 16) and image.mode == "RGB"
        pixels[row.source_id.split("/")[1]] = np.asarray(image).astype(int)
    rotated = manifest.set_index("source_id").loc["n01/rotated.JPEG"]
    assert (rotated.width, rotated.height) == (20, 40)  # as displayed
    top, bottom = pixels["rotated.JPEG"][0].mean(0), pixels["rotated.JPEG"][-1].mean(0)
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # upright: red above blue
    assert pixels["rgba.png"].min() > 245  # transparency over white
    assert 100 < pixels["sixteen.png"].mean() < 155  # 16-bit scaled, not clipped to white
    assert pixels["palette.png"][8, 2].min() > 245 and pixels["palette.png"][8, 13][1] > 180


def test_pil_decompression_bomb_error_and_warning_are_rejections(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # PIL warns above this, raises above 2x
    root = tmp_path / "imagenet"
    (root / "n01").mkdir(parents=True)
    (root / "n01" / "error.png").write_bytes(encode(solid(0, (1500, 1500), "1"), "PNG"))
    (root / "n01" / "warning.png").write_bytes(encode(solid(1, (1100, 1100), "1"), "PNG"))
    (root / "n01" / "fine.png").write_bytes(encode(solid(0, (900, 900), "1"), "PNG"))
    summary = prepare(config(tmp_path, imagenet=str(root), max_pixels=10**9))
    manifest, rejected = outputs(summary)
    assert reasons(rejected) == {"n01/error.png": "too many pixels (decompression bomb)",
                                 "n01/warning.png": "too many pixels (decompression bomb)"}
    assert manifest["source_id"].tolist() == ["n01/fine.png"]
    assert manifest["label"].tolist() == ["n01"]  # no synset mapping: the id is the label


# --- Open Images boxes ---------------------------------------------------------------------------
def test_open_images_boxes_largest_crop_and_bad_rows(tmp_path):
    images = tmp_path / "oi" / "train"
    images.mkdir(parents=True)
    two_halves = Image.new("RGB", (80, 40), (255, 0, 0))
    two_halves.paste((0, 0, 255), (40, 0, 80, 40))  # red left, blue right
    (images / "scene.jpg").write_bytes(encode(two_halves, quality=95))
    for i, name in enumerate(["group", "held", "badrows", "tinybox"]):
        (images / f"{name}.jpg").write_bytes(encode(noisy((40, 40), seed=10 + i)))
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd.jpg").write_bytes(encode(noisy((40, 40), seed=99)))  # must stay unreachable
    classes = tmp_path / "classes.csv"
    classes.write_text("LabelName,DisplayName\n/m/red,Red thing\n/m/blue,Blue thing\n/m/held,held shape\n")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(BOX_HEADER + "\n".join([
        "scene,x,/m/red,1,0.05,0.45,0.1,0.9,0,0,0,0,0",  # smaller box, left
        "scene,x,/m/blue,1,0.5,1.0,0.0,1.0,0,0,0,0,0",  # largest box, right: this one is cropped
        "group,x,/m/red,1,0.0,1.0,0.0,1.0,0,0,1,0,0",  # group-of: skipped by default
        "held,x,/m/red,1,0.0,1.0,0.0,1.0,0,0,0,0,0",
        "held,x,/m/held,1,0.1,0.2,0.1,0.2,0,0,0,0,0",  # a held-out object anywhere: whole image out
        "badrows,x,/m/red,1,0.6,0.4,0.1,0.9,0,0,0,0,0",  # XMin > XMax
        "badrows,x,/m/red,1,-0.1,0.5,0.1,0.9,0,0,0,0,0",  # outside [0, 1]
        "badrows,x,/m/red,1,0.2,0.2,0.1,0.9,0,0,0,0,0",  # zero area
        "badrows,x,/m/red,1,abc,0.5,0.1,0.9,0,0,0,0,0",  # not a number
        "badrows,x,/m/red,1,0.1,0.5",  # too few fields
        "badrows,x,/m/red,1,nan,0.5,0.1,0.9,0,0,0,0,0",
        "badrows,x,/m/red,1,0.1,0.9,0.1,0.9,0,0,0,0,0",  # the one good box of this image
        "tinybox,x,/m/unknown,1,0.5,0.5001,0.5,0.5001,0,0,0,0,0",  # tiny but valid
        "../etc/passwd,x,/m/red,1,0.0,1.0,0.0,1.0,0,0,0,0,0",
        "missing,x,/m/red,1,0.0,1.0,0.0,1.0,0,0,0,0,0",
        ",x,/m/red,1,0.0,1.0,0.0,1.0,0,0,0,0,0",
        'quote"d,x,/m/red,1,0.0,1.0,0.0,1.0,0,0,0,0,0',
    ]) + "\n")
    sources = {"openimages_boxes": str(boxes), "openimages_classes": str(classes), "openimages_images": str(images)}
    summary = prepare(config(tmp_path, **sources, exclude_labels=["held shape"]))
    manifest, rejected = outputs(summary)

    kept = manifest.set_index("source_id")
    assert sorted(kept.index) == ["badrows", "scene", "tinybox"]
    assert (kept.loc["scene", "label"], kept.loc["scene", "label_id"]) == ("Blue thing", "/m/blue")
    assert kept.loc["tinybox", "label"] == "/m/unknown"  # no class name: the MID
    crop = np.asarray(Image.open(Path(summary["out"]) / kept.loc["scene", "path"])).astype(int)
    assert crop[..., 2].mean() > 200 and crop[..., 0].mean() < 60  # the blue half, square
    assert summary["rejected_by_reason"] == {
        "box outside [0, 1]": 2, "box with min > max": 1, "zero-area box": 1, "malformed CSV row": 2,
        "no usable box": 1, "excluded label (held out)": 1, "image missing": 1, "unsafe or empty ImageID": 3}
    by_id = rejected.groupby("source_id")["reason"].apply(set).to_dict()
    assert by_id["group"] == {"no usable box"} and by_id["held"] == {"excluded label (held out)"}
    assert by_id["missing"] == {"image missing"} and by_id["../etc/passwd"] == {"unsafe or empty ImageID"}
    assert rejected.loc[rejected.source_id == "badrows", "file"].str.startswith(str(boxes)).all()

    # group-of boxes are configurable
    summary = prepare(config(tmp_path, **sources, skip_group_of=False))
    assert "group" in set(outputs(summary)[0]["source_id"])


def test_caption_templates_must_name_where_the_object_goes(toy_world, tmp_path):
    bad = tmp_path / "captions.csv"
    bad.write_text("source,source_id,template\nimagenet,x/y.JPEG,a red star on grass\n")
    cfg = toy_config(toy_world, tmp_path / "prepared")
    cfg.captions = str(bad)
    with pytest.raises(UserError, match=r"exactly one \{\}"):
        prepare(cfg)
    cfg.captions = str(tmp_path / "missing.csv")
    with pytest.raises(UserError, match="cannot read caption templates"):
        prepare(cfg)
    assert not (tmp_path / "prepared").exists()


def test_missing_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="nothing to prepare"):
        prepare(config(tmp_path))
    with pytest.raises(UserError, match="not found"):
        prepare(config(tmp_path, imagenet=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="both"):
        prepare(config(tmp_path, openimages_boxes=str(tmp_path / "boxes.csv")))
    (tmp_path / "boxes.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="missing columns"):
        prepare(config(tmp_path, openimages_boxes=str(tmp_path / "boxes.csv"), openimages_images=str(tmp_path)))
    assert cli_main(["prepare", "--imagenet", str(tmp_path / "nope")]) == 2


# --- the toy world through the toy preset: held-out shapes, determinism, atomic output ----------
@pytest.fixture(scope="module")
def toy_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "raw" / "toy-world"
    write_toy_world(root, n=48, seed=3)
    return root


def toy_config(toy_world: Path, out: Path) -> PrepareConfig:
    """The toy preset's prepare section, pointed at this test's toy world."""
    section = load_config(preset="toy").prepare.model_dump()
    for key in ("imagenet", "openimages_boxes", "openimages_classes", "openimages_images", "captions"):
        section[key] = section[key].replace("data/raw/toy-world", str(toy_world))
    return PrepareConfig(**{**section, "out": str(out), "threads": 2})


def test_toy_preset_holds_out_shapes_is_deterministic_and_atomic(toy_world, tmp_path, monkeypatch):
    cfg = toy_config(toy_world, tmp_path / "prepared")
    assert cfg.exclude_labels == load_config(preset="toy").toy_world.encoder_holdout_shapes == ["crescent", "arrow"]
    first = prepare(cfg)
    manifest, rejected = outputs(first)
    assert first["accepted"] > 20 and set(manifest["source"]) == {"imagenet", "openimages"}
    assert not set(manifest["label"]) & {"crescent", "arrow"}
    # each single-object image carries its caption template (S* goes where the object is); crops carry none
    captions = pd.read_csv(toy_world / "captions.csv", keep_default_na=False)
    expected = dict(zip(zip(captions.source, captions.source_id), captions.template))
    assert [expected[(r.source, r.source_id)] for r in manifest.itertuples()] == manifest["template"].tolist()
    assert (manifest[manifest.source == "imagenet"]["template"].str.count(r"\{\}") == 1).all()
    assert (manifest[manifest.source == "openimages"]["template"] == "").all()
    held = rejected[rejected.reason == "excluded label (held out)"]
    assert len(held) and set(held["detail"].str.split(", ").explode()) <= {"crescent", "arrow"}
    assert first["accepted"] + first["rejected"] == 48 + len(set(
        pd.read_csv(toy_world / "openimages" / "oidv6-train-annotations-bbox.csv")["ImageID"]))
    manifest_bytes = (tmp_path / "prepared" / "manifest.parquet").read_bytes()
    assert first["data_version"] == hashlib.md5(manifest_bytes).hexdigest() == data_version(tmp_path / "prepared")

    cfg.threads = 5  # another thread count and timing, the same bytes
    assert prepare(cfg) == first
    assert (tmp_path / "prepared" / "manifest.parquet").read_bytes() == manifest_bytes

    def crash(*args):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(prep, "prepare_image", crash)
    with pytest.raises(RuntimeError):
        prepare(cfg)
    assert data_version(tmp_path / "prepared") == first["data_version"]  # the old output, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "prepared.partial"]


# --- S3: moto's server (404, success, CLI + AWS_ENDPOINT_URL) and a failing endpoint -------------
def test_s3_images_from_moto_server_via_cli(moto_endpoint, aws_env, tmp_path, monkeypatch, capsys):
    objects = {f"train/img{i}.jpg": encode(noisy((40, 30), seed=20 + i)) for i in range(9)}
    s3_bucket(moto_endpoint, "open-images", objects)
    boxes = tmp_path / "boxes.csv"  # 9 of 10 found: at prepare.min_read_fraction (0.9), a missing one is quarantined
    boxes.write_text(BOX_HEADER + "".join(f"img{i},x,/m/a,1,0.1,0.9,0.1,0.9,0,0,0,0,0\n" for i in range(10)))
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)  # how a user points everything at a store
    code = cli_main(["prepare", "--openimages-boxes", str(boxes), "--openimages-images", "s3://open-images/train",
                     "--out", str(tmp_path / "out"), "--resolution", "24", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["accepted"], summary["rejected_by_reason"]) == (9, {"image missing": 1})
    manifest, rejected = outputs(summary)
    assert rejected["file"].tolist() == ["s3://open-images/train/img9.jpg"]
    assert set(manifest["width"]) == {40}
    for file in (tmp_path / "out").glob("*.*"):  # no secret is ever stored
        assert SECRET.encode() not in file.read_bytes()


class FailingS3(BaseHTTPRequestHandler):
    """Answers GetObject like S3, except: err* -> 500 always, flaky* -> 503 once, slow* -> too slow."""

    hits: collections.Counter = collections.Counter()

    def do_GET(self):
        FailingS3.hits[self.path] += 1
        name = self.path.rsplit("/", 1)[-1]
        if name.startswith("err") or (name.startswith("flaky") and FailingS3.hits[self.path] == 1):
            self.reply(500 if name.startswith("err") else 503, b"<Error><Code>InternalError</Code></Error>")
        else:
            if name.startswith("slow"):
                time.sleep(1.0)
            self.reply(200, encode(noisy((32, 32), seed=len(name))))  # a different image per name

    def reply(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client timed out and went away
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def failing_endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FailingS3)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FailingS3.hits.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_s3_5xx_and_timeouts_are_retried_then_rejected(failing_endpoint, aws_env, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "RETRY_BACKOFF_S", 0.01)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(BOX_HEADER + "".join(f"{name},x,/m/a,1,0.1,0.9,0.1,0.9,0,0,0,0,0\n"
                                          for name in ("ok", "err", "flaky", "slow")))
    cfg = config(tmp_path, openimages_boxes=str(boxes), openimages_images="s3://bucket/train/{ImageID}.jpg",
                 retries=2, s3=S3Config(endpoint_url=failing_endpoint, unsigned=True, timeout_s=0.3))
    started = time.monotonic()
    summary = prepare(cfg)
    manifest, rejected = outputs(summary)
    assert time.monotonic() - started < 10
    assert sorted(manifest["source_id"]) == ["flaky", "ok"]  # flaky once, then served: retried
    assert reasons(rejected) == {"err": "S3 read failed after retries", "slow": "S3 read failed after retries"}
    detail = dict(zip(rejected["source_id"], rejected["detail"]))
    assert "HTTP 500" in detail["err"] and "Timeout" in detail["slow"] and "3 attempts" in detail["slow"]
    assert FailingS3.hits["/bucket/train/err.jpg"] == 3  # 1 + retries: botocore does not retry on top
    assert FailingS3.hits["/bucket/train/slow.jpg"] == 3 and FailingS3.hits["/bucket/train/flaky.jpg"] == 2


# --- a store that cannot be read fails the run and keeps the previous output ------------------------
def previous_output(tmp_path: Path) -> tuple[PrepareConfig, bytes]:
    """A good prepared set in tmp_path/out (one local class folder); returns its config and manifest bytes."""
    folder = tmp_path / "imagenet" / "n01"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.JPEG").write_bytes(encode(noisy(seed=40 + i)))
    cfg = config(tmp_path, imagenet=str(tmp_path / "imagenet"))
    prepare(cfg)
    return cfg, (tmp_path / "out" / "manifest.parquet").read_bytes()


def assert_kept(tmp_path: Path, manifest: bytes) -> None:
    assert (tmp_path / "out" / "manifest.parquet").read_bytes() == manifest
    assert not (tmp_path / "out.partial").exists()


def test_store_down_or_too_few_reads_fail_and_keep_the_previous_output(aws_env, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "RETRY_BACKOFF_S", 0.01)
    _, manifest = previous_output(tmp_path)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(BOX_HEADER + "".join(f"img{i},x,/m/a,1,0.1,0.9,0.1,0.9,0,0,0,0,0\n" for i in range(3)))
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: every read is refused
    with pytest.raises(UserError) as error:
        prepare(config(tmp_path, openimages_boxes=str(boxes), openimages_images="s3://bucket/train", retries=1,
                       s3=S3Config(endpoint_url=down, unsigned=True, timeout_s=0.5)))
    assert "no openimages input could be read" in str(error.value)
    assert "previous prepared data was kept" in str(error.value)
    assert_kept(tmp_path, manifest)

    # some reads fail: under min_read_fraction the run fails, at or over it the failures are quarantined
    images = tmp_path / "images"
    images.mkdir()
    for i in range(10):
        (images / f"img{i}.jpg").write_bytes(encode(noisy(seed=40 + i)))
    boxes.write_text(BOX_HEADER + "".join(f"img{i},x,/m/a,1,0.1,0.9,0.1,0.9,0,0,0,0,0\n" for i in range(12)))
    sources = {"openimages_boxes": str(boxes), "openimages_images": str(images)}
    with pytest.raises(UserError, match=r"only 10 of 12 inputs could be read \(prepare.min_read_fraction 0.9\)"):
        prepare(config(tmp_path, **sources, min_read_fraction=0.9))
    assert_kept(tmp_path, manifest)
    summary = prepare(config(tmp_path, **sources, min_read_fraction=0.8))
    assert (summary["accepted"], summary["rejected_by_reason"]) == (10, {"image missing": 2})


@pytest.fixture
def moto_denying(aws_env):
    """A moto S3 server that checks credentials after its first 3 actions (bucket + 2 objects): our
    test keys are unknown to it, so every later read is refused with 403 (InvalidAccessKeyId)."""
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="3") as endpoint:
        s3_bucket(endpoint, "open-images", {f"train/img{i}.jpg": encode(noisy(seed=60 + i)) for i in range(2)})
        yield endpoint


def test_s3_403_is_reported_as_a_credentials_problem_and_keeps_the_output(moto_denying, tmp_path, capsys):
    _, manifest = previous_output(tmp_path)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(BOX_HEADER + "".join(f"img{i},x,/m/a,1,0.1,0.9,0.1,0.9,0,0,0,0,0\n" for i in range(2)))
    code = cli_main(["prepare", "--openimages-boxes", str(boxes), "--openimages-images", "s3://open-images/train",
                     "--s3-endpoint-url", moto_denying, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "S3 access denied: 2" in err[0] and "HTTP 403" in err[0] and "credentials" in err[0]
    assert SECRET not in err[0]
    assert_kept(tmp_path, manifest)


# --- DVC: repro, push and pull through the default local remote and an S3 remote ------------------
def dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_dvc_repro_push_pull_local_and_s3(toy_world, moto_endpoint, aws_env, tmp_path):
    repo = tmp_path / "repo"
    (repo / "components").mkdir(parents=True)
    dvc(repo, "init", "--no-scm", "-q")
    # the project's own stage, parameters and remotes, around a small toy world
    project_config = (REPO / ".dvc" / "config").read_text()
    (repo / ".dvc" / "config").write_text(project_config.replace("[core]\n", "[core]\n    no_scm = true\n", 1))
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["prepare"]
    for code in (d for d in stage["deps"] if d.startswith("components/")):
        (repo / code).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / code, repo / code)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": stage}}))
    shutil.copytree(toy_world, repo / "data" / "raw" / "toy-world")

    dvc(repo, "repro", "prepare")
    prepared = repo / "data" / "prepared"
    version = data_version(prepared)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare"]["outs"][0]
    listing = repo / ".dvc" / "cache" / "files" / "md5" / lock["md5"][:2] / lock["md5"][2:]
    entries = {e["relpath"]: e["md5"] for e in json.loads(listing.read_text())}
    assert entries["manifest.parquet"] == version  # the data version is DVC's own hash

    def pull_again(*remote: str) -> None:
        shutil.rmtree(prepared)
        shutil.rmtree(repo / ".dvc" / "cache")
        dvc(repo, "pull", *remote)
        assert data_version(prepared) == version
        manifest = pd.read_parquet(prepared / "manifest.parquet")
        assert all((prepared / p).is_file() for p in manifest["path"])

    dvc(repo, "push")  # the default remote: a folder inside the repository
    assert (repo / ".dvc-remote" / "files" / "md5").is_dir()
    pull_again()

    s3_bucket(moto_endpoint, "dvc-store", {})
    dvc(repo, "remote", "modify", "s3", "url", "s3://dvc-store/cache")
    dvc(repo, "remote", "modify", "s3", "endpointurl", moto_endpoint)
    dvc(repo, "push", "-r", "s3")
    stored = boto3.client("s3", endpoint_url=moto_endpoint).list_objects_v2(Bucket="dvc-store")
    assert stored["KeyCount"] > 10
    pull_again("-r", "s3")
    assert SECRET not in (repo / ".dvc" / "config").read_text()  # credentials came from the environment
