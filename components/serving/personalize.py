"""The `personalize` command: resolve the model to run (the registered champion, an MLflow model URI or an
encoder directory), personalise one image for the prompts, write the PNGs (and, if asked, the export).

    report = personalize(cfg, "photo.png", ["S* on a beach"], export="out/concept")

The engine itself (components/inference/engine.py) knows nothing of the registry; choosing which encoder
to load is a serving decision and lives here.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from components.config import Config
from components.data.images import read_bytes
from components.errors import UserError
from components.inference.engine import Personalizer, slug
from components.inference.export import export_concept, token_for
from components.inference.generate import SCHEDULERS
from components.memory import peak_mb
from components.serving import registry


def load_personalizer(cfg: Config, model: str | None = None, trust: bool = False) -> tuple[Personalizer, str]:
    """The Personalizer for `model`: an MLflow model URI, an encoder directory, or by default the registered
    champion when the tracking store has one, else `personalize.encoder`. Returns it and what was loaded.
    A logged model's code must be this project's unless `trust` (registry.trusted_model_dir)."""
    if model is None:
        model = registry.champion_uri(cfg) or cfg.personalize.encoder
        if not registry.is_model_uri(model) and not Path(model).is_dir():
            raise UserError(f"no encoder to personalise with: the MLflow store has no {registry.model_name(cfg)}@"
                            f"{registry.ALIAS} and {model} does not exist; run the pipeline first "
                            f"(`datencoder pretrain`, then `datencoder register`), or pass --model")
    if registry.is_model_uri(model):
        return registry.load_pyfunc_personalizer(model, trust, cfg.runtime), model
    if not (Path(model) / "config.json").is_file():
        raise UserError(f"--model {model}: not an MLflow model URI nor an encoder directory (no config.json)")
    return Personalizer(cfg, model), model


def personalize(cfg: Config, images: str | list[str], prompts: list[str], model: str | None = None,
                out: str | None = None, export: str | None = None, scheduler: str | None = None,
                trust_model_code: bool = False, **params: Any) -> dict:
    """The stage: personalise the concept in `images` (one photo, or several of the same concept) for
    `prompts`, write PNGs to `out` (and the concept to `export`)."""
    photos = [read_bytes(image) for image in ([images] if isinstance(images, str) else images)]
    personalizer, loaded = load_personalizer(cfg, model, trust_model_code)
    settings = personalizer.settings(scheduler=scheduler, **params)
    result = personalizer.run(photos, prompts, settings)
    out_dir = Path(out or cfg.personalize.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for i, generated in enumerate(result.images):
        path = out_dir / f"{result.image_sha256[:8]}-{i:02d}-{slug(generated.prompt)}-{generated.seed}.png"
        path.write_bytes(generated.png())
        images.append({"path": str(path), "prompt": generated.prompt, "seed": generated.seed})
    report = {
        "model": loaded,
        "photos": len(photos),
        "images": images,
        "seed": settings.seed,
        "settings": asdict(settings),
        "cached": result.cached,
        "generation": {"num_inference_steps": settings.num_inference_steps, "guidance_scale": settings.guidance_scale,
                       "guidance_rescale": settings.guidance_rescale, "scheduler": SCHEDULERS[settings.scheduler],
                       "alpha_blend": settings.alpha_blend},
        "timings": result.timings,
        "runtime": personalizer.runtime.describe(),
    }
    if export:
        report["export"] = export_concept(result.concept, export, token=token_for(result.image_sha256))
    report["peak_rss_mb"] = round(peak_mb(), 1)
    return report
