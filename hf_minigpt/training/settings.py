"""Settings: what a training script is told, as typed dataclasses, read once from the command line.

Each group of flags is a dataclass whose fields carry their help text; `parse` turns the command line into them
with transformers' `HfArgumentParser`, then checks them all at once, so that a run with three mistakes says all
three, in one line, before anything is loaded. A flag means the same thing in every script.

Every run saves its resolved settings (`RunFolder.settings`, by flag name); `--config FILE` starts from such a file,
and the flags given beside it override it.
"""

import argparse
import dataclasses
import difflib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser, SchedulerType

from ..cli import OneLineErrors
from ..folders import RunFolder, write_json
from .checkpoint import find_checkpoint, list_checkpoints


class SettingsParser(OneLineErrors, HfArgumentParser):
    pass


def setting(default=None, help: str = "", **argparse_options):
    """A field with its help text, and any other `add_argument` options (choices, metavar...). A `list[...]` field
    takes one or more values."""
    return field(default=default, metadata={"help": help, **argparse_options})


@dataclass
class RunSettings:
    """Where the run writes, how it saves and resumes."""

    _argument_group_name = "run"
    output_dir: str = field(metadata={"help": "Where the model, tokenizer, results and checkpoints go."})
    overwrite_output_dir: bool = setting(False, "Start over in a non-empty --output_dir.")
    seed: int = setting(42, "Seeds weights, data order, the validation split and dropout.")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = setting(help="Default: Accelerate's config.")
    torch_compile: bool = setting(False, "Train the `torch.compile`d model.")
    plain_kernels: bool = setting(False, "Train with nn.Linear's products even where hf_minigpt.cpu_kernels has "
                                  "faster ones for this CPU (on the CPU, in one process or data parallel; "
                                  "--torch_compile takes inductor's).")
    reuse_freed_memory: bool = setting(False, "On the CPU, large tensors reuse the memory freed before them "
                                       "(glibc 2.35 or newer): faster steps, a higher peak memory (docs/speed.md).")
    checkpointing_steps: str | None = setting(help="Save every N optimizer steps, or 'epoch'.")
    resume_from_checkpoint: str | None = setting(help="A checkpoint folder, or 'latest' in --output_dir.")
    save_total_limit: int = setting(2, "How many checkpoints to keep.")
    report_to: str = setting("none", "Accelerate trackers: 'all', 'tensorboard', 'wandb'...")

    def problems(self) -> list[str]:
        found = at_least_one(self, "save_total_limit")
        if self.checkpointing_steps not in (None, "epoch") and not (
                self.checkpointing_steps.isdigit() and int(self.checkpointing_steps) > 0):
            found.append(f"--checkpointing_steps takes a number of steps or 'epoch', not {self.checkpointing_steps!r}")
        if not (self.resume_from_checkpoint or self.overwrite_output_dir) and RunFolder(self.output_dir).holds_a_run():
            # Only advice that works: resuming needs a checkpoint.
            resume = "Continue it with --resume_from_checkpoint latest, s" if list_checkpoints(self.output_dir) else (
                "It has no checkpoint to continue from: s")
            found.append(f"{self.output_dir} already holds a run. {resume}tart over with --overwrite_output_dir, or "
                         "pick another --output_dir")
        try:
            self.checkpoint_to_resume  # looked up here, once
        except FileNotFoundError as missing:
            found.append(str(missing))
        return found

    @functools.cached_property
    def checkpoint_to_resume(self) -> Path | None:
        """The folder --resume_from_checkpoint names, looked up once: 'latest' is the newest when the run starts."""
        return find_checkpoint(self.output_dir, self.resume_from_checkpoint) if self.resume_from_checkpoint else None

    @property
    def checkpoint_every(self) -> int | None:
        return int(self.checkpointing_steps) if str(self.checkpointing_steps).isdigit() else None


