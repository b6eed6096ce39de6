"""A pipeline runs in a *workspace*: a directory with dvc.yaml, params.yaml (the config DVC sees) and
.dvc/, where data, checkpoints, the MLflow store (embedded default), Prefect's state and the report
live. The project checkout is the default workspace; a preset other than the one in its params.yaml
gets a workspace of its own (`outputs/workspaces/<preset>`), so a smoke run never touches the
committed toy artefacts. One run at a time per workspace (`workspace_lock`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from components import home
from components.config import Config, load_config
from components.errors import UserError
from components.home import ROOT
from components.orchestration.dvc import run_dvc
from components.orchestration.stages import dvc_view


log = logging.getLogger(__name__)


def workspace_config(workspace: str | Path, preset: str | None = None, config: str | Path | None = None) -> Config:
    """The config a pipeline in `workspace` runs with: its params.yaml (DVC's view). A preset or file that
    disagrees with params.yaml is refused, because the DVC stages would read params.yaml and the stages would
    see two different configs."""
    if not (Path(workspace) / "dvc.yaml").is_file():
        raise UserError(f"{workspace} is not a pipeline workspace (no dvc.yaml); omit --workspace or name a new "
                        f"directory and it is created")
    current, requested = _params_and_request(Path(workspace) / "params.yaml", preset, config)
    if dvc_view(requested) != dvc_view(current):
        raise UserError(f"workspace {workspace} has params.yaml for preset {current.preset!r}, which differs from "
                        f"the requested config ({requested.preset!r}); edit params.yaml there, or use a new "
                        f"workspace: --workspace outputs/workspaces/{requested.preset}")
    return current


def _params_and_request(params: Path, preset: str | None, config: str | Path | None) -> tuple[Config, Config]:
    """(the config of `params`, the one asked for); one parse when the request is `params` itself."""
    current = load_config(path=params)
    if config is None and preset in (None, current.preset):
        return current, current  # a preset equal to the file's own changes nothing
    return current, load_config(preset=preset, path=config or params)


def init_workspace(workspace: Path, cfg: Config) -> Config:
    """A new workspace: the project's DVC stages that the pipeline reproduces (code deps made absolute),
    .dvc/ with a local remote, and params.yaml = `cfg` with the project's read-only inputs (base model,
    CLIPs) made absolute."""
    stages = project_stages(cfg.pipeline.dvc_stages)
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    params = workspace_params(cfg)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if not (workspace / ".dvc").is_dir():
        run_dvc(workspace, "init", "--no-scm", "-q")
        run_dvc(workspace, "remote", "add", "-d", "local", ".dvc-remote")  # stored relative to .dvc/
    log.info("created workspace %s (preset %s, DVC stages %s)", workspace, cfg.preset, ", ".join(stages))
    return Config.model_validate(params)  # what its params.yaml says, as the DVC stages read it


def workspace_params(cfg: Config) -> dict:
    """params.yaml of a workspace elsewhere: `cfg` with its read-only inputs (base model, CLIPs) made absolute.
    Defaults are read from the project home already (components/home.py); a config file's relative paths
    mean the working directory's. The encoder is the workspace's own (its pretrain stage writes it), never the
    committed one in the home."""
    values = cfg.model_dump()
    if home.holds(cfg.personalize.encoder):
        values["personalize"]["encoder"] = str(Path(cfg.personalize.encoder).relative_to(home.home()))
    base = values["base"]
    for holder, key in [(base, "pretrained"), *((base[c], k) for c in ("backbone_clip", "metrics_clip")
                                                  for k in ("pretrained", "config_path"))]:
        if holder.get(key) and not Path(holder[key]).is_absolute() and Path(holder[key]).exists():
            holder[key] = str(Path(holder[key]).resolve())
    return values


def project_stages(targets: list[str]) -> dict:
    """The project's dvc.yaml stages `targets` and those upstream of them, for a dvc.yaml elsewhere: code
    deps name the installed code (a components/ copy there would shadow the package)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    keep = _upstream(stages, targets)
    for name in keep:
        stages[name]["deps"] = [str(ROOT / d) if d.startswith("components/") else d
                                for d in stages[name].get("deps", [])]
    return {name: stages[name] for name in keep}


def _upstream(stages: dict, targets: list[str]) -> list[str]:
    """`targets` and the stages whose outputs they depend on, in dvc.yaml order."""
    unknown = [t for t in targets if t not in stages]
    if unknown:
        raise UserError(f"pipeline.dvc_stages: no stage {', '.join(unknown)} in dvc.yaml (have {', '.join(stages)})")
    producer = {str(next(iter(o)) if isinstance(o, dict) else o): n
                for n, s in stages.items() for o in s.get("outs", [])}
    needed, todo = set(), list(targets)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += [producer[d] for d in stages[name].get("deps", []) if d in producer]
    return [n for n in stages if n in needed]


def resolve(preset: str | None, config: str | None, workspace: str | None) -> tuple[Path, Config]:
    """(workspace, config) of `datencoder pipeline`, the config read once where it can be: the given workspace,
    else the project checkout when the requested config is its params.yaml's, else outputs/workspaces/<preset>.
    A workspace that does not exist yet is created."""
    if workspace:
        path = Path(workspace).resolve()
    else:
        current, requested = _params_and_request(ROOT / "params.yaml", preset, config)
        if dvc_view(requested) == dvc_view(current):
            return ROOT, current
        path = ROOT / "outputs" / "workspaces" / requested.preset
    if (path / "dvc.yaml").is_file():
        return path, workspace_config(path, preset, config)
    if path.exists() and any(path.iterdir()):
        raise UserError(f"{path} is neither a pipeline workspace (no dvc.yaml) nor empty")
    return path, init_workspace(path, load_config(preset=preset, path=config))


