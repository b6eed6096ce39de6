"""Inference-time tuning (paper section 4.3): a few steps on one image, starting from the encoder.

The encoder predicts v* and LoRA factors for the image; we then optimise exactly those tensors (not
the encoder, not the base) for at most a dozen steps of the denoising loss (Eq. 1) on lightly
augmented views of the single image, optionally with an L2 pull toward the encoder's prediction (the
paper's; its weight and the learning rate are `personalize.*`, chosen per preset by the ablation in
docs/personalize.md). The result is a `Concept`: a small state applied per UNet call, never written
into the base weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from components.config import EngineConfig
from components.model.dual_path import Factors


@dataclass(frozen=True)
class Concept:
    """One personalised concept: v* (1, D) and factors {target: (A (1, Din, r), B (1, r, Dout))};
    `scale` is the constant s of W + s * A @ B."""

    v_star: Tensor
    factors: Factors | None
    scale: float

    def repeat(self, n: int) -> tuple[Tensor, Factors | None]:
        """v* for a batch of n rows of this concept (views, or images to generate) and its factors.

        The factors stay one concept's (N = 1): every row of a ConceptBatch uses concept j % N, so they
        apply to all n rows, through plain matmuls instead of the batched einsums of N = n."""
        return self.v_star.expand(n, -1), self.factors

    def tensors(self) -> list[Tensor]:
        return [self.v_star, *(t for ab in (self.factors or {}).values() for t in ab)]

    def with_tensors(self, tensors: list[Tensor]) -> Concept:
        """This concept with `tensors` in place of `self.tensors()` (same order and shapes)."""
        factors = None if self.factors is None else {
            name: (tensors[1 + 2 * i], tensors[2 + 2 * i]) for i, name in enumerate(self.factors)}
        return Concept(tensors[0], factors, self.scale)

    def detached(self) -> Concept:
        factors = None if self.factors is None else {
            name: (a.detach().clone(), b.detach().clone()) for name, (a, b) in self.factors.items()}
        return Concept(self.v_star.detach().clone(), factors, self.scale)


@torch.no_grad()
def encode_latents(vae, pixels: Tensor) -> Tensor:
    """Scaled VAE latents (the distribution's mean: tuning should not learn the VAE's sampling noise)."""
    return vae.encode(pixels.to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def predict_concept(encoder, vae, pixels: Tensor, timestep: int, generator: torch.Generator,
                    offsets: float = 1.0) -> Concept:
    """The encoder's concept for one image (pixels (1, 3, H, W) in [-1, 1]) from its latent noised to `timestep`;
    `offsets` scales the predicted LoRA offsets (B x offsets; 0: v* alone, B = 0 as a fresh LoRA starts)."""
    latents = encode_latents(vae, pixels)
    t = torch.tensor([timestep], device=latents.device)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    noisy, _ = encoder.base.noised(latents, noise, t)
    v_star, factors = encoder.predict(pixels, noisy, t)
    if factors is not None and offsets != 1.0:
        factors = {name: (a, b * offsets) for name, (a, b) in factors.items()}
    return Concept(v_star, factors, encoder.config.lora_scale)


def augment(pixels: Tensor, n: int, generator: torch.Generator, min_crop: float = 0.85) -> Tensor:
    """n light views of the concept's photo(s) (pixels (P, 3, H, W)): a random square crop of 85-100% of the
    side, resized back. Several photos take turns from a random first one, so every call spreads its views
    across them (view k shows photo `view_photos(...)[k]`). No flips or colour changes: orientation and colour
    are part of a concept's identity."""
    return crops(pixels, view_photos(len(pixels), n, generator), generator, min_crop)


def crops(pixels: Tensor, photos: list[int], generator: torch.Generator, min_crop: float = 0.85) -> Tensor:
    """One random square crop of 85-100% of the side of photo `photos[k]` for each k, resized back."""
    side = pixels.shape[-1]
    views = []
    for photo in photos:
        crop = int(round(side * (min_crop + (1 - min_crop) * torch.rand((), generator=generator).item())))
        top, left = (int(torch.randint(0, side - crop + 1, (), generator=generator)) for _ in range(2))
        view = pixels[photo:photo + 1, :, top:top + crop, left:left + crop]
        views.append(F.interpolate(view, size=(side, side), mode="bilinear", align_corners=False, antialias=True))
    return torch.cat(views)


def view_photos(photos: int, n: int, generator: torch.Generator) -> list[int]:
    """Which photo each of n views shows: they take turns from a random first one."""
    first = int(torch.randint(0, photos, (), generator=generator)) if photos > 1 else 0
    return [(first + k) % photos for k in range(n)]


TUNE_PARTS = ("all", "embedding", "weights")
# how the L2 pull toward the encoder's prediction adds up its tensors' squared drift (the paper does not say)
L2_REDUCTIONS = ("sum", "mean")
TIMESTEP_SAMPLING = ("stratified", "uniform")


