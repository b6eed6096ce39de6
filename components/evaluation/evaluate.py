"""The `evaluate` stage: ours, its variants and the optimisation baselines on the held-out concepts.

    evaluate(cfg) -> {"methods": {name: {"identity", "prompt", "seconds", "peak_mb", ...}}, "findings", ...}

Variants of ours that need another encoder (no regulariser, NN pull, no hypernetwork, and `ours-short`,
the default recipe trained as long as they are) are short pre-training runs (components/evaluation/variants.py),
cached by their config. The harness, the MLflow runs and the report: components/evaluation/harness.py.
"""

from __future__ import annotations

from pathlib import Path

from components.config import Config, variant_config
from components.evaluation import report
from components.evaluation.eval_set import check_held_out
from components.evaluation.harness import StageRun, load_harness
from components.evaluation.variants import EVALUATE_RETRAINED, training_session

BASELINES = {"lora": "lora", "ti": "ti", "dreambooth": "dreambooth"}  # row prefix -> components.evaluation.baselines method


def evaluate(cfg: Config, parent_run_id: str | None = None) -> dict:
    """Evaluate ours, its variants and the baselines (module docstring); returns the report the CLI prints."""
    e = cfg.evaluate
    held_out = check_held_out(cfg)
    harness = load_harness(cfg)
    with StageRun(cfg, e.experiment, "evaluate", parent_run_id) as run:
        p = harness.personalizer
        run.add(harness.ours("ours", limit=e.max_concepts))
        run.add(harness.ours("ours-no-tuning", p.variant(variant_config(cfg, personalize={"tuning_steps": 0})),
                             e.max_concepts))
        run.add(harness.ours("ours-no-dual-path", p.variant(variant_config(cfg, encoder={"dual_path": False})),
                             e.max_concepts))
        with training_session(cfg) as train:
            for name, overrides in EVALUATE_RETRAINED.items():
                encoder_dir = train(name, overrides, run.run_id)
                run.add(harness.ours(name, p.variant(cfg, encoder_dir), e.max_concepts), {"encoder": str(encoder_dir)})
        baseline_concepts = e.max_concepts if e.baseline_concepts is None else e.baseline_concepts
        for prefix, method in BASELINES.items():
            for shots, label in ((1, "one-shot"), (e.few_shot_images, "few-shot")):
                run.add(harness.baseline(f"{prefix}-{label}", method, shots, baseline_concepts),
                        {"steps": getattr(e, f"{method}_steps"), "shots": shots})
        curve = time_to_identity(run, harness, baseline_concepts) if e.time_to_identity else None
        extra = report.time_to_identity_markdown(curve, Path(curve["plot"]).name) if curve else ""
        result = run.report("Evaluation", e.out, report.evaluation_findings(run.results), extra,
                            report.time_to_identity_metrics(curve) if curve else None)
    return {**result, "held_out": held_out, **({"time_to_identity": curve} if curve else {})}


def time_to_identity(run: StageRun, harness, concepts: int | None) -> dict:
    """One-shot LoRA and TI after each of `evaluate.time_to_identity_steps` (rows `<prefix>-one-shot-<steps>`, on the
    baselines' concepts) beside ours at 0 and the default tuning steps on the same concepts; the plot and the
    quality-matched speed-ups go to the stage's MLflow run (report/time_to_identity.png), results.md and metrics.json."""
    e = run.cfg.evaluate
    series = {}
    for prefix in ("lora", "ti"):
        series[prefix] = []
        for steps, result in harness.baseline_series(prefix, BASELINES[prefix], e.time_to_identity_steps,
                                                     concepts).items():
            run.add(result, {"steps": steps, "shots": 1})
            series[prefix].append(result.name)
    shared = set(run.results[series["lora"][0]].concept)
    for name in ("ours-no-tuning", "ours"):  # ours on the baselines' concepts
        run.results[f"{name}@baselines"] = run.results[name].subset(shared)
    out = Path(e.out)
    out.mkdir(parents=True, exist_ok=True)
    curve = report.time_to_identity(run.results, series, ["ours-no-tuning@baselines", "ours@baselines"],
                                    out / "time_to_identity.png")
    for name in ("ours-no-tuning@baselines", "ours@baselines"):
        del run.results[name]  # plotted, not rows of the table
    run.client.log_artifact(run.run_id, curve["plot"], "report")
    return curve


