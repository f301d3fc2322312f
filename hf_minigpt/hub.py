"""Push a trained MiniGPT folder to a model hub.

    minigpt-push runs/pydoc your-name/minigpt-pydoc              # token from HF_TOKEN or `hf auth login`
    minigpt-push runs/pydoc your-name/minigpt-pydoc --dry-run    # assemble and list, send nothing

The repository is first assembled in a scratch folder exactly as it will be pushed: the weights re-saved from a
model that was just loaded (so weights that do not load are never sent), config with `auto_map` and the model's
source (it loads with `trust_remote_code=True` where `hf_minigpt` is not installed), tokenizer, generation
config, model card and pictures. Checkpoints (`step_*`) stay behind.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError
from transformers import AutoConfig, AutoTokenizer

from . import AUTO_CLASSES, MiniGPTConfig
from .cli import ArgumentParser, quiet_loading
from .folders import RunFolder, save_model_folder


class PushError(ValueError):
    """A folder that must not be pushed as it is."""


class PushRefused(Exception):
    """A training run's model is saved, but its push was refused: the script ends with a failure status."""


def load_pushable_model(folder: Path):
    """The folder's model through the Auto class its config names; any failure is a PushError."""
    try:
        config = AutoConfig.from_pretrained(folder)
        if not isinstance(config, MiniGPTConfig):
            raise PushError(f"{folder} holds a {config.model_type!r} model, not MiniGPT.")
        architecture = (config.architectures or ["MiniGPTForCausalLM"])[0]
        model_class = next(cls for cls in AUTO_CLASSES.values() if cls.__name__ == architecture)
        return model_class.from_pretrained(folder)
    except PushError:
        raise
    except Exception as error:  # safetensors, torch and transformers each raise their own kinds
        raise PushError(f"The model in {folder} does not load, so it is not pushed: {error}") from error


def check_card(folder: Path) -> ModelCard:
    card_file = RunFolder(folder).card
    if not card_file.exists():
        raise PushError(f"{folder} has no model card (README.md): the training scripts write one.")
    card = ModelCard.load(card_file)
    if not card.data.eval_results:
        raise PushError(f"The model card in {folder} reports no evaluation results (no `model-index`): not pushed.")
    return card


def assemble(folder, staging) -> list[Path]:
    """Write into `staging` exactly what will be pushed; return the files."""
    folder, staging = Path(folder), Path(staging)
    if not folder.is_dir():
        raise PushError(f"{folder}: no such folder.")
    if not (folder / "config.json").exists():
        raise PushError(f"{folder} is not a model folder (it has no config.json).")
    check_card(folder)
    model = load_pushable_model(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise PushError(f"The tokenizer in {folder} does not load: {error}") from error
    # safetensors, config with auto_map, source files, generation config, tokenizer
    save_model_folder(staging, model, tokenizer, existing="replace")
    for pattern in RunFolder.PUBLISHED:
        for file in folder.glob(pattern):
            shutil.copy2(file, staging / file.name)
    return sorted(path for path in staging.rglob("*") if path.is_file())


def push(folder, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str = "Upload MiniGPT model", token: str | None = None, endpoint: str | None = None,
         dry_run: bool = False, echo=print) -> str:
    """Push `folder` to `repo_id` (created if needed) and return the commit URL, or, with `dry_run`, the path
    of the assembled folder."""
    staging = Path(tempfile.mkdtemp(prefix="minigpt-push-"))
    try:
        files = assemble(folder, staging)
        size = sum(file.stat().st_size for file in files)
        target = f"{repo_id}{'@' + revision if revision else ''}{' (private)' if private else ''}"
        echo(f"{'Would push' if dry_run else 'Pushing'} {len(files)} files ({size / 1e6:.2f} MB) to {target}:")
        for file in files:
            echo(f"  {file.relative_to(staging)}  {file.stat().st_size:,} bytes")
        if dry_run:
            echo(f"Assembled in {staging} (nothing was sent).")
            return str(staging)
        api = HfApi(endpoint=endpoint, token=token)  # token None: HF_TOKEN, then the saved login
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=staging, revision=revision, commit_message=commit_message
        )
        echo(f"Pushed: {commit.commit_url}")
        return commit.commit_url
    finally:
        if not dry_run:
            shutil.rmtree(staging, ignore_errors=True)


def refusal(error: HfHubHTTPError, repo_id: str) -> str:
    """A push the hub refused, in one line that says what to do. (The error's own text names the request, never the
    token.)"""
    status = getattr(error.response, "status_code", None)
    if status == 401:
        return ("the hub refused the token (401 Unauthorized): log in with `hf auth login`, or pass a token with "
                "write access (--token, or HF_TOKEN).")
    if status == 403:
        return (f"this token may not write to {repo_id} (403 Forbidden): use a token with write access to "
                f"{repo_id.split('/')[0]!r}, or push to a repository under your own name.")
    return f"the hub refused the push: {str(error).splitlines()[0]}"


def push_after_training(hub, output_dir, echo=print) -> None:
    """What a training script's `HubSettings` ask for once the output folder is complete (the main process only). A
    refused push raises PushRefused, whose one line says how to push the saved folder later."""
    if not hub.push_to_hub:
        return
    try:
        push(output_dir, hub.hub_model_id, private=hub.hub_private_repo, token=hub.hub_token, echo=echo,
             commit_message=f"Training results from {Path(output_dir).name}")
    except (PushError, HfHubHTTPError) as error:
        reason = refusal(error, hub.hub_model_id) if isinstance(error, HfHubHTTPError) else str(error)
        raise PushRefused(f"not pushed: {reason} The model is saved in {output_dir}: `minigpt-push {output_dir} "
                          f"{hub.hub_model_id}` pushes it.") from error


def main(argv=None) -> None:
    parser = ArgumentParser(
        prog="minigpt-push", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", help="An output folder of minigpt-pretrain or minigpt-finetune.")
    parser.add_argument("repo_id", help="your-name/model-name")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--revision", help="Branch to push to (created if needed); default main.")
    parser.add_argument("--commit_message", default="Upload MiniGPT model")
    parser.add_argument("--token", help="Default: HF_TOKEN, or the token saved by `hf auth login`.")
    parser.add_argument("--endpoint", help="A self-hosted hub, e.g. https://hub.example.com (default: HF_ENDPOINT).")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="Assemble the folder and list what would be sent; send nothing.")
    args = parser.parse_args(argv)
    quiet_loading()
    try:
        push(args.folder, args.repo_id, private=args.private, revision=args.revision,
             commit_message=args.commit_message, token=args.token, endpoint=args.endpoint, dry_run=args.dry_run)
    except PushError as error:
        sys.exit(f"minigpt-push: error: {error}")
    except HfHubHTTPError as error:
        sys.exit(f"minigpt-push: error: {refusal(error, args.repo_id)}")


if __name__ == "__main__":
    main()
