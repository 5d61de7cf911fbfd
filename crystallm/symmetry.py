"""Space groups with spglib, Wyckoff positions from pyxtal's International Tables data.

One setting per space group is used everywhere in crystallm: the ITA standard setting that pyxtal
tabulates (unique axis b, cell choice 1 for monoclinic groups; origin choice 2 where there are two;
hexagonal axes for rhombohedral groups). spglib is asked for exactly that setting through its Hall
number, so its Wyckoff letters and pyxtal's tables agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import spglib
from pymatgen.core import Lattice, Structure
from pymatgen.core.operations import SymmOp
from pyxtal.symmetry import Group, pyxtal_hall_numbers

from crystallm.errors import InvalidStructureError, WyckoffLocationError

DEFAULT_SYMPREC = 0.1
"""Distance tolerance (Å) for symmetry detection; the benchmark protocols (docs/architecture.md) use 0.1 and 0.01."""
DEFAULT_ANGLE_TOLERANCE = -1.0
"""spglib's default: the lattice is checked with the distance tolerance. (pymatgen's 5 degrees idealizes
noisy cells so far that the structure no longer matches the original.)"""

# Fractional distance under which two positions count as one when matching Wyckoff representatives.
_POSITION_TOLERANCE = 2e-3


def hall_number(space_group: int) -> int:
    """The Hall number of the setting crystallm uses for a space group (1-230).

    >>> hall_number(227)  # Fd-3m, origin choice 2
    526
    """
    _check_space_group_number(space_group)
    return int(pyxtal_hall_numbers[space_group - 1])


@lru_cache(maxsize=None)
def space_group_symbol(space_group: int) -> str:
    """Short Hermann-Mauguin symbol of a space group in crystallm's setting, without spaces.

    >>> space_group_symbol(194)
    'P6_3/mmc'
    """
    return spglib.get_spacegroup_type(hall_number(space_group)).international_short


@lru_cache(maxsize=None)
def _symbol_to_number() -> dict[str, int]:
    return {space_group_symbol(number): number for number in range(1, 231)}


def space_group_number(symbol: str) -> int:
    """The number of a space group given its short symbol (as written by `space_group_symbol`).

    >>> space_group_number("Fm-3m")
    225
    """
    try:
        return _symbol_to_number()[symbol]
    except KeyError:
        raise KeyError(f"unknown space-group symbol {symbol!r} (expected a short symbol such as 'P6_3/mmc')") from None


def crystal_system(space_group: int) -> str:
    """Crystal system of a space group: triclinic, monoclinic, ..., cubic.

    >>> crystal_system(225)
    'cubic'
    """
    _check_space_group_number(space_group)
    for upper, name in ((2, "triclinic"), (15, "monoclinic"), (74, "orthorhombic"), (142, "tetragonal"),
                        (167, "trigonal"), (194, "hexagonal"), (230, "cubic")):
        if space_group <= upper:
            return name
    raise AssertionError("unreachable")


def _check_space_group_number(space_group: int) -> None:
    if not 1 <= int(space_group) <= 230:
        raise ValueError(f"space group number must be 1-230, got {space_group}")


@dataclass(frozen=True)
class WyckoffPosition:
    """One Wyckoff position of a space group, parametrized by its free coordinates.

    The representative is ITA's first coordinate triplet, e.g. ``x, 2x, 1/4`` for 6h of P6_3/mmc:
    its free axes are those of x, y, z that appear in it (here x only).

    >>> wp = wyckoff_position(194, "f")  # 1/3, 2/3, z
    >>> wp.label, wp.free_axes
    ('4f', (2,))
    >>> wp.orbit([0.1]).shape
    (4, 3)
    """

    space_group: int
    letter: str
    multiplicity: int
    free_axes: tuple[int, ...]
    rotation: np.ndarray = field(repr=False, compare=False)
    translation: np.ndarray = field(repr=False, compare=False)
    orbit_rotations: np.ndarray = field(repr=False, compare=False)
    orbit_translations: np.ndarray = field(repr=False, compare=False)
    param_rows: tuple[int, ...] = field(repr=False, compare=False)

    @property
    def label(self) -> str:
        """Multiplicity and letter, e.g. '4f'."""
        return f"{self.multiplicity}{self.letter}"

    def position(self, params) -> np.ndarray:
        """The representative position for the given free parameters, wrapped into [0, 1)."""
        point = np.zeros(3)
        point[list(self.free_axes)] = params
        return np.mod(self.rotation @ point + self.translation, 1.0)

    def orbit(self, params) -> np.ndarray:
        """All `multiplicity` positions of the orbit in the conventional cell, wrapped into [0, 1)."""
        return self.orbits(np.asarray(params, dtype=float).reshape(1, -1))[0]

    def orbits(self, params: np.ndarray) -> np.ndarray:
        """The orbits of many parameter sets at once: (candidates, free axes) -> (candidates, multiplicity, 3).

        >>> wyckoff_position(194, "f").orbits(np.array([[0.1], [0.2]])).shape
        (2, 4, 3)
        """
        points = np.zeros((len(params), 3))
        points[:, list(self.free_axes)] = params
        representatives = np.mod(points @ self.rotation.T + self.translation, 1.0)
        positions = np.einsum("nij,cj->cni", self.orbit_rotations, representatives) + self.orbit_translations
        return np.mod(positions, 1.0)

    def orbit_line(self, params) -> tuple[np.ndarray, np.ndarray]:
        """The orbit as its last free coordinate t varies, the others fixed at `params`: atom i at
        `start[i] + t * step[i]` (fractional, not wrapped). Without free coordinates, step is 0.

        >>> start, step = wyckoff_position(194, "h").orbit_line([])  # x, 2x, 1/4
        >>> start.shape, step[0].tolist()
        ((6, 3), [1.0, 2.0, 0.0])
        """
        point = np.zeros(3)
        point[list(self.free_axes[:-1])] = params
        direction = np.zeros(3)
        if self.free_axes:
            direction[self.free_axes[-1]] = 1.0
        start = np.einsum("nij,j->ni", self.orbit_rotations, self.rotation @ point + self.translation)
        return start + self.orbit_translations, np.einsum("nij,j->ni", self.orbit_rotations, self.rotation @ direction)

    def params_of(self, representative: np.ndarray) -> np.ndarray:
        """Free parameters of a point that lies on the representative (no check)."""
        rows = list(self.param_rows)
        axes = list(self.free_axes)
        signs = self.rotation[rows, axes]
        return np.mod(signs * (representative[rows] - self.translation[rows]), 1.0)

    def representatives(self, point: np.ndarray) -> np.ndarray:
        """Every image of `point` under the space group that lies on this position's representative."""
        general = general_position(self.space_group)
        images = np.mod(np.einsum("nij,j->ni", general.orbit_rotations, point) + general.orbit_translations, 1.0)
        projected = np.einsum("ij,nj->ni", self.rotation, _params_as_point(self, images)) + self.translation
        distance = images - projected
        distance -= np.rint(distance)
        return images[np.abs(distance).max(axis=1) < _POSITION_TOLERANCE]


