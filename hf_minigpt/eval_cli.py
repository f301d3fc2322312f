"""`minigpt-eval`: lm-evaluation-harness's `lm_eval` command, with MiniGPT known to it. It takes lm_eval's arguments
(`lm_eval run --help` lists them); --model defaults to `minigpt`, lm-eval's `hf` model as MiniGPT and GPT-2 folders
are read (hf_minigpt.evaluation), and the folder loads without remote code.

    minigpt-eval --model_args pretrained=runs/pydoc --tasks my_task --include_path my_tasks/ --device cpu
    minigpt-eval --model_args pretrained=runs/pydoc --tasks text_bits_per_byte --include_path my_tasks/

A task on your own text, multiple choice, generation or bits per byte: docs/evaluation.md.
"""

import argparse
import importlib.util
import sys

from .cli import ArgumentParser


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(prog="minigpt-eval", description=__doc__, usage="%(prog)s [lm_eval's arguments]",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_known_args(argv)  # only --help is its own
    if importlib.util.find_spec("lm_eval") is None:
        parser.exit(2, "minigpt-eval: error: it runs lm-evaluation-harness: pip install 'hf_minigpt[eval]'\n")
    from lm_eval.__main__ import cli_evaluate

    from . import evaluation  # noqa: F401  (registers lm-eval's model `minigpt`)

    if not any(argument == "--model" or argument.startswith("--model=") for argument in argv):
        argv = ["--model", "minigpt", *argv]
    sys.argv = ["minigpt-eval", *argv]
    cli_evaluate()
