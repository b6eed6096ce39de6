"""The `datencoder` console script.

Each subcommand parses its options and calls one stage function; the same function is what the DVC
stage command and the Prefect task call. Reports go to stdout as one JSON object with `--json`
(human-readable otherwise); logs and progress go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import os
import signal
import sys
from typing import Any, Iterator, NoReturn

# Of the project's modules only these two load at start-up: each command imports its stage inside its function,
# so that `datencoder --help` stays fast and loads no torch, diffusers, Ray or MLflow (docs/layout.md).
from components.errors import UserError
from components.progress import show_bars


log = logging.getLogger("datencoder")


def fail(prog: str, message: str, as_json: bool, code: int = 2) -> int:
    """A command's error: one line on stderr and, with --json, `{"error": ...}` on stdout. Returns `code`."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": message}))
    return code


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching (`--num-image` is not `--num-images`), whose errors are one line that
    names what it did not know (and, with --json, a JSON object on stdout)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self._given: list[str] = []
        self.commands: dict[str, Parser] = {}  # the subcommands' parsers

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def unknown_options(self, given: list[str]) -> list[str]:
        return [a for a in given
                if a.startswith("--") and a != "--" and a.split("=", 1)[0] not in self._option_string_actions]

    def unrecognized(self, extras: list[str]) -> str:
        """The message for arguments this parser does not take, with the nearest option for a misspelt one."""
        message = f"unrecognized arguments: {' '.join(extras)}"
        hints = [f"{a.split('=', 1)[0]} -> {match[0]}" for a in self.unknown_options(extras)
                 if (match := difflib.get_close_matches(a.split("=", 1)[0], self._option_string_actions, n=1))]
        return message + (f" (did you mean: {', '.join(hints)}?)" if hints else "")

    def error(self, message: str) -> NoReturn:
        unknown = self.unknown_options(self._given)
        if unknown and message.startswith("the following arguments are required"):
            message = f"{self.unrecognized(unknown)}; {message}"  # a misspelt option is why one is missing
        sys.exit(fail(self.prog, f"{message} (see `{self.prog} --help`)", "--json" in self._given))


