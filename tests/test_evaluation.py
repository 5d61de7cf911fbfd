import csv
import json
import zipfile

import numpy as np
import pytest

from crystallm import cli
from crystallm.evaluation import csp, metrics, readers, scoring
from crystallm.io import text_format
from crystallm.io.cif import structure_from_cif


@pytest.fixture(scope="module")
def messy_zip(tmp_path_factory, mp20_test_slice):
    """Real CIFs plus every kind of bad entry."""
    path = tmp_path_factory.mktemp("eval") / "cifs.zip"
    good = [row["cif"] for row in mp20_test_slice[:12]]
    overlapping = structure_from_cif(good[0])
    overlapping.append(overlapping[0].specie, overlapping[0].frac_coords + 0.01)
    nan_cif = good[1].replace(good[1].split("_cell_length_a")[1].split("\n")[0], "   nan")
    with zipfile.ZipFile(path, "w") as archive:
        for i, cif in enumerate(good):
            archive.writestr(f"good_{i}.cif", cif)
        archive.writestr("garbage.cif", "\x00\x01 this is not a crystal")
        archive.writestr("empty.cif", "")
        archive.writestr("README.md", "# 15 CIFs")  # not structure files: listed as skipped, never scored
        archive.writestr("LICENSE.md", "CC BY 4.0")
        archive.writestr("overlapping.cif", overlapping.to(fmt="cif"))
        archive.writestr("nan.cif", nan_cif)
        archive.writestr("text.cif", text_format.serialize_structure(structure_from_cif(good[2])))
    return path


def test_messy_zip_is_evaluated_to_the_end(messy_zip):
    skipped = []
    records = list(scoring.score_entries(readers.iter_entries(messy_zip, skipped), num_proc=2))
    by_name = {r.name: r for r in records}
    assert len(records) == 17 and skipped == ["README.md", "LICENSE.md"]
    for name in ("garbage.cif", "empty.cif", "nan.cif"):
        assert by_name[name].error, name
    assert "empty entry" in by_name["empty.cif"].error
    assert by_name["overlapping.cif"].error == "" and not by_name["overlapping.cif"].structural_valid
    assert by_name["text.cif"].stated_space_group is not None and by_name["text.cif"].formula_consistent
    summary = metrics.summarize(metrics.MetricInputs(records))
    assert summary["unreadable"] == 3 and summary["entries"] == 17
    assert summary["unreadable_reasons"] == {"MalformedCIFError: not a readable CIF": 1,
                                             "CrystaLLMInputError: empty entry": 1,
                                             "MalformedCIFError: cell length not a": 1}


def test_a_corrupt_zip_and_a_folder_without_structures_are_one_line_errors(tmp_path, capsys):
    corrupt = tmp_path / "broken.zip"
    corrupt.write_bytes(b"PK\x03\x04 cut short")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("no structures here")
    for source, message in ((corrupt, "not a readable zip archive"), (empty, "no structures found")):
        assert cli.main(["evaluate", str(source), "--quiet", "--num-proc", "1"]) == 2
        error = capsys.readouterr().err
        assert len(error.strip().splitlines()) == 1 and message in error and "Traceback" not in error


def test_evaluate_command_writes_json_markdown_and_plots(messy_zip, mp20_test_slice, tmp_path, capsys):
    test_csv = tmp_path / "test.csv"
    with open(test_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "cif"])
        writer.writeheader()
        writer.writerows({"id": row["id"], "cif": row["cif"]} for row in mp20_test_slice)
    code = cli.main(["evaluate", str(messy_zip), "--test", str(test_csv), "--limit", "17", "--num-proc", "2",
                     "--json", str(tmp_path / "s.json"), "--markdown", str(tmp_path / "s.md"),
                     "--plots", str(tmp_path / "plots"), "--records", str(tmp_path / "records.jsonl"), "--quiet"])
    assert code == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["entries"] == 17 and summary["unreadable"] == 3
    assert summary["skipped"] == {"files": 2, "names": ["README.md", "LICENSE.md"]}
    assert 0 < summary["validity"]["structural"] < 1 and "density" in summary["wasserstein"]
    assert "| validity: structural |" in (tmp_path / "s.md").read_text()
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "density.png", "num_elements.png", "space_groups.png", "validity.png"]
    assert "| entries | 17 |" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(records) == 17 and sum(bool(r["error"]) for r in records) == 3
    assert "structure" not in records[0] and {"name", "structural_valid", "space_group_0_1"} <= set(records[0])


def test_csp_of_test_structures_against_themselves(tmp_path, mp20_test_slice):
    folder = tmp_path / "preds"
    folder.mkdir()
    for row in mp20_test_slice[:8]:
        (folder / f"{row['id']}.cif").write_text(row["cif"])
    records = list(scoring.score_entries(readers.iter_entries(folder), num_proc=1))
    for r in records:
        r.name = r.name.removesuffix(".cif")
    result = csp.evaluate_csp(records, records, attempts=(1,))
    assert result["n=1"]["match_rate"] == 1.0 and result["n=1"]["mean_rms"] == pytest.approx(0, abs=1e-6)
    assert result["lattice n=1"] == {"length_mae": 0.0, "length_median_ae": 0.0, "volume_per_atom_mae": 0.0,
                                     "compared": 8}
    # A cell 2% larger in every length: the error is 2% of the mean length; a missing prediction is left out.
    strained = [s.structure.copy() for s in records]
    for structure in strained:
        structure.scale_lattice(structure.volume * 1.02 ** 3)
    errors = csp.lattice_errors(strained[:7] + [None], [s.structure for s in records])
    lengths = [np.mean(csp._conventional_lattice(s.structure)[0]) for s in records[:7]]
    assert errors["compared"] == 7 and errors["length_mae"] == pytest.approx(0.02 * np.mean(lengths), rel=1e-3)
