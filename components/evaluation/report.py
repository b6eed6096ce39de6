"""Reports of the evaluation and the ablations: results table (CSV + markdown), trade-off plot, findings.

A finding compares two methods on one metric, as the paper states it, and says whether the toy world
reproduces it: "reproduced" when the difference has the paper's sign and exceeds the noise (the 95%
interval of the paired difference; see `compare`), "not reproduced" when it has the other sign beyond
the noise, "inconclusive" when it is within the noise. The speed claim has its own stated threshold
(`faster`). The statuses are computed from the numbers; each finding carries its rule (`rule`) and what it
rests on (`concepts`, `samples`), so the report can show both.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from components.evaluation.metrics import INTERVAL_NOTE, mean_ci


COMBINED = "combined"  # mean of identity and prompt similarity per sample: one number for "better overall"


def metric_values(result, metric: str) -> list[float]:
    if metric == COMBINED:
        return [(i + p) / 2 for i, p in zip(result.identity, result.prompt)]
    return getattr(result, metric)


def compare(claim: str, paper: str, better, worse, metric: str) -> dict:
    """Does `better` beat `worse` on `metric` ("identity", "prompt" or "combined") beyond the noise?

    Methods run on the same (concept, prompt, seed) samples are compared pairwise: the noise is the 95%
    interval of the mean per-sample difference, so the spread between concepts, which both share, does
    not hide a consistent difference. Otherwise the two means' intervals are combined."""
    va, vb = metric_values(better, metric), metric_values(worse, metric)
    (a, a_ci), (b, b_ci) = mean_ci(va), mean_ci(vb)
    if better.concept == worse.concept:
        diff, noise = mean_ci(np.subtract(va, vb))
    else:
        diff, noise = a - b, math.hypot(a_ci, b_ci)
    paired = better.concept == worse.concept
    status = "inconclusive" if abs(diff) <= noise else ("reproduced" if diff > 0 else "not reproduced")
    interval = [round(100 * (diff - noise) / abs(b), 1), round(100 * (diff + noise) / abs(b), 1)] if b else None
    return {"claim": claim, "paper": paper, "metric": metric, "methods": [better.name, worse.name],
            "values": [round(a, 4), round(b, 4)], "change_pct": round(100 * diff / abs(b), 1) if b else None,
            "change_pct_ci": interval, "noise": round(noise, 4), "status": status,
            "magnitude": magnitude(paper, interval),
            "rule": PAIRED_RULE if paired else UNPAIRED_RULE,
            "concepts": len(set(better.concept) | set(worse.concept)), "samples": len(va) if paired else None}


# the rules as the report states them (short: a table cell); the statuses above are computed by exactly these
PAIRED_RULE = "paired 95% t-interval excludes 0"
UNPAIRED_RULE = "beyond both 95% t-intervals combined"


def magnitude(paper: str, interval: list[float] | None) -> str | None:
    """The measured change's 95% interval (percent) against the paper's "about +N%": "as the paper" when it holds
    N, else "smaller" or "larger" than the paper's; None when the paper gives no number. The sign is `status`'s."""
    found = re.search(r"about ([+-]?\d+(?:\.\d+)?)%", paper)
    if found is None or interval is None:
        return None
    target = float(found.group(1))
    if interval[0] <= target <= interval[1]:
        return "as the paper"
    return "smaller" if interval[1] < target else "larger"


# "at a fraction of its time" (the paper: seconds against minutes) holds when ours takes at most this share of the
# other method's time per concept: an order of magnitude, not merely faster (17.8 s against 24.2 s is not it)
FRACTION_OF_TIME = 0.1


