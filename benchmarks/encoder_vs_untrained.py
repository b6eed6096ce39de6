"""Identity and prompt similarity of an untrained encoder against the committed toy encoder, on the
registry gate's subset of the evaluation at its first size (metrics CLIP, 4 held-out concepts x 3 prompts, seed 0, 12
tuning steps), so pre-training is shown to help in the evaluation's own terms.

    .venv/bin/python benchmarks/encoder_vs_untrained.py [--set personalize.encoder=DIR]

`identity_gain` = trained identity / untrained identity - 1 (the untrained encoder: the same shapes, seed-0
initial weights).
"""

from __future__ import annotations

import tempfile

import harness
import torch

from components.config import RegistryConfig
from components.evaluation.gate import gate_scores
from components.inference.engine import Personalizer
from components.model.encoder import FrozenBase, TuningEncoder


SUBSET = RegistryConfig(gate_concepts=4, gate_prompts=3)  # the registry gate's subset at its first size


def main() -> None:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = harness.config(args)
    scores = {}
    with tempfile.TemporaryDirectory() as untrained:
        torch.manual_seed(0)
        TuningEncoder.for_base(cfg.encoder, FrozenBase.load(cfg.base, cfg.runtime)).save_pretrained(untrained)
        scores["untrained"] = gate_scores(Personalizer(cfg.engine, untrained), cfg.evaluate, SUBSET)
    scores["trained"] = gate_scores(Personalizer(cfg.engine, cfg.personalize.encoder), cfg.evaluate, SUBSET)
    scores["identity_gain"] = round(scores["trained"]["identity"] / scores["untrained"]["identity"] - 1, 4)
    harness.report(scores, args)


if __name__ == "__main__":
    main()
