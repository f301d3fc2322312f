"""The processes of a run: the Accelerator, checked against how it was launched, FSDP2 on CPU processes too, and
one line, not a gloo traceback, when a process of the run is lost.

`accelerate launch` (or `torchrun`) starts the processes; each builds one `Accelerator` here. Launches that would go
wrong silently are mended or refused: processes started with no GPU and no `ACCELERATE_USE_CPU` (Accelerate would
run each as a job of its own, all writing into one folder) are told to use the CPU; an FSDP config on CPU processes
(which Accelerate would run as plain DDP) gets Accelerate's own FSDP2 path, the one GPU runs take: gloo, and
`fully_shard` on each `MiniGPTBlock`, then on the model; a DeepSpeed config is refused.
"""

import os
import socket

import torch
from accelerate import Accelerator, DataLoaderConfiguration, FullyShardedDataParallelPlugin
from accelerate.state import PartialState
from accelerate.utils import DistributedType


class LaunchError(RuntimeError):
    """The processes that were started do not form one run."""


def launched_processes() -> int:
    """How many processes the launcher started (torchrun and `accelerate launch` say so in WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_accelerator(settings) -> Accelerator:
    """The Accelerator for `settings`; LaunchError when the launched processes would not train as one run."""
    run, processes = settings.run, launched_processes()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise LaunchError(
            "DeepSpeed is not supported: checkpoints are torch.distributed.checkpoint's, which cannot hold ZeRO's "
            "optimizer state (and Accelerate starts DeepSpeed only on GPUs). FSDP2 shards the same way: "
            "scripts/accelerate/fsdp.yaml on GPUs, fsdp_cpu.yaml on CPU processes."
        )
    # Several processes and no GPU: they must talk through gloo. Without this, a launch whose config says
    # `use_cpu: true` (torchrun passes no ACCELERATE_USE_CPU) starts N single-process runs.
    on_cpu = processes > 1 and torch.accelerator.current_accelerator() is None
    accelerator = Accelerator(
        cpu=on_cpu,
        gradient_accumulation_steps=settings.optimization.gradient_accumulation_steps,
        mixed_precision=run.mixed_precision,
        log_with=None if run.report_to == "none" else run.report_to,
        project_dir=run.output_dir,
        # Shuffling from a seed of its own makes every process, and a resumed run, draw the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        dynamo_backend="inductor" if run.torch_compile else None,
    )
    if accelerator.num_processes != processes:
        raise LaunchError(
            f"{processes} processes were launched, but each runs alone (Accelerate sees {accelerator.num_processes}): "
            "they would all write into one --output_dir. Start them with `accelerate launch` or `torchrun`, which "
            "give each its rank."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and (
            accelerator.distributed_type == DistributedType.MULTI_CPU):
        shard_on_cpu(accelerator)
    return accelerator


def shard_on_cpu(accelerator: Accelerator) -> None:
    """Turn on Accelerate's FSDP2 for CPU processes, which it otherwise leaves as DDP: `prepare` then shards the
    model with `fully_shard`, and `get_state_dict` gathers the whole model. Accelerate keeps the distributed type in
    two shared states (read in accelerate 1.16), hence two assignments."""
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables, as Accelerate reads them
    if plugin.fsdp_version != 2:
        raise LaunchError("FSDP on CPU processes needs FSDP2: set fsdp_version: 2 in the Accelerate config.")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP


def sharded(accelerator: Accelerator) -> bool:
    """Each process holds a part of the model (FSDP2), rather than all of it."""
    return accelerator.is_fsdp2


class Peers:
    """Where every process of the run lives (host and pid, gathered once at the start), to name the one that was
    lost when a collective fails."""

    def __init__(self, accelerator: Accelerator):
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.places = [(socket.gethostname(), os.getpid())]
        if self.world > 1:
            self.places = [None] * self.world
            torch.distributed.all_gather_object(self.places, (socket.gethostname(), os.getpid()))

    def lost(self) -> str:
        """The processes that are gone, as far as this machine can see."""
        here = socket.gethostname()
        gone = [rank for rank, (host, pid) in enumerate(self.places) if host == here and not alive(pid)]
        if gone:
            return "rank " + ", ".join(map(str, gone))
        return "a process on another machine" if any(host != here for host, _ in self.places) else "a process"


def alive(pid: int) -> bool:
    if not os.path.isdir("/proc"):
        return True  # cannot tell here
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie waits for its launcher to reap it
    except FileNotFoundError:
        return False


def is_lost_peer(error: BaseException) -> bool:
    """A collective failed because another process of the run is gone (gloo and NCCL say so in these words)."""
    if not isinstance(error, RuntimeError):  # DistBackendError and DistNetworkError are RuntimeErrors
        return False
    message = str(error)
    return any(words in message for words in ("Connection reset by peer", "Connection closed by peer",
                                              "Broken pipe", "NCCL communicator was aborted", "Socket Timeout"))
