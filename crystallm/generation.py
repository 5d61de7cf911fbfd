"""Sampling crystallm text from a model with Hugging Face `generate` and the grammar processor."""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList

from crystallm.grammar import CrystalGrammarLogitsProcessor


def sample_texts(model, tokenizer, prompts: list[str], grammar: bool = True, max_atoms: int = 80,
                 max_new_tokens: int | None = None, batch_size: int = 32, seed: int = 0, **sampling) -> list[str]:
    """One sampled text per prompt (prompts: "data_" for unconditional, or a formula closed by the space-group
    tag). With `grammar`, every text parses; `max_atoms` bounds the conventional cell and so the length.

    >>> from crystallm.configuration import CrystaLLMConfig
    >>> from crystallm.modeling import CrystaLLMForCausalLM
    >>> from crystallm.tokenization import CrystaLLMTokenizer
    >>> tokenizer = CrystaLLMTokenizer.from_format()
    >>> model = CrystaLLMForCausalLM(CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2))
    >>> sample_texts(model, tokenizer, ["data_"], max_atoms=4)[0].startswith("data_")
    True
    """
    torch.manual_seed(seed)
    max_new_tokens = max_new_tokens or 8 * max_atoms + 60  # a row is at most 8 tokens, the header ~40
    texts = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        inputs = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
        processors = LogitsProcessorList([CrystalGrammarLogitsProcessor(tokenizer, max_atoms)]) if grammar else None
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True,
                                 logits_processor=processors, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **sampling)
        texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    return texts
