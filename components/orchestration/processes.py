"""The processes a pipeline run starts (the Prefect server, DVC commands) stop with it: each runs in a session
of its own, so a Ctrl-C at the terminal does not kill it mid-work, and the run stops the whole session when it
ends, is interrupted (Ctrl-C, SIGTERM) or fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop_session(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """Stop a process started with start_new_session=True and everything in its session: SIGTERM, then
    SIGKILL after `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
