"""Re-trained encoders for `evaluate` and `ablate`: shorter pre-training runs (components/training/pretrain.py,
`evaluate.retrain_steps`: a quarter of the main encoder's by default) of the default recipe and of each variant,
trained exactly as long, cached under `evaluate.cache` keyed by pre-training's own run name (base fingerprint,
encoder, data version, recipe) and length. components/evaluation/variants.py scores them (the `variants` stage).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterator

import ray

from components.config import AblateConfig, Config, EvaluateConfig, variant_config
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


def retrain_steps(e: EvaluateConfig) -> int:
    return e.full_retrain_steps if e.full else e.retrain_steps


def encoder_variant(cfg: Config, overrides: dict, steps: int) -> tuple[Config, Path]:
    """The pre-training config of a variant and where its trained encoder is cached."""
    # a short run warms up for at most a tenth of its length, not the full recipe's 50 steps
    variant = variant_config(cfg, encoder=overrides,
                             pretrain={"warmup_steps": min(cfg.pretrain.warmup_steps, max(1, steps // 10))})
    key = f"{run_name(variant.training, data_version(cfg.prepare.out))}-{steps}"
    out = Path(cfg.evaluate.cache) / key
    # Ray's checkpoints beside the main run's, not in the cache: the cache holds encoders only (a DVC output)
    # (a string join: storage may be an s3:// URI, which Path would fold to s3:/)
    variant = variant_config(variant, pretrain={"storage": f"{cfg.pretrain.storage.rstrip('/')}/variants/{key}",
                                                "max_steps": steps},
                             personalize={"encoder": str(out / "encoder")})
    return variant, out / "encoder"


def retrained_variants(a: AblateConfig) -> dict[str, dict]:
    variants = {f"reg-{r}": {"regulariser": r} for r in a.regularisers}
    variants["reg-contrastive"] = {"regulariser": "contrastive"}  # the reference of every re-trained variant
    variants["no-dual-path-train"] = {"dual_path": False}
    variants["no-hypernet"] = {"use_hypernetwork": False}
    return variants


def wanted_variants(a: AblateConfig) -> dict[str, dict]:
    """Every re-trained variant of `evaluate` and `ablate`: name -> encoder overrides (several names may share one)."""
    return {**EVALUATE_RETRAINED, **retrained_variants(a)}


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
