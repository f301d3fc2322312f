"""Training beyond one process, on CPU processes (gloo): FSDP2 through an Accelerate config, resuming with another
number of processes, two "machines" on one host, and a lost process. Every launch runs in a process group of its own
that is ended on failure, and no process may outlive its test."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_minigpt.training.checkpoint import WEIGHTS_AND_OPTIMIZER, list_checkpoints

import launches
from test_pretrain import TINY, losses

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).parents[1] / "scripts" / "accelerate"
# 12 steps with warm-up and a linear decay, so that a resume must also put the schedule back where it was.
RUN = ["--max_train_steps", "12", "--num_warmup_steps", "2", "--lr_scheduler_type", "linear",
       "--validation_split_percentage", "10"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no", "--dynamo_backend", "no"]


def environment() -> dict:
    # No ACCELERATE_USE_CPU: the script itself must see that the processes have no GPU.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ACCELERATE_", "FSDP_"))}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(command: list[str]) -> subprocess.CompletedProcess:
    return launches.run(command, environment(), timeout=300)


def pretrain(output_dir: Path, *args: str, processes: int = 1, config: str | None = None):
    script = ["-m", "hf_minigpt.pretrain", *TINY, *RUN, "--output_dir", str(output_dir), *args]
    if config:
        return run([*LAUNCH, "--config_file", str(CONFIGS / config), *script])
    return run([sys.executable, *script])


def fsdp(output_dir: Path, *args: str):
    return pretrain(output_dir, "--per_device_train_batch_size", "4", *args, config="fsdp_cpu.yaml")


CHECKPOINT_HALF_WAY = ["--checkpointing_steps", "6"]


def one_process(output_dir: Path, *args: str):
    """The same global batch of 8 rows in one process: two batches of 4, accumulated."""
    return pretrain(output_dir, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", *args)


def eval_loss(output_dir: Path) -> float:
    return json.loads((output_dir / "all_results.json").read_text())["eval_loss"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 12 steps in one process and in two FSDP2 processes, each with a checkpoint at step 6."""
    root = tmp_path_factory.mktemp("scale_out")
    one_process(root / "one", *CHECKPOINT_HALF_WAY)
    result = fsdp(root / "fsdp", *CHECKPOINT_HALF_WAY)
    return root, result


