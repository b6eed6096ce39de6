"""Automatic ablations (paper section 6.3): each variant a nested MLflow run under one `ablate` run.

    ablate(cfg) -> {"methods": {variant: {...}}, "alpha_blend": {"chosen": a, ...}, "findings", ...}

Variants that change what the encoder learns (the regulariser, dual path in training, no hypernetwork)
are short pre-training runs (components/training/pretrain.py, `evaluate.retrain_steps` steps) compared with the
default recipe trained exactly as long (`reg-contrastive`), since a short encoder against the committed
1000-step one would measure training length, not the ablation. The `variants` stage trains and scores them once
(components/evaluation/variants.py); ablate reads their scores on its concepts. Variants that change only the
tuning (no tuning, no dual path in tuning, embedding only, hyper-weights only, the blend sweep) run here, on the
committed encoder (`personalize.encoder`).

The blend sweep picks the alpha with the highest combined score (the mean of identity and prompt
similarity, equal weights), but keeps the config's value unless the leader beats it beyond the paired
noise; it is reported, not written into the config.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from components import tracking
from components.config import Config, EncoderConfig, resolved
from components.evaluation import report
from components.evaluation.harness import StageRun, load_harness
from components.evaluation.report import COMBINED, compare, metric_values
from components.evaluation.variants import tuning_variants, variant_results
from components.training.variants import retrained_variants


log = logging.getLogger(__name__)

def choose_alpha(encoder: EncoderConfig, results: dict) -> dict:
    """The blend with the highest combined score; it displaces the config's default only when it beats the
    default beyond the paired 95% noise (as components/evaluation/report.py judges the paper's findings): a lead inside
    the noise of a few concepts is no reason to change a default."""
    sweep = {float(name.removeprefix("alpha-")): r for name, r in results.items() if name.startswith("alpha-")}
    scores = {a: float(np.mean(metric_values(r, COMBINED))) for a, r in sweep.items()}
    default = encoder.alpha_blend_tune
    best = max(scores.values())
    leader = min((a for a, s in scores.items() if s == best), key=lambda a: abs(a - default))
    verdict = (compare("", "", sweep[leader], sweep[default], COMBINED)
               if leader != default and default in sweep else None)
    chosen = default if verdict is not None and verdict["status"] != "reproduced" else leader
    return {"chosen": chosen, "best": leader, "config_default": default,
            "scores": {f"{a:g}": round(s, 5) for a, s in scores.items()},
            "lead_over_default": None if verdict is None else {"change_pct": verdict["change_pct"],
                                                               "noise": verdict["noise"]},
            "criterion": "highest mean of identity and prompt similarity (equal weights); it replaces the default "
                         "only when it beats it beyond the paired 95% noise",
            "change_default": chosen != default}


# (claim, paper, better, worse, metric) as in components/evaluation/report.py;
# re-trained variants against reg-contrastive
ABLATION_CLAIMS = [
    ("tuning raises identity", "about +20%", "ours", "no-tuning", "identity"),
    ("dual path during tuning raises prompt alignment", "about +30%", "ours", "no-dual-path-tune", "prompt"),
    ("dual path and tuning together beat neither", "Figure 5b: below ours", "ours", "no-dual-path-no-tuning",
     "combined"),
    ("dual path during training helps", "part of the method", "reg-contrastive", "no-dual-path-train", "combined"),
    ("the hypernetwork helps prompt alignment", "prompt alignment drops without it", "reg-contrastive", "no-hypernet",
     "prompt"),
    ("tuning both parts beats the embedding only", "(our ablation)", "ours", "tune-embedding-only", "combined"),
    ("tuning both parts beats the hyper-weights only", "(our ablation)", "ours", "tune-weights-only", "combined"),
    ("contrastive regularisation beats none", "without it prompt words are ignored", "reg-contrastive", "reg-none",
     "combined"),
    ("contrastive regularisation beats nearest-neighbour pull", "NN pull collapses modes", "reg-contrastive",
     "reg-nn-cosine", "combined"),
    ("contrastive regularisation beats L2 only", "contrastive is best", "reg-contrastive", "reg-l2", "combined"),
]


def ablate(cfg: Config, parent_run_id: str | None = None) -> dict:
    """Run the ablation grid (module docstring); returns the report the CLI prints."""
    a = cfg.ablate
    retrained = variant_results(cfg)
    harness = load_harness(cfg.engine, cfg.evaluate)
    with StageRun(a.experiment, "ablate", parent_run_id, resolved(cfg), cfg.preset) as run:
        p = harness.personalizer
        # the sweep point that is ours' own setting is not run twice
        same_as_ours = (f"alpha-{cfg.encoder.alpha_blend_tune:g}"
                        if cfg.encoder.dual_path and cfg.personalize.alpha_blend is None else None)
        run.add(harness.ours("ours", limit=a.max_concepts), {"encoder": cfg.personalize.encoder})
        for name, variant in tuning_variants(p.config, a.alpha_blends).items():
            if name == same_as_ours:
                run.add(replace(run.results["ours"], name=name), {"same_as": "ours"})
                continue
            run.add(harness.ours(name, p.variant(variant), a.max_concepts), {"encoder": cfg.personalize.encoder})
        concepts = {c.name for c in harness.concepts(a.max_concepts)}
        for name, overrides in retrained_variants(cfg.ablate).items():
            run.add(replace(retrained[name].subset(concepts), grid=retrained[name].grid),
                    {"stored": cfg.evaluate.variant_results, **overrides})
        alpha = choose_alpha(cfg.encoder, run.results)
        tracking.log_metrics(run.client, run.run_id, {"alpha_blend_chosen": alpha["chosen"]}, step=0)
        extra = (f"## Blend sweep\n\nchosen alpha_blend = {alpha['chosen']:g} (config: {alpha['config_default']:g}; "
                 f"best: {alpha['best']:g}, lead over the default: {alpha['lead_over_default']}); "
                 f"criterion: {alpha['criterion']}; scores: {alpha['scores']}")
        result = run.report("Ablations", a.out, report.findings_from(run.results, ABLATION_CLAIMS), len(harness.seeds),
                            extra)
    return {**result, "alpha_blend": alpha}
