"""One-shot personalisation: the stage function behind the CLI, the MLflow pyfunc and the Prefect task.

    personalizer = Personalizer(cfg.engine, "models/toy-encoder")
    result = personalizer.run(image_bytes, ["S* on a beach"], personalizer.settings(seed=3))

A request is: read and check the image, encoder forward (v* and LoRA factors), at most `steps` tuning
steps (components/inference/tuning.py), then sampling (components/inference/generate.py). The tuned concept is a small
state applied per UNet call; the base weights are only read, so one Personalizer serves concurrent
requests. Tuned concepts are cached by (image hash, tuning settings): a second request with the same
image skips the encoder and the tuning. Tuning noise is seeded from the image hash, so the concept is a
function of the image and the settings alone, and the generation seed only picks the samples.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from components.config import EngineConfig
from components.data.images import read_image, to_arrays, to_pixels
from components.errors import UserError
from components.inference.generate import SCHEDULERS, Sampling, generate
from components.inference.tuning import Concept, TuningRecipe, predict_concept, tune
from components.model.base import load_pipeline
from components.model.encoder import FrozenBase, TuningEncoder
from components.model.placeholder import PLACEHOLDER, PromptEncoder
from components.progress import Progress
from components.runtime import resolve
from components.toy import reader


log = logging.getLogger(__name__)

# per-request parameters: (type, lower bound, upper bound); the same names as the pyfunc's params
PARAM_LIMITS: dict[str, tuple[type, float, float]] = {
    "tuning_steps": (int, 0, 100),
    "num_images": (int, 1, 16),
    "seed": (int, 0, 2**63 - 1),
    "guidance_scale": (float, 1.0, 50.0),
    "num_inference_steps": (int, 1, 1000),
    "alpha_blend": (float, 0.0, 1.0),
}


@dataclass(frozen=True)
class Settings:
    """What one request may choose (validated by `Personalizer.settings`)."""

    tuning_steps: int
    num_images: int
    seed: int
    guidance_scale: float
    num_inference_steps: int
    alpha_blend: float
    scheduler: str  # the config's unless the CLI names one; not a pyfunc param
    guidance_rescale: float  # the config's (personalize.guidance_rescale), not a per-request choice

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.guidance_scale, self.num_inference_steps, self.scheduler, self.alpha_blend,
                        self.guidance_rescale)


@dataclass
class GeneratedImage:
    prompt: str
    seed: int
    pixels: np.ndarray  # uint8 HxWx3

    def png(self) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(self.pixels).save(buf, format="PNG")
        return buf.getvalue()


@dataclass
class Result:
    images: list[GeneratedImage]
    concept: Concept
    image_sha256: str
    cached: bool
    timings: dict[str, float]


def check_value(name: str, value: Any) -> int | float:
    """One request parameter, type- and range-checked; UserError names it and its limits."""
    if name not in PARAM_LIMITS:
        raise UserError(f"unknown parameter {name!r}; known: {', '.join(PARAM_LIMITS)}")
    kind, low, high = PARAM_LIMITS[name]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UserError(f"{name} must be a number, got {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise UserError(f"{name} must be an integer, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    if not low <= value <= high:
        raise UserError(f"{name} must be between {low:g} and {high:g}, got {value!r}")
    return value


class ConceptCache:
    """LRU of tuned concepts; a key being tuned by one thread makes the others wait for it."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[tuple, Concept] = OrderedDict()
        self._lock = threading.Lock()
        self._in_flight: dict[tuple, threading.Lock] = {}
        self.hits = self.misses = 0

    def get_or_make(self, key: tuple, make) -> tuple[Concept, bool]:
        """(concept, was cached)."""
        with self._lock:
            key_lock = self._in_flight.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    self.hits += 1
                    return self._items[key], True
                self.misses += 1
            concept = make()
            with self._lock:
                if self.size > 0:
                    self._items[key] = concept
                    while len(self._items) > self.size:
                        self._items.popitem(last=False)
                self._in_flight.pop(key, None)
            return concept, False


