"""Measure the base model on (shape, colour, background) combinations it never saw in training.

Colours are read from pixels against the toy palette (the background from the border ring, the
object from the pixels near the centre that differ from the background); the shape is judged by the
metrics CLIP, which was trained separately from everything it judges. The metrics CLIP itself is
checked zero-shot on fresh renders: for each image, the candidates are its true caption with the
attribute under test swapped for every alternative.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from components.config import Config
from components.model.base import Clip, load_clip, load_pipeline
from components.progress import Progress
from components.runtime import resolve
from components.toy import palette
from components.toy import world as tw

TARGETS = {"background_colour": 0.80, "object_colour": 0.70, "shape": 0.60,
           "zero_shot_colour": 0.90, "zero_shot_shape": 0.90}
_PALETTE_NAMES = list(tw.COLOURS)


def read_colours(image: np.ndarray) -> tuple[str, str | None]:
    """(background colour, object colour) of a uint8 HxWx3 render of a centred object."""
    h, w, _ = image.shape
    pixels = image.astype(np.float32)
    background = np.median(palette.border_ring(image), axis=0)
    yy, xx = np.mgrid[0:h, 0:w]
    near_centre = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.3 * h) ** 2
    differs = np.sqrt(((pixels - background) ** 2).sum(-1)) > 60
    obj = pixels[near_centre & differs]
    obj_colour = palette.nearest_colour(np.median(obj, axis=0)) if len(obj) >= 12 else None
    return palette.nearest_colour(background), obj_colour


def _classify(clip: Clip, images: list, candidates: list[list[str]]) -> list[int]:
    feats = clip.encode_images(images)
    return [int((clip.encode_texts(c) @ f).argmax()) for f, c in zip(feats, candidates)]


def clip_accuracy(clip: Clip, images: list, combos: list[tuple[str, str, str]], attribute: str = "shape") -> list[bool]:
    """Per image: does the metrics CLIP pick the right one of the captions that differ only in the `attribute`
    ("shape": the 12 shapes; "colour": the 12 palette colours), for images of (shape, colour, background) combos."""
    if attribute == "shape":
        swaps = [[tw.ToyConcept(k, colour) for k in tw.SHAPES] for _, colour, _ in combos]
        truth = [tw.SHAPES.index(shape) for shape, _, _ in combos]
    elif attribute == "colour":
        swaps = [[tw.ToyConcept(shape, c) for c in _PALETTE_NAMES] for shape, _, _ in combos]
        truth = [_PALETTE_NAMES.index(colour) for _, colour, _ in combos]
    else:
        raise ValueError(f"unknown attribute {attribute!r}; choose shape or colour")
    candidates = [[tw.Scene(c, background_colour=bg).caption() for c in row] for row, (_, _, bg) in zip(swaps, combos)]
    return [p == t for p, t in zip(_classify(clip, images, candidates), truth)]


def shape_accuracy(clip: Clip, images: list, combos: list[tuple[str, str, str]]) -> float:
    """How often the metrics CLIP picks the right one of the 12 captions that differ only in the shape
    word, for images of (shape, colour, background colour) combos."""
    return float(np.mean(clip_accuracy(clip, images, combos, "shape")))


def zero_shot_accuracy(clip: Clip, scenes: list[tw.Scene], seed: int) -> dict[str, float]:
    images = [tw.render(s, 64, seed * 1_000_003 + i) for i, s in enumerate(scenes)]
    colour_cands = [[replace(s, concept=replace(s.concept, colour=c)).caption() for c in _PALETTE_NAMES] for s in scenes]
    shape_cands = [[replace(s, concept=replace(s.concept, shape=k)).caption() for k in tw.SHAPES] for s in scenes]
    colour_hits = [_PALETTE_NAMES[p] == s.concept.colour for p, s in zip(_classify(clip, images, colour_cands), scenes)]
    shape_hits = [tw.SHAPES[p] == s.concept.shape for p, s in zip(_classify(clip, images, shape_cands), scenes)]
    return {"colour": float(np.mean(colour_hits)), "shape": float(np.mean(shape_hits))}


def check_base(cfg: Config, grid: str | None = None, batch: int = 16) -> dict:
    started = time.perf_counter()
    c = cfg.check_base
    runtime = resolve(cfg.runtime)
    pipe = load_pipeline(cfg.base, runtime)
    clip = load_clip(cfg.base.metrics_clip, runtime.device)
    torch.set_num_threads(cfg.bootstrap.threads)

    combos = tw.held_out_combos(cfg.toy_world.base_holdout_fraction)
    random.Random(c.seed).shuffle(combos)
    combos = combos[: c.prompts]
    prompts = [tw.Scene(tw.ToyConcept(shape, colour), background_colour=bg).caption() for shape, colour, bg in combos]
    images: list[np.ndarray] = []
    progress = Progress("check-base", len(prompts))
    for i in range(0, len(prompts), batch):
        out = pipe(prompts[i:i + batch], num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale,
                   guidance_rescale=c.guidance_rescale, generator=torch.Generator().manual_seed(c.seed + i),
                   output_type="np").images
        images += [np.round(im * 255).astype(np.uint8) for im in out]
        progress.update(len(images))
    read = [read_colours(im) for im in images]
    bg_hits = [r[0] == bg for r, (_, _, bg) in zip(read, combos)]
    obj_hits = [r[1] == colour for r, (_, colour, _) in zip(read, combos)]
    from PIL import Image

    pil = [Image.fromarray(im) for im in images]

    fresh = tw.scenes_for_training(c.fresh_renders, seed=10_000 + c.seed)
    zero_shot = zero_shot_accuracy(clip, fresh, seed=10_000 + c.seed)
    measured = {"background_colour": float(np.mean(bg_hits)), "object_colour": float(np.mean(obj_hits)),
                "shape": shape_accuracy(clip, pil, combos), "zero_shot_colour": zero_shot["colour"],
                "zero_shot_shape": zero_shot["shape"]}
    if grid:
        _save_grid(pil, grid)
    return {
        "held_out_prompts": len(prompts),
        "fresh_renders": len(fresh),
        "measured": measured,
        "targets": TARGETS,
        "passed": all(measured[k] >= v for k, v in TARGETS.items()),
        "generation": {"num_inference_steps": c.num_inference_steps, "guidance_scale": c.guidance_scale,
                       "guidance_rescale": c.guidance_rescale, "scheduler": type(pipe.scheduler).__name__},
        "examples": [{"prompt": p, "read": {"background": r[0], "object": r[1]}} for p, r in zip(prompts[:8], read)],
        "seconds": round(time.perf_counter() - started, 1),
    }


def _save_grid(images: list, path: str, cols: int = 8) -> None:
    from PIL import Image

    rows = (len(images) + cols - 1) // cols
    side = images[0].size[0]
    sheet = Image.new("RGB", (cols * side, rows * side), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * side, (i // cols) * side))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
