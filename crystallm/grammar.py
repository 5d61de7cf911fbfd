"""Grammar-aware decoding: a LogitsProcessor that lets the model write only text that parses.

Each sequence is followed by a small state machine over the format's tokens (`crystallm.serialization`):
the formula, a space group, a number of formula units Z that the group's Wyckoff multiplicities can fill, the
free lattice parameters, the loop header, then atom-site rows whose element is forced (formula order), whose
Wyckoff positions exist in the group and leave a count that can still be completed (a fixed position is used
once), and whose free coordinates are numbers in [0, 1). `<eos>` is allowed exactly when the formula is complete.
When the prompt holds a formula, the multiplicities add up to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
from transformers import LogitsProcessor

from crystallm import serialization, symmetry

MAX_ELEMENTS = 8


@dataclass
class _State:
    """Where one sequence stands in the grammar."""

    stage: str = "start"  # start, formula, group, units, lattice, loop, row_element, wyckoff, coordinate, done
    formula: dict[str, int] = field(default_factory=dict)
    last_element: str | None = None
    counted: bool = False
    space_group: int | None = None
    formula_units: int | None = None
    lattice_left: list[int] = field(default_factory=list)  # indices into LATTICE_TAGS still to write
    lattice_part: int = 0  # 0: tag next, 1: integer part next, 2: decimals next
    remaining: dict[str, int] = field(default_factory=dict)
    used_fixed: set[str] = field(default_factory=set)
    element: str | None = None
    wyckoff: symmetry.WyckoffPosition | None = None
    axis: int = 0
    coordinate_part: int = 0  # 0: first chunk (or ".") next, 1: second chunk next
    error: str | None = None


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
def _formula_units(space_group: int, counts: tuple[int, ...], limit: int) -> tuple[int, ...]:
    """Values of Z for which the group can place Z times each count, within `limit` atoms."""
    largest = min(serialization.MAX_FORMULA_UNITS, limit // sum(counts))
    return tuple(z for z in range(1, largest + 1)
                 if _feasible(space_group, tuple(z * c for c in counts), frozenset(), limit))


@lru_cache(maxsize=10_000)
def _possible_groups(counts: tuple[int, ...], limit: int) -> tuple[int, ...]:
    """Space groups in which some Z fits the formula's counts."""
    return tuple(number for number in range(1, 231) if _formula_units(number, counts, limit))


