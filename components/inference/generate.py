"""Sampling a personalised concept with classifier-free guidance on the base pipeline.

The base `StableDiffusionPipeline` does the sampling; we hand it the soft prompt embeddings (v* at
S*) and the concept through `cross_attention_kwargs`. Each call gets its own pipeline object over the
shared modules with a fresh scheduler built from the base pipeline's scheduler config: a pipeline's
`__call__` keeps per-call state on itself (the scheduler's timesteps, the guidance scale), so
sharing one object between concurrent requests would mix them up. The modules are only read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from components.inference.tuning import Concept
from components.model.dual_path import condition
from components.progress import Progress


# --scheduler name -> diffusers class
SCHEDULERS = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler"}


def make_scheduler(pipe, name: str):
    """A fresh sampler on the base pipeline's scheduler config (betas, prediction type, spacing)."""
    import diffusers  # diffusers: only when a sampler is made (start-up time)

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def private_pipeline(pipe, scheduler: str):
    """A pipeline over `pipe`'s modules with its own scheduler (see the module docstring)."""
    from diffusers import StableDiffusionPipeline  # diffusers: only when a pipeline is made (start-up time)

    components = {**pipe.components, "scheduler": make_scheduler(pipe, scheduler)}
    run = StableDiffusionPipeline(**components, requires_safety_checker=False)
    run.set_progress_bar_config(disable=True)
    return run


@dataclass(frozen=True)
class Sampling:
    """How images are drawn: the `personalize.*` sampler settings (diffusers' names), and the generation blend."""

    guidance_scale: float
    num_inference_steps: int
    scheduler: str  # a key of SCHEDULERS
    alpha_blend: float  # Eq. 5's dual-path blend (ignored by samplers without a concept's dual path)
    guidance_rescale: float = 0.0


@torch.no_grad()
def generate(pipe, prompts_encoder, concept: Concept, prompts: list[str], seeds: list[int],
             sampling: Sampling) -> list[np.ndarray]:
    """One uint8 HxWx3 image per (prompt, seed); image i starts from torch.Generator().manual_seed(seeds[i]),
    so it equals a stock pipeline call for that prompt alone with that seed (and the same `guidance_rescale`)."""
    guidance_scale, alpha = sampling.guidance_scale, sampling.alpha_blend
    n = len(prompts)
    ids = prompts_encoder.tokenize(prompts)
    v_star, factors = concept.repeat(n)
    soft, batch = condition(prompts_encoder, ids, v_star, factors, concept.scale, alpha)
    uncond = prompts_encoder.encode(prompts_encoder.tokenize([""] * n, require_placeholder=False))
    guided = guidance_scale > 1  # diffusers skips the unconditional rows otherwise
    progress = Progress("sample", sampling.num_inference_steps, every_s=5.0)

    def on_step_end(_pipe, step: int, _timestep, tensors: dict) -> dict:
        progress.update(step + 1)
        return tensors

    images = private_pipeline(pipe, sampling.scheduler)(
        prompt_embeds=soft, negative_prompt_embeds=uncond if guided else None, guidance_scale=guidance_scale,
        guidance_rescale=sampling.guidance_rescale, num_inference_steps=sampling.num_inference_steps,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np", cross_attention_kwargs={"concept": batch.with_guidance(uncond) if guided else batch},
        callback_on_step_end=on_step_end,
    ).images
    progress.close()
    return [np.round(image * 255).astype(np.uint8) for image in images]
