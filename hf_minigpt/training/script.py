"""A training script's life around the loop: the Accelerator started, seeded and the output folder ready; and its end,
in one line and the shell's exit code, whatever stopped it (bad data, a diverged loss, a signal, a lost process)."""

import ctypes
import ctypes.util
import gc
import os
import re
import shutil
import sys
from pathlib import Path

import datasets
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..cli import quiet_loading
from ..hub import PushRefused
from .checkpoint import list_checkpoints
from .data import DataError
from .loop import DivergedError, RunComplete, Stopped
from .processes import LaunchError, Peers, build_accelerator, is_lost_peer
from .settings import flags


def run_script(prog: str, parse, train, argv=None) -> None:
    """A training script's entry point. Bad data, or a loss that diverges, ends it with one line, not a trace; a
    signal ends it with the shell's exit code for that signal, so that `train && publish` does not publish; a lost
    process ends the others at once, with one line that says what to resume from."""
    settings = parse(argv)
    quiet_loading()
    created = not Path(settings.run.output_dir).exists()
    try:
        accelerator = start(settings, prog)
    except LaunchError as error:
        sys.exit(f"{prog}: error: {error}")
    peers = Peers(accelerator)
    outcome = None
    try:
        train(settings, accelerator)
    except DataError as error:
        if created and accelerator.is_main_process:  # a refused run leaves nothing behind
            shutil.rmtree(settings.run.output_dir, ignore_errors=True)
        outcome = f"{prog}: error: {error}"
    except (DivergedError, PushRefused) as error:
        outcome = f"{prog}: {error}"
    except RunComplete as complete:
        print(f"{prog}: {complete}")
    except Stopped as stopped:
        outcome = stopped.exit_code
    except RuntimeError as error:
        if not is_lost_peer(error):
            raise
        print(f"{prog}: {peers.lost()} of this run was lost (rank {peers.rank} of {peers.world} stops here: "
              f"{backend_words(error)}). {resume_advice(settings.run.output_dir)}", file=sys.stderr, flush=True)
        os._exit(1)  # the process group is broken: tearing it down could wait on the lost process
    # Only here, where no frame holds the DDP-wrapped model any more: its reducer must be freed before the process
    # group is destroyed, or freeing it blocks forever on the destroyed group.
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    if outcome is not None:
        sys.exit(outcome)


def backend_words(error: RuntimeError) -> str:
    """The gist of a communication backend's error: its first sentence, without the source location."""
    return re.sub(r"^\[[^\]]*\]\s*", "", str(error).splitlines()[0]).split(". ")[0]


def resume_advice(output_dir) -> str:
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        return "No checkpoint was written: start again with --overwrite_output_dir."
    return f"Continue from {checkpoints[-1]} with --resume_from_checkpoint latest."


def keep_large_blocks_out_of_the_heap(threshold: int = 8 << 20) -> None:
    """glibc's malloc raises its mmap threshold to the largest block freed (up to 32 MB), after which blocks of that
    size come from its heap. A long evaluation, allocating and freeing (rows, vocab) loss buffers of that size, can
    fragment the heap until the process holds gigabytes. A fixed threshold gives blocks above it their own mapping,
    returned to the system when freed."""
    libc = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc:
        mallopt = getattr(ctypes.CDLL(libc), "mallopt", None)  # glibc's; musl has none
        if mallopt is not None:
            mallopt(-3, threshold)  # M_MMAP_THRESHOLD; setting it also turns off the adjustment


def start(settings, name: str) -> Accelerator:
    """The Accelerator, seeded, with trackers started and the output folder ready."""
    run = settings.run
    keep_large_blocks_out_of_the_heap()
    if not sys.stderr.isatty():  # progress bars written into a log file are noise
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    accelerator = build_accelerator(settings)
    set_seed(run.seed)
    if accelerator.is_main_process:
        Path(run.output_dir).mkdir(parents=True, exist_ok=True)
        if run.overwrite_output_dir and not run.resume_from_checkpoint:
            for old in list_checkpoints(run.output_dir):
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    if run.report_to != "none":
        accelerator.init_trackers(name, config={k: str(v) for k, v in flags(settings).items()})
    return accelerator
