"""Distributed encoder pre-training: real Ray workers, real checkpoints, real MLflow records.

The fast tests share one local Ray cluster and one smoke-sized base model and data set (built by the
project's own bootstrap and prepare stages); the multi-node cluster, job kill and S3 storage tests
are marked slow.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from smoke_models import free_port, write_smoke_models

from components import home
from components.config import load_config
from components.errors import UserError


ROOT = Path(__file__).resolve().parents[2]
DATENCODER = str(Path(sys.executable).parent / "datencoder")


# --- shared set-up --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    """Random-weight smoke models in the real formats and a prepared smoke toy world."""
    from components.data.prepare import prepare
    from components.toy.world import write_toy_world

    tmp = tmp_path_factory.mktemp("pretrain-assets")
    overrides = write_smoke_models(tmp / "models")
    cfg = load_config("smoke")
    raw = tmp / "raw"
    write_toy_world(raw, n=cfg.toy_world.n, seed=0, scene_fraction=cfg.toy_world.scene_fraction)
    prepare(cfg.prepare.model_copy(update={
        "out": str(tmp / "prepared"), "imagenet": str(raw / "imagenet"), "threads": 2,
        "openimages_boxes": str(raw / "openimages/oidv6-train-annotations-bbox.csv"),
        "openimages_classes": str(raw / "openimages/oidv7-class-descriptions.csv"),
        "openimages_images": str(raw / "openimages/train"), "captions": str(raw / "captions.csv")}))
    return {"base": overrides["base"], "data": tmp / "prepared"}


def smoke_overrides(assets: dict, work: Path, data: Path | None = None, **pretrain) -> dict:
    return {"base": assets["base"], "prepare": {"out": str(data or assets["data"])},
            "personalize": {"encoder": str(work / "encoder")},
            "pretrain": {"storage": str(work / "checkpoints"), **pretrain}}


def write_config(path: Path, assets: dict, work: Path, **pretrain) -> Path:
    path.write_text(yaml.safe_dump({"preset": "smoke", **smoke_overrides(assets, work, **pretrain)}))
    return path


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI")
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="session")
def ray_cluster(mlflow_uri):
    """One local cluster for the fast tests (4 logical CPUs: two workers plus slack on 2 cores)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # smoke steps take ~0.1 s: poll workers often, so a checkpoint is registered before the next one
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


# --- units ----------------------------------------------------------------------------------------
def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    from components.training.loop import lr_factor

    factors = [lr_factor(s, warmup=10, total=110) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[4] == pytest.approx(0.5) and factors[9] == 1.0
    assert factors[10] == 1.0 and factors[60] == pytest.approx(0.5)
    assert factors[109] == pytest.approx(0.5 * (1 + math.cos(0.99 * math.pi)))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(200, 10, 110) == 0.0  # past the end (a resumed run that lowered max_steps)


def test_shards_partition_the_train_split_and_batches_are_pure(tmp_path):
    from PIL import Image

    from components.training.loop import Prompts, Shard

    rows = []
    for i in range(10):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / f"{i}.jpg", quality=100)
        rows.append({"path": f"{i}.jpg", "split": "val" if i == 9 else "train", "label": "thing", "template": ""})
    manifest = pd.DataFrame(rows)
    p = load_config("toy").pretrain.model_copy(update={"prompts": ["a S*", "b S*", "c S*"], "describe_scene": False})
    shards = [Shard(tmp_path, manifest, rank, 2, Prompts(p), seed=0) for rank in range(2)]
    assert [len(s) for s in shards] == [5, 4]
    assert not set(shards[0].rows["path"]) & set(shards[1].rows["path"])
    assert set(shards[0].rows["path"]) | set(shards[1].rows["path"]) == {f"{i}.jpg" for i in range(9)}
    pixels, prompts = shards[0].batch(0, 5)  # one epoch of a shard: each of its rows once
    assert sorted((pixels[:, 0, 0, 0] + 1).mul(127.5).round().int().tolist()) == [0, 40, 80, 120, 160]
    assert pixels.min() >= -1 and pixels.max() <= 1 and set(prompts) <= {"a S*", "b S*", "c S*"}
    again, again_prompts = Shard(tmp_path, manifest, 0, 2, Prompts(p), seed=0).batch(3, 4)  # fresh reader, mid-stream
    assert torch.equal(again, torch.cat([shards[0].batch(3, 2)[0], shards[0].batch(5, 2)[0]]))
    assert again_prompts == shards[0].batch(3, 4)[1]
    assert not torch.equal(shards[0].batch(5, 5)[0], pixels)  # the next epoch is another permutation


