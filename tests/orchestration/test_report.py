"""The pipeline report (components/orchestration/report.py): findings as a markdown table, the stage plots
as markdown with the images inline (what the Prefect artifacts carry)."""

from __future__ import annotations

import base64

from PIL import Image

from components.config import load_config
from components.evaluation.harness import MethodResult
from components.evaluation.report import compare, method_metrics
from components.orchestration.report import stage_images, write_report


def test_findings_render_as_a_table_and_plots_inline(tmp_path):
    better = MethodResult("ours", identity=[0.8, 0.82, 0.79], prompt=[0.5, 0.52, 0.5], concept=["a", "b", "c"],
                          concept_seconds=[1.0])
    worse = MethodResult("ours-no-tuning", identity=[0.6, 0.61, 0.62], prompt=[0.5, 0.51, 0.49],
                         concept=["a", "b", "c"], concept_seconds=[0.5])
    finding = compare("tuning raises identity", "about +20%", better, worse, "identity")
    methods = {"ours": better.summary(), "ours-no-tuning": worse.summary()}
    cfg = load_config("smoke", overrides={"pipeline": {"report": str(tmp_path / "pipeline")}})
    report = write_report(cfg, {"evaluate": {"methods": methods, "findings": [finding]}}, "run-id", "flow-run")
    lines = report["markdown"].splitlines()
    header = lines.index("| claim | paper | metric | methods | values | change % [95%] | status | magnitude vs paper |")
    row = lines[header + 2]
    assert row.startswith("| tuning raises identity | about +20% | identity | ours vs ours-no-tuning | ")
    assert f"| {finding['change_pct']}" in row and "| reproduced |" in row
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
