import dataclasses
import json
import math

import pytest
from pymatgen.core import Composition, Lattice, Structure

from crystallm import cli
from crystallm.evaluation.relaxation import (
    ReferenceHull,
    RelaxationSettings,
    approximations,
    relax_structures,
    stability_records,
)
from crystallm.evaluation.reports import read_json_lines
from crystallm.io.cif import structure_from_cif


def test_a_short_chgnet_relaxation_of_real_structures(mp20_test_slice):
    structures = [structure_from_cif(row["cif"], row["id"]) for row in mp20_test_slice[:2]]
    overlapping = Structure(Lattice.cubic(4.0), ["Na", "Na"], [[0, 0, 0], [0, 0, 0]])
    superheavy = Structure(Lattice.cubic(4.0), ["Na", "Og"], [[0, 0, 0], [.5, .5, .5]])
    results = relax_structures(structures + [overlapping, superheavy], steps=3)
    for structure, result in zip(structures, results[:2]):
        assert result["error"] == "" and math.isfinite(result["energy_per_atom"])
        assert result["energy_per_atom"] <= result["initial_energy_per_atom"] + 1e-3  # relaxing goes downhill
        relaxed = Structure.from_dict(result["relaxed"])
        assert 0 <= result["steps"] <= 3 and len(relaxed) == len(structure)
        # The recorded RMSD is the atoms' displacement between the given and the relaxed structure.
        moved = [site.distance(relaxed[i]) for i, site in enumerate(structure)]
        assert result["rmsd"] == pytest.approx(math.sqrt(sum(d * d for d in moved) / len(moved)), abs=0.05)
    assert results[2]["error"]  # recorded with its reason, the batch went on
    assert results[3]["error"] == "ValueError: CHGNet knows the elements up to Pu (Z 94), not Og"


def test_the_hull_gives_back_mp_formation_energies_and_e_hull_of_real_test_rows(mp20_test_slice):
    hull = ReferenceHull.from_shared_data()
    shipped = ReferenceHull.from_file()  # the package's copy: the lowest energy of each formula, the same hull
    for row in mp20_test_slice[:10]:
        composition = Composition(structure_from_cif(row["cif"], row["id"]).composition)
        formation = row["formation_energy_per_atom"]
        # The total energy per atom that has MP's formation energy, relative to MP's elemental references:
        energy = formation + sum(composition.get_atomic_fraction(e) * hull.elemental_energies[e.symbol]
                                 for e in composition.elements)
        e_hull, recovered = hull.e_above_hull(composition, energy)
        assert recovered == pytest.approx(formation, abs=1e-9)
        # The row itself is one of the hull's phases, so it cannot lie below it; the hull holds only some of MP's
        # phases, so it is never deeper than MP's own: E_hull is at most MP's e_above_hull.
        assert -1e-6 <= e_hull <= row["e_above_hull"] + 1e-6
        assert shipped.e_above_hull(composition, energy + 0.05) == pytest.approx(
            hull.e_above_hull(composition, energy + 0.05), abs=1e-9)
    with pytest.raises(ValueError, match="no elemental reference energy for Og"):
        hull.e_above_hull(Composition("OgCl"), -1.0)


def test_stability_results_are_cached_per_structure_and_a_run_resumes(mp20_test_slice, tmp_path):
    structures = [(row["id"], structure_from_cif(row["cif"], row["id"])) for row in mp20_test_slice[:2]]
    cache = tmp_path / "stability.jsonl"
    settings = RelaxationSettings(steps=2)
    first = stability_records(structures[:1], cache, settings, num_proc=1, progress=False)
    assert first[0]["name"] == structures[0][0] and math.isfinite(first[0]["e_above_hull"])
    with open(cache, "a") as handle:
        handle.write('{"name": "cut sho')  # a kill in the middle of a line
    both = stability_records(structures, cache, settings, num_proc=1, progress=False)
    assert both[0] == first[0]  # read back, not relaxed again
    assert [r["name"] for r in read_json_lines(cache)] == [structures[0][0]]  # the cut line ends the readable part
    assert both[1]["error"] == "" and isinstance(both[1]["stable"], bool)