def test_each_image_is_prompted_with_its_template_else_its_read_scene_else_a_generic_prompt(tmp_path):
    """S* carries the object alone: the manifest's caption template names the rest; without one the toy reader
    describes the scene; an image it cannot read gets a generic prompt (or its label after S*)."""
    from PIL import Image

    from components.toy import world as tw
    from components.training.loop import Prompts, Shard

    scene = tw.Scene(tw.ToyConcept("star", "red"), background_colour="blue", position="top left", size="large")
    tw.render(scene, 64).save(tmp_path / "0.jpg", quality=95)
    tw.render(tw.Scene(tw.ToyConcept("ring", "white"), background="grass", size="small"), 64).save(tmp_path / "1.jpg")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "2.jpg", quality=95)
    manifest = pd.DataFrame({"path": ["0.jpg", "1.jpg", "2.jpg"], "split": "train", "label": ["star", "ring", "x"],
                             "template": ["two {} at night", "", ""]})  # a template wins over what the pixels show
    p = load_config("toy").pretrain.model_copy(update={"prompts": ["a photo of S*"]})

    def prompts(p) -> dict[str, str]:
        rows = Shard(tmp_path, manifest, 0, 1, Prompts(p), seed=0)
        pixels, texts = rows.batch(0, 3)
        order = [rows.rows["path"].iloc[rows._row(i)] for i in range(3)]
        return dict(zip(order, texts))

    assert prompts(p) == {"0.jpg": "two S* at night", "1.jpg": "a small S* on grass", "2.jpg": "a photo of S*"}
    unread = p.model_copy(update={"templates": False, "describe_scene": False, "label_prompts": True})
    assert prompts(unread) == {"0.jpg": "a photo of S* star", "1.jpg": "a photo of S* ring",
                               "2.jpg": "a photo of S* x"}
    described = p.model_copy(update={"templates": False})
    assert prompts(described)["0.jpg"] == "a large S* at the top left on a blue background"


def test_training_timesteps_uniform_or_biased_to_high_noise():
    from components.training.loop import training_timesteps

    torch.manual_seed(0)
    uniform, high = (training_timesteps(20000, 1000, kind, "cpu") for kind in ("uniform", "high-noise"))
    assert 0 <= int(uniform.min()) and int(uniform.max()) < 1000 and int(high.max()) < 1000
    assert abs(uniform.float().mean().item() - 500) < 15 and abs(high.float().mean().item() - 667) < 15
    assert (high >= 700).float().mean() > 0.45 > (uniform >= 700).float().mean()


def test_held_out_images_are_scored_under_the_prompt_they_would_train_with(tmp_path):
    from components.toy import world as tw
    from components.training.loop import HeldOut

    scene = tw.Scene(tw.ToyConcept("star", "red"), background_colour="blue")
    tw.render(scene, 64).save(tmp_path / "a.jpg", quality=95)
    tw.render(tw.Scene(tw.ToyConcept("ring", "white"), background="beach"), 64).save(tmp_path / "b.jpg", quality=95)
    manifest = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "split": "val", "label": ["star", "ring"],
                             "template": ["", "a small {} on a beach"]})
    cfg = load_config("toy", overrides={"prepare": {"out": str(tmp_path)},
                                        "pretrain": {"heldout_images": 3}})
    held = HeldOut(cfg.training, manifest)
    assert held.sets["val"].prompts == ["S* on a blue background", "a small S* on a beach"]
    assert [len(s.prompts) for s in held.sets.values()] == [2, 3, 3]
    assert not {s.concept.shape for s in held.sets["seen_shapes"].scenes} & set(cfg.toy_world.encoder_holdout_shapes)
    assert {s.concept.shape for s in held.sets["unseen_shapes"].scenes} <= set(cfg.toy_world.encoder_holdout_shapes)
    assert all(p == s.template().replace("{}", "S*") for p, s in zip(held.sets["unseen_shapes"].prompts,
                                                                      held.sets["unseen_shapes"].scenes))


