"""Fine-tune MiniGPT (or GPT-2) for text classification with Accelerate, with the flags of transformers'
`run_glue_no_trainer.py`.

    minigpt-finetune --model_name_or_path runs/pydoc --train_file train.csv --validation_file dev.csv \
        --text_column text --label_column label --output_dir runs/sentiment

The problem type follows the labels: strings or integers are single-label classification, a list of labels per
row is multi-label classification, floats are regression. The pooled token is the last non-pad token, as in
GPT2ForSequenceClassification; a tokenizer without a pad token (GPT-2's) pads with EOS.
"""

import csv
import shutil
from dataclasses import dataclass, field
from typing import Literal

import datasets
import torch
import transformers
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding

from . import MiniGPTConfig, MiniGPTForSequenceClassification
from .folders import RunFolder, atomic_file, model_source_problem
from .hub import push_after_training
from .tasks import METRICS, SingleLabel, Task
from .training.checkpoint import load_whole_weights, save_trained_model
from .training.data import DataError, check_columns, hold_out, load_files, row_location, train_loader
from .training.loop import TrainingRun
from .training.report import evaluated_on, file_names, optimization_rows, pyplot, write_model_card
from .training.script import run_script
from .training.settings import (
    DataSettings,
    HubSettings,
    OptimizationSettings,
    RunSettings,
    parse,
    save_settings,
    setting,
)
from .training.tokens import fit_embeddings


@dataclass
class ClassificationSettings:
    """The model to start from, the labels, and how the best model is chosen."""

    _argument_group_name = "classification"
    model_name_or_path: str = field(metadata={"help": "A MiniGPT or GPT-2 folder or hub id."})
    test_file: list[str] | None = setting(help="Predicted at the end (labels optional).")
    text_pair_column: str | None = setting(help="A second text column, for sentence pairs.")
    label_column: str = setting("label", "The column that holds the labels.")
    max_length: int = setting(128, "Longer texts are truncated.")
    metric_for_best_model: Literal["accuracy", "f1", "loss", "mse", "pearson"] | None = setting(
        help="Default: accuracy, f1 (multi-label) or mse (regression).")
    early_stopping_patience: int | None = setting(help="Stop after N epochs without improvement.")

    def problems(self) -> list[str]:
        found = [problem] if (problem := model_source_problem(self.model_name_or_path, "--model_name_or_path")) else []
        return found + [f"--{name} must be at least 1, got {getattr(self, name)}"
                        for name in ("max_length", "early_stopping_patience")
                        if getattr(self, name) is not None and getattr(self, name) < 1]


@dataclass
class FinetuneSettings:
    run: RunSettings
    optimization: OptimizationSettings
    data: DataSettings
    classification: ClassificationSettings
    hub: HubSettings


def parse_args(argv=None) -> FinetuneSettings:
    def problems(settings: FinetuneSettings) -> list[str]:
        return [] if settings.data.train_file else ["--train_file is required"]

    # A small data set is repeated for at least 100 steps, and the learning rate follows the model's size (below).
    defaults = dict(per_device_eval_batch_size=32, validation_split_percentage=10, learning_rate=None,
                    min_train_steps=100)
    return parse(FinetuneSettings, "minigpt-finetune", __doc__, argv, defaults=defaults, check=problems)


