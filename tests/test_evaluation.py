import csv
import json
import zipfile

import numpy as np
import pytest

from crystallm import cli, evaluation, serialization


@pytest.fixture(scope="module")
def messy_zip(tmp_path_factory, mp20_test_slice):
    """Real CIFs plus every kind of bad entry."""
    path = tmp_path_factory.mktemp("eval") / "cifs.zip"
    good = [row["cif"] for row in mp20_test_slice[:12]]
    overlapping = serialization.structure_from_cif(good[0])
    overlapping.append(overlapping[0].specie, overlapping[0].frac_coords + 0.01)
    nan_cif = good[1].replace(good[1].split("_cell_length_a")[1].split("\n")[0], "   nan")
    with zipfile.ZipFile(path, "w") as archive:
        for i, cif in enumerate(good):
            archive.writestr(f"good_{i}.cif", cif)
        archive.writestr("garbage.cif", "\x00\x01 this is not a crystal")
        archive.writestr("empty.cif", "")
        archive.writestr("notes.txt", "hello, world")
        archive.writestr("overlapping.cif", overlapping.to(fmt="cif"))
        archive.writestr("nan.cif", nan_cif)
        archive.writestr("text.cif", serialization.serialize_structure(serialization.structure_from_cif(good[2])))
    return path


def test_messy_zip_is_evaluated_to_the_end(messy_zip):
    records = list(evaluation.score_entries(evaluation.iter_entries(messy_zip), num_proc=2))
    by_name = {r["name"]: r for r in records}
    assert len(records) == 18
    for name in ("garbage.cif", "empty.cif", "notes.txt", "nan.cif"):
        assert by_name[name]["error"], name
    assert "empty entry" in by_name["empty.cif"]["error"]
    assert by_name["overlapping.cif"]["error"] == "" and not by_name["overlapping.cif"]["structural_valid"]
    assert by_name["text.cif"]["stated_space_group"] is not None and by_name["text.cif"]["formula_consistent"]
    summary = evaluation.summarize(records)
    assert summary["unreadable"] == 4 and summary["entries"] == 18
    assert summary["unreadable_reasons"] == {"MalformedCIFError: not a readable CIF": 2,
                                             "CrystaLLMInputError: empty entry": 1,
                                             "CrystaLLMInputError: non-finite coordinates or lattice": 1}


def test_evaluate_command_writes_json_markdown_and_plots(messy_zip, mp20_test_slice, tmp_path, capsys):
    test_csv = tmp_path / "test.csv"
    with open(test_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "cif"])
        writer.writeheader()
        writer.writerows({"id": row["id"], "cif": row["cif"]} for row in mp20_test_slice)
    code = cli.main(["evaluate", str(messy_zip), "--test", str(test_csv), "--limit", "18", "--num-proc", "2",
                     "--json", str(tmp_path / "s.json"), "--markdown", str(tmp_path / "s.md"),
                     "--plots", str(tmp_path / "plots"), "--records", str(tmp_path / "records.jsonl"), "--quiet"])
    assert code == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["entries"] == 18 and summary["unreadable"] == 4
    assert 0 < summary["validity"]["structural"] < 1 and "density" in summary["wasserstein"]
    assert "| validity: structural |" in (tmp_path / "s.md").read_text()
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "density.png", "num_elements.png", "space_groups.png", "validity.png"]
    assert "| entries | 18 |" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(records) == 18 and sum(bool(r["error"]) for r in records) == 4
    assert "structure" not in records[0] and {"name", "structural_valid", "space_group_0_1"} <= set(records[0])


def test_csp_of_test_structures_against_themselves(tmp_path, mp20_test_slice):
    folder = tmp_path / "preds"
    folder.mkdir()
    for row in mp20_test_slice[:8]:
        (folder / f"{row['id']}.cif").write_text(row["cif"])
    records = list(evaluation.score_entries(evaluation.iter_entries(folder), num_proc=1))
    for r in records:
        r["name"] = r["name"].removesuffix(".cif")
    result = evaluation.evaluate_csp(records, records, attempts=(1,))
    assert result["n=1"]["match_rate"] == 1.0 and result["n=1"]["mean_rms"] == pytest.approx(0, abs=1e-6)
    assert np.isfinite(result["n=1"]["mean_rms"])
