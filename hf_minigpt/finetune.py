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
import numpy as np
import torch
import transformers
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding

from . import MiniGPTConfig, MiniGPTForSequenceClassification
from .hub import push_after_training
from .folders import RunFolder, save_model_folder
from .training.checkpoint import load_whole_weights
from .training.data import DataError, check_columns, hold_out, load_files, row_location, train_loader
from .training.loop import TrainingRun, run_script
from .training.report import evaluated_on, file_names, optimization_rows, pyplot, write_model_card
from .training.settings import (
    DataSettings,
    HubSettings,
    OptimizationSettings,
    RunSettings,
    model_source_problem,
    parse,
    setting,
)
from .training.tokens import fit_embeddings

SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
# Metric -> whether larger is better.
METRICS = {"accuracy": True, "f1": True, "loss": False, "mse": False, "pearson": True}


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


def infer_problem_type(feature) -> str:
    if isinstance(feature, (datasets.Sequence, datasets.List, list)):
        return MULTI
    if isinstance(feature, datasets.Value) and feature.dtype.startswith("float"):
        return REGRESSION
    return SINGLE


def label_names(train: datasets.Dataset, column: str, problem_type: str) -> list[str]:
    feature = train.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if problem_type == REGRESSION:
        return ["score"]
    values = train[column]
    if problem_type == MULTI:
        values = [label for row in values for label in row]
    return [str(value) for value in sorted(set(values))]


def encode_labels(split: datasets.Dataset, name: str, column: str, problem_type: str, label2id: dict) -> list:
    """Labels as the model's loss wants them: class ids, multi-hot floats, or floats."""
    values = split[column]
    if isinstance(split.features[column], datasets.ClassLabel):
        values = [split.features[column].int2str(value) for value in values]
    if problem_type == REGRESSION:
        return [float(value) for value in values]
    rows = values if problem_type == MULTI else [[value] for value in values]
    unknown = sorted({str(label) for row in rows for label in row} - label2id.keys())
    if unknown:
        raise DataError(
            f"The {name} data has label(s) {unknown[:5]} that never occur in the training data "
            f"(known: {sorted(label2id)[:20]})."
        )
    if problem_type == SINGLE:
        return [label2id[str(row[0])] for row in rows]
    return [[float(str(i) in {str(label) for label in row}) for i in label2id] for row in rows]


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


def logits_to_predictions(logits: torch.Tensor, problem_type: str) -> np.ndarray:
    if problem_type == SINGLE:
        return logits.argmax(-1).numpy()
    if problem_type == MULTI:
        return (logits > 0).int().numpy()  # sigmoid > 0.5
    return logits.squeeze(-1).numpy()


