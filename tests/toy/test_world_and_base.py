"""Issue 2: config, toy world, tokenizer, CLI contract, base-model loading (toy and sd15 paths)."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from components.config import load_config
from components.errors import UserError
from components.toy import reader
from components.toy import world as tw


CLI = [sys.executable, "-m", "components.cli"]


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600, **kw)


# --- config -------------------------------------------------------------------------------------
def test_presets_resolve_and_differ():
    toy, smoke, sd15 = (load_config(p) for p in ("toy", "smoke", "sd15"))
    assert toy.preset == "toy" and toy.base.kind == "toy"
    assert smoke.bootstrap.unet_steps < toy.bootstrap.unet_steps
    assert sd15.base.kind == "sd15" and sd15.base.backbone_clip.model_name == "ViT-H-14"
    assert sd15.base.metrics_clip.model_name == "ViT-B-16"


def test_params_yaml_is_the_resolved_toy_preset(root):
    """The same values; the defaults read committed inputs from the project home (absolute paths), params.yaml
    names them relative to the checkout, where `dvc repro` runs."""
    def in_checkout(value):
        if isinstance(value, dict):
            return {k: in_checkout(v) for k, v in value.items()}
        return value.removeprefix(f"{root}/") if isinstance(value, str) else value

    from_file = load_config(path=root / "params.yaml")
    assert from_file.model_dump() == in_checkout(load_config("toy").model_dump())


@pytest.mark.parametrize("body, key", [
    ({"bootstrap": {"unet_stepz": 3}}, "bootstrap.unet_stepz"),
    ({"bootstrap": {"unet_steps": "many"}}, "bootstrap.unet_steps"),
    ({"toy_world": {"n": -1}}, "toy_world.n"),
    ({"colour": 1}, "colour"),
    ({"bootstrap": {"device": "gpu"}}, "bootstrap.device"),
])
def test_bad_config_names_the_key(tmp_path, body, key):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(UserError) as err:
        load_config(path=path)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_old_knob_names_still_load_with_a_deprecation_line(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("preset: smoke\npersonalize:\n  steps: 3\n")
    with pytest.warns(FutureWarning, match="personalize.tuning_steps"):
        assert load_config(path=old).personalize.tuning_steps == 3
    both = tmp_path / "both.yaml"
    both.write_text("preset: smoke\npersonalize:\n  steps: 3\n  tuning_steps: 4\n")
    with pytest.raises(UserError, match="tuning_steps"):
        load_config(path=both)
    r = run_cli("personalize", "--preset", "smoke", "--image", str(tmp_path / "none.png"), "--prompt", "S*",
                "--steps", "2", "--blend", "1", "--sampling-steps", "2")
    assert r.returncode == 2 and "cannot read image" in r.stderr
    assert all(f"{old} is deprecated; use {new}" in r.stderr for old, new in
               [("--steps", "--tuning-steps"), ("--blend", "--alpha-blend"),
                ("--sampling-steps", "--num-inference-steps")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bootstrap_on_cuda_without_a_gpu_is_refused_before_writing(tmp_path):
    from components.toy.bootstrap import bootstrap

    with pytest.raises(UserError, match="no CUDA device"):
        bootstrap(load_config("smoke", overrides={"bootstrap": {"device": "cuda"}}), str(tmp_path / "models"))
    assert not (tmp_path / "models").exists()


def test_unknown_preset_and_unreadable_config(tmp_path):
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        load_config("huge")
    with pytest.raises(UserError, match="cannot read config"):
        load_config(path=tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("bootstrap: [unclosed\n")
    with pytest.raises(UserError, match="cannot parse config"):
        load_config(path=tmp_path / "bad.yaml")


# --- toy world ----------------------------------------------------------------------------------
def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_toy_world_same_seed_same_bytes(tmp_path):
    a = tw.write_toy_world(tmp_path / "a", n=16, seed=3)
    b = tw.write_toy_world(tmp_path / "b", n=16, seed=3)
    c = tw.write_toy_world(tmp_path / "c", n=16, seed=4)
    assert a["images"] == b["images"] == c["images"] == 16 and a["boxes"] >= 2 * a["scenes"]
    digest_a = _tree_digest(tmp_path / "a")
    digest_a.pop("toy_world.json")
    digest_b = _tree_digest(tmp_path / "b")
    digest_b.pop("toy_world.json")
    assert digest_a == digest_b
    assert digest_a != {k: v for k, v in _tree_digest(tmp_path / "c").items() if k != "toy_world.json"}


def test_toy_world_real_source_formats(tmp_path):
    tw.write_toy_world(tmp_path / "w", n=24, seed=0)
    w = tmp_path / "w"
    synsets = dict(line.split(" ", 1) for line in (w / "imagenet/LOC_synset_mapping.txt").read_text().splitlines())
    assert len(synsets) == 12 and {s.strip() for s in synsets.values()} == set(tw.SHAPES)
    jpegs = list((w / "imagenet/train").glob("n*/n*_*.JPEG"))
    assert len(jpegs) == 24 and all(p.parent.name in synsets for p in jpegs)
    with open(w / "openimages/oidv6-train-annotations-bbox.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf", "IsDepiction"} <= set(rows[0])
    for r in rows:
        assert 0 <= float(r["XMin"]) < float(r["XMax"]) <= 1 and 0 <= float(r["YMin"]) < float(r["YMax"]) <= 1
        assert (w / "openimages/train" / f"{r['ImageID']}.jpg").is_file()
    with open(w / "openimages/oidv7-class-descriptions.csv") as f:
        classes = {r["LabelName"]: r["DisplayName"] for r in csv.DictReader(f)}
    assert {r["LabelName"] for r in rows} <= set(classes)
    with open(w / "captions.csv") as f:
        captions = list(csv.DictReader(f))
    assert len(captions) == 24 + len({r["ImageID"] for r in rows})
    assert all((w / c["path"]).is_file() and c["caption"] for c in captions)


@pytest.mark.parametrize("colour", list(tw.COLOURS))
def test_palette_colours_are_exact(colour):
    bg = "black" if colour != "black" else "white"
    image = np.asarray(tw.render(tw.Scene(tw.ToyConcept("square", colour), background_colour=bg, size="large")))
    assert tuple(image[32, 32]) == tw.COLOURS[colour]
    assert tuple(image[1, 1]) == tw.COLOURS[bg]


def test_every_shape_pattern_background_and_style_renders_distinctly():
    masks = {s: np.asarray(tw.shape_mask(s, 32, 32, 14, 64)) > 127 for s in tw.SHAPES}
    for a in tw.SHAPES:
        assert masks[a].sum() > 50
        for b in tw.SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).sum() > 20, (a, b)
    base = tw.Scene(tw.ToyConcept("circle", "red", "solid", "white"), background_colour="blue", size="large")
    variants = [base] + [tw.Scene(tw.ToyConcept("circle", "red", p, "white"), background_colour="blue", size="large")
                         for p in tw.PATTERNS[1:]]
    variants += [tw.Scene(base.concept, background=b, background_colour="blue", size="large")
                 for b in tw.BACKGROUNDS[1:]]
    variants += [tw.Scene(base.concept, background_colour="blue", size="large", style=s) for s in tw.STYLES[1:]]
    variants += [tw.Scene(base.concept, background_colour="blue", position="top left"),
                 tw.Scene(base.concept, background_colour="blue", count=2)]
    renders = [np.asarray(tw.render(v)).tobytes() for v in variants]
    assert len(set(renders)) == len(renders)


def test_captions_follow_the_design_vocabulary():
    scene = tw.Scene(tw.ToyConcept("star", "red", "striped", "white"), background_colour="blue", size="large")
    assert scene.caption() == "a large red striped star on a blue background"
    assert scene.caption(subject="S*") == "S* on a blue background"
    assert tw.Scene(scene.concept, background="beach").caption(subject="S*") == "S* on a beach"
    sketch = tw.Scene(scene.concept, style="sketch", background="grass")
    assert sketch.caption(subject="S*") == "a sketch of S* on grass"
    assert tw.Scene(scene.concept, count=2, background="grass").caption(subject="S*") == "two S* on grass"


def test_caption_templates_leave_only_the_object_out():
    """The pre-training and tuning prompt: everything the caption says but the object's look (colour, pattern,
    shape)."""
    concept = tw.ToyConcept("star", "red", "striped", "white")
    assert tw.Scene(concept, background_colour="blue", size="large").template() == "a large {} on a blue background"
    assert tw.Scene(concept, background="beach").template() == "{} on a beach"
    assert tw.Scene(concept, background="grass", size="small", position="top left",
                    style="sketch").template() == "a sketch of a small {} at the top left on grass"
    assert tw.Scene(concept, background="night", count=2, size="small").template() == "two small {} at night"
    rng = random.Random(0)
    for _ in range(500):
        scene = tw.sample_scene(rng)
        template, c = scene.template(), scene.concept
        said = set(template.replace("{}", " ").split())
        assert template.count("{}") == 1 and template.endswith(tw.background_phrase(scene.background,
                                                                                   scene.background_colour))
        assert not said & {c.colour, c.shape, tw.PLURALS.get(c.shape, c.shape + "s"), c.pattern}
        assert (scene.size in said) == (scene.size != "medium") and ("two" in said) == (scene.count == 2)


def test_the_toy_vocabulary_is_every_word_of_the_base_captions():
    """base.vocabulary (the regulariser's real words) is what the toy base was trained on: the captions' words."""
    from components.config import TOY_VOCABULARY

    rng = random.Random(1)
    words = {w for _ in range(20000) for w in tw.sample_scene(rng).caption().split()}
    assert words == set(TOY_VOCABULARY)


def test_scenes_are_read_back_from_photos():
    """The toy reader's template of a photo (describe_scene): every canonical view exactly, and nearly every scene of
    the world's own distribution through JPEG (background, count, size, position, style)."""
    import io

    from PIL import Image

    from components.evaluation.eval_set import background_for

    rng = random.Random(3)
    for _ in range(120):
        concept = tw.sample_concept(rng)
        scene = tw.canonical(concept, background_for(concept))
        assert reader.describe(np.asarray(tw.render(scene, 64))) == scene.template() == "{} on a " \
            f"{scene.background_colour} background"
    hits = []
    for i in range(300):
        scene = tw.sample_scene(rng)
        buffer = io.BytesIO()
        tw.render(scene, 64, seed=i).save(buffer, "JPEG", quality=95)
        hits.append(reader.describe(np.asarray(Image.open(buffer).convert("RGB"))) == scene.template())
    assert np.mean(hits) >= 0.85
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert reader.describe(noise) is None and reader.describe(np.full((64, 64, 3), 128, np.uint8)) is None


def test_plain_backgrounds_are_read_from_the_border_after_jpeg():
    """check-base's background reading: each palette colour through a JPEG round trip; textured, off-palette
    and noisy borders name nothing."""
    import io

    from PIL import Image

    def jpeg(image: Image.Image) -> np.ndarray:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95)
        return np.asarray(Image.open(buffer).convert("RGB"))

    concept = tw.ToyConcept("star", "red", "striped", "white")
    for colour in tw.COLOURS:
        if colour not in ("red", "white"):
            assert reader.plain_background(jpeg(tw.render(tw.Scene(concept, background_colour=colour)))) == colour
    for kind in ("beach", "night"):
        assert reader.plain_background(jpeg(tw.render(tw.Scene(concept, background=kind)))) is None
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert reader.plain_background(noise) is None
    # plain, not a palette colour
    assert reader.plain_background(np.full((64, 64, 3), (90, 200, 90), np.uint8)) is None


