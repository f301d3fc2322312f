"""lm-evaluation-harness's `hf` model, as MiniGPT and GPT-2 folders are read: lm-eval's model `minigpt`.

It is lm-eval's own `HFLM` with two differences:
- MiniGPT is a causal LM (lm-eval finds the kind by the names transformers ships, which MiniGPT is not among);
- the rolling loglikelihood (perplexity, bits per byte) encodes a text without the tokenizer's start token. lm-eval
  puts its own start token (`prefix_token_id`, the same end-of-text token) before each text, and the tokenizer
  `minigpt-pretrain` saves starts every text with one (as every training document starts): with both, the model
  is scored on predicting a second end-of-text token, and on the text one position late. Multiple-choice and
  generation requests keep the tokenizer's start token, as the model was trained.
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
