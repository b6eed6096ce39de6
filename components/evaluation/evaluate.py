"""The `baselines` and `evaluate` stages: ours, its variants and the optimisation baselines on the held-out concepts.

    baselines(cfg) -> the optimisation baselines and their time-to-identity series, scored and stored in
                      `evaluate.baseline_results` (work that does not depend on the encoder: done once, committed)
    evaluate(cfg)  -> {"methods": {name: {"identity", "prompt", "seconds", "peak_mb", ...}}, "findings", ...}

`evaluate` scores ours and its tuning variants, and reads the rest from stored results: the baselines' (this module)
and the re-trained variants' (components/evaluation/variants.py, the `variants` stage), each kept with the settings
and model fingerprints it was computed under and refused, with the command to bring it up to date, when those
differ. The harness, the MLflow runs and the report: components/evaluation/harness.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

from components.config import Config, EvaluateConfig, resolved, variant_config
from components.evaluation import report
from components.evaluation.eval_set import check_held_out
from components.evaluation.harness import (
    GRID_PROMPTS,
    Harness,
    StageRun,
    load_harness,
    load_results,
    save_results,
    settings_key,
    stored_key,
)
from components.evaluation.variants import variant_results
from components.model.base import files_fingerprint
from components.training.variants import EVALUATE_RETRAINED


log = logging.getLogger(__name__)

# row prefix -> components.training.baselines method
BASELINES = {"lora": "lora", "ti": "ti", "dreambooth": "dreambooth"}
# what the baselines' scores depend on besides the base and the metrics CLIP (dvc.yaml's `baselines` params)
BASELINE_SETTINGS = {
    "evaluate": ("concepts", "concept_dir", "prompts", "prompts_file", "seeds", "max_concepts", "baseline_concepts",
                 "few_shot_images", "ti_steps", "ti_lr", "lora_steps", "lora_lr", "dreambooth_steps", "dreambooth_lr",
                 "dreambooth_prior_images", "time_to_identity", "time_to_identity_steps", "full", "full_seeds"),
    "personalize": ("describe_scene", "guidance_scale", "guidance_rescale", "num_inference_steps", "scheduler"),
}


def baselines_key(cfg: Config) -> dict:
    return {**settings_key(cfg, BASELINE_SETTINGS), "base": files_fingerprint(cfg.base.pretrained),
            "metrics_clip": files_fingerprint(cfg.base.metrics_clip.pretrained)}


def baselines(cfg: Config, parent_run_id: str | None = None, force: bool = False) -> dict:
    """The `baselines` stage: one- and few-shot TI, LoRA and DreamBooth on the evaluation concepts and, with
    `evaluate.time_to_identity`, one-shot LoRA and TI scored after each of `time_to_identity_steps`; stored in
    `evaluate.baseline_results`. Up to date (same key) it does nothing unless `force`."""
    e = cfg.evaluate
    key = baselines_key(cfg)
    if not force and stored_key(e.baseline_results) == key:
        log.info("baselines: %s is up to date", e.baseline_results)
        return {"up_to_date": True, "out": e.baseline_results}
    harness = load_harness(cfg.engine, e, encoder=False)
    # never more concepts than ours ran on: every comparison with ours is paired on the baselines' concepts
    concepts = min((n for n in (e.baseline_concepts, e.max_concepts) if n is not None), default=None)
    series: dict[str, list[str]] = {}
    with StageRun(e.experiment, "baselines", parent_run_id, resolved(cfg), cfg.preset) as run:
        for prefix, method in BASELINES.items():
            for shots, label in ((1, "one-shot"), (e.few_shot_images, "few-shot")):
                run.add(harness.baseline(f"{prefix}-{label}", method, shots, concepts),
                        {"steps": getattr(e, f"{method}_steps"), "shots": shots})
        if e.time_to_identity:
            for prefix in ("lora", "ti"):
                points = harness.baseline_series(prefix, BASELINES[prefix], e.time_to_identity_steps, concepts)
                for steps, result in points.items():
                    run.add(result, {"steps": steps, "shots": 1})
                series[prefix] = [result.name for result in points.values()]
        path = save_results(e.baseline_results, "baselines", key, run.results, {"series": series})
        run.client.log_artifact(run.run_id, str(path), "results")
        methods = {name: r.summary() for name, r in run.results.items()}
    return {"up_to_date": False, "out": e.baseline_results, "methods": methods, "mlflow_run_id": run.run_id}


def evaluate(cfg: Config, parent_run_id: str | None = None) -> dict:
    """Evaluate ours, its variants and the baselines (module docstring); returns the report the CLI prints."""
    e = cfg.evaluate
    held_out = check_held_out(e, cfg.base.kind, cfg.prepare.out, cfg.toy_world.out)
    stored, extra = load_results(e.baseline_results, "baselines", baselines_key(cfg))
    retrained = variant_results(cfg)
    harness = load_harness(cfg.engine, e)
    with StageRun(e.experiment, "evaluate", parent_run_id, resolved(cfg), cfg.preset) as run:
        p = harness.personalizer
        run.add(harness.ours("ours", limit=e.max_concepts))
        run.add(harness.ours("ours-no-tuning", p.variant(variant_config(p.config, personalize={"tuning_steps": 0})),
                             e.max_concepts))
        run.add(harness.ours("ours-no-dual-path", p.variant(variant_config(p.config, encoder={"dual_path": False})),
                             e.max_concepts))
        for name in EVALUATE_RETRAINED:
            run.add(retrained[name], {"stored": e.variant_results})
        series = extra.get("series", {})
        in_series = {name for names in series.values() for name in names}
        for name, result in stored.items():
            if name not in in_series:
                run.add(result, {"stored": e.baseline_results})
        curve = time_to_identity(run, stored, series, e) if series else None
        extra_md = report.time_to_identity_markdown(curve, Path(curve["plot"]).name) if curve else ""
        result = run.report("Evaluation", e.out, report.evaluation_findings(run.results), len(harness.seeds),
                            extra_md, report.time_to_identity_metrics(curve) if curve else None)
        comparison = comparison_grid(run, harness, [n for n in stored if n not in in_series], e.out)
        if comparison:
            result["report"]["comparison"] = str(comparison)
    return {**result, "held_out": held_out, **({"time_to_identity": curve} if curve else {})}


def comparison_grid(run: StageRun, harness: Harness, baselines: list[str], out: str) -> Path | None:
    """comparison.png under `out` (evaluate.out): the first concept (the baselines run on the first concepts too) as
    ours and each baseline drew it, from their sample grids; logged beside the report."""
    grids = {name: run.results[name].grid for name in ["ours", *baselines] if name in run.results}
    path = report.comparison_grid(grids, harness.eval_set.prompts[:GRID_PROMPTS], harness.concepts(1)[0].name,
                                  Path(out) / "comparison.png")
    if path:
        run.client.log_artifact(run.run_id, str(path), "report")
    return path


def time_to_identity(run: StageRun, stored: dict, series: dict[str, list[str]], e: EvaluateConfig) -> dict:
    """The stored one-shot LoRA and TI series (rows `<prefix>-one-shot-<steps>`) beside ours at 0 and the default
    tuning steps on the same concepts; the plot and the quality-matched speed-ups go to the stage's MLflow run
    (report/time_to_identity.png), results.md and metrics.json."""
    for names in series.values():
        for name in names:
            run.add(stored[name], {"stored": e.baseline_results})
    shared = set(run.results[next(iter(series.values()))[0]].concept)
    for name in ("ours-no-tuning", "ours"):  # ours on the baselines' concepts
        subset = f"{name}{report.BASELINE_SUBSET}"
        run.results[subset] = run.results[name].subset(shared, subset)
    out = Path(e.out)
    out.mkdir(parents=True, exist_ok=True)
    curve = report.time_to_identity(run.results, series, [f"ours-no-tuning{report.BASELINE_SUBSET}",
                                                          f"ours{report.BASELINE_SUBSET}"],
                                    out / "time_to_identity.png")
    for name in (f"ours-no-tuning{report.BASELINE_SUBSET}", f"ours{report.BASELINE_SUBSET}"):
        del run.results[name]  # plotted, not rows of the table
    run.client.log_artifact(run.run_id, curve["plot"], "report")
    return curve
