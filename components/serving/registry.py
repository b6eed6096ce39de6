"""The MLflow model registry: log the encoder as a pyfunc model, register it, gate the aliases.

`datencoder register` scores the candidate encoder on the gate (components/evaluation/gate.py), logs it as a
models-from-code pyfunc (components/serving/pyfunc_model.py) with the encoder weights and the resolved config
as artifacts, and registers a version of the preset's model, `datencoder-<preset>` (or `registry.model_name`),
tagged with the preset, data version, git commit and its gate score. Then, under the model's alias lock:

- a model without a champion takes the new version as `@champion` (there is nothing to protect yet);
- otherwise the new version becomes `@challenger` when its gate score beats the champion's by more than
  `registry.margin` (and the current challenger's, if any); the champion never moves here.

`datencoder promote [--version N]` moves `@champion` to the challenger (or version N): the one way a champion
changes, and never onto a version of another preset. A registered model holds one preset (its `preset` tag);
registering another preset under its name is refused.

Concurrent registrations and promotions of one model take turns on its alias lock: a registered model named
`<model>.alias-lock`, created by the holder and deleted on release. Creating a registered model is atomic in
every MLflow store (the name is unique), so two registrations cannot both see "no champion" and both win; a
lock left by a dead process expires after its lease.

The gate's score is tagged `<GATE>.<size>` (e.g. gate_identity_prompt_v2.8x5): scores are compared only under
the same gate and size; a champion without one is re-scored from its logged model and the score recorded on it.

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

import contextlib
import getpass
import hashlib
import io
import logging
import os
import socket
import tempfile
import time
import uuid
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Iterator

import yaml
from PIL import Image

from components import tracking
from components.config import (
    Config,
    EngineConfig,
    EvaluateConfig,
    RegistryConfig,
    RuntimeConfig,
    load_config,
    read_yaml,
)
from components.errors import UserError
from components.inference.engine import Personalizer


log = logging.getLogger(__name__)

LEGACY_MODEL_NAME = "datencoder"  # the one name every preset shared before names carried the preset
MODEL_NAME = LEGACY_MODEL_NAME  # deprecated: use model_name(cfg.registry, cfg.preset)
ALIAS = "champion"
CHALLENGER = "challenger"
EXPERIMENT = "datencoder-register"
LOCK_SUFFIX = ".alias-lock"
LOCK_LEASE_S = 300.0  # a lock older than this is a dead holder's: the next one may break it
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
CODE_TAG = "code_sha256"  # model-version tag: sha256 of the logged model code file
TRUST_ENV = "DATENCODER_TRUST_MODEL_CODE"  # =1: load models whose code is not this checkout's


def model_name(registry: RegistryConfig, preset: str) -> str:
    """The registered model of a preset's config: `registry.model_name`, else `datencoder-<preset>`."""
    return registry.model_name or f"{LEGACY_MODEL_NAME}-{preset}"


