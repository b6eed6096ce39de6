"""The MLflow model registry: log the encoder as a pyfunc model, register it, gate the `champion` alias.

`datencoder register` evaluates the candidate encoder on the gate, logs it as a models-from-code pyfunc
(components/serving/pyfunc_model.py) with the encoder weights and the resolved config as artifacts, registers
a version of model `datencoder` tagged with the data version, git commit and gate metric, and moves
the `champion` alias to it only when it beats the current champion on the gate.

The gate is the evaluation's own measure on a small fixed subset (components/evaluation/harness.py
`gate_scores`): ours (encoder + tuning + sampling) on the first `evaluate.gate_concepts` held-out
evaluation concepts x the first `evaluate.gate_prompts` prompts, seed 0, scored by the metrics CLIP;
the score is the mean of identity and prompt similarity, higher is better. Its name is versioned
(`GATE`) so scores from different gates are never compared.

Trust: the logged model is Python that MLflow runs at load, so whoever can move `@champion` could run code
in `serve` and `personalize`. `register` records the sha256 of the logged code file as the version tag
`code_sha256`; loading (`trusted_model_dir`) downloads the model first and refuses it unless the logged
file is this checkout's pyfunc_model.py byte for byte and the tag says the same (a version registered
before the tag existed is refused with one line: register it again), except when told to trust it
(`--trust-model-code` or DATENCODER_TRUST_MODEL_CODE=1).

Base weights are referenced by path or hub id in the logged config; only the small toy base (and
its backbone CLIP) is logged as an artifact, so a toy model is self-contained. SD weights never are.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import yaml

from components import tracking
from components.config import Config, RuntimeConfig, load_config
from components.errors import UserError
from components.inference.engine import Personalizer

log = logging.getLogger(__name__)

MODEL_NAME = "datencoder"
ALIAS = "champion"
EXPERIMENT = "datencoder-register"
GATE = "gate_identity_prompt_v1"  # mean of identity and prompt similarity on the gate subset: higher is better
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
CODE_TAG = "code_sha256"  # model-version tag: sha256 of the logged model code file
TRUST_ENV = "DATENCODER_TRUST_MODEL_CODE"  # =1: load models whose code is not this checkout's


def is_model_uri(model: str) -> bool:
    return model.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def _client():
    import mlflow
    from mlflow import MlflowClient

    uri = tracking.tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def champion_uri() -> str | None:
    """`models:/datencoder@champion` when the configured tracking store has it (an absent sqlite file is
    not created just to look)."""
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None  # before importing mlflow: a one-shot personalize without a store pays nothing for it
    from mlflow.exceptions import MlflowException

    try:
        _client().get_model_version_by_alias(MODEL_NAME, ALIAS)
    except MlflowException:
        return None
    return f"models:/{MODEL_NAME}@{ALIAS}"


# --- the logged model's artifacts ----------------------------------------------------------------
def model_artifacts(cfg: Config, encoder_dir: str | Path, scratch: Path) -> dict[str, str]:
    """encoder weights + resolved config; the toy base and backbone CLIP too (small), never SD weights."""
    config = scratch / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    artifacts = {"encoder": str(encoder_dir), "config": str(config)}
    if cfg.base.kind == "toy":
        artifacts["base"] = cfg.base.pretrained
        artifacts["backbone_clip"] = str(Path(cfg.base.backbone_clip.pretrained).parent)
    return artifacts


def config_from_artifacts(artifacts: dict[str, str]) -> Config:
    """The logged config with the base paths pointed at the logged copies (where there are some)."""
    values = yaml.safe_load(Path(artifacts["config"]).read_text())
    base = values["base"]
    if "base" in artifacts:
        base["pretrained"] = artifacts["base"]
    if "backbone_clip" in artifacts:
        clip, folder = base["backbone_clip"], Path(artifacts["backbone_clip"])
        for key in ("pretrained", "config_path"):
            if clip.get(key):
                clip[key] = str(folder / Path(clip[key]).name)
    return load_config(values["preset"], overrides=values)


def signature(cfg: Config):
    """Inputs image (binary) + prompt (string); params with the config's defaults; outputs image/prompt/seed."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    p = cfg.personalize
    alpha = cfg.sampling_alpha
    params = [ParamSpec("tuning_steps", "long", p.tuning_steps), ParamSpec("num_images", "long", p.num_images),
              ParamSpec("seed", "long", p.seed), ParamSpec("guidance_scale", "double", p.guidance_scale),
              ParamSpec("num_inference_steps", "long", p.num_inference_steps),
              ParamSpec("alpha_blend", "double", float(alpha))]
    # concept (optional): rows with the same label are several photos of one concept
    return ModelSignature(inputs=Schema([ColSpec("binary", "image"), ColSpec("string", "prompt"),
                                         ColSpec("string", "concept", required=False)]),
                          outputs=Schema([ColSpec("binary", "image"), ColSpec("string", "prompt"), ColSpec("long", "seed")]),
                          params=ParamSchema(params))


