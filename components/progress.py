"""Progress for long loops: step, rate and ETA on the log, at most every few seconds (no flooding)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("datencoder.progress")


class Progress:
    def __init__(self, name: str, total: int, every_s: float = 10.0):
        self.name, self.total, self.every_s = name, total, every_s
        self.start = self.last = time.perf_counter()

    def update(self, done: int, **values: float) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        extra = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        log.info("%s %d/%d (%.2f it/s, eta %.0fs) %s", self.name, done, self.total, rate, eta, extra)
