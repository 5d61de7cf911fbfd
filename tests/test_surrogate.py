import numpy as np
import torch

from crystallm.configuration import CrystaLLMConfig
from crystallm.data import labelled_texts
from crystallm.modeling import CrystaLLMForCausalLM
from crystallm.properties.surrogates import fit_surrogate
from crystallm.tokenization import CrystaLLMTokenizer


def test_a_surrogate_is_fitted_on_corpus_rows_and_predicts_test_texts():
    tokenizer = CrystaLLMTokenizer.from_format()
    torch.manual_seed(0)
    model = CrystaLLMForCausalLM(CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2)).eval()
    texts, values = labelled_texts("data/pretraining-corpus.csv.gz", "formation_energy_per_atom",
                                   ("mp_20_biternary/val",))
    assert len(texts) == len(values) > 6000 and -5 < values.min() < -1 < values.max() < 1  # real eV/atom values
    predictor = fit_surrogate(model, tokenizer, "formation_energy_per_atom", texts[:300], values[:300])
    assert set(predictor.validation_mae) == {"ridge", "boosted_trees"}
    test_texts, test_values = labelled_texts("data/test-sets.csv.gz", "formation_energy_per_atom",
                                             ("mp_20_biternary/test",))
    predicted = predictor.predict(model, tokenizer, test_texts[:50])
    assert predicted.shape == (50,) and np.isfinite(predicted).all()