def test_a_variant_keeps_its_checkpoints_beside_the_main_runs_on_s3_too(assets, tmp_path):
    """The variants stage's pre-training runs checkpoint under <pretrain.storage>/variants/<run>-<steps>, a local path
    or an s3:// URI alike (a Path join folds s3:// to s3:/, a local folder), and write their encoders to the cache."""
    from components.training.variants import encoder_variant

    for storage, expected in (("s3://ckpt/runs/", "s3://ckpt/runs/variants/"),
                              (str(tmp_path / "ckpt"), f"{tmp_path / 'ckpt'}/variants/")):
        cfg = load_config("smoke", overrides={**smoke_overrides(assets, tmp_path), "pretrain": {"storage": storage}})
        variant, encoder_dir = encoder_variant(cfg, {"regulariser": "none"}, steps=3)
        key = encoder_dir.parent.name
        assert variant.pretrain.storage == f"{expected}{key}" and key.endswith("-3")
        assert variant.encoder.regulariser == "none" and variant.personalize.encoder == str(encoder_dir)


def test_run_name_keys_the_recipe_not_the_duration():
    from components.training.pretrain import run_name

    cfg = load_config("smoke")
    same = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"max_steps": 99, "workers": 2})})
    other = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"lr": 3e-4})})
    uncaptioned = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"templates": False})})
    name = run_name(cfg.training, "v1")
    assert name == run_name(same.training, "v1")
    assert name != run_name(other.training, "v1") and name != run_name(cfg.training, "v2")
    assert name != run_name(uncaptioned.training, "v1")  # evaluate/ablate must not reuse a cached variant


def test_run_name_follows_the_base_weights_not_only_their_path(tmp_path):
    """A base re-bootstrapped in place gets new run names: no resuming, and no cached ablation variant,
    trained on the old weights."""
    from components.model.base import base_fingerprint
    from components.training.pretrain import run_name

    base = tmp_path / "toy-base"
    (base / "unet").mkdir(parents=True)
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"old weights")
    cfg = load_config("toy", overrides={"base": {"pretrained": str(base)}})
    before = (base_fingerprint(cfg.base), run_name(cfg.training, "v1"))
    assert (base_fingerprint(cfg.base), run_name(cfg.training, "v1")) == before
    weights.write_bytes(b"new weights")
    after = (base_fingerprint(cfg.base), run_name(cfg.training, "v1"))
    assert after[0] != before[0] and after[1] != before[1]


def test_kuberay_manifests_submit_the_cli_entry_point_with_s3_storage():
    import shlex

    from components.cli import build_parser, cmd_pretrain

    manifests = {d["kind"]: d
                 for p in (ROOT / "infra/kuberay").glob("*.yaml") for d in yaml.safe_load_all(p.read_text())
                 if d and d["kind"] in ("RayJob", "RayCluster")}
    job, cluster = manifests["RayJob"], manifests["RayCluster"]
    command = job["spec"]["entrypoint"].split("&&")[-1]  # "cd /app && datencoder pretrain ..."
    args = build_parser().parse_args(shlex.split(command)[1:])
    cfg = load_config(path=ROOT / args.config)
    assert args.func is cmd_pretrain and cfg.pretrain.storage.startswith("s3://")
    for spec in (job["spec"]["rayClusterSpec"], cluster["spec"]):
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # workers only on worker pods
        # one GPU per worker pod, room for the job's workers (Ray Train: one worker per GPU)
        groups = spec["workerGroupSpecs"]
        assert all(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
                   for g in groups)
        assert sum(g.get("maxReplicas", g["replicas"]) for g in groups) >= cfg.pretrain.workers