def is_model_uri(model: str) -> bool:
    return model.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def _client():
    # mlflow: on use only (start-up time)
    import mlflow
    from mlflow import MlflowClient

    uri = tracking.tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def _aliased(client, name: str, alias: str):
    """The ModelVersion `name@alias`, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException  # mlflow: on use only (start-up time)

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_uri(registry: RegistryConfig, preset: str) -> str | None:
    """`models:/<model_name>@champion` when the configured tracking store has it (an absent sqlite file is not
    created just to look). A store that has only the old single name's champion (`datencoder@champion`, same
    preset) still serves it, with a deprecation line."""
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None  # before importing mlflow: a one-shot personalize without a store pays nothing for it
    client, name = _client(), model_name(registry, preset)
    if _aliased(client, name, ALIAS) is not None:
        return f"models:/{name}@{ALIAS}"
    legacy = None if registry.model_name else _aliased(client, LEGACY_MODEL_NAME, ALIAS)
    if legacy is not None and legacy.tags.get("preset", preset) == preset:
        log.warning("models:/%s@%s is the old single model name of every preset (deprecated): using it; register "
                    "again (`datencoder register`) to make models:/%s@%s", LEGACY_MODEL_NAME, ALIAS, name, ALIAS)
        return f"models:/{LEGACY_MODEL_NAME}@{ALIAS}"
    return None


# --- the alias lock ---------------------------------------------------------------------------------
@contextlib.contextmanager
def alias_lock(client, name: str, timeout_s: float, lease_s: float = LOCK_LEASE_S) -> Iterator[None]:
    """Hold `name`'s alias lock (module docstring) while the block runs: read the aliases, decide, set them."""
    from mlflow.exceptions import MlflowException  # mlflow: on use only (start-up time)

    lock = name + LOCK_SUFFIX
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline, waiting = time.monotonic() + timeout_s, False
    while True:
        try:
            client.create_registered_model(lock, tags={"holder": holder, "expires": f"{time.time() + lease_s:.0f}"},
                                           description=f"alias lock of {name} (datencoder register/promote)")
            break
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            other = client.get_registered_model(lock)
        except MlflowException:
            continue  # released meanwhile: try again at once
        if not waiting:
            waiting = True
            log.info("waiting for the alias lock of %s (held by %s)", name, other.tags.get("holder"))
        if float(other.tags.get("expires", 0)) < time.time():
            log.warning("breaking the expired alias lock of %s (held by %s)", name, other.tags.get("holder"))
            with contextlib.suppress(MlflowException):
                if client.get_registered_model(lock).tags.get("holder") == other.tags.get("holder"):
                    client.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            raise UserError(f"the aliases of {name} are locked by {other.tags.get('holder')} (another register or "
                            f"promote); try again, or wait longer (registry.lock_timeout_s = {timeout_s:g} s)")
        time.sleep(0.5)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            if client.get_registered_model(lock).tags.get("holder") == holder:
                client.delete_registered_model(lock)


def _model_of_preset(client, name: str, preset: str) -> None:
    """Create `name` for `preset`, or check it holds `preset` (one preset per registered model)."""
    from mlflow.exceptions import MlflowException  # mlflow: on use only (start-up time)

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        with contextlib.suppress(MlflowException):  # created by a concurrent registration meanwhile: checked below
            client.create_registered_model(name, tags={"preset": preset},
                                           description=f"datencoder encoder, preset {preset} (datencoder register)")
        model = client.get_registered_model(name)
    held = model.tags.get("preset")
    if held is None:  # made before models carried their preset: its champion's preset, if any, decides
        champion = _aliased(client, name, ALIAS)
        held = champion.tags.get("preset", preset) if champion is not None else preset
        client.set_registered_model_tag(name, "preset", held)
    if held != preset:
        raise UserError(f"registered model {name} holds preset {held!r} versions; a {preset!r} encoder is registered "
                        f"under its own name (registry.model_name, default {LEGACY_MODEL_NAME}-{preset})")


# --- the logged model's artifacts ----------------------------------------------------------------
def model_artifacts(cfg: Config, encoder_dir: str | Path, scratch: Path) -> dict[str, str]:
    """encoder weights + resolved config (the whole of it: the model carries the config it was registered with);
    the toy base and backbone CLIP too (small), never SD weights."""
    config = scratch / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    artifacts = {"encoder": str(encoder_dir), "config": str(config)}
    if cfg.base.kind == "toy":
        artifacts["base"] = cfg.base.pretrained
        artifacts["backbone_clip"] = str(Path(cfg.base.backbone_clip.pretrained).parent)
    return artifacts


def config_from_artifacts(artifacts: dict[str, str], runtime: RuntimeConfig) -> Config:
    """The logged config with the base paths pointed at the logged copies (where there are some), in `runtime`: a
    model runs where it is loaded, not where it was registered."""
    values = read_yaml(Path(artifacts["config"]).read_text())
    base = values["base"]
    if "base" in artifacts:
        base["pretrained"] = artifacts["base"]
    if "backbone_clip" in artifacts:
        clip, folder = base["backbone_clip"], Path(artifacts["backbone_clip"])
        for key in ("pretrained", "config_path"):
            if clip.get(key):
                clip[key] = str(folder / Path(clip[key]).name)
    return load_config(values["preset"], overrides=values).model_copy(update={"runtime": runtime})


