import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure
from pymatgen.core.operations import SymmOp

from crystallm import symmetry
from crystallm.errors import InvalidStructureError, MalformedCIFError, MalformedTextError
from crystallm.io import text_format
from crystallm.io.cif import structure_from_cif, structure_to_cif


def test_round_trip_matches_every_source(real_slice):
    matcher = StructureMatcher()
    supercell_matcher = StructureMatcher(primitive_cell=False, attempt_supercell=True)
    for row_id, source, cif in real_slice:
        structure = structure_from_cif(cif, row_id)
        text = text_format.serialize_structure(structure)
        parsed = text_format.parse_structure(text, primitive=True)
        # Composition is exact; geometry matches (StructureMatcher's primitive reduction can be fooled by
        # pseudo-translations, which the supercell matcher without reduction is not).
        assert parsed.composition.reduced_formula == structure.composition.reduced_formula, (source, row_id)
        assert matcher.fit(structure, parsed) or supercell_matcher.get_rms_dist(
            structure, text_format.parse_structure(text))[0] < 0.01, (source, row_id, text)


def test_known_text_of_rocksalt(nacl_text):
    assert nacl_text == "\n".join([
        "data_NaCl", "_space_group_name_H-M_alt Fm-3m", "_cell_formula_units_Z 4", "_cell_length_a 5.64",
        "loop_", "_atom_site_type_symbol", "_atom_site_Wyckoff_symbol", "_atom_site_fract_x",
        "_atom_site_fract_y", "_atom_site_fract_z", "Na 4a . . .", "Cl 4b . . ."])
    structure = text_format.parse_structure(nacl_text)
    assert len(structure) == 8 and structure.lattice.a == pytest.approx(5.64)


def test_same_crystal_gives_same_text(mp20_test_slice):
    rng = np.random.default_rng(0)
    same = 0
    for row in mp20_test_slice:
        structure = structure_from_cif(row["cif"])
        text = text_format.serialize_structure(structure)
        variant = Structure.from_sites([structure[i] for i in rng.permutation(len(structure))])
        variant.apply_operation(SymmOp.from_axis_angle_and_translation(rng.normal(size=3), rng.uniform(0, 360)))
        variant.translate_sites(list(range(len(variant))), rng.uniform(size=3), frac_coords=True)
        variant.make_supercell([1, 2, 1])
        same += text_format.serialize_structure(variant) == text
    # Permuted, rotated, translated, doubled: identical text but for last-digit rounding of a few positions.
    assert same >= 0.8 * len(mp20_test_slice)


