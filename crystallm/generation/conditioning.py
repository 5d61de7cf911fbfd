"""Property conditioning: a property target written into the prompt as two tokens before the text.

`<prop_i>` names the property (its index in CONDITIONS); `<value_k>` is one of 64 equal-width bins over the
property's stated range (values outside it fall in the end bins). Classifier-free guidance drops the value to
`<prop_none>`: the unconditional prompt of property i is `<prop_i><prop_none>`. Equal-width bins keep a bin's
meaning readable from its number (band gap: 0.125 eV a bin); the ranges cover the data of ../shared/data.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from crystallm.data import PROPERTY_UNITS
from crystallm.errors import CrystaLLMInputError, CrystaLLMWarning
from crystallm.tokenization import NO_PROPERTY_TOKEN, NUM_VALUE_TOKENS, PROPERTY_TOKENS, VALUE_TOKENS


@dataclass(frozen=True)
class Condition:
    """A conditionable property: its token and the range its value bins span."""

    name: str
    index: int
    low: float
    high: float

    @property
    def unit(self) -> str:
        return PROPERTY_UNITS[self.name]

    @property
    def bin_width(self) -> float:
        return (self.high - self.low) / NUM_VALUE_TOKENS

    def value_bin(self, value: float) -> int:
        """The bin of a value, clipped to the end bins.

        >>> CONDITIONS["band_gap"].value_bin(2.0), CONDITIONS["band_gap"].value_bin(-1.0)
        (16, 0)
        """
        return min(NUM_VALUE_TOKENS - 1, max(0, math.floor((value - self.low) / self.bin_width)))

    def bin_center(self, value_bin: int) -> float:
        """The value a bin stands for (its middle)."""
        return self.low + (value_bin + 0.5) * self.bin_width


CONDITIONS: dict[str, Condition] = {c.name: c for c in [
    Condition("formation_energy_per_atom", 0, -5.0, 1.4),  # 0.1 eV/atom a bin
    Condition("band_gap", 1, 0.0, 8.0),  # 0.125 eV a bin
    Condition("e_above_hull", 2, 0.0, 1.28),  # 0.02 eV/atom a bin
    Condition("bulk_modulus", 3, 0.0, 448.0),  # 7 GPa a bin
    Condition("shear_modulus", 4, 0.0, 320.0),  # 5 GPa a bin
]}


def condition_for(name: str) -> Condition:
    """The Condition of a property name; an unknown name lists the known ones."""
    try:
        return CONDITIONS[name]
    except KeyError:
        raise CrystaLLMInputError(f"unknown property {name!r}; conditionable properties: "
                                  f"{', '.join(CONDITIONS)}") from None


def check_target(name: str, value: float | None) -> Condition:
    """The Condition of a property, after checking a target for it: an unknown property or a non-number fails,
    a value outside the property's range warns, naming the range (it will be treated as the nearest end).

    >>> check_target("band_gap", 2.0).unit
    'eV'
    """
    condition = condition_for(name)
    if value is not None and not math.isfinite(value):
        raise CrystaLLMInputError(f"{name} target {value!r} is not a number")
    if value is not None and not condition.low <= value < condition.high:
        warnings.warn(f"{name} target {value} {condition.unit} is outside the range the model was conditioned on "
                      f"[{condition.low}, {condition.high}) {condition.unit}; it is treated as the nearest end",
                      CrystaLLMWarning, stacklevel=2)
    return condition


def condition_prefix(name: str, value: float | None) -> str:
    """The tokens that go before `data_`: the property and the value's bin (clipped to the end bins), or
    `<prop_none>` for no value (the unconditional branch of guidance). `check_target` checks a user's value.

    >>> condition_prefix("band_gap", 2.0), condition_prefix("band_gap", None)
    ('<prop_1><value_16>', '<prop_1><prop_none>')
    """
    condition = condition_for(name)
    if value is None:
        return PROPERTY_TOKENS[condition.index] + NO_PROPERTY_TOKEN
    return PROPERTY_TOKENS[condition.index] + VALUE_TOKENS[condition.value_bin(value)]
