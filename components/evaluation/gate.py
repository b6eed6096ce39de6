"""The registry gate (docs/personalize.md "The gate"): one score that decides whether a new encoder may
challenge the champion, and the margin it must win by.

The gate is the evaluation's own measure on a fixed subset: ours (encoder + tuning + sampling) on the first
`registry.gate_concepts` held-out evaluation concepts x the first `registry.gate_prompts` prompts at seed 0,
scored by the metrics CLIP; score = mean of identity and prompt similarity (higher is better). Its noise, which
the margin should exceed, is measured by benchmarks/gate_noise.py (docs/personalize.md "The gate's noise").
"""

from __future__ import annotations

import numpy as np

from components.config import EvaluateConfig, RegistryConfig
from components.evaluation.harness import harness_for


GATE = "gate_identity_prompt_v2"  # the gate's name: scores are compared only under the same name and size


def gate_size(registry: RegistryConfig) -> str:
    """`<concepts>x<prompts>`: part of a score's identity, since two sizes score different samples."""
    return f"{registry.gate_concepts}x{registry.gate_prompts}"


def gate_run(personalizer, evaluate: EvaluateConfig, concepts: int, prompts: int, seed: int = 0):
    """The harness's MethodResult of ours on the first `concepts` concepts x the first `prompts` prompts of the
    evaluation set `evaluate` names, at `seed` (one sample per concept and prompt, concept-major)."""
    harness = harness_for(personalizer, evaluate.model_copy(update={"full": False, "seeds": [seed]}))
    return harness.ours("gate", limit=concepts, prompts=harness.eval_set.prompts[:prompts])


def gate_scores(personalizer, evaluate: EvaluateConfig, registry: RegistryConfig, seed: int = 0) -> dict:
    """The registry gate of a loaded Personalizer at `registry`'s size on `evaluate`'s concepts and prompts:
    {"identity", "prompt", "score", "samples", "size"}; a `seed` other than 0 only to measure the gate's noise."""
    result = gate_run(personalizer, evaluate, registry.gate_concepts, registry.gate_prompts, seed)
    identity, prompt = float(np.mean(result.identity)), float(np.mean(result.prompt))
    return {"identity": identity, "prompt": prompt, "score": (identity + prompt) / 2,
            "samples": len(result.identity), "size": gate_size(registry)}


def beats(score: float, other: float | None, margin: float) -> bool:
    """Whether `score` wins over `other` on the gate: by more than `margin` (a tie or less keeps `other`)."""
    return other is None or score > other + margin
