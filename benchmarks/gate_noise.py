"""How noisy is the registry gate? The same encoder scored under several sampling seeds, at every gate size
up to the whole evaluation set, so the gate's size and the margin a new version must win by can be read off.

    .venv/bin/python benchmarks/gate_noise.py       # committed toy encoder, 17 concepts x 10 prompts x 5 seeds
    .venv/bin/python benchmarks/gate_noise.py --seeds 3 --concepts 8 --prompts 5 --preset smoke --encoder DIR

One run of ours (encoder + tuning + sampling, the gate's own code: components.evaluation.gate.gate_run) on the
first --concepts evaluation concepts x the first --prompts prompts at each seed 0..--seeds-1; a concept is
tuned once (its tuning noise is seeded from its image, so the seed changes the sampling only). A gate of size
c x p is the mean combined score ((identity + prompt) / 2) of the first c concepts x the first p prompts of
that run, so every size is measured on the same images. For each size it reports the score's mean and its
standard deviation over seeds (sd), and `margin95` = 1.96 * sqrt(2) * sd: two scorings of equally good
encoders differ by more than that one time in twenty. Prints one JSON object; <out>/gate_noise.json gets it
after every seed, with the per-sample scores.
"""

from __future__ import annotations

import harness
import numpy as np
import torch

from components.evaluation.gate import gate_run
from components.inference.engine import Personalizer


Z95 = 1.96


def sizes_up_to(concepts: int, prompts: int, given: str | None) -> list[tuple[int, int]]:
    if given:
        pairs = [tuple(int(n) for n in s.split("x")) for s in given.split(",")]
    else:
        pairs = [(c, p) for c in (2, 4, 8, 12, concepts) for p in (1, 3, 5, prompts)]
    return sorted({(c, p) for c, p in pairs if c <= concepts and p <= prompts})


def main() -> None:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--encoder", help="encoder directory (default: personalize.encoder)")
    parser.add_argument("--concepts", type=int, default=17)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sizes", help="gate sizes CxP,CxP (default: a grid up to --concepts x --prompts)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = harness.config(args)
    encoder = args.encoder or cfg.personalize.encoder
    personalizer = Personalizer(cfg.engine, encoder)
    runs = []  # [seed][concept][prompt] combined score
    clock = harness.Timer()
    for seed in range(args.seeds):
        result = gate_run(personalizer, cfg.evaluate, args.concepts, args.prompts, seed)
        combined = (np.asarray(result.identity) + np.asarray(result.prompt)) / 2
        runs.append(combined.reshape(len(combined) // args.prompts, args.prompts))
        harness.log(f"seed {seed}: {combined.mean():.4f} ({clock.elapsed():.0f} s)")
        summary = summarize(np.stack(runs), args, cfg.preset, encoder, clock.elapsed())
        harness.save(summary, args)  # after every seed: a long run keeps what it has
    harness.report(summary, args, shown={k: v for k, v in summary.items() if k != "scores"})


def summarize(scores: np.ndarray, args, preset: str, encoder: str, seconds: float) -> dict:
    """The gate's mean and spread over seeds at each size, from the per-sample scores [seed, concept, prompt]."""
    concepts = scores.shape[1]
    table = []
    for c, p in sizes_up_to(concepts, args.prompts, args.sizes):
        gate = scores[:, :c, :p].mean(axis=(1, 2))  # one gate score per seed
        sd = float(gate.std(ddof=1)) if len(gate) > 1 else None
        table.append({"size": f"{c}x{p}", "samples": c * p, "mean": round(float(gate.mean()), 4),
                      "sd": sd and round(sd, 5), "margin95": sd and round(Z95 * np.sqrt(2) * sd, 5),
                      "per_seed": [round(float(g), 4) for g in gate]})
    return {"preset": preset, "encoder": str(encoder), "seeds": len(scores), "concepts": concepts,
            "prompts": args.prompts, "sample_sd": round(float(scores.std(ddof=1)), 5),
            "seconds": round(seconds, 1), "sizes": table, "scores": np.round(scores, 5).tolist()}


if __name__ == "__main__":
    main()
