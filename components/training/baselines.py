"""Optimisation baselines on one concept image, following diffusers' training-script conventions.

- `train_lora`: LoRA on the UNet attention projections (to_q, to_k, to_v, to_out.0) through peft's
  `unet.add_adapter(LoraConfig(...))`, as in diffusers' train_dreambooth_lora.py / train_text_to_image_lora.py.
- `train_textual_inversion`: a new placeholder token whose input embedding alone is trained, initialised
  from a word, every other embedding row restored after each step, as in diffusers' textual_inversion.py.
- `train_dreambooth`: the whole UNet fine-tuned on "a photo of sks object" (rare identifier + class
  word), optionally with prior preservation on class images the base model drew, as in diffusers'
  train_dreambooth.py (text encoder frozen, its default).

All train copies of the modules they change, so the loaded base (shared with the personaliser) is
never written, and all take the base `StableDiffusionPipeline` and one image (one-shot) or several
(few-shot: each view draws one of them, like the scripts' instance data set). The results are in
the formats stock diffusers loads (`pipe.load_lora_weights(state_dict)` with `unet.`-prefixed peft
keys; `pipe.load_textual_inversion({token: embedding})`; a UNet state dict). `sample` draws images
with a trained result; `baseline` is the `datencoder baseline` stage, shaped like `personalize`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Collection

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from components.config import Config, EvaluateConfig
from components.data.images import read_bytes, read_image, to_pixels
from components.errors import UserError
from components.inference.engine import check_value, photo_templates, slug
from components.inference.generate import (
    SCHEDULERS,
    Sampling,
    generate,
    make_scheduler,
    private_pipeline,
)
from components.inference.tuning import Concept, augment, encode_latents
from components.memory import peak_mb
from components.model.base import load_pipeline
from components.model.placeholder import PLACEHOLDER, PromptEncoder
from components.progress import Progress
from components.runtime import resolve


METHODS = ("ti", "lora", "dreambooth")
GENERIC_TEMPLATE = "a photo of {}"  # the training scripts' prompt, where nothing says what the photo shows
IDENTIFIER = "sks"  # DreamBooth's rare-token identifier; LoRA and DreamBooth prompts say "sks <class word>"


Snapshot = Callable[["BaselineResult"], None]


@dataclass
class BaselineResult:
    method: str
    steps: int
    seconds: float  # the optimisation loop only (models already loaded)
    weights: dict[str, Tensor]  # LoRA: diffusers/peft keys; TI: {token: (1, D) embedding}
    token: str | None = None  # the placeholder to use in prompts (TI); LoRA uses its `prompt`'s words
    losses: list[float] = field(default_factory=list)
    unet: Any = None  # LoRA, DreamBooth: the trained UNet copy, for sampling in this process

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)


def _noise_scheduler(pipe):
    from diffusers import DDPMScheduler  # diffusers: only when a baseline trains (start-up time)

    return DDPMScheduler.from_config(pipe.scheduler.config)


def _diffusion_loss(pipe, unet, latents: Tensor, context: Tensor, generator: torch.Generator) -> Tensor:
    """Eq. 1 with the base's own scheduler and prediction type (epsilon or v)."""
    scheduler = pipe.noise_scheduler
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    prediction = unet(noisy, t, encoder_hidden_states=context).sample
    return F.mse_loss(prediction.float(), target.float())


