"""What to generate: a `Prompt` from what a user types (formula, space group, chemical system, property
target), checked and turned into the text the model continues and the grammar that imposes it; and the prompts
of a CSP benchmark."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pymatgen.core import Composition

from crystallm import data, symmetry
from crystallm.diffraction.encoder import PATTERN_ADAPTER, pattern_prefix
from crystallm.diffraction.patterns import GRID, Peaks, PowderPattern, degraded_profile
from crystallm.errors import CrystaLLMInputError
from crystallm.generation.conditioning import check_target, condition_prefix
from crystallm.generation.distances import DistanceFloor
from crystallm.generation.grammar import CrystalGrammarLogitsProcessor
from crystallm.io import cif, text_format


def reduced_formula(formula: str) -> dict[str, int]:
    """A formula (any order, any multiple, parentheses allowed) as the text format writes it: the reduced
    integer formula in pymatgen's electronegativity order.

    >>> reduced_formula("Cl4Na4"), reduced_formula("Fe2(SO4)3")
    ({'Na': 1, 'Cl': 1}, {'Fe': 2, 'S': 3, 'O': 12})
    """
    try:
        amounts = Composition(formula).get_el_amt_dict()
    except (ValueError, KeyError) as error:
        raise CrystaLLMInputError(f"formula {formula!r}: {error}") from None
    if not amounts:
        raise CrystaLLMInputError(f"formula {formula!r}: no elements")
    unknown = [symbol for symbol in amounts if symbol not in text_format.element_symbols()]
    if unknown:
        raise CrystaLLMInputError(f"formula {formula!r}: unknown element {unknown[0]!r}")
    if any(not float(a).is_integer() or a <= 0 for a in amounts.values()):
        raise CrystaLLMInputError(f"formula {formula!r}: element counts must be positive whole numbers")
    return text_format.reduce_formula({element: int(count) for element, count in amounts.items()})[0]


def parse_space_group(value: str | int) -> int:
    """A space group given as a number (1-230) or a Hermann-Mauguin short symbol.

    >>> parse_space_group("Fm-3m"), parse_space_group("225"), parse_space_group("P6_3/mmc")
    (225, 225, 194)
    """
    text = str(value).strip()
    if text.isdigit():
        if not 1 <= int(text) <= 230:
            raise CrystaLLMInputError(f"space group {text}: numbers run from 1 to 230")
        return int(text)
    try:
        return symmetry.space_group_number(text)
    except KeyError as error:
        raise CrystaLLMInputError(f"space group {text!r}: {error.args[0]}") from None


def parse_chemical_system(value: str) -> tuple[str, ...]:
    """A chemical system such as 'Li-Fe-P-O' (each element must appear in the formula).

    >>> parse_chemical_system("Li-Fe-P-O")
    ('Li', 'Fe', 'P', 'O')
    """
    elements = tuple(part.strip() for part in value.split("-"))
    unknown = [e for e in elements if e not in text_format.element_symbols()]
    if unknown or not elements:
        raise CrystaLLMInputError(f"chemical system {value!r}: unknown element {unknown[0]!r}" if unknown
                                  else f"chemical system {value!r}: no elements")
    if len(set(elements)) != len(elements):
        raise CrystaLLMInputError(f"chemical system {value!r}: an element is named twice")
    return elements


@dataclass(frozen=True)
class Prompt:
    """What to generate. Empty: unconditional. `formula` (reduced, format order): crystal structure prediction.
    `space_group` and `elements` (a chemical system) are imposed by the grammar while the model writes.
    `property_name` + `target`: a property condition before the text (`crystallm.generation.conditioning`), for a model
    with that property's adapter; `target` None is the unconditional branch of guidance. `pattern`: a powder
    profile on `diffraction.patterns.GRID` (`PowderPattern.to_profile`) before the text, for a model with the
    pattern adapter (`crystallm.diffraction.encoder`); `pattern_source` names it."""

    formula: tuple[tuple[str, int], ...] = ()
    space_group: int | None = None
    elements: tuple[str, ...] = ()
    property_name: str | None = None
    target: float | None = None
    pattern: tuple[float, ...] = ()
    pattern_source: str = ""

    @classmethod
    def of(cls, formula: str | None = None, space_group: str | int | None = None,
           chemical_system: str | None = None, property_name: str | None = None,
           target: float | None = None) -> "Prompt":
        """A prompt from what a user types; bad input raises CrystaLLMInputError naming it.

        >>> Prompt.of(formula="NaCl", space_group="Fm-3m").text()
        'data_NaCl\\n_space_group_name_H-M_alt Fm-3m'
        """
        prompt = cls(formula=tuple(reduced_formula(formula).items()) if formula is not None else (),
                     space_group=parse_space_group(space_group) if space_group is not None else None,
                     elements=parse_chemical_system(chemical_system) if chemical_system is not None else (),
                     property_name=property_name, target=target)
        if property_name is not None:
            check_target(property_name, target)  # an unknown property or a bad target fails here
        if prompt.formula and prompt.elements and {e for e, _ in prompt.formula} != set(prompt.elements):
            raise CrystaLLMInputError(f"formula {formula!r} is not in the chemical system {chemical_system!r}")
        return prompt

    @property
    def adapter_name(self) -> str | None:
        """The adapter this prompt needs active: its property's, the pattern adapter's, or None."""
        return self.property_name or (PATTERN_ADAPTER if self.pattern else None)

    def with_pattern(self, pattern: PowderPattern) -> Prompt:
        """This prompt conditioned on a powder pattern as well.

        >>> import numpy as np
        >>> from crystallm.diffraction.patterns import GRID
        >>> pattern = PowderPattern(GRID, np.exp(-0.5 * ((GRID - 31.7) / 0.1) ** 2), "nacl.xy")
        >>> prompt = Prompt.of(formula="NaCl").with_pattern(pattern)
        >>> prompt.adapter_name, prompt.describe()
        ('xrd', 'formula NaCl, XRD pattern nacl.xy')
        >>> prompt.text().endswith("<value_7>data_NaCl\\n_space_group_name_H-M_alt")
        True
        """
        if self.property_name:
            raise CrystaLLMInputError(f"a pattern and a {self.property_name} target cannot go together: one adapter "
                                      f"is active at a time")
        profile = pattern.to_profile()
        return replace(self, pattern=tuple(float(v) for v in profile), pattern_source=pattern.source)

    def text(self) -> str:
        """The prompt as the model reads it: the condition, if any, then the text format up to where the model
        takes over."""
        text = condition_prefix(self.property_name, self.target) if self.property_name else \
            pattern_prefix() if self.pattern else ""
        if not self.formula:
            return text + text_format.DATA_PREFIX
        text += text_format.DATA_PREFIX + text_format.format_formula(dict(self.formula))
        text += "\n" + text_format.TAG_SPACE_GROUP
        if self.space_group:
            text += " " + symmetry.space_group_symbol(self.space_group)
        return text

    def describe(self) -> str:
        """A short human-readable form, for records and errors."""
        parts = [f"formula {text_format.format_formula(dict(self.formula))}" if self.formula else "",
                 f"space group {symmetry.space_group_symbol(self.space_group)} ({self.space_group})"
                 if self.space_group else "", f"chemical system {'-'.join(self.elements)}" if self.elements else "",
                 f"{self.property_name} {self.target}" if self.property_name else "",
                 f"XRD pattern {self.pattern_source}" if self.pattern else ""]
        return ", ".join(p for p in parts if p) or "unconditional"

    def grammar(self, tokenizer, max_atoms: int, max_length: int, floor: DistanceFloor | None = None,
                charge_neutral: bool = False) -> CrystalGrammarLogitsProcessor:
        """The grammar processor that imposes this prompt (with `floor`, no two atoms closer than it; with
        `charge_neutral`, a formula the model writes passes SMACT's test); raises CrystaLLMInputError if nothing
        can satisfy it."""
        # A formula in the text already fixes the elements; a space group in the text is checked by the grammar.
        elements = () if self.formula else self.elements
        space_group = None if self.formula else self.space_group
        try:
            processor = CrystalGrammarLogitsProcessor(tokenizer, max_atoms, max_length, space_group, elements, floor,
                                                      charge_neutral and not self.formula)
        except ValueError as error:
            raise CrystaLLMInputError(f"impossible prompt ({self.describe()}): {error}") from None
        state = processor.state_of(tokenizer(self.text())["input_ids"])
        if state.error:
            atoms = sum(count for _, count in self.formula)
            if atoms > processor.formula_limit:
                reason = (f"{atoms} atoms in the reduced formula; at most {processor.formula_limit} fit "
                          f"(--max-atoms {max_atoms} and the model's context of {max_length} tokens)")
            else:
                reason = f"no conventional cell of at most {max_atoms} atoms in this space group holds it"
            raise CrystaLLMInputError(f"impossible prompt ({self.describe()}): {reason}")
        return processor


def csp_prompts(split: str, ids_file: str | Path, attempts: int, pattern: str | None = None,
                seed: int = 0) -> tuple[list, list[str]]:
    """CSP prompts (each target's reduced formula, `attempts` times) and their entry names '<id>__<k>'. With
    `pattern` "clean" each prompt also holds the target's computed powder pattern; with "degraded", that pattern
    degraded as a measurement would be (`degraded_profile`, drawn from `seed` and the target's place).

    >>> prompts, names = csp_prompts("mp20-bt/test", "../shared/benchmarks/mp20bt-test-csp200.txt", 2)
    >>> len(prompts), names[:2], prompts[0] == prompts[1]
    (400, ['mp-1095419__0', 'mp-1095419__1'], True)
    """
    if pattern not in (None, "clean", "degraded"):
        raise CrystaLLMInputError(f"pattern {pattern!r}: clean, degraded or none")
    benchmark, _, part = split.partition("/")
    dataset = data.load_split(benchmark, part)
    cif_of = dict(zip(dataset["id"], dataset["cif"]))
    prompts, names = [], []
    for place, target in enumerate(data.read_ids(ids_file)):
        if target not in cif_of:
            raise CrystaLLMInputError(f"{ids_file}: id {target!r} is not in {split}")
        structure = cif.structure_from_cif(cif_of[target], target)
        prompt = Prompt.of(formula=structure.composition.reduced_formula)
        if pattern:
            peaks = Peaks.from_structure(structure)
            profile = peaks.to_profile() if pattern == "clean" else \
                degraded_profile(peaks, np.random.default_rng([seed, place]))
            prompt = prompt.with_pattern(PowderPattern(GRID, profile.astype(float), f"{target} ({pattern})"))
        prompts += [prompt] * attempts
        names += [f"{target}__{k}" for k in range(attempts)]
    return prompts, names
