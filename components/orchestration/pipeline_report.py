"""The pipeline's report, written to `pipeline.report` (report.md, metrics.csv and the images it shows, so the
folder can be sent on as it is): a smoke run says so in its first line; the stages with their wall time and MLflow
runs; the metrics of the evaluate and ablate stages; the trade-off and time-to-identity plots and one sample grid
(ours beside each baseline on one concept); the findings with their rules and counts; the registered model and how
to serve it. The numbers and rules come from components/evaluation/report.py; this module lays them out.
"""

from __future__ import annotations

import base64
import logging
import shutil
from pathlib import Path

import pandas as pd

from components import tracking
from components.config import PipelineConfig
from components.evaluation.metrics import INTERVAL_NOTE
from components.evaluation.report import METRICS, findings_table, smoke_notice


log = logging.getLogger(__name__)

def run_link(run_id: str | None) -> str:
    if not run_id:
        return "-"
    uri = tracking.tracking_uri()
    if uri.startswith("http"):
        from mlflow import MlflowClient  # mlflow: only for a tracking server's link (start-up time)

        experiment = MlflowClient(uri).get_run(run_id).info.experiment_id
        return f"[{run_id[:8]}]({uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id})"
    return f"`{run_id}`"


METRIC_COLUMNS = METRICS  # the same names as the evaluate and ablate runs


def metrics_table(results: dict[str, dict]) -> list[dict]:
    """One row per method of the evaluate and ablate stages: its metrics and the number of concepts behind them."""
    rows = []
    for stage in ("evaluate", "ablate"):
        for method, values in (results.get(stage) or {}).get("methods", {}).items():
            rows.append({"stage": stage, "method": method,
                         **{k: (round(values[k], 4) if isinstance(values.get(k), float) else values.get(k))
                            for k in METRIC_COLUMNS}, "concepts": values.get("concepts")})
    return rows


def image_markdown(title: str, path: str | Path) -> str:
    """A markdown image with the PNG inline (a data URI): it shows wherever the markdown goes (a Prefect
    artifact, a viewer), with no file server behind it."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"![{title}](data:image/png;base64,{data})"


def stage_images(stage: str, result: dict) -> str:
    """The markdown of an evaluate/ablate result's trade-off plot and sample grids (one per method)."""
    plot = Path((result.get("report") or {}).get("plot", ""))
    if not plot.is_file():
        return ""
    lines = [f"# {stage}: identity vs prompt similarity", "", image_markdown(f"{stage} trade-off", plot), "",
             f"*Bars: {INTERVAL_NOTE}.*"]
    for name, title in (("time_to_identity.png", "Time to identity"), ("comparison.png", "Ours beside the baselines")):
        if (plot.parent / name).is_file():
            lines += ["", f"## {title}", "", image_markdown(title, plot.parent / name)]
    lines += ["", "## Sample grids (input, then one image per prompt; a row per concept)"]
    for grid in sorted((plot.parent / "grids").glob("*.png")):
        lines += ["", f"### {grid.stem}", "", image_markdown(grid.stem, grid)]
    return "\n".join(lines) + "\n"


def serve_commands(preset: str, name: str) -> list[str]:
    """How to serve registered model `name`'s champion (a `preset` model): with our server, and MLflow's."""
    uri = tracking.tracking_uri()
    preset = "" if preset == "toy" else f" --preset {preset}"
    return [f"MLFLOW_TRACKING_URI={uri} datencoder serve{preset}",
            f"MLFLOW_TRACKING_URI={uri} mlflow models serve -m models:/{name}@champion --env-manager local"]


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{seconds:.1f} s"


def stage_summary(stage: str, r: dict) -> str:
    """A stage's cell in the report's Stages table: what its result `r` says it produced."""
    if stage == "prepare_data":
        return f"data {r.get('data_version', '-')[:12]}"
    if stage == "pretrain":
        return f"step {r.get('end_step')}, encoder `{r.get('out')}`"
    if stage == "register":
        return f"version {r.get('version')}" + (f" (now {r['alias']})" if r.get("alias") else "")
    if stage == "variants":
        return "up to date" if r.get("up_to_date") else f"{len(r.get('encoders', {}))} encoders scored"
    return "up to date" if r.get("up_to_date") else f"{len(r.get('methods', {}))} methods"


def copied_image(out: Path, source: str | Path | None, title: str, caption: str) -> list[str]:
    """The image copied beside report.md and linked by its name (the folder travels whole), with its caption;
    nothing when the stage did not write it."""
    if not source or not Path(source).is_file():
        return []
    shutil.copy2(source, out / Path(source).name)
    return [f"![{title}]({Path(source).name})", "", f"*{caption}*"]


