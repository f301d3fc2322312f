#!/usr/bin/env bash
# What only a GPU machine can show, in one run of under 10 minutes, ending with one summary table:
#   attention   flash_attention_2 / sdpa / eager give the same logits (bf16)
#   bf16        minigpt-pretrain steps in bf16 track the fp32 losses
#   bench       minigpt-bench --device cuda at GPT-2 124M: tokens/s and MFU, and the compiled static-cache decode
#   fsdp2       scripts/accelerate/fsdp.yaml on every visible GPU logs the losses of 1 GPU (same global batch)
#   int8        the int8 decode (a CPU path: skipped on CUDA, said so)
# Usage, from the repository root, in the project's environment (torch with CUDA):
#   bash scripts/gpu_check.sh                 # on a CUDA machine
#   bash scripts/gpu_check.sh --smoke         # tiny shapes on CPU: checks the script itself (tests/test_scale_out.py)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SMOKE=0 STEP=""
while [ $# -gt 0 ]; do
    case $1 in
        --smoke) SMOKE=1 ;;
        --step) STEP=$2; shift ;;  # internal: one check, in a process of its own (so that `timeout` can end it)
        *) echo "usage: bash scripts/gpu_check.sh [--smoke]" >&2; exit 2 ;;
    esac
    shift
done

if [ -z "$STEP" ] && [ "$SMOKE" = 0 ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: no CUDA GPU visible to torch (install the CUDA build of torch); nothing was checked." >&2
    exit 2
fi
if [ "$SMOKE" = 1 ]; then
    DEVICE=cpu GPUS=2 SHAPE=(--n_layer 2 --n_head 2 --n_embd 64) STEPS=6
else
    DEVICE=cuda GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
    SHAPE=(--n_layer 12 --n_head 12 --n_embd 768) STEPS=30
fi
export DEVICE OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false

if [ -z "$STEP" ]; then
    WORK=${GPU_CHECK_LOGS:-runs/gpu_check/$(date +%Y%m%d-%H%M%S)}  # each check's log stays here
    mkdir -p "$WORK"
    export WORK
    SUMMARY="$WORK/summary.tsv"
    printf 'check\tresult\tdetail\n' > "$SUMMARY"
fi

record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$SUMMARY"; }

# Runs one check with a time limit; its last output line is the detail, its exit status the result
# (0 pass, 3 skipped, anything else fail).
check() {
    local name=$1 limit=$2
    echo "=== $name"
    local smoke=()
    [ "$SMOKE" = 1 ] && smoke=(--smoke)
    timeout --kill-after=10 "$limit" bash "$0" "${smoke[@]}" --step "$name" > "$WORK/$name.log" 2>&1
    local status=$?
    local detail
    detail=$(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-150)
    case $status in
        0) record "$name" pass "$detail" ;;
        3) record "$name" skipped "$detail" ;;
        124|137) record "$name" FAIL "timed out after $limit s" ;;
        *) record "$name" FAIL "exit $status: $detail"; tail -n 20 "$WORK/$name.log" ;;
    esac
}

attention() {
    "$PYTHON" - <<'PY'
import importlib.util, os, sys, torch
from hf_minigpt import MiniGPTConfig, MiniGPTForCausalLM
device = torch.device(os.environ["DEVICE"])
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
config = MiniGPTConfig(n_layer=2, n_head=4, n_embd=256, vocab_size=1000, n_positions=256)
torch.manual_seed(0)
model = MiniGPTForCausalLM(config).to(device, dtype).eval()
ids = torch.randint(0, 1000, (2, 200), device=device)
mask = torch.ones_like(ids)
mask[0, :37] = 0  # a left-padded row
implementations = ["eager", "sdpa"]
if device.type == "cuda" and importlib.util.find_spec("flash_attn"):
    implementations.append("flash_attention_2")
logits = {}
for name in implementations:
    model.set_attn_implementation(name)
    with torch.no_grad():
        logits[name] = model(ids, attention_mask=mask).logits[mask.bool()].float()
worst = max((logits[name] - logits["eager"]).abs().max().item() for name in implementations)
tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-4
missing = "" if "flash_attention_2" in implementations else " (flash_attn not installed: flash_attention_2 not run)"
print(f"{'/'.join(implementations)} vs eager: max |diff| {worst:.3g} ({dtype}, tolerance {tolerance}){missing}")
sys.exit(0 if worst <= tolerance else 1)
PY
}

