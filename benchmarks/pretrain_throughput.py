"""Pre-training throughput: a plain single-process loop against Ray Train with 1 and 2 workers.

All three run the same optimiser step (`components.training.loop.Training.step`) on the same config
(toy preset by default: needs models/toy-base and data/prepared), one torch thread per worker, and
are timed the same way: samples per second over the steps after the first. The Ray runs go through
the real stage (`components.training.pretrain.pretrain`: DDP over gloo, all_gather'd contrastive negatives,
MLflow logging every log_every steps) into a throwaway storage and MLflow store.

    .venv/bin/python benchmarks/pretrain_throughput.py [--preset toy] [--config params.yaml] [--steps 30]

Relative paths (prepare.out) are read from the working directory, as `datencoder pretrain` reads them.

Goals: Ray overhead at 1 worker <= 10% of the plain loop; the 1 -> 2 worker scaling is reported.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import harness
import pandas as pd
import torch

from components.memory import peak_mb


def plain_loop(cfg, steps: int) -> dict:
    """The step in a for loop: no Ray, no process group, no logging."""
    from components.training.loop import Training

    torch.set_num_threads(cfg.pretrain.cpus_per_worker)
    manifest = pd.read_parquet(Path(cfg.prepare.out) / "manifest.parquet")
    training = Training.build(cfg.training, manifest, rank=0, world=1, device=torch.device("cpu"))
    training.step(0)  # warm-up, as the Ray loop does not time its first step either
    with harness.timed() as t:
        for step in range(1, steps):
            training.step(step)
    return {"samples_per_s": round(cfg.pretrain.batch_size * (steps - 1) / t.seconds, 2),
            "peak_memory_mb": round(peak_mb(), 1)}


def ray_run(cfg, steps: int, workers: int, work: Path) -> dict:
    from components.config import variant_config
    from components.training.pretrain import pretrain

    cfg = variant_config(cfg, personalize={"encoder": str(work / f"encoder-{workers}")})
    report = pretrain(cfg, workers=workers, max_steps=steps, checkpoint_every=steps,
                      storage=str(work / f"checkpoints-{workers}"), restart=True)
    return {"samples_per_s": round(report["samples_per_s"], 2),
            "end_to_end_samples_per_s": round(report["end_to_end_samples_per_s"], 2),
            "wall_s": report["wall_s"], "peak_memory_mb_per_worker": report["peak_memory_mb"]}


def main() -> None:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    # held-out evaluation and sample grids are not part of a step's cost: keep them out of the way
    cfg = harness.config(args, {"pretrain": {"eval_every": 10**6}})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        plain = plain_loop(cfg, args.steps)  # first, so this process's peak memory is the plain loop's
        one = ray_run(cfg, args.steps, 1, work)
        two = ray_run(cfg, args.steps, 2, work)
    harness.report({
        "preset": cfg.preset, "batch_size": cfg.pretrain.batch_size, "steps": args.steps, "cpu_count": os.cpu_count(),
        "plain": plain, "ray_1_worker": one, "ray_2_workers": two,
        "ray_overhead_1_worker": round(1 - one["samples_per_s"] / plain["samples_per_s"], 3),
        "goal_overhead_at_most": 0.10,
        "scaling_1_to_2_workers": round(two["samples_per_s"] / one["samples_per_s"], 2),
    }, args)


if __name__ == "__main__":
    main()
