"""The crystallm text format: one compact, symmetry-aware, CIF-like text per crystal.

This module is the only definition of the format: its layout, its precision, its lexemes (the units
the tokenizer maps to ids) and its vocabulary. Everything else imports from here.

An example (GaTe, mp-10009, P6_3/mmc)::

    data_GaTe
    _space_group_name_H-M_alt P6_3/mmc
    _cell_formula_units_Z 4
    _cell_length_a 4.13
    _cell_length_c 18.43
    loop_
    _atom_site_type_symbol
    _atom_site_Wyckoff_symbol
    _atom_site_fract_x
    _atom_site_fract_y
    _atom_site_fract_z
    Ga 4f . . 0.1830
    Te 4f . . 0.6138

Rules:

* ``data_`` names the reduced formula (elements in pymatgen's electronegativity order);
  ``_cell_formula_units_Z`` is the number of formula units in the conventional cell.
* The setting is the ITA standard one of `crystallm.symmetry` (spglib's standardized conventional cell).
* Only the lattice parameters that the crystal system leaves free are written (a cubic cell has
  ``_cell_length_a`` alone); the others follow from the space group.
* Each orbit of the asymmetric unit is one row: element, Wyckoff symbol (multiplicity + letter), and
  x, y, z, where a coordinate fixed or tied by the Wyckoff position is written ``.`` and a free one
  is its value in ITA's representative (e.g. ``x, 2x, 1/4``).
* Canonical choices: every description that the space group's Euclidean normalizer allows (other
  origins, inversion; for polar groups the sliding origin pinned so that a first site sits at 0) is
  written, each orbit with its smallest representative and rows sorted by element (formula order),
  Wyckoff letter and parameters, and the smallest text wins. So the same crystal in any cell,
  orientation, origin or site order gives the same text (mirror images count as the same crystal),
  up to last-digit rounding of positions that were not exactly symmetric to begin with.
* Precision: lengths 0.01 Å, angles 0.01°, fractional coordinates 1e-4. Lengths lie in [1, 180) Å.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

import numpy as np
from pymatgen.core import Element, Lattice, Structure

from crystallm import symmetry
from crystallm.errors import CrystaLLMInputError, InvalidStructureError, MalformedTextError, WyckoffLocationError
from crystallm.io.cif import is_chemical_element, structure_from_cif

FORMAT_VERSION = "1"

LENGTH_DECIMALS = 2
ANGLE_DECIMALS = 2
COORDINATE_DECIMALS = 4
MAX_LENGTH = 180.0  # Å; an integer-part lexeme exists for every length and angle below this
MIN_LENGTH = 1.0  # Å; shorter cell edges are degenerate
MAX_FORMULA_UNITS = 256

DATA_PREFIX = "data_"
TAG_SPACE_GROUP = "_space_group_name_H-M_alt"
TAG_FORMULA_UNITS = "_cell_formula_units_Z"
LATTICE_TAGS = ("_cell_length_a", "_cell_length_b", "_cell_length_c",
                "_cell_angle_alpha", "_cell_angle_beta", "_cell_angle_gamma")
ATOM_SITE_TAGS = ("_atom_site_type_symbol", "_atom_site_Wyckoff_symbol",
                  "_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z")
LOOP_HEADER = "\n".join(["loop_", *ATOM_SITE_TAGS])
FIXED_COORDINATE = "."

# Indices into LATTICE_TAGS written for each crystal system; the rest follow from the symmetry.
FREE_LATTICE_PARAMETERS = {
    "triclinic": (0, 1, 2, 3, 4, 5),
    "monoclinic": (0, 1, 2, 4),  # unique axis b
    "orthorhombic": (0, 1, 2),
    "tetragonal": (0, 2),
    "trigonal": (0, 2),  # hexagonal axes, rhombohedral groups included
    "hexagonal": (0, 2),
    "cubic": (0,),
}

# The lexemes, in the order a regex must try them. The tokenizer pre-splits text with this pattern,
# so every lexeme carries the whitespace in front of it and decoding is plain concatenation.
LEXEME_PATTERN = "|".join([
    re.escape("\n" + LOOP_HEADER),  # the whole atom-site loop header
    r"\n_[A-Za-z_\-]+",  # a tag starting a line
    re.escape(DATA_PREFIX),
    r" 0\.\d\d",  # the first two decimals of a fractional coordinate
    r" \d+\.",  # the integer part of a length or angle
    r"\d\d",  # two further decimals; or a two-digit formula count
    r" \d+[A-Za-z]",  # a Wyckoff symbol
    r" \d+",  # the number of formula units
    r" \.",  # a coordinate fixed by the Wyckoff position
    r" [A-Z][^\s]*",  # a space-group symbol
    r"\n[A-Z][a-z]?",  # the element starting an atom-site row
    r"[A-Z][a-z]?",  # an element of the formula
    r"\d",  # a one-digit formula count
    r"\s|\S",  # anything else, one character at a time (unknown to the vocabulary)
])

_FORMULA_RE = re.compile(r"([A-Z][a-z]?)(\d*)")


def element_symbols() -> list[str]:
    """Every element symbol the format knows (pymatgen's periodic table)."""
    return [element.symbol for element in Element]


@cache
def vocabulary() -> tuple[str, ...]:
    """Every lexeme of the format. Text made of these (and nothing else) tokenizes without unknowns."""
    lexemes = ["\n" + LOOP_HEADER, DATA_PREFIX, " " + FIXED_COORDINATE]
    lexemes += ["\n" + tag for tag in (TAG_SPACE_GROUP, TAG_FORMULA_UNITS, *LATTICE_TAGS)]
    lexemes += [" " + symmetry.space_group_symbol(number) for number in range(1, 231)]
    labels = {wp.label for number in range(1, 231) for wp in symmetry.wyckoff_positions(number)}
    lexemes += sorted((" " + label for label in labels), key=lambda s: (int(s[1:-1]), s[-1]))
    symbols = element_symbols()
    lexemes += symbols + ["\n" + symbol for symbol in symbols]
    lexemes += [f" {units}" for units in range(1, MAX_FORMULA_UNITS + 1)]
    lexemes += [f" 0.{k:02d}" for k in range(100)]
    lexemes += [f" {k}." for k in range(1, int(MAX_LENGTH))]
    lexemes += [f"{k:02d}" for k in range(100)] + [str(k) for k in range(10)]
    assert len(set(lexemes)) == len(lexemes), "lexemes must be distinct"
    return tuple(lexemes)


def shuffle_sites(text: str, rng) -> str:
    r"""The same crystal with its atom-site rows in another order: an equivalent, non-canonical serialization
    (the contrastive objective's second view). `rng` is a numpy Generator.

    >>> import numpy as np
    >>> text = "data_NaCl\n_space_group_name_H-M_alt Fm-3m\n_cell_formula_units_Z 4\n_cell_length_a 5.69\n" + (
    ...     LOOP_HEADER + "\nNa 4a . . .\nCl 4b . . .")
    >>> shuffle_sites(text, np.random.default_rng(3)).split("\n")[-2:]
    ['Cl 4b . . .', 'Na 4a . . .']
    """
    head, _, rows = text.partition(LOOP_HEADER + "\n")
    lines = rows.split("\n")
    return head + LOOP_HEADER + "\n" + "\n".join(lines[i] for i in rng.permutation(len(lines)))


def hard_view(text: str, rng, noise: float = 0.03, volume_change: float = 0.02) -> str:
    r"""The same crystal written another way, hard to match by its tokens: atoms moved by up to `noise` Å, the
    volume scaled by up to `volume_change` (both keep the symmetry at the format's tolerance), then a description
    drawn from its others (another origin or Wyckoff set, where the group has one) with its rows shuffled. A
    supercell or the primitive cell would give the canonical text again: the format is invariant to them.
    `rng` is a numpy Generator.

    >>> import numpy as np
    >>> text = serialize_structure(Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
    ...                                                      [[0, 0, 0], [.5, .5, .5]]))
    >>> view = hard_view(text, np.random.default_rng(0))
    >>> view != text, bool(parse_structure(view).matches(parse_structure(text)))
    (True, True)
    """
    structure = parse_structure(text)
    structure.scale_lattice(structure.volume * (1 + rng.uniform(-volume_change, volume_change)))
    displacement = rng.normal(size=(len(structure), 3))
    displacement *= rng.uniform(0, noise, size=(len(structure), 1)) / np.linalg.norm(displacement, axis=1,
                                                                                        keepdims=True)
    moved = Structure(structure.lattice, structure.species, structure.cart_coords + displacement,
                      coords_are_cartesian=True)
    try:
        options = [format_crystal_text(d) for d in descriptions(moved)]
    except InvalidStructureError:  # noise that breaks the analysis: the unmoved crystal's descriptions
        options = [format_crystal_text(d) for d in descriptions(structure)]
    others = [option for option in options if option != text] or options
    return shuffle_sites(others[rng.integers(len(others))], rng)


def split_lexemes(text: str) -> list[str]:
    """Split a text into lexemes (what the tokenizer does before mapping them to ids).

    >>> split_lexemes("data_GaTe\\n_cell_length_a 4.13")
    ['data_', 'Ga', 'Te', '\\n_cell_length_a', ' 4.', '13']
    """
    return _LEXEME_RE.findall(text)


_LEXEME_RE = re.compile(LEXEME_PATTERN)


@dataclass(frozen=True)
class AtomSite:
    """One row of the atom-site loop: an orbit of the asymmetric unit."""

    element: str
    wyckoff: symmetry.WyckoffPosition
    params: tuple[float, ...]  # free coordinates, in the order of wyckoff.free_axes


@dataclass(frozen=True)
class CrystalText:
    """The content of one text, before layout: what `format_crystal_text` writes and `read_crystal_text` reads."""

    formula: dict[str, int]  # reduced formula, in writing order
    space_group: int
    formula_units: int
    lattice_parameters: tuple[float, float, float, float, float, float]
    sites: tuple[AtomSite, ...]


def is_crystal_text(content: str) -> bool:
    r"""Whether a file's content is crystallm text (rather than a CIF or anything else).

    >>> is_crystal_text("data_NaCl\n" + LOOP_HEADER), is_crystal_text("data_NaCl\n_cell_length_a 5.64")
    (True, False)
    """
    return content.lstrip().startswith(DATA_PREFIX) and LOOP_HEADER in content


def format_formula(formula: dict[str, int]) -> str:
    """'GaTe', 'Ga2Te3': element then count, a count of 1 left out."""
    return "".join(f"{element}{count if count != 1 else ''}" for element, count in formula.items())


def _format_number(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _round_coordinate(value: float) -> float:
    """Round to the format's precision and wrap into [0, 1) (0.99996 becomes 0.0)."""
    return round(float(value), COORDINATE_DECIMALS) % 1.0


def format_crystal_text(crystal: CrystalText) -> str:
    """Lay out a CrystalText as text (the inverse of `read_crystal_text`)."""
    system = symmetry.crystal_system(crystal.space_group)
    lines = [DATA_PREFIX + format_formula(crystal.formula),
             f"{TAG_SPACE_GROUP} {symmetry.space_group_symbol(crystal.space_group)}",
             f"{TAG_FORMULA_UNITS} {crystal.formula_units}"]
    for index in FREE_LATTICE_PARAMETERS[system]:
        decimals = LENGTH_DECIMALS if index < 3 else ANGLE_DECIMALS
        lines.append(f"{LATTICE_TAGS[index]} {_format_number(crystal.lattice_parameters[index], decimals)}")
    lines.append(LOOP_HEADER)
    for site in crystal.sites:
        values = [FIXED_COORDINATE] * 3
        for axis, value in zip(site.wyckoff.free_axes, site.params):
            values[axis] = _format_number(_round_coordinate(value), COORDINATE_DECIMALS)
        lines.append(" ".join([site.element, site.wyckoff.label, *values]))
    return "\n".join(lines)


@cache
def _formula_order(symbol: str) -> tuple[float, str]:
    """pymatgen's formula order: by Pauling electronegativity (noble gases, which have none, last)."""
    with warnings.catch_warnings():  # pymatgen warns for each element without one: expected here
        warnings.simplefilter("ignore")
        electronegativity = Element(symbol).X
    return (electronegativity if math.isfinite(electronegativity) else math.inf, symbol)


def reduce_formula(counts: dict[str, int]) -> tuple[dict[str, int], int]:
    """The reduced formula as the format writes it (pymatgen's electronegativity order) and the number of
    formula units in `counts`.

    >>> reduce_formula({"Cl": 4, "Na": 4})
    ({'Na': 1, 'Cl': 1}, 4)
    """
    formula_units = math.gcd(*counts.values())
    return {symbol: counts[symbol] // formula_units for symbol in sorted(counts, key=_formula_order)}, formula_units


def _check_orderable(structure: Structure) -> None:
    if not isinstance(structure, Structure):
        raise InvalidStructureError(f"expected a pymatgen Structure, got {type(structure).__name__}")
    if len(structure) == 0:
        raise InvalidStructureError("the structure has no atoms")
    symmetry.check_ordered(structure, "the format holds ordered structures only")
    for index, site in enumerate(structure):
        if not is_chemical_element(site.specie):
            raise InvalidStructureError(f"site {index} holds {site.specie!s}, which is not a chemical element")
    lengths, volume = structure.lattice.abc, structure.lattice.volume
    if not all(math.isfinite(x) for x in (*lengths, volume)) or volume < 1e-3:
        raise InvalidStructureError(f"degenerate lattice: lengths {np.round(lengths, 4).tolist()} Å, "
                                    f"volume {volume:.4g} Å^3")


def equivalent_texts(text: str) -> list[str]:
    r"""Every text of the crystal that `text` describes, one per description the format allows (`descriptions`),
    sorted, the canonical text among them: equivalent serializations for pretraining augmentation.

    >>> text = serialize_structure(Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
    ...                                                      [[0, 0, 0], [.5, .5, .5]]))
    >>> [t.split("\n")[-2:] for t in equivalent_texts(text)]
    [['Na 4a . . .', 'Cl 4b . . .'], ['Na 4b . . .', 'Cl 4a . . .']]
    """
    return sorted({format_crystal_text(d) for d in descriptions(parse_structure(text))})


def crystal_text_of(structure: Structure, symprec: float = symmetry.DEFAULT_SYMPREC) -> CrystalText:
    """Analyse a structure into the content of its canonical text: the smallest text of its `descriptions`."""
    return min(descriptions(structure, symprec), key=format_crystal_text)


def descriptions(structure: Structure, symprec: float = symmetry.DEFAULT_SYMPREC) -> list[CrystalText]:
    """Every description of the structure the format allows: one per origin choice of the space group's
    normalizer (another origin, inversion, another Wyckoff set; for polar groups, a sliding origin pinned on
    each candidate first site). The same crystal written differently: hard views for contrastive pretraining.

    Where spglib's standardized positions at `symprec` do not sit on their Wyckoff positions (noisy cells on
    the edge of a higher symmetry), tighter tolerances (symprec / 10, / 100) are tried.

    >>> from pymatgen.core import Lattice
    >>> rocksalt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    >>> sorted({format_crystal_text(d).split(chr(10))[-1] for d in descriptions(rocksalt)})  # Cl on 4b, or 4a
    ['Cl 4a . . .', 'Cl 4b . . .']
    """
    _check_orderable(structure)
    structure = Structure(structure.lattice, [site.specie.symbol for site in structure], structure.frac_coords)
    for tolerance in (symprec, symprec / 10, symprec / 100):
        try:
            return _descriptions(symmetry.standard_cell(structure, tolerance))
        except WyckoffLocationError as error:
            problem = error
    raise InvalidStructureError(f"{structure.composition.formula}: {problem} (tried symprec {symprec} to "
                                f"{symprec / 100})")


def _descriptions(cell: symmetry.StandardCell) -> list[CrystalText]:
    lattice = cell.lattice
    parameters = (*lattice.abc, *lattice.angles)
    for name, value in zip(("a", "b", "c"), lattice.abc):
        if not MIN_LENGTH <= round(value, LENGTH_DECIMALS) < MAX_LENGTH:
            raise InvalidStructureError(f"cell length {name}={value:.4g} Å of the standardized cell is outside "
                                        f"the format's range [{MIN_LENGTH}, {MAX_LENGTH}) Å")

    # Reduced formula in pymatgen's order (electronegativity), Z from the conventional cell.
    counts: dict[str, int] = {}
    for number in cell.atomic_numbers:
        symbol = Element.from_Z(int(number)).symbol
        counts[symbol] = counts.get(symbol, 0) + 1
    formula, formula_units = reduce_formula(counts)
    if formula_units > MAX_FORMULA_UNITS:
        raise InvalidStructureError(f"{formula_units} formula units in the conventional cell; "
                                    f"the format allows at most {MAX_FORMULA_UNITS}")

    elements = [Element.from_Z(int(z)).symbol for z in cell.atomic_numbers]
    _, orbits, multiplicities = np.unique(cell.orbit_ids, return_index=True, return_counts=True)
    orbits, multiplicities = orbits.tolist(), multiplicities.tolist()  # first atom of each orbit, its size
    rank = {symbol: i for i, symbol in enumerate(formula)}
    found = []
    for rotation, translation in symmetry.origin_choices(cell.space_group):
        if not _preserves_metric(rotation, lattice):
            continue
        coords = np.mod(cell.frac_coords @ rotation.T + translation, 1.0)
        for shift in _origin_shifts(cell.space_group, coords, orbits, multiplicities, elements, rank):
            sites = _atom_sites(cell.space_group, np.mod(coords + shift, 1.0), orbits, multiplicities, elements,
                                rank)
            found.append(CrystalText(formula, cell.space_group, formula_units, parameters, sites))
    return found  # never empty: the identity is always an origin choice


def _preserves_metric(rotation: np.ndarray, lattice: Lattice) -> bool:
    """Whether x -> rotation @ x is an isometry of this lattice (R^T G R = G)."""
    metric = lattice.metric_tensor
    return np.allclose(rotation.T @ metric @ rotation, metric, rtol=1e-5, atol=1e-5)


def _atom_sites(space_group: int, coords: np.ndarray, orbits: list[int], multiplicities: list[int],
                elements: list[str], rank: dict[str, int]) -> tuple[AtomSite, ...]:
    """One AtomSite per orbit, each with its smallest representative, in canonical order."""
    sites = []
    for atom, multiplicity in zip(orbits, multiplicities):
        wp = symmetry.locate_wyckoff(space_group, coords[atom], multiplicity)
        candidates = wp.representatives(coords[atom])
        params = min(tuple(_round_coordinate(v) for v in wp.params_of(point)) for point in candidates)
        sites.append(AtomSite(elements[atom], wp, params))
    sites.sort(key=lambda s: (rank[s.element], s.wyckoff.letter.lower(), s.wyckoff.letter, s.params))
    return tuple(sites)


def _origin_shifts(space_group: int, coords: np.ndarray, orbits: list[int], multiplicities: list[int],
                   elements: list[str], rank: dict[str, int]) -> list[np.ndarray]:
    """Origin shifts to try: none, or (polar groups) one per candidate first site, putting it at 0 along
    the axes where the origin may slide."""
    axes = list(symmetry.free_origin_axes(space_group))
    if not axes:
        return [np.zeros(3)]
    sites = _atom_sites(space_group, coords, orbits, multiplicities, elements, rank)
    first = (sites[0].element, sites[0].wyckoff.letter)
    shifts = []
    for site in sites:
        if (site.element, site.wyckoff.letter) == first:
            shift = np.zeros(3)
            shift[axes] = -site.wyckoff.position(site.params)[axes]
            shifts.append(shift)
    return shifts


def serialize_structure(structure: Structure, symprec: float = symmetry.DEFAULT_SYMPREC) -> str:
    """Write a structure as crystallm text (canonical: the same crystal gives the same text).

    >>> from pymatgen.core import Lattice, Structure
    >>> print(serialize_structure(Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])))
    data_NaCl
    _space_group_name_H-M_alt Pm-3m
    _cell_formula_units_Z 1
    _cell_length_a 5.64
    loop_
    _atom_site_type_symbol
    _atom_site_Wyckoff_symbol
    _atom_site_fract_x
    _atom_site_fract_y
    _atom_site_fract_z
    Na 1a . . .
    Cl 1b . . .
    """
    return format_crystal_text(crystal_text_of(structure, symprec))


class _Lines:
    """Line reader that names the line in every error."""

    def __init__(self, text: str):
        self.lines = text.split("\n")
        self.index = 0

    def error(self, message: str) -> MalformedTextError:
        return MalformedTextError(f"line {self.index + 1}: {message}")

    def next(self, what: str) -> str:
        if self.index >= len(self.lines):
            raise MalformedTextError(f"text ends after line {len(self.lines)}; expected {what}")
        line = self.lines[self.index]
        self.index += 1
        return line

    def tag_value(self, tag: str) -> str:
        line = self.next(tag)
        name, _, value = line.partition(" ")
        if name != tag or not value:
            self.index -= 1
            raise self.error(f"expected '{tag} <value>', got {line!r}")
        return value


def stated_formula(text: str) -> dict[str, int]:
    """The reduced formula a text states on its first line, read without parsing the rest.

    >>> stated_formula("data_Ga2Te3\\n_space_group_name_H-M_alt C2/m")
    {'Ga': 2, 'Te': 3}
    """
    first = text.split("\n", 1)[0]
    if not first.startswith(DATA_PREFIX):
        raise MalformedTextError(f"first line {first[:40]!r} does not start with {DATA_PREFIX}")
    return parse_formula(first[len(DATA_PREFIX):])


def parse_formula(formula: str) -> dict[str, int]:
    """Read a formula written as `format_formula` does, e.g. 'Ga2Te3' -> {'Ga': 2, 'Te': 3}.

    >>> parse_formula("Ga2Te3")
    {'Ga': 2, 'Te': 3}
    """
    parts = _FORMULA_RE.findall(formula)
    if not formula or "".join(e + n for e, n in parts) != formula:
        raise MalformedTextError(f"formula {formula!r} is not element symbols with optional counts")
    result: dict[str, int] = {}
    for element, count in parts:
        if not Element.is_valid_symbol(element):
            raise MalformedTextError(f"formula {formula!r}: unknown element {element!r}")
        if element in result:
            raise MalformedTextError(f"formula {formula!r} names {element} twice")
        value = int(count) if count else 1
        if value < 1:
            raise MalformedTextError(f"formula {formula!r}: count of {element} must be positive")
        result[element] = value
    return result


def _parse_float(lines: _Lines, value: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise lines.error(f"{what} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise lines.error(f"{what} {value!r} is not finite")
    return number


def read_crystal_text(text: str) -> CrystalText:
    """Read a text into its content, checking it against the format (the inverse of `format_crystal_text`)."""
    if not isinstance(text, str):
        raise MalformedTextError(f"expected a str, got {type(text).__name__}")
    lines = _Lines(text.strip("\n"))
    header = lines.next("'data_<formula>'")
    if not header.startswith(DATA_PREFIX):
        raise lines.error(f"expected 'data_<formula>', got {header!r}")
    try:
        formula = parse_formula(header[len(DATA_PREFIX):])
    except MalformedTextError as error:
        raise lines.error(str(error)) from None

    symbol = lines.tag_value(TAG_SPACE_GROUP)
    try:
        space_group = symmetry.space_group_number(symbol)
    except KeyError as error:
        raise lines.error(error.args[0]) from None
    units = lines.tag_value(TAG_FORMULA_UNITS)
    if not units.isdigit() or not 1 <= int(units) <= MAX_FORMULA_UNITS:
        raise lines.error(f"{TAG_FORMULA_UNITS} must be an integer in 1..{MAX_FORMULA_UNITS}, got {units!r}")
    formula_units = int(units)

    system = symmetry.crystal_system(space_group)
    given = {}
    for index in FREE_LATTICE_PARAMETERS[system]:
        given[index] = _parse_float(lines, lines.tag_value(LATTICE_TAGS[index]), LATTICE_TAGS[index])
    parameters = complete_lattice_parameters(system, given)
    for name, value in zip("abc", parameters[:3]):
        if not MIN_LENGTH <= value < MAX_LENGTH:
            raise MalformedTextError(f"cell length {name}={value} Å is outside [{MIN_LENGTH}, {MAX_LENGTH}) Å")
    for name, value in zip(("alpha", "beta", "gamma"), parameters[3:]):
        if not 0 < value < 180:
            raise MalformedTextError(f"cell angle {name}={value}° is outside (0, 180)°")

    for expected in LOOP_HEADER.split("\n"):
        line = lines.next(expected)
        if line != expected:
            lines.index -= 1
            raise lines.error(f"expected {expected!r}, got {line!r}")

    sites = []
    while lines.index < len(lines.lines):
        sites.append(_read_site(lines, space_group, formula))
    if not sites:
        raise MalformedTextError("the atom-site loop has no rows")
    _check_composition(formula, formula_units, sites)
    return CrystalText(formula, space_group, formula_units, parameters, tuple(sites))


def complete_lattice_parameters(system: str, given: dict[int, float]) -> tuple[float, ...]:
    """a, b, c, alpha, beta, gamma of a crystal system's cell from its free parameters (index into LATTICE_TAGS).

    >>> complete_lattice_parameters("hexagonal", {0: 3.2, 2: 5.1})
    (3.2, 3.2, 5.1, 90.0, 90.0, 120.0)
    """
    if system == "cubic":
        a = given[0]
        return (a, a, a, 90.0, 90.0, 90.0)
    if system == "tetragonal":
        return (given[0], given[0], given[2], 90.0, 90.0, 90.0)
    if system in ("trigonal", "hexagonal"):
        return (given[0], given[0], given[2], 90.0, 90.0, 120.0)
    if system == "orthorhombic":
        return (given[0], given[1], given[2], 90.0, 90.0, 90.0)
    if system == "monoclinic":
        return (given[0], given[1], given[2], 90.0, given[4], 90.0)
    return tuple(given[i] for i in range(6))


def _read_site(lines: _Lines, space_group: int, formula: dict[str, int]) -> AtomSite:
    row = lines.next("an atom-site row")
    fields = row.split(" ")
    if len(fields) != 5:
        raise lines.error(f"an atom-site row has 5 fields (element, Wyckoff symbol, x, y, z), got {row!r}")
    element, label, *values = fields
    if element not in formula:
        raise lines.error(f"element {element!r} is not in the formula {format_formula(formula)}")
    letter, multiplicity = label[-1:], label[:-1]
    try:
        wp = symmetry.wyckoff_position(space_group, letter)
    except KeyError as error:
        raise lines.error(error.args[0]) from None
    if multiplicity != str(wp.multiplicity):
        raise lines.error(f"Wyckoff {label!r}: position {letter} of space group "
                          f"{symmetry.space_group_symbol(space_group)} has multiplicity {wp.multiplicity}")
    params = []
    for axis, value in enumerate(values):
        name = "xyz"[axis]
        if axis in wp.free_axes:
            number = _parse_float(lines, value, f"coordinate {name}")
            if not 0.0 <= number < 1.0:
                raise lines.error(f"coordinate {name}={value} is outside [0, 1)")
            params.append(number)
        elif value != FIXED_COORDINATE:
            raise lines.error(f"coordinate {name} of Wyckoff {wp.label} is fixed by the position and must be "
                              f"written {FIXED_COORDINATE!r}, got {value!r}")
    return AtomSite(element, wp, tuple(params))


def _check_composition(formula: dict[str, int], formula_units: int, sites: list[AtomSite]) -> None:
    counts = {element: 0 for element in formula}
    for site in sites:
        counts[site.element] += site.wyckoff.multiplicity
    expected = {element: count * formula_units for element, count in formula.items()}
    if counts != expected:
        raise MalformedTextError(f"site multiplicities give {format_formula(counts)} but "
                                 f"{format_formula(formula)} x Z={formula_units} needs {format_formula(expected)}")


def crystal_text_to_structure(crystal: CrystalText, primitive: bool = False) -> Structure:
    """Build the structure that a CrystalText describes: its conventional cell, or the primitive one."""
    alpha, beta, gamma = crystal.lattice_parameters[3:]
    if not (alpha + beta + gamma < 360 and alpha + beta > gamma and alpha + gamma > beta and beta + gamma > alpha):
        raise MalformedTextError(f"cell angles {alpha}, {beta}, {gamma} do not form a cell (each must be less than "
                                 f"the sum of the other two, and their sum less than 360)")
    lattice = Lattice.from_parameters(*crystal.lattice_parameters)
    species, coords = [], []
    for site in crystal.sites:
        orbit = site.wyckoff.orbit(site.params)
        species += [site.element] * len(orbit)
        coords.append(orbit)
    structure = Structure(lattice, species, np.concatenate(coords))
    return symmetry.primitive_structure(structure) if primitive else structure


def parse_structure(text: str, primitive: bool = False) -> Structure:
    """Read crystallm text back into a pymatgen Structure: the conventional standard cell that the text
    describes, or (primitive=True) spglib's primitive cell of it.

    Raises MalformedTextError naming the line and the problem.

    >>> text = serialize_structure(Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]))
    >>> parse_structure(text).composition.reduced_formula
    'NaCl'
    """
    return crystal_text_to_structure(read_crystal_text(text), primitive)


@dataclass
class SerializationResult:
    """Outcome of serializing one input of a batch: text, or the error that stopped it."""

    name: str
    text: str | None = None
    error: str | None = None


def serialize_one(item: Structure | str, name: str, symprec: float = symmetry.DEFAULT_SYMPREC) -> SerializationResult:
    """Serialize a Structure or CIF text, turning bad input into an error record instead of an exception."""
    try:
        structure = structure_from_cif(item, name) if isinstance(item, str) else item
        return SerializationResult(name, text=serialize_structure(structure, symprec))
    except CrystaLLMInputError as error:
        return SerializationResult(name, error=f"{type(error).__name__}: {error}")


def serialize_batch(items: Iterable[Structure | str], names: Iterable[str] | None = None,
                    symprec: float = symmetry.DEFAULT_SYMPREC) -> list[SerializationResult]:
    """Serialize many structures or CIFs; good ones get text, bad ones an error that names them.

    >>> results = serialize_batch(["not a cif", Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0,0,0], [.5,.5,.5]])])
    >>> [r.error is None for r in results]
    [False, True]
    """
    items = list(items)
    names = list(names) if names is not None else [f"item {i}" for i in range(len(items))]
    return [serialize_one(item, name, symprec) for item, name in zip(items, names)]
