"""Where is a concept's identity made, and where lost? Colour, shape and background accuracy of personalised images,
stage by stage, on concepts of the shapes pre-training saw and of those it never saw, in one table.

    .venv/bin/python benchmarks/identity_stages.py                       # 16 + 16 concepts x 4 prompts, default rows
    .venv/bin/python benchmarks/identity_stages.py --quick               # 2 + 2 concepts, three rows (tests)
    .venv/bin/python benchmarks/identity_stages.py --set personalize.lr=2e-3 --rows "encoder 0,encoder 12"
    .venv/bin/python benchmarks/identity_stages.py --encoder models/ablation-encoders/<name> --out DIR

Rows, each on the same inputs, prompts and seeds (`--rows` picks some; `--rows all` adds the generation settings):
- references: `renders` (the readers on the toy world's own renders of the concept on each prompt's background: how
  far the readers can be trusted), `ceiling` (the base told the concept in words where S* was), `colour word` and
  `shape word` (v* = that one word's embedding, nothing else), `TI 200` (a 200-step single-token Textual Inversion
  of the input photo on the tuning prompt: what one token can hold when optimised);
- the encoder: `encoder 0` (its prediction alone), `encoder 0 v* only` (the prediction without the hypernetwork's
  offsets), `encoder N` (after the default N tuning steps), `encoder 50`;
- generation settings at N steps (`--rows all`): `blend 1` / `blend 0`, `guidance 4`, `dpm`.
`--preset`, `--config` and `--set SECTION.KEY=VALUE` (VALUE as YAML) give the config (default: the toy preset) for
every row.

Concepts: `--concepts` fresh looks (colour, pattern, pattern colour at random from `--fresh-seed`) of the shapes
pre-training saw ("seen") and of `toy_world.encoder_holdout_shapes` ("unseen"), none an evaluation concept and, when
the prepared data is there, none a look pre-training had. The input photo is the canonical view (centred, medium, a
plain background that is none of its colours). Prompts: four plain backgrounds per concept ("S* on a blue
background"), none of the object's colours. Readings: pixel colour (the concept's colour covers a quarter of
the object or more: reader.object_colours), background (check_base.read_colours), pixel shape
(reader.read_shape), and the metrics CLIP zero-shot: colour and shape each chosen among the captions differing
only in that word. Each cell: accuracy with its 95% Wilson interval; in the JSON also what a wrong pixel
colour read as. Writes identity_stages.json and identity_stages.md under --out (default
outputs/benchmarks/identity_stages/).
"""
from __future__ import annotations

import json
import math
import random
import sys
from collections import Counter
from dataclasses import dataclass

import harness
import numpy as np
import torch
from PIL import Image

from components.data.images import to_pixels
from components.evaluation.check_base import clip_accuracy, read_colours
from components.evaluation.eval_set import background_for, pretraining_looks
from components.inference.engine import Personalizer
from components.inference.generate import Sampling, generate
from components.inference.tuning import Concept, TuningRecipe, tune
from components.model.base import load_clip
from components.model.placeholder import PLACEHOLDER
from components.toy import reader
from components.toy import world as tw
from components.training.baselines import train_textual_inversion


# prompt backgrounds, in order of preference; each concept takes the first four its colours leave free
BACKGROUNDS = ["blue", "green", "white", "black", "yellow", "gray", "pink", "orange"]
PROMPTS_PER_CONCEPT = 4
READINGS = ("colour_pixel", "colour_clip", "shape_pixel", "shape_clip", "background_pixel")
TI_STEPS = 200


@dataclass(frozen=True)
class Row:
    name: str
    start: str  # "render", "words" (the ceiling), "colour word", "shape word", "ti" or "encoder"
    steps: int = 0
    offsets: bool = True  # keep the hypernetwork's offsets (encoder rows)
    blend: float | None = None  # generation blend; None: the config's
    guidance: float | None = None
    scheduler: str | None = None


