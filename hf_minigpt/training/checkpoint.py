"""Checkpoints: `step_N` folders in the output folder, written whole (`folders.atomic_folder`), that resume a run
with any number of processes."""

import dataclasses
import json
import math
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

from ..folders import RunFolder, atomic_folder, save_model_folder
from .processes import sharded

STATE_FILE = RunFolder.CHECKPOINT_STATE
WEIGHTS_AND_OPTIMIZER = "model_and_optimizer"  # torch.distributed.checkpoint's folder in a checkpoint


def save_trained_model(destination, model, tokenizer, accelerator, existing: str) -> None:
    """`folders.save_model_folder` for a model that DDP, torch.compile or FSDP2 may wrap: its full weights, gathered
    (every process must call this), saved by the model's own class."""
    model, state_dict = gathered_model(model, accelerator)
    save_model_folder(destination, model, tokenizer, state_dict=state_dict, accelerator=accelerator,
                      existing=existing)


def gathered_model(model, accelerator):
    """The model as its own class and its full weights, gathered (every process must call this; the weights are the
    main process's).

    FSDP2 makes a sharded `MiniGPTForCausalLM` an `FSDPMiniGPTForCausalLM`, which `save_pretrained` would write into
    the config's `auto_map`, copying torch's source instead of the model's: an empty shell of the model's class (on
    the meta device) saves the gathered weights instead."""
    state_dict = accelerator.get_state_dict(model)
    if state_dict is not None:
        state_dict = {name.removeprefix("_orig_mod."): tensor for name, tensor in state_dict.items()}
    model = accelerator.unwrap_model(model, keep_torch_compile=False)
    if not isinstance(model, FSDPModule):
        return model, state_dict
    model_class = next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))
    with torch.device("meta"):
        shell = model_class(model.config)
    if model.can_generate():
        shell.generation_config = model.generation_config
    return shell, state_dict


def load_whole_weights(model, weights: dict) -> None:
    """Whole weights into a model that may be sharded (FSDP2), where `load_state_dict` would not do."""
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


def list_checkpoints(output_dir) -> list[Path]:
    return RunFolder(output_dir).checkpoints()


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
class Layout:
    """How the global batch is split; a resumed run may split it otherwise."""

    num_processes: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int

    @property
    def global_batch(self) -> int:
        return math.prod(dataclasses.astuple(self))


@dataclass
class TrainingState:
    """Where a run stands, beside the prepared objects' own state: what a checkpoint's `training_state.json` holds,
    this dataclass being its schema. The log itself is a file in the output folder (`report.Log`)."""

    geometry: dict  # what a resumed run must not change: the block size (or max length), the seed, the global batch
    layout: Layout
    completed_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this process has read in the current epoch
    loss_sum: float = 0.0  # of the logged losses, for the mean training loss
    extra: dict = field(default_factory=dict)  # the script's own, e.g. fine-tuning's best epoch so far

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainingState":
        saved = json.loads(text)
        return cls(**{**saved, "layout": Layout(**saved["layout"])})


@dataclass
class Prepared:
    """What `accelerator.prepare` returned, and a checkpoint saves and restores."""

    model: Any
    optimizer: Any
    scheduler: Any
    loaders: list


def save_checkpoint(accelerator, output_dir, state: TrainingState, keep: int, prepared, tokenizer) -> Path:
    """`step_N`: the weights and optimizer state in `torch.distributed.checkpoint`'s format (one file per process
    for a sharded model), Accelerate's files for the scheduler, the sampler and every process's RNG, the model's
    config and the tokenizer (a resumed run rebuilds both from them) and `state`; then all but the last `keep`
    checkpoints are dropped. `prepared` holds the prepared model, optimizer, scheduler and loaders."""
    folder = RunFolder(output_dir).checkpoint(state.completed_steps)
    with atomic_folder(folder, "replace", accelerator) as scratch:
        save_weights_and_optimizer(accelerator, scratch / WEIGHTS_AND_OPTIMIZER, prepared.model, prepared.optimizer)
        save_accelerator_state(str(scratch), [], [], [prepared.scheduler], prepared.loaders,
                               accelerator.process_index, accelerator.step, accelerator.scaler)
        if accelerator.is_main_process:
            accelerator.unwrap_model(prepared.model).config.save_pretrained(scratch)
            tokenizer.save_pretrained(scratch)
            (scratch / STATE_FILE).write_text(state.to_json())
    if accelerator.is_main_process:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    return folder


def load_checkpoint(accelerator, checkpoint: Path, prepared) -> TrainingState:
    """The prepared objects' state from `checkpoint`, whatever number of processes wrote it (a sharded checkpoint
    is resharded as it is read), and the checkpoint's `state`. A process with no RNG file of its own (the checkpoint
    had fewer processes) keeps its seeded RNG."""
    load_weights_and_optimizer(accelerator, checkpoint / WEIGHTS_AND_OPTIMIZER, prepared.model, prepared.optimizer)
    load_accelerator_state(str(checkpoint), [], [], [prepared.scheduler], prepared.loaders,
                           accelerator.process_index, accelerator.scaler)
    return TrainingState.from_json((checkpoint / STATE_FILE).read_text())


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
