"""Where is a concept's identity lost? Colour, shape and background accuracy of personalised images, stage by stage,
on the evaluation concepts and on freshly drawn unseen looks, in one table.

    .venv/bin/python benchmarks/identity_stages.py                       # default: 8 + 8 concepts x 4 prompts, every row
    .venv/bin/python benchmarks/identity_stages.py --quick               # 2 + 2 concepts, the main stages (tests)
    .venv/bin/python benchmarks/identity_stages.py --set personalize.l2_weight=0 --out outputs/identity_stages/l2-0

Rows (stages), each on the same inputs, prompts and seeds:
- `renders`: the readers on the toy world's own renders of the concept on each prompt's background (how far the
  readers themselves can be trusted);
- `ceiling`: the base told the concept in words where S* was ("a green dotted crescent on a blue background"), at
  the personalisation sampler settings, and `ceiling (check-base)` at check-base's (guidance 4, rescaled);
- `oracle`: v* = the mean embedding of the concept's true words, no hypernetwork, no tuning; `oracle +N` tunes
  that v* alone for the default N steps;
- `encoder 0` / `encoder N` / `encoder 50`: the encoder's prediction alone, after the default N tuning steps, after 50;
- generation settings at N steps: `blend 1` / `blend 0` (generation blend), `guidance 4`, `dpm` (sampler).
`--set SECTION.KEY=VALUE` overrides the toy config (VALUE as YAML) for every row; `--rows` picks rows.

Prompts: four plain backgrounds per concept ("S* on a blue background"), none of the object's colours. Readings:
pixel colour and background (components.evaluation.check_base.read_colours), pixel shape
(components.toy.palette.read_shape: the best-matching shape outline), and the metrics CLIP zero-shot: colour and
shape each chosen among the captions differing only in that word. Each cell: accuracy and its 95% Wilson interval,
and in the JSON what a wrong pixel colour read as (`colour_read_as`: the pattern colour, the prompted background,
the input photo's background, another colour).
Concepts: `evaluate.concepts` (held out of pre-training) and fresh looks of the shapes pre-training never saw
(`toy_world.encoder_holdout_shapes`), colours and pattern drawn at random (`--fresh-seed`), none an evaluation
concept. Writes identity_stages.json and identity_stages.md under --out (default outputs/identity_stages).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.config import load_config, parse_overrides  # noqa: E402
from components.data.images import to_pixels  # noqa: E402
from components.evaluation.check_base import clip_accuracy, read_colours  # noqa: E402
from components.evaluation.eval_set import background_for, parse_concept  # noqa: E402
from components.inference.engine import Personalizer  # noqa: E402
from components.inference.generate import Sampling, generate  # noqa: E402
from components.inference.tuning import Concept, TuningRecipe, predict_concept, tune  # noqa: E402
from components.model.base import load_clip  # noqa: E402
from components.toy import palette  # noqa: E402
from components.toy import world as tw  # noqa: E402

# prompt backgrounds, in order of preference; each concept takes the first four its colours leave free
BACKGROUNDS = ["blue", "green", "white", "black", "yellow", "gray", "pink", "orange"]
PROMPTS_PER_CONCEPT = 4


@dataclass(frozen=True)
class Row:
    name: str
    start: str  # "words" (the ceiling), "render", "oracle" or "encoder"
    steps: int = 0
    blend: float | None = None  # generation blend; None: the config's
    guidance: float | None = None
    rescale: float | None = None
    scheduler: str | None = None


def rows(steps: int, sampling_guidance: float, check_base) -> dict[str, Row]:
    made = [Row("renders", "render"),
            Row("ceiling", "words"),
            Row("ceiling (check-base)", "words", guidance=check_base.guidance_scale, rescale=check_base.guidance_rescale),
            Row("oracle", "oracle"),
            Row(f"oracle +{steps}", "oracle", steps),
            Row("encoder 0", "encoder", 0),
            Row(f"encoder {steps}", "encoder", steps),
            Row("encoder 50", "encoder", 50),
            Row(f"encoder {steps} blend 1", "encoder", steps, blend=1.0),
            Row(f"encoder {steps} blend 0", "encoder", steps, blend=0.0),
            Row(f"encoder {steps} guidance 4", "encoder", steps, guidance=4.0)
            if sampling_guidance != 4.0 else Row(f"encoder {steps} guidance 1.5", "encoder", steps, guidance=1.5),
            Row(f"encoder {steps} dpm", "encoder", steps, scheduler="dpm")]
    return {row.name: row for row in made}


def fresh_concepts(n: int, seed: int, shapes: list[str], exclude: set[str]) -> list[tw.ToyConcept]:
    """n distinct looks of `shapes` (colour, pattern, pattern colour at random), none with a key in `exclude`."""
    rng, found = random.Random(seed), {}
    while len(found) < n:
        concept = tw.sample_concept(rng, shapes)
        if concept.key not in exclude:
            found.setdefault(concept.key, concept)
    return list(found.values())


def prompt_backgrounds(concept: tw.ToyConcept) -> list[str]:
    return [c for c in BACKGROUNDS if c not in (concept.colour, concept.pattern_colour)][:PROMPTS_PER_CONCEPT]


def words(concept: tw.ToyConcept) -> str:
    """The concept's true words without article: 'green dotted crescent'."""
    return concept.phrase().split(" ", 1)[1]