def rows(steps: int, sampling_guidance: float) -> dict[str, Row]:
    made = [Row("renders", "render"), Row("ceiling", "words"), Row("colour word", "colour word"),
            Row("shape word", "shape word"), Row(f"TI {TI_STEPS}", "ti", TI_STEPS),
            Row("encoder 0", "encoder"), Row("encoder 0 v* only", "encoder", offsets=False),
            Row(f"encoder {steps}", "encoder", steps), Row("encoder 50", "encoder", 50),
            Row(f"encoder {steps} blend 1", "encoder", steps, blend=1.0),
            Row(f"encoder {steps} blend 0", "encoder", steps, blend=0.0),
            Row(f"encoder {steps} guidance 4", "encoder", steps, guidance=4.0) if sampling_guidance != 4.0
            else Row(f"encoder {steps} guidance 1.5", "encoder", steps, guidance=1.5),
            Row(f"encoder {steps} dpm", "encoder", steps, scheduler="dpm")]
    return {row.name: row for row in made}


def default_rows(steps: int) -> list[str]:
    return ["renders", "ceiling", "colour word", "shape word", f"TI {TI_STEPS}", "encoder 0", "encoder 0 v* only",
            f"encoder {steps}"]


def fresh_concepts(n: int, seed: int, shapes: list[str], exclude) -> list[tw.ToyConcept]:
    """n distinct looks of `shapes` (colour, pattern, pattern colour at random), none for which `exclude` is true."""
    rng, found = random.Random(seed), {}
    while len(found) < n:
        concept = tw.sample_concept(rng, shapes)
        if not exclude(concept):
            found.setdefault(concept.key, concept)
    return list(found.values())


def prompt_backgrounds(concept: tw.ToyConcept) -> list[str]:
    return [c for c in BACKGROUNDS if c not in (concept.colour, concept.pattern_colour)][:PROMPTS_PER_CONCEPT]


def words(concept: tw.ToyConcept) -> str:
    """The concept's true words without article: 'green dotted crescent'."""
    return concept.phrase().split(" ", 1)[1]


