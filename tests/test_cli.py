"""What every command shares: a usage mistake is one line and a pointer to --help, not the whole usage."""

import importlib

import pytest

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
