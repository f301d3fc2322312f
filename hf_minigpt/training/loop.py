"""The loop: the optimizer and its schedule, the optimizer steps, stopping, resuming.

A script brings its model, loaders and loss; `TrainingRun.fit` does the rest the same way for every script:
gradient accumulation, clipping, logging, progress, checkpoints, signals and the NaN stop.
"""

import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

from ..cpu_kernels import use_cpu_kernels
from ..cpu_memory import NOT_REUSED, reuse_freed_memory
from ..folders import RunFolder, write_json
from .checkpoint import Layout, Prepared, TrainingState, load_checkpoint, save_checkpoint, save_trained_model
from .data import DataError
from .report import Log, plot_losses
from .settings import OptimizationSettings, RunSettings


class DivergedError(RuntimeError):
    """The loss stopped being a finite number."""


class Stopped(Exception):
    """A signal stopped training after a checkpoint; the process exits with the shell's code for it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM


class RunComplete(Exception):
    """Nothing to do: the output folder already holds the finished run that was asked for."""


def duration(seconds: float) -> str:
    """"1 h 02 min", "3 min 05 s" or "12 s"."""
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def adamw(model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only: biases and LayerNorm weights are left alone. Fused: one pass
    over each tensor instead of several (5x faster on a CPU, as transformers' Trainer uses it by default)."""
    decay = {name for name in get_parameter_names(model, [nn.LayerNorm]) if not name.endswith("bias")}
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, fused=True)


DEFAULT_EPOCHS = 3


@dataclass
class Plan:
    steps_per_epoch: int
    max_steps: int
    epochs: int


def plan_steps(optimization, batches_per_epoch: int | None) -> Plan:
    """How long to train, as run_clm_no_trainer.py computes it; without an explicit length, a dataset too small for
    `--min_train_steps` in the default epochs is repeated until it fills them (nanoGPT counts iterations, not epochs,
    for the same reason). A stream (no length) is one pass of `--max_train_steps`."""
    if batches_per_epoch is None:
        return Plan(optimization.max_train_steps, optimization.max_train_steps, 1)
    steps_per_epoch = math.ceil(batches_per_epoch / optimization.gradient_accumulation_steps)
    if optimization.max_train_steps:
        total = optimization.max_train_steps
    elif optimization.num_train_epochs:
        total = optimization.num_train_epochs * steps_per_epoch
    else:
        total = max(DEFAULT_EPOCHS, math.ceil(optimization.min_train_steps / steps_per_epoch)) * steps_per_epoch
    return Plan(steps_per_epoch, total, math.ceil(total / steps_per_epoch))


def optimizer_and_schedule(model, optimization, max_steps: int, processes: int):
    optimizer = adamw(model, optimization.learning_rate, optimization.weight_decay)
    # The prepared scheduler steps once per process on each optimizer step, hence the factor (as in run_clm).
    scheduler = get_scheduler(optimization.lr_scheduler_type, optimizer,
                              num_warmup_steps=optimization.num_warmup_steps * processes,
                              num_training_steps=max_steps * processes)
    return optimizer, scheduler


# ---------------------------------------------------------------------------------------------------------------------
# Stopping


