"""Shared fixtures: small seeded slices of the real data in ../shared/data."""

import random
import warnings

import pytest

from crystallm import data, serialization

warnings.filterwarnings("ignore", module="pymatgen")


@pytest.fixture(scope="session")
def real_slice() -> list[tuple[str, str, str]]:
    """(id, source, cif): 5 seeded rows of every source file in ../shared/data."""
    rows = []
    for name in data.SOURCES:
        dataset = data.load_source(name)
        for index in random.Random(name).sample(range(dataset.num_rows), 5):
            row = dataset[index]
            rows.append((row["id"], name, row["cif"]))
    return rows


@pytest.fixture(scope="session")
def mp20_test_slice():
    """40 seeded rows of the mp20-bt test split, as dicts with id, cif, properties."""
    dataset = data.load_split("mp20-bt", "test")
    return [dataset[i] for i in random.Random(7).sample(range(dataset.num_rows), 40)]


@pytest.fixture(scope="session")
def nacl_cif() -> str:
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(
        fmt="cif")


@pytest.fixture(scope="session")
def nacl_text(nacl_cif) -> str:
    return serialization.serialize_structure(serialization.structure_from_cif(nacl_cif))
