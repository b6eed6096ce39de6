"""Refuse to start the team stack with a secret left at its placeholder.

Run by the compose file's one-shot `preflight` service (every other service waits for it to succeed), by the
KubeRay pods' init container and by `make team-check`, with the secrets in its environment:

    python infra/preflight.py            # exit 0: every secret is set; exit 2: one line per bad one, then stop

It checks every variable whose name says it holds a secret (PASSWORD, SECRET, AUTH_STRING, TOKEN): set, not a
placeholder of infra/.env.example ("change-me"), not a well-known default, at least MIN_LENGTH characters (the
password of PREFECT_AUTH_STRING, `user:password`, on its own); S3_ROOT_PASSWORD also URL-safe, because mc reads
it from a URL (MC_HOST_s3). It names the variable and the rule, never the value. Standard library only.
"""

from __future__ import annotations

import os
import re
import sys


SECRET_NAME = re.compile(r"(PASSWORD|SECRET|AUTH_STRING|TOKEN)")
MIN_LENGTH = 16
PLACEHOLDER = re.compile(r"change[-_ ]?me|replace[-_ ]?me|example|placeholder|^x+$", re.I)
WELL_KNOWN = {"password", "password1234", "admin", "secret", "minioadmin", "postgres", "prefect", "mlflow",
              "datencoder", "letmein", "123456", "changeit"}
URL_SAFE = re.compile(r"^[A-Za-z0-9._~-]+$")
IN_A_URL = {"S3_ROOT_PASSWORD"}


def problem(name: str, value: str) -> str | None:
    """What is wrong with secret `name` (never its value), or None."""
    if name.endswith("AUTH_STRING"):
        user, sep, value = value.partition(":")
        if not sep or not user:
            return "must be user:password"
    if not value:
        return "is empty"
    if PLACEHOLDER.search(value):
        return "is still a placeholder (infra/.env.example); generate one, e.g. `openssl rand -hex 24`"
    if value.lower() in WELL_KNOWN:
        return "is a well-known default"
    if len(value) < MIN_LENGTH:
        return f"is shorter than {MIN_LENGTH} characters"
    if name in IN_A_URL and not URL_SAFE.match(value):
        return "must be URL-safe (letters, digits, . _ ~ -), as it is read from a URL; `openssl rand -hex 24` is"
    return None


def check(environ: dict[str, str]) -> list[str]:
    """One line per bad secret among `environ`'s secret-named variables."""
    return [f"{name} {why}" for name in sorted(environ) if SECRET_NAME.search(name)
            for why in [problem(name, environ[name])] if why]


def main() -> int:
    bad = check(dict(os.environ))
    for line in bad:
        print(f"preflight: refusing to start: {line}", file=sys.stderr)
    if not bad:
        names = sorted(n for n in os.environ if SECRET_NAME.search(n))
        print(f"preflight: {len(names)} secrets set ({', '.join(names)})", file=sys.stderr)
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
