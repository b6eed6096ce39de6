"""CLIP metrics of personalised images (paper section 5, following Textual Inversion's evaluation).

- prompt similarity: cosine between the CLIP embedding of a generated image and of its prompt with the
  placeholder removed ("S* on a beach" -> "on a beach"): does the image follow the rest of the prompt.
- identity similarity: cosine between the CLIP embeddings of a generated image and of the single input
  image: does it show the concept.

The metrics CLIP is `base.metrics_clip` (ViT-B-16 for sd15, the separately trained toy metrics CLIP for
toy), never the encoder's backbone CLIP, so the judge is not the student. A method's mean comes with a 95%
bootstrap interval over concepts (`concept_interval`): the samples of one concept share its personalisation, so
they are not independent draws, and the concepts are what a new user would bring.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from components.model.base import Clip
from components.model.placeholder import PLACEHOLDER


def strip_placeholder(prompt: str) -> str:
    """The prompt without S* (and the doubled space it leaves)."""
    return re.sub(r"\s+", " ", prompt.replace(PLACEHOLDER, " ")).strip()


def _pil(images: list) -> list[Image.Image]:
    return [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]


@dataclass
class Scores:
    """Per-image similarities, aligned with the images scored."""

    identity: np.ndarray
    prompt: np.ndarray


class ClipMetrics:
    def __init__(self, clip: Clip):
        self.clip = clip

    def identity(self, images: list, reference) -> np.ndarray:
        """Cosine of each image to the reference (input) image."""
        embedded = self.clip.encode_images(_pil(images))
        ref = self.clip.encode_images(_pil([reference]))
        return (embedded @ ref.T)[:, 0].numpy().astype(np.float64)

    def prompt(self, images: list, prompts: list[str]) -> np.ndarray:
        """Cosine of image i to prompt i with the placeholder removed."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        embedded = self.clip.encode_images(_pil(images))
        texts = self.clip.encode_texts([strip_placeholder(p) for p in prompts])
        return (embedded * texts).sum(-1).numpy().astype(np.float64)

    def score(self, images: list, prompts: list[str], reference) -> Scores:
        return Scores(self.identity(images, reference), self.prompt(images, prompts))


def mean_ci(values) -> tuple[float, float]:
    """(mean, half-width of the 95% confidence interval of the mean); Student t for small samples."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) == 1:
        return float(x[0]), 0.0
    return float(x.mean()), float(t_quantile_975(len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


SIMILARITY_RANGE = (-1.0, 1.0)  # both metrics are cosines
BOOTSTRAP_RESAMPLES = 2000
# what the interval is, for every plot's caption and table header that shows one
INTERVAL_NOTE = (f"95% bootstrap interval over concepts ({BOOTSTRAP_RESAMPLES} resamples of the concepts, "
                 "clipped to the cosine's range [-1, 1]); a method scored on one concept has none")


def concept_interval(values, concepts, bounds: tuple[float, float] = SIMILARITY_RANGE,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean over all samples and its 95% percentile-bootstrap interval, resampling whole
    concepts with replacement (each resample's mean over all samples of the concepts drawn). A percentile interval
    stays within the concepts' means, so two concepts cannot give [-1.6, 2.0] as a Student t over a handful of
    correlated samples did; it is clipped to `bounds` all the same. One concept: no spread to resample, so
    low = high = mean. Seeded: the same scores give the same interval."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    names, index = np.unique(np.asarray(concepts), return_inverse=True)
    mean = float(x.mean())
    if len(names) < 2:
        return mean, mean, mean
    sums, counts = np.bincount(index, weights=x), np.bincount(index).astype(np.float64)
    drawn = np.random.default_rng(seed).integers(0, len(names), size=(resamples, len(names)))
    means = sums[drawn].sum(1) / counts[drawn].sum(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return mean, float(np.clip(min(low, mean), *bounds)), float(np.clip(max(high, mean), *bounds))


def t_quantile_975(df: int) -> float:
    """Student t 0.975 quantile by the Cornish-Fisher expansion (within 1% for df >= 3; scipy not needed)."""
    z = 1.959963984540054
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))
