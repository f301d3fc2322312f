"""`minigpt-eval`: lm-evaluation-harness's `lm_eval` command, with MiniGPT known to it. It takes lm_eval's arguments
and subcommands (`lm_eval run --help` lists the arguments); where neither --model nor --config names a model, it is
`minigpt`: lm-eval's `hf` model as MiniGPT and GPT-2 folders are read (hf_minigpt.evaluation). The folder loads
without remote code.

    minigpt-eval --model_args pretrained=runs/pydoc --tasks my_task --include_path my_tasks/ --device cpu
    minigpt-eval --model_args pretrained=runs/pydoc --tasks my_bits_per_byte --include_path my_tasks/
    minigpt-eval ls tasks --include_path my_tasks/

A task on your own text, multiple choice, generation or bits per byte: docs/evaluation.md.
"""

import argparse
import importlib.util
import sys

from .cli import ArgumentParser

SUBCOMMANDS = ("run", "ls", "validate")
CHOOSE_A_MODEL = ("--model", "-M", "--config", "-C")


def lm_eval_arguments(argv: list[str]) -> list[str]:
    """`argv` as lm_eval's parser takes it: a subcommand first (`run` where none is given, as lm_eval itself does),
    and `--model minigpt` where a run names no model."""
    if argv and argv[0] in SUBCOMMANDS[1:]:
        return argv
    arguments = argv[1:] if argv[:1] == ["run"] else argv
    if not any(argument.split("=", 1)[0] in CHOOSE_A_MODEL for argument in arguments):
        arguments = ["--model", "minigpt", *arguments]
    return ["run", *arguments]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(prog="minigpt-eval", description=__doc__, usage="%(prog)s [lm_eval's arguments]",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_known_args(argv)  # only --help is its own
    if importlib.util.find_spec("lm_eval") is None:
        parser.exit(2, "minigpt-eval: error: it runs lm-evaluation-harness: pip install 'hf_minigpt[eval]'\n")
    from lm_eval.__main__ import cli_evaluate

    from . import evaluation  # noqa: F401  (registers lm-eval's model `minigpt`)

    sys.argv = ["minigpt-eval", *lm_eval_arguments(argv)]
    try:
        cli_evaluate()
    except (ValueError, OSError) as error:  # no such task, folder or file: lm-eval raises, the command says it
        parser.exit(2, f"minigpt-eval: error: {str(error).strip().splitlines()[0]}\n")
