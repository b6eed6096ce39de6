"""Does a personalised image show the input's concept? Colour read from pixels (check-base's reader) and
shape by the metrics CLIP, for canonical renders of shapes x all 12 colours, with "a photo of S*" or the
input's own caption, one or more encoders and tuning settings compared in one process.

    .venv/bin/python benchmarks/concept_fidelity.py                                  # the committed encoder
    .venv/bin/python benchmarks/concept_fidelity.py --encoder models/toy-encoder --encoder /tmp/other
    .venv/bin/python benchmarks/concept_fidelity.py --steps 0 --steps 12 --blend 1 --blend 0.5
    .venv/bin/python benchmarks/concept_fidelity.py --set personalize.views=4
    .venv/bin/python benchmarks/concept_fidelity.py --steps 0 --steps 12 --prompt photo --prompt caption --words
    .venv/bin/python benchmarks/concept_fidelity.py --prompt caption --images 4 --gate 10 --set personalize.views=1

Each variant is every combination of --encoder, --steps, --blend and --prompt (`alpha_blend` of generation; the
tuning blend is the config's). `--preset`, `--config` and `--set SECTION.KEY=VALUE` (VALUE as YAML) give the config
of all (default: the toy preset).
Inputs: canonical renders (centred, gray background; white for gray objects) of `--shapes` x every
palette colour; `--images` seeds per concept. Prints one JSON object (each variant also goes to stderr as it
ends): `variants`, one entry per variant with its colour and shape accuracy, per-colour accuracy, the confusions
(input colour -> colour read) and which real words are nearest to the tuned v* (as the dual path's hard prompt
picks them); `gate`, per encoder, with `--gate`; `words`, with `--words`: the reference, the base told the
concept in words where S* was ("a red circle"), no personalisation. The concurrency test of
tests/serving/test_serving.py asks this of four concepts; here it is measured over the whole reader.
"""
from __future__ import annotations

import collections
import io
import itertools
import json
import sys

import harness
import numpy as np
import torch
from PIL import Image

from components.config import variant_config
from components.evaluation.check_base import read_colours, shape_accuracy
from components.evaluation.gate import gate_scores
from components.inference.engine import Personalizer
from components.model.base import load_clip
from components.toy import world as tw


PROMPTS = {"photo": "a photo of S*", "caption": "S* on a {background} background", "bare": "S*"}


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def measure(make_images, shapes: list[str], clip) -> dict:
    """Accuracies over canonical renders of `shapes` x every colour; `make_images(render_png, prompt_template,
    shape, colour, background)` returns the generated uint8 arrays for one concept."""
    per_colour, confusions, generated, combos = collections.defaultdict(list), collections.Counter(), [], []
    clock = harness.Timer()
    for j, shape in enumerate(shapes):
        for i, colour in enumerate(tw.COLOURS):
            background = "white" if colour == "gray" else "gray"
            render = tw.render(tw.Scene(tw.ToyConcept(shape, colour), background_colour=background), 64,
                               seed=100 * j + i)
            for pixels in make_images(png(render), shape, colour, background):
                out_background, seen = read_colours(pixels)
                per_colour[colour].append(seen == colour)
                if seen != colour:
                    confusions[f"{colour}->{seen}"] += 1
                generated.append(Image.fromarray(pixels))
                combos.append((shape, colour, out_background))
    return {"colour": round(float(np.mean([x for v in per_colour.values() for x in v])), 3),
            "shape": round(shape_accuracy(clip, generated, combos), 3),
            "per_colour": {c: round(float(np.mean(v)), 2) for c, v in per_colour.items()},
            "confusions": dict(confusions.most_common(8)), "images": len(generated),
            "seconds": round(clock.elapsed(), 1)}


