"""Who receives the whole config (docs/layout.md "What a function reads of the config"): the entry points, and what
works on the config itself. Every other function of components/ takes the section, the bundle (EngineConfig,
TrainingConfig) or the values it reads. flows/ is all entry points (Prefect flows and tasks) and is not scanned.
"""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

# stage functions behind a CLI command, a DVC stage or a Prefect task
ENTRY_POINTS = {
    "evaluation/ablate.py": {"ablate"},
    "evaluation/check_base.py": {"check_base"},
    "evaluation/evaluate.py": {"baselines", "evaluate"},
    "evaluation/variants.py": {"train_variants"},
    "orchestration/dvc.py": {"dvc_repro", "pretrain_stage"},
    "serving/personalize.py": {"personalize"},
    "serving/ray_serve.py": {"serve"},
    "serving/serve.py": {"serve"},
    "serving/registry.py": {"register", "promote"},
    "toy/bootstrap.py": {"bootstrap"},
    "training/baselines.py": {"baseline"},
    "training/pretrain.py": {"pretrain"},
    "training/targets.py": {"targets_report"},
}
# functions whose subject is the config: variants of it, its parameters, keys over it, a model that carries it
CONFIG_WORK = {
    "config.py": {"_inputs_from_home", "resolved"},  # and variant_config, typed over any bundle of sections
    "evaluation/evaluate.py": {"baselines_key"},
    "evaluation/harness.py": {"settings_key"},
    "evaluation/variants.py": {"variants_key", "variant_results"},
    "orchestration/stages.py": {"stage_key", "dvc_view"},
    "orchestration/workspace.py": {"init_workspace", "workspace_params"},
    "serving/registry.py": {"model_artifacts", "log_model"},
    # the variants stage's pre-training runs: each a `pretrain` (an entry point) of a variant config
    "training/variants.py": {"encoder_variant", "training_session"},
}


def takes_whole_config(function: ast.FunctionDef) -> bool:
    arguments = function.args.posonlyargs + function.args.args + function.args.kwonlyargs
    return any(a.annotation is not None and ast.unparse(a.annotation).strip("'\"") in ("Config", "Config | None")
               for a in arguments)


def test_only_entry_points_and_config_work_take_the_whole_config():
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "components").rglob("*.py")):
        if path.name == "cli.py":  # the command line: every command is an entry point
            continue
        tree = ast.parse(path.read_text(), str(path))
        names = {node.name for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and takes_whole_config(node)}
        if names:
            found[path.relative_to(ROOT / "components").as_posix()] = names
    allowed = {module: ENTRY_POINTS.get(module, set()) | CONFIG_WORK.get(module, set())
               for module in set(ENTRY_POINTS) | set(CONFIG_WORK)}
    extra = {module: sorted(names - allowed.get(module, set())) for module, names in found.items()
             if names - allowed.get(module, set())}
    assert not extra, f"these take the whole Config: give them the section or values they read instead: {extra}"
    gone = {module: sorted(names - found.get(module, set())) for module, names in allowed.items()
            if names - found.get(module, set())}
    assert not gone, f"no longer take the whole Config: remove them from this test's lists: {gone}"


def test_the_scan_sees_an_annotated_config_parameter():
    function = ast.parse("def f(x: int, cfg: Config, *, y: 'Config | None' = None): ...").body[0]
    assert takes_whole_config(function)
    assert not takes_whole_config(ast.parse("def g(e: EvaluateConfig, engine: EngineConfig): ...").body[0])