def faster(claim: str, paper: str, fast, slow) -> dict:
    """Mean seconds to personalise one concept; "reproduced" when fast / slow <= FRACTION_OF_TIME. Timings are not
    paired samples with a noise of their own here: the threshold is wide enough that the spread does not decide."""
    a, b = float(np.mean(fast.concept_seconds)), float(np.mean(slow.concept_seconds))
    ratio = a / b if b else None
    return {"claim": claim, "paper": paper, "metric": "seconds", "methods": [fast.name, slow.name],
            "values": [round(a, 3), round(b, 3)], "change_pct": round(100 * (a - b) / b, 1) if b else None,
            "ratio": None if ratio is None else round(ratio, 3), "noise": None,
            "status": "reproduced" if ratio is not None and ratio <= FRACTION_OF_TIME else "not reproduced",
            "rule": f"time ratio <= {FRACTION_OF_TIME:g}",
            "concepts": min(len(fast.concept_seconds), len(slow.concept_seconds)), "samples": None}


def findings_from(results: dict, claims: list[tuple[str, str, str, str, str]]) -> list[dict]:
    """compare() for each (claim, paper, better method, worse method, metric) whose methods both ran."""
    return [compare(claim, paper, results[a], results[b], metric) for claim, paper, a, b, metric in claims
            if a in results and b in results]


# (claim, what the paper reports, method expected better, method expected worse, metric); re-trained
# variants are compared with ours-short, the default recipe trained as long as they were
EVALUATION_CLAIMS = [
    ("tuning raises identity", "about +20%", "ours", "ours-no-tuning", "identity"),
    ("dual path during tuning raises prompt alignment", "about +30%", "ours", "ours-no-dual-path", "prompt"),
    ("contrastive regularisation beats none", "without it prompt words are ignored", "ours-short", "ours-no-reg",
     COMBINED),
    ("contrastive regularisation beats nearest-neighbour pull", "NN pull collapses modes", "ours-short",
     "ours-nn-cosine", COMBINED),
    ("the hypernetwork helps prompt alignment", "prompt alignment drops without it", "ours-short", "ours-no-hypernet",
     "prompt"),
]


def evaluation_findings(results: dict) -> list[dict]:
    r = results
    findings = findings_from(r, EVALUATION_CLAIMS)
    # the baselines may run on the first concepts only: compare ours on the same concepts, named `ours@baselines`
    # when that is fewer than the table's `ours` row (so a quoted value is never mistaken for the row's)
    lora = r["lora-one-shot"]
    ours_same = on_concepts(r["ours"], set(lora.concept))
    findings.append(compare("ours at least matches one-shot LoRA on identity", "matches or beats it",
                            ours_same, lora, "identity"))
    # a tie within the noise stays "inconclusive": it is no evidence that ours matches LoRA
    findings.append(faster("... at a fraction of its time", "seconds vs minutes", ours_same, lora))
    # the product's bar: TI's identity (the highest baseline's) at LoRA's prompt similarity, on the same samples
    ti = r["ti-one-shot"]
    findings.append(compare("ours at least matches one-shot TI on identity", "matches or beats it",
                            on_concepts(r["ours"], set(ti.concept)), ti, "identity"))
    findings.append(compare("ours keeps one-shot LoRA's prompt similarity", "matches or beats it", ours_same, lora,
                            "prompt"))
    return findings


BASELINE_SUBSET = "@baselines"  # suffix of ours restricted to the baselines' concepts (findings, time to identity)


def on_concepts(result, concepts: set[str]):
    """`result` on `concepts` only, renamed `<name>@baselines` when that drops any of its concepts."""
    if set(result.concept) <= concepts:
        return result
    return result.subset(concepts, f"{result.name}{BASELINE_SUBSET}")


# a method's headline metrics: the columns of every table and the names every run logs
METRICS = ("identity", "prompt", "seconds", "peak_mb")


def method_metrics(methods: dict[str, dict]) -> dict[str, float]:
    """`<method>/<metric>` for each method's summary: the one naming of the evaluate and ablate runs, the
    pipeline's parent run and DVC's metrics.json, so runs and experiments line up column by column in
    the MLflow compare view and in `dvc exp show`."""
    return {f"{name}/{metric}": summary[metric] for name, summary in methods.items() for metric in METRICS
            if isinstance(summary.get(metric), (int, float))}


def table(results: dict) -> pd.DataFrame:
    rows = [{"method": name, **r.summary()} for name, r in results.items()]
    return pd.DataFrame(rows).set_index("method")


