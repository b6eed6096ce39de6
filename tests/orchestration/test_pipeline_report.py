"""The pipeline report (components/orchestration/pipeline_report.py): findings as a markdown table with their rules and
counts, a smoke run's first line, the plots and the sample grid beside report.md, the stages' wall times; the stage
plots as markdown with the images inline (what the Prefect artifacts carry)."""

from __future__ import annotations

import base64

import numpy as np
from PIL import Image

from components.config import load_config
from components.evaluation import report as evaluation_report
from components.evaluation.harness import MethodResult, sample_grid
from components.evaluation.report import compare, method_metrics
from components.orchestration.pipeline_report import stage_images, write_report
from components.toy import world as tw


def test_findings_render_as_a_table_and_plots_inline(tmp_path):
    better = MethodResult("ours", identity=[0.8, 0.82, 0.79], prompt=[0.5, 0.52, 0.5], concept=["a", "b", "c"],
                          concept_seconds=[1.0])
    worse = MethodResult("ours-no-tuning", identity=[0.6, 0.61, 0.62], prompt=[0.5, 0.51, 0.49],
                         concept=["a", "b", "c"], concept_seconds=[0.5])
    finding = compare("tuning raises identity", "about +20%", better, worse, "identity")
    methods = {"ours": better.summary(), "ours-no-tuning": worse.summary()}
    cfg = load_config("smoke", overrides={"pipeline": {"report": str(tmp_path / "pipeline")}})
    report = write_report(cfg.pipeline, cfg.preset, "datencoder-smoke",
                          {"evaluate": {"methods": methods, "findings": [finding]}}, "run-id", "flow-run")
    lines = report["markdown"].splitlines()
    header = lines.index("| claim | paper | metric | methods | rests on | values | change % [95%] | rule | status | "
                         "magnitude vs paper |")
    row = lines[header + 2]
    assert row.startswith("| tuning raises identity | about +20% | identity | ours vs ours-no-tuning | "
                          "3 concepts, 3 samples | 0.8033 vs 0.61 | ")
    assert f"| {finding['change_pct']}" in row and "| reproduced |" in row
    assert f"| {evaluation_report.PAIRED_RULE} |" in row
    assert "{'claim'" not in report["markdown"]  # no raw dicts
    assert method_metrics(methods)["ours/identity"] == methods["ours"]["identity"]

    out = tmp_path / "evaluate"
    (out / "grids").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(out / "tradeoff.png")
    Image.new("RGB", (16, 8), (0, 0, 255)).save(out / "grids" / "ours.png")
    markdown = stage_images("evaluate", {"report": {"plot": str(out / "tradeoff.png")}})
    images = [part.split(")")[0] for part in markdown.split("(data:image/png;base64,")[1:]]
    assert len(images) == 2 and "### ours" in markdown
    assert base64.b64decode(images[0]) == (out / "tradeoff.png").read_bytes()
    assert stage_images("evaluate", {"report": {}}) == ""  # a stage without a plot publishes nothing


def toy_method(name: str, colour: str, concepts: list[str], prompts: int, seconds: float, identity: float,
               ) -> MethodResult:
    """A method's scores on `concepts` x `prompts` and its sample grid: toy renders, `colour` for the drawn images."""
    result = MethodResult(name, concept_seconds=[seconds] * len(concepts))
    rows = []
    for i, concept in enumerate(concepts):
        result.identity += [identity + 0.05 * i + 0.01 * p for p in range(prompts)]
        result.prompt += [0.5 + 0.02 * p for p in range(prompts)]
        result.concept += [concept] * prompts
        photo = tw.render(tw.canonical(tw.ToyConcept("star", "red")), 64)
        drawn = tw.render(tw.canonical(tw.ToyConcept("star", colour)), 64)
        rows.append((Image.fromarray(photo) if not isinstance(photo, Image.Image) else photo,
                     [np.asarray(drawn)] * prompts))
    result.grid = sample_grid(rows)
    return result


