"""Masked-element recovery (docs/architecture.md, Substitution): hide one element of a test crystal everywhere it
is written, rank the elements the crystal does not already hold, and count how often the hidden one comes first
or in the first three. Two baselines rank the same candidates without a model:

- element frequency: how many training crystals hold each element;
- pymatgen's data-mined substitution model (Hautier et al. 2011, `structure_prediction`): the prior of each
  candidate's species, over the oxidation states that keep the formula neutral given the other elements' states
  (pymatgen's guess on the true compound, which tells the baseline more than the model is told).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter

import numpy as np
from pymatgen.core import Composition

from crystallm.io import text_format


@dataclasses.dataclass(frozen=True)
class RecoveryTask:
    """One test crystal's text and the element hidden in it."""

    name: str
    text: str
    hidden: str

    @property
    def others(self) -> list[str]:
        return [e for e in text_format.stated_formula(self.text) if e != self.hidden]


def recovery_tasks(names: list[str], texts: list[str], count: int, seed: int = 0) -> list[RecoveryTask]:
    """`count` (crystal, element) pairs drawn by `seed` from texts with 2+ elements.

    >>> tasks = recovery_tasks(["a"], ["data_NaCl\\n"], 1)
    >>> tasks[0].hidden in ("Na", "Cl")
    True
    """
    rng = np.random.default_rng(seed)
    formulas = [text_format.stated_formula(text) for text in texts]
    pairs = [(name, text, element) for name, text, formula in zip(names, texts, formulas) if len(formula) > 1
             for element in formula]
    chosen = rng.choice(len(pairs), size=min(count, len(pairs)), replace=False)
    return [RecoveryTask(*pairs[i]) for i in chosen]


def rank_of(hidden: str, scores: dict[str, float], others: list[str]) -> float:
    """1-based rank of `hidden` among the scored elements not in `others`; tied elements share the middle of
    their ranks (a ranker that cannot tell them apart is at chance there).

    >>> rank_of("Na", {"Na": 0.5, "K": 0.9, "Cl": 2.0}, ["Cl"]), rank_of("Na", {"Na": 0.0, "K": 0.0, "Li": 0.0}, [])
    (2, 2.0)
    """
    target = scores.get(hidden, -np.inf)
    rivals = [score for element, score in scores.items() if element not in others and element != hidden]
    better, tied = sum(score > target for score in rivals), sum(score == target for score in rivals)
    return 1 + better + tied / 2 if tied else 1 + better


def frequency_scores(texts: list[str]) -> dict[str, float]:
    """How many of the texts hold each element (the element-frequency baseline)."""
    counts = Counter(element for text in texts for element in text_format.stated_formula(text))
    return {symbol: float(counts.get(symbol, 0)) for symbol in text_format.element_symbols()}


def data_mined_scores(task: RecoveryTask) -> dict[str, float]:
    """Log prior of each candidate's most likely species under pymatgen's substitution model, among the
    oxidation states that keep the formula neutral with the other elements' guessed states; -inf where none."""
    model = _substitution_model()
    formula = text_format.stated_formula(task.text)
    guesses = Composition(formula).oxi_state_guesses(max_sites=-1)
    if not guesses:
        return {symbol: -np.inf for symbol in text_format.element_symbols()}
    charge = sum(guesses[0][e] * n for e, n in formula.items() if e != task.hidden)
    scores = {}
    for species in model.species:
        symbol = species.symbol
        if species.oxi_state * formula[task.hidden] + charge == 0:
            scores[symbol] = max(scores.get(symbol, -np.inf), float(np.log(model.get_px(species))))
    return {symbol: scores.get(symbol, -np.inf) for symbol in text_format.element_symbols()}


@functools.lru_cache(maxsize=1)
def _substitution_model():
    from pymatgen.analysis.structure_prediction.substitution_probability import SubstitutionProbability

    return SubstitutionProbability()  # reads its lambda table from disk: once


def summarize_recovery(ranks: list[float]) -> dict[str, float]:
    """Top-1 and top-3 recovery rates and the median rank.

    >>> summarize_recovery([1, 2, 5, 1])
    {'top1': 0.5, 'top3': 0.75, 'median_rank': 1.5}
    """
    ranks = np.array(ranks)
    return {"top1": float(np.mean(ranks == 1)), "top3": float(np.mean(ranks <= 3)),
            "median_rank": float(np.median(ranks))}