# --- real runs ------------------------------------------------------------------------------------
def test_two_workers_train_checkpoint_log_and_resume(assets, ray_cluster, mlflow_uri, tmp_path):
    from safetensors.torch import load_file

    from components.data.prepare import data_version
    from components.model.encoder import TuningEncoder
    from components.training.pretrain import pretrain

    cfg = load_config("smoke", overrides=smoke_overrides(assets, tmp_path))
    first = pretrain(cfg, workers=2, max_steps=4, checkpoint_every=2)
    assert (first["start_step"], first["end_step"], first["workers"], first["restarts"]) == (0, 4, 2, 0)
    assert first["samples_per_s"] > 0 and len(first["peak_memory_mb"]) == 2 and min(first["peak_memory_mb"]) > 100

    checkpoint = Path(first["checkpoint"])
    assert checkpoint.name == "step-00000004" and checkpoint.parent.parent == tmp_path / "checkpoints"
    assert {p.name for p in checkpoint.iterdir()} >= {"encoder", "trainer.pt", "rng-0.pt", "rng-1.pt"}
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    assert state["step"] == 4 and state["schedule"]["last_epoch"] == 4 and state["optimizer"]["state"]
    rng = [torch.load(checkpoint / f"rng-{r}.pt", weights_only=True)["torch"] for r in range(2)]
    assert not torch.equal(*rng)  # each worker draws its own noise
    # the final encoder is the last checkpoint's, in diffusers-style format
    assert sorted(p.name for p in Path(first["out"]).iterdir()) == ["config.json", "model.safetensors", "recipe.json"]
    assert json.loads((Path(first["out"]) / "recipe.json").read_text())["run_name"] == first["run_name"]
    weights = load_file(str(Path(first["out"]) / "model.safetensors"))
    assert all(torch.equal(v, load_file(str(checkpoint / "encoder/model.safetensors"))[k]) for k, v in weights.items())
    TuningEncoder.from_pretrained(first["out"])  # loadable without the base (config + shapes are saved)
    heldout = first["heldout_loss"]
    assert set(heldout) <= {"val", "seen_shapes", "unseen_shapes"} and "unseen_shapes" in heldout
    assert all(0 < v["trained"] < 10 and 0 < v["untrained"] < 10 for v in heldout.values())
    identity = first["identity_loss"]  # the high-noise identity signal, each condition on each render set
    assert set(identity) == {f"{s}/{c}" for s in ("seen_shapes", "unseen_shapes")
                             for c in ("encoder", "caption", "wrong_colour", "wrong_shape", "object")}
    assert all(0 < v < 10 for v in identity.values())

    client = mlflow_client(mlflow_uri)
    run = client.get_run(first["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert float(run.data.params["pretrain.lr"]) == cfg.pretrain.lr and run.data.params["encoder.rank"] == "4"
    assert run.data.params["pretrain.workers"] == "2" and run.data.params["pretrain.max_steps"] == "4"
    assert run.data.tags["data_version"] == data_version(assets["data"]) == first["data_version"]
    assert run.data.tags["git_commit"] and run.data.tags["mlflow.source.git.commit"] == run.data.tags["git_commit"]
    dataset = run.inputs.dataset_inputs[0]
    assert dataset.dataset.digest == first["data_version"] and dataset.tags[0].value == "train"
    for key in ("loss/diffusion", "loss/contrastive", "loss/l2_embedding", "loss/l2_offsets", "loss/total", "lr",
                "grad_v_star/diffusion", "grad_v_star/regulariser"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3, 4], key
    lrs = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)]
    # warm-up over 2 steps, cosine towards 0 at step 4
    assert lrs == pytest.approx([cfg.pretrain.lr * f for f in (0.5, 1, 1, 0.5)])
    assert any(key.startswith("system/") for key in run.data.metrics)
    assert {"heldout/unseen_shapes", "heldout_untrained/unseen_shapes", "identity/unseen_shapes/encoder",
            "identity/seen_shapes/wrong_colour"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "encoder")}
    assert artifacts == {"encoder/config.json", "encoder/model.safetensors", "encoder/recipe.json"}
    assert [a.path for a in client.list_artifacts(run.info.run_id)].count("images") == 1

    # the same command with a larger --max-steps continues where it stopped
    second = pretrain(cfg, workers=2, max_steps=6, checkpoint_every=2)
    assert (second["start_step"], second["end_step"], second["run_name"]) == (4, 6, first["run_name"])
    assert Path(second["checkpoint"]).name == "step-00000006"
    steps = client.get_metric_history(second["mlflow_run_id"], "loss/total")
    assert sorted(m.step for m in steps) == [5, 6]
    after = load_file(str(Path(second["out"]) / "model.safetensors"))
    assert any(not torch.equal(after[k], weights[k]) for k in weights)
    # checkpoints kept: the newest two
    assert sorted(p.name for p in checkpoint.parent.glob("step-*")) == ["step-00000004", "step-00000006"]

    # the newest checkpoint truncated (a crash while it was written): resumed from the one before, and said so
    newest = checkpoint.parent / "step-00000006" / "encoder" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-300])
    third = pretrain(cfg, workers=2, max_steps=8, checkpoint_every=2)
    assert (third["start_step"], third["end_step"], third["restarts"]) == (4, 8, 0)
    note = client.get_run(third["mlflow_run_id"]).data.tags["checkpoint_fallback"]
    assert note.startswith("resumed from step 4: unreadable step-00000006 (SafetensorError")


