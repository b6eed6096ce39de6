"""Variants of ours for `evaluate` and `ablate`: tuning-only variants on the committed encoder, and
re-trained encoders (shorter pre-training runs, components/training/pretrain.py, `evaluate.retrain_steps`: a quarter
of the main encoder's by default) compared with the default recipe trained exactly as long, cached under
`evaluate.cache` keyed by pre-training's own run name (base fingerprint, encoder, data version, recipe) and length.

`train_variants` is the `variants` stage (dvc.yaml): it trains them all (DVC keeps the encoders as an output in its
cache) and scores each on the evaluation concepts into `evaluate.variant_results` (small files, committed), with the
settings and recipes they were scored under: `evaluate` and `ablate` read those scores (`variant_results`), so
neither trains nor scores a re-trained encoder, and a fresh clone needs none of their weights.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterator

import ray

from components.config import AblateConfig, Config, EvaluateConfig, variant_config
from components.data.prepare import data_version
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
from components.training.pretrain import connect, pretrain, run_name


log = logging.getLogger(__name__)

# evaluate's re-trained variants of ours: name -> encoder overrides (ours-short: the default recipe, as short)
EVALUATE_RETRAINED: dict[str, dict] = {
    "ours-short": {},
    "ours-no-reg": {"regulariser": "none"},
    "ours-nn-cosine": {"regulariser": "nn-cosine"},
    "ours-no-hypernet": {"use_hypernetwork": False},
}


def retrain_steps(e: EvaluateConfig) -> int:
    return e.full_retrain_steps if e.full else e.retrain_steps


def encoder_variant(cfg: Config, overrides: dict, steps: int) -> tuple[Config, Path]:
    """The pre-training config of a variant and where its trained encoder is cached."""
    variant = cfg.model_copy(update={"encoder": cfg.encoder.model_copy(update=overrides)})
    variant = variant.model_copy(update={"pretrain": variant.pretrain.model_copy(update={
        # a short run warms up for at most a tenth of its length, not the full recipe's 50 steps
        "warmup_steps": min(cfg.pretrain.warmup_steps, max(1, steps // 10))})})
    key = f"{run_name(variant, data_version(cfg.prepare.out))}-{steps}"
    out = Path(cfg.evaluate.cache) / key
    # Ray's checkpoints beside the main run's, not in the cache: the cache holds encoders only (a DVC output)
    variant = variant.model_copy(update={"pretrain": variant.pretrain.model_copy(update={
        "out": str(out / "encoder"), "storage": str(Path(cfg.pretrain.storage) / "variants" / key),
        "max_steps": steps})})
    return variant, out / "encoder"


@contextlib.contextmanager
def training_session(cfg: Config) -> Iterator[Callable[[str, dict, str | None], Path]]:
    """Yields train(name, encoder overrides, parent run id) -> encoder directory, cached; Ray is started
    once, on the first variant that needs training, and stopped at the end if this call started it."""
    started_ray = False
    steps = retrain_steps(cfg.evaluate)

    def train(name: str, overrides: dict, parent_run_id: str | None) -> Path:
        nonlocal started_ray
        variant, encoder_dir = encoder_variant(cfg, overrides, steps)
        if (encoder_dir / "config.json").is_file() and (encoder_dir / "model.safetensors").is_file():
            log.info("%s: cached encoder %s", name, encoder_dir)
            return encoder_dir
        log.info("%s: pre-training a %d-step encoder (%s)", name, steps, overrides or "default recipe")
        if not started_ray:
            started_ray = connect(None)
        pretrain(variant, parent_run_id=parent_run_id)
        return encoder_dir

    try:
        yield train
    finally:
        if started_ray:
            ray.shutdown()


def tuning_variants(cfg: Config) -> dict[str, Config]:
    """Variants that only change tuning or generation, on the committed encoder."""
    variants = {
        "no-tuning": variant_config(cfg, personalize={"tuning_steps": 0}),
        "no-dual-path-tune": variant_config(cfg, encoder={"dual_path": False}),
        # paper Figure 5b: the encoder's prediction alone, plain LoRA + embedding (blend 1)
        "no-dual-path-no-tuning": variant_config(cfg, encoder={"dual_path": False}, personalize={"tuning_steps": 0}),
        "tune-embedding-only": variant_config(cfg, personalize={"tune_parts": "embedding"}),
        "tune-weights-only": variant_config(cfg, personalize={"tune_parts": "weights"}),
    }
    for alpha in cfg.ablate.alpha_blends:
        variants[f"alpha-{alpha:g}"] = variant_config(cfg, encoder={"alpha_blend_tune": alpha, "dual_path": True},
                                                      personalize={"alpha_blend": None})
    return variants


def retrained_variants(a: AblateConfig) -> dict[str, dict]:
    variants = {f"reg-{r}": {"regulariser": r} for r in a.regularisers}
    variants["reg-contrastive"] = {"regulariser": "contrastive"}  # the reference of every re-trained variant
    variants["no-dual-path-train"] = {"dual_path": False}
    variants["no-hypernet"] = {"use_hypernetwork": False}
    return variants


# what the variants' scores depend on besides their encoders' recipes and the metrics CLIP (dvc.yaml's `variants`)
SCORING_SETTINGS = {
    "personalize": ("tuning_steps", "lr", "l2_weight", "l2_reduction", "views", "tune_parts", "timestep_sampling",
                    "prompts", "describe_scene", "encoder_timestep", "predicted_offsets", "alpha_blend",
                    "guidance_scale", "guidance_rescale", "num_inference_steps", "scheduler"),
    "evaluate": ("concepts", "concept_dir", "prompts", "prompts_file", "seeds", "max_concepts", "full", "full_seeds"),
    "ablate": ("concepts",),
}


def wanted_variants(cfg: Config) -> dict[str, dict]:
    """Every re-trained variant of `evaluate` and `ablate`: name -> encoder overrides (several names may share one)."""
    return {**EVALUATE_RETRAINED, **retrained_variants(cfg.ablate)}


def variants_key(cfg: Config) -> dict:
    steps = retrain_steps(cfg.evaluate)
    recipes = {name: encoder_variant(cfg, overrides, steps)[1].parent.name
               for name, overrides in wanted_variants(cfg).items()}
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
    e, wanted = cfg.evaluate, wanted_variants(cfg)
    key = variants_key(cfg)
    report = {"steps": retrain_steps(cfg.evaluate), "cache": e.cache, "out": e.variant_results}
    if not force and stored_key(e.variant_results) == key:
        log.info("variants: %s is up to date", e.variant_results)
        return {**report, "up_to_date": True}
    with training_session(cfg) as train:
        encoders = {name: train(name, overrides, parent_run_id) for name, overrides in wanted.items()}
    harness = load_harness(cfg)
    limit = None if e.max_concepts is None else max(e.max_concepts, cfg.ablate.concepts)
    scored: dict[Path, MethodResult] = {}
    with StageRun(cfg, e.experiment, "variants", parent_run_id) as run:
        for name, encoder_dir in encoders.items():
            if encoder_dir not in scored:  # one scoring per distinct encoder
                scored[encoder_dir] = harness.ours(name, harness.personalizer.variant(cfg, encoder_dir), limit)
            result = scored[encoder_dir]
            run.add(MethodResult(**{**result.to_dict(), "name": name}, grid=result.grid),
                    {"encoder": str(encoder_dir), "retrain_steps": retrain_steps(cfg.evaluate), **wanted[name]})
        path = save_results(e.variant_results, "variants", key, run.results)
        run.client.log_artifact(run.run_id, str(path), "results")
    return {**report, "up_to_date": False, "encoders": {n: str(d) for n, d in encoders.items()}}
