"""Validity as CDVAE defines it (docs/architecture.md), and CrystaLLM's self-consistency checks."""

from __future__ import annotations

import math
import warnings

import numpy as np
from pymatgen.core import Composition, Structure
from smact.screening import smact_validity

MIN_DISTANCE = 0.5  # Å, CDVAE's cutoff for any pair of atoms (periodic images included)
MIN_VOLUME = 0.1  # Å^3


def structural_validity(structure: Structure, cutoff: float = MIN_DISTANCE) -> bool:
    """CDVAE's structural validity: every periodic pair distance >= 0.5 Å and volume >= 0.1 Å^3.

    >>> from pymatgen.core import Lattice
    >>> structural_validity(Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]]))
    True
    >>> structural_validity(Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [.05, 0, 0]]))
    False
    """
    volume = structure.volume
    if not math.isfinite(volume) or volume < MIN_VOLUME or not np.isfinite(structure.frac_coords).all():
        return False
    # An atom's own periodic images count too: the shortest lattice vector.
    if min(structure.lattice.abc) < cutoff:
        return False
    if len(structure) < 2:
        return True
    distances = structure.distance_matrix
    np.fill_diagonal(distances, np.inf)
    return bool(distances.min() >= cutoff)


def compositional_validity(composition: Composition | Structure) -> bool:
    """CDVAE's compositional validity through SMACT: charge neutrality with the Pauling electronegativity
    test; single elements and all-metal compositions pass. smact's default oxidation-state set (ICSD24)
    reproduces the known answer (docs/architecture.md) (0.916 on the mp20-bt test split; smact14 gives 0.897).

    >>> compositional_validity(Composition("NaCl")), compositional_validity(Composition("NaCl2"))
    (True, False)
    >>> compositional_validity(Composition("McCl"))  # an element without smact data
    False
    """
    if isinstance(composition, Structure):
        composition = composition.composition
    try:
        return bool(smact_validity(composition.element_composition))
    except KeyError:  # smact has no data for some heavy elements (e.g. Mc): neutrality cannot be shown
        return False


def formula_consistent(structure: Structure, stated_formula: str) -> bool:
    """Whether the stated formula (any multiple) is the structure's reduced formula.

    >>> from pymatgen.core import Lattice
    >>> formula_consistent(Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]]), "Cs2Cl2")
    True
    """
    try:
        stated = Composition(stated_formula)
    except (ValueError, KeyError):
        return False
    return stated.reduced_composition.almost_equals(structure.composition.reduced_composition)


def bond_length_reasonableness(structure: Structure, tolerance: float = 0.32, hydrogen_factor: float = 2.5) -> float:
    """CrystaLLM's bond-length reasonableness score: the share of CrystalNN bonds whose length lies within
    `tolerance` of the expected length (sum of ionic radii where the electronegativity difference is >= 1.7,
    else of atomic radii; bonds to H may be up to `hydrogen_factor` times longer). 1.0 is fully reasonable.

    >>> from pymatgen.core import Lattice
    >>> bond_length_reasonableness(Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
    ...     [[0, 0, 0], [.5, .5, .5]]))
    1.0
    """

    from pymatgen.analysis.local_env import CrystalNN

    neighbours = CrystalNN()
    reasonable = total = 0
    for index, site in enumerate(structure):
        try:
            with warnings.catch_warnings():  # CrystalNN warns on every site without oxidation states
                warnings.simplefilter("ignore")
                bonded = neighbours.get_nn_info(structure, index)
        except (ValueError, RuntimeError):
            continue
        for info in bonded:
            other = info["site"]
            expected = _expected_bond_length(site.specie, other.specie)
            if expected is None:
                continue
            length = site.distance(other)
            upper = expected * (1 + tolerance)
            if "H" in (site.specie.symbol, other.specie.symbol):
                upper = expected * hydrogen_factor
            total += 1
            reasonable += expected * (1 - tolerance) <= length <= upper
    return float(reasonable / total) if total else 1.0


def _expected_bond_length(a, b) -> float | None:
    difference = abs((a.X or 0) - (b.X or 0))
    if difference >= 1.7:
        cation, anion = (a, b) if a.X < b.X else (b, a)
        radii = [cation.average_cationic_radius, anion.average_anionic_radius]
    else:
        radii = [a.atomic_radius, b.atomic_radius]
    if any(r is None or float(r) <= 0 for r in radii):
        return None
    return float(radii[0]) + float(radii[1])