def input_example():
    """One tiny request that runs in seconds: no tuning, one sampling step."""
    import io

    import pandas as pd
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (220, 40, 40)).save(buf, format="PNG")
    return pd.DataFrame({"image": [buf.getvalue()], "prompt": ["a photo of S*"]}), {
        "tuning_steps": 0, "num_inference_steps": 1, "num_images": 1}


def requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in
            ("torch", "diffusers", "transformers", "open_clip_torch", "safetensors", "mlflow", "pillow", "pandas",
             "pydantic", "pyyaml")]


def log_model(cfg: Config, encoder_dir: str | Path):
    """Log the pyfunc model into the active run; returns mlflow's ModelInfo."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="datencoder-register-") as scratch:
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_CODE), artifacts=model_artifacts(cfg, encoder_dir, Path(scratch)),
            signature=signature(cfg), input_example=input_example(), pip_requirements=requirements(),
            # declared so that load_model(model_config=...) may override them (components/runtime.py serving_config)
            model_config={"device": "auto", "dtype": "auto"})


# --- the gate --------------------------------------------------------------------------------------
def gate_score(personalizer) -> dict:
    """The gate (module docstring) of a loaded Personalizer: {"identity", "prompt", "score"}."""
    from components.evaluation.gate import gate_scores  # registering only: `personalize` starts without it

    return gate_scores(personalizer)


def _champion_score(client, runtime: RuntimeConfig) -> tuple[int | None, float | None]:
    """(version, gate score) of the current champion; re-scored from the logged model when its score
    is from another gate (or missing)."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(MODEL_NAME, ALIAS)
    except MlflowException:
        return None, None
    version = int(champion.version)
    if champion.tags.get("gate") == GATE and GATE in champion.tags:
        return version, float(champion.tags[GATE])
    champion_model = load_pyfunc_personalizer(f"models:/{MODEL_NAME}/{champion.version}", runtime=runtime)
    return version, gate_score(champion_model)["score"]


def register(cfg: Config, encoder: str | None = None) -> dict:
    """Log, register and (if it wins the gate) promote the encoder at `encoder` (default personalize.encoder)."""
    import mlflow

    encoder_dir = Path(encoder or cfg.personalize.encoder)
    if not (encoder_dir / "config.json").is_file():
        raise UserError(f"no encoder at {encoder_dir} (config.json missing): run `datencoder pretrain` first, "
                        f"or pass --encoder")

    client = _client()
    gate = gate_score(Personalizer(cfg, encoder_dir))
    score = gate["score"]
    from components.data.prepare import data_version  # registering only (pandas): `personalize` starts without it

    tags = {"data_version": data_version(cfg.pretrain.data, missing="unknown"), "preset": cfg.preset, "stage": "register"}
    with tracking.run(EXPERIMENT, f"register-{encoder_dir.name}", tags) as (run_client, run_id):
        tracking.log_metrics(run_client, run_id, {GATE: score, "gate_identity": gate["identity"],
                                                  "gate_prompt": gate["prompt"]}, step=0)
        with mlflow.start_run(run_id=run_id):
            info = log_model(cfg, encoder_dir)
        version = mlflow.register_model(info.model_uri, MODEL_NAME).version
        for key, value in {**tags, "git_commit": tracking.git_commit(), "gate": GATE, GATE: f"{score:.6g}",
                           "encoder": str(encoder_dir), CODE_TAG: code_sha256(PYFUNC_CODE)}.items():
            client.set_model_version_tag(MODEL_NAME, version, key, str(value))
        champion, champion_score = _champion_score(client, cfg.runtime)
        promoted = champion is None or score > champion_score  # a tie keeps the champion
        if promoted:
            client.set_registered_model_alias(MODEL_NAME, ALIAS, version)
    log.info("registered %s version %s (%s = %.5g); %s", MODEL_NAME, version, GATE, score,
             f"now {ALIAS}" if promoted else f"{ALIAS} stays version {champion} ({champion_score:.5g})")
    return {"model": MODEL_NAME, "version": int(version), "run_id": run_id, "model_uri": info.model_uri,
            "tracking_uri": client.tracking_uri, "gate": {"name": GATE, "score": score, "identity": gate["identity"],
                                                          "prompt": gate["prompt"], "higher_is_better": True,
                                                          "champion_version": champion, "champion_score": champion_score},
            "promoted": promoted, "alias": ALIAS, "tags": tags}


