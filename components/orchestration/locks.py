"""One run at a time: exclusive, re-entrant locks on files inside a workspace (<workspace>/.datencoder/)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Any, Iterator

from components import tracking
from components.config import PipelineConfig
from components.errors import UserError


LOCK_DIR = ".datencoder"  # lock files, inside the workspace

_held: dict[str, tuple[Any, int]] = {}  # lock file -> (open file, depth): re-entrant within a process


@contextlib.contextmanager
def workspace_lock(workspace: str | Path, name: str, wait_s: float, what: str) -> Iterator[None]:
    """An exclusive lock on <workspace>/.datencoder/<name>.lock (fcntl.flock: released when the process
    dies, so a crashed run never leaves a stale lock). Waits up to `wait_s`, then refuses with a line
    that names the holder."""
    path = Path(workspace).resolve() / LOCK_DIR / f"{name}.lock"
    key = str(path)
    if key in _held:
        f, depth = _held[key]
        _held[key] = (f, depth + 1)
        try:
            yield
        finally:
            _held[key] = (f, _held[key][1] - 1)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                raise UserError(f"{what} is already running in {Path(workspace).resolve()} ({holder}); wait for it "
                                f"to finish (or set pipeline.lock_wait_s to wait)") from None
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}")
    f.flush()
    _held[key] = (f, 1)
    try:
        yield
    finally:
        del _held[key]
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


@contextlib.contextmanager
def pipeline_run(workspace: str | Path, p: PipelineConfig) -> Iterator[None]:
    """The guard of a pipeline run, for the main job and the retrain flow alike (the main job holds it around its
    Prefect server, the flow again inside it: the lock is re-entrant): work in the workspace, one run at a time,
    and the MLflow server checked before anything starts."""
    os.chdir(workspace)
    with workspace_lock(workspace, "pipeline", wait_s=p.lock_wait_s, what="a pipeline run"):
        tracking.check_server()
        yield