class StopRequest:
    """SIGINT/SIGTERM ask the loop to save and stop at the next step; a second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signum

    def agreed(self, accelerator) -> bool:
        """True on every process once any process was signalled, so all of them stop at the same step."""
        if accelerator.num_processes == 1:
            return bool(self.requested)
        flag = torch.tensor(float(bool(self.requested)), device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0


# ---------------------------------------------------------------------------------------------------------------------
# The loop


def sized(loader) -> bool:
    return not isinstance(loader.dataset, torch.utils.data.IterableDataset)


class TrainingRun:
    """One run of optimizer steps over prepared objects; `state` (a `TrainingState`) is where it stands."""

    def __init__(self, accelerator, run_settings: RunSettings, optimization: OptimizationSettings, model, tokenizer,
                 train_loader, eval_loader, *, geometry: dict, unit: str, items_per_batch: int, name: str):
        self.accelerator, self.tokenizer, self.unit = accelerator, tokenizer, unit
        self.run_settings, self.optimization = run_settings, optimization
        self.name = name
        processes = accelerator.num_processes
        # FSDP's and tensor parallelism's weights are shards, which the CPU's products do not multiply; a compiled
        # model takes inductor's products.
        whole_weights = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU)
        plain = run_settings.plain_kernels or run_settings.torch_compile
        if accelerator.device.type == "cpu" and whole_weights and not plain:
            use_cpu_kernels(model, compile=False)  # the same weights; their products where this CPU has faster ones
        if accelerator.device.type == "cpu" and run_settings.reuse_freed_memory and not reuse_freed_memory():
            accelerator.print(f"{NOT_REUSED}; training as it is.")
        self.plan = plan_steps(optimization, math.ceil(len(train_loader) / processes) if sized(train_loader) else None)
        optimizer, scheduler = optimizer_and_schedule(model, optimization, self.plan.max_steps, processes)
        self.model, self.optimizer, self.train_loader, self.eval_loader, self.scheduler = accelerator.prepare(
            model, optimizer, train_loader, eval_loader, scheduler
        )
        # A checkpoint resumes with any number of processes that keeps the global batch; its layout is converted.
        self.layout = Layout(processes, optimization.per_device_train_batch_size,
                             optimization.gradient_accumulation_steps)
        geometry = {**geometry, "seed": run_settings.seed, "global_batch": self.layout.global_batch}
        self.state = TrainingState(geometry, self.layout)
        self.last_checkpoint = resume = run_settings.checkpoint_to_resume
        if resume is not None:
            self.resume_from(resume)
        self.log_file = Log(run_settings.output_dir, accelerator.is_main_process,
                            resumed_at=self.step if resume else None)
        self.last_entry = {}
        self.items_per_step = items_per_batch * processes * optimization.gradient_accumulation_steps
        self.steps_this_run, self.seconds = 0, 0.0

    @property
    def prepared(self) -> Prepared:
        loaders = [loader for loader in (self.train_loader, self.eval_loader) if loader is not None]
        return Prepared(self.model, self.optimizer, self.scheduler, loaders)

    def resume_from(self, checkpoint: Path) -> None:
        """The prepared objects' state and `state` from `checkpoint`, if it was trained with the same geometry (any
        process layout with the same global batch)."""
        geometry = self.state.geometry
        self.state = load_checkpoint(self.accelerator, checkpoint, self.prepared)
        if self.state.geometry != geometry:
            changed = [key for key in geometry if self.state.geometry.get(key) != geometry[key]]
            raise DataError(f"{checkpoint} was trained with other {changed}: {self.state.geometry}. "
                            "Resume with those.")
        self.continue_in_this_layout()
        self.refuse_to_redo_a_finished_run(checkpoint)
        self.accelerator.print(f"Resuming from {checkpoint} at step {self.step}.")

    def continue_in_this_layout(self) -> None:
        """Convert the counters that depend on how the global batch is split: the micro-batches each process has
        read in this epoch, Accelerate's micro-step count, and the scheduler, which steps once per process."""
        saved, layout = self.state.layout, self.layout
        steps_in_epoch = self.state.batches_in_epoch // saved.gradient_accumulation_steps
        self.state.batches_in_epoch = steps_in_epoch * layout.gradient_accumulation_steps
        self.state.layout = layout
        self.accelerator.step = self.step * layout.gradient_accumulation_steps
        self.scheduler.scheduler.last_epoch = self.step * layout.num_processes

    def refuse_to_redo_a_finished_run(self, resume: Path) -> None:
        """Resuming a run whose model is already in --output_dir either has nothing to do, or must start from the
        end of it: never retrain from an older checkpoint over the finished model."""
        results = RunFolder(self.run_settings.output_dir).results
        if not results.exists():
            return
        finished = json.loads(results.read_text()).get("train_steps", 0)
        if self.plan.max_steps <= finished:
            raise RunComplete(
                f"{self.run_settings.output_dir} already holds the finished run ({finished} steps); nothing changed. "
                f"Pass a --max_train_steps above {finished} to train it further."
            )
        if self.state.completed_steps < finished:
            raise DataError(
                f"{resume} (step {self.state.completed_steps}) is older than the finished model in "
                f"{self.run_settings.output_dir} ({finished} steps): resuming from it would retrain over that model. "
                "Start a new --output_dir from it with --model_name_or_path instead."
            )

    @property
    def step(self) -> int:
        return self.state.completed_steps

    def log(self, entry: dict, prefix: str) -> None:
        self.last_entry = {"step": self.step, **entry}
        self.log_file.append(self.last_entry)
        self.accelerator.log({f"{prefix}/{key}": value for key, value in entry.items()}, step=self.step)

    def checkpoint(self) -> Path:
        run = self.run_settings
        self.last_checkpoint = save_checkpoint(self.accelerator, run.output_dir, self.state, run.save_total_limit,
                                               self.prepared, self.tokenizer)
        return self.last_checkpoint

    def throughput(self) -> float:
        return self.steps_this_run * self.items_per_step / max(self.seconds, 1e-9)

    def fit(self, compute_loss, after_step=None, after_epoch=None) -> None:
        """Train to the end, or until a signal (then a checkpoint is saved and `Stopped` raised). `after_epoch`
        returning True ends training early."""
        accelerator, run, state, model = self.accelerator, self.run_settings, self.state, self.model
        max_grad_norm, plan = self.optimization.max_grad_norm, self.plan
        # A bar on a terminal; in a log file (not a terminal) a line every 5% of the steps instead.
        to_terminal = sys.stderr.isatty()
        progress = tqdm(total=plan.max_steps, initial=self.step, desc=self.name,
                        disable=not (accelerator.is_local_main_process and to_terminal))
        line_every = max(1, plan.max_steps // 20)
        started, first_step_seconds = time.perf_counter(), 0.0
        with StopRequest() as stop:
            for epoch in range(state.epoch, plan.epochs):
                if self.step >= plan.max_steps:
                    break
                state.epoch = epoch
                self.train_loader.set_epoch(epoch)
                model.train()
                loader = self.train_loader
                if state.batches_in_epoch:
                    loader = accelerator.skip_first_batches(self.train_loader, state.batches_in_epoch)
                micro_losses, exhausted = [], True
                for batch in loader:
                    with accelerator.accumulate(model):
                        loss = compute_loss(model, batch)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and max_grad_norm:
                            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                        self.optimizer.step()
                        self.scheduler.step()
                        self.optimizer.zero_grad()
                    micro_losses.append(loss.detach())
                    state.batches_in_epoch += 1
                    if not accelerator.sync_gradients:
                        continue

                    loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
                    micro_losses = []
                    state.completed_steps += 1
                    self.steps_this_run += 1
                    self.seconds = time.perf_counter() - started
                    if self.steps_this_run == 1:
                        first_step_seconds = self.seconds
                    if not math.isfinite(loss):
                        where = f"the last good checkpoint is {self.last_checkpoint}"
                        if self.last_checkpoint is None:
                            where = "no checkpoint was saved"
                        raise DivergedError(
                            f"The training loss is {loss} at step {self.step}; stopping ({where}, left untouched). "
                            "Lower --learning_rate, raise --num_warmup_steps, or use --mixed_precision bf16 over fp16."
                        )
                    state.loss_sum += loss
                    learning_rate = self.scheduler.get_last_lr()[0]
                    self.log({"epoch": round(self.step / plan.steps_per_epoch, 4), "loss": loss,
                              "learning_rate": learning_rate}, "train")
                    progress.update(1)
                    figures = {"loss": f"{loss:.4f}", "lr": f"{learning_rate:.2e}",
                               f"{self.unit}_s": f"{self.throughput():.0f}"}
                    progress.set_postfix(**figures)
                    if not to_terminal and (self.step % line_every == 0 or self.step == plan.max_steps):
                        # (a terminal gets tqdm's bar, which shows the time left itself). The first step pays for
                        # the start (allocations, the loader's workers, lazy inits): the steps after it set the pace.
                        pace = self.seconds
                        if self.steps_this_run > 1:
                            pace = (self.seconds - first_step_seconds) / (self.steps_this_run - 1)
                        left = (plan.max_steps - self.step) * pace
                        accelerator.print(f"step {self.step}/{plan.max_steps}: "
                                          + ", ".join(f"{key} {value}" for key, value in figures.items())
                                          + f", {duration(left)} left")
                    if after_step is not None:
                        hook_started = time.perf_counter()
                        after_step(self.step, progress.write)
                        started += time.perf_counter() - hook_started  # throughput counts training only

                    interrupted = stop.agreed(accelerator)
                    if interrupted or (run.checkpoint_every and self.step % run.checkpoint_every == 0):
                        self.checkpoint()
                    if interrupted:
                        progress.close()
                        accelerator.print(f"Stopped by a signal at step {self.step}; saved {self.last_checkpoint}. "
                                          "Continue with --resume_from_checkpoint latest.")
                        raise Stopped(stop.requested or signal.SIGINT)
                    if self.step >= plan.max_steps:
                        exhausted = False
                        break
                # An epoch cut short by the last step still ends with `after_epoch` (evaluation), but stays the
                # current epoch, so that a longer run resumes inside it.
                epoch_finished = exhausted or (
                    sized(self.train_loader) and state.batches_in_epoch >= len(self.train_loader))
                if epoch_finished:
                    state.epoch, state.batches_in_epoch = epoch + 1, 0
                stop_early = after_epoch is not None and after_epoch(epoch, progress.write)
                if run.checkpointing_steps == "epoch":
                    self.checkpoint()
                if stop_early or not epoch_finished:
                    break
        progress.close()
        if run.checkpointing_steps and not self.last_checkpoint_is(self.step):
            self.checkpoint()  # so that a later, longer run continues from the end rather than from before it

    def last_checkpoint_is(self, step: int) -> bool:
        return self.last_checkpoint is not None and RunFolder.step_of(self.last_checkpoint) == step

    def save(self, results: dict) -> None:
        """The trained model and tokenizer into --output_dir, with `results` (all_results.json) and the loss curve;
        every process takes part."""
        folder = RunFolder(self.run_settings.output_dir)
        save_trained_model(folder.path, self.model, self.tokenizer, self.accelerator, existing="merge")
        if self.accelerator.is_main_process:
            write_json(folder.results, results)
            plot_losses(self.log_file.entries(), folder.loss_curve)

    def summary(self) -> dict:
        """The `train_*` entries of all_results.json."""
        return {
            "train_loss": self.state.loss_sum / max(self.step, 1),
            "train_steps": self.step,
            "epoch": round(self.step / self.plan.steps_per_epoch, 4),
            "train_runtime": self.seconds,
            f"train_{self.unit}_per_second": self.throughput(),
        }