def _params_as_point(wp: WyckoffPosition, points: np.ndarray) -> np.ndarray:
    """Map points to the (x, y, z) vector holding their free parameters at the free axes."""
    full = np.zeros_like(points)
    for axis, row in zip(wp.free_axes, wp.param_rows):
        full[:, axis] = wp.rotation[row, axis] * (points[:, row] - wp.translation[row])
    return full


def _from_pyxtal(space_group: int, wp) -> WyckoffPosition:
    rotation = np.array(wp.ops[0].rotation_matrix, dtype=float)
    translation = np.array(wp.ops[0].translation_vector, dtype=float)
    free_axes = tuple(int(j) for j in range(3) if np.any(rotation[:, j] != 0))
    param_rows = []
    for axis in free_axes:
        # A row that reads this parameter alone with coefficient +-1, so the parameter is exact mod 1.
        rows = [i for i in range(3) if abs(rotation[i, axis]) == 1
                and all(rotation[i, k] == 0 for k in free_axes if k != axis)]
        if not rows:
            raise AssertionError(f"Wyckoff {wp.get_label()} of {space_group}: no row isolates axis {axis}")
        param_rows.append(rows[0])
    return WyckoffPosition(
        space_group=space_group,
        letter=wp.letter,
        multiplicity=int(wp.multiplicity),
        free_axes=free_axes,
        rotation=rotation,
        translation=translation,
        orbit_rotations=np.array([op.rotation_matrix for op in wp.ops], dtype=float),
        orbit_translations=np.array([op.translation_vector for op in wp.ops], dtype=float),
        param_rows=tuple(param_rows),
    )


@lru_cache(maxsize=None)
def wyckoff_positions(space_group: int) -> tuple[WyckoffPosition, ...]:
    """All Wyckoff positions of a space group, from the general position down to 'a'.

    >>> [wp.label for wp in wyckoff_positions(225)][-2:]
    ['4b', '4a']
    """
    _check_space_group_number(space_group)
    return tuple(_from_pyxtal(space_group, wp) for wp in Group(space_group).Wyckoff_positions)


def general_position(space_group: int) -> WyckoffPosition:
    """The general Wyckoff position (the whole group's operations, centring included)."""
    return wyckoff_positions(space_group)[0]


