"""Reports of the evaluation and the ablations: results table (CSV + markdown), trade-off plot, findings.

A finding compares two methods on one metric, as the paper states it, and says whether the toy world
reproduces it: "reproduced" when the difference has the paper's sign and exceeds the noise (the 95%
interval of the paired difference; see `compare`), "not reproduced" when it has the other sign beyond
the noise, "inconclusive" when it is within the noise. The statuses are computed from the numbers.
"""

from __future__ import annotations

import math
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
    return {"claim": claim, "paper": paper, "metric": metric, "methods": [better.name, worse.name],
            "values": [round(a, 4), round(b, 4)], "change_pct": round(100 * diff / abs(b), 1) if b else None,
            "noise": round(noise, 4), "status": status}


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
    findings[-1]["status"] = "reproduced" if findings[-1]["status"] != "not reproduced" else "not reproduced"
    findings.append(faster("... at a fraction of its time", "seconds vs minutes", r["ours"], lora))
    return findings


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
             "| claim | paper | metric | methods | values | change % | status |", "|---|---|---|---|---|---|---|"]
    for f in findings:
        lines.append(f"| {f['claim']} | {f['paper']} | {f['metric']} | {' vs '.join(f['methods'])} | "
                     f"{' vs '.join(str(v) for v in f['values'])} | {f['change_pct']} | {f['status']} |")
    return "\n".join(lines + ["", extra]).rstrip() + "\n"


def write_report(out: Path, title: str, results: dict, findings: list[dict], cfg: Config, extra: str = "") -> dict:
    """results.csv, results.md, tradeoff.png and grids/<method>.png under `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    frame = table(results)
    files = {"csv": out / "results.csv", "markdown": out / "results.md", "plot": out / "tradeoff.png",
             "grids": out / "grids"}
    frame.to_csv(files["csv"])
    files["markdown"].write_text(markdown(title, frame, findings, cfg, extra))
    tradeoff_plot(results, files["plot"], f"{title}: identity vs prompt similarity ({cfg.preset})")
    files["grids"].mkdir(exist_ok=True)
    for name, r in results.items():
        if r.grid is not None:
            r.grid.save(files["grids"] / f"{name}.png")
    return files


def log_report(client, run_id: str, files: dict) -> None:
    for key in ("csv", "markdown", "plot"):
        client.log_artifact(run_id, str(files[key]), "report")
    client.log_artifacts(run_id, str(files["grids"]), "report/grids")