def _pyplot():
    # matplotlib: only when plotting (start-up time); the Agg backend is set before pyplot is imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(summaries: list[dict], metric: str) -> list[list[float]]:
    """Errorbar lengths below and above each mean: its concept_interval (summary `<metric>_low` / `_high`)."""
    return [[max(0.0, s[metric] - s[f"{metric}_low"]) for s in summaries],
            [max(0.0, s[f"{metric}_high"] - s[metric]) for s in summaries]]


def is_ours(name: str) -> bool:
    return name.startswith("ours") or not any(name.startswith(b) for b in ("lora", "ti-", "dreambooth"))


LABEL_PT = 7  # label font size; a label's slot is 1.4 line heights


def margin_labels(ax, points: list[tuple[str, float, float]]) -> None:
    """Each (name, x, y) labelled in a column right of the axes at (about) its y, joined to its point by a thin
    line: labels on the points overlapped wherever methods score alike (17 of 25 on the toy run). Labels keep
    their y order and are pushed apart to one slot each, so none overlap whatever the scores."""
    fig = ax.figure
    fig.canvas.draw()  # the axes' final size and limits
    height_pt = ax.get_window_extent().height * 72 / fig.dpi
    gap = 1.4 * LABEL_PT / height_pt  # one slot, in axes fractions
    (y0, y1), order = ax.get_ylim(), sorted(points, key=lambda p: -p[2])
    slots, last = [], math.inf
    for _, _, y in order:  # top down: at its own height, or one slot below the label above
        last = min((y - y0) / (y1 - y0), last - gap)
        slots.append(last)
    for i in range(len(slots) - 1, -1, -1):  # bottom up: nothing below the axes' foot, if there is room
        slots[i] = max(slots[i], 0.0 if i == len(slots) - 1 else slots[i + 1] + gap)
    for (name, x, y), slot in zip(order, slots):
        ax.annotate(name, (x, y), xytext=(1.03, slot), textcoords="axes fraction", fontsize=LABEL_PT, va="center",
                    color="tab:red" if is_ours(name) else "tab:blue",
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.6", "shrinkA": 0, "shrinkB": 2})


def tradeoff_plot(results: dict, path: Path, title: str) -> None:
    plt = _pyplot()
    fig = tradeoff_figure(results, title)
    fig.savefig(path)
    plt.close(fig)


def tradeoff_figure(results: dict, title: str):
    """Figure 5 of the paper: identity (x) vs prompt similarity (y), every method labelled (margin_labels), bars the
    95% interval of metrics.concept_interval (the caption under the plot says so)."""
    plt = _pyplot()
    summaries = {name: r.summary() for name, r in results.items()}
    # tall enough for one label slot per method beside the axes
    fig = plt.figure(figsize=(9.5, max(5.5, 1.6 + len(summaries) * 1.5 * LABEL_PT / 72)), dpi=120)
    ax = fig.add_axes((0.09, 0.16, 0.6, 0.76))
    for kind, marker, colour in ((True, "o", "tab:red"), (False, "s", "tab:blue")):
        group = [s for name, s in summaries.items() if is_ours(name) == kind]
        if group:
            ax.errorbar([s["identity"] for s in group], [s["prompt"] for s in group], xerr=_bars(group, "identity"),
                        yerr=_bars(group, "prompt"), fmt=marker, color=colour, capsize=2, alpha=0.8, ls="none",
                        label="ours and its variants" if kind else "optimisation baselines")
    ax.set_xlabel("identity similarity (CLIP image-image)")
    ax.set_ylabel("prompt similarity (CLIP text-image, S* removed)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    margin_labels(ax, [(name, s["identity"], s["prompt"]) for name, s in summaries.items()])
    fig.text(0.09, 0.03, f"Bars: {INTERVAL_NOTE}.", fontsize=7, wrap=True)
    return fig


def _log_seconds_axis(ax) -> None:
    """Seconds on a log axis with labels at 1-2-5 steps (decades only beyond three decades) and none on the minor
    ticks: matplotlib's default labels the minor ticks of a short range, and they collided."""
    # matplotlib: only when plotting (start-up time)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low, high = ax.get_xlim()
    subs = (1.0,) if high / low > 1000 else (1.0, 2.0, 5.0)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def time_to_identity(results: dict, baselines: dict[str, list[str]], ours: list[str], path: Path) -> dict:
    """Identity and prompt similarity against the seconds to personalise one concept (log axis), for each baseline's
    step series (prefix -> method names, fewest steps first) beside `ours` (our points, e.g. 0 and 12 tuning steps);
    writes the plot to `path`. The quality-matched speed-up of a baseline: the seconds of its first point whose
    identity reaches ours' (the last of `ours`), divided by ours' seconds; when no point reaches it, its longest run
    divided by ours' seconds, a lower bound (`lower_bound` true: the baseline would need longer still)."""
    plt = _pyplot()
    reference = results[ours[-1]].summary()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), dpi=120)
    speedups = {}
    for prefix, names in baselines.items():
        points = [results[n].summary() for n in names if n in results]
        reached = [s for s in points if s["identity"] >= reference["identity"]]
        bound = reached[0]["seconds"] if reached else points[-1]["seconds"] if points else None
        speedups[prefix] = {
            "reached_at_s": reached[0]["seconds"] if reached else None,
            "speedup": round(bound / reference["seconds"], 2) if bound is not None and reference["seconds"] else None,
            "lower_bound": not reached,
            "best_identity": max((s["identity"] for s in points), default=None),
            "longest_s": points[-1]["seconds"] if points else None}
        # the step counts go in the legend, not on the points, where they collided with the other series'
        steps = [n.rsplit("-", 1)[-1] for n in names if n in results]
        label = f"{prefix} one-shot, {steps[0]} to {steps[-1]} steps (left to right)" if steps else prefix
        for ax, metric in zip(axes, ("identity", "prompt")):
            ax.errorbar([s["seconds"] for s in points], [s[metric] for s in points], yerr=_bars(points, metric),
                        marker="s", capsize=2, label=label)
    mine = [results[n].summary() for n in ours]
    for ax, metric in zip(axes, ("identity", "prompt")):
        ax.errorbar([s["seconds"] for s in mine], [s[metric] for s in mine], yerr=_bars(mine, metric),
                    marker="o", color="tab:red", capsize=2, label=" then ".join(ours))
        ax.set_xscale("log")
        _log_seconds_axis(ax)
        ax.set_xlabel("seconds to personalise one concept (log)")
        ax.set_ylabel(f"{metric} similarity")
        ax.grid(alpha=0.3, which="major")
        ax.legend(fontsize=7)
    fig.suptitle("Time to identity: baselines after each step count vs ours")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.text(0.01, 0.015, f"Bars: {INTERVAL_NOTE}.", fontsize=7)
    fig.savefig(path)
    plt.close(fig)
    return {"ours": {n: {"identity": s["identity"], "prompt": s["prompt"], "seconds": s["seconds"]}
                     for n, s in zip(ours, mine)}, "quality_matched": speedups, "plot": str(path)}


