import csv
import gzip
import re

import numpy as np
import pytest
from pymatgen.core import Composition, Lattice, Structure
from pymatgen.core.operations import SymmOp

from crystallm import data, validity
from crystallm.evaluation import distribution, matching, metrics, symmetry_stats
from crystallm.evaluation.readers import Entry
from crystallm.evaluation.reference import ReferenceSet
from crystallm.evaluation.scoring import score_structure
from crystallm.io.cif import structure_from_cif


def test_compositional_validity_known_answer():
    """docs/architecture.md: the mp20-bt test split scores compositional validity 0.916 (SMACT, CDVAE's definition)."""
    with gzip.open(data.data_dir() / "mp_20_biternary/test.csv.gz", "rt") as handle:
        formulas = [re.search(r"_chemical_formula_sum\s+'?([^'\n]+)'?", row["cif"]).group(1)
                    for row in csv.DictReader(handle)]
    rate = np.mean([validity.compositional_validity(Composition(f)) for f in formulas])
    assert rate == pytest.approx(0.916, abs=0.002)


def test_structural_validity_on_real_and_broken_structures(mp20_test_slice):
    structures = [structure_from_cif(row["cif"]) for row in mp20_test_slice]
    assert all(validity.structural_validity(s) for s in structures)
    crowded = structures[0].copy()
    crowded.append(crowded[0].specie, crowded[0].coords + 0.2, coords_are_cartesian=True)
    assert not validity.structural_validity(crowded)
    tiny = Structure(Lattice.cubic(0.4), ["Fe"], [[0, 0, 0]])
    assert not validity.structural_validity(tiny)


def test_bond_length_reasonableness_flags_a_squeezed_cell(mp20_test_slice):
    structure = structure_from_cif(mp20_test_slice[0]["cif"])
    assert validity.bond_length_reasonableness(structure) > 0.9
    squeezed = structure.copy()
    squeezed.scale_lattice(structure.volume * 0.3)
    assert validity.bond_length_reasonableness(squeezed) < validity.bond_length_reasonableness(structure)


def test_uniqueness_and_novelty_on_real_structures(mp20_test_slice):
    structures = [structure_from_cif(row["cif"]) for row in mp20_test_slice[:10]]
    rotated = structures[0].copy()
    rotated.apply_operation(SymmOp.from_axis_angle_and_translation([1, 2, 3], 33))
    assert matching.unique_mask(structures + [rotated]) == [True] * 10 + [False]
    # the same in two worker processes, with duplicates of two crystals
    assert matching.unique_mask(structures + [rotated, structures[1].copy()], num_proc=2) == [True] * 10 + [False] * 2
    entries = [Entry(str(i), "structure", s) for i, s in enumerate(structures)]
    assert ReferenceSet("all", entries).novel_mask(structures[:3]) == [False] * 3
    assert ReferenceSet("others", entries[3:]).novel_mask(structures[:3]) == [True] * 3


def test_csp_of_structures_against_themselves(mp20_test_slice):
    structures = [structure_from_cif(row["cif"]) for row in mp20_test_slice[:10]]
    # another crystal first, then a copy of the target: it matches at n=2, not at n=1; two processes agree with one
    predictions = [[structures[i - 1].copy(), s.copy()] for i, s in enumerate(structures)]
    rms = matching.csp_rms(structures, predictions, num_proc=2)
    assert rms == matching.csp_rms(structures, predictions, num_proc=1)
    first, _ = matching.csp_result(rms, attempts=1)
    result, _ = matching.csp_result(rms, attempts=2)
    assert first.match_rate < 0.5 and result.match_rate == 1.0 and result.mean_rms < 1e-6


def test_space_group_statistics():
    stats = symmetry_stats.space_group_statistics([1, 1, 225, 194], stated=[2, 1, 225, 194])
    assert stats["p1_fraction"] == 0.5 and stats["stated_agreement"] == 0.75 and stats["distinct"] == 3


def test_coverage_and_wasserstein_respond_to_shifts():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(50, 4))
    same = distribution.coverage(reference, reference, reference, reference, 0.4, 10.0)
    far = distribution.coverage(reference + 5.0, reference, reference, reference, 0.4, 10.0)
    assert same == {"cov_recall": 1.0, "cov_precision": 1.0}
    assert far["cov_recall"] == 0.0
    assert distribution.wasserstein_distances([2.0], [2], [3.0], [2])["density"] == 1.0


def test_the_summary_and_its_table_come_from_the_metrics_and_leave_the_records_as_they_were(mp20_test_slice):
    structures = [structure_from_cif(row["cif"]) for row in mp20_test_slice[:6]]
    records = [score_structure(f"s{i}", structure) for i, structure in enumerate(structures + structures[:1])]
    before = [record.to_dict() for record in records]  # s6 is s0 again: uniqueness 6/7
    reference = ReferenceSet("half", [Entry(f"r{i}", "structure", s) for i, s in enumerate(structures[:3])])
    inputs = metrics.MetricInputs(records, reference=reference)
    summary = metrics.summarize(inputs)
    assert [record.to_dict() for record in records] == before
    assert summary["uniqueness"] == pytest.approx(6 / 7) and summary["novelty"] == pytest.approx(3 / 6)
    assert inputs.unique == {f"s{i}": i < 6 for i in range(7)}
    assert inputs.novel == {f"s{i}": i >= 3 for i in range(6)}
    assert "csp" not in summary and "stability" not in summary and "parse_rate" not in summary

    class Heaviest(metrics.Metric):
        def compute(self, inputs):
            return {"max_atoms": max(r.n_atoms for r in inputs.scored)}

        def rows(self, summary):
            return [("max atoms", summary["max_atoms"])]

    extended = metrics.METRICS + (Heaviest(),)
    summary = metrics.summarize(metrics.MetricInputs(records), extended)
    assert summary["max_atoms"] == max(r.n_atoms for r in records)
    table = metrics.markdown_table(summary, extended).splitlines()
    assert table[2] == "| entries | 7 |" and table[-1] == f"| max atoms | {summary['max_atoms']} |"
