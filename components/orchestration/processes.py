"""The processes a pipeline run starts (the Prefect server, DVC commands) stop with it: each runs in a session
of its own, so a Ctrl-C at the terminal does not kill it mid-work, and the run stops the whole session when it
ends, is interrupted (Ctrl-C, SIGTERM) or fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop_session(proc: subprocess.Popen, grace_s: float = 30, first: int | None = None) -> None:
    """Stop a process started with start_new_session=True and everything in its session: SIGTERM to the whole
    session (or `first`, e.g. SIGTERM or SIGINT, to the leader alone, for a server that shuts down what it started,
    such as its Ray cluster), then SIGKILL to whatever is left after `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        if first is None:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(first)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
