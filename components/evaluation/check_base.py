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
from PIL import Image

from components.config import ClipConfig, Config
from components.model.backbone import ClipImageTower
from components.model.base import Clip, load_clip, load_pipeline
from components.progress import Progress
from components.runtime import resolve
from components.toy import reader
from components.toy import world as tw


TARGETS = {"background_colour": 0.80, "object_colour": 0.70, "shape": 0.60,
           "zero_shot_colour": 0.90, "zero_shot_shape": 0.90}
_PALETTE_NAMES = list(tw.COLOURS)


def read_colours(image: np.ndarray) -> tuple[str, str | None]:
    """(background colour, object colour) of a uint8 HxWx3 render of a centred object."""
    h, w, _ = image.shape
    pixels = image.astype(np.float32)
    background = np.median(reader.border_ring(image), axis=0)
    yy, xx = np.mgrid[0:h, 0:w]
    near_centre = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.3 * h) ** 2
    differs = np.sqrt(((pixels - background) ** 2).sum(-1)) > 60
    obj = pixels[near_centre & differs]
    obj_colour = reader.nearest_colour(np.median(obj, axis=0)) if len(obj) >= 12 else None
    return reader.nearest_colour(background), obj_colour


def _classify(clip: Clip, images: list, candidates: list[list[str]]) -> list[int]:
    feats = clip.encode_images(images)
    return [int((clip.encode_texts(c) @ f).argmax()) for f, c in zip(feats, candidates)]


def clip_accuracy(clip: Clip, images: list, combos: list[tuple[str, str, str]],
                  attribute: str = "shape") -> list[bool]:
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
    colour_cands = [[replace(s, concept=replace(s.concept, colour=c)).caption() for c in _PALETTE_NAMES]
                    for s in scenes]
    shape_cands = [[replace(s, concept=replace(s.concept, shape=k)).caption() for k in tw.SHAPES] for s in scenes]
    colour_hits = [_PALETTE_NAMES[p] == s.concept.colour
                   for p, s in zip(_classify(clip, images, colour_cands), scenes)]
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
    pil = [Image.fromarray(im) for im in images]

    fresh = tw.scenes_for_training(c.fresh_renders, seed=10_000 + c.seed)
    zero_shot = zero_shot_accuracy(clip, fresh, seed=10_000 + c.seed)
    measured = {"background_colour": float(np.mean(bg_hits)), "object_colour": float(np.mean(obj_hits)),
                "shape": shape_accuracy(clip, pil, combos), "zero_shot_colour": zero_shot["colour"],
                "zero_shot_shape": zero_shot["shape"]}
    probe = backbone_probe(cfg.base.backbone_clip) if cfg.base.kind == "toy" else None
    if grid:
        _save_grid(pil, grid)
    return {
        "held_out_prompts": len(prompts),
        "fresh_renders": len(fresh),
        "measured": measured,
        "targets": TARGETS,
        "backbone_probe": probe,
        "passed": all(measured[k] >= v for k, v in TARGETS.items()) and (probe is None or probe["passed"]),
        "generation": {"num_inference_steps": c.num_inference_steps, "guidance_scale": c.guidance_scale,
                       "guidance_rescale": c.guidance_rescale, "scheduler": type(pipe.scheduler).__name__},
        "examples": [{"prompt": p, "read": {"background": r[0], "object": r[1]}} for p, r in zip(prompts[:8], read)],
        "seconds": round(time.perf_counter() - started, 1),
    }


# the backbone's features must let a linear read-out tell every colour and shape apart (gated by a test)
PROBE_TARGETS = {"colour": 0.95, "shape": 0.90}


@torch.no_grad()
def backbone_features(visual, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """What the encoder's trunk reads from the backbone CLIP (components/model/backbone.py ClipImageTower): its
    last layer's patch features, mean-pooled (N, C)."""
    tower = ClipImageTower(visual)
    return torch.cat([tower(pixels[i:i + batch]).mean(dim=(2, 3)) for i in range(0, len(pixels), batch)])


def linear_probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 steps: int = 500) -> float:
    """Test accuracy of a multinomial logistic regression (standardised features, small L2) fit on `train`."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    x, x_test = (train - mean) / std, (test - mean) / std
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    with torch.enable_grad():
        head = torch.nn.Linear(x.shape[1], classes)
        optimizer = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

        def loss():
            optimizer.zero_grad()
            value = torch.nn.functional.cross_entropy(head(x), train_labels) + 1e-3 * head.weight.square().sum()
            value.backward()
            return value

        optimizer.step(loss)
    return float((head(x_test).argmax(-1) == test_labels).float().mean())


def backbone_probe(backbone_clip: ClipConfig, train_images: int = 2400, test_images: int = 600, seed: int = 123,
                   ) -> dict:
    """Linear probes of colour and shape on the backbone CLIP's features of fresh renders of one object as a user
    photographs it (centred, any look and background; a seed no bootstrap stage uses), against PROBE_TARGETS."""
    visual = load_clip(backbone_clip).model.visual
    rng = random.Random(seed)
    scenes = [tw.sample_scene(rng, edits=False) for _ in range(train_images + test_images)]
    pixels = torch.from_numpy(tw.render_batch(scenes, 64, seed)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    features = backbone_features(visual, pixels)
    measured = {}
    for attribute, names in (("colour", list(tw.COLOURS)), ("shape", tw.SHAPES)):
        labels = torch.tensor([names.index(getattr(s.concept, attribute)) for s in scenes])
        measured[attribute] = round(linear_probe(features[:train_images], labels[:train_images],
                                                 features[train_images:], labels[train_images:]), 4)
    return {"measured": measured, "targets": PROBE_TARGETS, "train_images": train_images, "test_images": test_images,
            "passed": all(measured[k] >= v for k, v in PROBE_TARGETS.items())}


def _save_grid(images: list, path: str, cols: int = 8) -> None:
    rows = (len(images) + cols - 1) // cols
    side = images[0].size[0]
    sheet = Image.new("RGB", (cols * side, rows * side), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * side, (i // cols) * side))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
