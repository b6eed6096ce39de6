"""Toy-world attributes read back from pixels: palette colours (check-base's colour reader and the plain-background
test behind `caption_plain_backgrounds`: pre-training and tuning prompts that name a plain background) and shapes.

Kept out of components/toy/world.py, which every data and bootstrap stage depends on: reading renders back
must not make DVC re-render the world and retrain the base.
"""

from __future__ import annotations

import numpy as np

from components.toy.world import COLOURS, SHAPES, shape_mask

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


# radii (x side) of the shape outlines read_shape tries: the toy world's small to large objects, and between
_READ_RADII = (0.15, 0.19, 0.23, 0.27, 0.32)
_SUPERSAMPLED = 4  # outlines drawn at 4x and averaged down, as the world renders them


def _outlines(side: int) -> dict[str, np.ndarray]:
    """(len(_READ_RADII), side, side) soft masks per shape, centred (cached per side)."""
    if side not in _OUTLINES:
        big, centre = side * _SUPERSAMPLED, side * _SUPERSAMPLED / 2
        _OUTLINES[side] = {shape: np.stack([
            np.asarray(shape_mask(shape, centre, centre, r * big, big), np.float32)
            .reshape(side, _SUPERSAMPLED, side, _SUPERSAMPLED).mean((1, 3)) / 255 for r in _READ_RADII])
            for shape in SHAPES}
    return _OUTLINES[side]


_OUTLINES: dict[int, dict[str, np.ndarray]] = {}


def read_shape(image: np.ndarray, threshold: float = 60.0) -> str | None:
    """The toy shape whose outline best matches (IoU, over sizes, centred on the object) the pixels of an HxWx3
    image (0-255) that differ from its border's median by more than `threshold`; None when nothing does.
    A pattern in another colour than the background counts as object, so patterned objects read whole."""
    h, w, _ = image.shape
    background = np.median(border_ring(image), axis=0)
    obj = (np.sqrt(((image.astype(np.float32) - background) ** 2).sum(-1)) > threshold).astype(np.float32)
    if obj.sum() < 12 or h != w:
        return None
    ys, xs = np.nonzero(obj)
    # shift the object's bounding-box centre to the image centre (the outlines are centred)
    dy, dx = int(round(h / 2 - (ys.min() + ys.max() + 1) / 2)), int(round(w / 2 - (xs.min() + xs.max() + 1) / 2))
    obj = np.roll(obj, (dy, dx), axis=(0, 1))
    best, best_iou = None, -1.0
    for shape, masks in _outlines(h).items():
        inter = (masks * obj).sum((1, 2))
        iou = float((inter / (masks.sum((1, 2)) + obj.sum() - inter)).max())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best