pretrain() {  # output folder, then flags
    local output=$1
    shift
    "$PYTHON" -m hf_minigpt.pretrain "${SHAPE[@]}" --block_size 128 --max_train_steps "$STEPS" \
        --validation_split_percentage 2 --max_new_tokens 0 --output_dir "$output" "$@"
}

compare_losses() {  # reference folder, folder, relative tolerance, what
    "$PYTHON" - "$@" <<'PY'
import json, sys
reference, other, tolerance, what = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
def losses(folder):
    return [json.loads(line)["loss"] for line in open(f"{folder}/log_history.jsonl") if '"loss"' in line]
a, b = losses(reference), losses(other)
worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
print(f"{what}: {len(b)} steps, losses {b[0]:.3f} -> {b[-1]:.3f}, max relative difference {worst:.2e} "
      f"(tolerance {tolerance})")
sys.exit(0 if len(a) == len(b) and worst <= tolerance else 1)
PY
}

bf16() {
    pretrain "$WORK/fp32" --mixed_precision no --per_device_train_batch_size 8 &&
        pretrain "$WORK/bf16" --mixed_precision bf16 --per_device_train_batch_size 8 &&
        compare_losses "$WORK/fp32" "$WORK/bf16" 0.05 "bf16 against fp32"
}

bench() {
    if [ "$SMOKE" = 1 ]; then
        echo "not in a smoke run (tests/test_benchmark.py runs minigpt-bench --quick)"
        return 3
    fi
    "$PYTHON" -m hf_minigpt.benchmark --device cuda --shapes gpt2-124M --repeats 3 --compile \
        --json "$WORK/bench.json" || return 1
    "$PYTHON" - "$WORK/bench.json" <<'PY'
import json, sys
figures = json.load(open(sys.argv[1]))["results"]
print("; ".join(f"{key} MiniGPT {value['minigpt']['mfu']:.1%} MFU" for key, value in figures.items()
                if key.startswith("train ") and "mfu" in value.get("minigpt", {})) or "no MFU row")
PY
}

fsdp2() {
    if [ "$GPUS" -lt 2 ]; then
        echo "$GPUS GPU visible: FSDP2 needs at least 2"
        return 3
    fi
    # The same global batch: 4 rows on each of the GPUs, or all of them on one.
    pretrain "$WORK/one" --mixed_precision no --per_device_train_batch_size $((4 * GPUS)) &&
        "$PYTHON" -m accelerate.commands.launch --config_file scripts/accelerate/fsdp.yaml --num_processes "$GPUS" \
            --mixed_precision no -m hf_minigpt.pretrain "${SHAPE[@]}" --block_size 128 --max_train_steps "$STEPS" \
            --validation_split_percentage 2 --max_new_tokens 0 --output_dir "$WORK/fsdp" \
            --per_device_train_batch_size 4 --checkpointing_steps "$STEPS" &&
        compare_losses "$WORK/one" "$WORK/fsdp" 1e-3 "FSDP2 on $GPUS processes against 1"
}

int8() {
    if [ "$DEVICE" = cuda ]; then
        echo "the int8 decode is a CPU path (fbgemm, x86 CPUs); not run on CUDA"
        return 3
    fi
    "$PYTHON" -c 'import sys; from hf_minigpt.quantize import quantize_int8; print("int8 path imports")'
}

if [ -n "$STEP" ]; then
    "$STEP"
    exit
fi
started=$(date +%s)
check attention 120
check bf16 240
check bench 300
check fsdp2 240
check int8 60

echo
"$PYTHON" -c 'import torch; print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (smoke run on CPU)",
"| torch", torch.__version__)'
column -t -s $'\t' "$SUMMARY"
echo "($(( $(date +%s) - started )) s; the logs are in $WORK)"
! grep -q $'\tFAIL\t' "$SUMMARY"
