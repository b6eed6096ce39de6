"""Where does the toy base lose shape? The metrics CLIP's shape accuracy (choosing among the 12 shape
captions) on clean canonical renders, on the same renders through the VAE, and on generations for
training vs held-out (shape, colour, background) combinations. Writes grids to /tmp/shape_diagnosis/.

    .venv/bin/python benchmarks/shape_diagnosis.py
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
os.makedirs("/tmp/shape_diagnosis", exist_ok=True)
import random, sys, numpy as np, torch
from PIL import Image
from components import toy_world as tw
from components.config import load_config
from components.base_model import load_clip, load_pipeline
from components.check_base import _classify
torch.set_num_threads(1)
cfg = load_config("toy")
clip = load_clip(cfg.base.metrics_clip)
pipe = load_pipeline(cfg.base)
frac = cfg.toy_world.base_holdout_fraction
rng = random.Random(0)
combos = [(s, c, "gray" if c != "gray" else "white") for s in tw.SHAPES for c in tw.COLOURS]
held = set(tw.held_out_combos(frac))
def caption(shape, colour, bg): return tw.Scene(tw.Concept(shape, colour), background_colour=bg).caption()
def shape_acc(images, combos):
    cands = [[caption(k, c, bg) for k in tw.SHAPES] for _, c, bg in combos]
    p = _classify(clip, images, cands)
    return float(np.mean([tw.SHAPES[i] == s for i, (s, _, _) in zip(p, combos)]))
clean = [tw.render(tw.Scene(tw.Concept(s, c), background_colour=bg), 64, seed=i) for i, (s, c, bg) in enumerate(combos)]
print("clean canonical shape acc", shape_acc(clean, combos), flush=True)
x = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in clean])).permute(0, 3, 1, 2) / 127.5 - 1
with torch.no_grad():
    rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
print("vae recon mse", float(((rec - x) ** 2).mean()))
recim = [Image.fromarray(((r.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for r in rec]
print("vae recon shape acc", shape_acc(recim, combos), flush=True)
# generations: train combos vs held-out combos (random bg)
allc = [(s, c, b) for s in tw.SHAPES for c in tw.COLOURS for b in tw.COLOURS if b != c]
rng.shuffle(allc)
tr = [x for x in allc if x not in held][:48]
ho = [x for x in allc if x in held][:48]
for name, cs in (("train", tr), ("heldout", ho)):
    for g in (4.0, 7.5):
        ims = []
        for i in range(0, len(cs), 16):
            ims += pipe([caption(*k) for k in cs[i:i+16]], num_inference_steps=25, guidance_scale=g,
                        generator=torch.Generator().manual_seed(i)).images
        print(f"gen {name} g={g} shape acc", shape_acc(ims, cs), flush=True)
        if g == 4.0:
            w = Image.new("RGB", (64 * 8, 64 * 2))
            for j, im in enumerate(ims[:16]): w.paste(im, (64 * (j % 8), 64 * (j // 8)))
            w.save(f"/tmp/shape_diagnosis/gen_{name}.png")
w = Image.new("RGB", (64 * 8, 64 * 2))
for j, im in enumerate(clean[:8] + recim[:8]): w.paste(im, (64 * (j % 8), 64 * (j // 8)))
w.save("/tmp/shape_diagnosis/clean_vs_rec.png")
