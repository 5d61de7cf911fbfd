import csv
import gzip

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from crystallm import data, symmetry
from crystallm.io.cif import structure_from_cif


def test_detected_space_group_agrees_with_materials_project(mp20_test_slice):
    with gzip.open(data.data_dir() / "mp_20_biternary/test.csv.gz", "rt") as handle:
        mp_numbers = {row["material_id"]: int(row["spacegroup.number"]) for row in csv.DictReader(handle)}
    agree = sum(symmetry.detect_space_group(structure_from_cif(row["cif"]), 0.1)
                == mp_numbers[row["id"]] for row in mp20_test_slice)
    assert agree >= 0.95 * len(mp20_test_slice)


def test_every_wyckoff_position_is_consistent():
    rng = np.random.default_rng(0)
    for number in range(1, 231):
        for wp in symmetry.wyckoff_positions(number):
            params = rng.uniform(size=len(wp.free_axes))
            orbit = wp.orbit(params)
            distinct = np.unique(np.round(orbit, 6) % 1.0, axis=0)
            assert len(distinct) == wp.multiplicity, (number, wp.label)
            # Every point of the orbit leads back to the same parameters through some representative.
            found = [wp.params_of(p) for p in wp.representatives(orbit[-1])]
            assert any(np.allclose(np.mod(f - params + 0.5, 1) - 0.5, 0, atol=1e-6) for f in found), (number, wp.label)


def test_symmetrize_restores_a_perturbed_structure(mp20_test_slice):
    rng = np.random.default_rng(1)
    for row in mp20_test_slice[:10]:
        structure = structure_from_cif(row["cif"])
        expected = symmetry.detect_space_group(structure, 0.01)
        noisy = structure.copy()
        noisy.perturb(0.02, min_distance=0.0, seed=int(rng.integers(1000)))
        assert symmetry.detect_space_group(noisy, 0.001) != expected or expected == 1
        assert symmetry.detect_space_group(symmetry.symmetrize_structure(noisy, 0.1), 0.001) == expected


def test_p1_and_stated_space_group():
    rng = np.random.default_rng(2)
    random_cell = Structure(Lattice.from_parameters(4, 5, 6, 80, 85, 95), ["Si"] * 3, rng.uniform(size=(3, 3)))
    assert symmetry.is_p1(random_cell)
    rocksalt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert not symmetry.is_p1(rocksalt)
    assert symmetry.space_group_agrees(rocksalt, "Fm-3m") and symmetry.space_group_agrees(rocksalt, 225)
    assert not symmetry.space_group_agrees(rocksalt, "Pm-3m")
    assert symmetry.detect_space_groups(rocksalt) == {0.1: 225, 0.01: 225, 0.001: 225}


def test_space_group_symbols_round_trip():
    for number in range(1, 231):
        assert symmetry.space_group_number(symmetry.space_group_symbol(number)) == number
    with pytest.raises(KeyError, match="unknown space-group symbol"):
        symmetry.space_group_number("P 63/m m c")
