"""Reports of the evaluation and the ablations: results table (CSV + markdown), trade-off plot, findings.

A finding compares two methods on one metric, as the paper states it, and says whether the toy world
reproduces it: "reproduced" when the difference has the paper's sign and exceeds the noise (the 95%
interval of the paired difference; see `compare`), "not reproduced" when it has the other sign beyond
the noise, "inconclusive" when it is within the noise. The statuses are computed from the numbers.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import Config
from components.evaluation.metrics import mean_ci

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
    status = "inconclusive" if abs(diff) <= noise else ("reproduced" if diff > 0 else "not reproduced")
    interval = [round(100 * (diff - noise) / abs(b), 1), round(100 * (diff + noise) / abs(b), 1)] if b else None
    return {"claim": claim, "paper": paper, "metric": metric, "methods": [better.name, worse.name],
            "values": [round(a, 4), round(b, 4)], "change_pct": round(100 * diff / abs(b), 1) if b else None,
            "change_pct_ci": interval, "noise": round(noise, 4), "status": status,
            "magnitude": magnitude(paper, interval)}


def magnitude(paper: str, interval: list[float] | None) -> str | None:
    """The measured change's 95% interval (percent) against the paper's "about +N%": "as the paper" when it holds
    N, else "smaller" or "larger" than the paper's; None when the paper gives no number. The sign is `status`'s."""
    found = re.search(r"about ([+-]?\d+(?:\.\d+)?)%", paper)
    if found is None or interval is None:
        return None
    target = float(found.group(1))
    return "as the paper" if interval[0] <= target <= interval[1] else ("smaller" if interval[1] < target else "larger")


def faster(claim: str, paper: str, fast, slow) -> dict:
    a, b = float(np.mean(fast.concept_seconds)), float(np.mean(slow.concept_seconds))
    return {"claim": claim, "paper": paper, "metric": "seconds", "methods": [fast.name, slow.name],
            "values": [round(a, 3), round(b, 3)], "change_pct": round(100 * (a - b) / b, 1) if b else None,
            "noise": None, "status": "reproduced" if a < b else "not reproduced"}


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
    # the baselines ran on the first concepts only: compare ours on the same concepts
    lora = r["lora-one-shot"]
    ours_same = r["ours"].subset(set(lora.concept))
    findings.append(compare("ours at least matches one-shot LoRA on identity", "matches or beats it",
                            ours_same, lora, "identity"))
    # a tie within the noise stays "inconclusive": it is no evidence that ours matches LoRA
    findings.append(faster("... at a fraction of its time", "seconds vs minutes", r["ours"], lora))
    # the product's bar: TI's identity (the highest baseline's) at LoRA's prompt similarity, on the same samples
    ti = r["ti-one-shot"]
    findings.append(compare("ours at least matches one-shot TI on identity", "matches or beats it",
                            r["ours"].subset(set(ti.concept)), ti, "identity"))
    findings.append(compare("ours keeps one-shot LoRA's prompt similarity", "matches or beats it", ours_same, lora,
                            "prompt"))
    return findings


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


def tradeoff_plot(results: dict, path: Path, title: str) -> None:
    """Figure 5 of the paper: identity (x) vs prompt similarity (y), every method labelled, 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=120)
    for i, (name, r) in enumerate(results.items()):
        s = r.summary()
        ours = name.startswith("ours") or not any(name.startswith(b) for b in ("lora", "ti-", "dreambooth"))
        ax.errorbar(s["identity"], s["prompt"], xerr=s["identity_ci95"], yerr=s["prompt_ci95"],
                    fmt="o" if ours else "s", color="tab:red" if ours else "tab:blue", capsize=2, alpha=0.8)
        # staggered offsets keep the labels of nearby points apart
        ax.annotate(name, (s["identity"], s["prompt"]), textcoords="offset points", xytext=(4, 4 - 9 * (i % 3)),
                    fontsize=7)
    ax.set_xlabel("identity similarity (CLIP image-image)")
    ax.set_ylabel("prompt similarity (CLIP text-image, S* removed)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def time_to_identity(results: dict, baselines: dict[str, list[str]], ours: list[str], path: Path) -> dict:
    """Identity and prompt similarity against the seconds to personalise one concept (log axis), for each baseline's
    step series (prefix -> method names, fewest steps first) beside `ours` (our points, e.g. 0 and 12 tuning steps);
    writes the plot to `path`. The quality-matched speed-up of a baseline: the seconds of its first point whose
    identity reaches ours' (the last of `ours`), divided by ours' seconds; when no point reaches it, its longest run
    divided by ours' seconds, a lower bound (`lower_bound` true: the baseline would need longer still)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = results[ours[-1]].summary()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
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
        for ax, metric in zip(axes, ("identity", "prompt")):
            ax.errorbar([s["seconds"] for s in points], [s[metric] for s in points],
                        yerr=[s[f"{metric}_ci95"] for s in points], marker="s", capsize=2, label=prefix)
            for name, s in zip(names, points):
                ax.annotate(name.rsplit("-", 1)[-1], (s["seconds"], s[metric]), textcoords="offset points",
                            xytext=(3, 3), fontsize=6)
    mine = [results[n].summary() for n in ours]
    for ax, metric in zip(axes, ("identity", "prompt")):
        ax.errorbar([s["seconds"] for s in mine], [s[metric] for s in mine], yerr=[s[f"{metric}_ci95"] for s in mine],
                    marker="o", color="tab:red", capsize=2, label=" / ".join(ours))
        ax.set_xscale("log")
        ax.set_xlabel("seconds to personalise one concept (log)")
        ax.set_ylabel(f"{metric} similarity")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Time to identity: baselines after each step count vs ours")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"ours": {n: {"identity": s["identity"], "prompt": s["prompt"], "seconds": s["seconds"]}
                     for n, s in zip(ours, mine)}, "quality_matched": speedups, "plot": str(path)}


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


def markdown(title: str, frame: pd.DataFrame, findings: list[dict], cfg: Config, extra: str = "") -> str:
    lines = [f"# {title}", "", f"preset `{cfg.preset}`; identity and prompt similarity with 95% intervals over "
             f"concepts x prompts x seeds; seconds = mean time to personalise one concept; peak_mb = peak memory "
             f"while the method ran.", "", markdown_table(frame), "", "## Paper findings", "",
             *findings_table(findings)]
    return "\n".join(lines + ["", extra]).rstrip() + "\n"


def findings_table(findings: list[dict]) -> list[str]:
    """The findings as markdown table lines: claim, paper, metric, methods, values, change with its 95%
    interval, status, magnitude against the paper's."""
    lines = ["| claim | paper | metric | methods | values | change % [95%] | status | magnitude vs paper |",
             "|---|---|---|---|---|---|---|---|"]
    for f in findings:
        interval = f.get("change_pct_ci")
        change = f"{f['change_pct']}" + (f" [{interval[0]}, {interval[1]}]" if interval else "")
        lines.append(f"| {f['claim']} | {f['paper']} | {f['metric']} | {' vs '.join(f['methods'])} | "
                     f"{' vs '.join(str(v) for v in f['values'])} | {change} | {f['status']} | "
                     f"{f.get('magnitude') or '-'} |")
    return lines


def write_report(out: Path, title: str, results: dict, findings: list[dict], cfg: Config, extra: str = "",
                 metrics: dict[str, float] | None = None) -> dict:
    """results.csv (one row per method: the trade-off data), metrics.json (method_metrics and the stage's own
    `metrics`: DVC's metrics file), results.md, tradeoff.png and grids/<method>.png under `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    frame = table(results)
    files = {"csv": out / "results.csv", "metrics": out / "metrics.json", "markdown": out / "results.md",
             "plot": out / "tradeoff.png", "grids": out / "grids"}
    frame.to_csv(files["csv"])
    summaries = {name: r.summary() for name, r in results.items()}
    files["metrics"].write_text(json.dumps({**method_metrics(summaries), **(metrics or {})}, indent=1,
                                           sort_keys=True) + "\n")
    files["markdown"].write_text(markdown(title, frame, findings, cfg, extra))
    tradeoff_plot(results, files["plot"], f"{title}: identity vs prompt similarity ({cfg.preset})")
    files["grids"].mkdir(exist_ok=True)
    for name, r in results.items():
        if r.grid is not None:
            r.grid.save(files["grids"] / f"{name}.png")
    return files


def log_report(client, run_id: str, files: dict) -> None:
    for key in ("csv", "metrics", "markdown", "plot"):
        client.log_artifact(run_id, str(files[key]), "report")
    client.log_artifacts(run_id, str(files["grids"]), "report/grids")