def _fit(run, unet, pixels: Tensor, context: Tensor, optimizer, steps: int, batch: int, generator: torch.Generator,
         on_step: Callable[[int, float], None] | None, prior: tuple[Tensor, Tensor, float] | None = None,
         snapshot: Callable[[int, float], None] | None = None) -> tuple[list[float], float]:
    """The UNet training loop of LoRA and DreamBooth: (losses, seconds). `prior` = (class pixels, class
    context, weight) adds DreamBooth's prior-preservation loss. `snapshot(step, seconds so far)` runs after every
    step with the UNet in eval mode; its own time is not training time."""
    losses, paused = [], 0.0
    unet.train()
    started = time.perf_counter()
    for step in range(steps):
        latents = encode_latents(run.vae, augment(pixels, batch, generator))
        loss = _diffusion_loss(run, unet, latents, context, generator)
        if prior is not None:
            class_pixels, class_context, weight = prior
            class_latents = encode_latents(run.vae, augment(class_pixels, batch, generator))
            loss = loss + weight * _diffusion_loss(run, unet, class_latents, class_context, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step:
            on_step(step + 1, losses[-1])
        if snapshot:
            t0 = time.perf_counter()
            unet.eval()
            snapshot(step + 1, t0 - started - paused)
            unet.train()
            paused += time.perf_counter() - t0
    unet.eval()
    return losses, time.perf_counter() - started - paused


def _prepare(pipe):
    # a noise scheduler for training next to the pipeline's sampler (attribute on a shallow copy only)
    run = copy.copy(pipe)
    run.noise_scheduler = _noise_scheduler(pipe)
    return run


def train_lora(pipe, pixels: Tensor, steps: int, prompt: str = "a photo of sks object", rank: int = 4,
               lr: float = 1e-4, batch: int = 1, seed: int = 0,
               on_step: Callable[[int, float], None] | None = None, snapshots: Collection[int] = (),
               on_snapshot: Snapshot | None = None) -> BaselineResult:
    """LoRA from scratch on the image(s) (pixels (N, 3, H, W) in [-1, 1]) for `steps` AdamW steps;
    `on_snapshot(result so far)` after each step count in `snapshots` (the live UNet: use it before returning)."""
    # diffusers, peft: only when a LoRA baseline trains (start-up time)
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    run = _prepare(pipe)
    unet = copy.deepcopy(pipe.unet).requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # the gaussian LoRA init draws from the global RNG: seed it, privately
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    # the adapter trains in float32 on a half-precision base (diffusers' scripts)
    cast_training_params(unet, torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ids = pipe.tokenizer([prompt] * batch, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        context = pipe.text_encoder(ids.to(pipe.device))[0]

    def result(step: int, seconds: float, losses: list[float]) -> BaselineResult:
        weights = {f"unet.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}
        return BaselineResult("lora", step, seconds, weights, losses=losses, unet=unet)

    def snapshot(step: int, seconds: float) -> None:
        if on_snapshot and step in snapshots:
            on_snapshot(result(step, seconds, []))

    losses, seconds = _fit(run, unet, pixels, context, optimizer, steps, batch, generator, on_step, snapshot=snapshot)
    return result(steps, seconds, losses)


def train_textual_inversion(pipe, pixels: Tensor, steps: int, token: str = "<sks>", initializer: str = "object",
                            template: str = "a photo of {}", lr: float = 5e-3, batch: int = 1, seed: int = 0,
                            on_step: Callable[[int, float], None] | None = None, snapshots: Collection[int] = (),
                            on_snapshot: Snapshot | None = None) -> BaselineResult:
    """Textual Inversion on the image(s) for `steps` AdamW steps (only the new token's embedding moves);
    `on_snapshot(result so far)` after each step count in `snapshots`, its time not counted."""
    tokenizer = copy.deepcopy(pipe.tokenizer)
    if tokenizer.add_tokens([token]) != 1:
        raise ValueError(f"token {token!r} is already in the tokenizer")
    init_ids = tokenizer(initializer, add_special_tokens=False).input_ids
    # float32 like every tuned tensor (the trained row under AdamW); its output is cast to the UNet's dtype
    text_encoder = copy.deepcopy(pipe.text_encoder).float().requires_grad_(False)
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
                    truncation=True, return_tensors="pt").input_ids.to(pipe.device)
    generator = torch.Generator().manual_seed(seed)
    losses, paused = [], 0.0
    started = time.perf_counter()
    for step in range(steps):
        latents = encode_latents(pipe.vae, augment(pixels, batch, generator))
        loss = _diffusion_loss(run, pipe.unet, latents, text_encoder(ids)[0].to(pipe.unet.dtype), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # only the placeholder's row may move (weight decay touches all rows)
            embeddings.weight[keep] = original[keep]
        losses.append(loss.item())
        if on_step:
            on_step(step + 1, losses[-1])
        if on_snapshot and step + 1 in snapshots:
            t0 = time.perf_counter()
            on_snapshot(BaselineResult("textual_inversion", step + 1, t0 - started - paused,
                                       {token: embeddings.weight[token_id].detach().clone()[None]}, token=token))
            paused += time.perf_counter() - t0
    seconds = time.perf_counter() - started - paused
    learned = embeddings.weight[token_id].detach().clone()[None]
    return BaselineResult("textual_inversion", steps, seconds, {token: learned}, token=token, losses=losses)


def train_dreambooth(pipe, pixels: Tensor, steps: int, prompt: str = f"a photo of {IDENTIFIER} object",
                     class_prompt: str = "a photo of object", prior_images: int = 0, prior_loss_weight: float = 1.0,
                     lr: float = 5e-6, batch: int = 1, seed: int = 0, guidance_scale: float = 4.0,
                     guidance_rescale: float = 0.0, num_inference_steps: int = 25,
                     on_step: Callable[[int, float], None] | None = None) -> BaselineResult:
    """DreamBooth: every UNet weight trained for `steps` AdamW steps on the image(s). With `prior_images` > 0
    the base first draws that many class images for `class_prompt` and each step adds their denoising
    loss (prior preservation), which keeps the class word from collapsing onto the instance."""
    run = _prepare(pipe)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        def context(text: str, n: int) -> Tensor:
            ids = pipe.tokenizer([text] * n, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            return pipe.text_encoder(ids.to(pipe.device))[0]

        instance_context = context(prompt, batch)
        prior = None
        if prior_images:
            drawn = private_pipeline(pipe, "ddim")(
                [class_prompt] * prior_images, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                num_inference_steps=num_inference_steps,
                generator=[torch.Generator().manual_seed(seed + 1 + i) for i in range(prior_images)],
                output_type="pt").images
            prior = (drawn * 2 - 1, context(class_prompt, batch), prior_loss_weight)
    unet = copy.deepcopy(pipe.unet).requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    losses, seconds = _fit(run, unet, pixels, instance_context, optimizer, steps, batch, generator, on_step, prior)
    unet.requires_grad_(False)
    return BaselineResult("dreambooth", steps, seconds, dict(unet.state_dict()), losses=losses, unet=unet)


def train_baseline(method: str, pipe, pixels: Tensor, steps: int, settings: EvaluateConfig, seed: int = 0,
                   on_step: Callable[[int, float], None] | None = None, guidance_rescale: float = 0.0,
                   snapshots: Collection[int] = (), on_snapshot: Snapshot | None = None,
                   template: str = GENERIC_TEMPLATE) -> BaselineResult:
    """One of METHODS with the harness's learning rates (diffusers' script defaults), on the pipeline's device,
    trained on `template` ("{} on a gray background": what the photo shows, `{}` where the concept goes; the scripts'
    "a photo of {}" by default). TI and LoRA call `on_snapshot` after each step count in `snapshots`: their lr is
    constant, so the snapshot at k steps is what a k-step run with the same seed returns."""
    pixels = pixels.to(pipe.device)
    if snapshots and method not in ("ti", "lora"):
        raise UserError(f"snapshots are for ti and lora, not {method!r}")
    if method == "ti":
        return train_textual_inversion(pipe, pixels, steps, template=template, lr=settings.ti_lr, seed=seed,
                                       on_step=on_step, snapshots=snapshots, on_snapshot=on_snapshot)
    instance = template.format(f"{IDENTIFIER} object")
    if method == "lora":
        return train_lora(pipe, pixels, steps, prompt=instance, lr=settings.lora_lr, seed=seed, on_step=on_step,
                          snapshots=snapshots, on_snapshot=on_snapshot)
    if method == "dreambooth":
        return train_dreambooth(pipe, pixels, steps, prompt=instance, class_prompt=template.format("object"),
                                lr=settings.dreambooth_lr, seed=seed, on_step=on_step,
                                prior_images=settings.dreambooth_prior_images, guidance_rescale=guidance_rescale)
    raise UserError(f"unknown baseline method {method!r}; choose one of: {', '.join(METHODS)}")


def photo_template(pixels: Tensor, settings) -> str:
    """The baselines' training template for a concept's photo(s) (P, 3, H, W): what the first one shows besides the
    object (personalize.describe_scene, as ours tunes), else the scripts' generic prompt."""
    return photo_templates(pixels[:1], settings.describe_scene)[0] or GENERIC_TEMPLATE


@torch.no_grad()
def sample(pipe, prompts_encoder, result: BaselineResult, prompts: list[str], seeds: list[int],
           sampling: Sampling) -> list[np.ndarray]:
    """One uint8 image per (prompt with S*, seed), as components.inference.generate.generate draws ours: TI puts its
    embedding at S*; LoRA and DreamBooth swap in their trained UNet and say "sks object" for S*."""
    if result.unet is None:  # textual inversion: the learned embedding is a v* without LoRA factors
        concept = Concept(next(iter(result.weights.values())), None, 1.0)
        return generate(pipe, prompts_encoder, concept, prompts, seeds, replace(sampling, alpha_blend=1.0))
    from diffusers import StableDiffusionPipeline  # diffusers: only when a baseline samples (start-up time)

    tuned = StableDiffusionPipeline(**{**pipe.components, "unet": result.unet,
                                       "scheduler": make_scheduler(pipe, sampling.scheduler)},
                                    requires_safety_checker=False)
    tuned.set_progress_bar_config(disable=True)
    words = [p.replace(PLACEHOLDER, f"{IDENTIFIER} object") for p in prompts]
    images = tuned(words, guidance_scale=sampling.guidance_scale, guidance_rescale=sampling.guidance_rescale,
                   num_inference_steps=sampling.num_inference_steps, output_type="np",
                   generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    return [np.round(image * 255).astype(np.uint8) for image in images]


def read_images(paths: list[str], max_pixels: int) -> list:
    """RGB PIL images from files, each checked like a personalisation upload (a UserError names the file)."""
    if not paths:
        raise UserError("give at least one --image")
    images = []
    for path in paths:
        data = read_bytes(path)
        try:
            images.append(read_image(data, max_pixels))
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
    return images


def baseline(cfg: Config, method: str, images: list[str], prompts: list[str], steps: int | None = None,
             out: str | None = None, scheduler: str | None = None, seed: int | None = None,
             num_images: int | None = None, guidance_scale: float | None = None,
             num_inference_steps: int | None = None) -> dict:
    """The `datencoder baseline` stage: train `method` on the image(s) and draw `prompts` with it; the report
    has the same shape as `personalize`'s (one image: one-shot; 3-5: few-shot)."""
    if method not in METHODS:
        raise UserError(f"unknown baseline method {method!r}; choose one of: {', '.join(METHODS)}")
    if not prompts or any(not p.strip() for p in prompts):
        raise UserError("give at least one non-empty --prompt containing S*")
    p, e = cfg.personalize, cfg.evaluate
    steps = steps if steps is not None else getattr(e, f"{method}_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise UserError(f"--steps must be a positive integer, got {steps!r}")
    settings = {"seed": p.seed, "num_images": p.num_images, "guidance_scale": p.guidance_scale,
                "num_inference_steps": p.num_inference_steps, "guidance_rescale": p.guidance_rescale}
    settings.update({k: check_value(k, v) for k, v in {"seed": seed, "num_images": num_images,
                     "guidance_scale": guidance_scale, "num_inference_steps": num_inference_steps}.items()
                     if v is not None})
    scheduler = scheduler or p.scheduler
    if scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    sampling = Sampling(settings["guidance_scale"], settings["num_inference_steps"], scheduler, 1.0,
                        settings["guidance_rescale"])
    started = time.perf_counter()
    inputs = read_images(images, p.max_pixels)
    pipe = load_pipeline(cfg.base, resolve(cfg.runtime))
    prompts_encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    prompts_encoder.tokenize(prompts)  # every prompt has S* and fits, before any training
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pixels = torch.cat([to_pixels(image, side) for image in inputs])

    progress = Progress(method, steps, every_s=5.0)
    result = train_baseline(method, pipe, pixels, steps, e, seed=settings["seed"],
                            guidance_rescale=settings["guidance_rescale"], template=photo_template(pixels, p),
                            on_step=lambda i, loss: progress.update(i, loss=loss))
    t0 = time.perf_counter()
    seeds = [settings["seed"] + i for i in range(settings["num_images"])]
    out_dir = Path(out or Path(p.out).with_name(f"baseline-{method}"))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for prompt in prompts:
        arrays = sample(pipe, prompts_encoder, result, [prompt] * len(seeds), seeds, sampling)
        for seed_i, array in zip(seeds, arrays):
            path = out_dir / f"{method}-{len(written):02d}-{slug(prompt)}-{seed_i}.png"
            Image.fromarray(array).save(path)
            written.append({"path": str(path), "prompt": prompt, "seed": seed_i})
    sample_s = time.perf_counter() - t0
    return {
        "model": f"baseline:{method}",
        "images": written,
        "seed": settings["seed"],
        "settings": {"method": method, "steps": steps, "shots": len(pixels), **settings, "scheduler": scheduler},
        "cached": False,
        "generation": {"num_inference_steps": settings["num_inference_steps"],
                       "guidance_scale": settings["guidance_scale"], "guidance_rescale": settings["guidance_rescale"],
                       "scheduler": SCHEDULERS[scheduler],
                       "alpha_blend": None},
        "timings": {"train_s": round(result.seconds, 3), "sample_s": round(sample_s, 3),
                    "total_s": round(time.perf_counter() - started, 3)},
        "peak_rss_mb": round(peak_mb(), 1),
    }
