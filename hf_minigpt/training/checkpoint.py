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
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed.checkpoint as dcp
from accelerate.checkpointing import load_accelerator_state, save_accelerator_state
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from .processes import sharded

STATE_FILE = "training_state.json"
WEIGHTS_AND_OPTIMIZER = "model_and_optimizer"  # torch.distributed.checkpoint's folder in a checkpoint


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
    or FSDP2, whose full weights exist only once gathered: every process must call this."""
    if accelerator is None:
        model.save_pretrained(folder)
    else:
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            state_dict = {name.removeprefix("_orig_mod."): tensor for name, tensor in state_dict.items()}
            unsharded(accelerator.unwrap_model(model, keep_torch_compile=False)).save_pretrained(
                folder, state_dict=state_dict)
    if tokenizer is not None and (accelerator is None or accelerator.is_main_process):
        tokenizer.save_pretrained(folder)


def unsharded(model):
    """`model` as its own class. FSDP2 makes a sharded `MiniGPTForCausalLM` an `FSDPMiniGPTForCausalLM`, which
    `save_pretrained` would write into the config's `auto_map`, copying torch's source instead of the model's: an
    empty shell of the model's class (on the meta device) saves the gathered weights instead."""
    if not isinstance(model, FSDPModule):
        return model
    model_class = next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))
    with torch.device("meta"):
        shell = model_class(model.config)
    if model.can_generate():
        shell.generation_config = model.generation_config
    return shell


def load_whole_weights(model, weights: dict) -> None:
    """Whole weights into a model that may be sharded (FSDP2), where `load_state_dict` would not do."""
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


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
        spec = str(checkpoints[-1])
    if not Path(spec, STATE_FILE).exists():
        raise FileNotFoundError(f"--resume_from_checkpoint {spec}: not a checkpoint folder (it has no {STATE_FILE})")
    checkpoint = Path(spec)
    if not (checkpoint / WEIGHTS_AND_OPTIMIZER).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {spec}: written by an earlier hf_minigpt (it has no "
                                f"{WEIGHTS_AND_OPTIMIZER}/); resume it with that version")
    return checkpoint


@dataclass
class Prepared:
    """What `accelerator.prepare` returned, and a checkpoint saves and restores."""

    model: Any
    optimizer: Any
    scheduler: Any
    loaders: list


def save_checkpoint(accelerator, output_dir, state: dict, keep: int, prepared, tokenizer) -> Path:
    """`step_N`: the weights and optimizer state in `torch.distributed.checkpoint`'s format (one file per process
    for a sharded model), Accelerate's files for the scheduler, the sampler and every process's RNG, the model's
    config and the tokenizer (a resumed run rebuilds both from them) and `state`; then all but the last `keep`
    checkpoints are dropped. `prepared` holds the prepared model, optimizer, scheduler and loaders."""
    folder = Path(output_dir, f"step_{state['completed_steps']}")
    with atomic_folder(folder, "replace", accelerator) as scratch:
        save_weights_and_optimizer(accelerator, scratch / WEIGHTS_AND_OPTIMIZER, prepared.model, prepared.optimizer)
        save_accelerator_state(str(scratch), [], [], [prepared.scheduler], prepared.loaders,
                               accelerator.process_index, accelerator.step, accelerator.scaler)
        if accelerator.is_main_process:
            accelerator.unwrap_model(prepared.model).config.save_pretrained(scratch)
            tokenizer.save_pretrained(scratch)
            (scratch / STATE_FILE).write_text(json.dumps(state, indent=2))
    if accelerator.is_main_process:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    return folder


def load_checkpoint(accelerator, checkpoint: Path, prepared) -> dict:
    """The prepared objects' state from `checkpoint`, whatever number of processes wrote it (a sharded checkpoint
    is resharded as it is read), and the checkpoint's `state`. A process with no RNG file of its own (the checkpoint
    had fewer processes) keeps its seeded RNG."""
    load_weights_and_optimizer(accelerator, checkpoint / WEIGHTS_AND_OPTIMIZER, prepared.model, prepared.optimizer)
    load_accelerator_state(str(checkpoint), [], [], [prepared.scheduler], prepared.loaders,
                           accelerator.process_index, accelerator.scaler)
    return json.loads((checkpoint / STATE_FILE).read_text())


def model_and_optimizer_state(accelerator, model, optimizer) -> dict:
    """Both state dicts, keyed by parameter name whatever wraps the model (DDP, FSDP2, torch.compile)."""
    weights, moments = get_state_dict(accelerator.unwrap_model(model), optimizer)
    return {"model": weights, "optimizer": moments}


@contextmanager
def alone():
    """torch.distributed.checkpoint warns that it assumes a single process, which is what `no_dist` asks for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_weights_and_optimizer(accelerator, folder: Path, model, optimizer) -> None:
    state = model_and_optimizer_state(accelerator, model, optimizer)
    if sharded(accelerator):  # every process writes its own shards
        dcp.save(state, checkpoint_id=folder)
    elif accelerator.is_main_process:  # every process holds the same: one writes it
        with alone():
            dcp.save(state, checkpoint_id=folder, no_dist=True)


def load_weights_and_optimizer(accelerator, folder: Path, model, optimizer) -> None:
    state = model_and_optimizer_state(accelerator, model, optimizer)
    if sharded(accelerator):
        dcp.load(state, checkpoint_id=folder)
    else:
        with alone():
            dcp.load(state, checkpoint_id=folder, no_dist=True)
    set_state_dict(accelerator.unwrap_model(model), optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
