"""Identity and prompt similarity of an untrained encoder against the committed toy encoder, on the
registry gate's subset of the evaluation at its first size (metrics CLIP, 4 held-out concepts x 3 prompts, seed 0, 12
tuning steps), so pre-training is shown to help in the evaluation's own terms.

    .venv/bin/python benchmarks/encoder_vs_untrained.py
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)

from components.config import RegistryConfig, load_config  # noqa: E402
from components.model.encoder import FrozenBase, TuningEncoder  # noqa: E402
from components.evaluation.gate import gate_scores  # noqa: E402
from components.inference.engine import Personalizer  # noqa: E402


SUBSET = RegistryConfig(gate_concepts=4, gate_prompts=3)  # the subset docs/pretrain.md's figures were measured on


def main() -> None:
    torch.set_num_threads(2)
    cfg = load_config("toy")
    scores = {}
    with tempfile.TemporaryDirectory() as untrained:
        torch.manual_seed(0)
        TuningEncoder.for_base(cfg.encoder, FrozenBase.load(cfg)).save_pretrained(untrained)
        scores["untrained"] = gate_scores(Personalizer(cfg, untrained), registry=SUBSET)
    scores["trained"] = gate_scores(Personalizer(cfg, cfg.personalize.encoder), registry=SUBSET)
    scores["identity_gain"] = round(scores["trained"]["identity"] / scores["untrained"]["identity"] - 1, 4)
    print(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()