def signature(engine: EngineConfig):
    """Inputs image (binary) + prompt (string); params with the config's defaults; outputs image/prompt/seed."""
    # mlflow: on use only (start-up time)
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    p = engine.personalize
    alpha = engine.sampling_alpha
    params = [ParamSpec("tuning_steps", "long", p.tuning_steps), ParamSpec("num_images", "long", p.num_images),
              ParamSpec("seed", "long", p.seed), ParamSpec("guidance_scale", "double", p.guidance_scale),
              ParamSpec("num_inference_steps", "long", p.num_inference_steps),
              ParamSpec("alpha_blend", "double", float(alpha))]
    # concept (optional): rows with the same label are several photos of one concept
    return ModelSignature(inputs=Schema([ColSpec("binary", "image"), ColSpec("string", "prompt"),
                                         ColSpec("string", "concept", required=False)]),
                          outputs=Schema([ColSpec("binary", "image"), ColSpec("string", "prompt"),
                                          ColSpec("long", "seed")]),
                          params=ParamSchema(params))


def input_example():
    """One tiny request that runs in seconds: no tuning, one sampling step."""
    import pandas as pd  # pandas: registering only; `personalize` starts without it

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (220, 40, 40)).save(buf, format="PNG")
    return pd.DataFrame({"image": [buf.getvalue()], "prompt": ["a photo of S*"]}), {
        "tuning_steps": 0, "num_inference_steps": 1, "num_images": 1}


def requirements() -> list[str]:
    return [f"{name}=={package_version(name)}" for name in
            ("torch", "diffusers", "transformers", "open_clip_torch", "safetensors", "mlflow", "pillow", "pandas",
             "pydantic", "pyyaml")]


def log_model(cfg: Config, encoder_dir: str | Path):
    """Log the pyfunc model with `cfg` (the whole config: `model_artifacts`) into the active run; returns mlflow's
    ModelInfo."""
    import mlflow  # mlflow: on use only (start-up time)

    with tempfile.TemporaryDirectory(prefix="datencoder-register-") as scratch:
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_CODE), artifacts=model_artifacts(cfg, encoder_dir, Path(scratch)),
            signature=signature(cfg.engine), input_example=input_example(), pip_requirements=requirements(),
            # declared so that load_model(model_config=...) may override them (components/runtime.py serving_runtime)
            model_config={"device": "auto", "dtype": "auto"})


# --- the gate --------------------------------------------------------------------------------------
def gate_score(personalizer, evaluate: EvaluateConfig, registry: RegistryConfig) -> dict:
    """The gate (components/evaluation/gate.py) of a loaded Personalizer, at `registry`'s size on `evaluate`'s
    concepts and prompts: {"identity", "prompt", "score", "samples", "size"}."""
    from components.evaluation.gate import gate_scores  # registering only: `personalize` starts without it

    return gate_scores(personalizer, evaluate, registry)


def score_tag(registry: RegistryConfig) -> str:
    """The version tag holding a score on `registry`'s gate: `<GATE>.<concepts>x<prompts>`."""
    # registering only (it loads pandas): `personalize` starts without it
    from components.evaluation.gate import GATE, gate_size

    return f"{GATE}.{gate_size(registry)}"


def logged_personalizer(model_uri: str, runtime: RuntimeConfig) -> Personalizer:
    """A Personalizer over a registered version's logged encoder and config, built by this checkout's code (the
    logged pyfunc code is not run: only its weights and config are read), to score it on the gate."""
    import mlflow  # mlflow: on use only (start-up time)

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    flavor = (yaml.safe_load((local / "MLmodel").read_text()) or {}).get("flavors", {}).get("python_function", {})
    artifacts = {name: str(local / info["path"]) for name, info in (flavor.get("artifacts") or {}).items()}
    if not {"encoder", "config"} <= set(artifacts):
        raise UserError(f"{model_uri} is not a datencoder model (no encoder/config artifacts): cannot score it")
    cfg = config_from_artifacts(artifacts, runtime)
    return Personalizer(cfg.engine, artifacts["encoder"])


def _score_of(client, gate: tuple[EvaluateConfig, RegistryConfig], runtime: RuntimeConfig, name: str,
              version) -> float | None:
    """A version's score on the gate (`gate_score`'s evaluate and registry): its tag, else scored now (in `runtime`)
    from its logged model and recorded."""
    if version is None:
        return None
    tag = score_tag(gate[1])
    if tag in version.tags:
        return float(version.tags[tag])
    log.info("scoring %s version %s on the gate %s (its score there was never recorded)", name, version.version, tag)
    score = gate_score(logged_personalizer(f"models:/{name}/{version.version}", runtime), *gate)["score"]
    client.set_model_version_tag(name, version.version, tag, f"{score:.6g}")
    return float(f"{score:.6g}")


