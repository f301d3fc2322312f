"""Report: what a run leaves beside its model. The log (a json line per entry, written as training goes), the
results, the loss curve, and the model card.

The card is a `huggingface_hub.ModelCard` filled in from the Jinja template in `model_cards/`: YAML metadata
(library, pipeline tag, license, base model and a `model-index` with the evaluation results, which the Hub shows as a
results widget) above the prose.
"""

import json
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..folders import RunFolder, atomic_file

TEMPLATE = "minigpt_card.md"
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")


def template_path() -> Path:
    # `model_cards/` is installed as the `hf_minigpt.model_cards` package (see pyproject.toml).
    return Path(str(resources.files("hf_minigpt.model_cards").joinpath(TEMPLATE)))


def file_names(files) -> str:
    """`a.csv`, `b.csv`: how a card names the data files of a run."""
    return ", ".join(f"`{Path(file).name}`" for file in files)


def evaluated_on(data) -> str:
    """The data a run's validation scores come from, for the card's metadata: the validation files, or the training
    files that the validation rows were held out of."""
    return ", ".join(Path(file).name for file in data.validation_file or data.train_file or [])


def optimization_rows(optimization) -> dict:
    """The hyper-parameter table rows that every training script shares, from its `OptimizationSettings`."""
    return {
        "per-device batch size": optimization.per_device_train_batch_size,
        "gradient accumulation steps": optimization.gradient_accumulation_steps,
        "learning rate": optimization.learning_rate,
        "schedule": f"{optimization.lr_scheduler_type}, {optimization.num_warmup_steps} warm-up steps",
        "weight decay": optimization.weight_decay,
    }


def write_model_card(
    folder,
    *,
    model,
    pipeline_tag: str,
    dataset_name: str,
    metrics: dict[str, float],
    results: dict,
    hyperparameters: dict,
    summary: str,
    training_data: str,
    procedure: str,
    example_prompt: str,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    language: str = "en",
    samples: dict[str, str] | None = None,
    pictures: tuple[Path, ...] = (),
) -> ModelCard:
    """Write `README.md` into `folder`. `metrics` (name -> value) become the card's `model-index`."""
    run_folder = RunFolder(folder)
    model_name = repo_id or run_folder.path.resolve().name
    if base_model is not None and Path(base_model).exists():
        base_model = None  # the metadata names Hub repositories only; the text still names the local folder
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=license,
        language=language,
        base_model=base_model,
        tags=["minigpt", "gpt2", pipeline_tag],
        eval_results=[
            EvalResult(
                task_type=pipeline_tag, dataset_type="text", dataset_name=dataset_name, dataset_split="validation",
                metric_type=name, metric_value=round(value, 4),
            )
            for name, value in metrics.items()
        ],
    )
    config = model.config
    card = ModelCard.from_template(
        card_data,
        template_path=template_path(),
        model_name=model_name,
        repo_id=repo_id or str(run_folder.path),
        summary=summary,
        architecture={key: getattr(config, key) for key in ARCHITECTURE},
        n_parameters=model.num_parameters(),
        labels=list(getattr(config, "id2label", {}).values()),
        example_prompt=example_prompt,
        training_data=training_data,
        procedure=procedure,
        hyperparameters=hyperparameters,
        results={name: f"{value:.4g}" if isinstance(value, float) else value for name, value in results.items()},
        loss_curve=run_folder.loss_curve.name if run_folder.loss_curve.exists() else None,
        pictures=[picture.name for picture in pictures if picture.exists()],
        samples=samples,
    )
    with atomic_file(run_folder.card) as scratch:
        card.save(scratch)
    return card


# ---------------------------------------------------------------------------------------------------------------------
# The log and the results


class Log:
    """The run's log (`RunFolder.log`): one json line per entry, appended as it is made, so that checkpoints need not
    carry it. A resumed run first drops the entries made after its checkpoint."""

    def __init__(self, output_dir, write: bool, resumed_at: int | None):
        self.path, self.write = RunFolder(output_dir).log, write
        if write:
            kept = [entry for entry in self.entries() if entry["step"] <= resumed_at] if resumed_at is not None else []
            self.path.write_text("".join(json.dumps(entry) + "\n" for entry in kept))

    def append(self, entry: dict) -> None:
        if self.write:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")

    def entries(self) -> list[dict]:
        return read_log(self.path.parent) if self.path.exists() else []


def read_log(output_dir) -> list[dict]:
    return [json.loads(line) for line in RunFolder(output_dir).log.read_text().splitlines()]


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
    with atomic_file(path) as scratch:
        figure.savefig(scratch, format="png")
    pyplot().close(figure)
