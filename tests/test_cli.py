"""What every command shares: --help at once, a usage mistake in one line and a pointer to --help, not the whole
usage."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import minigpt_commands

COMMANDS = {"minigpt-pretrain": "pretrain", "minigpt-finetune": "finetune", "minigpt-generate": "generate_cli",
            "minigpt-convert": "convert_cli", "minigpt-push": "hub", "minigpt-bench": "benchmark"}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_usage_mistake_is_one_line_and_where_help_is(command, capsys):
    main = importlib.import_module(f"hf_minigpt.{COMMANDS[command]}").main
    with pytest.raises(SystemExit) as exit_:
        main(["--no_such_flag"])
    assert exit_.value.code == 2
    error, see_help = capsys.readouterr().err.strip().splitlines()
    assert error.startswith(f"{command}: error: ")  # e.g. the arguments it requires, or the unknown flag
    assert see_help == f"See '{command} --help'."


@pytest.mark.parametrize("command, argv", [
    ("pretrain", ["--model_name_or_path", "runs/no-such", "--output_dir", "runs/out"]),
    ("finetune", ["--model_name_or_path", "runs/no-such", "--train_file", "t.csv", "--output_dir", "runs/out"]),
    ("generate_cli", ["runs/no-such"]),
    ("convert_cli", ["runs/no-such", "runs/out"]),
    ("hub", ["runs/no-such", "me/model", "--dry-run"]),
])
def test_a_missing_folder_is_said_at_once(command, argv, tmp_path, monkeypatch, capsys):
    (tmp_path / "runs").mkdir()  # a folder that exists, so "runs/no-such" is a local path mistyped, not a hub id
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(f"hf_minigpt.{command}").main
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = f"{exit_.value.code if isinstance(exit_.value.code, str) else ''}{capsys.readouterr().err}"
    assert "runs/no-such" in message and "no such folder" in message


@pytest.mark.parametrize("command", COMMANDS)
def test_the_saved_help_is_what_the_parser_prints(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # the saved text keeps its own width, whatever the terminal
    assert minigpt_commands.saved_help(command) == minigpt_commands.parser_help(command), (
        f"{command}'s flags changed: write the help texts again with `python -m minigpt_commands`")


def test_help_loads_neither_torch_nor_the_package():
    """The installed command, as a user runs it, with Python's import log on."""
    answer = subprocess.run([Path(sys.executable).with_name("minigpt-pretrain"), "--output_dir", "runs/x", "--help"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert answer.returncode == 0
    assert answer.stdout == minigpt_commands.saved_help("minigpt-pretrain")
    imported = {line.split("|")[-1].strip() for line in answer.stderr.splitlines() if line.startswith("import time")}
    assert "minigpt_commands" in imported and not {"torch", "transformers", "hf_minigpt"} & imported


def test_anything_but_help_runs_the_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        minigpt_commands.run("minigpt-convert", ["only-a-source", "--", "--help"])  # after "--", a file name
    assert exit_.value.code == 2 and "only-a-source: no such folder" in capsys.readouterr().err


REQUIRED = {"pretrain": [], "finetune": ["--model_name_or_path", "runs/model", "--train_file", "train.csv"]}


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_trainer_names_and_near_misses_point_to_the_flag_meant(command, capsys):
    main = importlib.import_module(f"hf_minigpt.{command}").main
    for argv, said in ((["--save_steps", "10"], "--save_steps is the Trainer's name; "
                                                f"minigpt-{command} calls it --checkpointing_steps"),
                       (["--learning_rte", "3e-4"], "unknown flag --learning_rte (did you mean --learning_rate?)")):
        with pytest.raises(SystemExit) as exit_:
            main(["--output_dir", "runs/out", *REQUIRED[command], *argv])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.splitlines()[0] == f"minigpt-{command}: error: {said}"


def test_a_hub_id_in_the_local_cache_works_offline(tmp_path, model, tokenizer):
    """As compute nodes without internet run: HF_HUB_OFFLINE=1 and the model in the hub cache (laid out by hand here
    as huggingface_hub lays it); a hub id that is not cached is said to be neither here nor cached."""
    snapshot = tmp_path / "hub" / "models--me--tiny" / "snapshots" / ("0" * 40)
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    generate = Path(sys.executable).with_name("minigpt-generate")
    cached = subprocess.run([generate, "me/tiny", "--prompt", "the cat", "--greedy", "--max_new_tokens", "3"],
                            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert cached.returncode == 0, cached.stderr[-2000:]
    assert cached.stdout.startswith("the cat")
    missing = subprocess.run([generate, "me/other"], capture_output=True, text=True, timeout=120, env=env,
                             cwd=tmp_path)
    assert missing.returncode == 2
    assert "me/other: no such folder here, nor in the local cache of hub models" in missing.stderr
