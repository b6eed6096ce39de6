"""Variants of ours for `evaluate` and `ablate`: tuning-only variants on the committed encoder, and re-trained
encoders (components/training/variants.py trains them) compared with the default recipe trained exactly as long.

`train_variants` is the `variants` stage (dvc.yaml): it trains them all (DVC keeps the encoders as an output in its
cache) and scores each on the evaluation concepts into `evaluate.variant_results` (small files, committed), with the
settings and recipes they were scored under: `evaluate` and `ablate` read those scores (`variant_results`), so
neither trains nor scores a re-trained encoder, and a fresh clone needs none of their weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

from components.config import Config, EngineConfig, resolved, variant_config
from components.evaluation.harness import (
    MethodResult,
    StageRun,
    load_harness,
    load_results,
    save_results,
    settings_key,
    stored_key,
)
from components.model.base import files_fingerprint
from components.training.variants import encoder_variant, retrain_steps, training_session, wanted_variants


log = logging.getLogger(__name__)


def tuning_variants(engine: EngineConfig, alpha_blends: list[float]) -> dict[str, EngineConfig]:
    """Variants that only change tuning or generation, on the committed encoder; `alpha_blends`: the blend sweep
    (ablate.alpha_blends)."""
    variants = {
        "no-tuning": variant_config(engine, personalize={"tuning_steps": 0}),
        "no-dual-path-tune": variant_config(engine, encoder={"dual_path": False}),
        # paper Figure 5b: the encoder's prediction alone, plain LoRA + embedding (blend 1)
        "no-dual-path-no-tuning": variant_config(engine, encoder={"dual_path": False},
                                                 personalize={"tuning_steps": 0}),
        "tune-embedding-only": variant_config(engine, personalize={"tune_parts": "embedding"}),
        "tune-weights-only": variant_config(engine, personalize={"tune_parts": "weights"}),
    }
    for alpha in alpha_blends:
        variants[f"alpha-{alpha:g}"] = variant_config(engine, encoder={"alpha_blend_tune": alpha, "dual_path": True},
                                                      personalize={"alpha_blend": None})
    return variants


# what the variants' scores depend on besides their encoders' recipes and the metrics CLIP (dvc.yaml's `variants`)
SCORING_SETTINGS = {
    "personalize": ("tuning_steps", "lr", "l2_weight", "l2_reduction", "views", "tune_parts", "timestep_sampling",
                    "prompts", "describe_scene", "encoder_timestep", "predicted_offsets", "alpha_blend",
                    "guidance_scale", "guidance_rescale", "num_inference_steps", "scheduler"),
    "evaluate": ("concepts", "concept_dir", "prompts", "prompts_file", "seeds", "max_concepts", "full", "full_seeds"),
    "ablate": ("max_concepts",),
}


def variants_key(cfg: Config) -> dict:
    steps = retrain_steps(cfg.evaluate)
    recipes = {name: encoder_variant(cfg, overrides, steps)[1].parent.name
               for name, overrides in wanted_variants(cfg.ablate).items()}
    return {**settings_key(cfg, SCORING_SETTINGS), "encoder.alpha_blend_tune": cfg.encoder.alpha_blend_tune,
            "recipes": recipes, "metrics_clip": files_fingerprint(cfg.base.metrics_clip.pretrained)}


def variant_results(cfg: Config) -> dict[str, MethodResult]:
    """The stored scores of every re-trained variant (name -> result), current for `cfg` or a UserError."""
    return load_results(cfg.evaluate.variant_results, "variants", variants_key(cfg))[0]


def train_variants(cfg: Config, parent_run_id: str | None = None, force: bool = False) -> dict:
    """The `variants` stage: every re-trained encoder of `evaluate` and `ablate` (variants sharing a recipe train
    once) into `evaluate.cache`, each scored on the evaluation concepts (as many as `evaluate` or `ablate` uses) into
    `evaluate.variant_results`; with the same key stored, nothing is trained or scored unless `force`. Returns
    {"steps", "cache", "out", "encoders": {variant name: directory}, "up_to_date"}."""
    e, wanted = cfg.evaluate, wanted_variants(cfg.ablate)
    key = variants_key(cfg)
    report = {"steps": retrain_steps(cfg.evaluate), "cache": e.cache, "out": e.variant_results}
    if not force and stored_key(e.variant_results) == key:
        log.info("variants: %s is up to date", e.variant_results)
        return {**report, "up_to_date": True}
    with training_session(cfg) as train:
        encoders = {name: train(name, overrides, parent_run_id) for name, overrides in wanted.items()}
    harness = load_harness(cfg.engine, e)
    limit = None if e.max_concepts is None else max(e.max_concepts, cfg.ablate.max_concepts)
    scored: dict[Path, MethodResult] = {}
    with StageRun(e.experiment, "variants", parent_run_id, resolved(cfg), cfg.preset) as run:
        for name, encoder_dir in encoders.items():
            if encoder_dir not in scored:  # one scoring per distinct encoder
                scored[encoder_dir] = harness.ours(name, harness.personalizer.variant(cfg.engine, encoder_dir), limit)
            result = scored[encoder_dir]
            run.add(MethodResult(**{**result.to_dict(), "name": name}, grid=result.grid),
                    {"encoder": str(encoder_dir), "retrain_steps": retrain_steps(cfg.evaluate), **wanted[name]})
        path = save_results(e.variant_results, "variants", key, run.results)
        run.client.log_artifact(run.run_id, str(path), "results")
    return {**report, "up_to_date": False, "encoders": {n: str(d) for n, d in encoders.items()}}
