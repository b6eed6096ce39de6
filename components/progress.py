"""Progress of long loops (tuning, sampling, pre-training, baselines, evaluation): one home for both forms.

On a terminal a tqdm bar on stderr; otherwise (piped, a log file, a Ray worker, `--json`) step, rate and
ETA on the log at most every few seconds, so logs are not flooded. The CLI turns bars off for `--json`
(`show_bars(False)`): machine-readable runs keep stderr to log lines. An orchestrator can follow every
loop too (`following(callback)`: the Prefect flow turns it into progress artifacts).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Callable, Iterator


log = logging.getLogger("datencoder.progress")

_bars_allowed = True
_followers: list[Callable[[str, int, int], None]] = []


def show_bars(allowed: bool) -> None:
    """Allow or forbid progress bars in this process (they still need stderr to be a terminal)."""
    global _bars_allowed
    _bars_allowed = allowed


def bars_on() -> bool:
    return _bars_allowed and sys.stderr.isatty()


def quiet_library_bars() -> None:
    """diffusers' and transformers' own bars (loading a pipeline, its weights) follow the same rule as ours."""
    if not bars_on():
        # imported by the CLI at start-up: diffusers and transformers only when their bars go off
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()


@contextlib.contextmanager
def following(callback: Callable[[str, int, int], None]) -> Iterator[None]:
    """Within the block, every loop's update also calls callback(name, done, total) (it throttles itself)."""
    _followers.append(callback)
    try:
        yield
    finally:
        _followers.remove(callback)


class Progress:
    def __init__(self, name: str, total: int, every_s: float = 10.0):
        self.name, self.total, self.every_s = name, total, every_s
        self.start = self.last = time.perf_counter()
        self.bar = None
        if bars_on():
            from tqdm import tqdm  # imported by the CLI at start-up: tqdm only when a bar is shown

            self.bar = tqdm(total=total, desc=name, file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, done: int, **values: float) -> None:
        for callback in _followers:
            callback(self.name, done, self.total)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if values:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
            if done >= self.total:
                self.close()
            return
        now = time.perf_counter()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        extra = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        log.info("%s %d/%d (%.2f it/s, eta %.0fs) %s", self.name, done, self.total, rate, eta, extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
