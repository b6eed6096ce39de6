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

from huggingface_hub import try_to_load_from_cache
from transformers import CLIPTokenizer

from components import home
from components.config import BaseConfig, Config, PersonalizeConfig, RegistryConfig
from components.data.images import read_file
from components.errors import UserError
from components.inference.engine import Personalizer, check_prompts, check_value, slug
from components.inference.export import export_concept, token_for
from components.inference.generate import SCHEDULERS
from components.memory import peak_mb
from components.model.base import load_pipeline
from components.model.placeholder import PromptEncoder
from components.serving import registry


def base_tokenizer(base: BaseConfig):
    """The base model's tokenizer alone (no weights), to check prompts before any model loads. A base that is
    not there (no model_index.json in its directory or the local Hugging Face cache) fails here with the
    loader's own message: which path or id, and how to provide it."""
    local = Path(base.pretrained).expanduser()
    if local.is_dir():
        found = (local / "model_index.json").is_file()
    else:
        try:
            cached = try_to_load_from_cache(base.pretrained, "model_index.json", revision=base.revision)
            found = isinstance(cached, str)
        except ValueError:  # not a hub id either
            found = False
    if not found:
        if home.holds(local):
            raise UserError(home.missing("the toy base model", local))
        load_pipeline(base)  # raises the base's own error (there is nothing to load)
    source = {"pretrained_model_name_or_path": str(local / "tokenizer")} if local.is_dir() else \
        {"pretrained_model_name_or_path": base.pretrained, "subfolder": "tokenizer", "revision": base.revision}
    return CLIPTokenizer.from_pretrained(**source, local_files_only=True)


def resolve_model(personalize: PersonalizeConfig, base: BaseConfig, registry_config: RegistryConfig, preset: str,
                  model: str | None = None) -> str:
    """What `personalize` runs: `model` (an MLflow model URI or an encoder directory), or by default the registered
    champion when the tracking store has one, else `personalize.encoder`. A missing default encoder is reported
    after a missing base, whose message says how to provide the weights."""
    if model is None:
        model = registry.champion_uri(registry_config, preset) or personalize.encoder
        if not registry.is_model_uri(model) and not Path(model).is_dir():
            base_tokenizer(base)
            if home.holds(model):
                raise UserError(home.missing("the committed toy encoder", model))
            name = registry.model_name(registry_config, preset)
            raise UserError(f"no encoder to personalise with: the MLflow store has no {name}@{registry.ALIAS} and "
                            f"{model} does not exist; run the pipeline first "
                            f"(`datencoder pretrain`, then `datencoder register`), or pass --model")
    if not registry.is_model_uri(model) and not (Path(model) / "config.json").is_file():
        raise UserError(f"--model {model}: not an MLflow model URI nor an encoder directory (no config.json)")
    return model


def personalize(cfg: Config, images: str | list[str], prompts: list[str], model: str | None = None,
                out: str | None = None, export: str | None = None, scheduler: str | None = None,
                trust_model_code: bool = False, **params: Any) -> dict:
    """The stage: personalise the concept in `images` (one photo, or several of the same concept) for
    `prompts`, write PNGs to `out` (and the concept to `export`). The photos, the request parameters and
    (when the config names the base) the prompts are checked before any model loads."""
    photos = [read_file(image, cfg.personalize.max_pixels)
              for image in ([images] if isinstance(images, str) else images)]
    for name, value in params.items():
        if value is not None:
            check_value(name, value)
    model = resolve_model(cfg.personalize, cfg.base, cfg.registry, cfg.preset, model)
    if registry.is_model_uri(model):  # its logged config names the base: the prompts are checked once it is loaded
        personalizer = registry.load_pyfunc_personalizer(model, trust_model_code, cfg.runtime)
    else:
        check_prompts(prompts, PromptEncoder(base_tokenizer(cfg.base), None))
        personalizer = Personalizer(cfg.engine, model)
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
        "model": model,
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
