"""Peak memory, measured one way everywhere: a process's peak RSS on CPU, torch's peak allocation on CUDA.

    peak_mb()                  # since the process started (CPU) or the last reset (CUDA)
    with PeakMemory() as m:    # within a block, while other work shares the process
        ...
    m.peak_mb
"""

from __future__ import annotations

import os
import resource
import threading

import torch


def rss_mb() -> float:
    """The process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb(device: torch.device | str = "cpu") -> float:
    """Peak since the process started (CPU: the kernel's high-water mark) or since torch's last reset (CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class PeakMemory:
    """Peak memory while the block runs: sampled RSS (the process's own peak would include earlier work),
    or torch's peak allocation when CUDA is in use."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s, self.peak_mb = interval_s, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())
        if torch.cuda.is_available():
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
