"""Variants of ours for `evaluate` and `ablate`: tuning-only variants on the committed encoder, and
re-trained encoders (shorter pre-training runs, components/training/pretrain.py, `evaluate.retrain_steps`: a quarter
of the main encoder's by default) compared with the default recipe trained exactly as long, cached under
`evaluate.cache` keyed by pre-training's own run name (base fingerprint, encoder, data version, recipe) and length,
so a re-run, or `evaluate` after `ablate`, trains nothing. `train_variants` is the `variants` stage (dvc.yaml): it
trains them all, and DVC keeps the cache as that stage's output.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterator

import ray

from components.config import Config, variant_config
from components.data.prepare import data_version
from components.training.pretrain import connect, pretrain, run_name

log = logging.getLogger(__name__)

# evaluate's re-trained variants of ours: name -> encoder overrides (ours-short: the default recipe, as short)
EVALUATE_RETRAINED: dict[str, dict] = {
    "ours-short": {},
    "ours-no-reg": {"regulariser": "none"},
    "ours-nn-cosine": {"regulariser": "nn-cosine"},
    "ours-no-hypernet": {"use_hypernetwork": False},
}


def retrain_steps(cfg: Config) -> int:
    e = cfg.evaluate
    return e.full_retrain_steps if e.full else e.retrain_steps


def encoder_variant(cfg: Config, overrides: dict, steps: int) -> tuple[Config, Path]:
    """The pre-training config of a variant and where its trained encoder is cached."""
    variant = cfg.model_copy(update={"encoder": cfg.encoder.model_copy(update=overrides)})
    variant = variant.model_copy(update={"pretrain": variant.pretrain.model_copy(update={
        # a short run warms up for at most a tenth of its length, not the full recipe's 50 steps
        "warmup_steps": min(cfg.pretrain.warmup_steps, max(1, steps // 10))})})
    key = f"{run_name(variant, data_version(cfg.pretrain.data))}-{steps}"
    out = Path(cfg.evaluate.cache) / key
    # Ray's checkpoints beside the main run's, not in the cache: the cache holds encoders only (a DVC output)
    variant = variant.model_copy(update={"pretrain": variant.pretrain.model_copy(update={
        "out": str(out / "encoder"), "storage": str(Path(cfg.pretrain.storage) / "variants" / key),
        "max_steps": steps})})
    return variant, out / "encoder"


@contextlib.contextmanager
def training_session(cfg: Config) -> Iterator[Callable[[str, dict, str | None], Path]]:
    """Yields train(name, encoder overrides, parent run id) -> encoder directory, cached; Ray is started
    once, on the first variant that needs training, and stopped at the end if this session started it."""
    started_ray = False
    steps = retrain_steps(cfg)

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


def retrained_variants(cfg: Config) -> dict[str, dict]:
    variants = {f"reg-{r}": {"regulariser": r} for r in cfg.ablate.regularisers}
    variants["reg-contrastive"] = {"regulariser": "contrastive"}  # the reference of every re-trained variant
    variants["no-dual-path-train"] = {"dual_path": False}
    variants["no-hypernet"] = {"use_hypernetwork": False}
    return variants


def train_variants(cfg: Config, parent_run_id: str | None = None) -> dict:
    """The `variants` stage: every re-trained encoder of `evaluate` and `ablate` (variants sharing a recipe train
    once) into `evaluate.cache`; returns {"steps", "cache", "encoders": {variant name: directory}}."""
    wanted = {**EVALUATE_RETRAINED, **retrained_variants(cfg)}
    with training_session(cfg) as train:
        encoders = {name: str(train(name, overrides, parent_run_id)) for name, overrides in wanted.items()}
    return {"steps": retrain_steps(cfg), "cache": cfg.evaluate.cache, "encoders": encoders}
