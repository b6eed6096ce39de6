"""Optimisation baselines on one concept image, following diffusers' training-script conventions.

- `train_lora`: LoRA on the UNet attention projections (to_q, to_k, to_v, to_out.0) through peft's
  `unet.add_adapter(LoraConfig(...))`, as in diffusers' train_dreambooth_lora.py / train_text_to_image_lora.py.
- `train_textual_inversion`: a new placeholder token whose input embedding alone is trained, initialised
  from a word, every other embedding row restored after each step, as in diffusers' textual_inversion.py.

Both train copies of the modules they change, so the loaded base (shared with the personaliser) is
never written, and both take the base `StableDiffusionPipeline`. The results are in the formats
stock diffusers loads (`pipe.load_lora_weights(state_dict)` with `unet.`-prefixed peft keys;
`pipe.load_textual_inversion({token: embedding})`). The evaluation harness builds DreamBooth and the
`datencoder baseline` command on these.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from components.tuning import augment, encode_latents


@dataclass
class BaselineResult:
    method: str
    steps: int
    seconds: float  # the optimisation loop only (models already loaded)
    weights: dict[str, Tensor]  # LoRA: diffusers/peft keys; TI: {token: (1, D) embedding}
    token: str | None = None  # the placeholder to use in prompts (TI); LoRA uses its `prompt`'s words
    losses: list[float] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)


def _noise_scheduler(pipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def _diffusion_loss(pipe, unet, latents: Tensor, context: Tensor, generator: torch.Generator) -> Tensor:
    """Eq. 1 with the base's own scheduler and prediction type (epsilon or v)."""
    scheduler = pipe.noise_scheduler
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    noisy = scheduler.add_noise(latents, noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    prediction = unet(noisy, t, encoder_hidden_states=context).sample
    return F.mse_loss(prediction.float(), target.float())


def _prepare(pipe):
    # a noise scheduler for training next to the pipeline's sampler (attribute on a shallow copy only)
    run = copy.copy(pipe)
    run.noise_scheduler = _noise_scheduler(pipe)
    return run


def train_lora(pipe, pixels: Tensor, steps: int, prompt: str = "a photo of sks object", rank: int = 4,
               lr: float = 1e-4, batch: int = 1, seed: int = 0,
               on_step: Callable[[int, float], None] | None = None) -> BaselineResult:
    """LoRA from scratch on one image (pixels (1, 3, H, W) in [-1, 1]) for `steps` AdamW steps."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    run = _prepare(pipe)
    unet = copy.deepcopy(pipe.unet).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ids = pipe.tokenizer([prompt] * batch, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        context = pipe.text_encoder(ids)[0]
    losses = []
    unet.train()
    started = time.perf_counter()
    for step in range(steps):
        latents = encode_latents(pipe.vae, augment(pixels, batch, generator))
        loss = _diffusion_loss(run, unet, latents, context, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step:
            on_step(step + 1, losses[-1])
    seconds = time.perf_counter() - started
    weights = {f"unet.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}
    return BaselineResult("lora", steps, seconds, weights, losses=losses)


def train_textual_inversion(pipe, pixels: Tensor, steps: int, token: str = "<sks>", initializer: str = "object",
                            template: str = "a photo of {}", lr: float = 5e-3, batch: int = 1, seed: int = 0,
                            on_step: Callable[[int, float], None] | None = None) -> BaselineResult:
    """Textual Inversion on one image for `steps` AdamW steps (only the new token's embedding moves)."""
    tokenizer = copy.deepcopy(pipe.tokenizer)
    if tokenizer.add_tokens([token]) != 1:
        raise ValueError(f"token {token!r} is already in the tokenizer")
    init_ids = tokenizer(initializer, add_special_tokens=False).input_ids
    text_encoder = copy.deepcopy(pipe.text_encoder).requires_grad_(False)
    text_encoder.resize_token_embeddings(len(tokenizer))
    embeddings = text_encoder.get_input_embeddings()
    token_id = tokenizer.convert_tokens_to_ids(token)
    with torch.no_grad():
        embeddings.weight[token_id] = embeddings.weight[init_ids].mean(0)
    original = embeddings.weight.detach().clone()
    embeddings.weight.requires_grad_(True)
    optimizer = torch.optim.AdamW([embeddings.weight], lr=lr, weight_decay=1e-2)
    keep = torch.ones(len(tokenizer), dtype=torch.bool)
    keep[token_id] = False
    run = _prepare(pipe)
    ids = tokenizer([template.format(token)] * batch, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(seed)
    losses = []
    started = time.perf_counter()
    for step in range(steps):
        latents = encode_latents(pipe.vae, augment(pixels, batch, generator))
        loss = _diffusion_loss(run, pipe.unet, latents, text_encoder(ids)[0], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # only the placeholder's row may move (weight decay touches all rows)
            embeddings.weight[keep] = original[keep]
        losses.append(loss.item())
        if on_step:
            on_step(step + 1, losses[-1])
    seconds = time.perf_counter() - started
    learned = embeddings.weight[token_id].detach().clone()[None]
    return BaselineResult("textual_inversion", steps, seconds, {token: learned}, token=token, losses=losses)
