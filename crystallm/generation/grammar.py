"""Grammar-aware decoding: a LogitsProcessor that lets the model write only text that parses.

Each sequence is followed by a small state machine over the format's tokens (`crystallm.io.text_format`):
the formula, a space group, a number of formula units Z that the group's Wyckoff multiplicities can fill, the
free lattice parameters, the loop header, then atom-site rows whose element is forced (formula order), whose
Wyckoff positions exist in the group and leave a count that can still be completed (a fixed position is used
once), and whose free coordinates are numbers in [0, 1). `<eos>` is allowed exactly when the formula is complete.
When the prompt holds a formula, the multiplicities add up to it. A space group or a set of elements (a
chemical system) can be imposed without writing them into the prompt, and a length limit (the model's context)
is never exceeded: Z is only allowed where even the most rows the group could need still fit.

With a distance floor (`crystallm.generation.distances`), the lattice (written before any site) and the orbits
placed so far decide which Wyckoff positions and which values of a site's last free coordinate are offered:
none that would put two atoms (periodic images included) under the floor. With `charge_neutral`, a formula is
closed only where SMACT's test passes. Where no choice is left, the least bad one is allowed and counted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch
from pymatgen.core import Composition, Lattice
from transformers import LogitsProcessor

from crystallm import symmetry
from crystallm.generation.distances import DistanceFloor, orbit_clearance, too_close_for_each
from crystallm.io import text_format
from crystallm.tokenization import NO_PROPERTY_TOKEN, PROPERTY_TOKENS, VALUE_TOKENS
from crystallm.validity import compositional_validity

MAX_ELEMENTS = 8
ROW_TOKENS = 8  # element, Wyckoff symbol, three coordinates of at most two tokens each
HEADER_TOKENS = 42  # bos, data_, 8 elements with counts, 4 tag/value tokens, 6 lattice parameters of 3, loop, eos
# Space groups are checked for a formula in order of the model's probability until this much of it is covered:
# an exact check of all 230 costs ~0.4 s per new formula, and the groups left unchecked carry < 1e-4 of the mass.
GROUP_MASS_CHECKED = 1 - 1e-4
# Triclinic angles: spglib's reduced cells keep them in [60, 120) (all 2,661 triclinic crystals of ../shared/data
# lie in [59.99, 120)); within [59, 121) any alpha and beta leave a gamma that makes a real cell.
TRICLINIC_ANGLES = (59, 121)


class Stage(enum.StrEnum):
    """The parts of a text, in order (`CrystalGrammarLogitsProcessor.STAGES` defines each)."""

    START = "start"
    FORMULA = "formula"
    GROUP = "group"
    UNITS_TAG = "units_tag"
    UNITS = "units"
    LATTICE = "lattice"
    LOOP = "loop"
    ROW_ELEMENT = "row_element"
    WYCKOFF = "wyckoff"
    COORDINATE = "coordinate"
    DONE = "done"


class StageRule(NamedTuple):
    """One stage of the grammar: `allowed(processor, state)` lists the token ids allowed next,
    `advance(processor, state, token)` moves the state past an allowed token, and `accepts(processor, state,
    token)`, where given, checks one token instead of `token in allowed(...)`."""

    allowed: Callable
    advance: Callable
    accepts: Callable | None = None


@dataclass
class _State:
    """Where one sequence stands in the grammar."""

    stage: Stage = Stage.START
    formula: dict[str, int] = field(default_factory=dict)
    last_element: str | None = None
    counted: bool = False
    space_group: int | None = None
    formula_units: int | None = None
    lattice_left: list[int] = field(default_factory=list)  # indices into LATTICE_TAGS still to write
    lattice_part: int = 0  # 0: tag next, 1: integer part next, 2: decimals next
    lattice_values: dict[int, float] = field(default_factory=dict)  # index into LATTICE_TAGS -> value so far
    remaining: dict[str, int] = field(default_factory=dict)
    used_fixed: set[str] = field(default_factory=set)
    element: str | None = None
    wyckoff: symmetry.WyckoffPosition | None = None
    axis: int = 0
    coordinate_part: int = 0  # 0: first chunk (or ".") next, 1: second chunk next
    error: str | None = None
    # What distance masking needs (filled only when the processor has a floor):
    lattice: np.ndarray | None = None  # rows a, b, c in Å, once the lattice is written
    placed: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # fractional, every atom so far
    placed_elements: list[str] = field(default_factory=list)
    params: list[float] = field(default_factory=list)  # the current row's free coordinates so far
    fallbacks: int = 0  # times no choice kept the floor and the least-bad one was allowed


# The middles of the 100 first chunks of a coordinate (0.005, 0.015, ...): where a chunk is measured.
_CHUNK_MIDDLES = (np.arange(100) + 0.5) / 100


@lru_cache(maxsize=None)
def _charge_neutral(formula: tuple[tuple[str, int], ...]) -> bool:
    """SMACT's charge-neutrality and electronegativity test (compositional validity) of a formula."""
    return compositional_validity(Composition(dict(formula)))


