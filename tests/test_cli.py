"""The command line as a user meets it: from any directory, with errors that say what to do.

Real subprocesses of the installed `datencoder` run outside the checkout on the committed toy models; the
error cases call the CLI's `main` (the same code path) where a subprocess would only add start-up time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.cli import main


ROOT = Path(__file__).resolve().parents[1]
DATENCODER = str(Path(sys.executable).parent / "datencoder")
STACK_ENV = ("MLFLOW_TRACKING_URI", "DATENCODER_HOME", "PREFECT_API_URL", "RAY_ADDRESS")


def datencoder(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in STACK_ENV}
    return subprocess.run([DATENCODER, *args], cwd=cwd, env={**full, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture()
def toy_photo(tmp_path) -> Path:
    from components.toy import world

    path = tmp_path / "photo.png"
    world.render(world.canonical(world.ToyConcept("star", "red", "striped", "white"))).save(path)
    return path


def error_of(capsys, code: int, expected_code: int = 2, as_json: bool = False) -> str:
    """The one error line of a CLI call (and, with --json, that the JSON on stdout says the same)."""
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == expected_code and lines, (code, err)
    assert "Traceback" not in err, err
    line = lines[-1]
    if as_json:
        assert line.endswith(json.loads(out)["error"]), (out, line)
    return line


# --- from any directory -------------------------------------------------------------------------------
def test_personalize_from_another_directory_uses_the_committed_models(tmp_path, toy_photo):
    """Outside the checkout: the committed encoder, base and CLIPs (from the project home); images written
    where the user runs; no MLflow store created there by looking for a champion."""
    work = tmp_path / "work"
    work.mkdir()
    done = datencoder("personalize", "--image", str(toy_photo), "--prompt", "S* on a beach", "--tuning-steps", "2",
                      "--num-inference-steps", "4", "--json", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["model"] == str(ROOT / "models" / "toy-encoder")
    [image] = report["images"]
    assert Path(image["path"]).parent == Path("outputs/personalize") and (work / image["path"]).is_file()
    assert not (work / "mlflow.db").exists()


def test_reading_commands_work_from_the_root_directory(tmp_path):
    """`cd /; datencoder targets` reads the committed base's structure, as in the checkout."""
    here = datencoder("targets", "--base", "toy", "--json", cwd=ROOT)
    there = datencoder("targets", "--base", "toy", "--json", cwd=Path("/"))
    assert here.returncode == there.returncode == 0, there.stderr[-3000:]
    assert json.loads(there.stdout) == json.loads(here.stdout)

    grid = tmp_path / "grid.png"
    check = datencoder("check-base", "--preset", "smoke", "--grid", str(grid), "--json", cwd=Path("/"))
    assert check.returncode == 0, check.stderr[-3000:]
    assert grid.is_file() and "shape" in json.dumps(json.loads(check.stdout))


def test_a_home_without_the_models_is_named_in_the_error(tmp_path, toy_photo):
    done = datencoder("personalize", "--image", str(toy_photo), "--prompt", "S* on a beach", "--json", cwd=tmp_path,
                      env={"DATENCODER_HOME": str(tmp_path / "empty")})
    assert done.returncode == 2
    error = json.loads(done.stdout)["error"]
    assert error.startswith(f"the toy base model not found at {tmp_path / 'empty' / 'models' / 'toy-base'}")
    assert "DATENCODER_HOME" in error
    assert done.stderr.strip().splitlines()[-1] == f"datencoder personalize: error: {error}"


# --- errors a user can act on --------------------------------------------------------------------------
def test_no_prefix_matching_and_a_misspelt_option_is_named(capsys, toy_photo):
    common = ["personalize", "--image", str(toy_photo)]
    line = error_of(capsys, _exit_code(common + ["--prompt", "S*", "--num-image", "2", "--json"]), as_json=True)
    assert "unrecognized arguments: --num-image 2" in line and "--num-image -> --num-images" in line
    line = error_of(capsys, _exit_code(common + ["--promt", "S* on a beach"]))
    assert line.startswith("datencoder personalize: error: unrecognized arguments: --promt")
    assert "--promt -> --prompt" in line
    line = error_of(capsys, _exit_code(["personalise", "--json"]), as_json=True)
    assert line.startswith("datencoder: error: argument COMMAND: invalid choice: 'personalise'")