def wyckoff_position(space_group: int, letter: str) -> WyckoffPosition:
    """The Wyckoff position of a space group with the given letter.

    >>> wyckoff_position(225, "a").multiplicity
    4
    """
    for wp in wyckoff_positions(space_group):
        if wp.letter == letter:
            return wp
    raise KeyError(f"space group {space_group} ({space_group_symbol(space_group)}) has no Wyckoff letter {letter!r}")


@lru_cache(maxsize=None)
def origin_choices(space_group: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(rotation, translation) pairs of the Euclidean normalizer's cosets (Bilbao's Wyckoff sets, via pyxtal):
    each x -> rotation @ x + translation maps the space group onto itself, so it gives another description of
    the same crystal in the same setting. Some hold only for special metrics (check the lattice).

    >>> [translation.tolist() for _, translation in origin_choices(225)]
    [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]]
    """
    operations = [SymmOp.from_xyz_str(xyz) for xyz in Group(space_group).get_alternatives()["Coset Representative"]]
    return tuple((np.array(op.rotation_matrix, dtype=float), np.array(op.translation_vector, dtype=float))
                 for op in operations)


def locate_wyckoff(space_group: int, point: np.ndarray, multiplicity: int) -> WyckoffPosition:
    """The Wyckoff position of the given multiplicity on which `point` (or an image of it) lies.

    >>> locate_wyckoff(225, np.array([0.5, 0.5, 0.5]), 4).label
    '4b'
    """
    for wp in wyckoff_positions(space_group):
        if wp.multiplicity == multiplicity and len(wp.representatives(point)):
            return wp
    raise WyckoffLocationError(f"no Wyckoff position of multiplicity {multiplicity} in space group {space_group} "
                                f"holds the point {np.round(point, 4).tolist()}")


@lru_cache(maxsize=None)
def free_origin_axes(space_group: int) -> tuple[int, ...]:
    """Axes along which the origin may slide freely (polar groups): every operation fixes that axis.

    >>> free_origin_axes(186), free_origin_axes(225), free_origin_axes(1)
    ((2,), (), (0, 1, 2))
    """
    rotations = general_position(space_group).orbit_rotations
    return tuple(axis for axis in range(3) if np.allclose(rotations[:, :, axis], np.eye(3)[axis]))


@dataclass(frozen=True)
class StandardCell:
    """A structure in crystallm's standard conventional setting, with its Wyckoff analysis."""

    space_group: int
    lattice: Lattice
    frac_coords: np.ndarray
    atomic_numbers: np.ndarray
    wyckoff_letters: tuple[str, ...]
    orbit_ids: np.ndarray  # for each atom, an id shared by the atoms of its orbit (spglib crystallographic_orbits)


def check_ordered(structure: Structure, why: str) -> None:
    """InvalidStructureError naming the first site that holds several elements or a vacancy, and `why` that
    matters (the one wording of this refusal, for spglib and for the text format)."""
    if not structure.is_ordered:
        index, site = next((i, s) for i, s in enumerate(structure) if not s.is_ordered)
        raise InvalidStructureError(f"disordered (site {index} holds {site.species.formula}): {why}")