class CrystalGrammarLogitsProcessor(LogitsProcessor):
    """Mask every token that would make the text unparseable. Use with `model.generate(..., logits_processor=
    LogitsProcessorList([CrystalGrammarLogitsProcessor(tokenizer)]))`.

    max_atoms bounds the conventional cell (Z times the formula's atoms); a prompt may end anywhere in the text.

    >>> from crystallm.tokenization import CrystaLLMTokenizer
    >>> tokenizer = CrystaLLMTokenizer.from_format()
    >>> processor = CrystalGrammarLogitsProcessor(tokenizer)
    >>> ids = torch.tensor([tokenizer("data_NaCl\\n_space_group_name_H-M_alt Fm-3m")["input_ids"]])
    >>> allowed = processor(ids, torch.zeros(1, len(tokenizer)))[0] > -1e9
    >>> tokenizer.convert_ids_to_tokens(allowed.nonzero().flatten())[:4]
    ['\\n_cell_formula_units_Z']
    """

    def __init__(self, tokenizer, max_atoms: int = 160):
        self.tokenizer = tokenizer
        self.max_atoms = max_atoms
        self.vocab_size = len(tokenizer)
        vocab = tokenizer.get_vocab()
        self.id_of = vocab
        self.token_of = {i: t for t, i in vocab.items()}
        symbols = serialization.element_symbols()
        self.formula_elements = {vocab[s]: s for s in symbols}
        self.row_elements = {vocab["\n" + s]: s for s in symbols}
        self.counts = {vocab[str(n)]: n for n in range(2, 10)} | {vocab[f"{n:02d}"]: n for n in range(10, 100)}
        self.groups = {vocab[" " + symmetry.space_group_symbol(n)]: n for n in range(1, 231)}
        self.units = {vocab[f" {z}"]: z for z in range(1, serialization.MAX_FORMULA_UNITS + 1)}
        self.integer_parts = {vocab[f" {k}."]: k for k in range(1, int(serialization.MAX_LENGTH))}
        self.coordinate_firsts = [vocab[f" 0.{k:02d}"] for k in range(100)]
        self.decimal_pairs = [vocab[f"{k:02d}"] for k in range(100)]
        self.wyckoff_ids = {vocab[t]: t[1:] for t in vocab if t.startswith(" ") and t[1:-1].isdigit()
                            and t[-1].isalpha()}
        self.fixed = vocab[" " + serialization.FIXED_COORDINATE]
        self.tags = {name: vocab["\n" + name] for name in (serialization.TAG_SPACE_GROUP,
                                                           serialization.TAG_FORMULA_UNITS,
                                                           *serialization.LATTICE_TAGS)}
        self.data = vocab[serialization.DATA_PREFIX]
        self.loop = vocab["\n" + serialization.LOOP_HEADER]
        self.skip = {tokenizer.pad_token_id, tokenizer.bos_token_id}
        self.eos = tokenizer.eos_token_id
        self._cache: dict[int, tuple[list[int], _State]] = {}

    # --- the state machine -------------------------------------------------------------------------------
    def _advance(self, state: _State, token: int) -> None:
        """Move `state` past `token` (assumed allowed; a disallowed one sets state.error)."""
        if token in self.skip or state.error:
            return
        if token not in self._allowed(state):
            state.error = f"token {self.token_of.get(token)!r} not allowed in stage {state.stage}"
            return
        if state.stage == "start":
            state.stage = "formula"
        elif state.stage == "formula":
            if token in self.formula_elements:
                state.last_element, state.counted = self.formula_elements[token], False
                state.formula[state.last_element] = 1
            elif token in self.counts:
                state.formula[state.last_element], state.counted = self.counts[token], True
            else:  # the space-group tag
                state.stage = "group"
        elif state.stage == "group":
            state.space_group = self.groups[token]
            state.stage = "units_tag"
        elif state.stage == "units_tag":
            state.stage = "units"
        elif state.stage == "units":
            state.formula_units = self.units[token]
            state.remaining = {e: c * state.formula_units for e, c in state.formula.items()}
            system = symmetry.crystal_system(state.space_group)
            state.lattice_left = list(serialization.FREE_LATTICE_PARAMETERS[system])
            state.stage, state.lattice_part = "lattice", 0
        elif state.stage == "lattice":
            state.lattice_part += 1
            if state.lattice_part == 3:
                state.lattice_left.pop(0)
                state.lattice_part = 0
                if not state.lattice_left:
                    state.stage = "loop"
        elif state.stage == "loop":
            state.stage = "row_element"
        elif state.stage == "row_element":
            if token == self.eos:
                state.stage = "done"
            else:
                state.element = self.row_elements[token]
                state.stage = "wyckoff"
        elif state.stage == "wyckoff":
            label = self.wyckoff_ids[token]
            state.wyckoff = symmetry.wyckoff_position(state.space_group, label[-1])
            state.remaining[state.element] -= state.wyckoff.multiplicity
            if not state.wyckoff.free_axes:
                state.used_fixed.add(state.wyckoff.letter)
            state.stage, state.axis, state.coordinate_part = "coordinate", 0, 0
        elif state.stage == "coordinate":
            if token == self.fixed or state.coordinate_part == 1:
                state.axis, state.coordinate_part = state.axis + 1, 0
            else:
                state.coordinate_part = 1
            if state.axis == 3:
                state.stage = "row_element"

    def _allowed(self, state: _State) -> list[int]:
        """Token ids allowed next."""
        stage = state.stage
        if stage == "start":
            return [self.data]
        if stage == "formula":
            atoms = sum(state.formula.values())
            allowed = [i for i, e in self.formula_elements.items() if e not in state.formula] \
                if len(state.formula) < MAX_ELEMENTS and atoms < self.max_atoms else []
            if state.formula:
                allowed.append(self.tags[serialization.TAG_SPACE_GROUP])
                if not state.counted:
                    allowed += [i for i, n in self.counts.items() if atoms - 1 + n <= self.max_atoms]
            return allowed
        if stage == "group":
            groups = _possible_groups(tuple(sorted(state.formula.values())), self.max_atoms)
            return [self.id_of[" " + symmetry.space_group_symbol(number)] for number in groups]
        if stage == "units_tag":
            return [self.tags[serialization.TAG_FORMULA_UNITS]]
        if stage == "units":
            return [self.id_of[f" {z}"] for z in self._units_for(state.formula, state.space_group)]
        if stage == "lattice":
            index = state.lattice_left[0]
            if state.lattice_part == 0:
                return [self.tags[serialization.LATTICE_TAGS[index]]]
            if state.lattice_part == 1:
                low, high = (serialization.MIN_LENGTH, serialization.MAX_LENGTH) if index < 3 else (1, 180)
                return [i for i, k in self.integer_parts.items() if low <= k < high]
            return self.decimal_pairs
        if stage == "loop":
            return [self.loop]
        if stage == "row_element":
            left = [e for e in state.formula if state.remaining[e] > 0]
            return [self.id_of["\n" + left[0]]] if left else [self.eos]
        if stage == "wyckoff":
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
        if stage == "coordinate":
            if state.coordinate_part == 1:
                return self.decimal_pairs
            return self.coordinate_firsts if state.axis in state.wyckoff.free_axes else [self.fixed]
        return [self.eos]  # done: keep padding with eos

    def _units_for(self, formula: dict[str, int], space_group: int) -> tuple[int, ...]:
        """Values of Z whose atom counts the space group can fill within max_atoms."""
        return _formula_units(space_group, tuple(sorted(formula.values())), self.max_atoms)

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
            allowed = self._allowed(state)
            mask[row, allowed] = 0.0
        return scores + mask

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