def loss_of_logits(logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> float:
    """The loss the model trains on, over the whole (gathered) evaluation set at once."""
    if problem_type == SINGLE:
        return F.cross_entropy(logits, labels).item()
    if problem_type == MULTI:
        return F.binary_cross_entropy_with_logits(logits, labels.float()).item()
    return F.mse_loss(logits.squeeze(-1), labels.float()).item()


def compute_metrics(predictions: np.ndarray, labels: np.ndarray, problem_type: str, names: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, classification_report, f1_score

    if problem_type == REGRESSION:
        pearson = float(np.corrcoef(predictions, labels)[0, 1]) if np.std(predictions) > 0 else 0.0
        return {"mse": float(np.mean((predictions - labels) ** 2)), "pearson": pearson}
    classes = list(range(len(names)))
    report = classification_report(
        labels, predictions, labels=classes, target_names=names, output_dict=True, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(labels, predictions)),  # exact match of all labels for multi-label
        "f1": float(f1_score(labels, predictions, labels=classes, average="macro", zero_division=0)),
        "report": {name: {key: round(value, 4) for key, value in report[name].items()} for name in names},
    }


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


def score(logits: torch.Tensor, labels: torch.Tensor, problem_type: str, names: list[str]) -> dict:
    """The loss and the metrics of predictions against known labels."""
    metrics = compute_metrics(logits_to_predictions(logits, problem_type), labels.numpy(), problem_type, names)
    return {"loss": loss_of_logits(logits, labels, problem_type), **metrics}


def validation_metrics(model, loader, accelerator, problem_type: str, names: list[str]) -> dict:
    return score(*predict(model, loader, accelerator), problem_type, names)


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
    figure.savefig(path)
    pyplot().close(figure)


# ---------------------------------------------------------------------------------------------------------------------
# Training


def train(settings: FinetuneSettings, accelerator) -> dict:
    resume, task = settings.run.checkpoint_to_resume, settings.classification
    splits = load_splits(settings)
    problem_type = infer_problem_type(splits["train"].features[task.label_column])
    names = label_names(splits["train"], task.label_column, problem_type)
    label2id = {name: i for i, name in enumerate(names)}
    metric = task.metric_for_best_model or {SINGLE: "accuracy", MULTI: "f1", REGRESSION: "mse"}[problem_type]
    if (metric in ("mse", "pearson")) != (problem_type == REGRESSION):
        raise DataError(f"--metric_for_best_model {metric} does not apply to {problem_type}.")

    tokenizer = AutoTokenizer.from_pretrained(resume or task.model_name_or_path)
    if tokenizer.pad_token is None:  # GPT-2's tokenizer has none: pad with EOS, pooling skips it
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding keeps every text at positions 0..n-1, as in pre-training (GPT-2 does not shift positions).
    tokenizer.padding_side = "right"

    def encode(split: datasets.Dataset, name: str) -> datasets.Dataset:
        encoded = split.map(
            lambda batch: tokenizer(*[batch[column] for column in text_columns(settings)], truncation=True,
                                    max_length=task.max_length),
            batched=True, num_proc=settings.data.preprocessing_num_workers, remove_columns=split.column_names,
            desc=f"Tokenizing {name}",
        )
        if task.label_column in split.column_names:
            labels = encode_labels(split, name, task.label_column, problem_type, label2id)
            encoded = encoded.add_column("labels", labels)
        return encoded

    with accelerator.main_process_first():
        encoded = {name: encode(split, name) for name, split in splits.items()}
    model = load_classifier(task.model_name_or_path, resume, problem_type, label2id, tokenizer, accelerator.print)
    if settings.optimization.learning_rate is None:
        settings.optimization.learning_rate = fine_tuning_rate(model.num_parameters())
        accelerator.print(f"Learning rate {settings.optimization.learning_rate:.1e}, for {model.num_parameters():,} "
                          "parameters (--learning_rate chooses another).")
    collate = DataCollatorWithPadding(tokenizer)
    batch_size = settings.optimization.per_device_train_batch_size
    eval_loader = DataLoader(encoded["validation"], batch_size=settings.data.per_device_eval_batch_size,
                             collate_fn=collate)
    run = TrainingRun(
        accelerator, settings, model, tokenizer, train_loader(encoded["train"], batch_size, collate), eval_loader,
        geometry={"max_length": task.max_length}, unit="samples", items_per_batch=batch_size, name="minigpt-finetune",
    )
    extra = run.state.extra
    extra.setdefault("best", None)
    extra.setdefault("epochs_without_improvement", 0)
    accelerator.print(
        f"{problem_type}: {len(names)} label(s) {names[:10]}; {len(encoded['train'])} training rows, "
        f"{run.plan.steps_per_epoch} steps per epoch, {run.plan.max_steps} steps, "
        f"{accelerator.num_processes} process(es)."
    )
    best_folder = RunFolder(settings.run.output_dir).best_model

    def after_epoch(epoch, write) -> bool:
        metrics = validation_metrics(run.model, run.eval_loader, accelerator, problem_type, names)
        run.log({f"eval_{key}": value for key, value in metrics.items() if key != "report"}, "eval")
        write(f"epoch {epoch}: " + ", ".join(f"eval_{k} {v:.4f}" for k, v in metrics.items() if k != "report"))
        best = extra["best"]
        if best is None or (metrics[metric] > best[metric] if METRICS[metric] else metrics[metric] < best[metric]):
            extra["best"] = {**metrics, "epoch": epoch}
            extra["epochs_without_improvement"] = 0
            save_model_folder(best_folder, run.model, tokenizer, accelerator=accelerator, existing="replace")
        else:
            extra["epochs_without_improvement"] += 1
        patience = task.early_stopping_patience
        if patience and extra["epochs_without_improvement"] >= patience:
            write(f"No better eval_{metric} for {patience} epoch(s): stopping early.")
            return True
        return False

    run.fit(classification_loss, after_epoch=after_epoch)
    return save_outputs(settings, run, encoded, collate, problem_type, names, metric, splits)


def classification_loss(model, batch) -> torch.Tensor:
    return model(**batch).loss


def load_classifier(source: str, resume, problem_type, label2id, tokenizer, say) -> MiniGPTForSequenceClassification:
    labels = dict(
        num_labels=len(label2id), id2label={i: name for name, i in label2id.items()}, label2id=label2id,
        problem_type=problem_type, pad_token_id=tokenizer.pad_token_id,
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
        say(f"A new classification head ({', '.join(sorted(info['missing_keys']))}, {len(label2id)} labels) starts "
            "from random weights; fine-tuning trains it.")
    fit_embeddings(model, tokenizer)
    return model


def save_outputs(settings: FinetuneSettings, run, encoded, collate, problem_type, names, metric, splits) -> dict:
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
            results.update({f"test_{key}": value for key, value in score(*test, problem_type, names).items()
                            if key != "report"})
    # The best model's validation predictions: for the confusion matrix, and for predictions.csv without a test set.
    validation_logits, validation_labels = predict(run.model, run.eval_loader, accelerator)
    results["eval_report"] = best.get("report")
    run.save(results)
    if accelerator.is_main_process:
        shutil.rmtree(folder.best_model)
        pictures = ()
        if problem_type == SINGLE:
            plot_confusion_matrix(logits_to_predictions(validation_logits, problem_type), validation_labels.numpy(),
                                  names, folder.confusion_matrix)
            pictures = (folder.confusion_matrix,)
        predicted_split, logits = ("test", test[0]) if test is not None else ("validation", validation_logits)
        write_predictions(folder.predictions, splits[predicted_split], settings, logits, problem_type,
                          names)
        example = splits["validation"][settings.data.text_column][0]  # the user's own kind of text
        write_classification_card(settings, model, results, problem_type, names, metric, pictures, example)
        summary = {key: value for key, value in results.items() if isinstance(value, (int, float))}
        print(f"Saved the best model (epoch {best['epoch']}) to {folder.path}: "
              + ", ".join(f"{key} {value:.4g}" for key, value in summary.items()))
        push_after_training(settings.hub, folder.path)
    accelerator.wait_for_everyone()
    return results


def write_predictions(path, split, settings: FinetuneSettings, logits, problem_type: str, names: list[str]) -> None:
    """One row per text: the prediction by label name and how sure the model is of it (the probability of the
    predicted class; for multi-label, of each predicted label)."""
    predictions = logits_to_predictions(logits, problem_type)
    if problem_type == SINGLE:
        shown = [names[i] for i in predictions]
        scores = [f"{p:.4f}" for p in logits.softmax(-1).max(-1).values.tolist()]
    elif problem_type == MULTI:
        shown = ["|".join(name for name, on in zip(names, row) if on) for row in predictions]
        probabilities = logits.sigmoid().tolist()
        scores = ["|".join(f"{p:.4f}" for p, on in zip(row, chosen) if on) for row, chosen in
                  zip(probabilities, predictions)]
    else:
        shown = [f"{value:.6g}" for value in predictions]
        scores = [""] * len(shown)
    label_column = settings.classification.label_column
    columns = text_columns(settings) + ([label_column] if label_column in split.column_names else [])
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", *columns, "prediction", "score"])
        for index, (row, prediction, score) in enumerate(zip(split.select_columns(columns), shown, scores)):
            writer.writerow([index, *[row[column] for column in columns], prediction, score])


def write_classification_card(settings: FinetuneSettings, model, results, problem_type, names, metric,
                              pictures, example: str) -> None:
    data, task = settings.data, settings.classification
    training_data = f"Training: {file_names(data.train_file)}."
    training_data += f" Validation: {file_names(data.validation_file)}." if data.validation_file else (
        f" Validation: {data.validation_split_percentage}% of the training rows, held out at random.")
    hyperparameters = {
        "problem type": problem_type,
        "labels": ", ".join(names[:20]),
        "text column(s)": ", ".join(text_columns(settings)),
        "max length": task.max_length,
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
        summary=f"A MiniGPT sequence classifier ({problem_type}) fine-tuned from `{task.model_name_or_path}` with "
        "`minigpt-finetune`. It pools the last non-padding token, as GPT2ForSequenceClassification does.",
        training_data=training_data,
        procedure="AdamW (no decay on biases and LayerNorm weights), evaluation after every epoch, the best epoch "
        f"by eval_{metric} kept; trained with Accelerate.",
        example_prompt=example,
        base_model=task.model_name_or_path,
        repo_id=settings.hub.hub_model_id,
        pictures=pictures,
    )


def main(argv=None) -> None:
    run_script("minigpt-finetune", parse_args, train, argv)


if __name__ == "__main__":
    main()
