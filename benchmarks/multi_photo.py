"""Several photos of one concept against one photo, on the evaluation concepts (toy preset, committed models).

    .venv/bin/python benchmarks/multi_photo.py [--concepts 6] [--prompts 10] [--photos 3] [--out DIR]

Each evaluation concept has several renders (components/evaluation/eval_set.py: the canonical view, then
views at other positions and sizes). "one" personalises from the canonical view (the default and the
paper's setting), "several" from the first `--photos` renders (components/inference/engine.py
`mean_concept` + tuning across the photos); both draw every evaluation prompt with the same seeds and
sampler. Identity is scored two ways: against the canonical view (an input of both), and against a render
neither saw (the last one, the fair reference); prompt similarity as in evaluate. Differences are paired
per sample with their 95% noise (components/evaluation/report.py `compare`). Prints one JSON object and
writes it to <out>/multi_photo.json (default outputs/benchmarks/multi_photo/).
"""

from __future__ import annotations

import harness
import torch

from components.evaluation.harness import MethodResult, load_harness, png_digest
from components.evaluation.report import compare
from components.inference.engine import images_digest
from components.inference.generate import generate


def main() -> None:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--concepts", type=int, default=6, help="the first N evaluation concepts")
    parser.add_argument("--prompts", type=int, default=10, help="the first N evaluation prompts")
    parser.add_argument("--photos", type=int, default=3, help="photos of the concept for 'several'")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = harness.config(args, {"evaluate": {"few_shot_images": max(3, min(5, args.photos + 1))}})
    evaluation = load_harness(cfg.engine, cfg.evaluate)
    p, seeds, prompts = evaluation.personalizer, evaluation.seeds, evaluation.eval_set.prompts[:args.prompts]
    settings = p.settings()
    concepts = evaluation.eval_set.concepts[:args.concepts]
    if len(concepts[0].images) <= args.photos:
        raise SystemExit(f"the evaluation concepts have {len(concepts[0].images)} renders; --photos must be fewer")
    results = {name: MethodResult(name) for name in ("one", "several")}
    held_out = {name: MethodResult(name) for name in ("one", "several")}
    seconds = {"one": 0.0, "several": 0.0}
    for n, concept in enumerate(concepts, 1):
        inputs = {"one": concept.images[:1], "several": concept.images[:args.photos]}
        for name, images in inputs.items():
            with harness.timed() as t:
                state = p.concept(images, images_digest([png_digest(i).encode() for i in images]),
                                  settings.tuning_steps)[0]
            seconds[name] += t.seconds
            results[name].concept_seconds.append(t.seconds)
            batch_prompts = [q for q in prompts for _ in seeds]
            drawn = generate(p.pipe, p.base.prompts, state, batch_prompts, [s for _ in prompts for s in seeds],
                             settings.sampling)
            for target, reference in ((results, concept.image), (held_out, concept.images[-1])):
                scores = evaluation.metrics.score(drawn, batch_prompts, reference)
                target[name].identity += scores.identity.tolist()
                target[name].prompt += scores.prompt.tolist()
                target[name].concept += [concept.name] * len(drawn)
        harness.log(f"concept {n}/{len(concepts)} {concept.name}")

    def summary(r: MethodResult) -> dict:
        s = r.summary()
        return {k: s[k] for k in ("identity", "identity_low", "identity_high", "prompt", "prompt_low", "prompt_high",
                                  "samples")}

    report = {
        "concepts": [c.name for c in concepts], "photos": args.photos, "prompts": len(prompts), "seeds": seeds,
        "tuning_steps": settings.tuning_steps,
        "identity_vs_canonical_view": {k: summary(v) for k, v in results.items()},
        "identity_vs_unseen_render": {k: summary(v) for k, v in held_out.items()},
        "personalise_seconds_per_concept": {k: round(v / len(concepts), 3) for k, v in seconds.items()},
        "several_vs_one": [
            compare("several photos raise identity (unseen render)", "-", held_out["several"], held_out["one"],
                    "identity"),
            compare("several photos raise identity (canonical view)", "-", results["several"], results["one"],
                    "identity"),
            compare("several photos keep prompt alignment", "-", results["several"], results["one"], "prompt")],
    }
    harness.report(report, args)


if __name__ == "__main__":
    main()
