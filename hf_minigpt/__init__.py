"""hf_minigpt: the GPT-2 decoder as a first-class Hugging Face `transformers` model.

Importing the package registers MiniGPT with the `Auto*` classes, so `AutoModelForCausalLM.from_pretrained`
and `pipeline(...)` pick it up from any folder whose config says `"model_type": "minigpt"`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_minigpt import MiniGPTConfig
from .modeling_minigpt import (
    MiniGPTForCausalLM,
    MiniGPTForQuestionAnswering,
    MiniGPTForSequenceClassification,
    MiniGPTForTokenClassification,
    MiniGPTModel,
    MiniGPTPreTrainedModel,
)

__version__ = "0.2.0"

AUTO_CLASSES = {
    AutoModel: MiniGPTModel,
    AutoModelForCausalLM: MiniGPTForCausalLM,
    AutoModelForSequenceClassification: MiniGPTForSequenceClassification,
    AutoModelForTokenClassification: MiniGPTForTokenClassification,
    AutoModelForQuestionAnswering: MiniGPTForQuestionAnswering,
}

AutoConfig.register(MiniGPTConfig.model_type, MiniGPTConfig, exist_ok=True)
MiniGPTConfig.register_for_auto_class()
for _auto_class, _model_class in AUTO_CLASSES.items():
    _auto_class.register(MiniGPTConfig, _model_class, exist_ok=True)
    # `save_pretrained` then copies the source next to the weights and writes `auto_map`.
    _model_class.register_for_auto_class(_auto_class.__name__)

__all__ = [
    "MiniGPTConfig",
    "MiniGPTPreTrainedModel",
    "MiniGPTModel",
    "MiniGPTForCausalLM",
    "MiniGPTForSequenceClassification",
    "MiniGPTForTokenClassification",
    "MiniGPTForQuestionAnswering",
]
