import math

from pymatgen.core import Lattice, Structure

from crystallm import serialization
from crystallm.metrics.stability import relax_structures


def test_a_short_chgnet_relaxation_of_real_structures(mp20_test_slice):
    structures = [serialization.structure_from_cif(row["cif"], row["id"]) for row in mp20_test_slice[:2]]
    overlapping = Structure(Lattice.cubic(4.0), ["Na", "Na"], [[0, 0, 0], [0, 0, 0]])
    results = relax_structures(structures + [overlapping], steps=3)
    for result in results[:2]:
        assert result["error"] == "" and math.isfinite(result["energy_per_atom"]) and result["displacement"] >= 0
        assert result["energy_per_atom"] <= result["initial_energy_per_atom"] + 1e-3  # relaxing goes downhill
    assert len(results) == 3
