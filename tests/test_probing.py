import numpy as np
import torch

from crystallm import data
from crystallm.configuration import CrystaLLMConfig
from crystallm.modeling import CrystaLLMForCausalLM
from crystallm.tokenization import CrystaLLMTokenizer
from crystallm.training import probes
from crystallm.training.collator import PretrainingCollator


def test_probing_measures_on_a_tiny_model():
    tokenizer = CrystaLLMTokenizer.from_format()
    torch.manual_seed(0)
    model = CrystaLLMForCausalLM(CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2)).eval()
    collator = PretrainingCollator(tokenizer, seed=0)
    corpus = data.load_texts("data/pretraining-corpus.csv.gz")["text"][:6000]
    by_formula: dict[str, list[str]] = {}
    for text in corpus:
        by_formula.setdefault(text.split("\n", 1)[0], []).append(text)
    polymorphs = [group[:4] for group in by_formula.values() if len(group) >= 4][:8]
    # 64 crystals, then 8 formulas of 4 polymorphs each
    texts = [t for t in corpus[:400] if len(by_formula[t.split("\n", 1)[0]]) == 1][:64] + sum(polymorphs, [])
    loss = probes.causal_lm_loss(model, collator, texts)
    assert abs(loss - np.log(len(tokenizer))) < 1.0  # untrained: near uniform
    assert probes.masked_atom_accuracy(model, collator, texts) < 0.2  # untrained: near chance over ~90 elements
    # A hard view keeps most tokens (elements, the group, the formula), so even untrained pooled embeddings find it
    # among 96 crystals far above chance (1/96), but not always.
    retrieval = probes.retrieval(model, collator, texts)
    assert 0.1 < retrieval.top1 < 1.0
    assert retrieval.texts_in_groups == 4 * len(polymorphs) > 0
    # Among the texts of one formula the two measures are the same; among texts of distinct formulas there is
    # no group to measure within.
    one_formula = probes.retrieval(model, collator, max(by_formula.values(), key=len))
    assert one_formula.texts_in_groups == len(max(by_formula.values(), key=len))
    assert one_formula.top1 == one_formula.top1_within_formula
    distinct = probes.retrieval(model, collator, texts[:64])
    assert distinct.texts_in_groups == 0 and np.isnan(distinct.top1_within_formula)
