"""Random-weight smoke models saved in the real formats, for the personalisation and serving tests.

A diffusers pipeline directory (toy tokenizer, smoke-sized text encoder, UNet, VAE, DDIM scheduler)
and an open_clip backbone config + safetensors checkpoint, built in a second or two instead of
training them (the smoke bootstrap trains, which takes minutes on a busy 2-core machine). The
untrained encoder for them is saved with `TuningEncoder.save_pretrained`, as pre-training would.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from components.config import Config, load_config


SMOKE_CLIP = "datencoder-smoke-backbone"


def write_smoke_models(out: Path, seed: int = 0) -> dict:
    """Write out/toy-base and out/toy-clip/backbone; return config overrides that point at them."""
    import open_clip
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    from components.toy.bootstrap import (
        clip_model_config,
        make_text_encoder,
        make_unet,
        make_vae,
        scheduler_config,
    )
    from components.toy.tokenizer import save_toy_tokenizer

    torch.manual_seed(seed)
    b = load_config("smoke").bootstrap
    tokenizer = save_toy_tokenizer(out / "tokenizer")
    text_encoder = make_text_encoder(len(tokenizer), b, tokenizer.bos_token_id, tokenizer.eos_token_id,
                                     tokenizer.model_max_length)
    pipe = StableDiffusionPipeline(vae=make_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=make_unet(b),
                                   scheduler=DDIMScheduler(**scheduler_config(b)), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out / "toy-base", safe_serialization=True)

    clip_dir = out / "toy-clip" / "backbone"
    clip_dir.mkdir(parents=True)
    config_path = clip_dir / f"{SMOKE_CLIP}.json"
    config_path.write_text(json.dumps(clip_model_config(width=32, layers=1)))
    open_clip.add_model_config(config_path)
    clip = open_clip.create_model(SMOKE_CLIP)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_dir / "open_clip_model.safetensors"))
    return {"base": {"pretrained": str(out / "toy-base"),
                     "backbone_clip": {"model_name": SMOKE_CLIP,
                                       "pretrained": str(clip_dir / "open_clip_model.safetensors"),
                                       "config_path": str(config_path)}}}


def write_smoke_encoder(cfg: Config, out: Path, seed: int = 1) -> Path:
    from components.model.encoder import FrozenBase, TuningEncoder

    torch.manual_seed(seed)
    TuningEncoder.for_base(cfg.encoder, FrozenBase.load(cfg.base, cfg.runtime)).save_pretrained(out)
    return out


def smoke_setup(tmp: Path) -> tuple[Path, Config, Path]:
    """(config file, config, encoder dir): random-weight smoke models and encoder under `tmp`."""
    import yaml

    config_file = tmp / "config.yaml"
    config_file.write_text(yaml.safe_dump({"preset": "smoke", **write_smoke_models(tmp)}))
    cfg = load_config(path=config_file)
    return config_file, cfg, write_smoke_encoder(cfg, tmp / "encoder")


def solid_png(rgb: tuple[int, int, int], side: int = 64, shape_rgb: tuple[int, int, int] | None = None) -> bytes:
    """A PNG of one colour, optionally with a centred square of another (a stand-in concept image)."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side), rgb)
    if shape_rgb is not None:
        ImageDraw.Draw(image).rectangle([side // 4, side // 4, 3 * side // 4, 3 * side // 4], fill=shape_rgb)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def isolated_store(tmp: Path) -> str:
    """A fresh sqlite tracking store whose register experiment keeps its artifacts under `tmp`
    (MLflow's default artifact root, ./mlruns, would be the repository)."""
    from mlflow import MlflowClient

    from components.serving.registry import EXPERIMENT

    uri = f"sqlite:///{tmp}/mlflow.db"
    MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=(tmp / "artifacts").as_uri())
    return uri


def free_port() -> int:
    """A free TCP port on loopback, for a server a test starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_evaluation_setup(tmp: Path) -> Path:
    """smoke_setup plus a prepared smoke toy world, with evaluate's and ablate's outputs and encoder cache
    under `tmp`; returns the config file."""
    import yaml

    from components.data.prepare import prepare
    from components.toy import world as tw

    config_file, cfg, encoder = smoke_setup(tmp)
    raw = tmp / "raw"
    tw.write_toy_world(raw, n=cfg.toy_world.n, seed=0, scene_fraction=cfg.toy_world.scene_fraction)
    prepare(cfg.prepare.model_copy(update={
        "out": str(tmp / "prepared"), "imagenet": str(raw / "imagenet"), "threads": 2,
        "openimages_boxes": str(raw / "openimages/oidv6-train-annotations-bbox.csv"),
        "openimages_classes": str(raw / "openimages/oidv7-class-descriptions.csv"),
        "openimages_images": str(raw / "openimages/train"), "captions": str(raw / "captions.csv")}))
    values = yaml.safe_load(config_file.read_text())
    values.setdefault("prepare", {})["out"] = str(tmp / "prepared")  # pretrain and the eval set read it
    values.update({"toy_world": {"out": str(raw)}, "pretrain": {"workers": 1},
                   "personalize": {"encoder": str(encoder)},
                   "evaluate": {"cache": str(tmp / "cache"), "out": str(tmp / "evaluate"),
                                "baseline_results": str(tmp / "baselines"), "variant_results": str(tmp / "variants")},
                   "ablate": {"out": str(tmp / "ablate")}})
    config_file.write_text(yaml.safe_dump(values))
    return config_file


def seed_encoder_cache(cfg: Config) -> list[Path]:
    """The re-trained variants' cache entries, as a previous run leaves them (random smoke weights)."""
    from components.training.variants import (
        EVALUATE_RETRAINED,
        encoder_variant,
        retrain_steps,
        retrained_variants,
    )

    dirs = []
    for overrides in [*EVALUATE_RETRAINED.values(), *retrained_variants(cfg.ablate).values()]:
        variant, encoder_dir = encoder_variant(cfg, overrides, retrain_steps(cfg.evaluate))
        if not encoder_dir.exists():
            write_smoke_encoder(variant, encoder_dir)
        dirs.append(encoder_dir)
    return dirs


def wait_for_ping(process, port: int, log_path: Path, what: str, timeout_s: float = 600) -> None:
    """Wait until the server `process` started answers GET /ping on 127.0.0.1:`port` with 200; its log's end
    in the error if it exits first."""
    import time
    import urllib.request

    deadline = time.time() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited: {log_path.read_text()[-3000:]}")
        if time.time() > deadline:
            raise RuntimeError(f"{what} did not start in {timeout_s:g} s")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)


def interruptible() -> None:
    """Popen's preexec_fn for a process a test stops with SIGINT: a suite started from a background shell
    inherits SIGINT ignored (POSIX, for background jobs), and so would the process; it must see Ctrl-C as a
    user's terminal delivers it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_server(process, sig: int | None = None, timeout_s: float = 90) -> None:
    """Stop a server started with start_new_session: `sig` (default SIGTERM) to the server itself, so that it
    shuts down what it started (a Ray cluster), then SIGKILL to whatever is left of its process group."""
    import signal

    from components.orchestration.processes import stop_session

    stop_session(process, timeout_s, first=signal.SIGTERM if sig is None else sig)
