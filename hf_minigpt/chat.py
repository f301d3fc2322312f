"""Turns for a base model: a chat template and a pad token on its tokenizer, the one step between a pre-trained folder
and TRL's trainers, `apply_chat_template`, `pipeline("text-generation")` with messages and the servers' chat routes.

    tokenizer = chat_ready(AutoTokenizer.from_pretrained("runs/pydoc"))
    tokenizer.save_pretrained("runs/pydoc")

The template needs no new tokens, so the model's embeddings stay as they are and GPT-2's tokenizer takes it too: each
turn is its role in plain text and the message, ended by the end-of-text token, which is also where generation stops.
The assistant's turns, their end-of-text token included, sit inside `{% generation %}` markers: what TRL's
`assistant_only_loss=True` trains on, so the model learns to answer and to stop, not to ask.
"""

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + eos_token -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- message['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)


def chat_ready(tokenizer):
    """`tokenizer` with `CHAT_TEMPLATE` and a pad token, where it has none of its own (a template or pad token it has
    is kept). The pad token is the end-of-text token, as for GPT-2: padding is masked, so any token serves."""
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
