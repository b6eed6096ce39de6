"""components/config.py as a deployment uses it: any key from the environment (DATENCODER_<SECTION>__<KEY>), so an
image's params.yaml is never edited; the registry gate's keys under their new section, the old ones still read."""

from __future__ import annotations

import pytest
import yaml

from components.config import load_config
from components.errors import UserError


def test_a_key_from_the_environment_wins_over_the_file_and_loses_to_explicit_overrides(root, monkeypatch):
    monkeypatch.setenv("DATENCODER_PRETRAIN__STORAGE", "s3://checkpoints/runs")
    monkeypatch.setenv("DATENCODER_PIPELINE__STAGES", "[prepare_data, pretrain]")  # YAML values
    monkeypatch.setenv("DATENCODER_REGISTRY__MARGIN", "0.02")
    monkeypatch.setenv("DATENCODER_DEVICE", "cpu")  # not config (no `__`): the serving runtime's own variable
    cfg = load_config(path=root / "params.yaml")
    assert cfg.pretrain.storage == "s3://checkpoints/runs" and cfg.pipeline.stages == ["prepare_data", "pretrain"]
    assert cfg.registry.margin == 0.02 and cfg.pretrain.max_steps == 1000  # the rest is the file's
    explicit = load_config(path=root / "params.yaml", overrides={"pretrain": {"storage": "elsewhere"}})
    assert explicit.pretrain.storage == "elsewhere"


@pytest.mark.parametrize("name, value, words", [
    ("DATENCODER_PRETRAIN__WORKERS", "many", "pretrain.workers"),
    ("DATENCODER_PRETRAIN__STORAGEZ", "s3://x", "pretrain.storagez"),
    ("DATENCODER_PRETRAIN__S3__ENDPOINT", "x", "expected DATENCODER_<SECTION>__<KEY>"),
])
def test_a_bad_environment_value_is_one_line_naming_the_variable(monkeypatch, name, value, words):
    monkeypatch.setenv(name, value)
    with pytest.raises(UserError) as error:
        load_config("smoke")
    assert words in str(error.value) and "\n" not in str(error.value)
    assert name in str(error.value) or words.startswith("expected")


def test_the_gate_size_moved_to_the_registry_and_the_old_keys_still_load(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"preset": "smoke", "evaluate": {"gate_concepts": 3, "gate_prompts": 2}}))
    with pytest.warns(FutureWarning, match="evaluate.gate_concepts is deprecated; use registry.gate_concepts"):
        cfg = load_config(path=old)
    assert (cfg.registry.gate_concepts, cfg.registry.gate_prompts) == (3, 2)
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"preset": "smoke", "evaluate": {"gate_concepts": 3},
                                    "registry": {"gate_concepts": 4}}))
    with pytest.raises(UserError, match="registry.gate_concepts only"):
        load_config(path=both)


def test_a_variant_of_a_field_that_does_not_exist_is_an_error():
    from components.config import variant_config

    cfg = load_config("smoke")
    with pytest.raises(ValueError, match="config section pretrain has no field out"):
        variant_config(cfg, pretrain={"out": "elsewhere", "max_steps": 3})
    assert variant_config(cfg, pretrain={"max_steps": 3}).pretrain.max_steps == 3


def test_a_path_has_one_key_and_the_old_ones_still_load(tmp_path, monkeypatch):
    fields = set(type(load_config("smoke").pretrain).model_fields)
    assert not fields & {"data", "out"}  # pretrain reads prepare.out and writes personalize.encoder
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"preset": "smoke", "pretrain": {"data": "elsewhere/prepared",
                                                                   "out": "elsewhere/encoder"}}))
    with pytest.warns(FutureWarning, match="pretrain.out is deprecated; use personalize.encoder"):
        cfg = load_config(path=old)
    assert (cfg.prepare.out, cfg.personalize.encoder) == ("elsewhere/prepared", "elsewhere/encoder")
    # a toy default encoder is read from the home, but an old key's value keeps its meaning like any given path
    monkeypatch.setenv("DATENCODER_PRETRAIN__OUT", "models/toy-encoder")
    with pytest.warns(FutureWarning, match="pretrain.out is deprecated"):
        assert load_config("toy").personalize.encoder == "models/toy-encoder"


def test_diffusers_names_for_the_sampler_and_threads_for_threads(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"preset": "smoke", "prepare": {"workers": 3},
                                   "pretrain": {"sample_steps": 7, "sample_guidance": 2.0}}))
    with pytest.warns(FutureWarning, match="sample_steps is deprecated; use pretrain.sample_num_inference_steps"):
        cfg = load_config(path=old)
    assert (cfg.prepare.threads, cfg.pretrain.sample_num_inference_steps, cfg.pretrain.sample_guidance_scale) == (
        3, 7, 2.0)


def test_params_rewritten_by_dvc_load_as_they_were_written(tmp_path):
    """`dvc exp run -S` rewrites params.yaml as YAML 1.2, leaving the toy vocabulary's word `on` unquoted; the config
    reads YAML 1.2 booleans (true / false only), so the file means the same after the rewrite."""
    from ruamel.yaml import YAML  # DVC's own YAML library

    cfg = load_config("toy")
    path = tmp_path / "params.yaml"
    YAML().dump({"base": {"vocabulary": cfg.base.vocabulary}, "pretrain": {"templates": False}}, path)
    assert "- on\n" in path.read_text()  # as DVC writes it: unquoted
    again = load_config("toy", path=path)
    assert again.base.vocabulary == cfg.base.vocabulary and "on" in again.base.vocabulary
    assert again.pretrain.templates is False
    assert load_config("toy", overrides={"pretrain": {"templates": True}}).pretrain.templates is True