def test_evaluate_stability_command_writes_the_summary_with_its_approximations(mp20_test_slice, tmp_path, capsys):
    folder = tmp_path / "cifs"
    folder.mkdir()
    for row in mp20_test_slice[:2]:
        (folder / f"{row['id']}.cif").write_text(row["cif"])
    (folder / "broken.cif").write_text("data_broken\n_cell_length_a 1\n")
    code = cli.main(["evaluate", str(folder), "--stability", "--relax-steps", "2", "--num-proc", "1", "--quiet",
                     "--json", str(tmp_path / "summary.json")])
    assert code == 0 and "stability: stable rate" in capsys.readouterr().out
    stability = json.loads((tmp_path / "summary.json").read_text())["stability"]
    assert stability["entries"] == 3 and stability["relaxed"] == 2
    assert stability["approximations"] == approximations(RelaxationSettings())
    assert stability["settings"]["steps"] == 2 and stability["sun_rate"] is None  # no --reference, no novelty
    assert len((folder / "stability.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_attempts_are_ranked_by_relaxed_energy_and_failures_come_last(mp20_test_slice, tmp_path):
    from crystallm.evaluation.relaxation import rank_by_energy

    real = structure_from_cif(mp20_test_slice[0]["cif"])
    squeezed = real.copy()
    squeezed.scale_lattice(real.volume * 0.7)  # the same crystal compressed: higher in energy
    overlapping = Structure(Lattice.cubic(4.0), ["Na", "Na"], [[0, 0, 0], [0, 0, 0]])
    ranking = rank_by_energy([("squeezed", squeezed), ("broken", overlapping), ("real", real)],
                             tmp_path / "cache.jsonl", RelaxationSettings(steps=0), progress=False)
    assert [r["name"] for r in ranking] == ["real", "squeezed", "broken"] and [r["rank"] for r in ranking] == [1, 2, 3]
    # steps 0: the energy of each structure as given, nothing moved
    assert all(r["energy_per_atom"] == r["initial_energy_per_atom"] and r["rmsd"] < 1e-9 for r in ranking[:2])


def test_generate_ranks_its_samples_by_chgnet_energy_and_the_cache_keeps_settings_apart(tiny_model_dir, tmp_path):
    import csv

    from crystallm.evaluation.relaxation import rank_by_energy
    from crystallm.generation.run_folder import GenerationFolder

    out = tmp_path / "run"
    assert cli.main(["generate", "--model", str(tiny_model_dir), "--out", str(out), "--num", "4", "--batch-size", "2",
                     "--max-atoms", "12", "--quiet", "--formula", "NaCl",
                     "--rank", "chgnet", "--relax-steps", "0"]) == 0
    with open(out / "ranking.csv") as handle:
        rows = list(csv.DictReader(handle))
    cached = list(read_json_lines(out / "stability.jsonl"))
    assert len(rows) == len(cached) == 4 and {r["settings"]["steps"] for r in cached} == {0}
    energies = [float(r["energy_per_atom"]) for r in rows if not r["error"]]
    assert energies == sorted(energies) and all(r["steps"] == 0 for r in cached)
    # Relaxed ranking of the same folder: the energies as generated are not reused as relaxed ones.
    settings = {k: v for k, v in json.loads((out / "run.json").read_text()).items() if k != "weights"}
    samples = GenerationFolder.from_run_json(out, settings, resume=True).valid_structures()
    relaxed = rank_by_energy(samples, out / "stability.jsonl", RelaxationSettings(steps=2), progress=False)
    assert {r["settings"]["steps"] for r in relaxed} == {2} and len(list(read_json_lines(out / "stability.jsonl"))) == 8
    again = rank_by_energy(samples, out / "stability.jsonl", RelaxationSettings(steps=2), progress=False)
    assert [r["name"] for r in again] == [r["name"] for r in relaxed]
    assert len(list(read_json_lines(out / "stability.jsonl"))) == 8  # reused, not relaxed again


def test_csp_ranked_first_takes_each_targets_lowest_energy_attempt():
    from crystallm.evaluation.csp import evaluate_csp
    from crystallm.evaluation.scoring import ScoredStructure

    rock_salt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    cesium_chloride = Structure(Lattice.cubic(3.3), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    records = [ScoredStructure("t__0", structure=cesium_chloride), ScoredStructure("t__1", structure=rock_salt)]
    targets = [ScoredStructure("t", structure=rock_salt)]
    result = evaluate_csp(records, targets, (1, 2), ranking={"t__0": -3.0, "t__1": -3.4})
    assert result["n=1"]["match_rate"] == 0.0 and result["n=2"]["match_rate"] == 1.0
    assert result["ranked n=1"]["match_rate"] == 1.0


@pytest.mark.slow
def test_sevennet_relaxes_and_the_cache_keeps_each_potential_apart(mp20_test_slice, tmp_path):
    structures = [(row["id"], structure_from_cif(row["cif"])) for row in mp20_test_slice[:2]]
    cache = tmp_path / "stability.jsonl"
    sevennet = stability_records(structures, cache, RelaxationSettings(steps=3, potential="sevennet"), num_proc=1,
                                 progress=False)
    assert all(r["error"] == "" and r["energy_per_atom"] < 0 and math.isfinite(r["e_above_hull"]) for r in sevennet)
    chgnet = stability_records(structures, cache, RelaxationSettings(steps=3), num_proc=1, progress=False)
    assert [r["energy_per_atom"] for r in chgnet] != [r["energy_per_atom"] for r in sevennet]
    lines = list(read_json_lines(cache))  # each potential relaxed each structure once, and says which it was
    assert sorted(r["settings"]["potential"] for r in lines) == ["chgnet", "chgnet", "sevennet", "sevennet"]
    again = stability_records(structures, cache, RelaxationSettings(steps=3, potential="sevennet"), num_proc=1,
                              progress=False)
    assert again == sevennet and len(list(read_json_lines(cache))) == 4  # from the cache, nothing relaxed


def test_a_hull_file_places_results_on_that_hull_and_a_bad_one_is_one_line(tmp_path, capsys):
    nacl = Composition("NaCl")
    shipped = ReferenceHull.from_file()
    e_hull, formation = shipped.e_above_hull(nacl, -3.0)
    deeper = ReferenceHull([(nacl, formation - e_hull - 0.5)], shipped.elemental_energies)  # NaCl 0.5 eV lower
    deeper.to_file(tmp_path / "deeper.json.gz")
    assert ReferenceHull.from_file(tmp_path / "deeper.json.gz").e_above_hull(nacl, -3.0)[0] == \
        pytest.approx(e_hull + 0.5)
    (tmp_path / "junk.json.gz").write_bytes(b"not gzip")
    code = cli.main(["evaluate", str(tmp_path / "deeper.json.gz"), "--stability", "--hull",
                     str(tmp_path / "junk.json.gz")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"crystallm evaluate: error: {tmp_path / 'junk.json.gz'}: not a hull file")


def test_mp_hull_from_its_summary_applies_the_mp2020_corrections_the_file_lacks(tmp_path):
    import csv
    import gzip

    from crystallm import data
    from crystallm.evaluation.hull import MP_HULL_SUMMARY

    wanted = {"NaCl", "Na", "Cl2", "TiO2", "Ti", "O2", "NiO", "Ni"}
    with gzip.open(data.data_dir() / MP_HULL_SUMMARY, "rt") as handle:
        reader = csv.DictReader(handle)
        rows = [row for row in reader if row["Reduced Formula"] in wanted]
    with gzip.open(tmp_path / "slice.csv.gz", "wt", newline="") as handle:
        writer = csv.DictWriter(handle, reader.fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    mp = ReferenceHull.from_mp_summary(tmp_path / "slice.csv.gz")
    hull_energy = {f: round(mp.e_above_hull(Composition(f), 0.0)[1] - mp.e_above_hull(Composition(f), 0.0)[0], 3)
                   for f in ("NaCl", "TiO2", "NiO")}
    assert hull_energy == {"NaCl": -2.110, "TiO2": -3.502, "NiO": -1.219}  # MP's formation energies


def test_mp2020_follows_the_potential_unless_set_and_a_cached_relaxation_serves_both():
    assert RelaxationSettings().mp2020 is False and RelaxationSettings(potential="sevennet").mp2020 is True
    assert RelaxationSettings(potential="sevennet", mp2020=False).mp2020 is False
    from crystallm.evaluation.hull import HULL_FILE
    from crystallm.evaluation.relaxation import _relaxation_key

    with_corrections = dataclasses.asdict(RelaxationSettings(potential="sevennet"))
    without = dataclasses.asdict(RelaxationSettings(potential="sevennet", mp2020=False, hull=str(HULL_FILE)))
    assert _relaxation_key(with_corrections) == _relaxation_key(without)
