"""What the training scripts share: reading data files, the optimizer loop, checkpoints, stopping, plots.

`pretrain.py` and `finetune.py` bring their data, loss and evaluation; everything that must behave identically in
both lives here: a checkpoint is written the same way, a signal stops both the same way.
"""

import argparse
import codecs
import glob
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import SchedulerType, get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

from .convert import with_default_permissions


class DataError(ValueError):
    """Input that cannot be trained on, found before the first step."""


class DivergedError(RuntimeError):
    """The loss stopped being a finite number."""


class Stopped(Exception):
    """A signal stopped training after a checkpoint; the process exits with the shell's code for it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM


class RunComplete(Exception):
    """Nothing to do: the output folder already holds the finished run that was asked for."""


# ---------------------------------------------------------------------------------------------------------------------
# Command line: the flags of transformers' `run_*_no_trainer.py` examples that every script here takes.


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and shows every default that is set."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in action.help:
            return action.help
        return f"{action.help} (default: %(default)s)"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train_file", nargs="+", help="Files (or globs), or a folder written by `save_to_disk`.")
    parser.add_argument("--validation_file", nargs="+", help="Same formats as --train_file.")
    parser.add_argument("--output_dir", required=True, help="Where the model, tokenizer, results and checkpoints go.")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Start over in a non-empty --output_dir.")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8, help="Training rows per process.")
    parser.add_argument("--per_device_eval_batch_size", type=int, default=8, help="Evaluation rows per batch.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimizer step.")
    parser.add_argument("--learning_rate", type=float, default=5e-5, help="Peak learning rate of AdamW.")
    parser.add_argument("--weight_decay", type=float, default=0.0, help="Not applied to biases and LayerNorm weights.")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradients are clipped to this norm.")
    parser.add_argument("--lr_scheduler_type", default="linear", choices=[kind.value for kind in SchedulerType],
                        metavar="SCHEDULE", help="Learning-rate schedule, one of: %(choices)s.")
    parser.add_argument("--num_warmup_steps", type=int, default=0, help="Steps of linear learning-rate warm-up.")
    parser.add_argument("--num_train_epochs", type=int, help="Passes over the training data (default: 3).")
    parser.add_argument("--max_train_steps", type=int, help="Overrides --num_train_epochs.")
    parser.add_argument("--min_train_steps", type=int, default=0,
                        help="Without --num_train_epochs or --max_train_steps, repeat a small dataset for at least "
                        "this many optimizer steps.")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="Default: Accelerate's config.")
    parser.add_argument("--seed", type=int, default=42, help="Seeds weights, data order and dropout.")
    parser.add_argument("--checkpointing_steps", help="Save every N optimizer steps, or 'epoch'.")
    parser.add_argument("--resume_from_checkpoint", help="A checkpoint folder, or 'latest' in --output_dir.")
    parser.add_argument("--save_total_limit", type=int, default=2, help="How many checkpoints to keep.")
    parser.add_argument("--preprocessing_num_workers", type=int, help="Processes for `datasets.map`.")
    parser.add_argument("--report_to", default="none", help="Accelerate trackers: 'all', 'tensorboard', 'wandb'...")
    parser.add_argument("--torch_compile", action="store_true", help="Train the `torch.compile`d model.")


def check_common_args(args: argparse.Namespace) -> None:
    positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"]
    for name in positive + ["num_train_epochs", "max_train_steps", "save_total_limit"]:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise DataError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.push_to_hub and not args.hub_model_id:
        raise DataError("--push_to_hub needs --hub_model_id (your-name/model-name).")
    if args.checkpointing_steps not in (None, "epoch") and not str(args.checkpointing_steps).isdigit():
        raise DataError(f"--checkpointing_steps takes a number of steps or 'epoch', got {args.checkpointing_steps!r}.")
    if not args.resume_from_checkpoint and not args.overwrite_output_dir and previous_run(args.output_dir):
        raise DataError(
            f"{args.output_dir} already holds a run. Continue it with --resume_from_checkpoint latest, start over "
            "with --overwrite_output_dir, or pick another --output_dir."
        )
    for flag in ("model_name_or_path", "tokenizer_name"):
        if getattr(args, flag, None):
            check_model_source(getattr(args, flag), f"--{flag}")


def check_model_source(name: str, flag: str) -> None:
    """A folder that holds a model, or a hub id the hub knows: said at once, not after a minute of retries."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise DataError(f"{flag} {name} is a folder but holds no model (no config.json).")
        return
    if path.exists():
        raise DataError(f"{flag} {name} is a file; give the folder that holds the model.")
    first = Path(name).parts[0] if Path(name).parts else name
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(first).is_dir()
    if looks_local:
        raise DataError(f"{flag} {name}: no such folder.")
    from huggingface_hub import model_info
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        model_info(name, timeout=10)
    except (RepositoryNotFoundError, HFValidationError):
        raise DataError(f"{flag} {name}: no such folder here, and no such model on the hub.") from None
    except Exception as error:  # offline, DNS, timeouts, proxies: one line that says so
        raise DataError(f"{flag} {name}: no such folder here, and the hub could not give it ({error}).") from None


