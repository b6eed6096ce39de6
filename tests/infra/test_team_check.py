"""`make team-check` (infra/team_check.py): the team stack's services as local processes on loopback, a run of the
smoke deployment through the Prefect worker, and the checks on what it left; then nothing of it may be left running,
also when it is interrupted. Minutes on 2 cores: slow."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from smoke_models import interruptible


ROOT = Path(__file__).resolve().parents[2]


def processes_of(scratch: str) -> list[int]:
    """Live processes whose environment points into the rehearsal's scratch folder (every service's TMPDIR)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if scratch.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_team_check_runs_the_stack_end_to_end_and_leaves_nothing_behind():
    started = time.monotonic()
    done = subprocess.run([sys.executable, "infra/team_check.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1100)
    summary = json.loads(done.stdout)  # stdout is the one JSON object
    assert done.returncode == 0 and summary["ok"], (summary, done.stderr[-3000:])
    assert summary["flow_run"]["state"] == "COMPLETED"
    assert summary["registered"]["model"] == "datencoder-smoke" and summary["registered"]["alias"] == "champion"
    assert summary["unauthenticated"] == {"mlflow": 401, "prefect": 401}
    assert summary["deployments"]["retrain/retrain-toy"]["cron"] == ["0 3 * * 1"]
    assert summary["ray"]["nodes"] == 3 and summary["secrets_in_logs"] == 0
    assert summary["orphans"] == 0 and processes_of(summary["scratch"]) == []
    assert not Path(summary["scratch"]).exists()
    assert time.monotonic() - started <= 900, summary["seconds"]
    status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "infra/" not in status and ".dvc/" not in status  # the rehearsal wrote nothing into the checkout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_interrupted_team_check_stops_everything_it_started():
    proc = subprocess.Popen([sys.executable, "infra/team_check.py"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    seen = []
    for line in proc.stderr:  # Ctrl-C once MLflow and the Prefect server are up
        seen.append(line)
        if "prefect-server up" in line:
            break
    assert any("mlflow up" in line for line in seen), seen
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    summary = json.loads(out)
    assert proc.returncode == 1 and summary["error"].startswith("interrupted")
    assert summary["orphans"] == 0 and processes_of(summary["scratch"]) == []
