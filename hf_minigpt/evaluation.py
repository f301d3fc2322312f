"""lm-evaluation-harness's `hf` model, as MiniGPT and GPT-2 folders are read: lm-eval's model `minigpt`.

It is lm-eval's own `HFLM` with one difference, and a warning less:
- the rolling loglikelihood (perplexity, bits per byte) encodes a text without the tokenizer's start token. lm-eval
  puts its own start token (`prefix_token_id`, the same end-of-text token) before each text, and the tokenizer
  `minigpt-pretrain` saves starts every text with one (as every training document starts): with both, the model
  is scored on predicting a second end-of-text token, and on the text one position late. Multiple-choice and
  generation requests keep the tokenizer's start token, as the model was trained;
- it is a causal LM from the start: `HFLM` looks for the model type among the names transformers ships, does not
  find `minigpt` there, and says so before it settles on causal itself.
"""

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM


@register_model("minigpt")
class MiniGPTLM(HFLM):
    def __init__(self, backend: str = "causal", **kwargs):
        super().__init__(backend=backend, **kwargs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        add_bos_token, self.add_bos_token = self.add_bos_token, False
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self.add_bos_token = add_bos_token
