"""The registry gate (docs/personalize.md): one score that decides whether a new encoder becomes the champion."""

from __future__ import annotations

import numpy as np

from components.config import variant_config
from components.evaluation.eval_set import load_eval_set
from components.evaluation.harness import Harness
from components.evaluation.metrics import ClipMetrics
from components.model.base import load_clip


def gate_scores(personalizer) -> dict:
    """The registry gate (docs/personalize.md): ours on the first `gate_concepts` evaluation concepts x the
    first `gate_prompts` prompts, seed 0; score = mean of identity and prompt similarity (higher is better)."""
    cfg = personalizer.cfg
    e = cfg.evaluate
    gate_cfg = variant_config(cfg, evaluate={"full": False, "seeds": [0]})
    eval_set = load_eval_set(gate_cfg)
    clip = load_clip(cfg.base.metrics_clip, personalizer.runtime.device)
    harness = Harness(gate_cfg, personalizer, ClipMetrics(clip), eval_set)
    result = harness.ours("gate", limit=e.gate_concepts, prompts=eval_set.prompts[:e.gate_prompts])
    identity, prompt = float(np.mean(result.identity)), float(np.mean(result.prompt))
    return {"identity": identity, "prompt": prompt, "score": (identity + prompt) / 2}