def test_fsdp2_on_two_cpu_processes_trains_like_one_process(runs):
    root, result = runs
    assert "2 process(es)" in result.stdout
    assert losses(root / "fsdp") == pytest.approx(losses(root / "one"), rel=1e-3)
    assert eval_loss(root / "fsdp") == pytest.approx(eval_loss(root / "one"), rel=1e-3)
    # Sharded: each process wrote its own part of the checkpoint.
    assert sorted(path.name for path in (root / "fsdp" / "step_6" / WEIGHTS_AND_OPTIMIZER).glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]
    # The final folder is whole: the gathered weights, MiniGPT's own source, and the same logits as one process.
    config = json.loads((root / "fsdp" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_minigpt.MiniGPTForCausalLM"
    tokens = torch.arange(10).unsqueeze(0)
    logits = {name: AutoModelForCausalLM.from_pretrained(root / name)(tokens).logits for name in ("one", "fsdp")}
    torch.testing.assert_close(logits["fsdp"], logits["one"], rtol=1e-3, atol=1e-3)


def test_the_gpu_fsdp_config_shards_on_cpu_processes_too(tmp_path):
    """scripts/accelerate/fsdp.yaml is written for 8 GPUs in bf16; on 2 CPU processes in fp32 it takes the same
    path."""
    script = ["-m", "hf_minigpt.pretrain", *TINY, "--max_train_steps", "2", "--checkpointing_steps", "2",
              "--max_new_tokens", "0", "--output_dir", str(tmp_path)]
    run([*LAUNCH, "--config_file", str(CONFIGS / "fsdp.yaml"), "--num_processes", "2", *script])
    assert len(list((tmp_path / "step_2" / WEIGHTS_AND_OPTIMIZER).glob("*.distcp"))) == 2


def test_a_sharded_checkpoint_resumes_in_one_process(runs, tmp_path):
    root, _ = runs
    one_process(tmp_path / "resumed", "--resume_from_checkpoint", str(root / "fsdp" / "step_6"))
    assert losses(tmp_path / "resumed") == pytest.approx(losses(root / "one")[6:], rel=1e-3)
    assert eval_loss(tmp_path / "resumed") == pytest.approx(eval_loss(root / "one"), rel=1e-3)


def test_a_one_process_checkpoint_resumes_sharded_on_two(runs, tmp_path):
    root, _ = runs
    result = fsdp(tmp_path / "resumed", "--resume_from_checkpoint", str(root / "one" / "step_6"))
    assert "Resuming from" in result.stdout
    assert losses(tmp_path / "resumed") == pytest.approx(losses(root / "one")[6:], rel=1e-3)
    assert eval_loss(tmp_path / "resumed") == pytest.approx(eval_loss(root / "one"), rel=1e-3)


def test_another_global_batch_is_refused_before_training(runs, tmp_path):
    root, _ = runs
    result = launches.run([sys.executable, "-m", "hf_minigpt.pretrain", *TINY, *RUN, "--output_dir",
                           str(tmp_path / "resumed"), "--resume_from_checkpoint", str(root / "one" / "step_6")],
                          environment(), check=False)
    assert result.returncode == 1
    assert "was trained with other ['global_batch']" in result.stderr and "Traceback" not in result.stderr


def test_launches_that_would_not_train_as_one_run_are_refused(monkeypatch):
    from accelerate.state import AcceleratorState

    from hf_minigpt.pretrain import parse_args
    from hf_minigpt.training import processes

    settings = parse_args(["--output_dir", "unused"])
    try:
        # Two processes launched, but this one sees none of the others.
        monkeypatch.setattr(processes, "launched_processes", lambda: 2)
        with pytest.raises(processes.LaunchError, match="2 processes were launched, but each runs alone"):
            processes.build_accelerator(settings)
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        with pytest.raises(processes.LaunchError, match="DeepSpeed is not supported"):
            processes.build_accelerator(settings)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def machines(output_dirs: list[Path], logs: Path, *args: str) -> list[subprocess.Popen]:
    """Two `accelerate launch`es, one process each, as two machines would run them, meeting at 127.0.0.1. Their
    output goes to files: a pipe read only at the end could fill and stop one machine, and with it the other."""
    port = str(launches.free_port())
    return [launches.start([*LAUNCH, "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
                            "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                            "--rdzv_backend", "static", "-m", "hf_minigpt.pretrain", *TINY,
                            "--output_dir", str(output_dir), *args], environment(), log=logs / f"machine{rank}.log")
            for rank, output_dir in enumerate(output_dirs)]


def test_two_machines_train_like_one_process_and_only_the_first_writes(runs, tmp_path):
    root, _ = runs
    # Machine 1 is given a folder of its own, as it would be on its own disk: it must never write there.
    pair = machines([tmp_path / "machine0", tmp_path / "machine1"], tmp_path, *RUN, "--per_device_train_batch_size",
                    "4")
    for machine in pair:
        result = launches.finish(machine, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
    assert losses(tmp_path / "machine0") == pytest.approx(losses(root / "one"), rel=1e-3)
    assert eval_loss(tmp_path / "machine0") == pytest.approx(eval_loss(root / "one"), rel=1e-3)
    assert not (tmp_path / "machine1").exists()


def descendants(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:  # breadth first: pids wrap around, so a child's may be lower than its parent's
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_a_killed_process_ends_the_other_with_one_line(tmp_path):
    output_dir = tmp_path / "run"
    pair = machines([output_dir, output_dir], tmp_path, "--max_train_steps", "100000", "--checkpointing_steps", "5",
                    "--per_device_train_batch_size", "4")
    try:
        deadline = time.time() + 240
        # Checkpoints come and go (--save_total_limit 2) faster than a poll: wait for any.
        while not list_checkpoints(output_dir) and time.time() < deadline:
            assert all(machine.poll() is None for machine in pair), "a machine stopped before training\n" + "\n".join(
                launches.output(machine)[-3000:] for machine in pair)
            time.sleep(0.2)
        assert list_checkpoints(output_dir), "no checkpoint after 240 s\n" + "\n".join(
            launches.output(machine)[-3000:] for machine in pair)
        workers = [pid for pid in descendants(pair[1].pid) if "hf_minigpt.pretrain" in
                   Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")]
        os.kill(workers[-1], signal.SIGKILL)  # machine 1's training process
        survivor = launches.finish(pair[0], timeout=60)  # a hang fails here
    finally:
        for machine in pair:
            launches.end(machine)
    assert survivor.returncode != 0
    line = [line for line in survivor.stderr.splitlines() if line.startswith("minigpt-pretrain:")]
    assert len(line) == 1, survivor.stderr[-4000:]
    assert "rank 1 of this run was lost (rank 0 of 2 stops here" in line[0]
    assert f"Continue from {output_dir}/step_" in line[0] and "--resume_from_checkpoint latest" in line[0]
    assert "Traceback" not in survivor.stderr.split("minigpt-pretrain:")[0]


def test_the_gpu_check_script_runs_its_checks_on_cpu(tmp_path):
    """scripts/gpu_check.sh --smoke: the same script, tiny shapes, on CPU, so that it is ready when a GPU is."""
    script = Path(__file__).parents[1] / "scripts" / "gpu_check.sh"
    env = {**environment(), "PYTHON": sys.executable, "GPU_CHECK_LOGS": str(tmp_path)}
    result = launches.run(["bash", str(script), "--smoke"], env, timeout=300)
    table = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()
             if line.split() and line.split()[0] in ("attention", "bf16", "bench", "fsdp2", "int8")}
    assert table == {"attention": "pass", "bf16": "pass", "bench": "skipped", "fsdp2": "pass", "int8": "pass"}