class _Renamed(argparse.Action):
    """An option's old name: still accepted, with a line naming the new one (one name per knob)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        new = "--" + self.dest.replace("_", "-")
        print(f"datencoder: {option_string} is deprecated; use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


VERBOSE = "debug logging on stderr, and Ray's, Prefect's and MLflow's info lines (default: their warnings only)"


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="config preset: toy (default), smoke, sd15")
    p.add_argument("--config", default=None,
                   help="YAML config with a `preset:` key and section overrides (e.g. params.yaml)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE)


def _add_trust_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-model-code", action="store_true",
                   help="load a registered model whose logged code is not this checkout's (also "
                        "DATENCODER_TRUST_MODEL_CODE=1); it runs that code")


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    """Where the base model runs (the `runtime` config section; docs/gpu.md)."""
    p.add_argument("--device",
                   help="auto (CUDA when present, else cpu), cpu, cuda or cuda:N (default: runtime.device)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the base model's precision; auto: float32 on cpu, bfloat16 on a GPU (default: runtime.dtype)")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    """What personalize and baseline share: images per prompt and the sampler."""
    p.add_argument("--num-images", type=int, help="images per prompt, 1-16")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale")
    p.add_argument("--num-inference-steps", type=int, help="sampler steps (default: personalize.num_inference_steps)")
    p.add_argument("--sampling-steps", dest="num_inference_steps", type=int, action=_Renamed,
                   help=argparse.SUPPRESS)
    p.add_argument("--scheduler", choices=("ddim", "dpm"),
                   help="DDIM or DPM-Solver++ (default: personalize.scheduler)")


def _config(args: argparse.Namespace, overrides: dict | None = None):
    from components.config import deep_merge, load_config

    runtime = {k: getattr(args, k, None) for k in ("device", "dtype")}
    runtime = {k: v for k, v in runtime.items() if v is not None}
    if runtime:
        overrides = deep_merge(overrides or {}, {"runtime": runtime})
    cfg = load_config(preset=args.preset, path=args.config, overrides=overrides)
    if hasattr(args, "device"):  # a command that loads the base: CUDA asked for where there is none fails now
        from components.runtime import resolve

        resolve(cfg.runtime)
    return cfg


def cmd_toy_world(args: argparse.Namespace) -> dict:
    from components.toy.world import write_toy_world

    cfg = _config(args)
    out = args.out or cfg.toy_world.out
    n = args.n if args.n is not None else cfg.toy_world.n
    seed = args.seed if args.seed is not None else cfg.toy_world.seed
    return write_toy_world(out, n=n, seed=seed, scene_fraction=cfg.toy_world.scene_fraction)


def cmd_bootstrap(args: argparse.Namespace) -> dict:
    from components.toy.bootstrap import PARTS, bootstrap

    cfg = _config(args)
    return bootstrap(cfg, out_dir=args.out, parts=tuple(args.part or PARTS))


def cmd_check_base(args: argparse.Namespace) -> dict:
    from components.evaluation.check_base import check_base

    cfg = _config(args)
    return check_base(cfg, grid=args.grid)


PREPARE_SOURCES = ("imagenet", "openimages_boxes", "openimages_classes", "openimages_images")


def cmd_prepare(args: argparse.Namespace) -> dict:
    from components.data.prepare import prepare

    options = (*PREPARE_SOURCES, "captions", "imagenet_synsets", "out", "resolution", "threads")
    given = {k: getattr(args, k) for k in options if getattr(args, k) is not None}
    # sources named on the command line replace the configured (toy) ones and their captions instead of adding
    if any(k in given for k in PREPARE_SOURCES):
        given = {**dict.fromkeys((*PREPARE_SOURCES, "captions")), **given}
    s3 = {"endpoint_url": args.s3_endpoint_url, "unsigned": args.s3_unsigned or None}
    given["s3"] = {k: v for k, v in s3.items() if v is not None}
    cfg = _config(args, overrides={"prepare": given})
    return prepare(cfg.prepare)


def _tracking_server() -> None:
    """A command that logs to MLflow: an unreachable server or refused credentials is one line now, not a
    traceback after Ray or a model has started."""
    from components.tracking import check_server

    check_server()


def cmd_pretrain(args: argparse.Namespace) -> dict:
    from components.training.pretrain import pretrain

    cfg = _config(args)
    _tracking_server()
    return pretrain(cfg, workers=args.workers, max_steps=args.max_steps,
                    checkpoint_every=args.checkpoint_every, storage=args.storage, address=args.address,
                    parent_run_id=args.parent_run_id, restart=args.restart, force=args.force)


def cmd_targets(args: argparse.Namespace) -> dict:
    from components.config import load_config
    from components.training.targets import targets_report

    # the base's own preset supplies the encoder sizes unless --preset/--config say otherwise
    preset = args.preset or (args.base if args.config is None else None)
    return targets_report(load_config(preset=preset, path=args.config), kind=args.base)


def cmd_personalize(args: argparse.Namespace) -> dict:
    from components.serving.personalize import personalize

    return personalize(_config(args), args.image, args.prompt, model=args.model, out=args.out, export=args.export,
                       scheduler=args.scheduler, trust_model_code=args.trust_model_code,
                       tuning_steps=args.tuning_steps, num_images=args.num_images,
                       seed=args.seed, alpha_blend=args.alpha_blend, guidance_scale=args.guidance_scale,
                       num_inference_steps=args.num_inference_steps)


def cmd_register(args: argparse.Namespace) -> dict:
    from components.serving.registry import register

    cfg = _config(args)
    _tracking_server()
    return register(cfg, encoder=args.encoder)


def cmd_promote(args: argparse.Namespace) -> dict:
    from components.serving.registry import promote

    cfg = _config(args)
    _tracking_server()
    return promote(cfg, version=args.version)


def cmd_pipeline(args: argparse.Namespace) -> dict:
    from flows.main_job import main_job

    return main_job(preset=args.preset, config=args.config, workspace=args.workspace, refresh=args.refresh,
                    serve=args.serve, cron=args.cron, ui=args.ui)


def cmd_baseline(args: argparse.Namespace) -> dict:
    from components.training.baselines import baseline

    return baseline(_config(args), args.method, args.image, args.prompt, steps=args.max_train_steps, out=args.out,
                    scheduler=args.scheduler, seed=args.seed, num_images=args.num_images,
                    guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps)


def _evaluation_overrides(args: argparse.Namespace) -> dict:
    given = {"full": args.full or None, "retrain_steps": args.retrain_steps, "out": getattr(args, "out", None)}
    return {"evaluate": {k: v for k, v in given.items() if v is not None}}


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from components.evaluation.evaluate import evaluate

    return evaluate(_config(args, overrides=_evaluation_overrides(args)), parent_run_id=args.parent_run_id)


def cmd_ablate(args: argparse.Namespace) -> dict:
    from components.evaluation.ablate import ablate

    overrides = _evaluation_overrides(args)
    if overrides["evaluate"].pop("out", None) is not None:
        overrides["ablate"] = {"out": args.out}
    return ablate(_config(args, overrides=overrides), parent_run_id=args.parent_run_id)


def cmd_variants(args: argparse.Namespace) -> dict:
    from components.evaluation.variants import train_variants

    return train_variants(_config(args, overrides=_evaluation_overrides(args)), parent_run_id=args.parent_run_id,
                          force=args.force)


def cmd_baselines(args: argparse.Namespace) -> dict:
    from components.evaluation.evaluate import baselines

    return baselines(_config(args, overrides=_evaluation_overrides(args)), parent_run_id=args.parent_run_id,
                     force=args.force)


def cmd_serve(args: argparse.Namespace) -> dict:
    from components.serving.serve import serve

    chosen = {"backend": args.backend, "replicas": args.replicas, "max_replicas": args.max_replicas,
              "replica_cpus": args.replica_cpus, "replica_gpus": args.replica_gpus}
    chosen = {k: v for k, v in chosen.items() if v is not None}
    return serve(_config(args, overrides={"serve": chosen} if chosen else None), model=args.model, host=args.host,
                 port=args.port, workers=args.workers, trust_model_code=args.trust_model_code)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="datencoder", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices

    p = sub.add_parser("toy-world", help="render the synthetic toy world in ImageNet/Open Images formats")
    _add_config_options(p)
    p.add_argument("--out", help="output directory (default: toy_world.out)")
    p.add_argument("--n", type=_positive_int, help="number of single-object images")
    p.add_argument("--seed", type=int, help="random seed (same seed, same bytes)")
    p.set_defaults(func=cmd_toy_world)

    p = sub.add_parser("bootstrap", help="train the tiny toy base model and CLIPs from the toy world")
    _add_config_options(p)
    p.add_argument("--out", help="models directory (default: bootstrap.out_dir)")
    p.add_argument("--part", action="append", choices=["vae", "unet", "backbone", "metrics", "clips"],
                   help="train only this part (repeatable; default all; clips: backbone and metrics; "
                        "unet needs the vae in --out)")
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("check-base", help="measure the base model on held-out combinations")
    _add_config_options(p)
    p.add_argument("--grid", help="also save the generated images as one PNG sheet here")
    _add_runtime_options(p)
    p.set_defaults(func=cmd_check_base)

    p = sub.add_parser("prepare", help="ImageNet folders + Open Images largest-box crops -> square images + manifest")
    _add_config_options(p)
    p.add_argument("--imagenet", help="ImageNet folder: class folders, under train/ if present")
    p.add_argument("--imagenet-synsets", help="LOC_synset_mapping.txt (default: the one in --imagenet)")
    p.add_argument("--captions", help="caption templates: a CSV with columns source, source_id, template "
                                      "(docs/prepare.md; default with other sources: none)")
    p.add_argument("--openimages-boxes", help="Open Images box CSV (oidv6-train-annotations-bbox.csv)")
    p.add_argument("--openimages-classes", help="Open Images class CSV (oidv7-class-descriptions.csv)")
    p.add_argument("--openimages-images", help="image folder, s3://bucket/prefix, or a template with {ImageID}")
    p.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (default: prepare.s3, AWS_ENDPOINT_URL)")
    p.add_argument("--s3-unsigned", action="store_true", help="read S3 anonymously (public buckets)")
    p.add_argument("--out", help="output directory (default: prepare.out)")
    p.add_argument("--resolution", type=_positive_int, help="side of the square output images in pixels")
    p.add_argument("--threads", type=_positive_int, help="reader/decoder threads (default: prepare.threads)")
    p.add_argument("--workers", dest="threads", type=_positive_int, action=_Renamed, help=argparse.SUPPRESS)
    p.epilog = "Sources given here replace the configured ones (the toy preset's toy world); give at least one."
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="pre-train the encoder with Ray Train (DDP); resumes from its last checkpoint")
    _add_config_options(p)
    p.add_argument("--workers", type=_positive_int, help="training workers (default: pretrain.workers)")
    p.add_argument("--max-steps", type=_positive_int,
                   help="train up to this optimiser step (default: pretrain.max_steps)")
    p.add_argument("--checkpoint-every", type=_positive_int, help="steps between checkpoints")
    p.add_argument("--storage",
                   help="checkpoint storage: a local path or s3://bucket/prefix (default: pretrain.storage)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--parent-run-id", help="nest the MLflow run under this run")
    p.add_argument("--restart", action="store_true", help="discard this run's checkpoints and start from step 0")
    p.add_argument("--force", action="store_true",
                   help="replace an encoder in personalize.encoder that was trained under another recipe")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("targets", help="list the UNet matrices the hypernetwork adapts and its parameter count")
    _add_config_options(p)
    p.add_argument("--base", choices=("toy", "sd15"), help="base structure (default: the config's base.kind)")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("personalize", help="one image + prompts with S* -> images of that concept (and an export)")
    _add_config_options(p)
    p.add_argument("--image", action="append", required=True,
                   help="the concept's image (PNG, JPEG, ...); repeat for several photos of the same concept")
    p.add_argument("--prompt", action="append", required=True, help='prompt with the placeholder S*; repeatable')
    p.add_argument("--tuning-steps", type=int, help="tuning steps, 0-100 (default: personalize.tuning_steps, 12)")
    p.add_argument("--steps", dest="tuning_steps", type=int, action=_Renamed, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i")
    p.add_argument("--alpha-blend", type=float,
                   help="dual-path blend a in [0, 1] for generation (1: plain LoRA + embedding)")
    p.add_argument("--blend", dest="alpha_blend", type=float, action=_Renamed, help=argparse.SUPPRESS)
    _add_sampling_options(p)
    p.add_argument("--out", help="image directory (default: personalize.out)")
    p.add_argument("--export", help="also write the concept here as a diffusers LoRA + embedding + kohya keys")
    p.add_argument("--model", help="MLflow model URI or encoder directory (default: datencoder-PRESET@champion "
                                   "if registered, else personalize.encoder)")
    _add_trust_option(p)
    _add_runtime_options(p)
    p.set_defaults(func=cmd_personalize)

    p = sub.add_parser("register", help="log the encoder as an MLflow pyfunc, register it as a version of "
                                        "datencoder-PRESET; @challenger if it beats @champion on the gate")
    _add_config_options(p)
    p.add_argument("--encoder", help="encoder directory (default: personalize.encoder)")
    _add_runtime_options(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("promote", help="move @champion of datencoder-PRESET to its @challenger (or --version N); "
                                       "the one way the champion changes")
    _add_config_options(p)
    p.add_argument("--version", type=_positive_int, help="the version to promote (default: the @challenger)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("pipeline", help="the main job: the Prefect retrain flow (prepare_data, pretrain, evaluate, "
                                        "ablate, register) and its report")
    _add_config_options(p)
    p.add_argument("--workspace", help="pipeline workspace (dvc.yaml, params.yaml, stores); created when new "
                                       "(default: this checkout, or outputs/workspaces/PRESET for another preset)")
    p.add_argument("--refresh", action="store_true", help="ignore the Prefect cache: run every stage again")
    p.add_argument("--serve", action="store_true", help="serve a Prefect deployment of retrain on a cron schedule "
                                                        "(needs PREFECT_API_URL; runs until interrupted)")
    p.add_argument("--cron", help="schedule of --serve (default: pipeline.cron)")
    p.add_argument("--ui", action="store_true", help="serve the Prefect UI of the run's own server and keep it up "
                                                     "after the run, until Ctrl-C")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("baseline", help="an optimisation baseline (TI, LoRA, DreamBooth) on 1 image (one-shot) or 3-5 "
                                        "(few-shot) + prompts with S* -> images, shaped like personalize")
    _add_config_options(p)
    # not argparse choices: an unknown method gets the same one-line error as every other bad input
    p.add_argument("method", help="ti (textual inversion), lora or dreambooth")
    p.add_argument("--image", action="append", required=True, help="an image of the concept; repeat for few-shot")
    p.add_argument("--prompt", action="append", required=True, help="prompt with the placeholder S*; repeatable")
    p.add_argument("--max-train-steps", type=_positive_int,  # diffusers' training scripts' name
                   help="optimisation steps (default: evaluate.{ti,lora,dreambooth}_steps)")
    p.add_argument("--steps", dest="max_train_steps", type=_positive_int, action=_Renamed, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help="training seed and seed of the first image; image i uses seed + i")
    _add_sampling_options(p)
    p.add_argument("--out", help="image directory (default: outputs/baseline-METHOD)")
    _add_runtime_options(p)
    p.set_defaults(func=cmd_baseline)

    for name, func, what in (("evaluate", cmd_evaluate, "CLIP identity/prompt similarity of ours, its variants and "
                              "the baselines; results table, trade-off plot and findings to MLflow"),
                             ("ablate", cmd_ablate, "the ablation grid (regulariser, dual path, hypernetwork, tuning "
                              "parts, blend sweep), each a nested MLflow run"),
                             ("variants", cmd_variants, "pre-train every re-trained encoder of evaluate and ablate "
                              "into evaluate.cache and store their scores in evaluate.variant_results (up to date: "
                              "nothing to do)"),
                             ("baselines", cmd_baselines, "train and score the optimisation baselines (and their "
                              "time-to-identity series) into evaluate.baseline_results (up to date: nothing to do)")):
        p = sub.add_parser(name, help=what)
        _add_config_options(p)
        p.add_argument("--full", action="store_true", help="the issue's whole grid: every concept for every method, "
                                                           "evaluate.full_seeds, evaluate.full_retrain_steps")
        p.add_argument("--retrain-steps", type=_positive_int, help="pre-training steps of the re-trained variants")
        if name in ("evaluate", "ablate"):
            p.add_argument("--out", help="report directory (default: evaluate.out / ablate.out)")
        else:
            p.add_argument("--force", action="store_true", help="compute them again even when the stored ones are "
                                                                "current")
        p.add_argument("--parent-run-id", help="nest the MLflow run under this run")
        _add_runtime_options(p)
        p.set_defaults(func=func)

    p = sub.add_parser("serve", help="serve models:/datencoder-PRESET@champion: MLflow's scoring protocol behind "
                                     "request limits (serve.*)")
    _add_config_options(p)
    p.add_argument("--model",
                   help="MLflow model URI (default: models:/datencoder-PRESET@champion, registry.model_name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_positive_int, default=5000)
    p.add_argument("--workers", type=_positive_int, default=1, help="uvicorn: server processes (each loads the model)")
    p.add_argument("--backend", choices=("uvicorn", "ray"), help="uvicorn (one process per worker) or Ray Serve "
                                                                  "replicas (default: serve.backend)")
    p.add_argument("--replicas", type=_positive_int, help="ray: model replicas (default: serve.replicas)")
    p.add_argument("--max-replicas", type=_positive_int, help="ray: autoscale from --replicas up to this many")
    p.add_argument("--replica-cpus", type=float, help="ray: CPUs per replica (default: serve.replica_cpus)")
    p.add_argument("--replica-gpus", type=float, help="ray: GPUs per replica, e.g. 1 (default: serve.replica_gpus)")
    _add_trust_option(p)
    _add_runtime_options(p)
    p.set_defaults(func=cmd_serve)

    return parser


@contextlib.contextmanager
def stdout_to_stderr(active: bool) -> Iterator[None]:
    """With --json, stdout carries the one JSON object only: while the command runs, whatever is written to stdout
    (MLflow prints "View run" lines there when it talks to a server; subprocesses inherit file descriptor 1) goes
    to stderr."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True, default=str))
    else:
        for key, value in result.items():
            print(f"{key}: {json.dumps(value, default=str) if isinstance(value, (dict, list)) else value}")


