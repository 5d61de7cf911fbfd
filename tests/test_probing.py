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
    texts = data.load_texts("data/pretraining-corpus.csv.gz")["text"][:96]
    loss = probes.causal_lm_loss(model, collator, texts)
    assert abs(loss - np.log(len(tokenizer))) < 1.0  # untrained: near uniform
    assert probes.masked_atom_accuracy(model, collator, texts) < 0.2  # untrained: near chance over ~90 elements
    # A hard view keeps most tokens (elements, the group, the formula), so even untrained pooled embeddings find it
    # among 96 crystals far above chance (1/96), but not always.
    assert 0.1 < probes.retrieval_top1(model, collator, texts) < 1.0
    targets = np.array([len(t) for t in texts], dtype=float)  # a target the embeddings can carry
    mae = probes.linear_probe_mae(model, collator, texts[:64], targets[:64], texts[64:], targets[64:])
    assert mae < np.mean(np.abs(targets[64:] - targets[:64].mean()))  # better than predicting the mean
