"""The evaluation harness: ours, its variants and the optimisation baselines on one set, one metric.

    harness = load_harness(cfg.engine, cfg.evaluate)
    with StageRun(experiment, "evaluate", parent_run_id, resolved(cfg), cfg.preset) as run:
        run.add(harness.ours("ours"))
        result = run.report(title, out, findings, len(harness.seeds))

Every method personalises each evaluation concept from its image(s) and draws every prompt x seed with
the same sampler settings (`personalize.*`); the metrics CLIP scores each image (components/evaluation/metrics.py).
`seconds` is the mean time to personalise one concept (encoder + tuning for ours, the optimisation loop
for the baselines; sampling is the same for all and excluded); `peak_mb` is the peak memory while the
method ran (process RSS on CPU, allocated GPU memory on CUDA), models included.
Each method is a nested MLflow run under the stage's run; the results table, the trade-off plot, the
findings and a sample grid per method are its artifacts (components/evaluation/report.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components import tracking
from components.config import Config, EngineConfig, EvaluateConfig
from components.data.images import to_pixels
from components.errors import UserError
from components.evaluation import report
from components.evaluation.eval_set import (
    EvalConcept,
    EvalSet,
    load_eval_set,
)
from components.evaluation.metrics import ClipMetrics, concept_interval
from components.inference.engine import Personalizer
from components.inference.generate import generate
from components.memory import PeakMemory
from components.model.base import load_clip
from components.progress import Progress
from components.training.baselines import photo_template, sample, train_baseline


log = logging.getLogger(__name__)

GRID_ROWS, GRID_PROMPTS = 4, 6  # sample grids: concepts x (input + prompts)


@dataclass
class MethodResult:
    name: str
    identity: list[float] = field(default_factory=list)  # one per (concept, prompt, seed) sample
    prompt: list[float] = field(default_factory=list)
    concept: list[str] = field(default_factory=list)  # the sample's concept
    concept_seconds: list[float] = field(default_factory=list)
    peak_mb: float = 0.0
    wall_s: float = 0.0
    grid: Image.Image | None = None

    def subset(self, concepts: set[str], name: str | None = None) -> MethodResult:
        """The samples of `concepts` only (and their seconds, when there is one timing per concept, in the order
        the concepts were run), under `name` (default: the same name)."""
        keep = [i for i, c in enumerate(self.concept) if c in concepts]
        order = list(dict.fromkeys(self.concept))
        seconds = ([s for c, s in zip(order, self.concept_seconds) if c in concepts]
                   if len(order) == len(self.concept_seconds) else self.concept_seconds)
        return MethodResult(name or self.name, [self.identity[i] for i in keep], [self.prompt[i] for i in keep],
                            [self.concept[i] for i in keep], seconds, self.peak_mb, self.wall_s)

    def to_dict(self) -> dict:
        """The per-sample scores and timings (not the grid): what a stored result keeps."""
        return {"name": self.name, "identity": self.identity, "prompt": self.prompt, "concept": self.concept,
                "concept_seconds": self.concept_seconds, "peak_mb": self.peak_mb, "wall_s": self.wall_s}

    @classmethod
    def from_dict(cls, values: dict, grid: Image.Image | None = None) -> MethodResult:
        return cls(**values, grid=grid)

    def summary(self) -> dict:
        """The means, their 95% intervals (`<metric>_low`, `<metric>_high`: metrics.concept_interval, a bootstrap
        over concepts), mean seconds per concept, peak memory, counts and wall time."""
        identity, identity_low, identity_high = concept_interval(self.identity, self.concept)
        prompt, prompt_low, prompt_high = concept_interval(self.prompt, self.concept)
        return {"identity": round(identity, 6), "identity_low": round(identity_low, 6),
                "identity_high": round(identity_high, 6), "prompt": round(prompt, 6),
                "prompt_low": round(prompt_low, 6), "prompt_high": round(prompt_high, 6),
                "seconds": round(float(np.mean(self.concept_seconds)), 4),
                "peak_mb": round(self.peak_mb, 1), "concepts": len(set(self.concept)), "samples": len(self.identity),
                "wall_s": round(self.wall_s, 2)}


def png_digest(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return hashlib.sha256(buf.getvalue()).hexdigest()


def sample_grid(rows: list[tuple[Image.Image, list[np.ndarray]]]) -> Image.Image:
    """Rows of (input image, generated images): the input in the first column."""
    side = rows[0][0].size[0]
    columns = 1 + max(len(images) for _, images in rows)
    grid = Image.new("RGB", (columns * side, len(rows) * side), (255, 255, 255))
    for r, (image, images) in enumerate(rows):
        grid.paste(image.resize((side, side)), (0, r * side))
        for c, array in enumerate(images, 1):
            grid.paste(Image.fromarray(array).resize((side, side)), (c * side, r * side))
    return grid


def evaluation_seeds(e: EvaluateConfig) -> list[int]:
    return e.full_seeds if e.full else e.seeds


# --- the harness -----------------------------------------------------------------------------------
class Harness:
    """A loaded base (inside `personalizer`), the metrics CLIP and the evaluation set."""

    def __init__(self, evaluate: EvaluateConfig, personalizer: Personalizer, metrics: ClipMetrics, eval_set: EvalSet):
        self.evaluate, self.personalizer, self.metrics, self.eval_set = evaluate, personalizer, metrics, eval_set
        self.seeds = evaluation_seeds(evaluate)

    def concepts(self, limit: int | None) -> list[EvalConcept]:
        return self.eval_set.concepts if self.evaluate.full or limit is None else self.eval_set.concepts[:limit]

    def _run(self, name: str, concepts: list[EvalConcept], personalise, draw, prompts: list[str] | None = None,
             ) -> MethodResult:
        """personalise(concept) -> state; draw(state, prompts, seeds) -> images; scored per sample."""
        result, rows = MethodResult(name), []
        started = time.perf_counter()
        progress = Progress(f"{name} concepts", len(concepts))
        with PeakMemory() as memory:
            for n, concept in enumerate(concepts, 1):
                t0 = time.perf_counter()
                state = personalise(concept)
                result.concept_seconds.append(time.perf_counter() - t0)
                identity, prompt = self._score(result, rows, concept, draw(state, *self._samples(prompts)),
                                               prompts)
                log.info("%s: concept %d/%d (%s) identity %.3f prompt %.3f", name, n, len(concepts), concept.name,
                         identity, prompt)
                progress.update(n, identity=identity, prompt=prompt)
        result.peak_mb, result.wall_s, result.grid = memory.peak_mb, time.perf_counter() - started, sample_grid(rows)
        return result

    def _samples(self, prompts: list[str] | None = None) -> tuple[list[str], list[int]]:
        """(prompt, seed) of every sample of one concept: each prompt with each seed."""
        prompts = prompts or self.eval_set.prompts
        return [p for p in prompts for _ in self.seeds], [s for _ in prompts for s in self.seeds]

    def _score(self, result: MethodResult, rows: list, concept: EvalConcept, images: list[np.ndarray],
               prompts: list[str] | None = None) -> tuple[float, float]:
        """Scores one concept's samples into `result` (and its grid rows); returns their mean identity and prompt."""
        scores = self.metrics.score(images, self._samples(prompts)[0], concept.image)
        result.identity += scores.identity.tolist()
        result.prompt += scores.prompt.tolist()
        result.concept += [concept.name] * len(images)
        if len(rows) < GRID_ROWS:
            rows.append((concept.image, images[::len(self.seeds)][:GRID_PROMPTS]))
        return float(scores.identity.mean()), float(scores.prompt.mean())

    def ours(self, name: str, personalizer=None, limit: int | None = None,
             prompts: list[str] | None = None) -> MethodResult:
        """Ours (or a variant Personalizer): encoder forward + tuning per concept, then sampling."""
        p = personalizer or self.personalizer
        settings = p.settings()

        def personalise(concept: EvalConcept):
            return p.concept(concept.image, png_digest(concept.image), settings.tuning_steps)[0]

        def draw(state, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
            return generate(p.pipe, p.base.prompts, state, prompts, seeds, settings.sampling)

        return self._run(name, self.concepts(limit), personalise, draw, prompts)

    def baseline(self, name: str, method: str, shots: int, limit: int | None,
                 steps: int | None = None) -> MethodResult:
        """An optimisation baseline trained per concept on `shots` images of it (1: one-shot) for `steps` steps
        (default: the config's `<method>_steps`)."""
        p, e = self.personalizer, self.evaluate
        settings = p.settings()
        steps = getattr(e, f"{method}_steps") if steps is None else steps

        def personalise(concept: EvalConcept):
            pixels = torch.cat([to_pixels(image, p.side) for image in concept.images[:shots]])
            progress = Progress(f"{name} {concept.name}", steps)
            return train_baseline(method, p.pipe, pixels, steps, e, seed=self.seeds[0],
                                  guidance_rescale=settings.guidance_rescale,
                                  template=photo_template(pixels, p.config.personalize),
                                  on_step=lambda i, loss: progress.update(i, loss=loss))

        def draw(state, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
            return sample(p.pipe, p.base.prompts, state, prompts, seeds, settings.sampling)

        return self._run(name, self.concepts(limit), personalise, draw)

    def baseline_series(self, prefix: str, method: str, steps: list[int], limit: int | None,
                        ) -> dict[int, MethodResult]:
        """One-shot `method` ("ti" or "lora") after each of `steps` (step count -> its row `<prefix>-one-shot-<k>`,
        fewest steps first): one run per concept
        to the largest count, sampled and scored at each count on the way (the lr is constant, so the snapshot at k
        steps is the k-step run). A point's seconds: set-up plus the loop to k, without the earlier points'
        sampling; peak memory and wall time are the whole series'."""
        p, e = self.personalizer, self.evaluate
        settings = p.settings()
        steps = sorted(set(steps))
        results = {k: MethodResult(f"{prefix}-one-shot-{k}") for k in steps}
        rows: dict[int, list] = {k: [] for k in steps}
        concepts = self.concepts(limit)

        def train(n: int, concept: EvalConcept) -> None:
            progress = Progress(f"{prefix} series {concept.name}", steps[-1])
            t0, paused = time.perf_counter(), 0.0

            def snapshot(state) -> None:
                nonlocal paused
                t = time.perf_counter()
                result = results[state.steps]
                result.concept_seconds.append(t - t0 - paused)
                images = sample(p.pipe, p.base.prompts, state, *self._samples(), settings.sampling)
                identity, prompt = self._score(result, rows[state.steps], concept, images)
                log.info("%s: concept %d/%d (%s) identity %.3f prompt %.3f", result.name, n, len(concepts),
                         concept.name, identity, prompt)
                paused += time.perf_counter() - t

            pixels = to_pixels(concept.images[0], p.side)
            train_baseline(method, p.pipe, pixels, steps[-1], e, seed=self.seeds[0],
                           guidance_rescale=settings.guidance_rescale, snapshots=steps, on_snapshot=snapshot,
                           template=photo_template(pixels, p.config.personalize),
                           on_step=lambda i, loss: progress.update(i, loss=loss))

        started = time.perf_counter()
        with PeakMemory() as memory:
            for n, concept in enumerate(concepts, 1):
                train(n, concept)
        for k, result in results.items():
            result.peak_mb, result.wall_s, result.grid = (memory.peak_mb, time.perf_counter() - started,
                                                          sample_grid(rows[k]))
        return results


# --- stored results: work that does not depend on the encoder under test, done once -------------------------
RESULTS_FILE = "results.json"


def save_results(out: str | Path, stage: str, key: dict, results: dict[str, MethodResult], extra: dict | None = None,
                 ) -> Path:
    """`results` with the `key` they were computed under (settings and model fingerprints) into out/results.json, and
    each method's sample grid into out/grids/<method>.png: small files, committed like models/."""
    out = Path(out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    for name, result in results.items():
        if result.grid is not None:
            result.grid.save(out / "grids" / f"{name}.png")
    path = out / RESULTS_FILE
    path.write_text(json.dumps({"stage": stage, "key": key, "methods": {n: r.to_dict() for n, r in results.items()},
                                **(extra or {})}, indent=1) + "\n")
    return path


def stored_key(out: str | Path) -> dict | None:
    """The key stored results were computed under, or None when there are none (or they cannot be read)."""
    try:
        return json.loads((Path(out) / RESULTS_FILE).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def load_results(out: str | Path, stage: str, key: dict) -> tuple[dict[str, MethodResult], dict]:
    """The results `save_results` stored in `out` under `key`, and the file's other entries; a UserError that names
    what changed and the command that brings them up to date when they are missing or were computed otherwise."""
    path = Path(out) / RESULTS_FILE
    command = f"`datencoder {stage}` (or `dvc repro {stage}`)"
    try:
        stored = json.loads(path.read_text())
    except OSError:
        raise UserError(f"no {stage} results in {path}: run {command}") from None
    except ValueError as e:
        raise UserError(f"{path} is not readable JSON ({e}): run {command} again") from None
    changed = sorted(k for k in set(key) | set(stored.get("key", {})) if key.get(k) != stored.get("key", {}).get(k))
    if changed:
        raise UserError(f"the {stage} results in {path} were computed under other settings ({', '.join(changed[:6])}"
                        f"{', ...' if len(changed) > 6 else ''}): run {command}")
    grids = Path(out) / "grids"
    methods = {name: MethodResult.from_dict(values, _image(grids / f"{name}.png"))
               for name, values in stored["methods"].items()}
    return methods, {k: v for k, v in stored.items() if k not in ("key", "methods")}


def _image(path: Path) -> Image.Image | None:
    return Image.open(path).convert("RGB") if path.is_file() else None


def settings_key(cfg: Config, fields: dict[str, tuple[str, ...]]) -> dict:
    """{"section.key": value} of the given config fields (what a stored result depends on: a key over the config)."""
    return {f"{section}.{name}": getattr(getattr(cfg, section), name) for section, names in fields.items()
            for name in names}


def load_harness(engine: EngineConfig, evaluate: EvaluateConfig, encoder: bool = True) -> Harness:
    """The base, the metrics CLIP, the evaluation set and (with `encoder`) ours' encoder, loaded once."""
    return harness_for(Personalizer(engine, engine.personalize.encoder if encoder else None), evaluate)


def harness_for(personalizer: Personalizer, evaluate: EvaluateConfig) -> Harness:
    """A harness around a loaded Personalizer: the evaluation set `evaluate` names and the metrics CLIP of its base,
    on its device."""
    base = personalizer.config.base
    clip = load_clip(base.metrics_clip, personalizer.runtime.device)
    return Harness(evaluate, personalizer, ClipMetrics(clip), load_eval_set(evaluate, base.kind))


class StageRun:
    """The MLflow run of `evaluate` or `ablate`: one nested run per method (metrics, parameters, sample grid),
    then the report's files as artifacts; the run ends FAILED if the block raises. `params`: the stage's
    resolved config (components.config.resolved), logged as the run's parameters."""

    def __init__(self, experiment: str, stage: str, parent_run_id: str | None, params: dict, preset: str):
        self.experiment, self.stage, self.preset = experiment, stage, preset
        self.started = time.perf_counter()
        self._run = tracking.run(experiment, stage, {"stage": stage, "preset": preset}, parent_run_id, params=params)
        self.results: dict[str, MethodResult] = {}

    def __enter__(self) -> StageRun:
        self.client, self.run_id = self._run.__enter__()
        return self

    def __exit__(self, kind, error, trace) -> bool | None:
        return self._run.__exit__(kind, error, trace)

    def add(self, result: MethodResult, params: dict | None = None) -> None:
        self.results[result.name] = result
        summary = result.summary()
        with tracking.run(self.experiment, result.name, {"stage": self.stage, "method": result.name}, self.run_id,
                          params=params) as (client, run_id):
            tracking.log_metrics(client, run_id, {k: v for k, v in summary.items() if isinstance(v, (int, float))},
                                 step=0)
            if result.grid is not None:
                client.log_image(run_id, result.grid, artifact_file=f"samples/{result.name}.png")

    def report(self, title: str, out: str, findings: list[dict], seeds: int, extra: str = "",
               metrics: dict[str, float] | None = None) -> dict:
        """Write and log the report (`seeds`: the evaluation seeds of every sample; `metrics`: the stage's own,
        beside every method's); returns the stage's result (what the CLI prints)."""
        for f in findings:  # what each finding rests on, in the design's terms (every concept has every prompt x seed)
            f["seeds"] = seeds
            if f.get("samples") and f.get("concepts"):
                f["prompts"] = f["samples"] // f["concepts"] // seeds
        files = report.write_report(Path(out), title, self.results, findings, self.preset, extra, metrics)
        report.log_report(self.client, self.run_id, files)
        methods = {name: r.summary() for name, r in self.results.items()}
        tracking.log_metrics(self.client, self.run_id, {**report.method_metrics(methods), **(metrics or {})}, step=0)
        return {"methods": methods, "findings": findings,
                "mlflow_run_id": self.run_id, "report": {k: str(v) for k, v in files.items() if k != "grids"},
                "seconds": round(time.perf_counter() - self.started, 1)}