def parse(parser: Parser, argv: list[str] | None = None) -> argparse.Namespace:
    """The command's options; anything its parser does not take is an error naming it (exit 2)."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        command = parser.commands[args.command]
        command.error(command.unrecognized(extras))
    return args


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a command as Ctrl-C does: what it started is cleaned up on the way out


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    """Run the parsed command: its report on stdout, or its error (one line; exit 2 for what the user can fix)."""
    # our own loggers at INFO; third-party chatter (open_clip logs INFO on the root) at WARNING
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("datencoder", "components", "flows"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # Prefect and MLflow set up their own loggers when imported (and so do the processes a command starts):
    # their info lines only with --verbose, unless the user set their levels
    for variable in ("PREFECT_LOGGING_LEVEL", "MLFLOW_LOGGING_LEVEL"):
        os.environ.setdefault(variable, "INFO" if args.verbose else "WARNING")
    as_json = getattr(args, "json", False)
    prog = f"datencoder {args.command}"
    # bars only for people at a terminal: --json output is for programs
    show_bars(not as_json)
    try:
        with stdout_to_stderr(getattr(args, "json", False)):
            result = args.func(args)
    except UserError as e:
        return fail(prog, str(e), as_json, e.exit_code)
    except (KeyboardInterrupt, SystemExit) as e:
        # SIGTERM is KeyboardInterrupt here, or SystemExit(SIGTERM) once ray.init has replaced our handler with its own
        if isinstance(e, SystemExit) and e.code != signal.SIGTERM:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        if as_json:
            print(json.dumps({"error": "interrupted"}))
        return 130
    except Exception as e:
        torch = sys.modules.get("torch")  # not imported at start-up: only a stage that ran it can run out of memory
        if torch is not None and isinstance(e, torch.OutOfMemoryError):
            from components.runtime import out_of_memory

            return fail(prog, out_of_memory(e), as_json)
        if as_json:  # a bug: its traceback on stderr, and still one JSON object on stdout
            print(json.dumps({"error": f"internal error: {type(e).__name__}: {e}"}))
        raise
    emit(result, as_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
