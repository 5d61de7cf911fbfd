"""Surrogate property predictors: check what a property-conditioned generation produced (docs/architecture.md,
Conditional). Features are the pretrained model's mean-pooled embedding of a crystal's text; the regressor is
whichever of a ridge regression and gradient-boosted trees has the lower MAE on a validation part of the
training rows. Training rows are the pretraining corpus rows whose source has the property, never a test split;
the held-out MAE is measured on a test split.

A surrogate travels with its model (`<model>/surrogates/<property>/`, pushed to the Hub with it), so it is stored
in a format that loads without running code: skops (`predictor.skops`), loaded with an explicit list of trusted
types; a pickle (`predictor.joblib` and the like) is refused.
"""

from __future__ import annotations

import contextlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from crystallm.adapters import active_adapter
from crystallm.errors import CrystaLLMInputError
from crystallm.tokenization import encode_texts

PREDICTOR_FILE = "predictor.skops"
REPORT_FILE = "report.json"
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")
# The types in a fitted candidate regressor that skops does not trust by default (the ridge pipeline has none).
TRUSTED_TYPES = ("sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",)


@dataclass
class SurrogatePredictor:
    """A fitted predictor of one property from texts, with the figures that chose it."""

    property_name: str
    regressor: object
    validation_mae: dict[str, float] = field(default_factory=dict)

    def predict(self, model, tokenizer, texts: list[str]) -> np.ndarray:
        """Predicted values for crystallm texts."""
        return self.regressor.predict(embed(model, tokenizer, texts))


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Mean-pooled causal embeddings of texts (one row each), always of the base model: an adapter, if one is
    active, is disabled here, so the predictor sees the features it was fitted on.

    >>> from crystallm.generation.sampling import load_generator
    >>> model, tokenizer = load_generator()
    >>> embed(model, tokenizer, ["data_NaCl", "data_Si"]).shape
    (2, 256)
    """
    parts = []
    with model.disable_adapter() if active_adapter(model) else contextlib.nullcontext():
        for start in range(0, len(texts), batch_size):
            batch = encode_texts(tokenizer, texts[start:start + batch_size], model.config.n_positions)
            batch = batch.to(model.device)
            parts.append(model.pooled_embedding(batch["input_ids"], batch["attention_mask"]).float().cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, model.config.n_embd), dtype=np.float32)


def fit_surrogate(model, tokenizer, property_name: str, texts: list[str], values: np.ndarray,
                  seed: int = 0) -> SurrogatePredictor:
    """The regressor `select_regressor` picks on the base model's embeddings of `texts`."""
    regressor, errors = select_regressor(embed(model, tokenizer, texts), values, seed)
    return SurrogatePredictor(property_name, regressor, errors)


def select_regressor(features: np.ndarray, values: np.ndarray, seed: int = 0) -> tuple[object, dict[str, float]]:
    """Fit both candidate regressors on 90% of the rows, keep the one with the lower MAE on the other 10%, then
    refit it on all rows. Returns it with each candidate's validation MAE.

    >>> x = np.random.default_rng(0).normal(size=(200, 4))
    >>> regressor, errors = select_regressor(x, x @ [1.0, 2.0, 0.0, -1.0])
    >>> sorted(errors), errors["ridge"] < 0.01
    (['boosted_trees', 'ridge'], True)
    """
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    order = np.random.default_rng(seed).permutation(len(values))
    cut = len(values) // 10
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
    return candidates[best]().fit(features, values), errors


def save_surrogate(predictor: SurrogatePredictor, report: dict, directory: str | Path) -> None:
    """Write a predictor (skops) and its report where `load_surrogate` finds them (`<model>/surrogates/<property>/`).
    The report must name the property and the validation MAE of each candidate (`train/surrogate.py` writes it)."""
    import skops.io

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    skops.io.dump(predictor.regressor, directory / PREDICTOR_FILE, compression=zipfile.ZIP_DEFLATED)
    (directory / REPORT_FILE).write_text(json.dumps(report, indent=1))


def load_surrogate(directory: str | Path) -> tuple[SurrogatePredictor, dict]:
    """The predictor `train/surrogate.py` saved in `directory` and its report (held-out MAE under
    `report["held_out"]["mae"]`). Nothing in the folder can run code: a pickled predictor is refused unread,
    and a skops file holding any type outside the regressors' own (`TRUSTED_TYPES`) is refused before it is
    loaded. A missing predictor says which command makes it.
    """
    import skops.io

    directory = Path(directory)
    path = directory / PREDICTOR_FILE
    if not path.exists():
        pickles = sorted(p.name for p in directory.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CrystaLLMInputError(f"{directory}: the surrogate is a pickle ({pickles[0]}), which runs code when "
                                      f"loaded; crystallm loads surrogates only as skops files ({PREDICTOR_FILE}): "
                                      f"refit it with python train/surrogate.py configs/surrogate-<property>.yaml")
        raise CrystaLLMInputError(f"{directory}: no fitted surrogate ({path} is missing); fit it with "
                                  f"python train/surrogate.py configs/surrogate-<property>.yaml")
    try:
        untrusted = skops.io.get_untrusted_types(file=path)
        refused = [name for name in untrusted if name not in TRUSTED_TYPES]
        if refused:
            raise CrystaLLMInputError(f"{path}: refused, it holds types a surrogate never has: {', '.join(refused)}")
        regressor = skops.io.load(path, trusted=untrusted)
        report = json.loads((directory / REPORT_FILE).read_text())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise CrystaLLMInputError(f"{directory}: not a readable surrogate ({type(error).__name__}: {error})") from None
    return SurrogatePredictor(report["property"], regressor, report.get("validation_mae", {})), report
