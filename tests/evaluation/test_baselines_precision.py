"""The optimisation baselines on a bfloat16 base (as gpu_e2e.py times them on a GPU): LoRA's adapter and
Textual Inversion's embedding train in float32 beside the bf16 weights. Smoke-sized random-weight models."""

from __future__ import annotations

import math

import torch
from smoke_models import smoke_setup

from components.config import variant_config
from components.model.base import load_pipeline
from components.runtime import resolve
from components.training.baselines import train_lora, train_textual_inversion


def test_lora_and_textual_inversion_train_on_a_bfloat16_base(tmp_path):
    _, cfg, _ = smoke_setup(tmp_path)
    pipe = load_pipeline(cfg.base, resolve(variant_config(cfg, runtime={"dtype": "bfloat16"}).runtime))
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    lora = train_lora(pipe, pixels, 2)
    ti = train_textual_inversion(pipe, pixels, 2)
    assert all(math.isfinite(loss) for loss in lora.losses + ti.losses)
    assert {w.dtype for w in lora.weights.values()} == {torch.float32}
    assert next(iter(ti.weights.values())).dtype == torch.float32
    assert pipe.unet.dtype == torch.bfloat16  # the shared base is only read