@lru_cache(maxsize=None)
def _free_reachable(space_group: int, limit: int) -> frozenset[int]:
    """Atom counts up to `limit` that Wyckoff positions with free parameters reach (each usable any number of
    times: distinct parameters give distinct orbits)."""
    multiplicities = sorted({wp.multiplicity for wp in symmetry.wyckoff_positions(space_group) if wp.free_axes})
    reachable = {0}
    for total in range(1, limit + 1):
        if any(total - m in reachable for m in multiplicities if m <= total):
            reachable.add(total)
    return frozenset(reachable)


@lru_cache(maxsize=None)
def _single_reachable(space_group: int, limit: int) -> frozenset[int]:
    """Counts one element alone could fill (free positions any number of times, fixed ones once): a fast
    necessary condition before the exact check, which also keeps fixed positions apart between elements."""
    reachable = set(_free_reachable(space_group, limit))
    for wp in symmetry.wyckoff_positions(space_group):
        if not wp.free_axes:
            reachable |= {r + wp.multiplicity for r in reachable if r + wp.multiplicity <= limit}
    return frozenset(reachable)


@lru_cache(maxsize=None)
def _max_rows(space_group: int, atoms: int) -> int:
    """An upper bound on the rows (orbits) that `atoms` atoms can take in the group: each fixed position smaller
    than the smallest free one at most once, every other row at least that smallest free multiplicity."""
    positions = symmetry.wyckoff_positions(space_group)
    smallest_free = min(wp.multiplicity for wp in positions if wp.free_axes)
    return sum(1 for wp in positions if not wp.free_axes and wp.multiplicity < smallest_free) + atoms // smallest_free


@lru_cache(maxsize=200_000)
def _feasible(space_group: int, remaining: tuple[int, ...], used_fixed: frozenset[str], limit: int) -> bool:
    """Whether every element's remaining count can still be filled: free positions any number of times, each
    fixed position (no free parameter) at most once over all elements."""
    free = _free_reachable(space_group, limit)
    if all(count in free for count in remaining):
        return True
    index = next(i for i, count in enumerate(remaining) if count not in free)
    for wp in symmetry.wyckoff_positions(space_group):
        if not wp.free_axes and wp.letter not in used_fixed and wp.multiplicity <= remaining[index]:
            rest = remaining[:index] + (remaining[index] - wp.multiplicity,) + remaining[index + 1:]
            if _feasible(space_group, rest, used_fixed | {wp.letter}, limit):
                return True
    return False


