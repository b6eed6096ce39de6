"""Shared test setup: run from the repo root, single-threaded torch (2-core CI; keeps runs stable)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)  # configs name repo-relative paths (models/toy-base, ...), as the CLI and DVC do
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT

