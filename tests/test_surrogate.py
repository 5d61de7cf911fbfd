import numpy as np
import pytest
import torch

from crystallm.configuration import CrystaLLMConfig
from crystallm.data import labelled_texts
from crystallm.errors import CrystaLLMInputError
from crystallm.modeling import CrystaLLMForCausalLM
from crystallm.properties.surrogates import PREDICTOR_FILE, REPORT_FILE, fit_surrogate, load_surrogate, save_surrogate
from crystallm.tokenization import CrystaLLMTokenizer


def test_a_surrogate_is_fitted_on_corpus_rows_and_predicts_test_texts(tmp_path):
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
    # Saved as skops and loaded back: the same predictions.
    save_surrogate(predictor, {"property": "formation_energy_per_atom"}, tmp_path / "surrogate")
    loaded, report = load_surrogate(tmp_path / "surrogate")
    assert report["property"] == "formation_energy_per_atom"
    assert np.array_equal(loaded.predict(model, tokenizer, test_texts[:50]), predicted)


def test_a_skops_file_holding_a_type_no_regressor_has_is_refused_before_loading(tmp_path):
    import os

    import skops.io
    from sklearn.preprocessing import FunctionTransformer

    folder = tmp_path / "surrogate"
    folder.mkdir()
    skops.io.dump(FunctionTransformer(func=os.system), folder / PREDICTOR_FILE)
    (folder / REPORT_FILE).write_text("{}")
    with pytest.raises(CrystaLLMInputError, match=r"refused, it holds types a surrogate never has: posix.system"):
        load_surrogate(folder)
