"""A two-minute tour of hf_minigpt on CPU, with no download: build, generate, classify, save and reload.

    python scripts/quickstart.py
"""

import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_minigpt import MiniGPTConfig, MiniGPTForCausalLM


def main():
    torch.manual_seed(0)
    config = MiniGPTConfig(vocab_size=64, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                           eos_token_id=0, pad_token_id=1)
    model = MiniGPTForCausalLM(config)
    print(f"MiniGPT with {model.num_parameters():,} parameters")

    # Teach it one sequence, so that generation has something to show.
    pattern = torch.arange(2, 34).unsqueeze(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        loss = model(pattern, labels=pattern).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"loss after 60 steps: {loss.item():.3f}")

    model.eval()
    prompt = pattern[:, :4]
    greedy = model.generate(prompt, max_new_tokens=12, do_sample=False)
    print("greedy:", greedy[0].tolist())
    beam = model.generate(prompt, max_new_tokens=12, num_beams=3, do_sample=False)
    print("beam:  ", beam[0].tolist())

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
        same = torch.equal(reloaded.generate(prompt, max_new_tokens=12, do_sample=False), greedy)
        print(f"reloaded with AutoModelForCausalLM ({type(reloaded).__name__}); same tokens: {same}")
        classifier = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
        print("classifier logits for two padded sequences:",
              classifier(torch.tensor([[5, 6, 7, 1], [8, 9, 1, 1]])).logits.tolist())


if __name__ == "__main__":
    main()
