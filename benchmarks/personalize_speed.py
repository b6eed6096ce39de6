"""Personalisation speed against optimisation baselines, measured in one run on the same base and image.

    .venv/bin/python benchmarks/personalize_speed.py [--preset toy] [--encoder DIR] [--full] [--views V ...]

Ours: encoder forward + `personalize.tuning_steps` tuning steps (the concept is then ready), and sampling one
image. Baselines (components/training/baselines.py), from scratch on the same image and base: LoRA for 500 steps
and Textual Inversion for 3000 steps. Without --full the baselines run --measure-steps steps and their
per-step time is extrapolated to 500 / 3000; the output says so. Goals: >= 30x faster than LoRA-500,
>= 100x faster than TI-3000 (adaptation time: until the concept is ready; sampling costs the same for all).
`--views V` (repeatable) also times ours with V augmented views a tuning step, against the same baselines
(`by_views`): the speed side of the views trade-off of docs/personalize.md "Concept fidelity". It also fits
adaptation seconds = fixed + per_view x V over all view counts timed (`views_fit`): `ceiling_over_*` is
what the default views could reach if the fixed part (dispatch, the encoder, Adam) cost nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import io
import tempfile
from pathlib import Path

import harness
import numpy as np
import torch

from components.config import variant_config
from components.data.images import to_pixels
from components.inference.engine import Personalizer
from components.memory import peak_mb
from components.toy import world as tw
from components.training.baselines import train_lora, train_textual_inversion


GOALS = {"lora_500": 30.0, "textual_inversion_3000": 100.0}


def release_memory() -> None:
    """Free what the baselines left (their UNet copies, optimiser states) and hand the heap back to the OS.
    Measured 2026-11-27 (probes, docs/personalize.md "Speed and memory"): our adaptation took 0.63 s before
    LoRA-500, 0.77 s after it while its result was alive, 0.61 s after this. A later probe with TI-1000 and
    LoRA-300 did not recover (0.68 s before, 0.77-0.89 s after, tuning only): hence the slower of the two runs
    counts."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None  # glibc only
    if trim is not None:
        trim(0)


def views_fit(default_views: int, default_s: float, by_views_s: dict[int, float], baselines: dict) -> dict | None:
    """Least-squares adaptation seconds = fixed + per_view x views, and the default's ceiling ratios."""
    points = {**by_views_s, default_views: default_s}
    if len(points) < 2:
        return None
    per_view, fixed = (float(c) for c in np.polyfit(list(points), list(points.values()), 1))
    return {"fixed_s": round(fixed, 3), "per_view_s": round(per_view, 4),
            **{f"ceiling_over_{name}": round(b["seconds"] / (per_view * default_views), 1)
               for name, b in baselines.items()}}


def main() -> None:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--encoder", help="encoder directory (default: personalize.encoder; untrained if missing)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="personalisation runs; the median is reported")
    parser.add_argument("--measure-steps", type=int, default=50, help="baseline steps timed when not --full")
    parser.add_argument("--full", action="store_true", help="run LoRA 500 and TI 3000 steps in full")
    parser.add_argument("--views", type=int, action="append", default=[], metavar="V",
                        help="also time ours with V views a tuning step (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = harness.config(args, {"personalize": {"cache_size": 0}})
    encoder = args.encoder or cfg.personalize.encoder
    scratch = tempfile.TemporaryDirectory()
    trained = (Path(encoder) / "config.json").is_file()
    if not trained:  # timing does not depend on the weights
        from components.model.encoder import FrozenBase, TuningEncoder

        encoder = str(Path(scratch.name) / "encoder")
        TuningEncoder.for_base(cfg.encoder, FrozenBase.load(cfg.base, cfg.runtime)).save_pretrained(encoder)
    personalizer = Personalizer(cfg.engine, encoder)
    image = tw.render(tw.canonical(tw.ToyConcept("star", "red", "striped", "white")), 64, seed=0)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    settings = personalizer.settings(num_images=1)
    personalizer.run(buf.getvalue(), ["a photo of S*"], personalizer.settings(tuning_steps=1, num_images=1))  # warm-up
    by_views = {views: personalizer.variant(variant_config(cfg.engine, personalize={"views": views}))
                for views in args.views}

    def measure_ours(ours: Personalizer = personalizer) -> dict:
        runs = sorted((ours.run(buf.getvalue(), ["S* on a beach"], settings).timings
                       for _ in range(args.repeats)), key=lambda t: t["total_s"])
        median = runs[len(runs) // 2]
        return {**median, "adapt_s": round(median["encoder_s"] + median["tune_s"], 3)}

    def measure_views() -> dict[int, float]:
        return {views: measure_ours(ours)["adapt_s"] for views, ours in by_views.items()}

    ours_before, views_before = measure_ours(), measure_views()

    pixels = to_pixels(image, personalizer.side)
    targets = {"lora_500": (train_lora, 500), "textual_inversion_3000": (train_textual_inversion, 3000)}
    baselines, timed = {}, {}
    for name, (train, total) in targets.items():
        steps = total if args.full else min(args.measure_steps, total)
        timed[name] = (total, steps, train(personalizer.pipe, pixels, steps).seconds_per_step)
    release_memory()
    # ours again after the baselines: on a shared machine the load drifts; the slower of the two counts
    ours_after, views_after = measure_ours(), measure_views()
    adapt_s = max(ours_before["adapt_s"], ours_after["adapt_s"])
    by_views_s = {views: max(views_before[views], views_after[views]) for views in by_views}
    for name, (total, steps, seconds_per_step) in timed.items():
        seconds = seconds_per_step * total
        baselines[name] = {"steps": total, "timed_steps": steps, "extrapolated": steps < total,
                           "seconds_per_step": round(seconds_per_step, 4), "seconds": round(seconds, 2),
                           "speedup": round(seconds / adapt_s, 1), "goal": GOALS[name],
                           "meets_goal": seconds / adapt_s >= GOALS[name]}
    report = {
        "preset": cfg.preset, "encoder": encoder if trained else "untrained (same shapes; timing only)",
        "threads": args.threads, "tuning_steps": settings.tuning_steps, "views_per_step": cfg.personalize.views,
        "personalize": {"before_baselines": ours_before, "after_baselines": ours_after, "adapt_s": adapt_s},
        "baselines": baselines,
        "by_views": {views: {"adapt_s_before_after": [views_before[views], views_after[views]],
                             **{f"over_{name}": round(b["seconds"] / by_views_s[views], 1)
                                for name, b in baselines.items()}} for views in by_views},
        "views_fit": views_fit(cfg.personalize.views, adapt_s, by_views_s, baselines),
        "peak_rss_mb": round(peak_mb(), 1),
        "note": ("speedup = baseline training seconds / our adaptation seconds (encoder + tuning, the slower of "
                 "the runs before and after the baselines); "
                 + ("baselines run in full" if args.full else
                    f"baseline seconds EXTRAPOLATED from {args.measure_steps} timed steps (per-step time x total)")),
    }
    harness.report(report, args)
    scratch.cleanup()


if __name__ == "__main__":
    main()
