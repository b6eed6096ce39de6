"""Peak GPU memory and time of inference-time tuning at Stable Diffusion 1.5 size (never run in CI).

    .venv/bin/python benchmarks/gpu_check.py [--batch 16] [--side 512] [--steps 12] [--dtype bf16]

Builds the SD 1.5 UNet and text encoder from the bundled configs (components/model/configs/sd15/) with random
weights on CUDA, the SD VAE architecture and an open_clip ViT-H-14 image tower (random weights), the
sd15-preset encoder on top, and runs the encoder forward plus `--steps` tuning steps of one concept
with `--batch` augmented views at `--side` px, dual path on (a = encoder.alpha_blend_tune). Weights do
not change memory or time, so random ones measure the real thing. Goal: peak < 20 GB.
Exits 0 with a message when there is no CUDA device.

Measured on one H100 80GB (2026-11-27; bf16 base, 512 px, batch 16, 12 timed steps after 2 warm-up steps,
96 LoRA targets; one process each), with Concept.repeat handing one concept's factors to all 16 rows:
  --no-checkpointing  peak 20.51 GB, 0.301 s/step
  (default)           peak 11.97 GB, 0.460 s/step (UNet gradient checkpointing, the sd15 preset's default)
(Before that change, on another H100 machine: 20.52 GB / 0.339 s and 11.97 GB / 0.511 s.)
Paper: < 30 GB; E4T about 70 GB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import harness
import torch


GOAL_GB = 20.0


def main() -> int:
    parser = harness.parser(__doc__, __file__, config=False)
    parser.add_argument("--batch", type=int, help="augmented views per tuning step (default: the sd15 preset's "
                        "personalize.views, 16)")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed tuning steps first, so the timed ones exclude CUDA/cuDNN warm-up")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="frozen base weights")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="UNet gradient checkpointing (default: the sd15 preset's base.gradient_checkpointing)")
    parser.add_argument("--device", default="cuda", help="cpu: a slow check of the code path only (no memory figure)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        harness.log("gpu_check: no CUDA device here; run this on a machine with an NVIDIA GPU")
        return 0

    import open_clip
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from components.config import load_config
    from components.inference.tuning import TuningRecipe, predict_concept, tune
    from components.model import sd15
    from components.model.backbone import ClipImageTower
    from components.model.encoder import FrozenBase, TuningEncoder
    from components.toy.tokenizer import save_toy_tokenizer

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    cfg = load_config("sd15")
    checkpointing = cfg.base.gradient_checkpointing if args.checkpointing is None else args.checkpointing
    batch = cfg.personalize.views if args.batch is None else args.batch
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(sd15.unet_config())
        text_encoder = CLIPTextModel(CLIPTextConfig(**sd15.text_encoder_config()))
        vae = AutoencoderKL(**sd15.VAE_CONFIG)
        clip = open_clip.create_model("ViT-H-14", device=device)
    # the CLIP tower stays fp32: ClipImageTower feeds it fp32 pixels (it runs without gradient)
    unet, text_encoder, vae = (m.to(dtype) for m in (unet, text_encoder, vae))
    if checkpointing:
        unet.enable_gradient_checkpointing()
    with tempfile.TemporaryDirectory() as tmp:
        # SD's tokenizer cannot be downloaded here; the toy BPE tokenizer's ids fit SD's 49,408-row table
        tokenizer = save_toy_tokenizer(Path(tmp) / "tokenizer", max_length=77)
    base = FrozenBase(unet, text_encoder, tokenizer, DDPMScheduler(**sd15.SCHEDULER_CONFIG),
                      ClipImageTower(clip.visual).to(device))
    encoder = TuningEncoder.for_base(cfg.encoder, base).to(device)
    alpha = cfg.encoder.alpha("tune")
    pixels = torch.rand(1, 3, args.side, args.side, device=device) * 2 - 1
    ids = base.prompts.tokenize(cfg.personalize.prompts).to(device)
    generator = torch.Generator().manual_seed(0)  # CPU generator: tuning draws on CPU and moves to the device

    sync = torch.cuda.synchronize if cuda else None
    if args.warmup:
        warm = predict_concept(encoder, vae, pixels, cfg.personalize.encoder_timestep,
                               torch.Generator().manual_seed(1))
        recipe = replace(TuningRecipe.from_config(cfg.engine, args.warmup), views=batch, alpha=alpha)
        tune(base, vae, warm, pixels, ids, recipe, torch.Generator().manual_seed(1))
        del warm
    if cuda:
        torch.cuda.synchronize()  # the warm-up's work ends before the peak is reset
        torch.cuda.reset_peak_memory_stats()
    with harness.timed(sync) as encoder_t:
        start = predict_concept(encoder, vae, pixels, cfg.personalize.encoder_timestep, generator)
    with harness.timed(sync) as tune_t:
        tune(base, vae, start, pixels, ids,
             replace(TuningRecipe.from_config(cfg.engine, args.steps), views=batch, alpha=alpha), generator)
    encoder_s, tune_s = encoder_t.seconds, tune_t.seconds
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    harness.report({
        "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": args.dtype, "checkpointing": checkpointing,
        "side": args.side, "batch": batch, "steps": args.steps, "warmup_steps": args.warmup, "alpha_blend": alpha,
        "targets": len(encoder.shape.targets), "encoder_s": round(encoder_s, 2), "tune_s": round(tune_s, 2),
        "seconds_per_step": round(tune_s / max(args.steps, 1), 3), "peak_gb": round(peak_gb, 2),
        "goal_gb": GOAL_GB, "meets_goal": peak_gb < GOAL_GB if cuda else None}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
