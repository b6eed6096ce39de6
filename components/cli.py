"""The `datencoder` console script.

Each subcommand parses its options and calls one stage function; the same function is what the DVC
stage command and the Prefect task call. Reports go to stdout as one JSON object with `--json`
(human-readable otherwise); logs and progress go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

from components.errors import UserError

log = logging.getLogger("datencoder")

# subcommand -> the issue that delivers it; these exit 2 with a clear line until they land
NOT_YET: dict[str, str] = {
    "pretrain": "distributed encoder pre-training",
    "personalize": "one-shot personalisation",
    "baseline": "the evaluation harness (baselines)",
    "evaluate": "the evaluation harness",
    "ablate": "the evaluation harness (ablations)",
    "register": "the MLflow registry",
    "pipeline": "orchestration (the Prefect retrain flow)",
    "serve": "serving",
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="config preset: toy (default), smoke, sd15")
    p.add_argument("--config", default=None,
                   help="YAML config with a `preset:` key and section overrides (e.g. params.yaml)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _config(args: argparse.Namespace, overrides: dict | None = None):
    from components.config import load_config

    return load_config(preset=args.preset, path=args.config, overrides=overrides)


def cmd_toy_world(args: argparse.Namespace) -> dict:
    from components.toy_world import write_toy_world

    cfg = _config(args)
    out = args.out or cfg.toy_world.out
    n = args.n if args.n is not None else cfg.toy_world.n
    seed = args.seed if args.seed is not None else cfg.toy_world.seed
    return write_toy_world(out, n=n, seed=seed, scene_fraction=cfg.toy_world.scene_fraction)


def cmd_bootstrap(args: argparse.Namespace) -> dict:
    from components.bootstrap import bootstrap

    cfg = _config(args)
    return bootstrap(cfg, out_dir=args.out)


def cmd_check_base(args: argparse.Namespace) -> dict:
    from components.check_base import check_base

    cfg = _config(args)
    return check_base(cfg, grid=args.grid)


PREPARE_SOURCES = ("imagenet", "openimages_boxes", "openimages_classes", "openimages_images")


def cmd_prepare(args: argparse.Namespace) -> dict:
    from components.prepare import prepare

    options = (*PREPARE_SOURCES, "imagenet_synsets", "out", "resolution", "workers")
    given = {k: getattr(args, k) for k in options if getattr(args, k) is not None}
    # sources named on the command line replace the configured (toy) ones instead of adding to them
    if any(k in given for k in PREPARE_SOURCES):
        given = {**dict.fromkeys(PREPARE_SOURCES), **given}
    s3 = {"endpoint_url": args.s3_endpoint_url, "unsigned": args.s3_unsigned or None}
    given["s3"] = {k: v for k, v in s3.items() if v is not None}
    cfg = _config(args, overrides={"prepare": given})
    return prepare(cfg.prepare)


def cmd_targets(args: argparse.Namespace) -> dict:
    from components.config import load_config
    from components.hypernetwork import targets_report

    # the base's own preset supplies the encoder sizes unless --preset/--config say otherwise
    preset = args.preset or (args.base if args.config is None else None)
    return targets_report(load_config(preset=preset, path=args.config), kind=args.base)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datencoder", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("toy-world", help="render the synthetic toy world in ImageNet/Open Images formats")
    _add_config_options(p)
    p.add_argument("--out", help="output directory (default: toy_world.out)")
    p.add_argument("--n", type=_positive_int, help="number of single-object images")
    p.add_argument("--seed", type=int, help="random seed (same seed, same bytes)")
    p.set_defaults(func=cmd_toy_world)

    p = sub.add_parser("bootstrap", help="train the tiny toy base model and CLIPs from the toy world")
    _add_config_options(p)
    p.add_argument("--out", help="models directory (default: bootstrap.out_dir)")
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("check-base", help="measure the base model on held-out combinations")
    _add_config_options(p)
    p.add_argument("--grid", help="also save the generated images as one PNG sheet here")
    p.set_defaults(func=cmd_check_base)

    p = sub.add_parser("prepare", help="ImageNet folders + Open Images largest-box crops -> square images + manifest")
    _add_config_options(p)
    p.add_argument("--imagenet", help="ImageNet folder: class folders, under train/ if present")
    p.add_argument("--imagenet-synsets", help="LOC_synset_mapping.txt (default: the one in --imagenet)")
    p.add_argument("--openimages-boxes", help="Open Images box CSV (oidv6-train-annotations-bbox.csv)")
    p.add_argument("--openimages-classes", help="Open Images class CSV (oidv7-class-descriptions.csv)")
    p.add_argument("--openimages-images", help="image folder, s3://bucket/prefix, or a template with {ImageID}")
    p.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (default: prepare.s3, AWS_ENDPOINT_URL)")
    p.add_argument("--s3-unsigned", action="store_true", help="read S3 anonymously (public buckets)")
    p.add_argument("--out", help="output directory (default: prepare.out)")
    p.add_argument("--resolution", type=_positive_int, help="side of the square output images in pixels")
    p.add_argument("--workers", type=_positive_int, help="reader/decoder threads")
    p.epilog = "Sources given here replace the configured ones (the toy preset's toy world); give at least one."
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("targets", help="list the UNet matrices the hypernetwork adapts and its parameter count")
    _add_config_options(p)
    p.add_argument("--base", choices=("toy", "sd15"), help="base structure (default: the config's base.kind)")
    p.set_defaults(func=cmd_targets)

    for name, what in NOT_YET.items():
        p = sub.add_parser(name, help=f"({what}: not implemented yet)")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_not_yet(name, what))
    return parser


def _not_yet(name: str, what: str) -> Callable[[argparse.Namespace], dict]:
    def run(args: argparse.Namespace) -> dict:
        raise UserError(f"`datencoder {name}` is not implemented yet ({what} has not landed)")

    return run


def emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True, default=str))
    else:
        for key, value in result.items():
            print(f"{key}: {json.dumps(value, default=str) if isinstance(value, (dict, list)) else value}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # our own loggers at INFO; third-party chatter (open_clip logs INFO on the root) at WARNING
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("datencoder", "components", "flows"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        result = args.func(args)
    except UserError as e:
        print(f"datencoder {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"datencoder {args.command}: interrupted", file=sys.stderr)
        return 130
    emit(result, getattr(args, "json", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