def test_smoke_report_says_so_and_shows_the_plots_grid_and_stage_times(tmp_path):
    """A smoke report opens with "SMOKE RUN"; the report links the trade-off and time-to-identity plots and the
    sample grid (ours beside each baseline), copied beside report.md, and tables each stage's wall time; the finding
    on the baselines' one concept names ours `ours@baselines` with its own value, not the table's row."""
    prompts = ["S* on a beach", "two S* on grass"]
    ours = toy_method("ours", "red", ["a", "b"], 2, 0.9, 0.3)
    results = {r.name: r for r in (
        ours, toy_method("ours-no-tuning", "blue", ["a", "b"], 2, 0.02, 0.2),
        toy_method("lora-one-shot", "green", ["a"], 2, 24.2, 0.25),
        toy_method("ti-one-shot", "yellow", ["a"], 2, 30, 0.4),
        toy_method("lora-one-shot-1", "green", ["a"], 2, 12.0, 0.22),
        toy_method("lora-one-shot-2", "green", ["a"], 2, 24.2, 0.25))}
    cfg = load_config("smoke", overrides={"pipeline": {"report": str(tmp_path / "pipeline")},
                                          "evaluate": {"out": str(tmp_path / "evaluate")}})
    out = tmp_path / "evaluate"
    findings = evaluation_report.evaluation_findings(results)
    files = evaluation_report.write_report(out, "Evaluation", results, findings, cfg.preset)
    for name in ("ours-no-tuning", "ours"):
        results[f"{name}@baselines"] = results[name].subset({"a"}, f"{name}@baselines")
    curve = evaluation_report.time_to_identity(results, {"lora": ["lora-one-shot-1", "lora-one-shot-2"]},
                                               ["ours-no-tuning@baselines", "ours@baselines"],
                                               out / "time_to_identity.png")
    comparison = evaluation_report.comparison_grid(
        {n: results[n].grid for n in ("ours", "lora-one-shot", "ti-one-shot")}, prompts, "a", out / "comparison.png")
    assert Image.open(comparison).size[0] > 400  # rendered, with room for its titles
    evaluate = {"methods": {n: r.summary() for n, r in results.items() if "@" not in n}, "findings": findings,
                "report": {"plot": str(files["plot"]), "comparison": str(comparison)}, "time_to_identity": curve}
    durations = {"prepare_data": 62.4, "pretrain": 3.2, "evaluate": 754.0}
    report = write_report(cfg.pipeline, cfg.preset, "datencoder-smoke", {"evaluate": evaluate}, "run-id", "flow-run",
                          durations)
    markdown, folder = report["markdown"], tmp_path / "pipeline"
    first = markdown.splitlines()[0]
    assert "SMOKE RUN" in first and "preset smoke: 1-2 concepts" in first and "not meaningful" in first
    for title, name in (("trade-off", "tradeoff.png"), ("time to identity", "time_to_identity.png"),
                        ("sample grid", "comparison.png")):
        assert f"![{title}]({name})" in markdown and (folder / name).read_bytes() == (out / name).read_bytes()
    assert "95% bootstrap interval over concepts" in markdown  # the plots' captions say what the bars are
    lines = markdown.splitlines()
    header = lines.index("| stage | result | wall time | MLflow run |")
    table = lines[header + 2:lines.index("", header)]
    stage_rows = {cells[0]: cells[2] for cells in ([c.strip() for c in row.strip("|").split("|")] for row in table)}
    assert stage_rows["prepare_data"] == "1 min 02 s" and stage_rows["pretrain"] == "3.2 s"
    assert stage_rows["evaluate"] == "12 min 34 s" and stage_rows["**total**"] == "**13 min 40 s**"
    lora = next(line for line in lines if line.startswith("| ours at least matches one-shot LoRA on identity |"))
    # ours on concept a (0.305), not the table's row over a and b (0.33)
    assert "| ours@baselines vs lora-one-shot | 1 concept, 2 samples | 0.305 vs 0.255 |" in lora
    assert "| evaluate | ours | 0.33 |" in markdown and "| 0.9 | " in markdown  # the row: 2 concepts
    assert "| evaluate | lora-one-shot | 0.255 | 0.51 | 24.2 | 0.0 | 1 |" in markdown
    speed = next(line for line in lines if line.startswith("| ... at a fraction of its time |"))
    assert "| 0.9 s vs 24.2 s |" in speed and "(ratio 0.037)" in speed and "| reproduced |" in speed

    toy = load_config("toy", overrides={"pipeline": {"report": str(tmp_path / "toy")}})
    toy_report = write_report(toy.pipeline, toy.preset, "datencoder-toy", {"evaluate": evaluate}, "run-id", "flow-run")
    assert toy_report["markdown"].startswith(
        "# datencoder retrain: flow-run")