def test_shapes_are_read_back_from_renders():
    """benchmarks/identity_stages.py's pixel shape reading: every shape, any colour, pattern and size; a blank image
    reads as nothing."""
    import random

    rng = random.Random(0)
    hits = []
    for i in range(96):
        concept = tw.sample_concept(rng, [tw.SHAPES[i % len(tw.SHAPES)]])
        background = next(c for c in ("gray", "white", "black", "blue")
                          if c not in (concept.colour, concept.pattern_colour))
        scene = tw.Scene(concept, background_colour=background, size=rng.choice(list(tw.SIZES)))
        hits.append(reader.read_shape(np.asarray(tw.render(scene, 64, seed=i))) == concept.shape)
    assert np.mean(hits) >= 0.9
    assert reader.read_shape(np.full((64, 64, 3), 128, np.uint8)) is None


def test_base_holdout_combos_never_sampled_for_training():
    held = set(tw.held_out_combos(0.1))
    assert 100 < len(held) < 250
    for s in tw.scenes_for_training(2000, seed=1, holdout_fraction=0.1):
        if s.background == "plain":
            assert (s.concept.shape, s.concept.colour, s.background_colour) not in held


def test_toy_tokenizer_has_one_token_per_toy_word(tmp_path):
    from components.toy.tokenizer import save_toy_tokenizer, toy_words

    tok = save_toy_tokenizer(tmp_path / "tok")
    for word in toy_words():
        assert len(tok.tokenize(word)) == 1, word
    assert len(tok.tokenize("zebra")) > 1  # unknown words still spell out in byte-level pieces


