"""The compose file as compose reads it: `${VAR:-default}` / `${VAR:?error}` interpolation over the parsed YAML with
the values of an env file, so `make team-check` (infra/team_check.py) and the tests (tests/infra/) read the same
services, commands and settings as `docker compose` does. Standard library and PyYAML only.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml


INFRA = Path(__file__).resolve().parent
VARIABLE = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def env_file(path: Path = INFRA / ".env.example") -> dict[str, str]:
    """KEY=VALUE lines of an env file (comments and blank lines skipped)."""
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def interpolate(value, env: dict[str, str]):
    """compose's variable syntax over a parsed YAML tree ($$ is a literal $); a missing `${VAR:?msg}` raises
    KeyError("VAR: msg")."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, kind, rest = match.groups()
        if env.get(name):
            return env[name]
        if kind == "?":
            raise KeyError(f"{name}: {rest}")
        return rest if kind == "-" else ""

    return VARIABLE.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def compose(env: dict[str, str]) -> dict:
    """infra/compose.yaml, interpolated with `env`."""
    return interpolate(yaml.safe_load((INFRA / "compose.yaml").read_text()), env)


def dockerfile_env(target: str = "base") -> dict[str, str]:
    """The ENV settings of a Dockerfile stage (and the stages it builds on), `$ARG`s as their defaults."""
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    chain, env, args = [], {}, {}
    names = {re.match(r"\S+ AS (\S+)", s).group(1): s for s in stages}
    while target in names:
        chain.insert(0, names[target])
        target = names[target].split()[0]
    for stage in chain:
        for line in stage.splitlines():
            if line.startswith("ARG "):
                name, _, default = line[4:].strip().partition("=")
                args[name] = default
            elif line.startswith("ENV "):
                for name, value in re.findall(r"(\w+)=(\S+)", line[4:]):
                    env[name] = re.sub(r"\$(\w+)", lambda m: args.get(m.group(1), ""), value)
    return env