def write_report(pipeline: PipelineConfig, preset: str, model: str, results: dict[str, dict], parent_run_id: str,
                 flow_run: str, durations: dict[str, float] | None = None) -> dict:
    """report.md + metrics.csv (+ the plots and sample grid) under pipeline.report for a run of `preset` that
    registers `model`; `durations`: each stage flow's wall time in this run (seconds). Returns the markdown, the
    table rows and the paths."""
    out = Path(pipeline.report).resolve()
    out.mkdir(parents=True, exist_ok=True)
    durations = durations or {}
    rows = metrics_table(results)
    table = pd.DataFrame(rows, columns=["stage", "method", *METRIC_COLUMNS, "concepts"])
    table.to_csv(out / "metrics.csv", index=False)
    evaluate = results.get("evaluate") or {}
    notice = smoke_notice(preset, [m["concepts"] for stage in ("evaluate", "ablate")
                                       for m in (results.get(stage) or {}).get("methods", {}).values()
                                       if m.get("concepts")])
    lines = [*([f"**{notice}**", ""] if notice else []), f"# datencoder retrain: {flow_run}", "",
             f"Preset `{preset}`, data version `{(results.get('prepare_data') or {}).get('data_version', '-')}`, "
             f"MLflow `{tracking.tracking_uri()}`, parent run {run_link(parent_run_id)}.", "",
             "## Stages", "",
             "Wall time: each stage flow's time in this run (a stage taken from Prefect's cache or found up to date "
             "shows the time to find that out).", "",
             "| stage | result | wall time | MLflow run |", "|---|---|---|---|"]
    for stage in pipeline.stages:
        r = results.get(stage) or {}
        summary = r.get("skipped") or stage_summary(stage, r)
        lines.append(f"| {stage} | {summary} | {duration(durations.get(stage))} | "
                     f"{run_link(r.get('mlflow_run_id') or r.get('run_id'))} |")
    if durations:
        lines.append(f"| **total** | | **{duration(sum(durations.values()))}** | |")
    if rows:
        columns = [*METRIC_COLUMNS, "concepts"]
        lines += ["", "## Metrics", "", "| stage | method | " + " | ".join(columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        lines += [f"| {r['stage']} | {r['method']} | " + " | ".join(str(r[k]) for k in columns) + " |" for r in rows]
    plot = (evaluate.get("report") or {}).get("plot")
    trade_off = copied_image(out, plot, "trade-off", f"Each method's mean identity and prompt similarity. Bars: "
                             f"{INTERVAL_NOTE}.")
    if trade_off:
        lines += ["", "## Trade-off (identity vs prompt similarity)", "", *trade_off]
    curve = evaluate.get("time_to_identity") or {}
    plot = copied_image(out, curve.get("plot"), "time to identity",
                        f"The one-shot baselines after each step count against ours without and with tuning, on the "
                        f"baselines' concepts (`@baselines`). Bars: {INTERVAL_NOTE}.")
    if plot:
        lines += ["", "## Time to identity", "", *plot, "",
                  "| baseline | first point reaching ours' identity (s) | quality-matched speed-up |", "|---|---|---|"]
        for prefix, q in curve.get("quality_matched", {}).items():
            reached = "never" if q["reached_at_s"] is None else f"{q['reached_at_s']:.2f}"
            speedup = "-" if q["speedup"] is None else f"{'>= ' if q['lower_bound'] else ''}{q['speedup']:.1f}x"
            lines.append(f"| {prefix} | {reached} | {speedup} |")
    grid = copied_image(out, (evaluate.get("report") or {}).get("comparison"), "sample grid",
                        "One evaluation concept: its input photo, then the same prompts and seed for ours and each "
                        "baseline (every method's full grid: outputs/evaluate/grids).")
    if grid:
        lines += ["", "## Samples: ours beside the baselines", "", *grid]
    for stage in ("evaluate", "ablate"):
        findings = (results.get(stage) or {}).get("findings")
        if findings:
            lines += ["", f"## Findings ({stage})", "", *findings_table(findings)]
    reg = results.get("register") or {}
    if reg.get("version"):
        uri = tracking.tracking_uri()
        link = (f"{uri.rstrip('/')}/#/models/{reg['model']}/versions/{reg['version']}" if uri.startswith("http")
                else f"models:/{reg['model']}/{reg['version']}")
        gate = reg.get("gate") or {}
        alias = (f"now `@{reg['alias']}`" if reg.get("alias") else
                 f"no alias: it does not beat `@champion` (version {gate.get('champion_version')}) by more than "
                 f"{gate.get('margin')} on the gate")
        lines += ["", "## Registered model", "", f"`{reg['model']}` version {reg['version']}: {link}; {alias}."]
        if reg.get("alias") == "challenger":
            flag = "" if preset == "toy" else " --preset " + preset
            lines += ["", f"Make it the champion with `datencoder promote{flag}"
                          f" --version {reg['version']}`."]
    lines += ["", "## Serve the champion", "", *(f"    {c}" for c in serve_commands(preset, model))]
    markdown = "\n".join(lines) + "\n"
    (out / "report.md").write_text(markdown)
    return {"markdown": markdown, "rows": rows, "report": str(out / "report.md"), "csv": str(out / "metrics.csv")}
