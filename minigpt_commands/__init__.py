"""The `minigpt-*` commands' entry points, outside `hf_minigpt` so that `--help` costs no torch import.

Importing `hf_minigpt` registers MiniGPT with transformers' Auto classes, which loads torch and transformers' model
code: seconds before a single line of help. So `--help` is answered from the text each command's own parser wrote
(`python -m minigpt_commands` writes it again; tests/test_cli.py checks that the two are equal), and anything else
runs the command in `hf_minigpt`.
"""

import contextlib
import functools
import importlib
import io
import os
import sys
from pathlib import Path

COMMANDS = {
    "minigpt-pretrain": "hf_minigpt.pretrain",
    "minigpt-finetune": "hf_minigpt.finetune",
    "minigpt-generate": "hf_minigpt.generate_cli",
    "minigpt-convert": "hf_minigpt.convert_cli",
    "minigpt-push": "hf_minigpt.hub",
    "minigpt-bench": "hf_minigpt.benchmark",
    "minigpt-eval": "hf_minigpt.eval_cli",
}
HELP = Path(__file__).with_name("help")
HELP_COLUMNS = 100


def asks_for_help(argv: list[str]) -> bool:
    before_end_of_options = argv[:argv.index("--")] if "--" in argv else argv
    return any(argument in ("-h", "--help") for argument in before_end_of_options)


def run(command: str, argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if asks_for_help(argv):
        print(saved_help(command), end="")
        return None
    return importlib.import_module(COMMANDS[command]).main(argv)


def saved_help(command: str) -> str:
    return (HELP / f"{command}.txt").read_text()


def parser_help(command: str) -> str:
    """What the command's parser prints for --help, at the width the saved text has."""
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_COLUMNS)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed, contextlib.suppress(SystemExit):
            importlib.import_module(COMMANDS[command]).main(["--help"])
    finally:
        if columns is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = columns
    return printed.getvalue()


def write_help() -> None:
    for command in COMMANDS:
        (HELP / f"{command}.txt").write_text(parser_help(command))


pretrain = functools.partial(run, "minigpt-pretrain")
finetune = functools.partial(run, "minigpt-finetune")
generate = functools.partial(run, "minigpt-generate")
convert = functools.partial(run, "minigpt-convert")
push = functools.partial(run, "minigpt-push")
bench = functools.partial(run, "minigpt-bench")
evaluate = functools.partial(run, "minigpt-eval")
