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
import random
import torch
from PIL import Image
from bootstrap_recipe import canonical_renders, vae_measures
from components.toy import world as tw
from components.config import load_config
from components.model.base import load_clip, load_pipeline
from components.evaluation.check_base import shape_accuracy
torch.set_num_threads(1)
cfg = load_config("toy")
clip = load_clip(cfg.base.metrics_clip)
pipe = load_pipeline(cfg.base)
held = set(tw.held_out_combos(cfg.toy_world.base_holdout_fraction))
def caption(shape, colour, bg): return tw.Scene(tw.ToyConcept(shape, colour), background_colour=bg).caption()
_, clean = canonical_renders()
measures, recim = vae_measures(pipe.vae, clip)
print("clean canonical shape acc", measures["clean_shape"])
print("vae recon mse", measures["recon_mse"])
print("vae recon shape acc", measures["recon_shape"], flush=True)
# generations: train combos vs held-out combos (random bg)
rng = random.Random(0)
allc = [(s, c, b) for s in tw.SHAPES for c in tw.COLOURS for b in tw.COLOURS if b != c]
rng.shuffle(allc)
tr = [x for x in allc if x not in held][:48]
ho = [x for x in allc if x in held][:48]
for name, cs in (("train", tr), ("heldout", ho)):
    for g in (4.0, 7.5):
        ims = []
        for i in range(0, len(cs), 16):
            ims += pipe([caption(*k) for k in cs[i:i+16]], num_inference_steps=25, guidance_scale=g,
                        guidance_rescale=cfg.check_base.guidance_rescale, generator=torch.Generator().manual_seed(i)).images
        print(f"gen {name} g={g} shape acc", shape_accuracy(clip, ims, cs), flush=True)
        if g == 4.0:
            w = Image.new("RGB", (64 * 8, 64 * 2))
            for j, im in enumerate(ims[:16]): w.paste(im, (64 * (j % 8), 64 * (j // 8)))
            w.save(f"/tmp/shape_diagnosis/gen_{name}.png")
w = Image.new("RGB", (64 * 8, 64 * 2))
for j, im in enumerate(clean[:8] + recim[:8]): w.paste(im, (64 * (j % 8), 64 * (j // 8)))
w.save("/tmp/shape_diagnosis/clean_vs_rec.png")