class Personalizer:
    """A loaded base + encoder that personalises images on request (thread-safe)."""

    def __init__(self, config: EngineConfig, encoder_dir: str | Path | None):
        """`encoder_dir` None: the base alone (what the optimisation baselines need), no personalisation."""
        self.config = config
        self.runtime = resolve(config.runtime)  # the base in its dtype on its device; the encoder float32 beside it
        self.pipe = load_pipeline(config.base, self.runtime)
        self.base = FrozenBase.load(config.base, pipe=self.pipe)  # shares the pipeline's UNet and text encoder
        self.encoder = None if encoder_dir is None else self._load_encoder(encoder_dir)
        self.side = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.cache = ConceptCache(config.personalize.cache_size)
        self.tuning_ids = self.base.prompts.tokenize(config.personalize.prompts)  # fails early on a prompt without S*

    def variant(self, config: EngineConfig, encoder_dir: str | Path | None = None) -> Personalizer:
        """A Personalizer over the same loaded base with another config (tuning settings, blend) and
        optionally another encoder: the evaluation's variants without reloading the base each time.
        The base config must be the same; the variant gets its own concept cache."""
        if config.base != self.config.base or config.runtime != self.config.runtime:
            raise ValueError("a variant must share the base model and its runtime")
        other = copy.copy(self)
        other.config = config
        other.cache = ConceptCache(config.personalize.cache_size)
        other.tuning_ids = self.base.prompts.tokenize(config.personalize.prompts)
        if encoder_dir is not None:
            other.encoder = self._load_encoder(encoder_dir)
        return other

    def _load_encoder(self, encoder_dir: str | Path) -> TuningEncoder:
        encoder = TuningEncoder.from_pretrained(encoder_dir, self.base).eval().requires_grad_(False)
        return encoder.to(self.runtime.device)

    def settings(self, scheduler: str | None = None, **given: Any) -> Settings:
        """Request settings: `given` (names of PARAM_LIMITS) checked, the rest from the config."""
        p = self.config.personalize
        values = {"tuning_steps": p.tuning_steps, "num_images": p.num_images, "seed": p.seed,
                  "guidance_scale": p.guidance_scale, "num_inference_steps": p.num_inference_steps,
                  "alpha_blend": self.config.sampling_alpha}
        values.update({name: check_value(name, value) for name, value in given.items() if value is not None})
        scheduler = scheduler or p.scheduler
        if scheduler not in SCHEDULERS:
            raise UserError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        return Settings(**values, scheduler=scheduler, guidance_rescale=p.guidance_rescale)

    def check_prompts(self, prompts: list[str]) -> None:
        check_prompts(prompts, self.base.prompts)

    def tuning_prompt_ids(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Each photo's tuning prompts (pixels (P, 3, H, W) in [-1, 1]): its `photo_templates` with S* in the
        object's place, or the configured ones where there is none."""
        return [self.tuning_ids if t is None else self.base.prompts.tokenize([t.replace("{}", PLACEHOLDER)])
                for t in photo_templates(pixels, self.config.personalize.describe_scene)]

    def predict(self, pixels: torch.Tensor, generator: torch.Generator) -> Concept:
        """The encoder's prediction for one photo (1, 3, H, W) in [-1, 1]: tuning's start."""
        if self.encoder is None:
            raise ValueError("this Personalizer was loaded without an encoder")
        p = self.config.personalize
        return predict_concept(self.encoder, self.pipe.vae, pixels, p.encoder_timestep, generator, p.predicted_offsets)

    def concept(self, images, digest: str, steps: int) -> tuple[Concept, bool, dict[str, float]]:
        """The tuned concept for checked PIL image(s) of one concept with digest `digest` (cached).

        Several photos: the encoder's prediction for each, combined by `mean_concept`, and tuning draws
        its views across all of them (components/inference/tuning.py `augment`)."""
        p = self.config.personalize
        images = images if isinstance(images, (list, tuple)) else [images]
        recipe = TuningRecipe.from_config(self.config, steps)
        key = (digest, recipe, tuple(p.prompts), p.describe_scene, p.encoder_timestep, p.predicted_offsets)
        timings = {"encoder_s": 0.0, "tune_s": 0.0}

        def make() -> Concept:
            pixels = torch.cat([to_pixels(image, self.side) for image in images]).to(self.runtime.device)
            generator = torch.Generator().manual_seed(int(digest[:15], 16))
            t0 = time.perf_counter()
            start = mean_concept([self.predict(pixels[i:i + 1], generator) for i in range(len(pixels))])
            t1 = time.perf_counter()
            progress = Progress("tune", steps, every_s=2.0)
            tuned = tune(self.base, self.pipe.vae, start, pixels, self.tuning_prompt_ids(pixels), recipe, generator,
                         on_step=lambda i, loss: progress.update(i, loss=loss))
            timings.update(encoder_s=t1 - t0, tune_s=time.perf_counter() - t1)
            return tuned

        concept, cached = self.cache.get_or_make(key, make)
        return concept, cached, timings

    def run(self, image_bytes: bytes | list[bytes], prompts: list[str], settings: Settings) -> Result:
        """Personalise one concept from one photo (the paper's setting) or several photos of it."""
        started = time.perf_counter()
        self.check_prompts(prompts)
        photos = [image_bytes] if isinstance(image_bytes, (bytes, bytearray)) else list(image_bytes)
        if not photos:
            raise UserError("give at least one image of the concept")
        images = [read_image(data, self.config.personalize.max_pixels) for data in photos]
        digest = images_digest(photos)
        concept, cached, timings = self.concept(images, digest, settings.tuning_steps)
        if cached:
            log.info("concept %s from the cache: no tuning", digest[:12])
        t0 = time.perf_counter()
        seeds = [settings.seed + i for i in range(settings.num_images)]
        images = []
        for n, prompt in enumerate(prompts, 1):
            log.info("sampling %d image(s) for prompt %d/%d: %r", len(seeds), n, len(prompts), prompt)
            arrays = generate(self.pipe, self.base.prompts, concept, [prompt] * len(seeds), seeds, settings.sampling)
            images += [GeneratedImage(prompt, seed, a) for seed, a in zip(seeds, arrays)]
        timings["sample_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - started
        return Result(images, concept, digest, cached, {k: round(v, 3) for k, v in timings.items()})


def check_prompts(prompts: list[str], prompt_encoder: PromptEncoder) -> None:
    """Bad prompts fail before any work: none, no S*, or longer than the text encoder takes (stock pipelines
    would silently cut the end off). Needs only the base's tokenizer (`PromptEncoder(tokenizer, None)`)."""
    if not prompts:
        raise UserError("give at least one prompt containing S*")
    tokenizer = prompt_encoder.tokenizer
    for prompt in prompts:
        length = len(tokenizer(prompt).input_ids)
        if length > tokenizer.model_max_length:
            raise UserError(f"prompt {prompt[:60]!r}... is too long: {length} tokens, the text encoder takes "
                            f"{tokenizer.model_max_length} (start and end included)")
    prompt_encoder.tokenize(prompts)


def photo_templates(pixels: torch.Tensor, describe: bool) -> list[str | None]:
    """What each photo (P, 3, H, W) in [-1, 1] shows besides the object, as a caption template ('a large {} on
    grass'): with `describe` (personalize.describe_scene) the toy reader's, None where it cannot tell or without."""
    return [reader.describe(image) if describe else None for image in to_arrays(pixels)]


def images_digest(photos: list[bytes]) -> str:
    """The sha256 of one photo's bytes; for several, of their hashes in order (the order picks the views)."""
    if len(photos) == 1:
        return hashlib.sha256(photos[0]).hexdigest()
    return hashlib.sha256("".join(hashlib.sha256(p).hexdigest() for p in photos).encode()).hexdigest()


def mean_concept(predictions: list[Concept]) -> Concept:
    """One concept from the encoder's predictions for several photos: v* is their mean, and the LoRA
    offset is the mean of their offsets s * A_i @ B_i, held exactly as factors of rank n * r:
    [A_1 .. A_n] (side by side) @ [B_1; ..; B_n] / n. One prediction is returned as it is."""
    if len(predictions) == 1:
        return predictions[0]
    n, first = len(predictions), predictions[0]
    v_star = torch.stack([c.v_star for c in predictions]).mean(0)
    factors = None if first.factors is None else {
        name: (torch.cat([c.factors[name][0] for c in predictions], dim=-1),
               torch.cat([c.factors[name][1] for c in predictions], dim=-2) / n)
        for name in first.factors}
    return Concept(v_star, factors, first.scale)


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("s*", "concept")).strip("-")[:length] or "image"
