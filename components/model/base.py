"""Load the base text-to-image model and the CLIPs, for every preset through one code path.

`toy` and `sd15` differ only in what the config names: a diffusers pipeline directory or hub id, and
open_clip model names with a checkpoint file or pretrained tag. Nothing is downloaded: hub ids
resolve from the local cache only, and a miss is one line saying which path or id and how to
provide it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from components.config import BaseConfig, ClipConfig
from components.errors import UserError
from components.progress import quiet_library_bars
from components.runtime import CPU, Runtime


log = logging.getLogger(__name__)


def base_fingerprint(base: BaseConfig) -> str:
    """What the base weights are, not only where: a base re-bootstrapped at the same path must not reuse
    encoders pre-trained on the old one (the pipeline and the backbone CLIP; files_fingerprint)."""
    return files_fingerprint(base.pretrained, base.backbone_clip.pretrained, extra=base.revision)


def files_fingerprint(*locations: str, extra: str | None = None, whole_below: int = 256 * 2**20) -> str:
    """A hash of what the files at `locations` (files or directories; hub ids count by name) hold. Local files are
    hashed whole while they total at most `whole_below` bytes (the toy models), else by name, size and mtime
    (SD-size directories)."""
    paths = [Path(location) for location in locations]
    files = sorted(f for p in paths for f in ([p] if p.is_file() else p.rglob("*") if p.is_dir() else [])
                   if f.is_file())
    whole = sum(f.stat().st_size for f in files) <= whole_below
    h = hashlib.sha256(json.dumps([*locations, extra] if extra is not None else list(locations)).encode())
    for f in files:
        h.update(str(f).encode())
        h.update(f.read_bytes() if whole else f"{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:8]


def _is_local(base: BaseConfig) -> bool:
    """A hub id is 'org/name'; anything else (and every toy base) is a local directory."""
    name = base.pretrained
    return (base.kind == "toy" or name.startswith((".", "/", "~")) or Path(name).exists()
            or name.count("/") != 1)


def load_pipeline(base: BaseConfig, runtime: Runtime = CPU):
    """The base `StableDiffusionPipeline` (toy or SD 1.5), safety checker off, in `runtime`'s dtype on its device
    (stages pass `components.runtime.resolve(cfg.runtime)`)."""
    from diffusers import StableDiffusionPipeline  # diffusers: only when the base loads (start-up time)

    quiet_library_bars()
    name = base.pretrained
    if _is_local(base):
        path = Path(name).expanduser()
        if not (path / "model_index.json").is_file():
            hint = ("run `datencoder bootstrap` (or `dvc repro bootstrap-unet`) to train it"
                    if base.kind == "toy" else "point base.pretrained at a local diffusers directory")
            raise UserError(f"base model not found at {path} (no model_index.json); {hint}")
        source: Any = str(path)
    else:
        source = name
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, revision=base.revision, dtype=runtime.dtype, safety_checker=None,
            requires_safety_checker=False, local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        if source is name:
            raise UserError(
                f"base model weights for {name!r} are not in the local Hugging Face cache and downloads are off; "
                f"on a connected machine run `huggingface-cli download {name}` (then copy the cache), or set "
                f"base.pretrained to a local diffusers directory") from None
        raise UserError(f"cannot load base model from {source}: {str(e).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(runtime.device)


@dataclass
class Clip:
    """An open_clip model with its eval preprocessing and tokenizer."""

    model: torch.nn.Module
    preprocess: Any
    tokenizer: Any

    @torch.no_grad()
    def encode_images(self, images: list) -> torch.Tensor:
        """PIL images -> L2-normalised image embeddings (on the CPU, wherever the model runs)."""
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_clip(spec: ClipConfig, device: str | torch.device = "cpu") -> Clip:
    """Load an open_clip model: a bundled config + checkpoint file (toy) or a name + pretrained tag; float32 on
    `device` (a stage's `components.runtime.resolve(cfg.runtime).device`)."""
    import open_clip  # open_clip: only when a CLIP loads (start-up time)

    if spec.config_path is not None:
        config = Path(spec.config_path)
        if not config.is_file():
            raise UserError(f"open_clip config not found at {config}; "
                            "run `datencoder bootstrap` to train the toy CLIPs")
        open_clip.add_model_config(config)
    pretrained = spec.pretrained
    if pretrained.endswith((".safetensors", ".bin", ".pt", ".pth")) and not Path(pretrained).is_file():
        raise UserError(f"open_clip checkpoint not found at {pretrained}; run `datencoder bootstrap` (toy) or "
                        f"give the path of a downloaded checkpoint")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.model_name, pretrained=pretrained, device=device, weights_only=True)
    except (RuntimeError, OSError, ValueError, SafetensorError) as e:
        raise UserError(
            f"cannot load open_clip {spec.model_name} weights {pretrained!r} ({str(e).splitlines()[0]}); "
            "weights are never downloaded here: put them in the local Hugging Face cache or give a file path"
        ) from None
    model.eval().requires_grad_(False)
    return Clip(model, preprocess, open_clip.get_tokenizer(spec.model_name))