def previous_run(output_dir: str) -> bool:
    folder = Path(output_dir)
    return (folder / "config.json").exists() or bool(list_checkpoints(folder))


# ---------------------------------------------------------------------------------------------------------------------
# Data files


# File extension -> `datasets` builder (and its options).
BUILDERS = {
    ".txt": ("text", {"sample_by": "document"}),  # one file, one document: EOS goes between files, not lines
    ".text": ("text", {"sample_by": "document"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {}),
}


# `datasets` reads these compressed files as they are: `reviews.csv.bz2` is a csv file.
COMPRESSED = (".bz2", ".gz", ".xz", ".zst")


def data_suffix(file: str) -> str:
    path = Path(file)
    if path.suffix.lower() in COMPRESSED:
        path = path.with_suffix("")
    return path.suffix.lower()


def expand(patterns: list[str]) -> list[str]:
    return sorted({match for pattern in patterns for match in (glob.glob(pattern) or [pattern])})


def load_files(patterns: list[str], split: str) -> datasets.Dataset:
    """Load text/json/jsonl/csv/tsv/parquet files (globs allowed) or a `save_to_disk` folder as one Dataset."""
    if len(patterns) == 1 and Path(patterns[0]).is_dir():
        return load_saved_dataset(patterns[0], split)
    files = expand(patterns)
    for file in files:
        if not Path(file).is_file():
            raise DataError(f"{file}: no such file (or the pattern matches nothing).")
        if Path(file).stat().st_size == 0:
            raise DataError(f"{file} is empty.")
    suffixes = {data_suffix(file) for file in files}
    unknown = suffixes - BUILDERS.keys()
    if unknown or len({BUILDERS[suffix][0] for suffix in suffixes - unknown}) > 1:
        raise DataError(
            f"Cannot read {sorted(suffixes)} files together: give files of one kind, one of {sorted(BUILDERS)}, "
            "or a folder written by `Dataset.save_to_disk`."
        )
    builder, options = BUILDERS[suffixes.pop()]
    for file in files:
        if builder != "parquet" and Path(file).suffix.lower() not in COMPRESSED:
            check_utf8(file)
    try:
        return datasets.load_dataset(builder, data_files={split: files}, split=split, **options)
    except Exception as error:  # datasets wraps parser errors in several exception types
        raise DataError(f"Could not read {files}: {error}") from error


def row_location(patterns: list[str], index: int) -> str:
    """Where row `index` of `load_files(patterns)` came from, e.g. "train.csv, row 7" (rows count from 1, after any
    header). Only asked for when reporting a bad row, so it may re-read the files."""
    if len(patterns) == 1 and Path(patterns[0]).is_dir():
        return f"{patterns[0]}, row {index + 1}"
    for file in expand(patterns):
        rows = len(load_files([file], "train"))
        if index < rows:
            return f"{file}, row {index + 1}"
        index -= rows
    raise IndexError(index)


def load_saved_dataset(folder: str, split: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(folder)
    except FileNotFoundError:
        raise DataError(f"{folder} is a folder but not one written by `Dataset.save_to_disk`.") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{folder} has the splits {list(loaded)}, not {split!r}.")
        loaded = loaded[split]
    return loaded


def check_utf8(file: str, chunk_size: int = 1 << 20) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(file, "rb") as handle:
        while chunk := handle.read(chunk_size):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                raise DataError(f"{file} is not UTF-8 text (byte {offset + error.start}).") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{file} is not UTF-8 text (it ends inside a character).") from None


def check_columns(dataset: datasets.Dataset, columns: list[str], flag: str) -> None:
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        plain_text = " (plain text files hold only 'text': use csv, tsv or jsonl for labelled data)"
        hint = plain_text if dataset.column_names == ["text"] else ""
        raise DataError(
            f"{flag} {missing[0]!r} is not a column of the data; its columns are {dataset.column_names}{hint}."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Optimization


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


def plan_steps(args: argparse.Namespace, batches_per_epoch: int) -> tuple[int, int, int]:
    """(optimizer steps per epoch, total steps, epochs), as run_clm_no_trainer.py computes them; without an
    explicit length, a dataset too small for `--min_train_steps` in the default epochs is repeated until it fills them
    (nanoGPT counts iterations, not epochs, for the same reason)."""
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps:
        total = args.max_train_steps
    elif args.num_train_epochs:
        total = args.num_train_epochs * steps_per_epoch
    else:
        total = max(DEFAULT_EPOCHS, math.ceil(args.min_train_steps / steps_per_epoch)) * steps_per_epoch
    return steps_per_epoch, total, math.ceil(total / steps_per_epoch)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: `step_N` folders in the output folder, each complete or absent.

STATE_FILE = "training_state.json"


def list_checkpoints(output_dir) -> list[Path]:
    found = [path for path in Path(output_dir).glob("step_*") if re.fullmatch(r"step_\d+", path.name)]
    return sorted((path for path in found if (path / STATE_FILE).exists()), key=lambda path: int(path.name[5:]))


def find_checkpoint(output_dir: str, spec: str) -> Path:
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise DataError(f"--resume_from_checkpoint latest: {output_dir} holds no checkpoint.")
        return checkpoints[-1]
    if not Path(spec, STATE_FILE).exists():
        raise DataError(f"--resume_from_checkpoint {spec}: not a checkpoint folder (it has no {STATE_FILE}).")
    return Path(spec)


def save_checkpoint(accelerator, output_dir: str, state: dict, keep: int, save_extra) -> Path:
    """Write `step_N` through a scratch folder renamed into place, then drop all but the last `keep`.

    Every process takes part (each saves its own RNG state); a run killed half-way leaves only the
    scratch folder, which the next save removes.
    """
    final = Path(output_dir, f"step_{state['completed_steps']}")
    scratch = Path(output_dir, f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(scratch))
    if accelerator.is_main_process:
        save_extra(scratch)
        (scratch / STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(scratch, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path) -> dict:
    accelerator.load_state(str(checkpoint))
    return json.loads((checkpoint / STATE_FILE).read_text())


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


def run_script(prog: str, parse_args, train, argv=None) -> None:
    """A training script's entry point: bad input, or a loss that diverges, ends it with one line, not a trace; a
    signal ends it with the shell's exit code for that signal, so that `train && publish` does not publish."""
    args = parse_args(argv)
    created = not Path(args.output_dir).exists()
    try:
        train(args)
    except DataError as error:
        if created:  # a refused run leaves nothing behind
            shutil.rmtree(args.output_dir, ignore_errors=True)
        sys.exit(f"{prog}: error: {error}")
    except DivergedError as error:
        sys.exit(f"{prog}: {error}")
    except RunComplete as complete:
        print(f"{prog}: {complete}")
    except Stopped as stopped:
        sys.exit(stopped.exit_code)


def start(args) -> tuple[Accelerator, Path | None]:
    """The Accelerator, seeded, with the output folder ready; and the checkpoint to resume from, if any."""
    check_common_args(args)
    if not sys.stderr.isatty():  # progress bars written into a log file are noise
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        # Shuffling from a seed of its own makes every process, and a resumed run, draw the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        dynamo_backend="inductor" if args.torch_compile else None,
    )
    set_seed(args.seed)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        if args.overwrite_output_dir and not args.resume_from_checkpoint:
            for old in list_checkpoints(args.output_dir):
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    resume = find_checkpoint(args.output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    return accelerator, resume


def train_loader(dataset, batch_size: int, collate_fn=None):
    # Batches are drawn from a generator of their own, never from the global RNG that dropout uses.
    return torch.utils.data.DataLoader(
        dataset, shuffle=True, batch_size=batch_size, collate_fn=collate_fn, generator=torch.Generator()
    )


class TrainingRun:
    """The optimizer loop both scripts share: gradient accumulation, clipping, logging, progress, checkpoints,
    resume, signals, and the NaN stop. A script supplies the loss, and what to do after a step or an epoch.

    `state` is everything a checkpoint needs beyond Accelerate's own: the step, the data position, the log,
    the script's extras, and the batch geometry, which a resumed run must not change.
    """

    def __init__(self, accelerator, args, model, tokenizer, train_loader, eval_loader, *, resume, geometry: dict,
                 unit: str, items_per_batch: int, name: str):
        self.accelerator, self.args, self.tokenizer, self.name = accelerator, args, tokenizer, name
        processes = accelerator.num_processes
        self.steps_per_epoch, self.max_steps, self.epochs = plan_steps(args, math.ceil(len(train_loader) / processes))
        optimizer = adamw(model, args.learning_rate, args.weight_decay)
        # The prepared scheduler steps once per process on each optimizer step, hence the factor (as in run_clm).
        scheduler = get_scheduler(
            args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps * processes,
            num_training_steps=self.max_steps * processes,
        )
        self.model, self.optimizer, self.train_loader, self.eval_loader, self.scheduler = accelerator.prepare(
            model, optimizer, train_loader, eval_loader, scheduler
        )
        geometry = {**geometry, "num_processes": processes, "seed": args.seed,
                    "per_device_train_batch_size": args.per_device_train_batch_size,
                    "gradient_accumulation_steps": args.gradient_accumulation_steps}
        self.state = {"completed_steps": 0, "epoch": 0, "batches_in_epoch": 0, "geometry": geometry,
                      "log_history": [], "extra": {}}
        self.last_checkpoint = resume
        if resume is not None:
            self.state = load_checkpoint(accelerator, resume)
            if self.state["geometry"] != geometry:
                changed = [key for key in geometry if self.state["geometry"].get(key) != geometry[key]]
                old = self.state["geometry"]
                raise DataError(f"{resume} was trained with other {changed}: {old}. Resume with those.")
            self.refuse_to_redo_a_finished_run(resume)
            accelerator.print(f"Resuming from {resume} at step {self.state['completed_steps']}.")
        if args.report_to != "none":
            accelerator.init_trackers(name, config={key: str(value) for key, value in vars(args).items()})
        self.unit = unit
        self.items_per_step = items_per_batch * processes * args.gradient_accumulation_steps
        self.steps_this_run, self.seconds = 0, 0.0

    def refuse_to_redo_a_finished_run(self, resume: Path) -> None:
        """Resuming a run whose model is already in --output_dir either has nothing to do, or must start from the
        end of it: never retrain from an older checkpoint over the finished model."""
        results = Path(self.args.output_dir, "all_results.json")
        if not results.exists():
            return
        finished = json.loads(results.read_text()).get("train_steps", 0)
        if self.max_steps <= finished:
            raise RunComplete(
                f"{self.args.output_dir} already holds the finished run ({finished} steps); nothing changed. "
                f"Pass a --max_train_steps above {finished} to train it further."
            )
        if self.state["completed_steps"] < finished:
            raise DataError(
                f"{resume} (step {self.state['completed_steps']}) is older than the finished model in "
                f"{self.args.output_dir} ({finished} steps): resuming from it would retrain over that model. "
                "Start a new --output_dir from it with --model_name_or_path instead."
            )

    @property
    def history(self) -> list[dict]:
        return self.state["log_history"]

    def log(self, entry: dict, prefix: str) -> None:
        step = self.state["completed_steps"]
        self.history.append({"step": step, **entry})
        self.accelerator.log({f"{prefix}/{key}": value for key, value in entry.items()}, step=step)

    def checkpoint(self) -> Path:
        """A `step_N` folder; with the model's config and the tokenizer, a resumed run rebuilds both from it."""

        def save_config_and_tokenizer(folder):
            self.accelerator.unwrap_model(self.model).config.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)

        self.last_checkpoint = save_checkpoint(
            self.accelerator, self.args.output_dir, self.state, self.args.save_total_limit, save_config_and_tokenizer
        )
        return self.last_checkpoint

    def throughput(self) -> float:
        return self.steps_this_run * self.items_per_step / max(self.seconds, 1e-9)

    def train(self, compute_loss, after_step=None, after_epoch=None) -> None:
        """Train to the end, or until a signal (then a checkpoint is saved and `Stopped` raised). `after_epoch`
        returning True ends training early."""
        accelerator, args, state, model = self.accelerator, self.args, self.state, self.model
        # A bar on a terminal; in a log file (not a terminal) a line every 5% of the steps instead.
        to_terminal = sys.stderr.isatty()
        progress = tqdm(total=self.max_steps, initial=state["completed_steps"], desc=self.name,
                        disable=not (accelerator.is_local_main_process and to_terminal))
        line_every = max(1, self.max_steps // 20)
        every = int(args.checkpointing_steps) if str(args.checkpointing_steps).isdigit() else None
        started = time.perf_counter()
        with StopRequest() as stop:
            for epoch in range(state["epoch"], self.epochs):
                if state["completed_steps"] >= self.max_steps:
                    break
                state["epoch"] = epoch
                self.train_loader.set_epoch(epoch)
                model.train()
                loader = self.train_loader
                if state["batches_in_epoch"]:
                    loader = accelerator.skip_first_batches(self.train_loader, state["batches_in_epoch"])
                micro_losses = []
                for batch in loader:
                    with accelerator.accumulate(model):
                        loss = compute_loss(model, batch)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and args.max_grad_norm:
                            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                        self.optimizer.step()
                        self.scheduler.step()
                        self.optimizer.zero_grad()
                    micro_losses.append(loss.detach())
                    state["batches_in_epoch"] += 1
                    if not accelerator.sync_gradients:
                        continue

                    loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
                    micro_losses = []
                    state["completed_steps"] += 1
                    self.steps_this_run += 1
                    self.seconds = time.perf_counter() - started
                    step = state["completed_steps"]
                    if not math.isfinite(loss):
                        where = f"the last good checkpoint is {self.last_checkpoint}"
                        if self.last_checkpoint is None:
                            where = "no checkpoint was saved"
                        raise DivergedError(
                            f"The training loss is {loss} at step {step}; stopping ({where}, left untouched). "
                            "Lower --learning_rate, raise --num_warmup_steps, or use --mixed_precision bf16 over fp16."
                        )
                    learning_rate = self.scheduler.get_last_lr()[0]
                    epoch_done = round(step / self.steps_per_epoch, 4)
                    self.log({"epoch": epoch_done, "loss": loss, "learning_rate": learning_rate}, "train")
                    progress.update(1)
                    figures = {"loss": f"{loss:.4f}", "lr": f"{learning_rate:.2e}",
                               f"{self.unit}_s": f"{self.throughput():.0f}"}
                    progress.set_postfix(**figures)
                    if not to_terminal and (step % line_every == 0 or step == self.max_steps):
                        accelerator.print(f"step {step}/{self.max_steps}: "
                                          + ", ".join(f"{key} {value}" for key, value in figures.items()))
                    if after_step is not None:
                        hook_started = time.perf_counter()
                        after_step(step, progress.write)
                        started += time.perf_counter() - hook_started  # throughput counts training only

                    interrupted = stop.agreed(accelerator)
                    if interrupted or (every and step % every == 0):
                        self.checkpoint()
                    if interrupted:
                        progress.close()
                        accelerator.print(f"Stopped by a signal at step {step}; saved {self.last_checkpoint}. "
                                          "Continue with --resume_from_checkpoint latest.")
                        accelerator.end_training()
                        raise Stopped(stop.requested or signal.SIGINT)
                    if step >= self.max_steps:
                        break
                # An epoch cut short by the last step still ends with `after_epoch` (evaluation), but stays the
                # current epoch, so that a longer run resumes inside it.
                epoch_finished = state["batches_in_epoch"] >= len(self.train_loader)
                if epoch_finished:
                    state["epoch"], state["batches_in_epoch"] = epoch + 1, 0
                stop_early = after_epoch is not None and after_epoch(epoch, progress.write)
                if args.checkpointing_steps == "epoch":
                    self.checkpoint()
                if stop_early or not epoch_finished:
                    break
        progress.close()
        if args.checkpointing_steps and self.last_checkpoint_step() != state["completed_steps"]:
            self.checkpoint()  # so that a later, longer run continues from the end rather than from before it

    def last_checkpoint_step(self) -> int | None:
        return None if self.last_checkpoint is None else json.loads(
            (self.last_checkpoint / STATE_FILE).read_text())["completed_steps"]

    def summary(self) -> dict:
        """The `train_*` entries of all_results.json."""
        losses = [entry["loss"] for entry in self.history if "loss" in entry]
        return {
            "train_loss": sum(losses) / len(losses),
            "train_steps": self.state["completed_steps"],
            "epoch": round(self.state["completed_steps"] / self.steps_per_epoch, 4),
            "train_runtime": self.seconds,
            f"train_{self.unit}_per_second": self.throughput(),
        }


def save_model(accelerator, model, folder) -> None:
    """`save_pretrained` of the trained model, whatever wraps it: DDP, torch.compile, FSDP or DeepSpeed (whose full
    weights exist only once gathered, so every process must call this)."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        state_dict = {name.removeprefix("_orig_mod."): tensor for name, tensor in state_dict.items()}
        accelerator.unwrap_model(model, keep_torch_compile=False).save_pretrained(folder, state_dict=state_dict)
        with_default_permissions(folder)


# ---------------------------------------------------------------------------------------------------------------------
# Results


def write_json(path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def plot_losses(log_history: list[dict], path) -> None:
    """Training (and evaluation) loss against optimizer steps, as a PNG."""
    figure, axes = pyplot().subplots(figsize=(7, 4), dpi=100)
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            axes.plot(*zip(*points), label=label, marker="o" if key == "eval_loss" else None)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot().close(figure)