def test_origin_and_inversion_choices_give_one_text():
    # NaCl with Cl at the origin is the same crystal as with Na at the origin.
    swapped = Structure(Lattice.cubic(5.64), ["Cl", "Na"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    original = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert text_format.serialize_structure(swapped) == text_format.serialize_structure(original)


def test_only_free_lattice_parameters_and_coordinates_are_written(mp20_test_slice):
    for row in mp20_test_slice:
        text = text_format.serialize_structure(structure_from_cif(row["cif"]))
        crystal = text_format.read_crystal_text(text)
        system = symmetry.crystal_system(crystal.space_group)
        lattice_lines = [line for line in text.split("\n") if line.startswith("_cell_length") or
                         line.startswith("_cell_angle")]
        assert len(lattice_lines) == len(text_format.FREE_LATTICE_PARAMETERS[system])
        for site in crystal.sites:
            assert len(site.params) == len(site.wyckoff.free_axes)


@pytest.mark.parametrize("old, new, message", [
    ("Cl 4b . . .", "Cl 4z . . .", "has no Wyckoff letter 'z'"),
    ("Cl 4b . . .", "Cl 8b . . .", "has multiplicity 4"),
    ("Cl 4b . . .", "Cl 4b 0.2500 . .", "is fixed by the position"),
    ("_cell_formula_units_Z 4", "_cell_formula_units_Z 2", "site multiplicities give"),
    ("data_NaCl", "data_XxCl", "unknown element 'Xx'"),
    ("Fm-3m", "Fm3", "unknown space-group symbol"),
    ("_cell_length_a 5.64", "_cell_length_a five", "is not a number"),
    ("_cell_length_a 5.64", "_cell_length_a 0.20", r"outside \[1.0, 180.0\)"),
    ("\nloop_", "\nlop_", "expected 'loop_'"),
    ("Cl 4b . . .", "K 4b . . .", "is not in the formula"),
    ("Cl 4b . . .", "Cl 4b", "has 5 fields"),
])
def test_malformed_text_names_line_and_problem(nacl_text, old, new, message):
    assert old in nacl_text
    with pytest.raises(MalformedTextError, match=message):
        text_format.parse_structure(nacl_text.replace(old, new))


def test_truncated_text_says_what_is_missing(nacl_text):
    with pytest.raises(MalformedTextError, match="text ends after line 3; expected _cell_length_a"):
        text_format.parse_structure("\n".join(nacl_text.split("\n")[:3]))


def test_coordinates_out_of_range_are_rejected():
    text = text_format.serialize_structure(Structure(Lattice.hexagonal(4.1, 18.4), ["Ga", "Ga", "Te", "Te"],
                                                       [[1/3, 2/3, 0.18], [2/3, 1/3, 0.68], [1/3, 2/3, 0.88],
                                                        [2/3, 1/3, 0.38]]))
    row = text.split("\n")[-1]
    bad = text.replace(row, " ".join(row.split(" ")[:4] + ["1.2000"]))
    with pytest.raises(MalformedTextError, match="outside \\[0, 1\\)"):
        text_format.parse_structure(bad)


def test_bad_structures_raise_specific_errors(nacl_cif):
    with pytest.raises(MalformedCIFError, match="broken.cif: not a readable CIF"):
        structure_from_cif("data_x\n_cell_length_a 1\nnonsense", "broken.cif")
    with pytest.raises(MalformedCIFError, match="not a known element"):
        structure_from_cif(nacl_cif.replace("Na", "Xx"), "xx.cif")
    disordered = Structure(Lattice.cubic(3.0), [{"Fe": 0.5, "Co": 0.5}], [[0, 0, 0]])
    with pytest.raises(InvalidStructureError, match=r"disordered \(site 0 holds .*\): the format holds ordered"):
        text_format.serialize_structure(structure_from_cif(disordered.to(fmt="cif")))
    with pytest.raises(InvalidStructureError, match="no atoms"):
        text_format.serialize_structure(Structure(Lattice.cubic(3.0), [], []))
    flat = Structure(Lattice([[3, 0, 0], [0, 3, 0], [3, 3, 0]]), ["Fe"], [[0, 0, 0]])
    with pytest.raises(InvalidStructureError, match="degenerate lattice"):
        text_format.serialize_structure(flat)


def test_batch_serializes_good_inputs_and_reports_bad_ones(nacl_cif, real_slice):
    good_cif = real_slice[0][2]
    disordered = Structure(Lattice.cubic(3.0), [{"Fe": 0.5, "Co": 0.5}], [[0, 0, 0]])
    items = [nacl_cif, "garbage", structure_from_cif(good_cif), disordered]
    results = text_format.serialize_batch(items, ["nacl.cif", "garbage.cif", "good", "disordered"])
    assert [r.error is None for r in results] == [True, False, True, False]
    assert results[0].text.startswith("data_NaCl")
    assert results[1].error.startswith("MalformedCIFError: garbage.cif")
    assert "disordered" in results[3].error


def test_standard_cif_is_readable_by_pymatgen(mp20_test_slice):
    from pymatgen.io.cif import CifParser

    for row in mp20_test_slice[:10]:
        text = text_format.serialize_structure(structure_from_cif(row["cif"]))
        structure = text_format.parse_structure(text)
        cif = structure_to_cif(structure)
        assert StructureMatcher().fit(CifParser.from_str(cif).parse_structures(primitive=False)[0], structure)
