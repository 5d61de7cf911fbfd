"""CIF in and out: read a CIF into an ordered pymatgen `Structure` with errors that name the input, and write
a standard CIF that VESTA, ASE and pymatgen read."""

from __future__ import annotations

import math
import re
import warnings
import zipfile

from pymatgen.core import Element, Lattice, Structure  # noqa: F401  (Lattice: the docstring examples)
from pymatgen.io.cif import CifParser, CifWriter
from pymatgen.symmetry.analyzer import SymmetryUndeterminedError

from crystallm import symmetry
from crystallm.errors import MalformedCIFError


def is_chemical_element(specie) -> bool:
    """True for an Element or an ionic Species of one; False for dummy species such as 'X0+'."""
    return Element.is_valid_symbol(getattr(specie, "symbol", ""))


def structure_from_cif(cif: str, name: str = "<cif>") -> Structure:
    """Read a CIF (text) into an ordered structure, with errors that name the input and the problem.

    >>> s = structure_from_cif(Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]]).to(fmt="cif"))
    >>> s.composition.reduced_formula
    'CsCl'
    """
    _check_cell(cif, name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            structures = CifParser.from_str(cif).parse_structures(primitive=False)
        except Exception as error:  # pymatgen raises ValueError, KeyError, IndexError... for bad CIFs
            problems = "; ".join(str(w.message) for w in caught) or str(error)
            raise MalformedCIFError(f"{name}: not a readable CIF ({problems})") from error
    if not structures:
        raise MalformedCIFError(f"{name}: the CIF holds no structure")
    structure = structures[0]
    for index, site in enumerate(structure):
        for specie in site.species:
            if not is_chemical_element(specie):
                raise MalformedCIFError(f"{name}: site {index} holds {specie!s}, which is not a known element")
    return structure


_CELL_VALUE = re.compile(r"^\s*_cell_(length_[abc]|angle_alpha|angle_beta|angle_gamma)\s+(\S+)", re.MULTILINE)


def _check_cell(cif: str, name: str) -> None:
    """MalformedCIFError for a cell pymatgen would read all the same: a length that is not a finite number above 0
    (a negative one is read as its absolute value), an angle outside (0, 180) degrees.

    >>> _check_cell("_cell_length_a -4.0", "x.cif")
    Traceback (most recent call last):
    ...
    crystallm.errors.MalformedCIFError: x.cif: cell length not a finite number of Å above 0 (_cell_length_a -4.0)
    """
    for key, text in _CELL_VALUE.findall(cif):
        try:
            value = float(text.split("(")[0])  # 5.64(2): a value and its uncertainty
        except ValueError:
            continue  # '?' or '.': pymatgen says what it makes of it
        if key.startswith("length") and not (math.isfinite(value) and value > 0):
            raise MalformedCIFError(f"{name}: cell length not a finite number of Å above 0 (_cell_{key} {text})")
        if key.startswith("angle") and not (math.isfinite(value) and 0 < value < 180):
            raise MalformedCIFError(f"{name}: cell angle not between 0 and 180 degrees (_cell_{key} {text})")


def structure_to_cif(structure: Structure, symprec: float | None = symmetry.DEFAULT_SYMPREC) -> str:
    """A standard CIF that other programs (VESTA, ASE, pymatgen) read, with symmetry where found.

    >>> "_symmetry_space_group_name_H-M" in structure_to_cif(Structure(Lattice.cubic(4.2), ["Cs", "Cl"],
    ...     [[0, 0, 0], [.5, .5, .5]]))
    True
    """
    try:
        return str(CifWriter(structure, symprec=symprec, angle_tolerance=symmetry.DEFAULT_ANGLE_TOLERANCE))
    except SymmetryUndeterminedError:  # spglib finds no group (e.g. overlapping atoms): write it as P1
        return str(CifWriter(structure))


def write_cif_zip(path, structures: dict[str, Structure], mode: str = "w") -> None:
    """Write `structures` (name -> Structure) into a zip of P1 CIFs, `<name>.cif` each (`mode` "a" appends).
    P1 CIFs: pymatgen's symmetrized writer costs ~26 ms a structure (more than generating one); `crystallm
    to-cif` writes a symmetrized CIF.

    >>> import tempfile, zipfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "s.zip")
    >>> write_cif_zip(path, {"nacl": Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])})
    >>> zipfile.ZipFile(path).namelist()
    ['nacl.cif']
    """
    with zipfile.ZipFile(path, mode, compression=zipfile.ZIP_DEFLATED) as archive:
        for name, structure in structures.items():
            archive.writestr(f"{name}.cif", structure_to_cif(structure, symprec=None))