def draw_timesteps(steps: int, views: int, train_steps: int, generator: torch.Generator,
                   sampling: str = "stratified") -> Tensor:
    """The (steps, views) diffusion timesteps of a tuning run.

    uniform: each independently from [0, train_steps). stratified: view i of every step draws from the
    i-th of `views` equal ranges, and over the run it visits each of `steps` sub-ranges of that range once,
    in random order: a low-discrepancy sampler (as VDM's, Kingma et al. 2021) that lowers the variance of a
    dozen gradients of one image (every step sees the whole noise range; the run covers it evenly)."""
    if sampling == "uniform":
        return torch.randint(0, train_steps, (steps, views), generator=generator)
    if sampling != "stratified":
        raise ValueError(f"unknown timestep sampling {sampling!r}; choose one of {', '.join(TIMESTEP_SAMPLING)}")
    visits = torch.stack([torch.randperm(steps, generator=generator) for _ in range(views)], dim=1)
    within = (visits + torch.rand((steps, views), generator=generator)) / steps
    return ((torch.arange(views) + within) / views * train_steps).long().clamp(max=train_steps - 1)


@dataclass(frozen=True)
class TuningRecipe:
    """How a concept is tuned: the `personalize.*` settings of tuning, with Eq. 5's blend for the phase."""

    steps: int  # Adam steps (paper: at most 12)
    lr: float
    l2_weight: float  # pull toward the encoder's prediction
    views: int  # augmented views of the image per step
    alpha: float  # dual-path blend while tuning
    parts: str = "all"  # what moves: all, the embedding v* only, or the LoRA factors ("weights") only
    timesteps: str = "stratified"  # draw_timesteps' sampling
    l2_reduction: str = "sum"  # L2_REDUCTIONS; see `tune`

    @classmethod
    def from_config(cls, config: EngineConfig, steps: int | None = None) -> TuningRecipe:
        p = config.personalize
        return cls(p.tuning_steps if steps is None else steps, p.lr, p.l2_weight, p.views,
                   config.encoder.alpha("tune"), p.tune_parts, p.timestep_sampling, p.l2_reduction)


def tune(base, vae, start: Concept, pixels: Tensor, prompt_ids: Tensor | list[Tensor], recipe: TuningRecipe,
         generator: torch.Generator, on_step: Callable[[int, float], None] | None = None) -> Concept:
    """`recipe.steps` Adam steps on v* and the factors from `start` (see the module docstring).

    Each step: `recipe.views` augmented views, timesteps from `draw_timesteps`, random noise, one of
    `prompt_ids`' rows (each with S*) per view, or of `prompt_ids[p]`'s for a view of photo p when it is a list
    (each photo's own caption); loss = denoising MSE + l2_weight * drift from `start`.
    `recipe.l2_reduction` "sum": the squared L2 distance ||theta - theta_0||^2 over every tuned entry (the
    paper's L2 term; its gradient 2 l2_weight (theta - theta_0) per entry is comparable to the denoising
    gradient); "mean": the mean over tensors of each one's mean squared drift, whatever its size (a gradient
    of about 1e-7 per entry after a dozen steps: inert). `recipe.parts` picks what moves (the last two
    choices are ablations)."""
    steps, lr, l2_weight, views, alpha, parts, timesteps = (
        recipe.steps, recipe.lr, recipe.l2_weight, recipe.views, recipe.alpha, recipe.parts, recipe.timesteps)
    if parts not in TUNE_PARTS:
        raise ValueError(f"unknown tuning parts {parts!r}; choose one of {', '.join(TUNE_PARTS)}")
    if recipe.l2_reduction not in L2_REDUCTIONS:
        raise ValueError(f"unknown l2 reduction {recipe.l2_reduction!r}; choose one of {', '.join(L2_REDUCTIONS)}")
    fixed = start.detached().tensors()
    moving = {"all": range(len(fixed)), "embedding": range(1), "weights": range(1, len(fixed))}[parts]
    if not moving:  # weights-only tuning of an encoder without hypernetwork: nothing to tune
        return start.detached()
    # The ~85 tuned tensors live in one flat leaf: Adam and the L2 drift then cost one op each instead of
    # one per tensor (a step on the toy base is bound by op dispatch, not arithmetic).
    sizes = [fixed[i].numel() for i in moving]
    flat = torch.cat([fixed[i].flatten() for i in moving]).requires_grad_()
    anchor = flat.detach().clone()
    drift_weight = (torch.ones_like(flat) if recipe.l2_reduction == "sum" else
                    torch.cat([torch.full((n,), 1.0 / (len(sizes) * n)) for n in sizes]).to(flat))
    optimizer = torch.optim.Adam([flat], lr=lr)

    def current() -> Concept:
        """The concept with the moving tensors as views of `flat` (gradients reach it through them)."""
        views = {i: part.view(fixed[i].shape) for i, part in zip(moving, flat.split(sizes))}
        return start.with_tensors([views.get(i, t) for i, t in enumerate(fixed)])

    plan = draw_timesteps(steps, views, base.noise_scheduler.config.num_train_timesteps, generator, timesteps)
    per_photo = prompt_ids if isinstance(prompt_ids, list) else [prompt_ids] * len(pixels)
    for step in range(steps):
        photos = view_photos(len(pixels), views, generator)
        latents = encode_latents(vae, crops(pixels, photos, generator))
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        t = plan[step].to(latents.device)
        ids = torch.cat([per_photo[p][torch.randint(0, len(per_photo[p]), (1,), generator=generator)]
                         for p in photos])
        noisy, target = base.noised(latents, noise, t)
        concept = current()
        v_star, factors = concept.repeat(views)
        prediction = base.denoise(noisy, t, ids, v_star, factors, concept.scale, alpha)
        drift = (drift_weight * (flat - anchor).square()).sum()
        loss = F.mse_loss(prediction.float(), target.float()) + l2_weight * drift
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step + 1, loss.item())
    with torch.no_grad():
        return current().detached()
