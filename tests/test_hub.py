"""minigpt-push and --push_to_hub, end to end with huggingface_hub's real client against a local hub."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from hf_minigpt.hub import main as push_main
from hub_server import FakeHub
from test_pretrain import pretrain

TOKEN = "hf_test_secret_token_1234"


@pytest.fixture(scope="module")
def hub():
    with FakeHub(writers={TOKEN: {"user"}}) as hub:
        yield hub


def hub_env(hub, tmp_path, token=TOKEN) -> dict:
    # HF_ENDPOINT is read when huggingface_hub is imported: it is set for fresh subprocesses only. Without Xet
    # storage, weights go through Git LFS, which the local hub speaks.
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained(hub, tmp_path_factory):
    """A tiny pre-training run that pushes itself when it ends (--push_to_hub)."""
    folder = tmp_path_factory.mktemp("hub")
    pretrain("--max_train_steps", "10", "--output_dir", str(folder / "run"), "--push_to_hub",
             "--hub_model_id", "user/from-training", env=hub_env(hub, folder))
    return folder / "run"


def test_training_script_pushes_and_the_model_loads_from_the_hub_as_remote_code(hub, trained, tmp_path):
    files = hub.files("user/from-training")
    expected = {"model.safetensors", "config.json", "modeling_minigpt.py", "configuration_minigpt.py",
                "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md", "loss.png",
                "all_results.json"}
    expected |= {f"{module}_minigpt.py" for module in ("compat", "conversion", "loss", "checks")}  # (model imports)
    assert expected <= files.keys() and not any(name.startswith("step_") for name in files)
    # The weights went through Git LFS, as the Hub takes them; the small files inside the commit.
    assert {path for path in hub.lfs_paths if path.startswith("user/from-training/")} == {
        "user/from-training/model.safetensors"}
    assert json.loads(files["config.json"])["auto_map"]["AutoModelForCausalLM"].startswith("modeling_minigpt.")

    # A fresh process that cannot import hf_minigpt loads the pushed repository through the hub API.
    script = textwrap.dedent("""
        import json, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "hf_minigpt":
                    raise ImportError("hf_minigpt is blocked in this test")
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained("user/from-training", trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained("user/from-training")
        ids = tokenizer("The assert statement", return_tensors="pt").input_ids
        with torch.no_grad():
            print("RESULT", json.dumps({"ids": ids.tolist(), "logits": model(ids).logits[0, -1, :8].tolist(),
                                        "class": type(model).__module__}))
    """)
    env = hub_env(hub, tmp_path)
    env.pop("PYTHONPATH", None)
    # AutoTokenizer reads the config too and asks before running its code; stdin answers no, which it survives.
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.split("RESULT ")[1])
    assert remote["class"].startswith("transformers_modules.")  # the pushed source, not the package

    local = AutoModelForCausalLM.from_pretrained(trained).eval()
    with torch.no_grad():
        expected_logits = local(torch.tensor(remote["ids"])).logits[0, -1, :8]
    torch.testing.assert_close(torch.tensor(remote["logits"]), expected_logits, atol=1e-5, rtol=1e-5)

    # The card on the hub holds the run's own numbers.
    card = ModelCard(files["README.md"].decode())
    results = json.loads(files["all_results.json"])
    index = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert index["perplexity"] == pytest.approx(results["perplexity"], abs=1e-4)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert 'from_pretrained("user/from-training", trust_remote_code=True)' in card.text


def test_push_to_a_private_branch_never_shows_the_token(hub, trained, tmp_path):
    command = [sys.executable, "-m", "hf_minigpt.hub", str(trained), "user/branched", "--private",
               "--revision", "dev", "--commit_message", "First cut"]
    result = subprocess.run(command, capture_output=True, text=True, env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert TOKEN not in result.stdout + result.stderr
    assert hub.repos["user/branched"]["private"] is True
    assert "model.safetensors" in hub.files("user/branched", "dev") and not hub.files("user/branched", "main")
    # The token did travel, as a header.
    assert any(headers.get("authorization") == f"Bearer {TOKEN}" for _, path, headers in hub.requests
               if path.startswith("/api/models/user/branched/commit"))


@pytest.mark.parametrize("token, repo_id, said", [
    ("hf_not_a_token", "user/refused", "the hub refused the token (401 Unauthorized): log in with `hf auth login`"),
    (TOKEN, "someone-else/model", "this token may not write to someone-else/model (403 Forbidden): use a token "
                                  "with write access to 'someone-else'"),
])
def test_a_push_the_hub_refuses_ends_in_one_line_that_says_what_to_do(hub, trained, tmp_path, token, repo_id, said):
    push = Path(sys.executable).with_name("minigpt-push")
    result = subprocess.run([push, str(trained), repo_id], capture_output=True, text=True,
                            env=hub_env(hub, tmp_path, token))
    assert result.returncode == 1
    assert result.stderr.startswith(f"minigpt-push: error: {said}") and result.stderr.count("\n") == 1
    assert token not in result.stdout + result.stderr and repo_id not in hub.repos


def test_a_refused_push_after_training_keeps_the_model_and_fails_the_run(hub, tmp_path):
    output_dir = tmp_path / "run"
    result = pretrain("--max_train_steps", "2", "--output_dir", str(output_dir), "--push_to_hub", "--hub_model_id",
                      "user/refused-after-training", env=hub_env(hub, tmp_path, "hf_not_a_token"), check=False)
    assert result.returncode == 1  # `train && deploy` stops
    assert result.stderr.strip().splitlines()[-1] == (
        "minigpt-pretrain: not pushed: the hub refused the token (401 Unauthorized): log in with `hf auth login`, or "
        "pass a token with write access (--token, or HF_TOKEN). The model is saved in "
        f"{output_dir}: `minigpt-push {output_dir} user/refused-after-training` pushes it.")
    assert (output_dir / "model.safetensors").is_file() and "Traceback" not in result.stderr


def test_dry_run_assembles_the_folder_and_sends_nothing(hub, trained, capsys):
    before = len(hub.requests)
    push_main([str(trained), "user/dry", "--dry-run", "--endpoint", hub.url])
    printed = capsys.readouterr().out
    assert len(hub.requests) == before
    assert "Would push" in printed and "model.safetensors" in printed and "modeling_minigpt.py" in printed
    staging = printed.split("Assembled in ")[1].split(" (nothing")[0]
    assert sorted(os.listdir(staging)) == sorted(line.split()[0] for line in printed.splitlines()
                                                 if line.startswith("  "))
    shutil.rmtree(staging)


def test_folders_that_must_not_be_pushed_are_refused(hub, trained, tmp_path):
    no_results = tmp_path / "no_results"
    shutil.copytree(trained, no_results)
    card = ModelCard.load(no_results / "README.md")
    card.data.eval_results = None
    card.data.model_name = None
    card.save(no_results / "README.md")
    with pytest.raises(SystemExit, match="reports no evaluation results"):
        push_main([str(no_results), "user/refused", "--endpoint", hub.url])

    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(SystemExit, match="does not load, so it is not pushed"):
        push_main([str(broken), "user/refused", "--endpoint", hub.url])
    assert "user/refused" not in hub.repos
