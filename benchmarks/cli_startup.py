"""What a one-shot `datencoder personalize` costs beyond its own work, against the bare import of its stack.

    .venv/bin/python benchmarks/cli_startup.py [--repeats 3] [--model models/toy-encoder] [--importtime]

Per repeat, in this order (the disk is warmed by one untimed run of each first):
- bare import: wall of `python -c "import torch, diffusers, transformers, open_clip"`
- personalize: wall of `datencoder personalize --json` (toy preset, one rendered concept, defaults otherwise)
  and the `timings.total_s` that same run reports (image read to last sample)
overhead = personalize wall - total_s - bare import; the goal is overhead <= 2 s. Medians are
reported with every repeat, as one JSON object. `--importtime` adds the ten slowest imports of the
personalize command (python -X importtime, cumulative microseconds), to find what to make lazy.
`--model` defaults to the registry lookup (`datencoder-<preset>@champion` when the MLflow store has it, else
personalize.encoder): the path a user takes.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

from components.home import ROOT


PYTHON = sys.executable
BARE = "import torch, diffusers, transformers, open_clip"


def wall(argv: list[str], **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    with harness.timed() as t:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, **kwargs)
    if done.returncode:
        raise SystemExit(f"{argv[:4]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return t.seconds, done


def personalize_argv(image: Path, out: Path, model: str | None) -> list[str]:
    argv = [PYTHON, "-m", "components.cli", "personalize", "--image", str(image), "--prompt", "S* on a beach",
            "--out", str(out), "--json"]
    return argv + (["--model", model] if model else [])


def slowest_imports(argv: list[str], top: int = 10) -> list[tuple[str, float]]:
    done = subprocess.run([PYTHON, "-X", "importtime", *argv[1:]], cwd=ROOT, capture_output=True, text=True)
    rows = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "cumulative" not in line:
            _, cumulative, name = line.removeprefix("import time:").split("|")
            if not name[1:].startswith(" "):  # nested imports are indented: keep the top-level ones
                rows.append((name.strip(), int(cumulative) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main() -> None:
    parser = harness.parser(__doc__, __file__, config=False)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="--model of personalize (default: the registry lookup)")
    parser.add_argument("--importtime", action="store_true", help="also list the slowest top-level imports")
    args = parser.parse_args()
    from components.toy import world as tw

    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "concept.png"
        tw.render(tw.canonical(tw.ToyConcept("star", "red")), 64).save(image)
        argv = personalize_argv(image, Path(tmp) / "out", args.model)
        wall([PYTHON, "-c", BARE])  # warm the disk cache
        wall(argv)
        runs = []
        for _ in range(args.repeats):
            bare, _ = wall([PYTHON, "-c", BARE])
            seconds, done = wall(argv)
            total = json.loads(done.stdout)["timings"]["total_s"]
            runs.append({"bare_import_s": round(bare, 2), "personalize_wall_s": round(seconds, 2),
                         "total_s": total, "overhead_s": round(seconds - total - bare, 2)})
        report = {"runs": runs, "median": {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]},
                  "goal": "overhead_s <= 2", "model": args.model or "registry lookup"}
        report["goal_met"] = report["median"]["overhead_s"] <= 2
        if args.importtime:
            report["slowest_imports_s"] = slowest_imports(argv)
    harness.report(report, args)


if __name__ == "__main__":
    main()
