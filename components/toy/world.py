"""The toy world: deterministic 64x64 renders of coloured, patterned shapes with captions.

It stands in for ImageNet + Open Images (and for the web data behind the base model) on machines
that cannot download anything. Everything is a pure function of (seed, index), so the same seed gives
the same bytes. `write_toy_world` lays the renders out in the real sources' on-disk formats so the
real ingestion code (components/data/prepare.py) is what reads them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from components.errors import UserError


# --- vocabulary (names are part of the interface: captions, prompts, metrics use them) ----------
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 215, 40),
    "green": (50, 170, 70),
    "cyan": (40, 190, 210),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (240, 120, 180),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "brown": (130, 80, 40),
}
SHAPES = ["circle", "square", "triangle", "star", "heart", "cross",
          "ring", "diamond", "hexagon", "crescent", "arrow", "pentagon"]
PLURALS = {"cross": "crosses"}
PATTERNS = ["solid", "striped", "dotted", "checkered"]
BACKGROUNDS = ["plain", "beach", "grass", "night"]
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.28, 0.28), "top": (0.5, 0.28), "top right": (0.72, 0.28),
    "left": (0.28, 0.5), "center": (0.5, 0.5), "right": (0.72, 0.5),
    "bottom left": (0.28, 0.72), "bottom": (0.5, 0.72), "bottom right": (0.72, 0.72),
}
SIZES: dict[str, float] = {"small": 0.15, "medium": 0.23, "large": 0.32}  # radius / image side
STYLES = ["plain", "sketch", "pixel art"]

SKY, SAND, NIGHT = (135, 200, 235), (225, 195, 135), (15, 18, 45)
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased, still deterministic


@dataclass(frozen=True)
class ToyConcept:
    """One object instance: what a user's single photo shows."""

    shape: str
    colour: str
    pattern: str = "solid"
    pattern_colour: str = "white"

    @property
    def key(self) -> str:
        return f"{self.colour}-{self.pattern}-{self.pattern_colour}-{self.shape}"

    def phrase(self, size: str = "medium", count: int = 1) -> str:
        """Noun phrase: 'a large red striped star' / 'two red stars' (pattern colour is unsaid)."""
        noun = PLURALS.get(self.shape, self.shape + "s") if count > 1 else self.shape
        words = [size] if size != "medium" else []
        words.append(self.colour)
        if self.pattern != "solid":
            words.append(self.pattern)
        words.append(noun)
        return ("two" if count > 1 else article(words[0])) + " " + " ".join(words)


@dataclass(frozen=True)
class Scene:
    concept: ToyConcept
    background: str = "plain"
    background_colour: str = "gray"
    position: str = "center"
    size: str = "medium"
    count: int = 1
    style: str = "plain"

    def caption(self, subject: str | None = None) -> str:
        """Caption of the scene; `subject` replaces the object phrase (e.g. 'S*' for prompts)."""
        text = subject if subject is not None else self.concept.phrase(self.size, self.count)
        if subject is not None and self.count > 1:
            text = f"two {subject}"
        return self._framed(text)

    def template(self) -> str:
        """The caption with `{}` where the object's look (colour, pattern, shape) goes and everything else still
        named: count, size, style, position and background ('a large {} at the top left on a blue background').
        A placeholder put there in pre-training or tuning prompts has only the object to carry."""
        size = "" if self.size == "medium" else f"{self.size} "
        if self.count > 1:
            subject = f"two {size}{{}}"
        else:
            subject = f"{article(size)} {size}{{}}" if size else "{}"
        return self._framed(subject)

    def _framed(self, text: str) -> str:
        """`text` (the object phrase) with the scene's style, position and background."""
        if self.style == "sketch":
            text = f"a sketch of {text}"
        elif self.style == "pixel art":
            text = f"pixel art of {text}"
        if self.position != "center":
            text += f" at the {self.position}"
        return text + " " + background_phrase(self.background, self.background_colour)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def background_phrase(kind: str, colour: str) -> str:
    return {"plain": f"on {article(colour)} {colour} background", "beach": "on a beach",
            "grass": "on grass", "night": "at night"}[kind]


