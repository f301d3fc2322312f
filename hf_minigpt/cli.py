"""What every `minigpt-*` command shares: usage mistakes said in one line, and no progress bars from transformers."""

import argparse


class OneLineErrors:
    """A usage mistake costs the error and where help is, not the whole usage before it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\nSee '{self.prog} --help'.\n")


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    pass


def quiet_loading() -> None:
    """No "Loading weights" or "Writing model shards" bars: a script says what it does in its own lines."""
    from transformers.utils import logging

    logging.disable_progress_bar()
