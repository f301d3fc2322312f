"""The three fine-tuning tasks, single-label and multi-label classification and regression: each knows its label
names, how labels are encoded for the loss, and turns logits into predictions, a loss and metrics.

The task follows the labels of the training data (`Task.of`): strings or integers are single-label, a list of labels
per row is multi-label, floats are regression.
"""

import datasets
import numpy as np
import torch
from torch.nn import functional as F

from .training.data import DataError

# Metric -> whether larger is better.
METRICS = {"accuracy": True, "f1": True, "loss": False, "mse": False, "pearson": True}


class Task:
    problem_type: str  # transformers' name, as the model's config stores it
    default_metric: str
    metrics: tuple[str, ...]  # those --metric_for_best_model may name, besides the loss

    def __init__(self, names: list[str]):
        self.names = names
        self.label2id = {name: i for i, name in enumerate(names)}

    @staticmethod
    def of(train: datasets.Dataset, column: str) -> "Task":
        """The task the training data's label column asks for, with its label names."""
        feature = train.features[column]
        if isinstance(feature, (datasets.Sequence, datasets.List, list)):
            return MultiLabel([str(label) for label in sorted({label for row in train[column] for label in row})])
        if isinstance(feature, datasets.Value) and feature.dtype.startswith("float"):
            return Regression(["score"])
        if isinstance(feature, datasets.ClassLabel):
            return SingleLabel(list(feature.names))
        return SingleLabel([str(value) for value in sorted(set(train[column]))])

    def best_by(self, metric: str | None) -> str:
        metric = metric or self.default_metric
        if metric not in (*self.metrics, "loss"):
            raise DataError(f"--metric_for_best_model {metric} does not apply to {self.problem_type}.")
        return metric

    def encode(self, split: datasets.Dataset, name: str, column: str) -> list:
        """The labels of `split` as the model's loss wants them."""
        values = split[column]
        if isinstance(split.features[column], datasets.ClassLabel):
            values = [split.features[column].int2str(value) for value in values]
        rows = self.label_rows(values)
        unknown = sorted({str(label) for row in rows for label in row} - self.label2id.keys())
        if unknown:
            raise DataError(f"The {name} data has label(s) {unknown[:5]} that never occur in the training data "
                            f"(known: {sorted(self.label2id)[:20]}).")
        return self.encode_rows(rows)

    def score(self, logits: torch.Tensor, labels: torch.Tensor) -> dict:
        """The loss and the metrics of predictions against known labels."""
        return {"loss": self.loss(logits, labels), **self.metrics_of(self.predictions(logits), labels.numpy())}

    def classification_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict:
        from sklearn.metrics import accuracy_score, classification_report, f1_score

        classes = list(range(len(self.names)))
        report = classification_report(
            labels, predictions, labels=classes, target_names=self.names, output_dict=True, zero_division=0
        )
        return {
            "accuracy": float(accuracy_score(labels, predictions)),  # exact match of all labels for multi-label
            "f1": float(f1_score(labels, predictions, labels=classes, average="macro", zero_division=0)),
            "report": {name: {key: round(value, 4) for key, value in report[name].items()} for name in self.names},
        }


class SingleLabel(Task):
    problem_type, default_metric, metrics = "single_label_classification", "accuracy", ("accuracy", "f1")

    def label_rows(self, values) -> list[list]:
        return [[value] for value in values]

    def encode_rows(self, rows) -> list[int]:
        return [self.label2id[str(row[0])] for row in rows]

    def predictions(self, logits: torch.Tensor) -> np.ndarray:
        return logits.argmax(-1).numpy()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        return F.cross_entropy(logits, labels).item()

    metrics_of = Task.classification_metrics

    def shown(self, logits: torch.Tensor) -> tuple[list[str], list[str]]:
        """Each prediction by label name, and the probability of the predicted class."""
        return ([self.names[i] for i in self.predictions(logits)],
                [f"{p:.4f}" for p in logits.softmax(-1).max(-1).values.tolist()])


class MultiLabel(Task):
    problem_type, default_metric, metrics = "multi_label_classification", "f1", ("accuracy", "f1")

    def label_rows(self, values) -> list[list]:
        return values  # a list of labels per row already

    def encode_rows(self, rows) -> list[list[float]]:
        return [[float(name in {str(label) for label in row}) for name in self.label2id] for row in rows]

    def predictions(self, logits: torch.Tensor) -> np.ndarray:
        return (logits > 0).int().numpy()  # sigmoid > 0.5

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        return F.binary_cross_entropy_with_logits(logits, labels.float()).item()

    metrics_of = Task.classification_metrics

    def shown(self, logits: torch.Tensor) -> tuple[list[str], list[str]]:
        """The predicted labels, and the probability of each."""
        chosen = self.predictions(logits)
        return (["|".join(name for name, on in zip(self.names, row) if on) for row in chosen],
                ["|".join(f"{p:.4f}" for p, on in zip(row, picks) if on)
                 for row, picks in zip(logits.sigmoid().tolist(), chosen)])


class Regression(Task):
    problem_type, default_metric, metrics = "regression", "mse", ("mse", "pearson")

    def encode(self, split: datasets.Dataset, name: str, column: str) -> list[float]:
        return [float(value) for value in split[column]]

    def predictions(self, logits: torch.Tensor) -> np.ndarray:
        return logits.squeeze(-1).numpy()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        return F.mse_loss(logits.squeeze(-1), labels.float()).item()

    def metrics_of(self, predictions: np.ndarray, labels: np.ndarray) -> dict:
        pearson = float(np.corrcoef(predictions, labels)[0, 1]) if np.std(predictions) > 0 else 0.0
        return {"mse": float(np.mean((predictions - labels) ** 2)), "pearson": pearson}

    def shown(self, logits: torch.Tensor) -> tuple[list[str], list[str]]:
        predictions = [f"{value:.6g}" for value in self.predictions(logits)]
        return predictions, [""] * len(predictions)