# --- sampling -------------------------------------------------------------------------------------
def combo_held_out(shape: str, colour: str, background_colour: str, fraction: float) -> bool:
    """Stable hash split of (shape, colour, background colour): the base model never sees these."""
    digest = hashlib.sha256(f"{shape}|{colour}|{background_colour}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def sample_concept(rng: random.Random, shapes: list[str] | None = None) -> ToyConcept:
    colour = rng.choice(list(COLOURS))
    pattern = rng.choices(PATTERNS, weights=[4, 2, 2, 2])[0]
    pattern_colour = rng.choice([c for c in COLOURS if c != colour])
    return ToyConcept(rng.choice(shapes or SHAPES), colour, pattern, pattern_colour)


def sample_scene(rng: random.Random, concept: ToyConcept | None = None,
                 shapes: list[str] | None = None, edits: bool = True) -> Scene:
    """A random scene; `edits=False` gives the canonical view (centred, medium, plain style)."""
    concept = concept or sample_concept(rng, shapes)
    background = rng.choices(BACKGROUNDS, weights=[55, 15, 15, 15])[0]
    clash = {"grass": "green", "night": "black", "beach": "yellow"}.get(background)
    if concept.colour == clash:  # keep the object visible against textured backgrounds
        background = "plain"
    background_colour = rng.choice([c for c in COLOURS if c not in (concept.colour, concept.pattern_colour)])
    if not edits:
        return Scene(concept, background, background_colour)
    count = 2 if rng.random() < 0.12 else 1
    position = "center" if count > 1 or rng.random() < 0.6 else rng.choice(
        [p for p in POSITIONS if p != "center"])
    size = rng.choices(list(SIZES), weights=[1, 2, 1])[0]
    if count > 1 and size == "large":
        size = "medium"
    style = rng.choices(STYLES, weights=[8, 1, 1])[0]
    return Scene(concept, background, background_colour, position, size, count, style)


# --- rendering ------------------------------------------------------------------------------------
def _polygon(cx: float, cy: float, r: float, n: int, phase: float = -math.pi / 2,
             inner: float | None = None) -> list[tuple[float, float]]:
    points = []
    steps = n * 2 if inner else n
    for i in range(steps):
        radius = r if (inner is None or i % 2 == 0) else r * inner
        a = phase + 2 * math.pi * i / steps
        points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return points


def shape_mask(shape: str, cx: float, cy: float, r: float, side: int) -> Image.Image:
    """Binary mask ('L') of one shape centred at (cx, cy) with radius r, on a side x side canvas."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        h = r * 0.82
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r * 1.05, 3), fill=255)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy + r * 0.08, r * 1.05, 5, inner=0.45), fill=255)
    elif shape == "heart":
        pts = []
        for i in range(72):
            t = 2 * math.pi * i / 72
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + x * r / 16.5, cy - y * r / 16.5 - r * 0.05))
        draw.polygon(pts, fill=255)
    elif shape == "cross":
        w = r * 0.34
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        h = r * 0.55
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=0)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.68, cy), (cx, cy + r), (cx - r * 0.68, cy)], fill=255)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, phase=0.0), fill=255)
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        o = r * 0.45
        draw.ellipse([cx - r + o, cy - r - o * 0.3, cx + r + o, cy + r - o * 0.3], fill=0)
    elif shape == "arrow":
        w = r * 0.3
        draw.rectangle([cx - r, cy - w, cx + r * 0.1, cy + w], fill=255)
        draw.polygon([(cx + r, cy), (cx + r * 0.05, cy - r * 0.75), (cx + r * 0.05, cy + r * 0.75)], fill=255)
    elif shape == "pentagon":
        draw.polygon(_polygon(cx, cy + r * 0.05, r, 5), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return mask


def _pattern_mask(pattern: str, side: int, period: int) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side]
    if pattern == "solid":
        return np.zeros((side, side), bool)
    if pattern == "striped":
        return ((xx + yy) // (period // 2)) % 2 == 1
    if pattern == "dotted":
        cx = (xx % period) - period / 2
        cy = (yy % period) - period / 2
        return cx * cx + cy * cy < (period * 0.28) ** 2
    if pattern == "checkered":
        return ((xx // (period // 2)) + (yy // (period // 2))) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")


def _background(kind: str, colour: str, side: int, rng: np.random.Generator) -> np.ndarray:
    img = np.empty((side, side, 3), np.float32)
    if kind == "plain":
        img[:] = COLOURS[colour]
    elif kind == "beach":
        horizon = int(side * 0.55)
        img[:horizon] = SKY
        img[horizon:] = SAND
        img[horizon:] += rng.normal(0, 6, (side - horizon, side, 1)).astype(np.float32)
    elif kind == "grass":
        img[:] = COLOURS["green"]
        img += rng.normal(0, 14, (side, side, 1)).astype(np.float32) * np.array([0.6, 1.0, 0.5], np.float32)
    elif kind == "night":
        img[:] = NIGHT
        stars = rng.random((side, side)) < 0.004
        img[stars] = (250, 250, 220)
    else:
        raise ValueError(f"unknown background {kind!r}; known: {', '.join(BACKGROUNDS)}")
    return img


def render(scene: Scene, side: int = 64, seed: int = 0) -> Image.Image:
    """Render one scene as an RGB image. Deterministic in (scene, side, seed)."""
    big = side * SUPERSAMPLE
    rng = np.random.default_rng(seed)
    canvas = _background(scene.background, scene.background_colour, big, rng)
    r = SIZES[scene.size] * big
    centres = ([(0.3, 0.5), (0.7, 0.5)] if scene.count > 1 else [POSITIONS[scene.position]])
    if scene.count > 1:
        r *= 0.8
    mask = np.zeros((big, big), bool)
    for fx, fy in centres:
        mask |= np.asarray(shape_mask(scene.concept.shape, fx * big, fy * big, r, big)) > 127
    if scene.style == "sketch":  # outline only: the mask minus its erosion
        eroded = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(2 * SUPERSAMPLE + 1))
        mask &= ~(np.asarray(eroded) > 127)
    pattern = _pattern_mask(scene.concept.pattern, big, period=6 * SUPERSAMPLE)
    canvas[mask] = COLOURS[scene.concept.colour]
    if scene.style != "sketch":
        canvas[mask & pattern] = COLOURS[scene.concept.pattern_colour]
    image = Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), "RGB")
    image = image.resize((side, side), Image.Resampling.BOX)
    if scene.style == "pixel art":  # blocky: 16x16 cells
        image = image.resize((16, 16), Image.Resampling.BOX).resize((side, side), Image.Resampling.NEAREST)
    return image


def render_group(scenes: list[tuple[Scene, tuple[float, float, float, float]]], width: int, height: int,
                 background: str, background_colour: str, seed: int) -> Image.Image:
    """An Open-Images-style scene: several objects, each in its box (x0, x1, y0, y1 normalised)."""
    rng = np.random.default_rng(seed)
    canvas = _background(background, background_colour, max(width, height) * SUPERSAMPLE, rng)
    canvas = canvas[: height * SUPERSAMPLE, : width * SUPERSAMPLE].copy()
    for scene, (x0, x1, y0, y1) in scenes:
        w, h = (x1 - x0) * width * SUPERSAMPLE, (y1 - y0) * height * SUPERSAMPLE
        cx, cy = (x0 + x1) / 2 * width * SUPERSAMPLE, (y0 + y1) / 2 * height * SUPERSAMPLE
        side = max(canvas.shape[:2])
        mask = np.asarray(shape_mask(scene.concept.shape, cx, cy, min(w, h) / 2, side))
        m = mask[: canvas.shape[0], : canvas.shape[1]] > 127
        pattern = _pattern_mask(scene.concept.pattern, side, 6 * SUPERSAMPLE)[: canvas.shape[0], : canvas.shape[1]]
        canvas[m] = COLOURS[scene.concept.colour]
        canvas[m & pattern] = COLOURS[scene.concept.pattern_colour]
    image = Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), "RGB")
    return image.resize((width, height), Image.Resampling.BOX)


# --- datasets in memory (bootstrap, metrics) ------------------------------------------------------
def scenes_for_training(n: int, seed: int, holdout_fraction: float = 0.0,
                        shapes: list[str] | None = None) -> list[Scene]:
    """n random scenes; plain-background (shape, colour, background) combos held out if asked."""
    rng = random.Random(seed)
    out: list[Scene] = []
    while len(out) < n:
        scene = sample_scene(rng, shapes=shapes)
        if holdout_fraction and scene.background == "plain" and combo_held_out(
                scene.concept.shape, scene.concept.colour, scene.background_colour, holdout_fraction):
            continue
        out.append(scene)
    return out


def held_out_combos(fraction: float) -> list[tuple[str, str, str]]:
    """All (shape, colour, background colour) combos the base model was never trained on."""
    return [(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS
            if b != c and combo_held_out(s, c, b, fraction)]


def render_batch(scenes: list[Scene], side: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 array (N, side, side, 3); image i is rendered with seed (seed, i)."""
    return np.stack([np.asarray(render(s, side, seed * 1_000_003 + i)) for i, s in enumerate(scenes)])


# --- on-disk formats of the real sources ---------------------------------------------------------
def synset_id(shape: str) -> str:
    return f"n9{SHAPES.index(shape):07d}"


def label_mid(shape: str) -> str:
    return f"/m/0toy{SHAPES.index(shape):02d}"


def _jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, subsampling=0)  # PIL's JPEG encoder is deterministic
    return buf.getvalue()


