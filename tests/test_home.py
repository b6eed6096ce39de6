"""The project home (components/home.py): config defaults that name a committed input are read from it,
wherever a command runs; paths a user gives keep their meaning; outputs stay where the user runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from components import home
from components.config import HOME_INPUTS, load_config


ROOT = Path(__file__).resolve().parents[1]


def test_committed_inputs_are_the_committed_dvc_outputs():
    """COMMITTED names what a clone has: each is (inside) a DVC output kept in git (cache: false), tracked by git."""
    committed_outs = []
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for out in stage.get("outs", []):
            if isinstance(out, dict) and next(iter(out.values())).get("cache") is False:
                committed_outs.append(next(iter(out)))
    tracked = subprocess.run(["git", "ls-files", "models"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for path in home.COMMITTED:
        assert any(out == path or out.startswith(path + "/") for out in committed_outs), path
        assert any(f.startswith(path + "/") for f in tracked), f"{path} is not in git"
    # every default of a home input on the toy preset names one of them
    cfg = load_config()
    for keys in HOME_INPUTS:
        value = cfg.model_dump()
        for key in keys:
            value = value[key]
        assert Path(value).is_relative_to(ROOT) and Path(value).exists(), (keys, value)


def test_defaults_come_from_the_home_and_given_paths_keep_their_meaning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anywhere but the checkout
    cfg = load_config()
    assert cfg.base.pretrained == str(ROOT / "models/toy-base")
    assert cfg.base.backbone_clip.pretrained == str(ROOT / "models/toy-clip/backbone/open_clip_model.safetensors")
    assert cfg.base.metrics_clip.config_path == str(ROOT / "models/toy-clip/metrics/datencoder-toy-metrics.json")
    assert cfg.personalize.encoder == str(ROOT / "models/toy-encoder")
    # outputs and data stay relative to where the command runs
    assert (cfg.personalize.out, cfg.prepare.out) == ("outputs/personalize", "data/prepared")
    # what is not committed keeps its default: a hub id, an sd15 encoder its pretrain writes, the smoke encoder
    sd15 = load_config("sd15")
    assert sd15.base.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert sd15.personalize.encoder == "models/encoder-sd15" and sd15.base.backbone_clip.config_path is None
    assert load_config("smoke").personalize.encoder == "outputs/smoke-encoder"

    # a config file's (or an override's) paths mean what they say; the defaults it leaves alone still come from home
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base": {"pretrained": "models/toy-base"}}))
    given = load_config(path=tmp_path / "c.yaml")
    assert given.base.pretrained == "models/toy-base"
    assert given.base.backbone_clip.pretrained == str(ROOT / "models/toy-clip/backbone/open_clip_model.safetensors")
    assert load_config(overrides={"personalize": {"encoder": "models/toy-encoder"}}).personalize.encoder == \
        "models/toy-encoder"
    # the checkout's params.yaml names every path itself: read from elsewhere, they are relative to there
    assert load_config(path=ROOT / "params.yaml").base.pretrained == "models/toy-base"

    monkeypatch.setenv(home.HOME_ENV, str(tmp_path / "elsewhere"))
    assert load_config().base.pretrained == str(tmp_path / "elsewhere" / "models/toy-base")
    message = home.missing("the toy base model", load_config().base.pretrained)
    assert str(tmp_path / "elsewhere" / "models/toy-base") in message and home.HOME_ENV in message


def test_one_home_for_the_project_root():
    """The checkout's location is defined once (components/home.py); other modules import it."""
    pattern = re.compile(r"^ROOT\s*=", re.M)
    defining = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "components").rglob("*.py"))
                if pattern.search(p.read_text())]
    assert defining == ["components/home.py"]