def decide(score: float, champion: float | None, challenger: float | None, margin: float) -> str | None:
    """Which alias a new version's gate score earns: `champion` when there is none yet, `challenger` when it
    beats the champion by more than `margin` and the current challenger (if any), else none."""
    from components.evaluation.gate import beats  # registering only (it loads pandas): `personalize` starts without it

    if champion is None:
        return ALIAS
    if beats(score, champion, margin) and beats(score, challenger, 0.0):
        return CHALLENGER
    return None


def register(cfg: Config, encoder: str | None = None) -> dict:
    """Log and register the encoder at `encoder` (default personalize.encoder) as a version of `model_name`;
    give it the alias its gate score earns (`decide`), under the model's alias lock."""
    import mlflow  # mlflow: on use only (start-up time)

    encoder_dir = Path(encoder or cfg.personalize.encoder)
    if not (encoder_dir / "config.json").is_file():
        raise UserError(f"no encoder at {encoder_dir} (config.json missing): run `datencoder pretrain` first, "
                        f"or pass --encoder")

    from components.evaluation.gate import GATE  # registering only (it loads pandas): `personalize` starts without it

    client, name, r = _client(), model_name(cfg.registry, cfg.preset), cfg.registry
    _model_of_preset(client, name, cfg.preset)
    on_gate = (cfg.evaluate, r)
    gate = gate_score(Personalizer(cfg.engine, encoder_dir), *on_gate)
    score = float(f"{gate['score']:.6g}")  # as recorded in the tag: what every later comparison reads
    # a champion from another gate: scored before the lock
    _score_of(client, on_gate, cfg.runtime, name, _aliased(client, name, ALIAS))
    from components.data.prepare import data_version  # registering only (pandas): `personalize` starts without it

    tags = {"data_version": data_version(cfg.prepare.out, missing="unknown"), "preset": cfg.preset,
            "stage": "register"}
    with tracking.run(EXPERIMENT, f"register-{encoder_dir.name}", tags) as (run_client, run_id):
        tracking.log_metrics(run_client, run_id, {GATE: score, "gate_identity": gate["identity"],
                                                  "gate_prompt": gate["prompt"]}, step=0)
        with mlflow.start_run(run_id=run_id):
            info = log_model(cfg, encoder_dir)
        version = mlflow.register_model(info.model_uri, name).version
        for key, value in {**tags, "git_commit": tracking.git_commit(), "gate": GATE, "gate_size": gate["size"],
                           score_tag(r): f"{score:.6g}", "encoder": str(encoder_dir),
                           CODE_TAG: code_sha256(PYFUNC_CODE)}.items():
            client.set_model_version_tag(name, version, key, str(value))
        with alias_lock(client, name, r.lock_timeout_s):
            champion, challenger = _aliased(client, name, ALIAS), _aliased(client, name, CHALLENGER)
            champion_score = _score_of(client, on_gate, cfg.runtime, name, champion)
            challenger_score = _score_of(client, on_gate, cfg.runtime, name, challenger)
            alias = decide(score, champion_score, challenger_score, r.margin)
            if alias:
                client.set_registered_model_alias(name, alias, version)
    said = {ALIAS: "now @champion (the model had none)",
            CHALLENGER: f"now @challenger (champion v{champion and champion.version} {champion_score}; "
                        f"promote it with `datencoder promote`)",
            None: f"no alias: it does not beat the champion v{champion and champion.version} ({champion_score}) "
                  f"by more than {r.margin:g}" + (f" and the challenger v{challenger.version} ({challenger_score})"
                                         if challenger else "")}[alias]
    log.info("registered %s version %s (%s %s = %.5g); %s", name, version, GATE, gate["size"], score, said)
    return {"model": name, "version": int(version), "run_id": run_id, "model_uri": info.model_uri,
            "tracking_uri": client.tracking_uri, "alias": alias, "promoted": alias == ALIAS,
            "gate": {"name": GATE, "size": gate["size"], "samples": gate["samples"], "score": score,
                     "identity": gate["identity"], "prompt": gate["prompt"], "higher_is_better": True,
                     "margin": r.margin, "champion_version": champion and int(champion.version),
                     "champion_score": champion_score, "challenger_version": challenger and int(challenger.version),
                     "challenger_score": challenger_score},
            "tags": tags}


