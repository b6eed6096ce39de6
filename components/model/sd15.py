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
    from diffusers import UNet2DConditionModel  # diffusers: only when a model is built (start-up time)

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config or unet_config())


def meta_text_encoder(config: dict | None = None):
    """A CLIPTextModel with SD 1.5's (or `config`'s) structure on the meta device."""
    # transformers' modelling code: only when a model is built (start-up time)
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig(**(config or text_encoder_config())))


# diffusers AutoencoderKL as in SD 1.5's vae/config.json
VAE_CONFIG = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512, "layers_per_block": 2,
              "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
              "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 32, "scaling_factor": 0.18215}
# SD 1.5's noise schedule (scheduler/scheduler_config.json)
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
                    "steps_offset": 1}


def random_pipeline(tokenizer, unet: dict | None = None, text_encoder: dict | None = None, vae: dict | None = None,
                    device: str | torch.device = "cpu"):
    """A StableDiffusionPipeline with SD 1.5's structure (or the given configs') and random weights, built on
    `device`: for measuring time and memory, which do not depend on the weights. `tokenizer`: SD's cannot be
    downloaded here; the toy BPE tokenizer's ids fit SD's 49,408-row table."""
    # diffusers, transformers: only when a pipeline is built (start-up time)
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        parts = {"unet": UNet2DConditionModel.from_config(unet or unet_config()),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**(text_encoder or text_encoder_config()))),
                 "vae": AutoencoderKL(**(vae or VAE_CONFIG))}
    return StableDiffusionPipeline(**parts, tokenizer=tokenizer, scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