def personalised(personalizer: Personalizer, images: int, steps: int, blend: float, prompt: str,
                 nearest: collections.Counter):
    """Personalise each input; count the real word nearest to each tuned v* into `nearest`."""
    settings = personalizer.settings(tuning_steps=steps, num_images=images, seed=0, alpha_blend=blend)
    tokenizer = personalizer.base.prompts.tokenizer

    def make_images(image: bytes, shape: str, colour: str, background: str) -> list[np.ndarray]:
        text = PROMPTS[prompt].format(background=background)
        result = personalizer.run(image, [text], settings)
        word = tokenizer.convert_ids_to_tokens(personalizer.base.prompts.nearest_tokens(result.concept.v_star))[0]
        nearest[word.removesuffix("</w>") + (" (= background)" if word == f"{background}</w>" else "")] += 1
        return [out.pixels for out in result.images]
    return make_images


def in_words(personalizer: Personalizer, images: int, prompt: str):
    """The reference: the base told the concept in words ("a red circle" where S* was), no personalisation,
    with the same sampler settings as the personalised images."""
    settings = personalizer.settings(num_images=images, seed=0)

    def make_images(image: bytes, shape: str, colour: str, background: str) -> list[np.ndarray]:
        text = PROMPTS[prompt].format(background=background).replace("S*", f"{tw.article(colour)} {colour} {shape}")
        generators = [torch.Generator().manual_seed(settings.seed + i) for i in range(images)]
        pixels = personalizer.pipe([text] * images, num_inference_steps=settings.num_inference_steps,
                                   guidance_scale=settings.guidance_scale,
                                   guidance_rescale=settings.guidance_rescale, generator=generators,
                                   output_type="np").images
        return list((pixels * 255).round().astype(np.uint8))
    return make_images


def main() -> int:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--encoder", action="append", help="encoder directory (repeatable; default: the config's)")
    parser.add_argument("--steps", action="append", type=int, help="tuning steps (repeatable; default: the config's)")
    parser.add_argument("--blend", action="append", type=float, help="generation blend (repeatable; default 1)")
    parser.add_argument("--prompt", action="append", choices=PROMPTS,
                        help="photo: 'a photo of S*'; caption: the input's own caption with S*; bare: 'S*' "
                             "(repeatable; default photo)")
    parser.add_argument("--words", action="store_true",
                        help="also the base told the concept in words instead of S* (the reference)")
    parser.add_argument("--shapes", default="circle,square,triangle,star")
    parser.add_argument("--images", type=int, default=2, help="seeds per concept")
    parser.add_argument("--gate", type=int, metavar="N",
                        help="also the registry gate's scores (components.evaluation.gate.gate_scores) per encoder "
                             "on the first N evaluation concepts x N prompts, at the config's own tuning and blend")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = harness.config(args)
    clip = load_clip(cfg.base.metrics_clip)
    shapes = args.shapes.split(",")
    first = None
    prompts = args.prompt or ["photo"]
    report = {"preset": cfg.preset, "set": harness.overrides(args), "shapes": shapes, "images": args.images,
              "variants": []}
    for encoder in args.encoder or [cfg.personalize.encoder]:
        # one loaded base for every encoder: the variants differ only in what they are asked to compare
        personalizer = Personalizer(cfg.engine, encoder) if first is None else first.variant(cfg.engine, encoder)
        first = first or personalizer
        if args.gate:
            size = variant_config(cfg, registry={"gate_concepts": args.gate, "gate_prompts": args.gate}).registry
            report.setdefault("gate", {})[str(encoder)] = gate_scores(personalizer, cfg.evaluate, size)
            harness.log(json.dumps({"encoder": encoder, "gate": report["gate"][str(encoder)]}))
        variants = itertools.product(args.steps or [cfg.personalize.tuning_steps], args.blend or [1.0], prompts)
        for steps, blend, prompt in variants:
            nearest = collections.Counter()
            result = measure(personalised(personalizer, args.images, steps, blend, prompt, nearest), shapes, clip)
            report["variants"].append({"encoder": encoder, "steps": steps, "blend": blend, "prompt": PROMPTS[prompt],
                                       **result, "v_star_nearest_word": dict(nearest.most_common(6))})
            harness.log(json.dumps(report["variants"][-1]))
    for prompt in prompts if args.words else []:
        result = measure(in_words(first, args.images, prompt), shapes, clip)
        report.setdefault("words", []).append({"prompt": PROMPTS[prompt], **result})
        harness.log(json.dumps({"words": True, **report["words"][-1]}))
    harness.report(report, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
