"""Cost of one inference-time tuning (12 steps on the toy preset) in two checkouts of this repository, A/B.

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/tuning_cost.py --repo /tmp/before --repo .

Each repository's `components` is imported in its own child process (they cannot share one: the child runs
with that repository first on PYTHONPATH, and checks that its `components` came from there); the children
alternate (A, B, A, B, ...) so that the machine's drift falls on both. Each child works in its checkout
(relative default paths are its own) and loads its checkout's committed encoder (or `--encoder`: one for all,
or one per checkout) and the same image, runs `tuning.tune` once to warm up, times `--runs` tunings, counts the
operators one tuning dispatches (torch.profiler: on the toy base a step is bound by dispatch, not arithmetic),
saves the tuned tensors and
draws 4 images with a whole `Personalizer.run` (its own tuning, then sampling at blends 1 and 0.5), so the
report also says whether the two checkouts tune to the same concept and draw the same pixels. Prints one
JSON object: per repo the median and fastest seconds and the operator count, and the ratios to the first repo.
(`image_bytes` repeats concept_fidelity.py's `png`: a child must run against checkouts that predate any
shared helper.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import harness


def child(repo: str, encoder: str, runs: int, threads: int, views: int | None, out: str) -> None:
    """Measure in this process with `repo`'s components (run as `--child`, `repo` first on PYTHONPATH)."""
    import components

    if Path(components.__file__).resolve().parents[1] != Path(repo):
        raise SystemExit(f"--child: components comes from {components.__file__}, not from {repo}")
    os.chdir(repo)  # a checkout's relative default paths (one that predates the project home) mean its own files
    import torch
    from torch.profiler import ProfilerActivity, profile

    from components.config import load_config
    from components.data.images import to_pixels
    from components.inference.engine import Personalizer
    from components.inference.tuning import TuningRecipe, predict_concept, tune
    from components.toy import world as tw

    torch.set_num_threads(threads)
    # the timed tunings call `tune` directly; the cache only spares run's second blend
    cfg = load_config("toy", overrides={"personalize": {"views": views}} if views else None)
    engine = getattr(cfg, "engine", cfg)  # the engine's sections; a checkout before EngineConfig took the whole config
    personalizer = Personalizer(engine, encoder)
    image = tw.render(tw.canonical(tw.ToyConcept("star", "red", "striped", "white")), 64, seed=0)
    pixels = to_pixels(image, personalizer.side)
    p = cfg.personalize
    start = predict_concept(personalizer.encoder, personalizer.pipe.vae, pixels, p.encoder_timestep,
                            torch.Generator().manual_seed(0))

    def one():
        return tune(personalizer.base, personalizer.pipe.vae, start, pixels, personalizer.tuning_prompt_ids(pixels),
                    TuningRecipe.from_config(engine), torch.Generator().manual_seed(1))

    one()
    seconds = []
    for _ in range(runs):
        with harness.timed() as t:
            concept = one()
        seconds.append(t.seconds)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one()
    ops = sum(e.count for e in prof.key_averages())
    drawn = [personalizer.run(image_bytes(image), ["S* on a beach"], personalizer.settings(
        num_images=2, seed=3, alpha_blend=blend)).images for blend in (1.0, 0.5)]
    drawn_pixels = torch.stack([torch.from_numpy(i.pixels) for row in drawn for i in row])
    torch.save({"seconds": seconds, "ops": ops, "tensors": concept.tensors(), "pixels": drawn_pixels}, out)


def image_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    parser = harness.parser(__doc__, __file__, config=False)
    parser.add_argument("--repo", action="append", required=True,
                        help="a checkout (repeatable; the first is the baseline)")
    parser.add_argument("--encoder", action="append", default=[],
                        help="encoder directory: one for every checkout, or one per --repo in their order (default: "
                             "each checkout's models/toy-encoder)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the children")
    parser.add_argument("--runs", type=int, default=5, help="timed tunings per child")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--views", type=int, help="personalize.views for every checkout (default: each one's own)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.repo[0], args.encoder[0], args.runs, args.threads, args.views, args.child)
        return

    import torch

    repos = [str(Path(r).resolve()) for r in args.repo]
    if len(args.encoder) not in (0, 1, len(repos)):
        raise SystemExit(f"--encoder: give one, or one per --repo ({len(repos)}), not {len(args.encoder)}")
    encoders = ([str(Path(e).resolve()) for e in args.encoder]
                or [str(Path(r) / "models" / "toy-encoder") for r in repos])
    encoders = encoders * len(repos) if len(encoders) == 1 else encoders
    results: dict[str, dict] = {r: {"seconds": []} for r in repos}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for i, (repo, encoder) in enumerate(zip(repos, encoders)):
                harness.log(f"round {round_ + 1}/{args.rounds}: {repo}")
                out = str(Path(scratch) / f"{i}.pt")
                path = os.pathsep.join([repo, *filter(None, [os.environ.get("PYTHONPATH")])])
                done = subprocess.run([sys.executable, __file__, "--child", out, "--repo", repo, "--encoder", encoder,
                                       "--runs", str(args.runs), "--threads", str(args.threads),
                                       *(["--views", str(args.views)] if args.views else [])],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONPATH": path})
                if done.returncode:
                    raise SystemExit(f"the child for {repo} failed ({done.returncode}): {done.stderr[-2000:]}")
                measured = torch.load(out, weights_only=True)
                results[repo]["seconds"] += measured["seconds"]
                results[repo].update(ops=measured["ops"], tensors=measured["tensors"], pixels=measured["pixels"])
    first = results[repos[0]]
    report = {}
    for repo in repos:
        r = results[repo]
        median = statistics.median(r["seconds"])
        same = len(r["tensors"]) == len(first["tensors"]) and all(
            torch.equal(x, y) for x, y in zip(r["tensors"], first["tensors"]))
        report[repo] = {"encoder": encoders[repos.index(repo)],
                        "median_s": round(median, 3), "min_s": round(min(r["seconds"]), 3), "ops": r["ops"],
                        "time_ratio": round(median / statistics.median(first["seconds"]), 3),
                        "ops_ratio": round(r["ops"] / first["ops"], 3), "same_concept_as_first": same,
                        "same_images_as_first": torch.equal(r["pixels"], first["pixels"])}
    harness.report({"runs_per_repo": args.rounds * args.runs, "threads": args.threads, "repos": report}, args)


if __name__ == "__main__":
    main()
