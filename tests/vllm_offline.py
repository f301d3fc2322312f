"""Run by vLLM's own Python (its virtual environment, tests/test_vllm.py): greedy completions of token-id prompts
through `vllm.LLM`, printed as one JSON line.

    python vllm_offline.py FOLDER '[[ids...], ...]' MAX_TOKENS '{"model_impl": "transformers", ...}'
"""

import json
import sys

from vllm import LLM, SamplingParams

if __name__ == "__main__":  # vLLM starts worker processes that import this file
    folder, prompts, max_tokens, options = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=256, **json.loads(options))
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                           SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    print("TOKENS " + json.dumps([list(output.outputs[0].token_ids) for output in outputs]))
