"""A Prefect server for one pipeline run, its state kept in the workspace, when PREFECT_API_URL names none.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import requests

from components.errors import UserError
from components.orchestration.dvc import BIN
from components.orchestration.processes import stop_session


log = logging.getLogger(__name__)


def prefect_environment(workspace: Path) -> dict[str, str]:
    """Prefect settings of a run in `workspace`: results persisted in the workspace, our loggers
    forwarded to the Prefect logs, Prefect's home (and a local server's database) in the workspace."""
    env = {"PREFECT_LOGGING_EXTRA_LOGGERS": "datencoder,components",
           "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # our loggers outside a flow run
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
           "PREFECT_LOCAL_STORAGE_PATH": str(workspace / ".prefect" / "storage")}
    if not os.environ.get("PREFECT_API_URL"):
        env["PREFECT_HOME"] = str(workspace / ".prefect")
    return env


@contextlib.contextmanager
def local_prefect_server(workspace: Path, startup_timeout_s: float, ui: bool = False) -> Iterator[str]:
    """The embedded default: a Prefect server for this run only, on a free loopback port, with the
    workspace's own database (two workspaces never share a sqlite file). Prefect's built-in ephemeral
    server shares the terminal's process group, so Ctrl-C killed it mid-run and left the run hanging;
    this one has its own session: Ctrl-C stops the run, which then stops the server. With `ui` it serves
    the Prefect UI as well (at the API URL without `/api`). Yields the API URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    api = f"http://127.0.0.1:{port}/api"
    home = workspace / ".prefect"
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_UI_ENABLED=str(ui).lower(), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_API_URL=api)
    with open(home / "server.log", "w") as out:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start",
                                   "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if server.poll() is not None:
                raise UserError(f"the local Prefect server exited with {server.returncode}; see {home / 'server.log'}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{api}/health", timeout=2).ok:
                    break
            if time.monotonic() > deadline:
                raise UserError(f"the local Prefect server did not start within {startup_timeout_s:g} s "
                                f"(pipeline.prefect_startup_timeout_s); see {home / 'server.log'}")
            time.sleep(0.5)
        log.info("local Prefect server for this run at %s (database in %s)", api, home)
        yield api
    finally:
        if handlers := sys.modules.get("prefect.logging.handlers"):  # the run's logs reach the server before it stops
            handlers.APILogWorker.drain_all(timeout=30)
        stop_session(server)


def wait_for_interrupt(ui_url: str) -> None:
    """Keep the run's server (and its UI) up until Ctrl-C: `datencoder pipeline --ui`."""
    print(f"datencoder pipeline: Prefect UI at {ui_url} (the run's flows, logs and artifacts); Ctrl-C to stop it",
          file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