def write_toy_world(out: str | os.PathLike, n: int, seed: int = 0, scene_fraction: float = 0.25) -> dict:
    """Write n single-object images (ImageNet layout) plus n*scene_fraction multi-object scenes
    (Open Images layout) under `out`. Written to a temp dir and renamed, so a crash never leaves a
    half-written world that looks complete."""
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise UserError(f"--n must be a positive integer, got {n!r}")
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    try:
        if tmp.exists():
            _rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"cannot write the toy world to {out}: {e.strerror}") from None
    rng = random.Random(seed)

    imagenet = tmp / "imagenet"
    (imagenet / "train").mkdir(parents=True)
    with open(imagenet / "LOC_synset_mapping.txt", "w") as f:
        for shape in SHAPES:
            f.write(f"{synset_id(shape)} {shape}\n")
    captions = []
    for i in range(n):
        scene = sample_scene(rng)
        wnid = synset_id(scene.concept.shape)
        rel = Path("imagenet/train") / wnid / f"{wnid}_{i:06d}.JPEG"
        (tmp / rel).parent.mkdir(exist_ok=True)
        (tmp / rel).write_bytes(_jpeg_bytes(render(scene, 64, seed * 1_000_003 + i)))
        captions.append({"path": str(rel), "source": "imagenet", "source_id": f"{wnid}/{rel.name}",
                         "caption": scene.caption(), "template": scene.template(), **_scene_columns(scene)})

    oi = tmp / "openimages"
    (oi / "train").mkdir(parents=True)
    with open(oi / "oidv7-class-descriptions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["LabelName", "DisplayName"])
        for shape in SHAPES:
            w.writerow([label_mid(shape), shape])
    box_rows = []
    for j in range(max(1, int(n * scene_fraction))):
        image_id = hashlib.sha1(f"{seed}-{j}".encode()).hexdigest()[:16]
        width, height = rng.choice([(128, 96), (96, 128), (112, 112)])
        objects = []
        for _ in range(rng.randint(2, 4)):
            scene = sample_scene(rng, edits=False)
            bw = rng.uniform(0.2, 0.5)
            bh = bw * width / height
            x0, y0 = rng.uniform(0, 1 - bw), rng.uniform(0, max(0.0, 1 - bh))
            box = (x0, x0 + bw, y0, min(1.0, y0 + bh))
            objects.append((scene, box))
            is_group = rng.random() < 0.05
            box_rows.append([image_id, "toy", label_mid(scene.concept.shape), 1,
                             *(f"{v:.6f}" for v in box), 0, 0, int(is_group), 0, 0])
        bg = objects[0][0]
        image = render_group(objects, width, height, bg.background, bg.background_colour, seed * 7 + j)
        (oi / "train" / f"{image_id}.jpg").write_bytes(_jpeg_bytes(image))
        # no template: prepare crops the largest object, whose surroundings this caption does not describe
        captions.append({"path": f"openimages/train/{image_id}.jpg", "source": "openimages", "source_id": image_id,
                         "caption": " and ".join(s.concept.phrase() for s, _ in objects), "template": "",
                         **_scene_columns(None)})
    with open(oi / "oidv6-train-annotations-bbox.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax",
                    "IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside"])
        w.writerows(box_rows)

    with open(tmp / "captions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(captions[0]))
        w.writeheader()
        w.writerows(captions)
    summary = {"out": str(out), "images": n, "scenes": max(1, int(n * scene_fraction)),
               "boxes": len(box_rows), "seed": seed}
    (tmp / "toy_world.json").write_text(json.dumps(summary, indent=1) + "\n")
    if out.exists():
        _rmtree(out)
    tmp.rename(out)
    return summary


def _scene_columns(scene: Scene | None) -> dict:
    if scene is None:
        return dict.fromkeys(("shape", "colour", "pattern", "pattern_colour", "background", "background_colour",
                              "position", "size", "count", "style"), "")
    cols = asdict(scene.concept)
    cols.update({k: v for k, v in asdict(scene).items() if k != "concept"})
    return cols


def _rmtree(path: Path) -> None:
    shutil.rmtree(path)


def canonical(concept: ToyConcept, background_colour: str = "gray") -> Scene:
    """The view a user would photograph: centred, medium, plain background."""
    return replace(Scene(concept), background_colour=background_colour)
