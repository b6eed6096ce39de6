"""The toy world read back from pixels: palette colours, shapes, and a whole scene's caption template.

- `plain_background`, `read_shape`: check-base's and identity_stages' readers of a generated image.
- `describe`: what a photo shows besides the object (background, count, size, position, style) as a caption
  template, 'a large {} at the top left on a blue background': the pre-training prompt of an image without a
  caption and the tuning prompt of a user's photo (`describe_scene`), so S* is left with the object alone.

Kept out of components/toy/world.py, which every data and bootstrap stage depends on: reading renders back
must not make DVC re-render the world and retrain the base.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from components.toy import world as tw
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


OBJECT_COLOUR_SHARE = 0.25  # a colour is the object's when it covers this much of it (a striped object: two of ~50%)


def object_colours(image: np.ndarray, threshold: float = 60.0) -> dict[str, float]:
    """The palette colours of the object near the centre of an HxWx3 image (0-255), by their share of its pixels:
    the pixels within 0.3 of the side from the centre that differ from the border's median by more than
    `threshold`, each counted as its nearest palette colour when it lies within `threshold` of one (blended edges
    count for none). A patterned object shows both of its colours; {} when there is no object."""
    h, w, _ = image.shape
    pixels = image.astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    near_centre = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.3 * h) ** 2
    obj = pixels[near_centre & (np.linalg.norm(pixels - np.median(border_ring(image), axis=0), axis=-1) > threshold)]
    if len(obj) < 12:
        return {}
    distances = np.linalg.norm(obj[:, None] - _RGB[None], axis=-1)
    nearest = distances.argmin(1)[distances.min(1) < threshold]
    counts = np.bincount(nearest, minlength=len(_NAMES)) / len(obj)
    return {_NAMES[i]: float(counts[i]) for i in np.argsort(-counts) if counts[i] > 0}


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
    return _match(obj)[0]


def _match(obj: np.ndarray) -> tuple[str, float]:
    """(shape, radius / side) of the outline that best matches a square object mask (IoU, centred on the object)."""
    h, w = obj.shape
    ys, xs = np.nonzero(obj)
    # shift the object's bounding-box centre to the image centre (the outlines are centred)
    dy, dx = int(round(h / 2 - (ys.min() + ys.max() + 1) / 2)), int(round(w / 2 - (xs.min() + xs.max() + 1) / 2))
    obj = np.roll(obj.astype(np.float32), (dy, dx), axis=(0, 1))
    best, best_iou = (SHAPES[0], _READ_RADII[0]), -1.0
    for shape, masks in _outlines(h).items():
        inter = (masks * obj).sum((1, 2))
        iou = inter / (masks.sum((1, 2)) + obj.sum() - inter)
        if float(iou.max()) > best_iou:
            best, best_iou = (shape, _READ_RADII[int(iou.argmax())]), float(iou.max())
    return best


# --- whole scenes -----------------------------------------------------------------------------------
OBJECT_DISTANCE = 60.0  # a pixel this far (RGB, 0-255) from the background is object, as read_shape's threshold
TEXTURE_TOLERANCE = 30.0  # a textured background's median within this of its colour (grass, night, beach halves)
MIN_OBJECT_PIXELS = 12  # smaller blobs are noise (a night sky's stars, JPEG ringing)
# pixel art is drawn in 4x4-pixel cells at 64 px: its variance within aligned cells is a small fraction of that
# within cells shifted by half a cell (measured on JPEG renders: pixel art <= 0.23, other styles >= 0.65 but 1%)
# and no aligned cell is far from uniform (JPEG ringing keeps every pixel-art cell's spread under 30; the anti-aliased
# edges of other styles leave some cell over it in 95% of renders)
PIXEL_ART_CELL, PIXEL_ART_RATIO, PIXEL_ART_CELL_STD = 4, 0.4, 30.0
SKETCH_ERODED = 0.2


def read_background(image: np.ndarray) -> tuple[str, str] | None:
    """(kind, colour) of the toy background an HxWx3 image shows, as Scene.background / background_colour (the colour
    only matters for plain ones); None when it is none of them (a photo, an object over most of the border)."""
    ring = border_ring(image)
    # plain: most of the border within a JPEG's error of one palette colour (an object may cover the rest); grass,
    # a fine texture on palette green, strays further (median 3.5-5 against 1-1.5 for plain, measured after JPEG)
    distances = np.linalg.norm(ring[:, None] - _RGB[None], axis=-1)  # (pixels, colours)
    share = (distances < 4).mean(0)
    if share.max() >= 0.5 and np.median(distances.min(1)) < 2.5:
        return "plain", _NAMES[int(share.argmax())]
    def near(pixels, rgb):
        return np.linalg.norm(np.median(pixels.reshape(-1, 3).astype(np.float32), 0) - rgb) < TEXTURE_TOLERANCE
    h = image.shape[0]
    horizon = int(h * 0.55)
    if near(image[:3], tw.SKY) and near(image[-3:], tw.SAND):
        return "beach", "gray"
    if near(ring, tw.NIGHT):
        return "night", "gray"
    if near(ring, COLOURS["green"]) and not near(image[horizon:horizon + 3], tw.SAND):
        return "grass", "gray"
    return None


def _background_pixels(image: np.ndarray, kind: str, colour: str) -> np.ndarray:
    """The background each pixel would have without the object (HxWx3 float)."""
    h, w, _ = image.shape
    if kind == "beach":
        sky = (np.arange(h) + 0.5 < h * 0.55).astype(np.float32)[:, None, None]
        return np.broadcast_to(sky * np.array(tw.SKY, np.float32) + (1 - sky) * np.array(tw.SAND, np.float32),
                               image.shape)
    rgb = {"plain": COLOURS[colour], "night": tw.NIGHT, "grass": COLOURS["green"]}[kind]
    return np.broadcast_to(np.array(rgb, np.float32), image.shape)


def _unit_extent(shape: str) -> tuple[float, float]:
    """(height, width) of `shape`'s bounding box at radius 1 (cached)."""
    if shape not in _EXTENTS:
        side, r = 512, 160
        ys, xs = np.nonzero(np.asarray(shape_mask(shape, side / 2, side / 2, r, side)) > 127)
        _EXTENTS[shape] = ((ys.max() - ys.min() + 1) / r, (xs.max() - xs.min() + 1) / r)
    return _EXTENTS[shape]


