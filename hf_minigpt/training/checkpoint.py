"""Every folder that holds a model is written here, whole or not at all: training checkpoints, the final and the
best model, conversions and exports, the folder assembled for a hub.

A folder is written into a scratch folder beside it, then renamed into place; a run killed half-way leaves only the
scratch folder, which the next write removes. Several processes can write into one folder (Accelerate's state files
are per process), so the scratch folder's name is known to all of them.
"""

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

STATE_FILE = "training_state.json"


def with_default_permissions(folder) -> None:
    """Give `folder` and its files the modes a plain `mkdir` and `open` would (the umask's), not the private ones of
    a scratch folder or of transformers' own temporary weights file (0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in Path(folder).rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


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
        for file in sorted(scratch.iterdir(), key=lambda path: path.name == "config.json"):
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


def save_model(folder, model, tokenizer=None, accelerator=None) -> None:
    """`save_pretrained` of the model (weights, config with `auto_map` and source, generation config) and of the
    tokenizer, into a folder being written. With an `accelerator`, the model may be wrapped by DDP, torch.compile,
    FSDP or DeepSpeed, whose full weights exist only once gathered: every process must call this."""
    if accelerator is None:
        model.save_pretrained(folder)
    else:
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            state_dict = {name.removeprefix("_orig_mod."): tensor for name, tensor in state_dict.items()}
            accelerator.unwrap_model(model, keep_torch_compile=False).save_pretrained(folder, state_dict=state_dict)
    if tokenizer is not None and (accelerator is None or accelerator.is_main_process):
        tokenizer.save_pretrained(folder)


def save_model_folder(destination, model, tokenizer=None, *, accelerator=None,
                      existing: Literal["refuse", "replace", "merge"] = "refuse"):
    """A model folder, written whole: the one way every script writes a model."""
    with atomic_folder(destination, existing, accelerator) as scratch:
        save_model(scratch, model, tokenizer, accelerator)
    return Path(destination)


# ---------------------------------------------------------------------------------------------------------------------
# Training checkpoints: `step_N` folders in the output folder.


def list_checkpoints(output_dir) -> list[Path]:
    found = [path for path in Path(output_dir).glob("step_*") if re.fullmatch(r"step_\d+", path.name)]
    return sorted((path for path in found if (path / STATE_FILE).exists()), key=lambda path: int(path.name[5:]))


def find_checkpoint(output_dir: str, spec: str) -> Path:
    """The checkpoint `--resume_from_checkpoint spec` names; FileNotFoundError says what is wrong with it."""
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: {output_dir} holds no checkpoint")
        return checkpoints[-1]
    if not Path(spec, STATE_FILE).exists():
        raise FileNotFoundError(f"--resume_from_checkpoint {spec}: not a checkpoint folder (it has no {STATE_FILE})")
    return Path(spec)


def save_checkpoint(accelerator, output_dir, state: dict, keep: int, model, tokenizer) -> Path:
    """`step_N`: Accelerate's state (weights, optimizer, scheduler, RNG of every process), the model's config and
    the tokenizer (a resumed run rebuilds both from it) and `state`; then all but the last `keep` are dropped."""
    folder = Path(output_dir, f"step_{state['completed_steps']}")
    with atomic_folder(folder, "replace", accelerator) as scratch:
        accelerator.save_state(str(scratch))
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).config.save_pretrained(scratch)
            tokenizer.save_pretrained(scratch)
            (scratch / STATE_FILE).write_text(json.dumps(state, indent=2))
    if accelerator.is_main_process:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    return folder


def load_checkpoint(accelerator, checkpoint: Path) -> dict:
    accelerator.load_state(str(checkpoint))
    return json.loads((checkpoint / STATE_FILE).read_text())
