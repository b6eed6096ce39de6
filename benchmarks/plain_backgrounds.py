"""How often `reader.plain_background` names a prepared toy-world image's background, by the background the
toy world actually rendered (its captions.csv), and which share of pre-training prompts become captions.

    .venv/bin/python benchmarks/plain_backgrounds.py [--sample 1500]

The thresholds in components/toy/reader.py were chosen from this table: keep plain backgrounds, refuse textured
ones. "none" rows are multi-object scenes (the OpenImages-style source), whose captions name no background.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


from components.toy import reader  # noqa: E402
from components.config import load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=1500, help="prepared images read (seed 0)")
    args = parser.parse_args()
    cfg = load_config("toy")
    prepared = Path(cfg.prepare.out)
    manifest = pd.read_parquet(prepared / "manifest.parquet")
    captions = pd.read_csv(Path(cfg.toy_world.out) / "captions.csv")
    # a prepared image's source file name is its rendered file's name
    manifest["key"] = manifest["source_id"].str.split("/").str[-1]
    captions["key"] = captions["path"].str.split("/").str[-1]
    rows = manifest.merge(captions[["key", "background", "background_colour"]], on="key", how="left")
    rows = rows.sample(min(args.sample, len(rows)), random_state=0)
    named, right = [], []
    for path, colour in zip(rows["path"], rows["background_colour"]):
        read = reader.plain_background(np.asarray(Image.open(prepared / path).convert("RGB")))
        named.append(read is not None)
        right.append(read == colour)
    rows["named"], rows["right"] = named, right
    rows["background"] = rows["background"].fillna("none")
    by_kind = {kind: {"images": len(group), "named": round(float(group["named"].mean()), 3),
                      "named_correctly": round(float(group["right"][group["named"]].mean()), 3)
                      if group["named"].any() else None}
               for kind, group in rows.groupby("background")}
    print(json.dumps({"sample": len(rows), "captioned_share": round(float(rows["named"].mean()), 3),
                      "by_background": by_kind}, indent=1))


if __name__ == "__main__":
    main()