_EXTENTS: dict[str, tuple[float, float]] = {}


def _radius(mask: np.ndarray, shape: str) -> float:
    """The radius / side of a filled object mask read as `shape`: its bounding box over the shape's at radius 1."""
    ys, xs = np.nonzero(mask)
    height, width = _unit_extent(shape)
    return ((ys.max() - ys.min() + 1) / height + (xs.max() - xs.min() + 1) / width) / 2 / mask.shape[0]


def _nearest(value: float, options: dict[str, float]) -> str:
    return min(options, key=lambda k: abs(np.log(options[k] / value)))


def _pixel_art(image: np.ndarray) -> bool:
    def cells(offset: int) -> np.ndarray:
        c = PIXEL_ART_CELL
        n = (min(image.shape[:2]) - offset) // c - 1
        return image.astype(np.float32)[offset:offset + n * c, offset:offset + n * c].reshape(n, c, n, c, 3)

    aligned = cells(0)
    def variance(x):
        return float(((x - x.mean(axis=(1, 3), keepdims=True)) ** 2).mean())
    uneven = (aligned.std(axis=(1, 3)).max(-1) > PIXEL_ART_CELL_STD).mean()
    return uneven < 0.005 and variance(aligned) < PIXEL_ART_RATIO * variance(cells(PIXEL_ART_CELL // 2))


def read_scene(image: np.ndarray) -> tw.Scene | None:
    """The scene an HxWx3 image (0-255) shows, but for the object's look (the returned concept is a stand-in):
    background, count, size, position and style; None when the background or the object cannot be read."""
    h, w, _ = image.shape
    background = read_background(image) if h == w else None
    if background is None:
        return None
    kind, colour = background
    style = "pixel art" if _pixel_art(image) else "plain"
    distance = np.linalg.norm(image.astype(np.float32) - _background_pixels(image, kind, colour), axis=-1)
    mask = distance > OBJECT_DISTANCE
    blobs = _blobs(mask)
    if len(blobs) > 2:  # an outline (sketch) that anti-aliasing broke into pieces: close its gaps
        blobs = _blobs(ndimage.binary_closing(mask, structure=np.ones((3, 3))))
    if not blobs or len(blobs) > 2:
        return None
    count, first = len(blobs), blobs[0]
    filled = ndimage.binary_fill_holes(ndimage.binary_closing(first, structure=np.ones((3, 3))) | first)
    ys, xs = np.nonzero(filled)
    if style == "pixel art" and filled.sum() >= 0.95 * (np.ptp(ys) + 1) * (np.ptp(xs) + 1):
        style = "plain"  # an upright rectangle has only grid-aligned edges in every style: say the common one
    # an outline is one or two pixels thick: one erosion leaves at most 13% of it, of a filled object 30% or more
    # (95% of them; measured after JPEG)
    closed = ndimage.binary_closing(mask, structure=np.ones((3, 3))) | mask  # stripes' blended edges read as holes
    if style == "plain" and (ndimage.binary_erosion(closed, structure=np.ones((3, 3))).sum()
                             < SKETCH_ERODED * closed.sum()):
        style = "sketch"
    radius = _radius(filled, _match(filled)[0])
    if count > 1:
        radius /= 0.8  # two objects are drawn at 0.8 of their size (world.render)
    size = _nearest(radius, tw.SIZES)
    if count > 1 and size == "large":
        size = "medium"
    position = "center"
    if count == 1:
        ys, xs = np.nonzero(first)
        centre = ((xs.min() + xs.max() + 1) / 2 / w, (ys.min() + ys.max() + 1) / 2 / h)
        position = min(tw.POSITIONS, key=lambda p: np.hypot(*np.subtract(tw.POSITIONS[p], centre)))
    return tw.Scene(tw.ToyConcept("circle", "red"), kind, colour, position, size, count, style)


def _blobs(mask: np.ndarray) -> list[np.ndarray]:
    """The masks of the object-sized connected parts of `mask`, largest first."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return []
    areas = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    return [labels == i + 1 for i in np.argsort(-areas) if areas[i] >= max(MIN_OBJECT_PIXELS, 0.3 * areas.max())]


def describe(image: np.ndarray) -> str | None:
    """The caption template of what an HxWx3 image shows besides the object ('a large {} on grass'), or None."""
    scene = read_scene(image)
    return None if scene is None else scene.template()
