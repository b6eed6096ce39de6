"""What does the encoder's untuned prediction carry? Colour and shape read from v* and the LoRA factors.

    .venv/bin/python benchmarks/encoder_probe.py [--encoder DIR ...] [--seeds 3]

For canonical renders of 4 shapes x the 12 palette colours (gray background; white for gray objects) and
`--seeds` seeds each, the encoder predicts (v*, factors) as personalisation's first step does. Reported per
encoder: nearest-centroid accuracy of colour and shape from v* and from the flattened factors (leave one seed
out: the centroids come from the other seeds), v*'s norm against the real tokens', which real words are
nearest to v* (the word the dual path's hard prompt spells S* as) and how often that word is the input's
colour. A prediction that separates colours but whose generated images do not show them
(benchmarks/concept_fidelity.py --steps 0) carries the colour where the text encoder and UNet do not read it.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
from pathlib import Path

import torch


from components.toy import world as tw  # noqa: E402
from components.config import load_config  # noqa: E402
from components.data.images import to_pixels  # noqa: E402
from components.inference.engine import Personalizer  # noqa: E402
from components.inference.tuning import predict_concept  # noqa: E402

SHAPES = ("circle", "square", "triangle", "star")


def nearest_centroid_accuracy(features: torch.Tensor, labels: list[str], groups: list[int]) -> float:
    """Leave-one-group-out: each row is classified by the centroids of the other groups' rows."""
    hits = 0
    for i, (label, group) in enumerate(zip(labels, groups)):
        rest = [j for j, g in enumerate(groups) if g != group]
        names = sorted({labels[j] for j in rest})
        centroids = torch.stack([features[[j for j in rest if labels[j] == n]].mean(0) for n in names])
        hits += names[int((centroids - features[i]).norm(dim=1).argmin())] == label
    return round(hits / len(labels), 3)


def probe(personalizer: Personalizer, seeds: int, timestep: int) -> dict:
    colours, shapes, groups, v_stars, factors = [], [], [], [], []
    for shape, colour, seed in itertools.product(SHAPES, tw.COLOURS, range(seeds)):
        background = "white" if colour == "gray" else "gray"
        image = tw.render(tw.canonical(tw.ToyConcept(shape, colour), background), 64, seed=seed)
        concept = predict_concept(personalizer.encoder, personalizer.pipe.vae, to_pixels(image, personalizer.side),
                                  timestep, torch.Generator().manual_seed(seed))
        colours.append(colour)
        shapes.append(shape)
        groups.append(seed)
        v_stars.append(concept.v_star[0])
        factors.append(torch.cat([t.flatten() for t in concept.tensors()[1:]]) if concept.factors else None)
    v = torch.stack(v_stars)
    prompts = personalizer.base.prompts
    tokenizer = prompts.tokenizer
    nearest = [tokenizer.convert_ids_to_tokens(int(i)).removesuffix("</w>") for i in prompts.nearest_tokens(v)]
    report = {"concepts": len(colours),
              "v_star": {"colour": nearest_centroid_accuracy(v, colours, groups),
                         "shape": nearest_centroid_accuracy(v, shapes, groups)},
              "v_star_norm": round(float(v.norm(dim=1).mean()), 4),
              "token_norm": round(float(prompts.token_table.norm(dim=1).mean()), 4),
              "nearest_word_is_the_colour": round(sum(w == c for w, c in zip(nearest, colours)) / len(colours), 3),
              "nearest_words": dict(collections.Counter(nearest).most_common(8))}
    if factors[0] is not None:
        f = torch.stack(factors)
        report["factors"] = {"colour": nearest_centroid_accuracy(f, colours, groups),
                             "shape": nearest_centroid_accuracy(f, shapes, groups)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", action="append", help="encoder directory (repeatable; default: the config's)")
    parser.add_argument("--seeds", type=int, default=3, help="renders per concept (>= 2: one is left out)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("toy")
    first = None
    for encoder in args.encoder or [cfg.personalize.encoder]:
        personalizer = Personalizer(cfg, encoder) if first is None else first.variant(cfg, encoder)
        first = first or personalizer
        print(json.dumps({"encoder": encoder, **probe(personalizer, args.seeds, cfg.personalize.encoder_timestep)}),
              flush=True)


if __name__ == "__main__":
    main()