def comparison_grid(grids: dict, prompts: list[str], concept: str, path: Path) -> Path | None:
    """One concept side by side: one row per method (ours first, then each baseline), its input photo (the same in
    every row, to compare against) then one image per prompt, the same prompts and seed in every row.
    `grids`: method -> its sample grid (harness.sample_grid: a row per concept, the input then one image per
    prompt, the first concept on top), whose first row is taken.
    None when no method has a grid."""
    rows = {name: grid for name, grid in grids.items() if grid is not None}
    if not rows or not prompts:
        return None
    columns = 1 + len(prompts)
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.5 * columns + 0.6, 1.5 * len(rows) + 0.7), dpi=120,
                             squeeze=False)
    for r, (name, grid) in enumerate(rows.items()):
        side = grid.width // columns
        for c in range(columns):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            ax.imshow(grid.crop((c * side, 0, (c + 1) * side, side)).resize((128, 128), Image.NEAREST))
            if r == 0:
                ax.set_title("input photo" if c == 0 else prompts[c - 1], fontsize=8)
        axes[r][0].set_ylabel(name, fontsize=8)
    fig.suptitle(f"Concept {concept}:\nthe same prompts and seed in every row", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def time_to_identity_markdown(curve: dict, plot_name: str) -> str:
    """The curve's section of results.md: ours' points and each baseline's quality-matched speed-up."""
    lines = ["## Time to identity", "", f"![time to identity]({plot_name})", "",
             "| point | identity | prompt | seconds |", "|---|---|---|---|"]
    lines += [f"| {name} | {p['identity']:.4f} | {p['prompt']:.4f} | {p['seconds']:.3f} |"
              for name, p in curve["ours"].items()]
    lines += ["", "| baseline | first point reaching ours' identity (s) | quality-matched speed-up (>=: it never did; "
              "its longest run over ours) | best identity | longest run (s) |", "|---|---|---|---|---|"]
    for prefix, q in curve["quality_matched"].items():
        reached = "never" if q["reached_at_s"] is None else f"{q['reached_at_s']:.2f}"
        speedup = "-" if q["speedup"] is None else f"{'>= ' if q['lower_bound'] else ''}{q['speedup']:.1f}x"
        lines.append(f"| {prefix} | {reached} | {speedup} | {q['best_identity']:.4f} | {q['longest_s']:.2f} |")
    return "\n".join(lines) + "\n"


def time_to_identity_metrics(curve: dict) -> dict[str, float]:
    """`quality_matched_speedup_<baseline>` (a lower bound where the baseline never reached ours' identity:
    `quality_matched_speedup_<baseline>_is_lower_bound` 1)."""
    metrics = {}
    for prefix, q in curve["quality_matched"].items():
        if q["speedup"] is not None:
            metrics[f"quality_matched_speedup_{prefix}"] = q["speedup"]
            metrics[f"quality_matched_speedup_{prefix}_is_lower_bound"] = float(q["lower_bound"])
    return metrics


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' to_markdown needs tabulate, not a dependency)."""
    # counts (concepts, samples) arrive as floats after aggregation: a column of whole numbers prints as ints
    whole = {c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])
             and frame[c].dropna().map(float.is_integer if frame[c].dtype.kind == "f" else (lambda _: True)).all()}

    def cell(column, v) -> str:
        if column in whole and pd.notna(v):
            return str(int(v))
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    header = [frame.index.name or "", *frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(i), *(cell(c, v) for c, v in zip(frame.columns, row))]) + " |"
              for i, row in zip(frame.index, frame.itertuples(index=False))]
    return "\n".join(lines)


