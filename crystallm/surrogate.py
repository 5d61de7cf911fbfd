"""Surrogate property predictors: check what a property-conditioned generation produced (DESIGN.md section 5,
Conditional). Features are the pretrained model's mean-pooled embedding of a crystal's text; the regressor is
whichever of a ridge regression and gradient-boosted trees has the lower MAE on a validation part of the
training rows. Training rows are the pretraining corpus rows whose source has the property, never a test split;
the held-out MAE is measured on a test split.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crystallm import data
from crystallm.probing import pooled_embeddings
from crystallm.training import PretrainingCollator


def labelled_texts(texts_path: str | Path, property_name: str, sources: tuple[str, ...] | None = None,
                   ) -> tuple[list[str], np.ndarray]:
    """Texts of a corpus file (`data/*.csv.gz`, columns id, source, text) with their value of a property, joined
    with the source files by id; rows without a finite value are left out.

    >>> texts, values = labelled_texts("data/test-sets.csv.gz", "band_gap", ("mp_20_biternary/test",))
    >>> len(texts), float(values.min()) >= 0
    (7118, True)
    """
    corpus = data.load_texts(texts_path)
    wanted = [name for name in dict.fromkeys(corpus["source"])
              if property_name in data.SOURCES[name].properties and (sources is None or name in sources)]
    value_of = {}
    for name in wanted:
        source = data.load_source(name)
        value_of.update({(name, row_id): value for row_id, value in zip(source["id"], source[property_name])})
    texts, values = [], []
    for row_id, name, text in zip(corpus["id"], corpus["source"], corpus["text"]):
        value = value_of.get((name, row_id))
        if value is not None and np.isfinite(value):
            texts.append(text)
            values.append(float(value))
    return texts, np.array(values)


@dataclass
class SurrogatePredictor:
    """A fitted predictor of one property from texts, with the figures that chose it."""

    property_name: str
    regressor: object
    validation_mae: dict[str, float] = field(default_factory=dict)

    def predict(self, model, tokenizer, texts: list[str]) -> np.ndarray:
        """Predicted values for crystallm texts."""
        return self.regressor.predict(embed(model, tokenizer, texts))


def embed(model, tokenizer, texts: list[str]) -> np.ndarray:
    """Mean-pooled causal embeddings of texts (one row each), always of the base model: an adapter, if one is
    active, is disabled here, so the predictor sees the features it was fitted on."""
    from crystallm.adapters import active_adapter

    collator = PretrainingCollator(tokenizer, max_length=model.config.n_positions, masked_atom=False,
                                   contrastive=False)
    with model.disable_adapter() if active_adapter(model) else contextlib.nullcontext():
        return pooled_embeddings(model, collator, texts)


def fit_surrogate(model, tokenizer, property_name: str, texts: list[str], values: np.ndarray,
                  seed: int = 0) -> SurrogatePredictor:
    """Fit both candidate regressors on 90% of the rows, keep the one with the lower MAE on the other 10%,
    then refit it on all rows."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = embed(model, tokenizer, texts)
    order = np.random.default_rng(seed).permutation(len(texts))
    cut = len(texts) // 10
    validation, train = order[:cut], order[cut:]
    candidates = {
        "ridge": lambda: make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13))),
        "boosted_trees": lambda: HistGradientBoostingRegressor(max_iter=300, random_state=seed),
    }
    errors = {}
    for name, build in candidates.items():
        regressor = build().fit(features[train], values[train])
        errors[name] = float(np.mean(np.abs(regressor.predict(features[validation]) - values[validation])))
    best = min(errors, key=errors.get)
    return SurrogatePredictor(property_name, candidates[best]().fit(features, values), errors)


def save_surrogate(predictor: SurrogatePredictor, report: dict, directory: str | Path) -> None:
    """Write a predictor and its report where `load_surrogate` finds them (`<model>/surrogates/<property>/`)."""
    import json

    import joblib

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    joblib.dump(predictor, directory / "predictor.joblib")
    (directory / "report.json").write_text(json.dumps(report, indent=1))


def load_surrogate(directory: str | Path) -> tuple[SurrogatePredictor, dict]:
    """The predictor `train/surrogate.py` saved in `directory` and its report (held-out MAE under
    `report["held_out"]["mae"]`). A missing one says which command makes it."""
    import json

    import joblib

    directory = Path(directory)
    try:
        return joblib.load(directory / "predictor.joblib"), json.loads((directory / "report.json").read_text())
    except FileNotFoundError as error:
        from crystallm.errors import CrystaLLMInputError

        raise CrystaLLMInputError(f"{directory}: no fitted surrogate ({error.filename} is missing); fit it with "
                                  f"python train/surrogate.py configs/surrogate-<property>.yaml") from None