def promote(cfg: Config, version: int | None = None) -> dict:
    """Move the model's (`model_name`) `@champion` to `version` (default: the `@challenger`), under the alias lock;
    never onto a version of another preset. The previous champion is recorded on the new one (`promoted_from`)."""
    from mlflow.exceptions import MlflowException  # mlflow: on use only (start-up time)

    client, name = _client(), model_name(cfg.registry, cfg.preset)
    with alias_lock(client, name, cfg.registry.lock_timeout_s):
        try:
            model = client.get_registered_model(name)
            target = (client.get_model_version(name, str(version)) if version is not None
                      else _aliased(client, name, CHALLENGER))
        except MlflowException as e:
            raise UserError(f"cannot find {name}{f' version {version}' if version else ''} in "
                            f"{tracking.tracking_uri()}: {str(e).splitlines()[0]}") from None
        if target is None:
            raise UserError(f"{name} has no @{CHALLENGER} to promote; give --version N (`datencoder register` gives "
                            f"@{CHALLENGER} to a version that beats the champion on the gate)")
        champion = _aliased(client, name, ALIAS)
        held = model.tags.get("preset") or (champion.tags.get("preset") if champion else None) or cfg.preset
        for what, preset in (("the model", held), ("the command's preset", cfg.preset)):
            if target.tags.get("preset") != preset:
                raise UserError(f"refusing to promote {name} version {target.version}: it is preset "
                                f"{target.tags.get('preset')!r}, {what} is {preset!r}")
        previous = int(champion.version) if champion else None
        if previous == int(target.version):
            raise UserError(f"{name} version {target.version} is already @{ALIAS}")
        client.set_registered_model_alias(name, ALIAS, target.version)
        challenger = _aliased(client, name, CHALLENGER)
        if challenger is not None and challenger.version == target.version:
            client.delete_registered_model_alias(name, CHALLENGER)
        who = os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()
        for key, value in {"promoted_from": previous or "none", "promoted_by": who,
                           "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}.items():
            client.set_model_version_tag(name, target.version, key, str(value))
    log.info("%s@%s: version %s -> %s", name, ALIAS, previous, target.version)
    return {"model": name, "alias": ALIAS, "version": int(target.version), "previous": previous,
            "tracking_uri": client.tracking_uri, "model_uri": f"models:/{name}@{ALIAS}"}


def load_pyfunc_personalizer(model_uri: str, trust: bool = False, runtime: RuntimeConfig | None = None):
    """The Personalizer inside a logged pyfunc model (what the server runs), after the trust check; `runtime`'s
    settings other than auto win over the serving environment's (components/runtime.py `serving_runtime`)."""
    return load_pyfunc(trusted_model_dir(model_uri, trust), runtime).unwrap_python_model().personalizer


def load_pyfunc(model_dir: str, runtime: RuntimeConfig | None = None):
    """The pyfunc model in a local directory that trusted_model_dir returned."""
    import mlflow  # mlflow: on use only (start-up time)

    try:
        return mlflow.pyfunc.load_model(model_dir, model_config=runtime.model_dump() if runtime else None)
    except mlflow.exceptions.MlflowException as e:
        raise UserError(f"cannot load MLflow model from {model_dir}: {str(e).splitlines()[0]}") from None


# --- trust ------------------------------------------------------------------------------------------
def code_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def trust_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def trusted_model_dir(model_uri: str, trust: bool = False) -> str:
    """Download `model_uri` and return its local directory, once its logged code is known to be this
    project's (module docstring); otherwise a UserError saying why, unless `trust` (or TRUST_ENV)."""
    import mlflow  # mlflow: on use only (start-up time)

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
    mlmodel = yaml.safe_load((Path(local) / "MLmodel").read_text()) or {}
    flavor = mlmodel.get("flavors", {}).get("python_function", {})
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
    from mlflow.exceptions import MlflowException  # mlflow: on use only (start-up time)

    name, _, ref = model_uri.removeprefix("models:/").partition("@")
    try:
        if ref:
            return client.get_model_version_by_alias(name, ref)
        name, _, version = name.partition("/")
        return client.get_model_version(name, version)
    except MlflowException as e:
        raise UserError(f"cannot find {model_uri} in {tracking.tracking_uri()}: {str(e).splitlines()[0]}") from None
