"""Greedy completions through `vllm.LLM`, timed: run by vLLM's own Python, not imported. vLLM pins its own torch and
transformers, so it lives in a virtual environment of its own, where hf_minigpt is not installed; `minigpt-bench`
and the tests start this file there and read the one JSON line it prints:

    .venv-vllm/bin/python vllm_greedy.py FOLDER '[[ids...], ...]' MAX_TOKENS '{"model_impl": "transformers"}' [REPEATS]

    RESULT {"tokens": [[...], ...], "runs": [[latency, ...], ...]}

All prompts arrive at once; a request's latency runs from then to its last token, in seconds. The first run is a
warm-up and is left out of `runs`.
"""

import json
import sys
import time

from vllm import LLM, SamplingParams


def greedy_runs(folder: str, prompts: list[list[int]], max_tokens: int, options: dict, repeats: int) -> dict:
    # Eager (no torch.compile: minutes on a small CPU), float32 like the models it is compared with; per-request
    # timestamps need vLLM's stats on.
    llm = LLM(model=folder, **{"dtype": "float32", "enforce_eager": True, "max_model_len": 256,
                               "disable_log_stats": False, **options})
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    requests = [{"prompt_token_ids": ids} for ids in prompts]
    runs = []
    for _ in range(repeats + 1):
        start = time.monotonic()  # the engine stamps tokens on the same clock
        outputs = llm.generate(requests, sampling, use_tqdm=False)
        runs.append([output.metrics.last_token_ts - start for output in outputs])
    return {"tokens": [list(output.outputs[0].token_ids) for output in outputs], "runs": runs[1:]}


if __name__ == "__main__":  # vLLM starts worker processes that import this file
    folder, prompts, max_tokens, options = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    repeats = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    print("RESULT " + json.dumps(greedy_runs(folder, prompts, max_tokens, json.loads(options), repeats)), flush=True)
