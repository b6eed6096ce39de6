"""Toy-palette colours read back from pixels: check-base's colour reader and the plain-background test
behind `caption_plain_backgrounds` (pre-training and tuning prompts that name a plain background).

Kept out of components/toy/world.py, which every data and bootstrap stage depends on: reading renders back
must not make DVC re-render the world and retrain the base.
"""

from __future__ import annotations

import numpy as np

from components.toy.world import COLOURS

_NAMES = list(COLOURS)
_RGB = np.array([COLOURS[c] for c in _NAMES], np.float32)
# a plain background's border ring: mean absolute deviation from its median and distance of the median from
# the palette (0-255 scale). Measured on the prepared toy world: keeps 92% of plain backgrounds after JPEG,
# 9% of grass (a fine texture on palette green), no night (off-palette) or beach, 3% of multi-object scenes
PLAIN_DEVIATION, PALETTE_TOLERANCE = 1.5, 12.0


def nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_RGB - rgb) ** 2).sum(-1)))]


def border_ring(image: np.ndarray, width: int = 3) -> np.ndarray:
    """The (N, 3) float pixels within `width` of the edge of an HxWx3 image."""
    pixels = image.astype(np.float32)
    return np.concatenate([pixels[:width].reshape(-1, 3), pixels[-width:].reshape(-1, 3),
                           pixels[:, :width].reshape(-1, 3), pixels[:, -width:].reshape(-1, 3)])


def plain_background(image: np.ndarray) -> str | None:
    """The palette colour of an HxWx3 image's background (0-255) if its border is one plain colour; None for
    textured backgrounds (beach, grass, night), photos and objects that reach the edge."""
    ring = border_ring(image)
    median = np.median(ring, axis=0)
    colour = nearest_colour(median)
    plain = np.abs(ring - median).mean() < PLAIN_DEVIATION
    return colour if plain and np.linalg.norm(median - COLOURS[colour]) < PALETTE_TOLERANCE else None