SMOKE_PRESET = "smoke"


def smoke_notice(preset: str, concepts: list[int]) -> str | None:
    """The line a smoke report opens with (None for other presets): its numbers come from a handful of concepts and
    a few training steps and only show that every stage runs. `concepts`: the methods' concept counts."""
    if preset != SMOKE_PRESET:
        return None
    span = f"{min(concepts)}-{max(concepts)}" if concepts and min(concepts) != max(concepts) else (
        f"{concepts[0]}" if concepts else "a few")
    return (f"SMOKE RUN (preset smoke: {span} concepts, a few steps; numbers not meaningful, "
            f"it only shows that every stage runs)")


def markdown(title: str, frame: pd.DataFrame, findings: list[dict], preset: str, extra: str = "") -> str:
    notice = smoke_notice(preset, [int(c) for c in frame["concepts"]] if "concepts" in frame else [])
    lines = [*([f"**{notice}**", ""] if notice else []), f"# {title}", "",
             f"preset `{preset}`; identity and prompt similarity: mean over concepts x prompts x seeds, "
             f"`_low`/`_high` its {INTERVAL_NOTE}; seconds = mean time to personalise one concept; peak_mb = peak "
             f"memory while the method ran.", "", markdown_table(frame), "", "## Paper findings", "",
             *findings_table(findings)]
    return "\n".join(lines + ["", extra]).rstrip() + "\n"


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def rests_on(f: dict) -> str:
    """What a finding was decided on: concepts x prompts (x seeds), or concepts for a timing."""
    if not f.get("concepts"):
        return "-"
    concepts = count(f["concepts"], "concept")
    if f.get("prompts"):
        seeds = f" x {count(f['seeds'], 'seed')}" if f.get("seeds", 1) > 1 else ""
        return f"{concepts} x {count(f['prompts'], 'prompt')}{seeds}"
    return f"{concepts}, {count(f['samples'], 'sample')}" if f.get("samples") else concepts


