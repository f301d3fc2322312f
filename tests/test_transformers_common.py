"""transformers' own `ModelTesterMixin` run against every MiniGPT class: the library's spec for a model."""

import os
import sys
import unittest

import pytest
from transformers.models.auto import modeling_auto

from hf_minigpt import (
    MiniGPTConfig,
    MiniGPTForCausalLM,
    MiniGPTForQuestionAnswering,
    MiniGPTForSequenceClassification,
    MiniGPTForTokenClassification,
    MiniGPTModel,
)

from transformers_common import prepare

try:
    sys.path.insert(0, str(prepare()))
    from transformers_common_tests.test_configuration_common import ConfigTester
    from transformers_common_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask
except Exception as error:
    # Outside CI (no network, no cached sdist) the library's spec is skipped, with the reason. In CI a failure to
    # import it, a missing test dependency or a helper the stand-ins lack, fails the run: skipping would pass it.
    if os.environ.get("CI"):
        raise
    pytest.skip(f"transformers' common tests are unavailable: {error}", allow_module_level=True)

# The mixin picks inputs (labels, start/end positions) and skips (no loss on a bare trunk) by looking class
# names up in transformers' own name tables; list ours there, as if MiniGPT lived inside transformers.
for table, class_name in [
    (modeling_auto.MODEL_MAPPING_NAMES, "MiniGPTModel"),
    (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "MiniGPTForCausalLM"),
    (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "MiniGPTForSequenceClassification"),
    (modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES, "MiniGPTForTokenClassification"),
    (modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES, "MiniGPTForQuestionAnswering"),
]:
    table["minigpt"] = class_name


class MiniGPTModelTester:
    def __init__(self, parent, batch_size=3, seq_length=7, vocab_size=99, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_labels=3):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_labels = num_labels
        self.is_training = True

    def get_config(self):
        return MiniGPTConfig(
            vocab_size=self.vocab_size,
            n_positions=64,
            n_embd=self.hidden_size,
            n_layer=self.num_hidden_layers,
            n_head=self.num_attention_heads,
            n_inner=37,
            activation_function="gelu",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=self.vocab_size - 1,
            eos_token_id=self.vocab_size - 1,
            pad_token_id=self.vocab_size - 2,
            num_labels=self.num_labels,
        )

    def prepare_config_and_inputs_for_common(self):
        # Token ids stay below the pad id so that sequence classification pools the last position.
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 2)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class MiniGPTCommonTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (
        MiniGPTModel,
        MiniGPTForCausalLM,
        MiniGPTForSequenceClassification,
        MiniGPTForTokenClassification,
        MiniGPTForQuestionAnswering,
    )
    # Learned absolute positions: resizing them would change the model's meaning, as for GPT-2.
    test_resize_position_embeddings = False

    def test_generation_tester_mixin_inheritance(self):
        self.skipTest("transformers' GenerationTesterMixin is not in its sdist; tests/test_generation.py covers it")

    def setUp(self):
        self.model_tester = MiniGPTModelTester(self)
        self.config_tester = ConfigTester(self, config_class=MiniGPTConfig, n_embd=32, n_head=4)

    def test_config(self):
        self.config_tester.run_common_tests()