def oracle_v_star(personalizer: Personalizer, concept: tw.ToyConcept) -> torch.Tensor:
    """(1, D): the mean input embedding of the concept's true words (one token cannot hold several words)."""
    prompts = personalizer.base.prompts
    ids = prompts.tokenizer(words(concept), add_special_tokens=False).input_ids
    return prompts.token_table.detach()[ids].mean(0, keepdim=True)


def wilson(hits: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return math.nan, math.nan
    z, p = 1.959963984540054, hits / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return round(centre - half, 3), round(centre + half, 3)


READINGS = ("colour_pixel", "colour_clip", "shape_pixel", "shape_clip", "background_pixel")


def colour_read_as(seen: str | None, concept: tw.ToyConcept, background: str) -> str:
    """What the pixel reading of the object's colour matched: the concept's colour ("right"), its pattern colour,
    the prompted background, the input photo's background (the tuning caption's), another colour, or none."""
    for name, colour in (("right", concept.colour), ("pattern", concept.pattern_colour),
                         ("prompted background", background), ("input background", background_for(concept))):
        if seen == colour:
            return name
    return "other" if seen else "none"


def read(clip, images: list[np.ndarray], looks: list[tuple[tw.ToyConcept, str]]) -> dict[str, list]:
    """Per image hits of every reading, and what the pixel colour read as; looks: (concept, prompted background
    colour) per image."""
    from PIL import Image

    colours = [read_colours(image) for image in images]
    combos = [(c.shape, c.colour, bg) for c, bg in looks]
    pil = [Image.fromarray(image) for image in images]
    return {"colour_read_as": [colour_read_as(seen, c, bg) for (_, seen), (c, bg) in zip(colours, looks)],
            "colour_pixel": [seen == c.colour for (_, seen), (c, _) in zip(colours, looks)],
            "background_pixel": [seen == bg for (seen, _), (_, bg) in zip(colours, looks)],
            "shape_pixel": [palette.read_shape(image) == c.shape for image, (c, _) in zip(images, looks)],
            "shape_clip": clip_accuracy(clip, pil, combos, "shape"),
            "colour_clip": clip_accuracy(clip, pil, combos, "colour")}


class Stages:
    """Images of one concept for every row, sharing the encoder's prediction and the tuning runs between rows."""

    def __init__(self, personalizer: Personalizer, seed: int):
        self.p, self.seed = personalizer, seed
        self.cfg = personalizer.cfg
        self.settings = personalizer.settings()
        self.tuned: dict[tuple, tuple[Concept, float]] = {}

    def concept(self, concept: tw.ToyConcept, pixels: torch.Tensor, row: Row) -> tuple[Concept, float]:
        key = (concept.key, row.start, row.steps)
        if key not in self.tuned:
            generator = torch.Generator().manual_seed(self.seed)
            started = time.perf_counter()
            if row.start == "oracle":
                start = Concept(oracle_v_star(self.p, concept), None, self.cfg.encoder.lora_scale)
            else:
                start = predict_concept(self.p.encoder, self.p.pipe.vae, pixels, self.cfg.personalize.encoder_timestep,
                                        generator)
            recipe = TuningRecipe.from_config(self.cfg, row.steps)
            tuned = tune(self.p.base, self.p.pipe.vae, start, pixels, self.p.tuning_prompt_ids(pixels), recipe,
                         generator) if row.steps else start
            self.tuned[key] = tuned, time.perf_counter() - started
        return self.tuned[key]

    def images(self, concept: tw.ToyConcept, row: Row) -> tuple[list[np.ndarray], float]:
        """(one image per prompt background, adaptation seconds)."""
        backgrounds = prompt_backgrounds(concept)
        s = self.settings
        guidance = s.guidance_scale if row.guidance is None else row.guidance
        rescale = s.guidance_rescale if row.rescale is None else row.rescale
        if row.start == "render":
            return [np.asarray(tw.render(tw.canonical(concept, bg), self.p.side, seed=self.seed))
                    for bg in backgrounds], 0.0
        if row.start == "words":
            texts = [f"{tw.article(words(concept))} {words(concept)} {tw.background_phrase('plain', bg)}"
                     for bg in backgrounds]
            out = self.p.pipe(texts, num_inference_steps=s.num_inference_steps, guidance_scale=guidance,
                              guidance_rescale=rescale, output_type="np",
                              generator=[torch.Generator().manual_seed(self.seed) for _ in texts]).images
            return [np.round(image * 255).astype(np.uint8) for image in out], 0.0
        image = tw.render(tw.canonical(concept, background_for(concept)), self.p.side, seed=0)
        pixels = to_pixels(image, self.p.side)
        tuned, seconds = self.concept(concept, pixels, row)
        sampling = Sampling(guidance, s.num_inference_steps, row.scheduler or s.scheduler,
                            s.alpha_blend if row.blend is None else row.blend, rescale)
        texts = [f"S* {tw.background_phrase('plain', bg)}" for bg in backgrounds]
        return generate(self.p.pipe, self.p.base.prompts, tuned, texts, [self.seed] * len(texts), sampling), seconds


def summarise(hits: dict[str, list[bool]]) -> dict:
    out = {}
    for reading in READINGS:
        values = hits[reading]
        out[reading] = round(float(np.mean(values)), 3) if values else math.nan
        out[reading + "_ci"] = wilson(int(np.sum(values)), len(values))
    out["images"] = len(hits[READINGS[0]])
    out["colour_read_as"] = dict(sorted(Counter(hits["colour_read_as"]).items()))
    return out


def markdown(result: dict) -> str:
    lines = [f"Concepts: {result['concept_sets']}; {PROMPTS_PER_CONCEPT} prompts each (plain backgrounds), seed "
             f"{result['seed']}; config overrides: {result['overrides'] or 'none'}; generation: {result['generation']}.",
             "", "| stage | set | images | colour (pixel) | colour (CLIP) | shape (pixel) | shape (CLIP) | background (pixel) "
             "| adapt s/concept |", "|---|---|---|---|---|---|---|---|---|"]
    for name, by_set in result["rows"].items():
        for set_name, cell in by_set.items():
            values = [f"{cell[r]:.0%} [{cell[r + '_ci'][0]:.0%}, {cell[r + '_ci'][1]:.0%}]" for r in READINGS]
            lines.append(f"| {name} | {set_name} | {cell['images']} | " + " | ".join(values)
                         + f" | {cell['adapt_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-concepts", type=int, default=8, help="the first N of evaluate.concepts")
    parser.add_argument("--fresh", type=int, default=8, help="fresh unseen looks")
    parser.add_argument("--fresh-seed", type=int, default=2026)
    parser.add_argument("--seed", type=int, default=0, help="sampling and tuning seed")
    parser.add_argument("--rows", help="comma-separated row names (default: all)")
    parser.add_argument("--quick", action="store_true", help="2 + 2 concepts, five rows, 2 tuning steps (tests)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--encoder", help="encoder directory (default: personalize.encoder)")
    parser.add_argument("--out", default="outputs/identity_stages")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: OpenMP spin-waits slow a shared 2-core machine down)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    if args.quick:
        overrides.setdefault("personalize", {}).setdefault("tuning_steps", 2)
        args.eval_concepts, args.fresh = min(args.eval_concepts, 2), min(args.fresh, 2)
    cfg = load_config("toy", overrides=overrides)
    steps = cfg.personalize.tuning_steps
    table = rows(steps, cfg.personalize.guidance_scale, cfg.check_base)
    names = (args.rows.split(",") if args.rows else
             ["renders", "ceiling", "oracle", "encoder 0", f"encoder {steps}"] if args.quick else list(table))
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(table)}")
    evaluation = [parse_concept(k) for k in cfg.evaluate.concepts[:args.eval_concepts]]
    sets = {"eval": evaluation,
            "fresh": fresh_concepts(args.fresh, args.fresh_seed, cfg.toy_world.encoder_holdout_shapes,
                                    set(cfg.evaluate.concepts))}
    personalizer = Personalizer(cfg, args.encoder or cfg.personalize.encoder)
    clip = load_clip(cfg.base.metrics_clip)
    stages = Stages(personalizer, args.seed)
    started = time.perf_counter()
    result = {"rows": {}, "seed": args.seed, "overrides": overrides,
              "concept_sets": {name: len(c) for name, c in sets.items()},
              "fresh_concepts": [c.key for c in sets["fresh"]],
              "generation": {"guidance_scale": stages.settings.guidance_scale,
                             "guidance_rescale": stages.settings.guidance_rescale,
                             "alpha_blend": stages.settings.alpha_blend, "scheduler": stages.settings.scheduler,
                             "num_inference_steps": stages.settings.num_inference_steps,
                             "tuning_steps": steps, "views": cfg.personalize.views, "lr": cfg.personalize.lr,
                             "l2_weight": cfg.personalize.l2_weight}}
    for name in names:
        row, by_set = table[name], {}
        for set_name, concepts in sets.items():
            images, looks, seconds = [], [], []
            for concept in concepts:
                made, adapt_s = stages.images(concept, row)
                images += made
                looks += [(concept, bg) for bg in prompt_backgrounds(concept)]
                seconds.append(adapt_s)
            by_set[set_name] = {**summarise(read(clip, images, looks)), "adapt_s": round(float(np.mean(seconds)), 3)}
        result["rows"][name] = by_set
        print(json.dumps({"stage": name, **{s: {r: c[r] for r in READINGS} for s, c in by_set.items()}}), flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "identity_stages.json").write_text(json.dumps(result, indent=1))
    (out / "identity_stages.md").write_text(markdown(result))
    print(json.dumps({"out": str(out), "seconds": result["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
