"""Folders and files on disk: every one is written whole or not at all, and a run's output folder names its files.

A folder (a model, a checkpoint, an export, what a hub receives) is written into a scratch folder beside it, then
renamed into place; a file likewise. A process killed half-way leaves only the scratch, which the next write
removes. Several processes can write into one folder (Accelerate's state files are per process), so the scratch
folder's name is known to all of them.
"""

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

CONFIG = "config.json"  # transformers' name; a folder that has it holds a whole model


class RunFolder:
    """What a training run writes into its --output_dir, by name. Beside the model and tokenizer (transformers' own
    files): checkpoints, the best model, the log, results, loss curve, card, predictions and the settings."""

    CHECKPOINT = re.compile(r"step_(\d+)")
    CHECKPOINT_STATE = "training_state.json"  # in each checkpoint; a folder without it is not one
    # What a hub receives besides the model and tokenizer.
    PUBLISHED = ("README.md", "*.png", "all_results.json", "log_history.jsonl", "predictions.csv")

    def __init__(self, output_dir):
        self.path = Path(output_dir)

    def checkpoint(self, step: int) -> Path:
        return self.path / f"step_{step}"

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        found = {int(match[1]): path for path in self.path.glob("step_*")
                 if (match := self.CHECKPOINT.fullmatch(path.name)) and (path / self.CHECKPOINT_STATE).exists()}
        return [found[step] for step in sorted(found)]

    def holds_a_run(self) -> bool:
        return (self.path / CONFIG).exists() or any(self.path.glob("step_*"))

    @staticmethod
    def step_of(checkpoint: Path) -> int | None:
        match = RunFolder.CHECKPOINT.fullmatch(Path(checkpoint).name)
        return int(match[1]) if match else None

    @property
    def best_model(self) -> Path:
        return self.path / "best_model"

    @property
    def log(self) -> Path:
        return self.path / "log_history.jsonl"

    @property
    def results(self) -> Path:
        return self.path / "all_results.json"

    @property
    def loss_curve(self) -> Path:
        return self.path / "loss.png"

    @property
    def card(self) -> Path:
        return self.path / "README.md"

    @property
    def predictions(self) -> Path:
        return self.path / "predictions.csv"

    @property
    def confusion_matrix(self) -> Path:
        return self.path / "confusion_matrix.png"

    @property
    def settings(self) -> Path:
        return self.path / "settings.json"


def with_default_permissions(path) -> None:
    """Give `path` (and what a folder holds) the modes a plain `mkdir` and `open` would (the umask's), not the
    private ones of a scratch folder or of transformers' own temporary weights file (0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for item in (Path(path), *(Path(path).rglob("*") if Path(path).is_dir() else ())):
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_file(destination, replace: bool = True):
    """Yield a scratch path that becomes `destination` only if the block succeeds. Without `replace`, an existing
    `destination` is refused before anything is written. Each process has its own scratch name, so that processes
    writing the same file never write into one scratch file."""
    destination = Path(destination)
    if not replace and destination.exists():
        raise FileExistsError(f"{destination} exists; choose a new file name (nothing was written).")
    scratch = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
    try:
        yield scratch
        with_default_permissions(scratch)
        os.replace(scratch, destination)
    finally:
        scratch.unlink(missing_ok=True)


def write_json(path, data) -> None:
    """`data` as indented JSON, written whole."""
    with atomic_file(path) as scratch:
        scratch.write_text(json.dumps(data, indent=2) + "\n")


@contextmanager
def atomic_folder(destination, existing: Literal["refuse", "replace", "merge"] = "refuse", accelerator=None):
    """Yield a scratch folder that becomes `destination` only if the block succeeds. An existing non-empty
    `destination` is refused, replaced once the new folder is complete, or has the new files moved into it (the
    config last, so that a folder with a `config.json` always holds a whole model). With an `accelerator`, every
    process writes into the same scratch folder and the main process moves it into place."""
    destination = Path(destination)
    main = accelerator is None or accelerator.is_main_process
    scratch = destination.with_name(f".{destination.name}.partial")
    if main:
        if existing == "refuse" and destination.exists() and any(destination.iterdir()):
            raise FileExistsError(f"{destination} exists and is not empty; choose a new folder (nothing was written).")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    try:
        yield scratch
        if accelerator is not None:
            accelerator.wait_for_everyone()
        if main:
            with_default_permissions(scratch)
            publish(scratch, destination, merge=existing == "merge")
    finally:
        if main:
            shutil.rmtree(scratch, ignore_errors=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()


def publish(scratch: Path, destination: Path, merge: bool) -> None:
    if merge and destination.is_dir():
        for file in sorted(scratch.iterdir(), key=lambda path: path.name == CONFIG):
            if (destination / file.name).is_dir():
                shutil.rmtree(destination / file.name)
            os.replace(file, destination / file.name)
        return
    previous = destination.with_name(f".{destination.name}.previous")
    if destination.exists():
        shutil.rmtree(previous, ignore_errors=True)
        destination.rename(previous)
    scratch.rename(destination)
    shutil.rmtree(previous, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# Model folders


def save_model_folder(destination, model, tokenizer=None, *, state_dict=None, accelerator=None,
                      existing: Literal["refuse", "replace", "merge"] = "refuse"):
    """A model folder, written whole: the one way every command writes a model (`save_pretrained`: weights, config
    with `auto_map` and source, generation config; and the tokenizer). With an `accelerator`, every process calls
    this and the main one writes `state_dict`, gathered by `training.checkpoint.gathered_model`."""
    with atomic_folder(destination, existing, accelerator) as scratch:
        if accelerator is None or accelerator.is_main_process:
            model.save_pretrained(scratch, state_dict=state_dict)
            if tokenizer is not None:
                tokenizer.save_pretrained(scratch)
    return Path(destination)


def model_source_problem(name: str | None, flag: str) -> str | None:
    """What is wrong with a model folder or hub id, said at once rather than after a minute of retries. A hub id
    in the local cache needs no network, as in `from_pretrained`; offline (HF_HUB_OFFLINE=1), only the cache is
    asked."""
    if not name:
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / CONFIG).is_file() and not (path / "tokenizer_config.json").is_file():
            return f"{flag} {name} is a folder but holds no model (no {CONFIG})"
        return None
    if path.exists():
        return f"{flag} {name} is a file; give the folder that holds the model"
    first = Path(name).parts[0] if Path(name).parts else name
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(first).is_dir():
        return f"{flag} {name}: no such folder"
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(name, CONFIG), str):
            return None
    except HFValidationError:
        return f"{flag} {name}: no such folder here, and not a hub id"
    if constants.HF_HUB_OFFLINE:
        return f"{flag} {name}: no such folder here, nor in the local cache of hub models (HF_HUB_OFFLINE is set)"
    try:
        model_info(name, timeout=10)
    except (RepositoryNotFoundError, HFValidationError):
        return f"{flag} {name}: no such folder here, and no such model on the hub"
    except Exception as error:  # DNS, timeouts, proxies: one line that says so
        return f"{flag} {name}: no such folder here, and the hub could not give it ({error})"
    return None