@lru_cache(maxsize=100_000)
def _formula_units(space_group: int, counts: tuple[int, ...], limit: int, row_budget: int) -> tuple[int, ...]:
    """Values of Z for which the group can place Z times each count, within `limit` atoms and `row_budget` rows."""
    largest = min(text_format.MAX_FORMULA_UNITS, limit // sum(counts))
    single = _single_reachable(space_group, limit)
    return tuple(z for z in range(1, largest + 1)
                 if all(z * c in single for c in counts) and _max_rows(space_group, z * sum(counts)) <= row_budget
                 and _feasible(space_group, tuple(z * c for c in counts), frozenset(), limit))


class CrystalGrammarLogitsProcessor(LogitsProcessor):
    """Mask every token that would make the text unparseable. Use with `model.generate(..., logits_processor=
    LogitsProcessorList([CrystalGrammarLogitsProcessor(tokenizer)]))`.

    max_atoms bounds the conventional cell (Z times the formula's atoms); max_length (prompt and generated tokens,
    usually the model's `n_positions`) bounds the text; space_group (a number) and elements (a chemical system:
    the formula uses exactly these) constrain what the model may write. A prompt may end anywhere in the text.

    >>> from crystallm.tokenization import CrystaLLMTokenizer
    >>> tokenizer = CrystaLLMTokenizer.from_format()
    >>> processor = CrystalGrammarLogitsProcessor(tokenizer)
    >>> ids = torch.tensor([tokenizer("data_NaCl\\n_space_group_name_H-M_alt Fm-3m")["input_ids"]])
    >>> allowed = processor(ids, torch.zeros(1, len(tokenizer)))[0] > -1e9
    >>> tokenizer.convert_ids_to_tokens(allowed.nonzero().flatten())[:4]
    ['\\n_cell_formula_units_Z']
    """

    def __init__(self, tokenizer, max_atoms: int = 160, max_length: int | None = None,
                 space_group: int | None = None, elements: Iterable[str] | None = None,
                 floor: DistanceFloor | None = None, charge_neutral: bool = False):
        self.tokenizer = tokenizer
        self.max_atoms = max_atoms
        # Without a length limit rows never exceed atoms, so the row budget does not bind.
        self.row_budget = (max_length - HEADER_TOKENS) // ROW_TOKENS if max_length else max_atoms
        self.formula_limit = min(max_atoms, self.row_budget)  # P1 with Z=1 fits any formula this small
        self.space_group = space_group
        self.elements = tuple(elements or ())
        self.floor = floor
        self.charge_neutral = charge_neutral
        self.vocab_size = len(tokenizer)
        vocab = tokenizer.get_vocab()
        self.id_of = vocab
        self.token_of = {i: t for t, i in vocab.items()}
        symbols = text_format.element_symbols()
        self.formula_elements = {vocab[s]: s for s in symbols}
        self.row_elements = {vocab["\n" + s]: s for s in symbols}
        self.counts = {vocab[str(n)]: n for n in range(2, 10)} | {vocab[f"{n:02d}"]: n for n in range(10, 100)}
        self.groups = {vocab[" " + symmetry.space_group_symbol(n)]: n for n in range(1, 231)}
        self.group_ids = [vocab[" " + symmetry.space_group_symbol(n)] for n in range(1, 231)]
        self.units = {vocab[f" {z}"]: z for z in range(1, text_format.MAX_FORMULA_UNITS + 1)}
        self.integer_parts = {vocab[f" {k}."]: k for k in range(1, int(text_format.MAX_LENGTH))}
        self.coordinate_firsts = [vocab[f" 0.{k:02d}"] for k in range(100)]
        self.first_values = {vocab[f" 0.{k:02d}"]: k / 100 for k in range(100)}
        self.decimal_pairs = [vocab[f"{k:02d}"] for k in range(100)]
        self.decimal_values = {vocab[f"{k:02d}"]: k / 100 for k in range(100)}
        self.wyckoff_ids = {vocab[t]: t[1:] for t in vocab if t.startswith(" ") and t[1:-1].isdigit()
                            and t[-1].isalpha()}
        self.fixed = vocab[" " + text_format.FIXED_COORDINATE]
        self.tags = {name: vocab["\n" + name] for name in (text_format.TAG_SPACE_GROUP,
                                                           text_format.TAG_FORMULA_UNITS,
                                                           *text_format.LATTICE_TAGS)}
        self.data = vocab[text_format.DATA_PREFIX]
        self.loop = vocab["\n" + text_format.LOOP_HEADER]
        # Padding, <bos> and a property condition before the text (generation.conditioning) are not the text's.
        self.skip = {tokenizer.pad_token_id, tokenizer.bos_token_id,
                     *tokenizer.convert_tokens_to_ids([NO_PROPERTY_TOKEN, *PROPERTY_TOKENS, *VALUE_TOKENS])}
        self.eos = tokenizer.eos_token_id
        self._cache: dict[int, tuple[list[int], _State]] = {}
        problem = self.constraint_problem()
        if problem:
            raise ValueError(problem)

    # --- the state machine: each stage once, in STAGES below ----------------------------------------------
    def _advance(self, state: _State, token: int) -> None:
        """Move `state` past `token` (assumed allowed; a disallowed one sets state.error)."""
        if token in self.skip or state.error:
            return
        rule = self.STAGES[state.stage]
        if not (rule.accepts(self, state, token) if rule.accepts else token in rule.allowed(self, state)):
            state.error = f"token {self.token_of.get(token)!r} not allowed in stage {state.stage}"
            return
        rule.advance(self, state, token)

    def _allowed(self, state: _State) -> list[int]:
        """Token ids allowed next."""
        return self.STAGES[state.stage].allowed(self, state)

    def _after_start(self, state: _State, token: int) -> None:
        state.stage = Stage.FORMULA

    def _accept_formula(self, state: _State, token: int) -> bool:
        return token in self._formula_allowed(state, neutral=False)  # a formula closed off neutrality is still text

    def _after_formula(self, state: _State, token: int) -> None:
        if token in self.formula_elements:
            state.last_element, state.counted = self.formula_elements[token], False
            state.formula[state.last_element] = 1
        elif token in self.counts:
            state.formula[state.last_element], state.counted = self.counts[token], True
        else:  # the space-group tag
            state.stage = Stage.GROUP

    def _allow_group(self, state: _State) -> list[int]:
        # Only an imposed group is listed here; otherwise __call__ asks _likely_groups, which needs the scores.
        return [self.group_ids[self.space_group - 1]] if self.space_group else []

    def _accept_group(self, state: _State, token: int) -> bool:
        if self.space_group:
            return token in self._allow_group(state)
        number = self.groups.get(token)  # one group's check, not all 230
        return number is not None and bool(self._units_for(state.formula, number))

    def _after_group(self, state: _State, token: int) -> None:
        state.space_group, state.stage = self.groups[token], Stage.UNITS_TAG

    def _after_units_tag(self, state: _State, token: int) -> None:
        state.stage = Stage.UNITS

    def _allow_units(self, state: _State) -> list[int]:
        return [self.id_of[f" {z}"] for z in self._units_for(state.formula, state.space_group)]

    def _after_units(self, state: _State, token: int) -> None:
        state.formula_units = self.units[token]
        state.remaining = {e: c * state.formula_units for e, c in state.formula.items()}
        system = symmetry.crystal_system(state.space_group)
        state.lattice_left = list(text_format.FREE_LATTICE_PARAMETERS[system])
        state.stage, state.lattice_part = Stage.LATTICE, 0

    def _allow_lattice(self, state: _State) -> list[int]:
        index = state.lattice_left[0]
        if state.lattice_part == 0:
            return [self.tags[text_format.LATTICE_TAGS[index]]]
        low, high = (text_format.MIN_LENGTH, text_format.MAX_LENGTH) if index < 3 else (1, 180)
        if index >= 3 and state.space_group <= 2:
            low, high = self._triclinic_angle_range(state, index)
        if state.lattice_part == 1:
            return [i for i, k in self.integer_parts.items() if low <= k + 0.99 and k < high]
        value = state.lattice_values[index]
        return [i for i, d in self.decimal_values.items() if low <= value + d < high]

    def _after_lattice(self, state: _State, token: int) -> None:
        index = state.lattice_left[0]
        if state.lattice_part == 1:
            state.lattice_values[index] = float(self.integer_parts[token])
        elif state.lattice_part == 2:
            state.lattice_values[index] += self.decimal_values[token]
        state.lattice_part += 1
        if state.lattice_part < 3:
            return
        state.lattice_left.pop(0)
        state.lattice_part = 0
        if not state.lattice_left:
            state.stage = Stage.LOOP
            if self.floor:
                system = symmetry.crystal_system(state.space_group)
                parameters = text_format.complete_lattice_parameters(system, state.lattice_values)
                state.lattice = Lattice.from_parameters(*parameters).matrix

    def _after_loop(self, state: _State, token: int) -> None:
        state.stage = Stage.ROW_ELEMENT

    def _allow_row_element(self, state: _State) -> list[int]:
        left = [e for e in state.formula if state.remaining[e] > 0]
        return [self.id_of["\n" + left[0]]] if left else [self.eos]

    def _after_row_element(self, state: _State, token: int) -> None:
        if token == self.eos:
            state.stage = Stage.DONE
        else:
            state.element, state.stage = self.row_elements[token], Stage.WYCKOFF

    def _allow_wyckoff(self, state: _State) -> list[int]:
        elements = list(state.formula)
        index = elements.index(state.element)
        counts = tuple(state.remaining[e] for e in elements)
        allowed = []
        for wp in symmetry.wyckoff_positions(state.space_group):
            if wp.multiplicity > counts[index] or (not wp.free_axes and wp.letter in state.used_fixed):
                continue
            rest = counts[:index] + (counts[index] - wp.multiplicity,) + counts[index + 1:]
            used = state.used_fixed if wp.free_axes else state.used_fixed | {wp.letter}
            if _feasible(state.space_group, rest, frozenset(used), self.max_atoms):
                allowed.append(self.id_of[" " + wp.label])
        return allowed

    def _after_wyckoff(self, state: _State, token: int) -> None:
        state.wyckoff = symmetry.wyckoff_position(state.space_group, self.wyckoff_ids[token][-1])
        state.remaining[state.element] -= state.wyckoff.multiplicity
        if not state.wyckoff.free_axes:
            state.used_fixed.add(state.wyckoff.letter)
        state.stage, state.axis, state.coordinate_part, state.params = Stage.COORDINATE, 0, 0, []

    def _allow_coordinate(self, state: _State) -> list[int]:
        if state.coordinate_part == 1:
            return self.decimal_pairs
        return self.coordinate_firsts if state.axis in state.wyckoff.free_axes else [self.fixed]

    def _after_coordinate(self, state: _State, token: int) -> None:
        if token == self.fixed or state.coordinate_part == 1:
            if token != self.fixed:
                state.params.append(state.params.pop() + self.decimal_values[token] / 100)
            state.axis, state.coordinate_part = state.axis + 1, 0
        else:
            state.params.append(self.first_values[token])
            state.coordinate_part = 1
        if state.axis == 3:
            state.stage = Stage.ROW_ELEMENT
            if self.floor:
                orbit = state.wyckoff.orbit(state.params)
                state.placed = np.concatenate([state.placed, orbit])
                state.placed_elements += [state.element] * len(orbit)

    def _after_done(self, state: _State, token: int) -> None:
        """Done: padding with <eos> leaves the state as it is."""

    # The grammar, in text order: what each stage allows next, how an allowed token moves the state on, and
    # where one token is checked more cheaply (or more leniently) than by listing them all, that check.
    STAGES = {
        Stage.START: StageRule(lambda self, state: [self.data], _after_start),
        Stage.FORMULA: StageRule(lambda self, state: self._formula_allowed(state), _after_formula, _accept_formula),
        Stage.GROUP: StageRule(_allow_group, _after_group, _accept_group),
        Stage.UNITS_TAG: StageRule(lambda self, state: [self.tags[text_format.TAG_FORMULA_UNITS]], _after_units_tag),
        Stage.UNITS: StageRule(_allow_units, _after_units),
        Stage.LATTICE: StageRule(_allow_lattice, _after_lattice),
        Stage.LOOP: StageRule(lambda self, state: [self.loop], _after_loop),
        Stage.ROW_ELEMENT: StageRule(_allow_row_element, _after_row_element),
        Stage.WYCKOFF: StageRule(_allow_wyckoff, _after_wyckoff),
        Stage.COORDINATE: StageRule(_allow_coordinate, _after_coordinate),
        Stage.DONE: StageRule(lambda self, state: [self.eos], _after_done),
    }

    def _likely_groups(self, state: _State, scores: torch.Tensor) -> list[int]:
        """The group tokens allowed after a formula: the feasible ones among the most probable groups that
        together hold GROUP_MASS_CHECKED of the model's probability over groups (P1 always fits)."""
        probabilities = torch.softmax(scores[self.group_ids].float(), dim=0)
        allowed, checked = [], 0.0
        for index in torch.argsort(probabilities, descending=True).tolist():
            if allowed and checked >= GROUP_MASS_CHECKED:
                break
            checked += float(probabilities[index])
            if self._units_for(state.formula, index + 1):
                allowed.append(self.group_ids[index])
        return allowed

    @staticmethod
    def _triclinic_angle_range(state: _State, index: int) -> tuple[float, float]:
        """[low, high) for a triclinic angle: gamma must make a real cell with alpha and beta written before it
        (|alpha - beta| < gamma < alpha + beta and alpha + beta + gamma < 360)."""
        low, high = TRICLINIC_ANGLES
        if index == 5:
            alpha, beta = state.lattice_values[3], state.lattice_values[4]
            low = max(low, round(abs(alpha - beta) + 0.01, 2))
            high = min(high, alpha + beta, 360 - alpha - beta)
        return low, high

    def _closable(self, counts: tuple[int, ...]) -> bool:
        """Whether a formula with these counts can be closed: a space group (the imposed one, if any) and a Z fit."""
        if self.space_group is None:
            return sum(counts) <= self.formula_limit
        return bool(_formula_units(self.space_group, tuple(sorted(counts)), self.max_atoms, self.row_budget))

    def _formula_allowed(self, state: _State, neutral: bool = True) -> list[int]:
        """Elements, counts and the closing tag that keep the formula closable. Every allowed token leaves a
        closable formula (counting each element still to come once), so decoding never reaches a dead end."""
        missing = [e for e in self.elements if e not in state.formula]
        counts = tuple(state.formula.values())
        allowed = []
        if len(state.formula) < MAX_ELEMENTS:
            if self.elements:  # a required element with count 1 leaves the counts to close as they were
                allowed += [self.id_of[e] for e in missing]
            elif self._closable(counts + (1,)):
                allowed += [i for i, e in self.formula_elements.items() if e not in state.formula]
        neutral = neutral and self.charge_neutral
        if state.formula:
            if not missing and not (neutral and not _charge_neutral(tuple(state.formula.items()))):
                allowed.append(self.tags[text_format.TAG_SPACE_GROUP])
            if not state.counted:
                rest = counts[:-1] + (1,) * len(missing)
                # The last element's count (no other can follow) must make the formula charge-neutral.
                last = neutral and (len(state.formula) >= MAX_ELEMENTS or bool(self.elements) and not missing)
                allowed += [i for i, n in self.counts.items() if self._closable(rest + (n,)) and not (
                    last and not _charge_neutral(tuple((state.formula | {state.last_element: n}).items())))]
        return allowed

    def constraint_problem(self) -> str | None:
        """Why the imposed space group and elements cannot give any text within the limits, or None.

        >>> from crystallm.tokenization import CrystaLLMTokenizer
        >>> CrystalGrammarLogitsProcessor(CrystaLLMTokenizer.from_format(), max_atoms=8, elements=["Xx"])
        Traceback (most recent call last):
        ...
        ValueError: unknown element 'Xx' in the chemical system
        """
        unknown = [e for e in self.elements if e not in self.formula_elements.values()]
        if unknown:
            return f"unknown element {unknown[0]!r} in the chemical system"
        if len(set(self.elements)) > MAX_ELEMENTS:
            return f"a chemical system of {len(set(self.elements))} elements (at most {MAX_ELEMENTS})"
        if self.space_group is not None and not 1 <= self.space_group <= 230:
            return f"space group {self.space_group} does not exist (1-230)"
        if not self._closable((1,) * max(1, len(self.elements))):
            what = "-".join(self.elements) or "any formula"
            group = f" in space group {self.space_group}" if self.space_group else ""
            return f"{what} cannot be placed{group} within {self.max_atoms} atoms and {self.row_budget} rows"
        return None

    def _units_for(self, formula: dict[str, int], space_group: int) -> tuple[int, ...]:
        """Values of Z whose atom counts the space group can fill within max_atoms and the row budget."""
        return _formula_units(space_group, tuple(sorted(formula.values())), self.max_atoms, self.row_budget)

    def state_of(self, ids: list[int]) -> _State:
        """The grammar state after a sequence of ids (prompt and generated tokens)."""
        state = _State()
        for token in ids:
            self._advance(state, int(token))
        return state

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        for row, ids in enumerate(input_ids.tolist()):
            state = self._incremental_state(row, ids)
            if state.error:
                raise ValueError(f"the prompt does not follow the text format: {state.error}")
            if state.stage == Stage.GROUP and not self.space_group:
                allowed = self._likely_groups(state, scores[row])
            else:
                allowed = self._allowed(state)
            if state.lattice is not None and state.stage in (Stage.WYCKOFF, Stage.COORDINATE):
                allowed = self._keep_apart(state, allowed)
            elif not allowed and state.stage == Stage.FORMULA:  # no charge-neutral way on: close the formula as it is
                allowed = [self.tags[text_format.TAG_SPACE_GROUP]]
                state.fallbacks += 1
            mask[row, allowed] = 0.0
        return scores + mask

    def fallbacks(self, row: int) -> int:
        """How often a row's text had to take a choice that breaks the distance floor or charge neutrality,
        because none that keeps them was left (0 for a row this processor has not seen)."""
        cached = self._cache.get(row)
        return cached[1].fallbacks if cached else 0

    def _keep_apart(self, state: _State, allowed: list[int]) -> list[int]:
        """The allowed tokens whose atoms keep every pair at or above the floor, where a token decides an orbit: a
        Wyckoff position (without free coordinates: its orbit; with one: some value of it must have room), or
        the last free coordinate of a site (its first chunk, measured at the middle of the chunk's 0.01 range;
        then the exact second chunk). All candidates of a step are measured at once. If none keeps the floor,
        the one with the most room is allowed, and counted."""
        wp = state.wyckoff
        if state.stage == Stage.WYCKOFF:
            positions = [symmetry.wyckoff_position(state.space_group, self.wyckoff_ids[t][-1]) for t in allowed]
            measured = [i for i, p in enumerate(positions) if len(p.free_axes) <= 1]
            blocked = [False] * len(positions)
            if measured:
                closed = self._too_close(state, [positions[i].orbit_line([]) for i in measured], _CHUNK_MIDDLES)
                for i, full in zip(measured, closed.all(axis=1)):
                    blocked[i] = bool(full)
            if not all(blocked):
                return [token for token, closed in zip(allowed, blocked) if not closed]
            candidates = [p.orbits(_CHUNK_MIDDLES[:, None]) if p.free_axes else p.orbit([])[None]
                          for p in positions]  # rare: measure how close each comes, to allow the least close
            clearance = np.array([self._clearance(state, orbits).max() for orbits in candidates])
        elif state.axis in wp.free_axes and state.axis == wp.free_axes[-1]:
            earlier = state.params[:len(wp.free_axes) - 1]
            if state.coordinate_part == 0:
                values = np.array([self.first_values[t] for t in allowed]) + 0.005
            else:
                values = state.params[-1] + np.array([self.decimal_values[t] for t in allowed]) / 100
            blocked = self._too_close(state, [wp.orbit_line(earlier)], values)[0]
            if not blocked.all():
                return [token for token, closed in zip(allowed, blocked) if not closed]
            params = np.column_stack([np.tile(earlier, (len(values), 1)), values])
            clearance = self._clearance(state, wp.orbits(params))
        else:
            return allowed
        state.fallbacks += 1
        return [token for token, room in zip(allowed, clearance) if room == clearance.max()]

    def _too_close(self, state: _State, lines: list[tuple[np.ndarray, np.ndarray]], values: np.ndarray) -> np.ndarray:
        """`too_close_for_each` for orbits of the row's current element (see `symmetry.WyckoffPosition.orbit_line`)."""
        floors = self.floor.to_others(state.element, state.placed_elements)
        return too_close_for_each(state.lattice, lines, values, state.placed, floors,
                                  self.floor.between(state.element, state.element))

    def _clearance(self, state: _State, orbits: np.ndarray) -> np.ndarray:
        floors = self.floor.to_others(state.element, state.placed_elements)
        return orbit_clearance(state.lattice, orbits, state.placed, floors,
                               self.floor.between(state.element, state.element))

    def _incremental_state(self, row: int, ids: list[int]) -> _State:
        """The state of a row, advancing a cached one by the new tokens only (generate appends one per call)."""
        cached = self._cache.get(row)
        if cached and len(cached[0]) <= len(ids) and ids[:len(cached[0])] == cached[0]:
            seen, state = cached
            for token in ids[len(seen):]:
                self._advance(state, token)
        else:
            state = self.state_of(ids)
        self._cache[row] = (list(ids), state)
        return state