def fine_tuning_rate(parameters: int) -> float:
    """GPT-2's usual fine-tuning rate, 5e-5 at its 124M parameters, times sqrt(124M / parameters), at most 1e-3:
    a model of the size minigpt-pretrain makes (about 1M parameters) needs about ten times GPT-2's rate to learn
    a small data set in a hundred steps; larger models, less."""
    return min(5e-5 * (124e6 / parameters) ** 0.5, 1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# Data and labels


def text_columns(settings: FinetuneSettings) -> list[str]:
    pair = settings.classification.text_pair_column
    return [settings.data.text_column, *([pair] if pair else [])]


def load_splits(settings: FinetuneSettings) -> dict[str, datasets.Dataset]:
    """Train, validation (given, or held out at random from train) and test rows, each checked where it was read, so
    that a bad row is named by its file and row."""
    data, label_column = settings.data, settings.classification.label_column
    files = {"train": data.train_file, "validation": data.validation_file, "test": settings.classification.test_file}
    splits = {name: load_files(patterns, name) for name, patterns in files.items() if patterns}
    for name, split in splits.items():
        if len(split) == 0:
            raise DataError(f"The {name} data has no rows.")
        needed = text_columns(settings) + ([label_column] if name != "test" else [])
        check_columns(split, needed, f"--text_column/--text_pair_column/--label_column ({name} data):")
        for column in text_columns(settings):
            empty = [i for i, text in enumerate(split[column]) if not isinstance(text, str) or not text.strip()]
            if empty:
                raise DataError(f"{row_location(files[name], empty[0])} has no text in {column!r} "
                                f"({len(empty)} such row(s)).")
        if label_column in split.column_names:
            unlabelled = [i for i, label in enumerate(split[label_column]) if label is None or label == ""]
            if unlabelled:
                raise DataError(f"{row_location(files[name], unlabelled[0])} has no label in {label_column!r} "
                                f"({len(unlabelled)} such row(s)).")
    if "validation" not in splits:
        splits["train"], splits["validation"] = hold_out(splits["train"], data.validation_split_percentage,
                                                         settings.run.seed)
        if splits["validation"] is None:
            raise DataError(f"{len(splits['train'])} training rows are too few to hold out "
                            f"{data.validation_split_percentage}% for validation: pass a --validation_file.")
    return splits


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


def predict(model, loader, accelerator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (and labels) of the whole split, gathered from every process without duplicated tail rows."""
    model.eval()
    logits, labels = [], []
    for batch in loader:
        with torch.no_grad():
            logits.append(accelerator.gather_for_metrics(model(**batch).logits).float().cpu())
        if "labels" in batch:
            labels.append(accelerator.gather_for_metrics(batch["labels"]).cpu())
    model.train()
    return torch.cat(logits), torch.cat(labels) if labels else None


def validation_metrics(model, loader, accelerator, task: Task) -> dict:
    return task.score(*predict(model, loader, accelerator))


def plot_confusion_matrix(predictions, labels, names: list[str], path) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.6 * len(names) + 2)
    figure, axes = pyplot().subplots(figsize=(size, size), dpi=100)
    ConfusionMatrixDisplay.from_predictions(
        labels, predictions, labels=list(range(len(names))), display_labels=names, ax=axes, colorbar=False,
        xticks_rotation=45,
    )
    axes.set_title("validation set, best model")
    figure.tight_layout()
    with atomic_file(path) as scratch:
        figure.savefig(scratch, format="png")
    pyplot().close(figure)


# ---------------------------------------------------------------------------------------------------------------------
# Training


def train(settings: FinetuneSettings, accelerator) -> dict:
    resume, classification = settings.run.checkpoint_to_resume, settings.classification
    splits = load_splits(settings)
    task = Task.of(splits["train"], classification.label_column)
    metric = task.best_by(classification.metric_for_best_model)

    tokenizer = AutoTokenizer.from_pretrained(resume or classification.model_name_or_path)
    if tokenizer.pad_token is None:  # GPT-2's tokenizer has none: pad with EOS, pooling skips it
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding keeps every text at positions 0..n-1, as in pre-training (GPT-2 does not shift positions).
    tokenizer.padding_side = "right"

    def encode(split: datasets.Dataset, name: str) -> datasets.Dataset:
        encoded = split.map(
            lambda batch: tokenizer(*[batch[column] for column in text_columns(settings)], truncation=True,
                                    max_length=classification.max_length),
            batched=True, num_proc=settings.data.preprocessing_num_workers, remove_columns=split.column_names,
            desc=f"Tokenizing {name}",
        )
        if classification.label_column in split.column_names:
            encoded = encoded.add_column("labels", task.encode(split, name, classification.label_column))
        return encoded

    with accelerator.main_process_first():
        encoded = {name: encode(split, name) for name, split in splits.items()}
    model = load_classifier(classification.model_name_or_path, resume, task, tokenizer, accelerator.print)
    if settings.optimization.learning_rate is None:
        settings.optimization.learning_rate = fine_tuning_rate(model.num_parameters())
        accelerator.print(f"Learning rate {settings.optimization.learning_rate:.1e}, for {model.num_parameters():,} "
                          "parameters (--learning_rate chooses another).")
    collate = DataCollatorWithPadding(tokenizer)
    batch_size = settings.optimization.per_device_train_batch_size
    eval_loader = DataLoader(encoded["validation"], batch_size=settings.data.per_device_eval_batch_size,
                             collate_fn=collate)
    if accelerator.is_main_process:
        save_settings(settings)  # as resolved, e.g. a learning rate chosen for the model's size
    run = TrainingRun(
        accelerator, settings.run, settings.optimization, model, tokenizer,
        train_loader(encoded["train"], batch_size, collate), eval_loader,
        geometry={"max_length": classification.max_length}, unit="samples", items_per_batch=batch_size,
        name="minigpt-finetune",
    )
    extra = run.state.extra
    extra.setdefault("best", None)
    extra.setdefault("epochs_without_improvement", 0)
    accelerator.print(
        f"{task.problem_type}: {len(task.names)} label(s) {task.names[:10]}; {len(encoded['train'])} training rows, "
        f"{run.plan.steps_per_epoch} steps per epoch, {run.plan.max_steps} steps, "
        f"{accelerator.num_processes} process(es)."
    )
    best_folder = RunFolder(settings.run.output_dir).best_model

    def after_epoch(epoch, write) -> bool:
        metrics = validation_metrics(run.model, run.eval_loader, accelerator, task)
        run.log({f"eval_{key}": value for key, value in metrics.items() if key != "report"}, "eval")
        write(f"epoch {epoch}: " + ", ".join(f"eval_{k} {v:.4f}" for k, v in metrics.items() if k != "report"))
        best = extra["best"]
        if best is None or (metrics[metric] > best[metric] if METRICS[metric] else metrics[metric] < best[metric]):
            extra["best"] = {**metrics, "epoch": epoch}
            extra["epochs_without_improvement"] = 0
            save_trained_model(best_folder, run.model, tokenizer, accelerator, existing="replace")
        else:
            extra["epochs_without_improvement"] += 1
        patience = classification.early_stopping_patience
        if patience and extra["epochs_without_improvement"] >= patience:
            write(f"No better eval_{metric} for {patience} epoch(s): stopping early.")
            return True
        return False

    run.fit(classification_loss, after_epoch=after_epoch)
    return save_outputs(settings, run, encoded, collate, task, metric, splits)


def classification_loss(model, batch) -> torch.Tensor:
    return model(**batch).loss


def load_classifier(source: str, resume, task: Task, tokenizer, say) -> MiniGPTForSequenceClassification:
    labels = dict(
        num_labels=len(task.names), id2label=dict(enumerate(task.names)), label2id=task.label2id,
        problem_type=task.problem_type, pad_token_id=tokenizer.pad_token_id,
    )
    if resume is not None:  # weights come with the checkpoint
        return MiniGPTForSequenceClassification(MiniGPTConfig.from_pretrained(resume, **labels))
    # transformers' load report is a table with terminal colour codes; one plain line says what matters here.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = MiniGPTForSequenceClassification.from_pretrained(source, output_loading_info=True, **labels)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        say(f"A new classification head ({', '.join(sorted(info['missing_keys']))}, {len(task.names)} labels) starts "
            "from random weights; fine-tuning trains it.")
    fit_embeddings(model, tokenizer)
    return model


def save_outputs(settings: FinetuneSettings, run, encoded, collate, task: Task, metric: str, splits) -> dict:
    """The best model into --output_dir, with its metrics, test predictions, pictures and card."""
    accelerator, folder = run.accelerator, RunFolder(settings.run.output_dir)
    best = run.state.extra["best"]
    model = accelerator.unwrap_model(run.model, keep_torch_compile=False)
    best_weights = MiniGPTForSequenceClassification.from_pretrained(folder.best_model)
    load_whole_weights(model, best_weights.state_dict())
    results = {**run.summary(), "best_epoch": best["epoch"]}
    results.update({f"eval_{key}": value for key, value in best.items() if key not in ("report", "epoch")})
    test = None
    if "test" in encoded:
        test_loader = accelerator.prepare(
            DataLoader(encoded["test"], batch_size=settings.data.per_device_eval_batch_size, collate_fn=collate)
        )
        test = predict(run.model, test_loader, accelerator)
        if test[1] is not None:
            results.update({f"test_{key}": value for key, value in task.score(*test).items()
                            if key != "report"})
    # The best model's validation predictions: for the confusion matrix, and for predictions.csv without a test set.
    validation_logits, validation_labels = predict(run.model, run.eval_loader, accelerator)
    results["eval_report"] = best.get("report")
    run.save(results)
    if accelerator.is_main_process:
        shutil.rmtree(folder.best_model)
        pictures = ()
        if isinstance(task, SingleLabel):
            plot_confusion_matrix(task.predictions(validation_logits), validation_labels.numpy(), task.names,
                                  folder.confusion_matrix)
            pictures = (folder.confusion_matrix,)
        predicted_split, logits = ("test", test[0]) if test is not None else ("validation", validation_logits)
        write_predictions(folder.predictions, splits[predicted_split], settings, logits, task)
        example = splits["validation"][settings.data.text_column][0]  # the user's own kind of text
        write_classification_card(settings, model, results, task, metric, pictures, example)
        summary = {key: value for key, value in results.items() if isinstance(value, (int, float))}
        print(f"Saved the best model (epoch {best['epoch']}) to {folder.path}: "
              + ", ".join(f"{key} {value:.4g}" for key, value in summary.items()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        push_after_training(settings.hub, folder.path)
    return results


def write_predictions(path, split, settings: FinetuneSettings, logits, task: Task) -> None:
    """One row per text: the prediction by label name and how sure the model is of it (the probability of the
    predicted class; for multi-label, of each predicted label)."""
    shown, scores = task.shown(logits)
    label_column = settings.classification.label_column
    columns = text_columns(settings) + ([label_column] if label_column in split.column_names else [])
    with atomic_file(path) as scratch, open(scratch, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", *columns, "prediction", "score"])
        for index, (row, prediction, score) in enumerate(zip(split.select_columns(columns), shown, scores)):
            writer.writerow([index, *[row[column] for column in columns], prediction, score])


def write_classification_card(settings: FinetuneSettings, model, results, task: Task, metric: str, pictures,
                              example: str) -> None:
    data, classification = settings.data, settings.classification
    training_data = f"Training: {file_names(data.train_file)}."
    training_data += f" Validation: {file_names(data.validation_file)}." if data.validation_file else (
        f" Validation: {data.validation_split_percentage}% of the training rows, held out at random.")
    hyperparameters = {
        "problem type": task.problem_type,
        "labels": ", ".join(task.names[:20]),
        "text column(s)": ", ".join(text_columns(settings)),
        "max length": classification.max_length,
        **optimization_rows(settings.optimization),
        "epochs (best)": f"{results['epoch']} ({results['best_epoch']})",
        "best model by": f"eval_{metric}",
        "seed": settings.run.seed,
    }
    shown = {key: value for key, value in results.items() if isinstance(value, (int, float))}
    index = {key: results[f"eval_{key}"] for key in ("accuracy", "f1", "mse", "pearson") if f"eval_{key}" in results}
    write_model_card(
        settings.run.output_dir,
        model=model,
        pipeline_tag="text-classification",
        dataset_name=evaluated_on(data),
        metrics=index,
        results=shown,
        hyperparameters=hyperparameters,
        summary=f"A MiniGPT sequence classifier ({task.problem_type}) fine-tuned from "
        f"`{classification.model_name_or_path}` with "
        "`minigpt-finetune`. It pools the last non-padding token, as GPT2ForSequenceClassification does.",
        training_data=training_data,
        procedure="AdamW (no decay on biases and LayerNorm weights), evaluation after every epoch, the best epoch "
        f"by eval_{metric} kept; trained with Accelerate.",
        example_prompt=example,
        base_model=classification.model_name_or_path,
        repo_id=settings.hub.hub_model_id,
        pictures=pictures,
    )


def main(argv=None) -> None:
    run_script("minigpt-finetune", parse_args, train, argv)


if __name__ == "__main__":
    main()