# --- CLI contract -------------------------------------------------------------------------------
def test_cli_toy_world_json_and_bad_input(tmp_path):
    ok = run_cli("toy-world", "--out", str(tmp_path / "w"), "--n", "5", "--seed", "1", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["images"] == 5
    for bad in ("0", "-3", "many"):
        r = run_cli("toy-world", "--out", str(tmp_path / "x"), "--n", bad)
        assert r.returncode != 0 and "positive integer" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "file").write_text("not a dir")
    r = run_cli("toy-world", "--out", str(tmp_path / "file" / "w"), "--n", "2")
    assert r.returncode == 2 and "cannot write the toy world" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
    r = run_cli("toy-world", "--preset", "huge", "--out", str(tmp_path / "y"), "--n", "2")
    assert r.returncode == 2 and "unknown preset" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# --- base models ----------------------------------------------------------------------------------
def test_missing_sd15_weights_is_one_line():
    r = run_cli("check-base", "--preset", "sd15", env={"HF_HOME": "/nonexistent-hf-home", "PATH": "/usr/bin"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in line and "huggingface-cli download" in line


def test_missing_toy_base_names_the_path(tmp_path):
    from components.model.base import load_pipeline

    cfg = load_config("toy", overrides={"base": {"pretrained": str(tmp_path / "nothing")}})
    with pytest.raises(UserError, match="datencoder bootstrap"):
        load_pipeline(cfg.base)


def test_stock_diffusers_loads_the_toy_base_and_guidance_works():
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("models/toy-base")
    pipe.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": 4, "output_type": "np"}
    prompt = "a red circle on a blue background"
    guided = pipe(prompt, guidance_scale=4.0, generator=torch.Generator().manual_seed(0), **kw).images
    plain = pipe(prompt, guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **kw).images
    assert guided.shape == (1, 64, 64, 3) and np.isfinite(guided).all()
    assert np.abs(guided - plain).mean() > 1e-3  # the unconditional branch changes the result


def test_stock_open_clip_loads_the_toy_clips():
    import open_clip

    for kind in ("backbone", "metrics"):
        open_clip.add_model_config(f"models/toy-clip/{kind}/datencoder-toy-{kind}.json")
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"datencoder-toy-{kind}", pretrained=f"models/toy-clip/{kind}/open_clip_model.safetensors")
        assert model.visual.image_size == (64, 64) or model.visual.image_size == 64


def test_metrics_clip_tells_colours_and_shapes_zero_shot():
    """Regression bound for the committed metrics CLIP (chance is 1/12). check-base measures the issue's
    target (90%) on 480 renders: 92.5% colour, 90.8% shape; on these 96: 90.6% and 93.8%."""
    from components.evaluation.check_base import zero_shot_accuracy
    from components.model.base import load_clip

    clip = load_clip(load_config("toy").base.metrics_clip)
    acc = zero_shot_accuracy(clip, tw.scenes_for_training(96, seed=12345), seed=12345)
    assert acc["colour"] >= 0.85 and acc["shape"] >= 0.85, acc


def test_backbone_clip_sees_colour_and_shape():
    """The gate on the committed backbone CLIP: linear probes of what the encoder's trunk reads from it (its last-stage
    features, mean-pooled) tell colour and shape apart on fresh renders (check_base.PROBE_TARGETS: 95%, 90%)."""
    from components.evaluation.check_base import backbone_probe

    probe = backbone_probe(load_config("toy").base.backbone_clip)
    assert probe["passed"], probe


def test_models_dir_within_budget(root):
    """The committed models (git holds them; DVC's cache holds the rest of models/, e.g. the ablation encoders)."""
    from components.home import COMMITTED

    size = sum(p.stat().st_size for c in COMMITTED for p in (root / c).rglob("*") if p.is_file())
    assert size <= 25 * 2**20, f"the committed models are {size / 2**20:.1f} MB"


def test_bootstrap_smoke_writes_loadable_models(tmp_path):
    r = run_cli("bootstrap", "--preset", "smoke", "--out", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["params"]["unet"] > 0 and not list(tmp_path.glob(".bootstrap-*.partial"))
    from components.model.base import load_clip, load_pipeline

    cfg = load_config("smoke", overrides={"base": {
        "pretrained": str(tmp_path / "toy-base"),
        "metrics_clip": {"model_name": "datencoder-toy-metrics",
                         "pretrained": str(tmp_path / "toy-clip/metrics/open_clip_model.safetensors"),
                         "config_path": str(tmp_path / "toy-clip/metrics/datencoder-toy-metrics.json")}}})
    assert load_pipeline(cfg.base).unet.config.sample_size == 16
    assert load_clip(cfg.base.metrics_clip).encode_texts(["a red star"]).shape[-1] == 64


def test_bootstrap_parts_train_alone_to_the_same_bytes(tmp_path):
    """Each DVC stage trains one part: a UNet trained alone on the saved VAE equals the one trained in a
    full run, and without the VAE the part says what to run first, writing nothing."""
    full, alone = tmp_path / "full", tmp_path / "alone"
    assert run_cli("bootstrap", "--preset", "smoke", "--out", str(full)).returncode == 0
    r = run_cli("bootstrap", "--preset", "smoke", "--out", str(alone), "--part", "unet")
    assert r.returncode == 2 and "--part vae" in r.stderr and not (alone / "toy-base").exists(), r.stderr[-500:]
    shutil.copytree(full / "toy-base" / "vae", alone / "toy-base" / "vae")
    r = run_cli("bootstrap", "--preset", "smoke", "--out", str(alone), "--part", "unet", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["parts"] == ["unet"], r.stderr[-2000:]
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "model_index.json"):
        assert (alone / "toy-base" / rel).read_bytes() == (full / "toy-base" / rel).read_bytes(), rel
    assert not (alone / "toy-clip").exists() and not list(alone.glob(".bootstrap-*.partial"))
