"""Stable Diffusion 1.5 structure without its weights.

The SD 1.5 UNet and text-encoder configs ship with the repo (components/model/configs/sd15/), so anything
that depends only on shapes (target discovery, parameter counts, the encoder's own size) works on a
machine that has never downloaded the model: modules are built on the meta device, which allocates
no memory and runs no initialisers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs" / "sd15"


def unet_config() -> dict:
    return json.loads((CONFIG_DIR / "unet_config.json").read_text())


def text_encoder_config() -> dict:
    return json.loads((CONFIG_DIR / "text_encoder_config.json").read_text())


def meta_unet(config: dict | None = None):
    """A UNet2DConditionModel with SD 1.5's (or `config`'s) structure on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config or unet_config())


def meta_text_encoder(config: dict | None = None):
    """A CLIPTextModel with SD 1.5's (or `config`'s) structure on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig(**(config or text_encoder_config())))
