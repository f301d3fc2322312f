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
