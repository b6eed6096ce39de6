"""Where the project is: the checkout the code runs from, and the project home that holds the committed
read-only inputs (the toy base model, its CLIPs, the toy encoder).

A default path that names a committed input is read from the home, wherever the command runs:
`DATENCODER_HOME` when set, else the checkout the installed package comes from. A path the user gives (a
config file, a command-line option) keeps its usual meaning, relative to the working directory, and so do
outputs. `components/config.py` applies the rule to the config's defaults (`HOME_INPUTS`).
"""

from __future__ import annotations

import os
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]  # the checkout the code runs from: components/, dvc.yaml, params.yaml
HOME_ENV = "DATENCODER_HOME"
# the committed read-only inputs: DVC outputs with `cache: false`, so a clone has them (dvc.yaml)
COMMITTED = ("models/toy-base", "models/toy-clip", "models/toy-encoder")


def home() -> Path:
    """`DATENCODER_HOME` when set, else the checkout the package comes from."""
    given = os.environ.get(HOME_ENV)
    return Path(given).expanduser().resolve() if given else ROOT


def committed(path: str | None) -> str | None:
    """`path` as read from the home when it is a relative path inside a committed input, else unchanged."""
    if not path or Path(path).is_absolute():
        return path
    parts = Path(path).parts
    if any(parts[:len(Path(c).parts)] == Path(c).parts for c in COMMITTED):
        return str(home() / path)
    return path


def holds(path: str | Path) -> bool:
    """Whether `path` was read from the home (an absolute path inside it)."""
    return Path(path).is_absolute() and Path(path).is_relative_to(home())


def missing(what: str, path: str | Path) -> str:
    """The error for a committed input the home does not have: which path was looked for, and how to fix it."""
    if os.environ.get(HOME_ENV):
        how = f"{HOME_ENV} is {os.environ[HOME_ENV]}: point it at a datencoder checkout"
    else:
        how = (f"the checkout datencoder runs from ({home()}) lacks it: restore it with `git checkout -- models`, "
               f"or set {HOME_ENV} to a datencoder checkout")
    return f"{what} not found at {path}, a committed input read from the project home; {how}"