def structure_to_cell(structure: Structure) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The (lattice, fractional positions, atomic numbers) triple that spglib takes. A structure spglib cannot
    take (a site of several elements or a vacancy; a non-finite cell or position, which crashes it) raises
    InvalidStructureError.

    >>> from pymatgen.core import Lattice
    >>> structure_to_cell(Structure(Lattice.cubic(4.0), [{"Na": 0.5, "K": 0.5}], [[0, 0, 0]]))
    Traceback (most recent call last):
    ...
    crystallm.errors.InvalidStructureError: disordered (site 0 holds K0.5 Na0.5): spglib needs one element per site
    """
    check_ordered(structure, "spglib needs one element per site")
    if not (np.isfinite(structure.lattice.matrix).all() and np.isfinite(structure.frac_coords).all()):
        raise InvalidStructureError("the cell or a position is not a finite number")
    return (structure.lattice.matrix, structure.frac_coords, [site.specie.Z for site in structure])


def _dataset(cell, symprec: float, angle_tolerance: float, hall: int = 0):
    return spglib.get_symmetry_dataset(cell, symprec=symprec, angle_tolerance=angle_tolerance, hall_number=hall)


def detect_space_group(structure: Structure, symprec: float = DEFAULT_SYMPREC,
                       angle_tolerance: float = DEFAULT_ANGLE_TOLERANCE) -> int | None:
    """Space-group number found by spglib, or None where spglib finds no symmetry at all.

    >>> from pymatgen.core import Lattice, Structure
    >>> detect_space_group(Structure(Lattice.cubic(4.2), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]))
    221
    """
    dataset = _dataset(structure_to_cell(structure), symprec, angle_tolerance)
    return None if dataset is None else int(dataset.number)


def detect_space_groups(structure: Structure, symprecs=(0.1, 0.01, 0.001)) -> dict[float, int | None]:
    """Space-group number at each tolerance, e.g. {0.1: 225, 0.01: 225, 0.001: 225}."""
    return {symprec: detect_space_group(structure, symprec) for symprec in symprecs}


def is_p1(structure: Structure, symprec: float = DEFAULT_SYMPREC) -> bool:
    """True where spglib finds no symmetry beyond translations (space group 1)."""
    return detect_space_group(structure, symprec) in (1, None)


def space_group_agrees(structure: Structure, stated: int | str, symprec: float = DEFAULT_SYMPREC) -> bool:
    """Whether the detected space group equals a stated one (number or short symbol).

    >>> from pymatgen.core import Lattice, Structure
    >>> space_group_agrees(Structure(Lattice.cubic(4.2), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]), "Pm-3m")
    True
    """
    number = space_group_number(stated) if isinstance(stated, str) else int(stated)
    return detect_space_group(structure, symprec) == number


def standard_cell(structure: Structure, symprec: float = DEFAULT_SYMPREC,
                  angle_tolerance: float = DEFAULT_ANGLE_TOLERANCE) -> StandardCell:
    """Standardize a structure into crystallm's conventional setting and find its Wyckoff positions.

    The lattice is spglib's idealized standard lattice; positions are spglib's standardized positions.
    Raises InvalidStructureError where spglib cannot analyse the structure.
    """
    cell = structure_to_cell(structure)
    dataset = _dataset(cell, symprec, angle_tolerance)
    if dataset is None:
        raise InvalidStructureError(f"spglib could not analyse the symmetry of {structure.composition.formula!r}: "
                                    f"{spglib.get_error_message()}")
    hall = hall_number(int(dataset.number))
    if dataset.hall_number != hall:
        dataset = _dataset(cell, symprec, angle_tolerance, hall)
    # Each standardized atom inherits the Wyckoff letter and orbit of an input atom with the same image
    # in the primitive cell (a second spglib pass on the standardized cell may choose another cell).
    input_of_primitive = {}
    for atom, primitive_index in enumerate(dataset.mapping_to_primitive):
        input_of_primitive.setdefault(int(primitive_index), atom)
    inputs = [input_of_primitive[int(p)] for p in dataset.std_mapping_to_primitive]
    return StandardCell(
        space_group=int(dataset.number),
        lattice=Lattice(dataset.std_lattice),
        frac_coords=np.mod(dataset.std_positions, 1.0),
        atomic_numbers=np.asarray(dataset.std_types),
        wyckoff_letters=tuple(dataset.wyckoffs[i] for i in inputs),
        orbit_ids=np.array([dataset.crystallographic_orbits[i] for i in inputs]),
    )


def symmetrize_structure(structure: Structure, symprec: float = DEFAULT_SYMPREC) -> Structure:
    """The structure snapped to its space group at `symprec`: idealized conventional standard cell.

    >>> from pymatgen.core import Lattice, Structure
    >>> s = Structure(Lattice.cubic(4.2), ["Na", "Cl"], [[0, 0, 0.003], [0.5, 0.5, 0.5]])
    >>> symmetrize_structure(s).frac_coords[0].tolist()
    [0.0, 0.0, 0.0]
    """
    cell = standard_cell(structure, symprec)
    return Structure(cell.lattice, cell.atomic_numbers.tolist(), cell.frac_coords)


def primitive_structure(structure: Structure, symprec: float = 1e-3) -> Structure:
    """spglib's primitive cell of a structure, positions as they are (not idealized).

    For a structure built from crystallm text (exactly symmetric) this is exact. Comparing primitive cells
    sidesteps StructureMatcher's own reduction, which at its 0.25 Å tolerance can find pseudo-translations
    in a conventional cell that it does not find in the primitive one.

    >>> from pymatgen.core import Lattice, Structure
    >>> len(primitive_structure(Structure(Lattice.cubic(5.64), ["Na"] * 4 + ["Cl"] * 4,
    ...     [[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0], [.5, .5, .5], [.5, 0, 0], [0, .5, 0], [0, 0, .5]])))
    2
    """
    result = spglib.standardize_cell(structure_to_cell(structure), to_primitive=True, no_idealize=True,
                                     symprec=symprec)
    if result is None:
        return structure.copy()
    lattice, positions, numbers = result
    return Structure(lattice, [int(z) for z in numbers], positions)
