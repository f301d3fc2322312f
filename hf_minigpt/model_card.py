"""Model cards: the Jinja template in `model_cards/`, filled in from a run's own arguments and results.

The card is a `huggingface_hub.ModelCard`: YAML metadata (library, pipeline tag, license, base model and a
`model-index` with the evaluation results, which the Hub shows as a results widget) above the prose.
"""

from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE = "minigpt_card.md"
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")


def template_path() -> Path:
    # `model_cards/` is installed as the `hf_minigpt.model_cards` package (see pyproject.toml).
    return Path(str(resources.files("hf_minigpt.model_cards").joinpath(TEMPLATE)))


def file_names(files) -> str:
    """`a.csv`, `b.csv`: how a card names the data files of a run."""
    return ", ".join(f"`{Path(file).name}`" for file in files)


def optimization_rows(args) -> dict:
    """The hyper-parameter table rows that every training script shares."""
    return {
        "per-device batch size": args.per_device_train_batch_size,
        "gradient accumulation steps": args.gradient_accumulation_steps,
        "learning rate": args.learning_rate,
        "schedule": f"{args.lr_scheduler_type}, {args.num_warmup_steps} warm-up steps",
        "weight decay": args.weight_decay,
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
    pictures: tuple[str, ...] = (),
) -> ModelCard:
    """Write `README.md` into `folder`. `metrics` (name -> value) become the card's `model-index`."""
    folder = Path(folder)
    model_name = repo_id or folder.resolve().name
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
        repo_id=repo_id or str(folder),
        summary=summary,
        architecture={key: getattr(config, key) for key in ARCHITECTURE},
        n_parameters=model.num_parameters(),
        labels=list(getattr(config, "id2label", {}).values()),
        example_prompt=example_prompt,
        training_data=training_data,
        procedure=procedure,
        hyperparameters=hyperparameters,
        results={name: f"{value:.4g}" if isinstance(value, float) else value for name, value in results.items()},
        loss_curve="loss.png" if (folder / "loss.png").exists() else None,
        pictures=[picture for picture in pictures if (folder / picture).exists()],
        samples=samples,
    )
    card.save(folder / "README.md")
    return card
