"""What every benchmark shares: options, config, clock, output folder and one JSON object on stdout.

A speed or memory figure is a ratio against a baseline timed in the same process (`timed`), so machine load
falls on both. Stdout carries one JSON object, at the end (`report`; logs go to stderr), also written to
<out>/<name>.json. Options are never abbreviated, as in the CLI. `components` is imported on use: tuning_cost.py's
children parse these options against an older checkout's `components`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def parser(doc: str, script: str, *, config: bool = True) -> argparse.ArgumentParser:
    """--out (default outputs/benchmarks/<name> in the project home) and, with `config`, --preset, --config, --set."""
    name = Path(script).stem
    p = argparse.ArgumentParser(prog=Path(script).name, description=doc.strip().splitlines()[0],
                                allow_abbrev=False)
    p.set_defaults(benchmark=name, preset=None, config=None, set=[])
    if config:
        p.add_argument("--preset", help="config preset: toy, smoke, sd15 (default: the config's, else toy)")
        p.add_argument("--config", help="YAML config with a `preset:` key and section overrides (e.g. params.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config key (VALUE as YAML; repeatable)")
    p.add_argument("--out", metavar="DIR",
                   help=f"output folder (default: outputs/benchmarks/{name} in the project home)")
    return p


def overrides(args) -> dict:
    """--set as load_config's overrides: {section: {key: value}}."""
    from components.config import parse_overrides

    return parse_overrides(args.set)


def config(args, own: dict | None = None):
    """The Config of --preset, --config and --set, with the script's `own` overrides over them."""
    from components.config import deep_merge, load_config

    return load_config(args.preset, args.config, deep_merge(overrides(args), own or {}))


class Timer:
    """Wall seconds by time.perf_counter: `.elapsed()` so far; `.seconds` once a `timed` block ends."""

    def __init__(self) -> None:
        self.started, self.seconds = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@contextlib.contextmanager
def timed(sync: Callable[[], None] | None = None) -> Iterator[Timer]:
    """Times the block; `sync` (torch.cuda.synchronize) runs at both ends, so queued GPU work falls inside."""
    if sync:
        sync()
    timer = Timer()
    yield timer
    if sync:
        sync()
    timer.seconds = timer.elapsed()


def median_seconds(step: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls of `step`, after one untimed warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        with timed() as t:
            step()
        times.append(t.seconds)
    return statistics.median(times)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def out_dir(args) -> Path:
    from components.home import home

    out = Path(args.out) if args.out else home() / "outputs" / "benchmarks" / args.benchmark
    out.mkdir(parents=True, exist_ok=True)
    return out


def save(result: dict, args) -> Path:
    """Write `result` to <out>/<name>.json (a long run may save as it goes)."""
    path = out_dir(args) / f"{args.benchmark}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def report(result: dict, args, shown: dict | None = None) -> None:
    """Print `shown` (default: `result`) as the run's one JSON object on stdout, then save `result`."""
    print(json.dumps(result if shown is None else shown, indent=1), flush=True)
    save(result, args)
