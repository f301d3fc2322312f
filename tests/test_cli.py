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