def _exit_code(argv: list[str]) -> int:
    """main()'s exit code; argparse errors leave through SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


REQUIRED = {"personalize": ["--image", "x.png", "--prompt", "S*"],
            "baseline": ["ti", "--image", "x.png", "--prompt", "S*"]}


def test_every_command_reports_a_user_error_as_json_with_exit_2(capsys, tmp_path):
    from components.cli import build_parser

    commands = build_parser().commands
    missing = str(tmp_path / "missing.yaml")
    for command in commands:
        code = _exit_code([command, *REQUIRED.get(command, []), "--config", missing, "--json"])
        line = error_of(capsys, code, as_json=True)
        assert line == f"datencoder {command}: error: cannot read config {missing}: No such file or directory", line


def test_photos_and_prompts_are_checked_before_any_model_loads(capsys, tmp_path, toy_photo):
    """A non-image names its file and a bad prompt is refused, where loading a model would have failed first."""
    junk = tmp_path / "notes.png"
    junk.write_text("not a picture")
    # sd15 has no weights here: an image error first means no model was loaded
    line = error_of(capsys, main(["personalize", "--preset", "sd15", "--image", str(toy_photo), "--image", str(junk),
                                  "--prompt", "S* on a beach", "--json"]), as_json=True)
    assert line == (f"datencoder personalize: error: {junk}: the image bytes are not an image in a format we read "
                    f"(PNG, JPEG, WebP, ...)")
    # an encoder directory whose weights would fail to load: the prompt is refused before
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text("{}")
    line = error_of(capsys, main(["personalize", "--model", str(encoder), "--image", str(toy_photo),
                                  "--prompt", "a red star on a beach"]))
    assert "has no placeholder S*" in line
    line = error_of(capsys, main(["personalize", "--model", str(encoder), "--image", str(toy_photo),
                                  "--prompt", "S*", "--num-images", "17"]))
    assert line.endswith("num_images must be between 1 and 16, got 17")


def test_sd15_without_weights_says_first_how_to_provide_them(capsys, tmp_path, toy_photo, monkeypatch):
    """personalize --preset sd15 on a machine without SD 1.5: the base's message, as check-base gives it,
    not the missing encoder."""
    monkeypatch.chdir(tmp_path)  # no MLflow store here: no registered champion
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    line = error_of(capsys, main(["personalize", "--preset", "sd15", "--image", str(toy_photo), "--prompt", "S*"]))
    check_base = error_of(capsys, main(["check-base", "--preset", "sd15"]))
    message = line.removeprefix("datencoder personalize: error: ")
    assert message == check_base.removeprefix("datencoder check-base: error: ")
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message and "base.pretrained" in message

    # with the base there and no encoder: the encoder's path is named
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"personalize": {"encoder": "no/encoder"}}))
    line = error_of(capsys, main(["personalize", "--config", "c.yaml", "--image", str(toy_photo), "--prompt", "S*"]))
    assert "no/encoder does not exist" in line and "run the pipeline first" in line


def test_renamed_options_still_work_with_one_line_naming_the_new_one(capsys, tmp_path):
    missing = str(tmp_path / "missing.yaml")  # the config is read after parsing: each command stops there
    for argv, old, new in ((["baseline", "ti", "--image", "x.png", "--prompt", "S*", "--steps", "5"], "--steps",
                            "--max-train-steps"),
                           (["prepare", "--workers", "2"], "--workers", "--threads")):
        assert _exit_code([*argv, "--config", missing]) == 2
        assert f"{old} is deprecated; use {new}" in capsys.readouterr().err