def load_pyfunc_personalizer(model_uri: str, trust: bool = False, runtime: RuntimeConfig | None = None):
    """The Personalizer inside a logged pyfunc model (what the server runs), after the trust check; `runtime`'s
    settings other than auto win over the serving environment's (components/runtime.py `serving_config`)."""
    return load_pyfunc(trusted_model_dir(model_uri, trust), runtime).unwrap_python_model().personalizer


def load_pyfunc(model_dir: str, runtime: RuntimeConfig | None = None):
    """The pyfunc model in a local directory that trusted_model_dir returned."""
    import mlflow

    try:
        return mlflow.pyfunc.load_model(model_dir, model_config=runtime.model_dump() if runtime else None)
    except mlflow.exceptions.MlflowException as e:
        raise UserError(f"cannot load MLflow model from {model_dir}: {str(e).splitlines()[0]}") from None


# --- trust ------------------------------------------------------------------------------------------
def code_sha256(path: str | Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def trust_requested(flag: bool = False) -> bool:
    import os

    return flag or os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def trusted_model_dir(model_uri: str, trust: bool = False) -> str:
    """Download `model_uri` and return its local directory, once its logged code is known to be this
    project's (module docstring); otherwise a UserError saying why, unless `trust` (or TRUST_ENV)."""
    import mlflow
    import yaml as yamllib

    client = _client()
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    except mlflow.exceptions.MlflowException as e:
        raise UserError(f"cannot load MLflow model {model_uri} from {tracking.tracking_uri()}: "
                        f"{str(e).splitlines()[0]}") from None
    if trust_requested(trust):
        log.warning("loading %s without checking its code (told to trust it)", model_uri)
        return local
    expected = code_sha256(PYFUNC_CODE)
    flavor = (yamllib.safe_load((Path(local) / "MLmodel").read_text()) or {}).get("flavors", {}).get("python_function", {})
    code = flavor.get("model_code_path")
    logged = code_sha256(Path(local) / Path(code).name) if code and (Path(local) / Path(code).name).is_file() else None
    hint = (f"register it again with this checkout (`datencoder register`), or pass --trust-model-code "
            f"({TRUST_ENV}=1) if you trust whoever registered it")
    if logged != expected or flavor.get("code"):
        what = "pickled Python" if not code else f"code with sha256 {logged}" if logged else "no code file"
        raise UserError(f"refusing {model_uri}: its logged model is {what}, not this project's "
                        f"{PYFUNC_CODE.name} (sha256 {expected[:12]}...); {hint}")
    if model_uri.startswith("models:/"):
        tag = _version_of(client, model_uri).tags.get(CODE_TAG)
        if tag is None:
            raise UserError(f"refusing {model_uri}: it was registered before model code hashes were recorded "
                            f"(no {CODE_TAG} tag); {hint}")
        if tag != expected:
            raise UserError(f"refusing {model_uri}: its {CODE_TAG} tag does not match this project's "
                            f"{PYFUNC_CODE.name}; {hint}")
    return local


def _version_of(client, model_uri: str):
    """The ModelVersion of models:/name@alias or models:/name/version."""
    from mlflow.exceptions import MlflowException

    name, _, ref = model_uri.removeprefix("models:/").partition("@")
    try:
        if ref:
            return client.get_model_version_by_alias(name, ref)
        name, _, version = name.partition("/")
        return client.get_model_version(name, version)
    except MlflowException as e:
        raise UserError(f"cannot find {model_uri} in {tracking.tracking_uri()}: {str(e).splitlines()[0]}") from None