def wilson(hits: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return math.nan, math.nan
    z, p = 1.959963984540054, hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return round(centre - half, 3), round(centre + half, 3)


def colour_read_as(seen: str | None, concept: tw.ToyConcept, background: str) -> str:
    """What the pixel reading of the object's colour matched: the concept's colour ("right"), its pattern colour,
    the prompted background, the input photo's background, another colour, or none."""
    for name, colour in (("right", concept.colour), ("pattern", concept.pattern_colour),
                         ("prompted background", background), ("input background", background_for(concept))):
        if seen == colour:
            return name
    return "other" if seen else "none"


def read(clip, images: list[np.ndarray], looks: list[tuple[tw.ToyConcept, str]]) -> dict[str, list]:
    """Per image hits of every reading; looks: (concept, prompted background colour) per image. The pixel colour is
    right when the concept's colour covers at least a quarter of the object (reader.object_colours: a striped or
    checkered object shows two colours of about half each, so the median pixel is no reading of either)."""
    backgrounds = [read_colours(image)[0] for image in images]
    shares = [reader.object_colours(image) for image in images]
    combos = [(c.shape, c.colour, bg) for c, bg in looks]
    pil = [Image.fromarray(image) for image in images]
    right = [share.get(c.colour, 0.0) >= reader.OBJECT_COLOUR_SHARE for share, (c, _) in zip(shares, looks)]
    # a wrong reading reads as the object's main colour other than the concept's (which covers under a quarter)
    seen = [c.colour if ok else next((s for s in share if s != c.colour), None)
            for ok, share, (c, _) in zip(right, shares, looks)]
    return {"colour_read_as": [colour_read_as(colour, c, bg) for colour, (c, bg) in zip(seen, looks)],
            "colour_pixel": right,
            "background_pixel": [seen == bg for seen, (_, bg) in zip(backgrounds, looks)],
            "shape_pixel": [reader.read_shape(image) == c.shape for image, (c, _) in zip(images, looks)],
            "shape_clip": clip_accuracy(clip, pil, combos, "shape"),
            "colour_clip": clip_accuracy(clip, pil, combos, "colour")}


class Stages:
    """Images of one concept for every row, sharing the encoder's prediction and the tuning runs between rows."""

    def __init__(self, personalizer: Personalizer, ti_lr: float, seed: int):
        self.p, self.ti_lr, self.seed = personalizer, ti_lr, seed
        self.cfg = personalizer.config
        self.settings = personalizer.settings()
        self.tuned: dict[tuple, tuple[Concept, float]] = {}

    def word(self, text: str) -> Concept:
        prompts = self.p.base.prompts
        ids = prompts.tokenizer(text, add_special_tokens=False).input_ids
        return Concept(prompts.token_table.detach()[ids].mean(0, keepdim=True), None, self.cfg.encoder.lora_scale)

    def concept(self, concept: tw.ToyConcept, pixels: torch.Tensor, row: Row) -> tuple[Concept, float]:
        key = (concept.key, row.start, row.steps)
        if key not in self.tuned:
            generator = torch.Generator().manual_seed(self.seed)
            with harness.timed() as t:
                prompt_ids = self.p.tuning_prompt_ids(pixels)
                if row.start == "ti":
                    template = reader.describe(np.asarray(self.photo(concept))) or "a photo of {}"
                    result = train_textual_inversion(self.p.pipe, pixels, row.steps, template=template,
                                                     lr=self.ti_lr, seed=self.seed)
                    tuned = Concept(next(iter(result.weights.values())).to(pixels), None, self.cfg.encoder.lora_scale)
                else:
                    start = self.p.predict(pixels, generator)
                    recipe = TuningRecipe.from_config(self.cfg, row.steps)
                    tuned = tune(self.p.base, self.p.pipe.vae, start, pixels, prompt_ids, recipe,
                                 generator) if row.steps else start
            self.tuned[key] = tuned, t.seconds
        tuned, seconds = self.tuned[key]
        return (tuned if row.offsets else Concept(tuned.v_star, None, tuned.scale)), seconds

    def photo(self, concept: tw.ToyConcept) -> Image.Image:
        return tw.render(tw.canonical(concept, background_for(concept)), self.p.side, seed=0)

    def images(self, concept: tw.ToyConcept, row: Row) -> tuple[list[np.ndarray], float]:
        """(one image per prompt background, adaptation seconds)."""
        backgrounds = prompt_backgrounds(concept)
        s = self.settings
        guidance = s.guidance_scale if row.guidance is None else row.guidance
        if row.start == "render":
            return [np.asarray(tw.render(tw.canonical(concept, bg), self.p.side, seed=self.seed))
                    for bg in backgrounds], 0.0
        if row.start == "words":
            texts = [f"{tw.article(words(concept))} {words(concept)} {tw.background_phrase('plain', bg)}"
                     for bg in backgrounds]
            out = self.p.pipe(texts, num_inference_steps=s.num_inference_steps, guidance_scale=guidance,
                              guidance_rescale=s.guidance_rescale, output_type="np",
                              generator=[torch.Generator().manual_seed(self.seed) for _ in texts]).images
            return [np.round(image * 255).astype(np.uint8) for image in out], 0.0
        if row.start in ("colour word", "shape word"):
            tuned, seconds = self.word(concept.colour if row.start == "colour word" else concept.shape), 0.0
        else:
            tuned, seconds = self.concept(concept, to_pixels(self.photo(concept), self.p.side), row)
        blend = s.alpha_blend if row.blend is None else row.blend
        if row.start != "encoder":  # one token and nothing else: no hard path to blend with
            blend = 1.0
        sampling = Sampling(guidance, s.num_inference_steps, row.scheduler or s.scheduler, blend, s.guidance_rescale)
        texts = [f"{PLACEHOLDER} {tw.background_phrase('plain', bg)}" for bg in backgrounds]
        return generate(self.p.pipe, self.p.base.prompts, tuned, texts, [self.seed] * len(texts), sampling), seconds


def summarise(hits: dict[str, list]) -> dict:
    out = {}
    for reading in READINGS:
        values = hits[reading]
        out[reading] = round(float(np.mean(values)), 3) if values else math.nan
        out[reading + "_ci"] = wilson(int(np.sum(values)), len(values))
    out["images"] = len(hits[READINGS[0]])
    out["colour_read_as"] = dict(sorted(Counter(hits["colour_read_as"]).items()))
    return out


def markdown(result: dict) -> str:
    sets = list(result["concept_sets"])
    head = " | ".join(f"{r.replace('_', ' ')} ({s})" for r in READINGS for s in sets)
    lines = [f"Concepts: {result['concept_sets']} ({PROMPTS_PER_CONCEPT} prompts each, plain backgrounds), seed "
             f"{result['seed']}; config overrides: {result['overrides'] or 'none'}; "
             f"generation: {result['generation']}.",
             "", f"| stage | {head} | adapt s/concept |", "|---|" + "---|" * (len(READINGS) * len(sets) + 1)]
    for name, by_set in result["rows"].items():
        cells = [f"{by_set[s][r]:.0%} [{by_set[s][r + '_ci'][0]:.0%}, {by_set[s][r + '_ci'][1]:.0%}]"
                 for r in READINGS for s in sets]
        seconds = np.mean([by_set[s]["adapt_s"] for s in sets])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds:.2f} |")
    return "\n".join(lines) + "\n"


