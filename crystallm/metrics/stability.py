"""Stability by a universal interatomic potential: a short CHGNet relaxation (weights inside chgnet's wheel)."""

from __future__ import annotations

import numpy as np
from pymatgen.core import Structure


def mean_displacement(initial: Structure, final: Structure) -> float:
    """Mean distance (Å) each atom moved, fractional differences taken the short way and measured in the final
    lattice.

    >>> from pymatgen.core import Lattice
    >>> a = Structure(Lattice.cubic(4.0), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    >>> b = Structure(Lattice.cubic(4.0), ["Cs", "Cl"], [[0.99, 0, 0], [.5, .5, .5]])
    >>> round(mean_displacement(a, b), 3)
    0.02
    """
    delta = final.frac_coords - initial.frac_coords
    delta -= np.rint(delta)
    return float(np.linalg.norm(final.lattice.get_cartesian_coords(delta), axis=1).mean())


def relax_structures(structures: list[Structure], steps: int = 50, fmax: float = 0.1) -> list[dict]:
    """CHGNet relaxation of each structure (FIRE, at most `steps` steps, cell relaxed too): energy per atom
    before and after (eV/atom) and the mean atomic displacement (Å); `error` where CHGNet fails."""
    from chgnet.model import StructOptimizer

    optimizer = StructOptimizer()
    results = []
    for structure in structures:
        try:
            relaxed = optimizer.relax(structure, steps=steps, fmax=fmax, verbose=False)
            energies = relaxed["trajectory"].energies
            results.append({"energy_per_atom": float(energies[-1]) / len(structure),
                             "initial_energy_per_atom": float(energies[0]) / len(structure),
                             "displacement": mean_displacement(structure, relaxed["final_structure"]),
                             "steps": len(energies), "error": ""})
        except Exception as error:  # a pathological cell (e.g. overlapping atoms) must not stop the batch
            results.append({"error": f"{type(error).__name__}: {error}"})
    return results