@dataclass
class OptimizationSettings:
    """The optimizer, its schedule, and how long to train."""

    _argument_group_name = "optimization"
    per_device_train_batch_size: int = setting(8, "Training rows per process.")
    gradient_accumulation_steps: int = setting(1, "Batches per optimizer step.")
    learning_rate: float | None = setting(5e-5, "Peak learning rate of AdamW (minigpt-finetune's default: GPT-2's "
                                          "5e-5 at 124M parameters, scaled to the model's size).")
    weight_decay: float = setting(0.0, "Not applied to biases and LayerNorm weights.")
    max_grad_norm: float = setting(1.0, "Gradients are clipped to this norm (0: not clipped).")
    lr_scheduler_type: str = setting("linear", "Learning-rate schedule, one of: %(choices)s.",
                                     choices=[kind.value for kind in SchedulerType], metavar="SCHEDULE")
    num_warmup_steps: int = setting(0, "Steps of linear learning-rate warm-up.")
    num_train_epochs: int | None = setting(help="Passes over the training data (default: 3).")
    max_train_steps: int | None = setting(help="Overrides --num_train_epochs.")
    min_train_steps: int = setting(0, "Without --num_train_epochs or --max_train_steps, repeat a small dataset for "
                                   "at least this many optimizer steps.")

    def problems(self) -> list[str]:
        found = at_least_one(self, "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                             "max_train_steps")
        found += [f"--{name} must not be negative, got {getattr(self, name)}"
                  for name in ("num_warmup_steps", "min_train_steps", "weight_decay", "max_grad_norm")
                  if getattr(self, name) < 0]
        if self.learning_rate is not None and self.learning_rate <= 0:
            found.append(f"--learning_rate must be positive, got {self.learning_rate}")
        return found


@dataclass
class DataSettings:
    """The data files, and the validation set."""

    _argument_group_name = "data"
    train_file: list[str] | None = setting(help="Files (or globs), or a folder written by `save_to_disk`.")
    validation_file: list[str] | None = setting(help="Same formats as --train_file.")
    text_column: str = setting("text", "The column that holds the text, in json/jsonl/csv/tsv/parquet data.")
    validation_split_percentage: int = setting(
        5, "Without --validation_file: this percentage of the training examples, drawn at random (--seed), is held "
        "out for validation.")
    per_device_eval_batch_size: int = setting(8, "Evaluation rows per batch.")
    preprocessing_num_workers: int | None = setting(help="Processes for `datasets.map`.")

    def problems(self) -> list[str]:
        found = at_least_one(self, "per_device_eval_batch_size", "preprocessing_num_workers")
        if not 0 <= self.validation_split_percentage < 100:
            found.append(f"--validation_split_percentage must be in 0..99, got {self.validation_split_percentage}")
        if self.validation_file and not self.train_file:
            found.append("--validation_file needs a --train_file")
        return found


@dataclass
class HubSettings:
    """Pushing the finished model to a hub."""

    _argument_group_name = "hub"
    push_to_hub: bool = setting(False, "Push the output folder when training ends.")
    hub_model_id: str | None = setting(help="Repository to push to, e.g. your-name/minigpt-pydoc.")
    hub_token: str | None = setting(help="Default: HF_TOKEN, or the token saved by `hf auth login`.")
    hub_private_repo: bool = setting(False, "Create the repository as private.")

    def problems(self) -> list[str]:
        return ["--push_to_hub needs --hub_model_id (your-name/model-name)"] if (
            self.push_to_hub and not self.hub_model_id) else []


def at_least_one(settings, *names: str) -> list[str]:
    return [f"--{name} must be at least 1, got {getattr(settings, name)}" for name in names
            if getattr(settings, name) is not None and getattr(settings, name) < 1]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and shows every default that is set."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in action.help:
            return action.help
        return f"{action.help} (default: %(default)s)"


def parse(settings_class, prog: str, description: str, argv=None, defaults: dict | None = None, check=None):
    """`settings_class` (a dataclass whose fields are settings groups) from the command line `argv`. `defaults`
    overrides the groups' defaults for this script; `check(settings)` adds the script's own problems. Every problem
    is reported at once through `parser.error`: one line, exit status 2."""
    groups = {group.name: group.type for group in dataclasses.fields(settings_class)}
    parser = SettingsParser(list(groups.values()), prog=prog, description=description, formatter_class=HelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="Start from the settings a run saved (its settings.json); "
                        "the flags given beside it override them.")
    parser.set_defaults(**(defaults or {}))
    start_from_saved_settings(parser, argv)
    unknown = parser.parse_known_args(argv)[1]  # before the settings check themselves
    if unknown:
        parser.error(unknown_arguments(parser, unknown))
    parsed = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)[:len(groups)]
    settings = settings_class(**dict(zip(groups, parsed)))
    problems = [problem for group in parsed if hasattr(group, "problems") for problem in group.problems()]
    problems += check(settings) if check else []
    if problems:
        parser.error("; ".join(problems) + ".")
    return settings


# transformers Trainer's names for settings these scripts name otherwise, as users type them.
TRAINER_NAMES = {"save_steps": "checkpointing_steps", "save_strategy": "checkpointing_steps",
                 "max_steps": "max_train_steps", "warmup_steps": "num_warmup_steps", "bf16": "mixed_precision bf16",
                 "fp16": "mixed_precision fp16", "eval_strategy": "eval_steps", "lr_scheduler": "lr_scheduler_type"}


def unknown_arguments(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """What the command line holds that no setting takes, with the flag meant where one is near."""
    known = [option for action in parser._actions for option in action.option_strings]
    said = []
    for flag in (item.split("=", 1)[0] for item in unknown if item.startswith("-")):
        ours = TRAINER_NAMES.get(flag.lstrip("-"))
        if ours and f"--{ours.split()[0]}" in known:
            said.append(f"{flag} is the Trainer's name; {parser.prog} calls it --{ours}")
        elif near := difflib.get_close_matches(flag, known, n=1, cutoff=0.6):
            said.append(f"unknown flag {flag} (did you mean {near[0]}?)")
        else:
            said.append(f"unknown flag {flag}")
    return "; ".join(said) if said else f"unexpected arguments: {' '.join(unknown)}"


def start_from_saved_settings(parser: argparse.ArgumentParser, argv) -> None:
    """The settings in --config's file become the parser's defaults (required flags included), so that the flags on
    the command line override them."""
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config")
    path = config.parse_known_args(argv)[0].config
    if path is None:
        return
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        parser.error(f"--config {path}: not a settings file ({error})")
    unknown = sorted(saved.keys() - {action.dest for action in parser._actions})
    if unknown:
        parser.error(f"--config {path} holds settings {parser.prog} does not take: {', '.join(unknown)}")
    parser.set_defaults(**saved)
    for action in parser._actions:
        if action.dest in saved:
            action.required = False


def flags(settings) -> dict:
    """Every setting by flag name, for trackers and reports."""
    return {name: value for group in dataclasses.fields(settings)
            for name, value in dataclasses.asdict(getattr(settings, group.name)).items()}


NOT_SAVED = ("hub_token", "resume_from_checkpoint")


def save_settings(settings) -> None:
    """The run's resolved settings into its output folder, by flag name: what `--config` reads. Not the hub token (a
    secret), nor the checkpoint a resumed run started from (it is the same run)."""
    write_json(RunFolder(settings.run.output_dir).settings,
               {name: value for name, value in flags(settings).items() if name not in NOT_SAVED})