def concept_sets(cfg, n: int, seed: int) -> dict[str, list[tw.ToyConcept]]:
    held_out = cfg.toy_world.encoder_holdout_shapes
    evaluation = set(cfg.evaluate.concepts)
    try:
        seen = pretraining_looks(cfg.prepare.out, cfg.toy_world.out).contains
    except Exception:  # noqa: BLE001 - no prepared data here: only the evaluation concepts are excluded
        seen = lambda concept: False  # noqa: E731
    exclude = lambda concept: concept.key in evaluation or seen(concept)  # noqa: E731
    return {"seen": fresh_concepts(n, seed, [s for s in tw.SHAPES if s not in held_out], exclude),
            "unseen": fresh_concepts(n, seed + 1, held_out, exclude)}


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--concepts", type=int, default=16, help="concepts per set (seen shapes, unseen shapes)")
    parser.add_argument("--fresh-seed", type=int, default=2026)
    parser.add_argument("--seed", type=int, default=0, help="sampling and tuning seed")
    parser.add_argument("--rows",
                        help="comma-separated row names, or 'all' (default: the references and encoder rows)")
    parser.add_argument("--quick", action="store_true", help="2 + 2 concepts, three rows, 2 tuning steps (tests)")
    parser.add_argument("--encoder", help="encoder directory (default: personalize.encoder)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: OpenMP spin-waits slow a shared 2-core machine down)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = harness.overrides(args)
    if args.quick:
        overrides.setdefault("personalize", {}).setdefault("tuning_steps", 2)
        args.concepts = min(args.concepts, 2)
    cfg = harness.config(args, overrides)
    steps = cfg.personalize.tuning_steps
    table = rows(steps, cfg.personalize.guidance_scale)
    names = (list(table) if args.rows == "all" else args.rows.split(",") if args.rows else
             ["renders", "encoder 0", f"encoder {steps}"] if args.quick else default_rows(steps))
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(table)}")
    sets = concept_sets(cfg, args.concepts, args.fresh_seed)
    personalizer = Personalizer(cfg.engine, args.encoder or cfg.personalize.encoder)
    clip = load_clip(cfg.base.metrics_clip)
    stages = Stages(personalizer, cfg.evaluate.ti_lr, args.seed)
    clock = harness.Timer()
    s = stages.settings
    result = {"rows": {}, "seed": args.seed, "overrides": overrides,
              "encoder": args.encoder or cfg.personalize.encoder,
              "concept_sets": {name: len(c) for name, c in sets.items()},
              "concepts": {name: [c.key for c in concepts] for name, concepts in sets.items()},
              "generation": {"guidance_scale": s.guidance_scale, "guidance_rescale": s.guidance_rescale,
                             "alpha_blend": s.alpha_blend, "scheduler": s.scheduler,
                             "num_inference_steps": s.num_inference_steps, "tuning_steps": steps,
                             "views": cfg.personalize.views, "lr": cfg.personalize.lr,
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
        harness.log(json.dumps({"stage": name, **{s: {r: c[r] for r in READINGS} for s, c in by_set.items()}}))
    result["seconds"] = round(clock.elapsed(), 1)
    out = harness.out_dir(args)
    (out / "identity_stages.md").write_text(markdown(result))
    harness.report(result, args, shown={"out": str(out), "seconds": result["seconds"],
                                        "rows": {n: {s: {r: c[r] for r in READINGS} for s, c in by_set.items()}
                                                 for n, by_set in result["rows"].items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
