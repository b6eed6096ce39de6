"""The pipeline's report: a metrics table of the evaluate and ablate stages, their findings, the
registered model and how to serve it, written to `pipeline.report` (report.md, metrics.csv).
"""

from __future__ import annotations

import base64
import logging
import shutil
from pathlib import Path

from components import tracking
from components.config import Config
from components.evaluation.report import METRICS, findings_table
from components.serving.registry import model_name

log = logging.getLogger(__name__)

def run_link(run_id: str | None) -> str:
    if not run_id:
        return "-"
    uri = tracking.tracking_uri()
    if uri.startswith("http"):
        from mlflow import MlflowClient

        experiment = MlflowClient(uri).get_run(run_id).info.experiment_id
        return f"[{run_id[:8]}]({uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id})"
    return f"`{run_id}`"


METRIC_COLUMNS = METRICS  # the same names as the evaluate and ablate runs


def metrics_table(results: dict[str, dict]) -> list[dict]:
    """One row per method of the evaluate and ablate stages."""
    rows = []
    for stage in ("evaluate", "ablate"):
        for method, values in (results.get(stage) or {}).get("methods", {}).items():
            rows.append({"stage": stage, "method": method,
                         **{k: (round(values[k], 4) if isinstance(values.get(k), float) else values.get(k))
                            for k in METRIC_COLUMNS}})
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
             "## Sample grids (input, then one image per prompt; a row per concept)"]
    for grid in sorted((plot.parent / "grids").glob("*.png")):
        lines += ["", f"### {grid.stem}", "", image_markdown(grid.stem, grid)]
    return "\n".join(lines) + "\n"


def serve_commands(cfg: Config) -> list[str]:
    uri, name = tracking.tracking_uri(), model_name(cfg)
    preset = "" if cfg.preset == "toy" else f" --preset {cfg.preset}"
    return [f"MLFLOW_TRACKING_URI={uri} datencoder serve{preset}",
            f"MLFLOW_TRACKING_URI={uri} mlflow models serve -m models:/{name}@champion --env-manager local"]


def write_report(cfg: Config, results: dict[str, dict], parent_run_id: str, flow_run: str) -> dict:
    """report.md + metrics.csv (+ the trade-off plot) under pipeline.report; returns the markdown, the
    table rows and the paths."""
    import pandas as pd

    out = Path(cfg.pipeline.report).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = metrics_table(results)
    pd.DataFrame(rows, columns=["stage", "method", *METRIC_COLUMNS]).to_csv(out / "metrics.csv", index=False)
    lines = [f"# datencoder retrain: {flow_run}", "",
             f"Preset `{cfg.preset}`, data version `{(results.get('prepare_data') or {}).get('data_version', '-')}`, "
             f"MLflow `{tracking.tracking_uri()}`, parent run {run_link(parent_run_id)}.", "",
             "| stage | result | MLflow run |", "|---|---|---|"]
    for stage in cfg.pipeline.stages:
        r = results.get(stage) or {}
        summary = r.get("skipped") or {"prepare_data": lambda: f"data {r.get('data_version', '-')[:12]}",
                                       "pretrain": lambda: f"step {r.get('end_step')}, encoder `{r.get('out')}`",
                                       "register": lambda: f"version {r.get('version')}" + (
                                           f" (now {r['alias']})" if r.get("alias") else ""),
                                       }.get(stage, lambda: f"{len(r.get('methods', {}))} methods")()
        lines.append(f"| {stage} | {summary} | {run_link(r.get('mlflow_run_id') or r.get('run_id'))} |")
    if rows:
        lines += ["", "## Metrics", "", "| stage | method | " + " | ".join(METRIC_COLUMNS) + " |",
                  "|---|---|" + "---|" * len(METRIC_COLUMNS)]
        lines += [f"| {r['stage']} | {r['method']} | " + " | ".join(str(r[k]) for k in METRIC_COLUMNS) + " |"
                  for r in rows]
    plot = ((results.get("evaluate") or {}).get("report") or {}).get("plot")
    if plot and Path(plot).is_file():
        shutil.copy2(plot, out / Path(plot).name)
        lines += ["", "## Trade-off (identity vs prompt similarity)", "", f"![trade-off]({out / Path(plot).name})"]
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
            lines += ["", f"Make it the champion with `datencoder promote{'' if cfg.preset == 'toy' else ' --preset ' + cfg.preset}"
                          f" --version {reg['version']}`."]
    lines += ["", "## Serve the champion", "", *(f"    {c}" for c in serve_commands(cfg))]
    markdown = "\n".join(lines) + "\n"
    (out / "report.md").write_text(markdown)
    return {"markdown": markdown, "rows": rows, "report": str(out / "report.md"), "csv": str(out / "metrics.csv")}
