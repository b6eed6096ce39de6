"""DVC experiments (issue 24): the project's `evaluate` stage from dvc.yaml, run by a real `dvc exp run` in a
temporary git repository at smoke size (random-weight smoke models, the re-trained variants' encoders
seeded as the `variants` stage's output and committed, so nothing trains on Ray), then compared with
`dvc exp show`, `dvc metrics diff` and `dvc plots diff` as a team would. A smoke evaluate is minutes on 2 cores:
marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from smoke_models import seed_encoder_cache, smoke_evaluation_setup

from components.config import load_config
from components.orchestration.workspace import project_stages, workspace_params
from components.training.variants import wanted_variants


BIN = Path(sys.executable).parent


def run(repo: Path, *argv: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    assert not check or done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-4000:])
    return done


def dvc(repo: Path, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return run(repo, str(BIN / "dvc"), *args, env=env, check=check)


@pytest.fixture(scope="module")
def experiment_repo(tmp_path_factory):
    """A git + DVC repository holding the project's evaluate stage and a smoke params.yaml."""
    tmp = tmp_path_factory.mktemp("dvc-experiments")
    config_file = smoke_evaluation_setup(tmp)
    values = yaml.safe_load(config_file.read_text())
    # one concept per method; the report and the `baselines` and `variants` stages' outputs inside the repository,
    # where DVC tracks them
    values["evaluate"].update({"out": "outputs/evaluate", "max_concepts": 1, "cache": "models/ablation-encoders",
                               "baseline_results": "outputs/baselines", "variant_results": "outputs/variants"})
    repo = tmp / "repo"
    repo.mkdir()
    cfg = load_config(path=config_file, overrides=values)
    seed_encoder_cache(cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(
        update={"cache": str(repo / cfg.evaluate.cache)})}))
    (repo / "params.yaml").write_text(yaml.safe_dump(workspace_params(cfg), sort_keys=False))
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": project_stages(["evaluate"])}, sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run(repo, "git", "init", "-q", env=env)
    dvc(repo, "init", "-q", env=env)
    # the stored baselines and the seeded encoders' scores stand for the runs a teammate made (`dvc repro` would
    # delete the seeded cache first and train it on Ray): the stages' own commands, then recorded as up to date
    for stage in ("baselines", "variants"):
        run(repo, str(BIN / "datencoder"), stage, "--config", "params.yaml", "--json", env=env)
    dvc(repo, "commit", "-f", "baselines", "variants", env=env)
    run(repo, "git", "add", "-A", env=env)
    run(repo, "git", "commit", "-qm", "evaluate stage", env=env)
    return repo, env


@pytest.mark.slow
@pytest.mark.timeout(3600)  # two smoke evaluate runs, each a fresh process loading every model
def test_two_experiments_compare_with_dvc_exp_show_metrics_and_plots_diff(experiment_repo):
    repo, env = experiment_repo
    for name, steps in (("tune-1", 1), ("tune-3", 3)):
        done = dvc(repo, "exp", "run", "evaluate", "-n", name, "-S", f"personalize.tuning_steps={steps}", env=env)
        # a tuning experiment re-runs no baseline, and re-scores the variants' encoders without training one:
        # their cache persists through the stage (dvc.yaml), so every encoder is found there
        out = done.stdout + done.stderr
        assert "Stage 'baselines' didn't change, skipping" in out
        wanted = wanted_variants(load_config(path=repo / "params.yaml").ablate)  # names; several share an encoder
        assert "pre-training a" not in out and out.count(": cached encoder ") == len(wanted), out[-3000:]

    shown = json.loads(dvc(repo, "exp", "show", "--json", env=env).stdout)
    experiments = {rev["name"]: rev["data"]
                   for row in shown for e in row.get("experiments") or [] for rev in e["revs"]}
    assert {"tune-1", "tune-3"} <= set(experiments)
    for name, steps in (("tune-1", 1), ("tune-3", 3)):
        data = experiments[name]
        assert data["params"]["params.yaml"]["data"]["personalize"]["tuning_steps"] == steps
        metrics = data["metrics"]["outputs/evaluate/metrics.json"]["data"]
        # the metric names of the MLflow runs (components.evaluation.report.method_metrics)
        assert {"ours/identity", "ours/prompt", "lora-one-shot/seconds", "ours-no-tuning/peak_mb"} <= set(metrics)

    diff = json.loads(dvc(repo, "metrics", "diff", "tune-1", "tune-3", "--json", env=env).stdout)
    changed = diff["outputs/evaluate/metrics.json"]
    assert "ours/identity" in changed  # ours tunes 1 vs 3 steps: its identity differs
    assert changed["ours/identity"]["old"] != changed["ours/identity"]["new"]

    plots = json.loads(dvc(repo, "plots", "diff", "tune-1", "tune-3", "--json", "--split", env=env).stdout)["data"]
    [scatter] = plots["outputs/evaluate/results.csv"]
    assert scatter["revisions"] == ["tune-1", "tune-3"] and scatter["content"]["mark"]["type"] == "point"
    points = scatter["anchor_definitions"]["<DVC_METRIC_DATA>"]  # one row per method and experiment
    assert {(p["rev"], p["method"]) for p in points} >= {(rev, m) for rev in ("tune-1", "tune-3")
                                                         for m in ("ours", "ours-no-tuning", "lora-one-shot")}
    assert sorted(image["revisions"][0] for image in plots["outputs/evaluate/tradeoff.png"]) == ["tune-1", "tune-3"]

    # an unknown param: DVC's own error, nothing run
    bad = dvc(repo, "exp", "run", "evaluate", "-S", "personalize.tuning_stepz=1", env=env, check=False)
    assert bad.returncode != 0 and "Could not override 'personalize.tuning_stepz'" in bad.stderr + bad.stdout