def worker_pids() -> list[int]:
    """Training-worker processes of this test session's own Ray cluster (its raylet is our child)."""
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)
            if any("RayTrainWorker" in part for part in p.cmdline())]


def registered_step(storage: Path) -> int:
    """The newest checkpoint Ray Train has registered (what a restarted worker group resumes from)."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        with contextlib.suppress(ValueError, TypeError):  # written while we read it
            return json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"]
    return 0


def test_killed_worker_resumes_from_last_checkpoint(assets, ray_cluster, mlflow_uri, tmp_path):
    from components.training.pretrain import pretrain

    every, total = 5, 40
    cfg = load_config("smoke", overrides=smoke_overrides(assets, tmp_path, eval_every=100))
    killed: dict = {}

    def kill_one_worker_after_a_checkpoint():
        deadline = time.time() + 240
        while time.time() < deadline:
            if registered_step(tmp_path / "checkpoints") >= 10 and len(pids := worker_pids()) == 2:
                killed["after"] = registered_step(tmp_path / "checkpoints")
                os.kill(pids[1], signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker_after_a_checkpoint)
    killer.start()
    report = pretrain(cfg, workers=2, max_steps=total, checkpoint_every=every)
    killer.join()
    assert killed["after"] >= 10
    assert (report["start_step"], report["end_step"], report["restarts"]) == (0, total, 1)
    client = mlflow_client(mlflow_uri)
    starts = [int(m.value) for m in sorted(client.get_metric_history(report["mlflow_run_id"], "start_step"),
                                           key=lambda m: m.timestamp)]
    assert starts[0] == 0 and starts[1] >= killed["after"] and starts[1] % every == 0
    steps = [m.step for m in client.get_metric_history(report["mlflow_run_id"], "loss/total")]
    assert set(steps) == set(range(1, total + 1))  # continuous: every step trained and logged
    assert len(steps) - total <= every  # at most one checkpoint interval repeated


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([DATENCODER, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("case", ["storage not writable", "no data", "zero rows", "unreachable address"])
def test_user_errors_are_one_line_and_exit_2(assets, tmp_path, case, capsys):
    from components.cli import main

    work = tmp_path / "work"
    overrides = {}
    if case == "storage not writable":
        (tmp_path / "a-file").write_text("x")
        overrides = {"storage": str(tmp_path / "a-file" / "checkpoints")}
    elif case == "no data":
        overrides = {"data": str(tmp_path / "nothing")}
    elif case == "zero rows":
        empty = pd.read_parquet(assets["data"] / "manifest.parquet").iloc[:0]
        (tmp_path / "empty").mkdir()
        empty.to_parquet(tmp_path / "empty/manifest.parquet")
        overrides = {"data": str(tmp_path / "empty")}
    config = str(write_config(tmp_path / "cfg.yaml", assets, work, **overrides))
    if case == "unreachable address":  # in a fresh process: the tests' own Ray connection must not be reused
        result = run_cli("pretrain", "--config", config, "--address", "127.0.0.1:1", "--json", timeout=120)
        code, out, err = result.returncode, result.stdout, result.stderr
    else:
        code = main(["pretrain", "--config", config, "--json"])
        out, err = capsys.readouterr()
    expected = {"storage not writable": "is not writable", "no data": "no prepared data at",
                "zero rows": "has 0 training rows", "unreachable address": "127.0.0.1:1 is unreachable"}[case]
    assert code == 2 and json.loads(out)["error"] in err  # with --json the error is on stdout too
    lines = err.strip().splitlines()
    assert expected in lines[-1] and lines[-1].startswith("datencoder pretrain: error:"), err
    assert not (work / "encoder").exists()


def test_each_preset_trains_its_own_encoder_and_personalizes_with_it():
    # one key: pretrain writes personalize.encoder, and personalize reads it
    outs = {name: load_config(name).personalize.encoder for name in ("toy", "smoke", "sd15")}
    assert len(set(outs.values())) == 3
    # the committed toy encoder is read from the project home wherever the command runs
    assert outs["toy"] == home.committed("models/toy-encoder")
    assert not outs["smoke"].startswith("models/")  # a smoke run writes outside the committed models


def test_outside_the_checkout_pretrain_does_not_rewrite_the_committed_encoder(assets, tmp_path, monkeypatch):
    from components.training.pretrain import pretrain

    committed = Path(load_config("toy").personalize.encoder)
    before = {p.name: p.stat().st_mtime_ns for p in committed.iterdir()}
    monkeypatch.chdir(tmp_path)  # anywhere but the checkout, with data of its own
    cfg = load_config("toy", overrides={"prepare": {"out": str(assets["data"])}})
    with pytest.raises(UserError, match="committed encoder in the project home.*set personalize.encoder"):
        pretrain(cfg, storage=str(tmp_path / "checkpoints"))
    assert {p.name: p.stat().st_mtime_ns for p in committed.iterdir()} == before
    assert not (tmp_path / "checkpoints").exists()  # refused before anything was written


def test_an_encoder_of_another_recipe_is_not_replaced_without_force(assets, tmp_path, capsys):
    import shutil

    from components.cli import main
    from components.training.pretrain import check_replaceable

    work = tmp_path / "work"
    shutil.copytree(ROOT / "models" / "toy-encoder", work / "encoder")  # the committed toy encoder (toy config)
    (work / "encoder" / "recipe.json").unlink(missing_ok=True)  # first as an encoder without one
    before = {p.name: p.read_bytes() for p in (work / "encoder").iterdir()}
    config = str(write_config(tmp_path / "cfg.yaml", assets, work))
    for recipe, said in ((None, "another encoder config"), ("encoder-0123456789ab", "run encoder-0123456789ab")):
        if recipe:
            (work / "encoder" / "recipe.json").write_text(json.dumps({"run_name": recipe}))
        code = main(["pretrain", "--config", config, "--json"])
        out, err = capsys.readouterr()
        line = err.strip().splitlines()[-1]
        assert code == 2 and json.loads(out)["error"] in line and said in line and "--force" in line, err
    assert {p.name: p.read_bytes() for p in (work / "encoder").iterdir() if p.name != "recipe.json"} == before
    assert not (work / "checkpoints").exists()  # refused before any training
    # the same recipe (a longer run of it) continues into the same place
    (work / "encoder" / "recipe.json").write_text(json.dumps({"run_name": "encoder-same"}))
    cfg = load_config(path=config)
    check_replaceable(work / "encoder", cfg.encoder, cfg.preset, "encoder-same")


# --- slow: a two-node cluster, job submission, whole-job kill, S3 -----------------------------------
@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """`ray start --head` and a second `ray start --address` node on loopback, one CPU each, so two
    training workers must land on different nodes."""
    ray = str(Path(sys.executable).parent / "ray")
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's unix sockets live under it
    gcs, dashboard = free_port(), free_port()
    # a loopback-only test cluster: no token authentication between its nodes
    env = {**os.environ, "RAY_TRAIN_V2_ENABLED": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)
    node = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run([ray, "start", "--head", *node, f"--port={gcs}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}",
                        f"--dashboard-agent-listen-port={free_port()}"], check=True, env=env, capture_output=True)
        subprocess.run([ray, "start", f"--address=127.0.0.1:{gcs}", *node,
                        f"--dashboard-agent-listen-port={free_port()}"], check=True, env=env, capture_output=True)
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dashboard}"}
    finally:
        stop_processes_mentioning(str(temp))  # not `ray stop`: that would stop every Ray on the machine
        shutil.rmtree(temp, ignore_errors=True)


def stop_processes_mentioning(text: str) -> None:
    """Terminate the processes whose command line contains `text` (our nodes), and their children."""
    import psutil

    ours = [p for p in psutil.process_iter(["cmdline"]) if any(text in part for part in p.info["cmdline"] or [])]
    family = {q.pid: q for p in ours for q in [p, *p.children(recursive=True)]}
    for process in family.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(list(family.values()), timeout=15)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def submit(client, command: str, tmp_path: Path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return client.submit_job(entrypoint=f"cd {ROOT} && {DATENCODER} {command}",
                             runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": uri}})


def wait(client, job: str, timeout: float = 400) -> str:
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(1)
    raise TimeoutError(client.get_job_logs(job)[-3000:])


def last_json(logs: str) -> dict:
    return json.loads([line for line in logs.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
def test_job_on_two_node_cluster_then_killed_job_resumes(assets, two_node_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(two_node_cluster["dashboard"])
    config = write_config(tmp_path / "cfg.yaml", assets, tmp_path, eval_every=100)
    job = submit(client, f"pretrain --config {config} --workers 2 --max-steps 4 --checkpoint-every 2 --json", tmp_path)
    assert wait(client, job) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]
    report = last_json(client.get_job_logs(job))
    assert (report["start_step"], report["end_step"], report["workers"], report["nodes"]) == (0, 4, 2, 2)

    # kill the whole job mid-run (after a checkpoint), then submit the same command again: it resumes
    job = submit(client, f"pretrain --config {config} --workers 2 --max-steps 60 --checkpoint-every 2 --json",
                 tmp_path)
    deadline = time.time() + 300
    while registered_step(tmp_path / "checkpoints") < 10 and time.time() < deadline:
        time.sleep(0.2)
    client.stop_job(job)
    assert wait(client, job) == JobStatus.STOPPED
    saved = registered_step(tmp_path / "checkpoints")  # the last checkpoint Ray recorded before the kill
    assert 10 <= saved < 60
    job = submit(client, f"pretrain --config {config} --workers 2 --max-steps 60 --checkpoint-every 2 --json",
                 tmp_path)
    assert wait(client, job) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]
    resumed = last_json(client.get_job_logs(job))
    assert (resumed["start_step"], resumed["end_step"], resumed["nodes"]) == (saved, 60, 2)


@pytest.mark.slow
def test_s3_storage_and_no_secrets_logged(assets, tmp_path):
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    secret = "not-a-real-secret-but-unique-7f3a"
    env = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    try:
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=secret, region_name="us-east-1")
        s3.create_bucket(Bucket="ckpt")
        config = str(write_config(tmp_path / "cfg.yaml", assets, tmp_path, eval_every=100))
        first = run_cli("pretrain", "--config", config, "--storage", "s3://ckpt/runs", "--max-steps", "2", "--json",
                        env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        report = json.loads(first.stdout)
        assert report["checkpoint"].startswith("s3://ckpt/runs/encoder-")
        assert report["checkpoint"].endswith("step-00000002")
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="ckpt")["Contents"]}
        prefix = report["checkpoint"][len("s3://ckpt/"):]
        assert {f"{prefix}/encoder/model.safetensors", f"{prefix}/trainer.pt", f"{prefix}/rng-0.pt"} <= keys
        second = run_cli("pretrain", "--config", config, "--storage", "s3://ckpt/runs", "--max-steps", "3", "--json",
                         env=env)
        assert second.returncode == 0, second.stderr[-3000:]
        assert json.loads(second.stdout)["start_step"] == 2
        run = mlflow_client(env["MLFLOW_TRACKING_URI"]).get_run(report["mlflow_run_id"])
        logged = json.dumps([run.data.params, run.data.tags])
        assert secret not in logged and "testing-key-id" not in logged
        assert run.data.params["pretrain.storage"] == "s3://ckpt/runs"
    finally:
        server.stop()