def findings_table(findings: list[dict]) -> list[str]:
    """The findings as markdown table lines: claim, paper, metric, methods, what it rests on, values, change
    with its 95% interval (or the time ratio), the rule, status, magnitude against the paper's; then what the
    rules and an `@baselines` method mean, where they occur."""
    lines = ["| claim | paper | metric | methods | rests on | values | change % [95%] | rule | status | "
             "magnitude vs paper |", "|---|---|---|---|---|---|---|---|---|---|"]
    for f in findings:
        interval = f.get("change_pct_ci")
        change = f"{f['change_pct']}" + (f" [{interval[0]}, {interval[1]}]" if interval else "")
        if f.get("ratio") is not None:
            change += f" (ratio {f['ratio']:g})"
        unit = " s" if f["metric"] == "seconds" else ""
        lines.append(f"| {f['claim']} | {f['paper']} | {f['metric']} | {' vs '.join(f['methods'])} | {rests_on(f)} | "
                     f"{' vs '.join(f'{v}{unit}' for v in f['values'])} | {change} | {f.get('rule', '-')} | "
                     f"{f['status']} | {f.get('magnitude') or '-'} |")
    notes = []
    if any(f.get("metric") != "seconds" for f in findings):
        notes.append("Rules: a comparison is *reproduced* when its 95% interval (Student t over the samples; paired "
                     "per (concept, prompt, seed) where both methods ran the same samples) lies on the paper's side "
                     "of 0, *not reproduced* when it lies on the other side, else *inconclusive*.")
    if any(f.get("metric") == "seconds" for f in findings):
        notes.append(f"The speed claim is *reproduced* when ours takes at most {FRACTION_OF_TIME:g} of the other's "
                     f"mean seconds per concept (the paper: seconds against minutes), not merely less.")
    if any(BASELINE_SUBSET in m for f in findings for m in f["methods"]):
        notes.append(f"`<method>{BASELINE_SUBSET}`: the method on the concepts the baselines ran on only (fewer "
                     f"than its row in the table), so that both sides are scored on the same samples.")
    return lines + [line for note in notes for line in ("", note)]


def write_report(out: Path, title: str, results: dict, findings: list[dict], preset: str, extra: str = "",
                 metrics: dict[str, float] | None = None) -> dict:
    """results.csv (one row per method: the trade-off data), metrics.json (method_metrics and the stage's own
    `metrics`: DVC's metrics file), results.md, tradeoff.png and grids/<method>.png under `out`; returns their
    paths."""
    out.mkdir(parents=True, exist_ok=True)
    frame = table(results)
    files = {"csv": out / "results.csv", "metrics": out / "metrics.json", "markdown": out / "results.md",
             "plot": out / "tradeoff.png", "grids": out / "grids"}
    frame.to_csv(files["csv"])
    summaries = {name: r.summary() for name, r in results.items()}
    files["metrics"].write_text(json.dumps({**method_metrics(summaries), **(metrics or {})}, indent=1,
                                           sort_keys=True) + "\n")
    files["markdown"].write_text(markdown(title, frame, findings, preset, extra))
    tradeoff_plot(results, files["plot"], f"{title}: identity vs prompt similarity ({preset})")
    files["grids"].mkdir(exist_ok=True)
    for name, r in results.items():
        if r.grid is not None:
            r.grid.save(files["grids"] / f"{name}.png")
    return files


def log_report(client, run_id: str, files: dict) -> None:
    for key in ("csv", "metrics", "markdown", "plot"):
        client.log_artifact(run_id, str(files[key]), "report")
    client.log_artifacts(run_id, str(files["grids"]), "report/grids")
